"""What the workflows return: :class:`DedupResult` and :class:`PairTable`."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedcache._validation import _is_int, check_int
from embedcache.errors import InvalidInputError, InvalidInputTypeError, MissingDependencyError
from embedcache.kernels.pairs import pair_order

__all__ = ["DedupResult", "PairTable"]


def _import_pandas():
    try:
        import pandas as pd
    except ImportError as exc:
        raise MissingDependencyError(
            'pandas is not installed; install it with: pip install "embedcache-sim[pandas]"'
        ) from exc
    return pd


def _in_order(i: np.ndarray, j: np.ndarray, score: np.ndarray) -> bool:
    """Whether the pairs are sorted already (score descending, then i, then j): one pass, where
    a search's pairs usually are, instead of sorting them again."""
    s0, s1, i0, i1 = score[:-1], score[1:], i[:-1], i[1:]
    tie = s0 == s1
    later = (i0 < i1) | ((i0 == i1) & (j[:-1] <= j[1:]))
    return bool(np.all((s0 > s1) | (tie & later)))


class PairTable:
    """Pairs ``(i, j, score)``, sorted by score (highest first, ties by ``i`` then ``j``).

    ``i`` and ``j`` index the items given (``j`` indexes the reference set for pairs
    across two sets). When texts or ids are known, ``text_i``/``text_j`` and
    ``id_i``/``id_j`` columns come along. Iterating yields one ``dict`` per row.

    >>> import numpy as np
    >>> t = PairTable(np.array([0, 1]), np.array([2, 3]), np.array([0.91, 0.97]))
    >>> len(t), t.columns
    (2, ['i', 'j', 'score'])
    >>> t[0]
    {'i': 1, 'j': 3, 'score': 0.97}
    """

    def __init__(
        self,
        i: np.ndarray,
        j: np.ndarray,
        score: np.ndarray,
        *,
        texts_i: Sequence[str] | None = None,
        texts_j: Sequence[str] | None = None,
        ids_i: Sequence[str] | None = None,
        ids_j: Sequence[str] | None = None,
        sort: bool = True,
        method: str = "exact",
        recall: Any = None,
    ) -> None:
        i = np.asarray(i, dtype=np.int64).reshape(-1)
        j = np.asarray(j, dtype=np.int64).reshape(-1)
        score = np.asarray(score, dtype=np.float32).reshape(-1)
        if not (len(i) == len(j) == len(score)):
            raise InvalidInputError(
                f"i, j and score must have the same length, got {len(i)}, {len(j)}, {len(score)}"
            )
        if sort and len(i) and not _in_order(i, j, score):
            order = pair_order(i, j, score)
            i, j, score = i[order], j[order], score[order]
        self.i, self.j, self.score = i, j, score
        self._texts_i, self._texts_j = texts_i, texts_j
        self._ids_i, self._ids_j = ids_i, ids_j
        #: ``"exact"`` or ``"partitioned"``: how the pairs were found
        self.method = method
        #: the :class:`embedcache.index.Recall` of a partitioned search, None for an exact one
        self.recall = recall

    @property
    def columns(self) -> list[str]:
        cols = ["i", "j", "score"]
        if self._ids_i is not None:
            cols += ["id_i", "id_j"]
        if self._texts_i is not None:
            cols += ["text_i", "text_j"]
        return cols

    def __len__(self) -> int:
        return len(self.i)

    def _row(self, k: int) -> dict[str, Any]:
        a, b = int(self.i[k]), int(self.j[k])
        row: dict[str, Any] = {"i": a, "j": b, "score": round(float(self.score[k]), 6)}
        if self._ids_i is not None:
            row["id_i"] = self._ids_i[a]
            row["id_j"] = self._ids_j[b]  # type: ignore[index]
        if self._texts_i is not None:
            row["text_i"] = self._texts_i[a]
            row["text_j"] = self._texts_j[b]  # type: ignore[index]
        return row

    def __getitem__(self, k: int) -> dict[str, Any]:
        if not _is_int(k):
            raise InvalidInputTypeError(f"pairs are indexed by an int, got {type(k).__name__}")
        if not -len(self) <= k < len(self):
            raise IndexError(f"pair {k} out of range for {len(self)} pairs")
        return self._row(k % len(self))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for k in range(len(self)):
            yield self._row(k)

    def __repr__(self) -> str:
        head = [self._row(k) for k in range(min(len(self), 5))]
        how = "" if self.recall is None else f", method={self.method!r}, {self.recall}"
        lines = [f"PairTable({len(self)} pairs, columns={self.columns}{how})"]
        for row in head:
            lines.append("  " + ", ".join(f"{c}={row[c]!r:.60}" for c in self.columns))
        if len(self) > len(head):
            lines.append("  ...")
        return "\n".join(lines)

    def to_pandas(self):
        """A ``pandas.DataFrame`` with one row per pair (needs pandas)."""
        pd = _import_pandas()
        data: dict[str, Any] = {"i": self.i, "j": self.j, "score": self.score}
        if self._ids_i is not None:
            data["id_i"] = [self._ids_i[a] for a in self.i]
            data["id_j"] = [self._ids_j[b] for b in self.j]  # type: ignore[index]
        if self._texts_i is not None:
            data["text_i"] = [self._texts_i[a] for a in self.i]
            data["text_j"] = [self._texts_j[b] for b in self.j]  # type: ignore[index]
        return pd.DataFrame(data)

    def to_csv(self, path_or_file: str | os.PathLike | io.TextIOBase, *, delimiter: str = ",") -> None:
        """Write the table as CSV (a header, then one line per pair); no pandas needed."""
        if isinstance(path_or_file, (str, os.PathLike)):
            with open(path_or_file, "w", newline="", encoding="utf-8") as f:
                self.to_csv(f, delimiter=delimiter)
            return
        writer = csv.DictWriter(path_or_file, fieldnames=self.columns, delimiter=delimiter)
        writer.writeheader()
        writer.writerows(self)

    def to_html(self, path: str | os.PathLike, *, threshold: float | None = None, n: int | None = None,
                settings: dict[str, Any] | None = None, title: str | None = None) -> None:
        """Write a self-contained HTML report of the pairs to ``path``: their scores, how
        many pairs higher thresholds keep, and sample pairs side by side with their
        differences highlighted. threshold: the one they were listed at (default: the lowest
        score); n: the number of items they were found among. See
        :func:`embedcache.report.pairs_report`.
        """
        from embedcache import report

        report.write_html(report.pairs_report(self, threshold=threshold, n=n, settings=settings, title=title),
                          path)



@dataclass(repr=False)
class DedupResult:
    """What :func:`deduplicate` found.

    kept, removed: sorted int64 indices into the items. ``duplicate_of[k]`` and
    ``scores[k]`` belong to ``removed[k]``: the index of the item it duplicates (its
    group's representative; an index into the reference set when ``reference`` is true)
    and their cosine similarity. groups: int64 index arrays of the groups with more than
    one item, each sorted, in the order of their first item (empty for a reference run).
    mode: the grouping rule asked for, ``"connected"`` or ``"greedy"``. reference: true
    for a run with ``against=``, where items were compared with the reference set only.
    method: ``"exact"`` or ``"partitioned"``, how the pairs were searched (what ``"auto"``
    chose). recall: the :class:`embedcache.index.Recall` measured for a partitioned search
    (estimate and 95% interval of the share of true pairs found), None for an exact one.
    """

    kept: np.ndarray
    removed: np.ndarray
    duplicate_of: np.ndarray
    scores: np.ndarray
    groups: list[np.ndarray]
    threshold: float
    mode: str
    reference: bool = False
    texts: list[str] | None = None
    ids: list[str] | None = None
    reference_texts: list[str] | None = None
    reference_ids: list[str] | None = None
    _pairs: tuple[np.ndarray, np.ndarray, np.ndarray] = field(default=None)  # type: ignore[assignment]
    _group_of: np.ndarray = field(default=None)  # type: ignore[assignment]
    _links: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None
    #: (distinct vectors, item -> row), for the report's nearest-neighbour scores
    _vectors: tuple[np.ndarray, np.ndarray] | None = None
    #: with ``against``: (best reference score, its reference item) of every item
    _nearest: tuple[np.ndarray, np.ndarray] | None = None
    #: ``weakest(n)``: the n weakest pairs ``(i, j, s)``, computed when asked (else from _pairs)
    _weakest: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
    method: str = "exact"
    recall: Any = None

    @property
    def n(self) -> int:
        """Number of items deduplicated."""
        return len(self.kept) + len(self.removed)

    @property
    def duplicate_ratio(self) -> float:
        """Share of the items that were removed, in [0, 1]."""
        return len(self.removed) / self.n if self.n else 0.0

    def __repr__(self) -> str:
        return (
            f"DedupResult(n={self.n}, kept={len(self.kept)}, removed={len(self.removed)}, "
            f"groups={len(self.groups)}, threshold={self.threshold}, mode={self.mode!r}"
            f"{', reference=True' if self.reference else ''}"
            f"{'' if self.recall is None else f', method={self.method!r}, {self.recall}'})"
        )

    def _name(self, i: int, *, ref: bool = False) -> str:
        texts = self.reference_texts if ref else self.texts
        ids = self.reference_ids if ref else self.ids
        label = f"reference item {i}" if ref else f"item {i}"
        if ids is not None:
            label += f" (id {ids[i]!r})"
        if texts is not None:
            text = texts[i]
            label += f" {text[:80]!r}" + ("..." if len(text) > 80 else "")
        return label

    def explain(self, i: int) -> str:
        """A few lines telling why item ``i`` was kept or removed. After a partitioned search
        they say what the search found: a pair it missed (see ``recall``) is not in them."""
        if not _is_int(i):
            raise InvalidInputTypeError(f"i must be an int (an item's index), got {type(i).__name__}")
        i = int(i)
        if not 0 <= i < self.n:
            raise InvalidInputError(f"i must be in [0, {self.n}), got {i}")
        pos = self._removed_at(i)
        is_removed = pos is not None
        found = " found" if self.method == "partitioned" else ""
        if self.reference:
            if not is_removed:
                if found:
                    return f"{self._name(i)} was kept: the partitioned search found no reference item scoring " \
                           f">= {self.threshold}."
                return f"{self._name(i)} was kept: no reference item scores >= {self.threshold}."
            r, s = int(self.duplicate_of[pos]), float(self.scores[pos])
            return (
                f"{self._name(i)} was removed: it matches {self._name(r, ref=True)} "
                f"with cosine similarity {s:.4f} >= threshold {self.threshold}."
            )
        t = self.threshold
        linked, scores = self._links(i)  # type: ignore[misc]
        if is_removed:
            r, s = int(self.duplicate_of[pos]), float(self.scores[pos])
            if self.mode == "greedy":
                line = (f"{self._name(i)} was removed as a duplicate of {self._name(r)} (cosine "
                        f"similarity {s:.4f} >= threshold {t}), the most similar of the items kept "
                        "before it in keep order.")
            else:
                line = (f"{self._name(i)} was removed as a duplicate of {self._name(r)}, the "
                        f"representative of its group (cosine similarity {s:.4f}; the group is "
                        f"joined by pairs >= threshold {t}).")
        elif not len(linked):
            line = (f"{self._name(i)} was kept: the partitioned search found no other item scoring >= {t} "
                    "with it." if found else f"{self._name(i)} was kept: no other item scores >= {t} with it.")
        elif self.mode == "greedy":
            line = (f"{self._name(i)} was kept: " + ("the partitioned search found no kept item scoring"
                                                     if found else "no kept item scores")
                    + f" >= {t} with it (an item is removed when it scores >= the threshold with an item "
                    "kept before it in keep order).")
        else:
            line = f"{self._name(i)} was kept as the representative of its group."
        lines = [line]
        g = int(self._group_of[i])
        if g >= 0:
            group = self.groups[g]
            lines.append(f"Group of {len(group)} items ({self.mode}): {group[:20].tolist()}"
                         + (" ..." if len(group) > 20 else ""))
        if len(linked):
            order = np.lexsort((linked, -scores.astype(np.float64)))
            shown = ", ".join(f"{int(linked[k])} ({float(scores[k]):.4f}, {self._fate(int(linked[k]))})"
                              for k in order[:5])
            lines.append(f"Items{found} scoring >= {t} with it ({len(linked)}): {shown}"
                         + (", ..." if len(linked) > 5 else "") + ".")
        return "\n".join(lines)

    def _removed_at(self, i: int) -> int | None:
        """Position of item ``i`` in ``removed``, or None when it was kept."""
        pos = int(np.searchsorted(self.removed, i))
        return pos if pos < len(self.removed) and self.removed[pos] == i else None

    def _fate(self, j: int) -> str:
        pos = self._removed_at(j)
        return "kept" if pos is None else f"removed as a duplicate of {int(self.duplicate_of[pos])}"

    def least_similar_pairs(self, n: int = 10) -> PairTable:
        """The ``n`` weakest pairs at or above the threshold that formed the groups.

        Read them to choose a threshold: if these still look like duplicates, the threshold
        could go lower; if not, raise it. For a reference run, the weakest matches between
        removed items and reference items.
        """
        n = check_int("n", n, 0)
        if self._weakest is not None:
            pi, pj, ps = self._weakest(n)
            order = np.arange(len(pi))
        else:
            pi, pj, ps = self._pairs
            order = np.lexsort((pj, pi, ps.astype(np.float64)))[:n]
        table = PairTable(
            pi[order], pj[order], ps[order],
            texts_i=self.texts, texts_j=self.reference_texts if self.reference else self.texts,
            ids_i=self.ids, ids_j=self.reference_ids if self.reference else self.ids,
            sort=False,
        )
        # least similar first
        return table

    def to_html(self, path: str | os.PathLike, *, vectors: np.ndarray | None = None,
                settings: dict[str, Any] | None = None, title: str | None = None) -> None:
        """Write a self-contained HTML report of the run to ``path``: each item's
        nearest-neighbour score with the threshold marked, how many items nearby thresholds
        would remove, pairs just above and below the threshold side by side, the largest
        groups and the settings. See :func:`embedcache.report.dedup_report` for the options
        and what it costs (one exact top-1 pass of up to 4,000 sampled items).
        """
        from embedcache import report

        report.write_html(report.dedup_report(self, vectors=vectors, settings=settings, title=title), path)

    def to_pandas(self):
        """One row per item: index, kept, duplicate_of, score, group (and text, id)."""
        pd = _import_pandas()
        n = self.n
        dup = np.full(n, -1, dtype=np.int64)
        score = np.full(n, np.nan, dtype=np.float32)
        dup[self.removed] = self.duplicate_of
        score[self.removed] = self.scores
        kept = np.ones(n, dtype=bool)
        kept[self.removed] = False
        data: dict[str, Any] = {"index": np.arange(n), "kept": kept, "duplicate_of": dup, "score": score}
        if not self.reference:
            data["group"] = self._group_of
        if self.ids is not None:
            data["id"] = self.ids
        if self.texts is not None:
            data["text"] = self.texts
        return pd.DataFrame(data)
