"""Queries through the store's index in one compiled pass.

The probed cells of all queries are grouped by cell: each probed cell is read once, from the
index's cell-ordered copy of the vectors (one contiguous piece per cell), and each of its
rows is scored against every query that probes it while the row is in the cache. The work
(rows times the queries probing them) is cut into equal shares, one per numba thread, each
folding into heaps of its own, merged at the end; a small search runs on one thread. A score
is the kernels' own per-pair score (:func:`embedcache.kernels._core._pair_score` on the row
decoded exactly, as the exact scan computes it), so a result equals what the exact scan gives
for the same rows, bit for bit; ties go to the lower row number. The cells a query probes are
its nearest centroids as :func:`embedcache.top_k` ranks them (ties to the lower cell).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from embedcache import _config, kernels
from embedcache.kernels._core import (
    _NO_INDEX,
    FASTMATH,
    _better,
    _decode_f16,
    _heap_replace_root,
    _inv_norm,
    _pair_score,
    _row_stats_chunk,
    _sort_heaps,
    _sumsq,
)


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _fold_row(row, r, qlist, queries, inv_q, cosine, hs, hi):
    """Fold index row ``row`` (row number ``r``) into the heaps of the queries ``qlist``
    (as the exact scan's ``_stream_row`` scores a row: the same score, bit for bit)."""
    inv_r = _inv_norm(_sumsq(row))
    for u in range(qlist.shape[0]):
        q = qlist[u]
        e = _pair_score(queries[q], row, inv_q[q], inv_r, cosine)
        if _better(e, r, hs[q, 0], hi[q, 0]):
            _heap_replace_root(hs[q], hi[q], e, r)


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _scan(a, b, work, first, qstart, qlist, queries, inv_q, vec32, vec16, half, rows, deleted, use_dead,
          cosine, hs, hi):
    """Fold the work ``a .. b`` into the heaps ``hs, hi`` ((q, k)). Cell ``t`` of the list
    holds index rows ``first[t] ..`` (as many as ``(work[t + 1] - work[t])`` divided by its
    query count), probed by queries ``qlist[qstart[t]:qstart[t + 1]]``; its row ``i`` is unit
    ``work[t] + i * queries`` of the work, and belongs to the share holding that unit."""
    d = queries.shape[1]
    buf = np.empty(d, np.float32)
    t = np.searchsorted(work, a, side="right") - 1
    while t < len(first) and work[t] < b:
        nq = qstart[t + 1] - qstart[t]
        if nq > 0:
            lo = max(0, (a - work[t] + nq - 1) // nq)
            hi_row = (min(b, work[t + 1]) - work[t] + nq - 1) // nq
            for i in range(lo, hi_row):
                j = first[t] + i
                r = rows[j]
                if use_dead:
                    x = np.searchsorted(deleted, r)
                    if x < len(deleted) and deleted[x] == r:
                        continue
                if half:
                    _decode_f16(vec16[j], buf)
                    row = buf
                else:
                    row = vec32[j]
                _fold_row(row, r, qlist[qstart[t] : qstart[t + 1]], queries, inv_q, cosine, hs, hi)
        t += 1


@njit(parallel=True, cache=True)
def _scan_shares(work, first, qstart, qlist, queries, inv_q, vec32, vec16, half, rows, deleted, use_dead,
                 cosine, heap_s, heap_i):
    total = work[-1]
    shares = heap_s.shape[0]
    for t in prange(shares):
        _scan(total * t // shares, total * (t + 1) // shares, work, first, qstart, qlist, queries, inv_q,
              vec32, vec16, half, rows, deleted, use_dead, cosine, heap_s[t], heap_i[t])


def _inverse_norms(x: np.ndarray) -> np.ndarray:
    """1/|x_i| (0 for a zero row) by the kernels' own function (rows already checked finite)."""
    inv = np.empty(x.shape[0], np.float64)
    _row_stats_chunk(x, inv, np.empty(x.shape[0], np.float64))
    return inv


def _top(first, lengths, qstart, qlist, queries, inv_q, vectors, rows, k, cosine, deleted):
    """Top-``k`` (scores, rows) per query over the listed cells (index rows ``first[t] ..
    first[t] + lengths[t]``, probed by ``qlist[qstart[t]:qstart[t + 1]]``)."""
    nq = len(queries)
    work = np.zeros(len(first) + 1, np.int64)
    np.cumsum(lengths * np.diff(qstart), out=work[1:])
    share = max(1, _config.STORE_INDEX_SHARE_ROWS)
    shares = max(1, min(numba.get_num_threads(), int(work[-1]) // share))
    heap_s = np.full((shares, nq, k), -np.inf, np.float32)
    heap_i = np.full((shares, nq, k), _NO_INDEX, np.int64)
    base = vectors.view(np.ndarray)
    half = base.dtype == np.float16
    d = queries.shape[1]
    vec32 = np.empty((0, d), np.float32) if half else base
    vec16 = base.view(np.uint16) if half else np.empty((0, d), np.uint16)
    use_dead = deleted is not None and len(deleted) > 0
    dead = deleted if use_dead else np.empty(0, np.int64)
    args = (work, first, qstart, qlist, queries, inv_q, vec32, vec16, half, rows, dead, use_dead, cosine)
    if shares == 1:
        _scan(0, work[-1], *args, heap_s[0], heap_i[0])
    else:
        _scan_shares(*args, heap_s, heap_i)
    heap_s = np.ascontiguousarray(heap_s.transpose(1, 0, 2)).reshape(nq, shares * k)
    heap_i = np.ascontiguousarray(heap_i.transpose(1, 0, 2)).reshape(nq, shares * k)
    if nq > _config.STORE_INDEX_FEW_QUERIES:
        out_s = np.empty((nq, k), np.float32)
        out_i = np.empty((nq, k), np.int64)
        _sort_heaps(heap_s, heap_i, out_s, out_i, _NO_INDEX)
        return out_s, out_i
    # a few lists: sorted here, without a parallel launch (score descending, then row)
    order = np.lexsort((heap_i, -heap_s), axis=-1)[:, :k]
    out_s = np.take_along_axis(heap_s, order, axis=1)
    out_i = np.take_along_axis(heap_i, order, axis=1)
    empty = out_i == _NO_INDEX
    out_s[empty], out_i[empty] = -np.inf, -1
    return out_s, out_i


def nearest_cells(queries: np.ndarray, centroids: np.ndarray, probes: int) -> np.ndarray:
    """(q, min(probes, cells)) int64: each query's nearest cells, nearest first, ties to the
    lower cell (the ranking of :func:`embedcache.top_k`): a compiled pass for a few queries,
    the kernel for more."""
    nq, cells = len(queries), len(centroids)
    p = min(probes, cells)
    if nq > _config.STORE_INDEX_FEW_QUERIES:
        return kernels.top_k(queries, centroids, p)[1]
    return _top(np.zeros(1, np.int64), np.array([cells], np.int64), np.array([0, nq], np.int64),
                np.arange(nq, dtype=np.int64), queries, _inverse_norms(queries), centroids,
                np.arange(cells, dtype=np.int64), p, True, None)[1]


def probe(queries: np.ndarray, centroids: np.ndarray, probes: int, offsets: np.ndarray, vectors: np.ndarray,
          rows: np.ndarray, k: int, metric: str, deleted: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores float32, row numbers int64; -inf / -1 where fewer) of float32
    ``queries`` (q, d) over the rows of each query's ``probes`` nearest cells
    (:func:`nearest_cells` of the ``centroids``) in the index's cell-ordered ``vectors``
    (float32 or float16; rows ``rows``, cell c at ``offsets[c] .. offsets[c + 1]``).
    ``deleted``: sorted row numbers never returned (None: none)."""
    nq = len(queries)
    near = nearest_cells(queries, centroids, probes)
    cells_of = near.reshape(-1)
    order = np.argsort(cells_of, kind="stable")  # queries of one cell together, in order
    qlist = (order // near.shape[1]).astype(np.int64)
    listed = cells_of[order]
    head = np.flatnonzero(np.r_[True, listed[1:] != listed[:-1]]) if len(listed) else np.zeros(0, np.int64)
    cells = listed[head]
    qstart = np.append(head, len(listed)).astype(np.int64)
    first = np.asarray(offsets[cells], np.int64)
    lengths = np.asarray(offsets[cells + 1], np.int64) - first
    return _top(first, lengths, qstart, qlist, queries, _inverse_norms(queries), vectors,
                rows.view(np.ndarray), k, metric == "cosine", deleted)
