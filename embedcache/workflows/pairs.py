"""Near-duplicate pairs: :func:`near_duplicates`, and the pair search every workflow shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from embedcache import _config, kernels
from embedcache._validation import check_choice, check_int, check_threshold
from embedcache.index import Recall, check_recall, partitioned_pairs
from embedcache.workflows._prepare import METHODS, _Embedding, _method, _ordered, _prepare, _Prepared, _progress_bar
from embedcache.workflows.results import PairTable

__all__ = ["near_duplicates"]


def near_duplicates(
    items: Any,
    threshold: float = 0.9,
    *,
    embedder: Any = None,
    progress: bool | None = None,
    client: Any = None,
    method: str = "auto",
    recall: float = 0.99,
    seed: int = 0,
    long_texts: str | None = None,
) -> PairTable:
    """Every pair ``i < j`` of items with cosine similarity >= ``threshold``, highest score
    first, ties by ``i`` then ``j``.

    items: texts (embedded as in :func:`deduplicate`), an (n, d) array, or a VectorStore.
    Exact duplicates are embedded once and reported as pairs with score 1.0.
    client: a ``distributed.Client`` (items a VectorStore): tiles of the pair search run as
    tasks on its Dask cluster, whose workers read the store's files (see
    :mod:`embedcache.engine`); the same pairs and scores as without it, bit for bit, with
    either method (the partitioned one with the same seed: the same cells, probes and recall).
    method: ``"exact"`` compares every pair; ``"partitioned"`` compares each row only with
    the cells of a partition index (:mod:`embedcache.index`) nearest to it, probing enough
    cells for ``recall`` (the share of true pairs to find), calibrated and then measured on
    sampled rows against the exact answer; ``"auto"`` (default) is exact up to
    ``_config.INDEX_AUTO_ROWS`` distinct rows. A partitioned search may miss pairs, never
    invents one, and every score is exact. The table says which method ran
    (``PairTable.method``) and the recall measured (``PairTable.recall``, None for exact).
    seed: the sample the index and the recall are drawn from.
    long_texts: the policy for texts over the embedder's input window, as in
    :func:`deduplicate`.
    """
    threshold = check_threshold(threshold)
    recall = check_recall(recall)
    check_choice("method", method, METHODS)
    check_int("seed", seed, 0)
    items = _ordered(items, "items")
    if client is not None:
        from embedcache.workflows._cluster import cluster_pairs, store_items

        p = store_items(items)
        pairs = cluster_pairs(p, threshold, client, progress, method=method, recall=recall, seed=seed)
    else:
        with _Embedding(embedder, long_texts) as emb:
            p = _prepare(items, emb=emb, progress=progress)
        pairs = _find_pairs(p, threshold, progress, method=method, recall=recall, seed=seed)
    i, j, s = pairs.expand()
    return PairTable(i, j, s, texts_i=p.texts, texts_j=p.texts, ids_i=p.ids, ids_j=p.ids,
                     method=pairs.method, recall=pairs.recall)


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
    method: str = "exact"
    recall: Recall | None = None

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


def _find_pairs(p: _Prepared, threshold: float, progress: bool | None, *, method: str = "exact",
                recall: float = 0.99, seed: int = 0) -> _Pairs:
    method = _method(method, len(p.x))
    rec = None
    if method == "exact":
        ui, uj, us = _pairs_within(p.x, threshold, progress)
    else:
        with _progress_bar(progress, 0, "pairs", unit="comparisons") as bar:
            ui, uj, us, rec = partitioned_pairs(p.x, threshold, recall=recall, seed=seed, bar=bar)
    return _Pairs(p.inverse, p.first, ui, uj, us, _copy_scores(p, threshold), method, rec)


def _copy_scores(p: _Prepared, threshold: float) -> np.ndarray:
    """What the copies of each distinct row score with each other, where it meets the
    threshold (NaN: a row without copies, or whose copies are not near-duplicates)."""
    rows = np.flatnonzero(np.bincount(p.inverse, minlength=len(p.x)) > 1)
    own = kernels.pair_scores(p.x, rows, rows)  # what copies of a row score with each other
    copy_score = np.full(len(p.x), np.nan, dtype=np.float32)
    linked = kernels.meets_threshold(own, threshold)
    copy_score[rows[linked]] = own[linked]
    return copy_score


def _find_forest(p: _Prepared, threshold: float, progress: bool | None, *, method: str = "exact",
                 recall: float = 0.99, seed: int = 0):
    """The connected components of the pairs :func:`_find_pairs` lists, without listing them.

    Returns ``(roots, (fi, fj, fs), copy_score, method, recall)``: the root of each distinct
    row, the spanning-forest pairs of distinct rows that joined them (at most one per row),
    and what :class:`_Pairs` holds besides the pairs. Memory is bounded by the rows.
    """
    from embedcache.index import partitioned_forest
    from embedcache.kernels.pairs import forest_roots, threshold_forest

    method = _method(method, len(p.x))
    u = len(p.x)
    parent = np.arange(u, dtype=np.int64)
    rec = None
    if method == "exact":
        fi, fj, fs = _chunked_forest(p.x, threshold, parent, progress, threshold_forest)
    else:
        with _progress_bar(progress, 0, "pairs", unit="comparisons") as bar:
            fi, fj, fs, rec = partitioned_forest(p.x, threshold, parent, recall=recall, seed=seed, bar=bar)
    return forest_roots(parent), (fi, fj, fs), _copy_scores(p, threshold), method, rec


def _chunked_forest(x: np.ndarray, threshold: float, parent: np.ndarray, progress: bool | None, forest):
    """The exact forest over the rows of ``x``, in the chunks of :func:`_pairs_within`."""
    n = len(x)
    chunk = _config.CHUNK_ROWS
    parts_i, parts_j, parts_s = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.float32)]
    with _progress_bar(progress if n > chunk else False, n * (n - 1) / 2, "pairs", unit="comparisons") as bar:
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            ids = np.arange(a, b, dtype=np.int64)
            i, j, s = forest(x[a:b], threshold, parent, ids=ids)
            parts_i.append(i), parts_j.append(j), parts_s.append(s)
            if b < n:
                i, j, s = forest(x[a:b], threshold, parent, ids=ids, y=x[b:],
                                 y_ids=np.arange(b, n, dtype=np.int64))
                parts_i.append(i), parts_j.append(j), parts_s.append(s)
            bar.update((b - a) * (b - a - 1) / 2 + (b - a) * (n - b))
    return np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_s)


def _pairs_within(x: np.ndarray, threshold: float, progress: bool | None):
    """All (i, j, s) with i < j and cosine s >= threshold over the rows of ``x``, in
    blocks of ``_config.CHUNK_ROWS`` rows (one progress step each)."""
    n = len(x)
    chunk = _config.CHUNK_ROWS
    if n < 2:
        e = np.empty(0, dtype=np.int64)
        return e, e.copy(), np.empty(0, dtype=np.float32)
    if n <= chunk:
        return kernels.similar_pairs(x, threshold)
    parts_i, parts_j, parts_s = [], [], []
    # progress in comparisons (the work), not rows: early chunks of the triangle cost more
    with _progress_bar(progress, n * (n - 1) / 2, "pairs", unit="comparisons") as bar:
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            i, j, s = kernels.similar_pairs(x[a:b], threshold)
            parts_i.append(i + a), parts_j.append(j + a), parts_s.append(s)
            if b < n:
                i, j, s = kernels.similar_pairs(x[a:b], threshold, y=x[b:])
                parts_i.append(i + a), parts_j.append(j + b), parts_s.append(s)
            bar.update((b - a) * (b - a - 1) / 2 + (b - a) * (n - b))
    return (np.concatenate(parts_i).astype(np.int64), np.concatenate(parts_j).astype(np.int64),
            np.concatenate(parts_s).astype(np.float32))

