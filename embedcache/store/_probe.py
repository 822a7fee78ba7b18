"""A few queries through the store's index in one compiled pass.

For a handful of queries (one user's search) the per-cell route of
:func:`embedcache.index._partition.probe_topk` costs a kernel call, and its set-up, per probed
cell, which is most of the time when cells hold a thousand rows. Here every (query, probed
cell) pair is one item; the items' rows are cut into equal shares, one per numba thread, each
scanning its rows from the index's cell-ordered copy of the vectors (one contiguous piece per
cell) into heaps of its own, merged at the end. A score is the kernels' own per-pair score
(:func:`embedcache.kernels._core._pair_score` on the row decoded exactly, as the exact scan
computes it), so a result equals what the exact scan gives for the same rows, bit for bit;
ties go to the lower row number.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from embedcache import _config
from embedcache.kernels._core import (
    _NO_INDEX,
    FASTMATH,
    _better,
    _decode_f16,
    _heap_replace_root,
    _inv_norm,
    _pair_score,
    _sort_heaps,
    _sumsq,
)


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _scan(a, b, starts, item_q, item_lo, queries, inv_q, vec32, vec16, half, rows, deleted, use_dead,
          cosine, hs, hi):
    """Fold positions ``a .. b`` of the items' concatenated rows into the heaps ``hs, hi``
    ((q, k)); item ``t`` covers rows ``item_lo[t] .. item_lo[t] + starts[t + 1] - starts[t]``
    of the index for query ``item_q[t]``."""
    d = queries.shape[1]
    buf = np.empty(d, np.float32)
    t = np.searchsorted(starts, a, side="right") - 1
    pos = a
    while pos < b and t < len(item_q):
        end = min(b, starts[t + 1])
        qi = item_q[t]
        qv = queries[qi]
        iq = inv_q[qi]
        hsq = hs[qi]
        hiq = hi[qi]
        base = item_lo[t] - starts[t]
        for p in range(pos, end):
            j = base + p
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
            e = _pair_score(qv, row, iq, _inv_norm(_sumsq(row)), cosine)
            if _better(e, r, hsq[0], hiq[0]):
                _heap_replace_root(hsq, hiq, e, r)
        pos = end
        t += 1


@njit(parallel=True, cache=True)
def _scan_shares(starts, item_q, item_lo, queries, inv_q, vec32, vec16, half, rows, deleted, use_dead,
                 cosine, heap_s, heap_i):
    total = starts[-1]
    shares = heap_s.shape[0]
    for t in prange(shares):
        _scan(total * t // shares, total * (t + 1) // shares, starts, item_q, item_lo, queries, inv_q,
              vec32, vec16, half, rows, deleted, use_dead, cosine, heap_s[t], heap_i[t])


@njit(fastmath=FASTMATH, cache=True)
def _inverse_norms(x):
    """1/|x_i| (0 for a zero row) as the kernels compute it (rows already checked finite)."""
    out = np.empty(x.shape[0], np.float64)
    for i in range(x.shape[0]):
        out[i] = _inv_norm(_sumsq(x[i]))
    return out


def _shares(rows: int) -> int:
    """Threads for a scan of ``rows`` rows: one per ``STORE_INDEX_SHARE_ROWS`` rows at least
    (a small scan on one thread never waits for a busy second one)."""
    return max(1, min(numba.get_num_threads(), rows // max(1, _config.STORE_INDEX_SHARE_ROWS)))


def _top(item_q, item_lo, lengths, queries, inv_q, vectors, rows, k, cosine, deleted):
    """Top-``k`` (scores, rows) per query over the items (query ``item_q[t]``, index rows
    ``item_lo[t] .. item_lo[t] + lengths[t]``)."""
    nq = len(queries)
    starts = np.zeros(len(item_q) + 1, np.int64)
    np.cumsum(lengths, out=starts[1:])
    shares = _shares(int(starts[-1]))
    heap_s = np.full((shares, nq, k), -np.inf, np.float32)
    heap_i = np.full((shares, nq, k), _NO_INDEX, np.int64)
    base = vectors.view(np.ndarray)
    half = base.dtype == np.float16
    d = queries.shape[1]
    vec32 = np.empty((0, d), np.float32) if half else base
    vec16 = base.view(np.uint16) if half else np.empty((0, d), np.uint16)
    use_dead = deleted is not None and len(deleted) > 0
    dead = deleted if use_dead else np.empty(0, np.int64)
    args = (starts, item_q, item_lo, queries, inv_q, vec32, vec16, half, rows, dead, use_dead, cosine)
    if shares == 1:
        _scan(0, starts[-1], *args, heap_s[0], heap_i[0])
    else:
        _scan_shares(*args, heap_s, heap_i)
    out_s = np.empty((nq, k), np.float32)
    out_i = np.empty((nq, k), np.int64)
    heap_s = np.ascontiguousarray(heap_s.transpose(1, 0, 2)).reshape(nq, shares * k)
    heap_i = np.ascontiguousarray(heap_i.transpose(1, 0, 2)).reshape(nq, shares * k)
    _sort_heaps(heap_s, heap_i, out_s, out_i, _NO_INDEX)
    return out_s, out_i


def probe_few(queries: np.ndarray, centroids: np.ndarray, probes: int, offsets: np.ndarray,
              vectors: np.ndarray, rows: np.ndarray, k: int, metric: str,
              deleted: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores float32, row numbers int64; -inf / -1 where fewer) of float32
    ``queries`` (q, d) over the rows of each query's ``probes`` nearest cells (cosine to the
    ``centroids``, ties to the lower cell, as :func:`embedcache.top_k` ranks them) in the
    index's cell-ordered ``vectors`` (float32 or float16; rows ``rows``, cell c at
    ``offsets[c] .. offsets[c + 1]``). ``deleted``: sorted row numbers never returned."""
    nq, cells = len(queries), len(centroids)
    inv_q = _inverse_norms(queries)
    each = np.arange(nq, dtype=np.int64)
    p = min(probes, cells)
    _, near = _top(each, np.zeros(nq, np.int64), np.full(nq, cells, np.int64), queries, inv_q, centroids,
                   np.arange(cells, dtype=np.int64), p, True, None)
    item_q = np.repeat(each, p)
    cells_of = near.reshape(-1)
    item_lo = np.asarray(offsets[cells_of], np.int64)
    lengths = np.asarray(offsets[cells_of + 1], np.int64) - item_lo
    return _top(item_q, item_lo, lengths, queries, inv_q, vectors, rows.view(np.ndarray), k, metric == "cosine",
                deleted)
