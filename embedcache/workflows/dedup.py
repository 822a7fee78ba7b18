"""The jobs users run: deduplicate a set, list its near-duplicate pairs, build a kNN graph.

Every workflow has an array form and a text form. Texts are embedded (exact duplicate texts
are collapsed first, so each distinct text is embedded once) and then handed to the array
form; a :class:`embedcache.VectorStore` is read as its live ids, vectors and texts, all from
one committed state, in the order of ``store.ids()``.

Two ways to turn near-duplicate pairs into groups (``deduplicate(..., mode=...)``):

``mode="connected"`` (default)
    A group is a connected component of the graph whose edges are the pairs scored at or
    above ``threshold``. The result does not depend on input order, and it is what an
    exact all-pairs search followed by union-find gives; one representative per group is
    kept. Chains can join items that are not similar to each other (a ~ b ~ c with a and c
    below the threshold); the score reported for a removed item is its similarity to the
    representative, which may then be below the threshold (``explain(i)`` lists the items
    it is directly similar to).
``mode="greedy"``
    The first-seen rule of semhash: items are visited in ``keep`` order (input order, or
    longest text first) and an item is removed when it is at or above the threshold with an
    item already kept, as a duplicate of the most similar of them (ties: the lower index).
    Every removed item is directly similar to the item it is a duplicate of, and no two kept
    items are near-duplicates of each other, but the result depends on the visiting order, it
    can keep more items than ``"connected"``, and a kept item may be a near-duplicate of an
    item removed as a duplicate of another one.

Every score is the kernels' (:func:`embedcache.similar_pairs`): float32 cosine of the vectors
as given, clipped to [-1, 1], a vector with its copy exactly 1; a pair is at or above the
threshold when :func:`embedcache.kernels.meets_threshold` says so. Texts, arrays, stores and
``VectorStore.similar_pairs`` therefore agree on every pair and score.

>>> import numpy as np, embedcache as ec
>>> x = np.array([[1, 0], [0.99, 0.1], [0, 1], [0.1, 0.99], [1, 1]], dtype=np.float32)
>>> res = ec.deduplicate(x, threshold=0.98, progress=False)
>>> res.kept.tolist(), res.removed.tolist(), res.duplicate_of.tolist()
([0, 2, 4], [1, 3], [0, 2])
>>> [g.tolist() for g in res.groups]
[[0, 1], [2, 3]]
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import sys
from collections.abc import Callable, Iterator, KeysView, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedcache import kernels
from embedcache.cache import CachedEmbedder
from embedcache.errors import (
    DimensionMismatchError,
    InvalidInputError,
    InvalidInputTypeError,
    MissingDependencyError,
    NamespaceMismatchError,
)
from embedcache.providers.base import normalize_text, validate_texts
from embedcache.store import VectorStore

__all__ = ["DedupResult", "PairTable", "deduplicate", "knn_graph", "near_duplicates"]

#: rows of the query side per pair-search or top-k call; one progress step each
_CHUNK_ROWS = 8192


# --------------------------------------------------------------------------------------
# PairTable
# --------------------------------------------------------------------------------------


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
    ) -> None:
        i = np.asarray(i, dtype=np.int64).reshape(-1)
        j = np.asarray(j, dtype=np.int64).reshape(-1)
        score = np.asarray(score, dtype=np.float32).reshape(-1)
        if not (len(i) == len(j) == len(score)):
            raise InvalidInputError(
                f"i, j and score must have the same length, got {len(i)}, {len(j)}, {len(score)}"
            )
        if sort and len(i):
            order = np.lexsort((j, i, -score.astype(np.float64)))
            i, j, score = i[order], j[order], score[order]
        self.i, self.j, self.score = i, j, score
        self._texts_i, self._texts_j = texts_i, texts_j
        self._ids_i, self._ids_j = ids_i, ids_j

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
        if not -len(self) <= k < len(self):
            raise IndexError(f"pair {k} out of range for {len(self)} pairs")
        return self._row(k % len(self))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for k in range(len(self)):
            yield self._row(k)

    def __repr__(self) -> str:
        head = [self._row(k) for k in range(min(len(self), 5))]
        lines = [f"PairTable({len(self)} pairs, columns={self.columns})"]
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


# --------------------------------------------------------------------------------------
# DedupResult
# --------------------------------------------------------------------------------------


@dataclass(repr=False)
class DedupResult:
    """What :func:`deduplicate` found.

    kept, removed: sorted int64 indices into the items. ``duplicate_of[k]`` and
    ``scores[k]`` belong to ``removed[k]``: the index of the item it duplicates (its
    group's representative; an index into the reference set when ``reference`` is true)
    and their cosine similarity. groups: int64 index arrays of the groups with more than
    one item, each sorted, in the order of their first item (empty for a reference run).
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
            f"{', reference=True' if self.reference else ''})"
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
        """A few lines telling why item ``i`` was kept or removed."""
        i = int(i)
        if not 0 <= i < self.n:
            raise InvalidInputError(f"i must be in [0, {self.n}), got {i}")
        pos = self._removed_at(i)
        is_removed = pos is not None
        if self.reference:
            if not is_removed:
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
            line = f"{self._name(i)} was kept: no other item scores >= {t} with it."
        elif self.mode == "greedy":
            line = (f"{self._name(i)} was kept: no kept item scores >= {t} with it (an item is "
                    "removed when it scores >= the threshold with an item kept before it in keep "
                    "order).")
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
            lines.append(f"Items scoring >= {t} with it ({len(linked)}): {shown}"
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
        if n < 0:
            raise InvalidInputError(f"n must be >= 0, got {n}")
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


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _import_pandas():
    try:
        import pandas as pd
    except ImportError as exc:
        raise MissingDependencyError(
            'pandas is not installed; install it with: pip install "embedcache-sim[pandas]"'
        ) from exc
    return pd


def _progress_bar(progress: bool | None, total: int, desc: str):
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(total=total, desc=desc, unit="rows", disable=not show, file=sys.stderr, leave=False)


def _check_threshold(threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)):
        raise InvalidInputTypeError(
            f"threshold must be a number in [-1, 1], got {type(threshold).__name__}"
        )
    t = float(threshold)
    if not -1.0 <= t <= 1.0:
        raise InvalidInputError(f"threshold must be in [-1, 1], got {threshold}")
    return t


@dataclass
class _Prepared:
    """Items reduced to their distinct vectors."""

    x: np.ndarray  # (u, d) float32, one row per distinct item (as given, not normalized)
    inverse: np.ndarray  # (n,) item -> row of x
    first: np.ndarray  # (u,) first item of each row
    texts: list[str] | None
    ids: list[str] | None

    @property
    def n(self) -> int:
        return len(self.inverse)


def _collapse(keys: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(inverse, first) of equal keys, in first-seen order."""
    seen: dict[Any, int] = {}
    inverse = np.empty(len(keys), dtype=np.int64)
    first: list[int] = []
    for k, key in enumerate(keys):
        u = seen.setdefault(key, len(first))
        if u == len(first):
            first.append(k)
        inverse[k] = u
    return inverse, np.asarray(first, dtype=np.int64)


_ACCEPTED = "texts (a list of str), an array of shape (n, d) or a VectorStore"


def _describe(items: Any, name: str) -> str:
    """What came, for an error message: its type, and its size and first item or its shape."""
    if isinstance(items, (list, tuple)):
        if not items:
            return f"an empty {type(items).__name__}"
        return f"a {type(items).__name__} of {len(items)} items, {name}[0] being {type(items[0]).__name__}"
    shape = getattr(items, "shape", None)
    if shape is not None:
        return f"{type(items).__name__} of shape {shape} and dtype {getattr(items, 'dtype', '?')}"
    return type(items).__name__


def _as_matrix(x: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError):  # ragged nested lists
        arr = np.empty(0, dtype=object)
    if arr.dtype.kind not in "fiu":
        if isinstance(x, np.ndarray):
            raise InvalidInputTypeError(f"{name} must hold numbers, got dtype {arr.dtype}")
        raise InvalidInputTypeError(f"{name} must be {_ACCEPTED}; got {_describe(x, name)}")
    if arr.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2D array of shape (n, d), got {_describe(x, name)}")
    if arr.shape[1] == 0:
        raise InvalidInputError(f"{name} must have at least one column, got shape {arr.shape}")
    if arr.dtype not in (np.float32, np.float16):
        arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{name} contains NaN or infinite values")
    return arr


def _ordered(items: Any, name: str) -> Any:
    """``items`` as given when it is a store, an array, a list or a tuple; another ordered
    iterable (a generator, ``dict.keys()``) read into a list. Results index the items, so
    unordered collections are refused."""
    if isinstance(items, (VectorStore, list, tuple, str, bytes)) or hasattr(items, "dtype"):
        return items
    if isinstance(items, Mapping):
        raise InvalidInputTypeError(
            f"{name} must be {_ACCEPTED}; got a {type(items).__name__}: pass list({name}.values()) "
            f"for its values or list({name}) for its keys"
        )
    if isinstance(items, AbstractSet) and not isinstance(items, KeysView):
        raise InvalidInputTypeError(
            f"{name} must be ordered, since results index the items; got a {type(items).__name__}, "
            f"which has no stable order: pass a list, e.g. sorted({name})"
        )
    try:
        return list(items)
    except TypeError:
        raise InvalidInputTypeError(f"{name} must be {_ACCEPTED}; got {_describe(items, name)}") from None


def _is_texts(items: Any) -> bool:
    if isinstance(items, (str, bytes)):
        return True  # refused by validate_texts with a clear message
    kind = getattr(getattr(items, "dtype", None), "kind", None)
    if isinstance(kind, str):  # numpy arrays, pandas Series
        return kind in "USO"
    if isinstance(items, (list, tuple)):  # texts when any item is one: the others are named
        return len(items) == 0 or any(isinstance(t, str) for t in items)
    return False


class _Embedding:
    """The embedder for texts, made on first use and closed by ``close()`` if made here.

    No embedder: the built-in hashing embedder, used directly (it is cheap and offline, so
    nothing is cached on disk). A bare embedder is wrapped in a :class:`CachedEmbedder` on the
    default cache directory; a ``CachedEmbedder`` is used as it is.
    """

    def __init__(self, embedder: Any) -> None:
        if embedder is not None and not callable(getattr(embedder, "embed", None)):
            raise InvalidInputTypeError(
                f"embedder must be an Embedder (with .embed(texts)), got {type(embedder).__name__}"
            )
        self._given = embedder
        self._made: Any = None

    def _get(self) -> Any:
        if self._made is None:
            if self._given is None:
                from embedcache.providers.hashing import HashingEmbeddings

                self._made = HashingEmbeddings()
            elif isinstance(self._given, CachedEmbedder):
                self._made = self._given
            else:
                self._made = CachedEmbedder(self._given)
        return self._made

    @property
    def namespace(self) -> str | None:
        if self._given is None:
            return self._get().cache_namespace
        ns = getattr(self._given, "cache_namespace", None)
        return ns if isinstance(ns, str) else None

    def embed(self, texts: list[str], progress: bool | None) -> np.ndarray:
        emb = self._get()
        if isinstance(emb, CachedEmbedder):
            return emb.embed(texts, progress=progress)
        return emb.embed(texts)

    def close(self) -> None:
        made, self._made = self._made, None
        if made is not None and made is not self._given and isinstance(made, CachedEmbedder):
            made.close()  # closes the cache it opened, never the caller's embedder

    def __enter__(self) -> _Embedding:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _namespace(items: Any, emb: _Embedding) -> str | None:
    """``cache_namespace`` of the embedder that made (or will make) the vectors of ``items``."""
    if isinstance(items, VectorStore):
        return items.namespace
    if _is_texts(items):
        return emb.namespace
    return None  # vectors given as an array: unknown


def _prepare(items: Any, *, emb: _Embedding, progress: bool | None, name: str = "items") -> _Prepared:
    """Texts, an (n, d) array or a VectorStore -> their distinct vectors."""
    if isinstance(items, VectorStore):
        ids, x, meta = items.snapshot()  # one read: ids, vectors and texts of one state
        x = _as_matrix(x, name)
        key = items.text_key
        texts = [m.get(key) if isinstance(m, dict) else None for m in meta]
        texts_ok = bool(texts) and all(isinstance(t, str) for t in texts)
        return _from_matrix(x, texts=texts if texts_ok else None, ids=ids)
    if _is_texts(items):
        texts = validate_texts(items, allow_empty_list=True, what=name)
        # canonically equivalent spellings (NFC and NFD "café") are the same text
        inverse, first = _collapse([normalize_text(t) for t in texts])
        if not len(first):
            return _Prepared(np.zeros((0, 1), dtype=np.float32), inverse, first, texts, None)
        x = _as_matrix(emb.embed([texts[k] for k in first], progress), "embeddings")
        # then as an array: distinct texts with equal vectors are exact copies too
        rows = _from_matrix(x, texts=None, ids=None)
        return _Prepared(rows.x, rows.inverse[inverse], first[rows.first], texts, None)
    return _from_matrix(_as_matrix(items, name), texts=None, ids=None)


def _from_matrix(x: np.ndarray, *, texts: list[str] | None, ids: list[str] | None) -> _Prepared:
    # zero rows are similar to nothing, not even to each other: never collapse them
    keys = [hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).digest()
            if row.any() else k for k, row in enumerate(x)]
    inverse, first = _collapse(keys)
    xu = x[first] if len(first) < len(x) else x
    return _Prepared(np.ascontiguousarray(xu, dtype=np.float32), inverse, first, texts, ids)


@dataclass
class _Pairs:
    """Every pair of items at or above the threshold, held over distinct rows.

    ``(ui, uj, us)``: pairs of distinct rows (ui < uj) and their scores. The items of one
    row (exact copies) pair with each other at ``copy_score[row]``, their row's score with
    itself; NaN for a row without copies (or whose self score is below the threshold).
    Every score is the kernels' (:func:`embedcache.kernels.similar_pairs`), compared by
    their rule.
    """

    inverse: np.ndarray
    first: np.ndarray
    ui: np.ndarray
    uj: np.ndarray
    us: np.ndarray
    copy_score: np.ndarray

    def links(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The items that pair with item ``i`` and their scores, in index order."""
        r = self.inverse[i]
        row_score = np.full(len(self.copy_score), np.nan, dtype=np.float32)
        row_score[self.uj[self.ui == r]] = self.us[self.ui == r]
        row_score[self.ui[self.uj == r]] = self.us[self.uj == r]
        row_score[r] = self.copy_score[r]
        items = np.flatnonzero(~np.isnan(row_score[self.inverse]))
        items = items[items != i]
        return items, row_score[self.inverse[items]]

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Enough pairs to connect what the pairs connect, i < j: distinct-row pairs between
        first occurrences, and each copy with the first occurrence of its row."""
        a, b = self.first[self.ui], self.first[self.uj]
        k = np.arange(len(self.inverse), dtype=np.int64)
        firsts = self.first[self.inverse]
        dup = (firsts != k) & ~np.isnan(self.copy_score[self.inverse])
        return (np.concatenate([np.minimum(a, b), firsts[dup]]),
                np.concatenate([np.maximum(a, b), k[dup]]),
                np.concatenate([self.us, self.copy_score[self.inverse[dup]]]))

    def expand(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All pairs of items (i < j), without a Python loop over them."""
        if len(self.first) == len(self.inverse):  # no exact copies: distinct rows are the items
            i, j, s = self.first[self.ui], self.first[self.uj], self.us
        else:
            # items of each distinct row, contiguous: members[start[r] : start[r] + count[r]]
            members = np.argsort(self.inverse, kind="stable")
            count = np.bincount(self.inverse, minlength=len(self.first))
            start = np.concatenate([[0], np.cumsum(count)[:-1]])
            # every distinct-row pair expands to all pairs of their items
            i, j = _cross(members, start, count, self.ui, self.uj)
            s = np.repeat(self.us, count[self.ui] * count[self.uj])
            rows = np.flatnonzero(~np.isnan(self.copy_score))
            ci, cj = _cross(members, start, count, rows, rows)
            below = ci < cj  # each unordered pair of copies once
            ci, cj = ci[below], cj[below]
            i, j = np.concatenate([i, ci]), np.concatenate([j, cj])
            s = np.concatenate([s, self.copy_score[self.inverse[ci]]])
        return np.minimum(i, j), np.maximum(i, j), s


def _find_pairs(p: _Prepared, threshold: float, progress: bool | None, chunk: int) -> _Pairs:
    ui, uj, us = _pairs_within(p.x, threshold, progress, chunk)
    rows = np.flatnonzero(np.bincount(p.inverse, minlength=len(p.x)) > 1)
    own = kernels.pair_scores(p.x, rows, rows)  # what copies of a row score with each other
    copy_score = np.full(len(p.x), np.nan, dtype=np.float32)
    linked = kernels.meets_threshold(own, threshold)
    copy_score[rows[linked]] = own[linked]
    return _Pairs(p.inverse, p.first, ui, uj, us, copy_score)


def _pairs_within(x: np.ndarray, threshold: float, progress: bool | None, chunk: int):
    """All (i, j, s) with i < j and cosine s >= threshold over the rows of ``x``."""
    n = len(x)
    if n < 2:
        e = np.empty(0, dtype=np.int64)
        return e, e.copy(), np.empty(0, dtype=np.float32)
    if n <= chunk:
        return kernels.similar_pairs(x, threshold)
    parts_i, parts_j, parts_s = [], [], []
    with _progress_bar(progress, n, "pairs") as bar:
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            i, j, s = kernels.similar_pairs(x[a:b], threshold)
            parts_i.append(i + a), parts_j.append(j + a), parts_s.append(s)
            if b < n:
                i, j, s = kernels.similar_pairs(x[a:b], threshold, y=x[b:])
                parts_i.append(i + a), parts_j.append(j + b), parts_s.append(s)
            bar.update(b - a)
    return (np.concatenate(parts_i).astype(np.int64), np.concatenate(parts_j).astype(np.int64),
            np.concatenate(parts_s).astype(np.float32))


def _priority(keep: Any, n: int, texts: list[str] | None) -> np.ndarray:
    if keep == "first":
        return np.arange(n, dtype=np.int64)
    if keep == "longest":
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=n)  # type: ignore[union-attr]
        return np.argsort(-lengths, kind="stable").astype(np.int64)
    raise AssertionError(f"unchecked keep {keep!r}")  # _check_keep refuses the rest


def _check_keep(keep: Any, texts: list[str] | None, mode: str, *, texts_known: bool = False) -> None:
    if callable(keep):
        if mode == "greedy":
            raise InvalidInputError(
                "mode='greedy' takes keep='first' or keep='longest', got a callable; "
                "use mode='connected' for a custom choice"
            )
        return
    if keep not in ("first", "longest"):
        raise InvalidInputError(f"keep must be 'first', 'longest' or a callable, got {keep!r}")
    if keep == "longest" and texts is None and texts_known:
        raise InvalidInputError(
            "keep='longest' needs texts (a list of str, or a store whose metadata has 'text'); "
            "got vectors only"
        )


def _groups_from_labels(labels: np.ndarray) -> list[np.ndarray]:
    """Index arrays of the labels that occur more than once, ordered by first member."""
    if not len(labels):
        return []
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    ends = np.r_[starts[1:], len(labels)]
    groups = [order[a:b] for a, b in zip(starts, ends) if b - a > 1 and sorted_labels[a] >= 0]
    groups.sort(key=lambda g: int(g[0]))
    return groups


def _group_index(groups: list[np.ndarray], n: int) -> np.ndarray:
    """For each of ``n`` items, the position of its group in ``groups``, or -1."""
    group_of = np.full(n, -1, dtype=np.int64)
    for g, members in enumerate(groups):
        group_of[members] = g
    return group_of


def _pick(keep: Any, group: np.ndarray, items: Any, texts: list[str] | None) -> int:
    if keep == "first":
        return int(group[0])
    if keep == "longest":
        lengths = [len(texts[k]) for k in group]  # type: ignore[index]
        return int(group[int(np.argmax(lengths))])
    choice = keep(group.copy(), items)
    try:
        choice = int(choice)
    except (TypeError, ValueError):
        raise InvalidInputTypeError(
            f"keep callable must return an item index, got {type(choice).__name__}"
        ) from None
    if choice not in set(group.tolist()):
        raise InvalidInputError(
            f"keep callable must return one of the group's indices {group.tolist()[:10]}, got {choice}"
        )
    return choice


# --------------------------------------------------------------------------------------
# public workflows
# --------------------------------------------------------------------------------------


def deduplicate(
    items: Any,
    *,
    threshold: float = 0.9,
    embedder: Any = None,
    against: Any = None,
    keep: str | Callable[[np.ndarray, Any], int] = "first",
    mode: str = "connected",
    progress: bool | None = None,
    _chunk_rows: int = _CHUNK_ROWS,
) -> DedupResult:
    """Find near-duplicates by cosine similarity and choose which items to keep.

    items: texts, a list or another ordered iterable of str (embedded with ``embedder``: by
    default the built-in :class:`~embedcache.HashingEmbeddings`, used directly and cached
    nowhere; a bare embedder is wrapped in a :class:`~embedcache.CachedEmbedder` on the
    default cache directory, closed again at the end), an array of shape (n, d), or a
    :class:`~embedcache.VectorStore`. A ``set`` is refused: results index the items, and a
    set has no stable order. Exact duplicates (equal texts, or equal vectors) are collapsed
    before anything is embedded or compared.
    threshold: cosine similarity in [-1, 1]; pairs at or above it are duplicates.
    against: a reference set (texts, array or store). Then only items at or above the
    threshold with some reference item are removed (e.g. test rows leaking from train);
    the items are not deduplicated among themselves, call again without ``against``. When
    both sides name the embedder of their vectors (texts: ``embedder``; a store: its
    ``namespace``) and they differ, :class:`~embedcache.NamespaceMismatchError` is raised
    before anything is embedded.
    keep: which member of a group stays: ``"first"`` (lowest index), ``"longest"`` (longest
    text, the first of equals), or ``keep(group_indices, items) -> index``.
    mode: ``"connected"`` or ``"greedy"``; see the module docstring.
    progress: ``None`` shows progress bars when stderr is a terminal, ``False`` never.
    """
    threshold = _check_threshold(threshold)
    if mode not in ("connected", "greedy"):
        raise InvalidInputError(f"mode must be 'connected' or 'greedy', got {mode!r}")
    if not isinstance(_chunk_rows, int) or _chunk_rows < 1:
        raise InvalidInputError(f"_chunk_rows must be >= 1, got {_chunk_rows}")
    items = _ordered(items, "items")
    if against is not None:
        against = _ordered(against, "against")
    with _Embedding(embedder) as emb:
        if against is None:  # check what can be checked before anything is embedded
            _check_keep(keep, None, mode)
        else:
            ns, ref_ns = _namespace(items, emb), _namespace(against, emb)
            if ns is not None and ref_ns is not None and ns != ref_ns:
                raise NamespaceMismatchError(
                    f"items and the reference set must come from one embedder: items are of "
                    f"namespace {ns!r}, the reference set of {ref_ns!r}"
                )
        p = _prepare(items, emb=emb, progress=progress)
        if against is not None:
            ref = _prepare(against, emb=emb, progress=progress, name="against")
            return _deduplicate_against(p, ref, threshold, progress, _chunk_rows)
    _check_keep(keep, p.texts, mode, texts_known=True)
    n = p.n
    pairs = _find_pairs(p, threshold, progress, _chunk_rows)
    pi, pj, ps = pairs.edges()
    if mode == "connected":
        labels = _connected_labels(n, pi, pj)
        groups = _groups_from_labels(labels)
        group_of = _group_index(groups, n)
        removed_l, dup_l = [], []
        for members in groups:
            rep = _pick(keep, members, items, p.texts)
            others = members[members != rep]
            removed_l.append(others)
            dup_l.append(np.full(len(others), rep, dtype=np.int64))
    else:
        group_of, groups, removed_l, dup_l = _greedy(pairs, _priority(keep, n, p.texts))
    removed = np.concatenate(removed_l) if removed_l else np.empty(0, dtype=np.int64)
    dup = np.concatenate(dup_l) if dup_l else np.empty(0, dtype=np.int64)
    order = np.argsort(removed, kind="stable")
    removed, dup = removed[order].astype(np.int64), dup[order].astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[removed] = False
    return DedupResult(
        kept=np.flatnonzero(mask).astype(np.int64),
        removed=removed,
        duplicate_of=dup,
        scores=kernels.pair_scores(p.x, p.inverse[removed], p.inverse[dup]),
        groups=groups,
        threshold=threshold,
        mode=mode,
        texts=p.texts,
        ids=p.ids,
        _pairs=(pi, pj, ps),
        _group_of=group_of,
        _links=pairs.links,
    )


def _connected_labels(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), dtype=bool), (i, j)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


def _greedy(pairs: _Pairs, order: np.ndarray):
    """semhash's first-seen rule, visiting items in ``order``: an item is removed as a
    duplicate of the most similar item already kept that it pairs with (ties: the lower index).

    Works on distinct rows: an exact copy has the pairs of the row it copies, and at most one
    item per row is ever kept (its copies pair with it).
    """
    from scipy.sparse import csr_matrix

    u, n = len(pairs.first), len(pairs.inverse)
    ui, uj, us = pairs.ui, pairs.uj, pairs.us
    adj = csr_matrix((np.concatenate([us, us]), (np.concatenate([ui, uj]), np.concatenate([uj, ui]))),
                     shape=(u, u))
    adj.sum_duplicates()
    indptr, indices, data = adj.indptr, adj.indices, adj.data
    kept_of_row = np.full(u, -1, dtype=np.int64)
    owner = np.full(n, -1, dtype=np.int64)
    copies = ~np.isnan(pairs.copy_score)
    rows = pairs.inverse[order]
    active = (indptr[rows + 1] > indptr[rows]) | copies[rows]
    for v, r in zip(order[active].tolist(), rows[active].tolist()):
        cand = np.append(kept_of_row[indices[indptr[r]:indptr[r + 1]]], kept_of_row[r])
        sc = np.append(data[indptr[r]:indptr[r + 1]], pairs.copy_score[r])
        hit = (cand >= 0) & ~np.isnan(sc)
        if hit.any():
            cand, sc = cand[hit], sc[hit]
            owner[v] = cand[np.lexsort((cand, -sc.astype(np.float64)))[0]]
        else:
            kept_of_row[r] = v
    removed = np.flatnonzero(owner >= 0)
    labels = np.full(n, -1, dtype=np.int64)
    labels[removed] = owner[removed]
    labels[np.unique(owner[removed])] = np.unique(owner[removed])
    groups = _groups_from_labels(labels)
    return _group_index(groups, n), groups, [removed], [owner[removed]]


def _deduplicate_against(p: _Prepared, ref: _Prepared, threshold: float,
                         progress: bool | None, chunk: int) -> DedupResult:
    n = p.n
    if n and ref.n and p.x.shape[1] != ref.x.shape[1]:
        raise DimensionMismatchError(
            f"items have dimension {p.x.shape[1]} but the reference set has {ref.x.shape[1]}"
        )
    best_s = np.full(len(p.x), -np.inf, dtype=np.float32)
    best_r = np.full(len(p.x), -1, dtype=np.int64)
    if len(p.x) and len(ref.x):
        with _progress_bar(progress if len(p.x) > chunk else False, len(p.x), "against") as bar:
            for a in range(0, len(p.x), chunk):
                s, r = kernels.top_k(p.x[a:a + chunk], ref.x, 1)
                best_s[a:a + chunk], best_r[a:a + chunk] = s[:, 0], r[:, 0]
                bar.update(min(chunk, len(p.x) - a))
    item_hit = kernels.meets_threshold(best_s, threshold)[p.inverse]
    removed = np.flatnonzero(item_hit).astype(np.int64)
    dup = ref.first[best_r[p.inverse[removed]]]
    scores = best_s[p.inverse[removed]]
    return DedupResult(
        kept=np.flatnonzero(~item_hit).astype(np.int64),
        removed=removed,
        duplicate_of=dup,
        scores=scores,
        groups=[],
        threshold=threshold,
        mode="reference",
        reference=True,
        texts=p.texts,
        ids=p.ids,
        reference_texts=ref.texts,
        reference_ids=ref.ids,
        _pairs=(removed, dup, scores),
        _group_of=np.full(n, -1, dtype=np.int64),
    )


def near_duplicates(
    items: Any,
    *,
    threshold: float,
    embedder: Any = None,
    progress: bool | None = None,
    _chunk_rows: int = _CHUNK_ROWS,
) -> PairTable:
    """Every pair ``i < j`` of items with cosine similarity >= ``threshold``, highest first.

    items: texts (embedded as in :func:`deduplicate`), an (n, d) array, or a VectorStore.
    Exact duplicates are embedded once and reported as pairs with score 1.0.
    """
    threshold = _check_threshold(threshold)
    items = _ordered(items, "items")
    with _Embedding(embedder) as emb:
        p = _prepare(items, emb=emb, progress=progress)
    i, j, s = _find_pairs(p, threshold, progress, _chunk_rows).expand()
    return PairTable(i, j, s, texts_i=p.texts, texts_j=p.texts, ids_i=p.ids, ids_j=p.ids)


def _cross(members: np.ndarray, start: np.ndarray, count: np.ndarray, ra: np.ndarray, rb: np.ndarray):
    """All pairs (items of row ra[k]) x (items of row rb[k]) for every k, without a Python loop."""
    ca, cb = count[ra], count[rb]
    sizes = ca * cb
    total = int(sizes.sum())
    if not total:
        e = np.empty(0, dtype=np.int64)
        return e, e.copy()
    which = np.repeat(np.arange(len(ra)), sizes)
    t = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    wb = cb[which]
    ia = members[start[ra][which] + t // wb]
    ib = members[start[rb][which] + t % wb]
    return ia.astype(np.int64), ib.astype(np.int64)


def knn_graph(
    x: Any,
    k: int,
    *,
    metric: str = "cosine",
    mode: str = "similarity",
    symmetric: bool = True,
    progress: bool | None = None,
    _chunk_rows: int = _CHUNK_ROWS,
):
    """The exact k-nearest-neighbour graph as a ``scipy.sparse.csr_matrix`` of shape (n, n).

    x: array of shape (n, d) or a VectorStore. Row i holds the k most similar other rows
    (no self loops). mode="similarity" stores the score; mode="distance" stores
    ``1 - cosine`` (clipped at 0, kept as explicit entries even when 0) with each row
    ordered by increasing distance, the form scikit-learn's ``metric="precomputed"``
    (DBSCAN, HDBSCAN, ``NearestNeighbors``, spectral embedding) expects. symmetric=True
    adds j -> i for every i -> j (the graph then has k or more entries per row).

    >>> import numpy as np
    >>> x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    >>> G = knn_graph(x, 1, progress=False)
    >>> G.shape, G.nnz, G[0].indices.tolist()
    ((4, 4), 4, [1])
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"k must be an integer >= 1, got {k!r}")
    if metric not in ("cosine", "dot"):
        raise InvalidInputError(f"metric must be 'cosine' or 'dot', got {metric!r}")
    if mode not in ("similarity", "distance"):
        raise InvalidInputError(f"mode must be 'similarity' or 'distance', got {mode!r}")
    if mode == "distance" and metric != "cosine":
        raise InvalidInputError("mode='distance' needs metric='cosine' (distance = 1 - cosine)")
    from scipy.sparse import csr_matrix

    arr = _as_matrix(x.vectors() if isinstance(x, VectorStore) else x, "x")  # one read
    n = len(arr)
    rows_l, cols_l, vals_l = [], [], []
    if n > 1:
        with _progress_bar(progress if n > _chunk_rows else False, n, "knn") as bar:
            for a in range(0, n, _chunk_rows):
                q = arr[a:a + _chunk_rows]
                s, idx = _top_k_offset(q, arr, int(k), metric, a)
                valid = idx >= 0
                rows_l.append(np.nonzero(valid)[0] + a)
                cols_l.append(idx[valid])
                vals_l.append(s[valid])
                bar.update(len(q))
    rows = np.concatenate(rows_l).astype(np.int64) if rows_l else np.empty(0, dtype=np.int64)
    cols = np.concatenate(cols_l).astype(np.int64) if cols_l else np.empty(0, dtype=np.int64)
    vals = np.concatenate(vals_l).astype(np.float32) if vals_l else np.empty(0, dtype=np.float32)
    if symmetric and len(rows):
        rows, cols, vals = (np.concatenate([rows, cols]), np.concatenate([cols, rows]),
                            np.concatenate([vals, vals]))
        order = np.lexsort((-vals.astype(np.float64), cols, rows))
        rows, cols, vals = rows[order], cols[order], vals[order]
        first = np.r_[True, (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])]
        rows, cols, vals = rows[first], cols[first], vals[first]  # the higher score of i->j, j->i
    if mode == "distance":
        vals = np.maximum(1.0 - vals, 0.0).astype(np.float32)
        order = np.lexsort((cols, vals, rows))
    else:
        order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    graph = csr_matrix((vals, cols, indptr), shape=(n, n))
    graph.has_sorted_indices = mode == "similarity"
    return graph


def _top_k_offset(q: np.ndarray, corpus: np.ndarray, k: int, metric: str, offset: int):
    """top_k of a block of rows of ``corpus`` against all of it, never matching a row to itself."""
    if offset == 0 and len(q) == len(corpus):
        return kernels.top_k(q, corpus, k, metric=metric, exclude_self=True)
    s, idx = kernels.top_k(q, corpus, k + 1, metric=metric)
    own = idx == (np.arange(len(q))[:, None] + offset)
    # drop the row itself where it appears (or the last slot if it did not)
    drop = np.where(own.any(axis=1), own.argmax(axis=1), s.shape[1] - 1)
    keep = np.ones_like(own)
    keep[np.arange(len(q)), drop] = False
    kk = min(k, s.shape[1] - 1)
    return s[keep].reshape(len(q), -1)[:, :kk], idx[keep].reshape(len(q), -1)[:, :kk]
