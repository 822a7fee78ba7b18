"""The k nearest other rows of every indexed row, cell by cell, in one running list per row.

For each cell, the rows probing it are multiplied with the cell's rows by BLAS (a filter, as
in :func:`embedcache.top_k`); a compiled scan then rescores exactly, with the kernels' own
pair score, only the candidates that may beat the row's current k-th best, and inserts them
into its list. A row's list carries over from cell to cell, so after its first cells almost
nothing is rescored, where a fresh ``top_k`` per cell would rescore every list from empty.
The lists hold exactly the best ``k`` of the rows probed (score descending, ties to the lower
row), so probing every cell equals :func:`embedcache.top_k` with ``exclude_self``, bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from embedcache import _config, kernels
from embedcache.kernels._core import FASTMATH, _UNIT, _blas_margin, _cutoff, _filter_scale, _pair_score, _stats
from embedcache.index._merge import NO_INDEX


#: scores per group in the scan: a group is tested in one vectorized pass, and only a group
#: holding a candidate is walked one score at a time
_GROUP = 32


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _fold(s, qv, inv_q, qpos, rows, block, inv_c, filt_c, ids, margin, rel, heap_s, heap_i, skip_self):
    """Fold the BLAS scores ``s`` (queries ``qv[qpos]`` = rows ``rows`` x the cell's rows
    ``block`` = rows ``ids``) into the sorted lists of ``rows``; each query row is one
    thread's. ``skip_self``: row ``r`` never enters its own list (ids and rows are one
    numbering). A
    score below the cut (the k-th best less the BLAS error bound) cannot enter the list; a
    NaN filter (a row BLAS cannot score) is always rescored."""
    k = heap_s.shape[1]
    m = s.shape[1]
    for t in prange(s.shape[0]):
        r = rows[t]
        cut = _cutoff(heap_s[r, k - 1], margin, rel)
        for c0 in range(0, m, _GROUP):
            c1 = min(c0 + _GROUP, m)
            if c1 - c0 == _GROUP:
                hits = 0
                for c in range(c0, c1):
                    hits += not s[t, c] * filt_c[c] < cut
                if hits == 0:
                    continue
            for c in range(c0, c1):
                if s[t, c] * filt_c[c] < cut:
                    continue
                j = ids[c]
                if skip_self and j == r:
                    continue
                e = _pair_score(qv[qpos[t]], block[c], inv_q[qpos[t]], inv_c[c], True)
                ls = heap_s[r, k - 1]
                if e < ls or (e == ls and j >= heap_i[r, k - 1]):
                    continue
                pos = k - 1
                while pos > 0 and (heap_s[r, pos - 1] < e or (heap_s[r, pos - 1] == e and heap_i[r, pos - 1] > j)):
                    heap_s[r, pos] = heap_s[r, pos - 1]
                    heap_i[r, pos] = heap_i[r, pos - 1]
                    pos -= 1
                heap_s[r, pos] = e
                heap_i[r, pos] = j
                cut = _cutoff(heap_s[r, k - 1], margin, rel)


def rows_knn(x: Any, index: Any, near: np.ndarray, k: int, bar=None) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32, rows int64), (n, k): the best ``k`` other rows of every row of ``x``
    among the rows of its cells ``near`` ((n, p), -1: none), best first, ties to the lower
    row; -inf / -1 where a row found fewer. Rows are gathered from ``x`` cell by cell (no
    copy of x). ``bar``: updated with row-by-row comparisons."""
    from embedcache.index._merge import by_cell

    n = len(x)
    heap_s = np.full((n, k), -np.inf, np.float32)
    heap_i = np.full((n, k), NO_INDEX, np.int64)
    qrows, starts = by_cell(near, index.cells)
    margin, rel = _blas_margin(x.shape[1]), 4 * _UNIT
    off = index.offsets
    chunk = max(1, int(_config.TOPK_QUERY_BLOCK) * 4)
    for c in range(index.cells):
        q = qrows[starts[c] : starts[c + 1]]
        ids = index.order[off[c] : off[c + 1]]
        if not len(q) or not len(ids):
            continue
        block = np.ascontiguousarray(x[ids], dtype=np.float32)
        inv_c, norm_c = _stats(block, "x")
        filt_c = _filter_scale(inv_c, norm_c, 1.0, True)
        for a in range(0, len(q), chunk):
            qc = q[a : a + chunk]
            qv = np.ascontiguousarray(x[qc], dtype=np.float32)
            inv_q, _ = _stats(qv, "x")
            s = kernels.normalize(qv) @ block.T
            _fold(s, qv, inv_q, np.arange(len(qc)), qc, block, inv_c, filt_c, ids, margin, rel, heap_s, heap_i,
                  True)
        if bar is not None:
            bar.update(len(q) * len(ids))
    heap_i[heap_i == NO_INDEX] = -1
    return heap_s, heap_i


def nearest_among(x: np.ndarray, groups: list[np.ndarray], group_ids: list[np.ndarray], near: np.ndarray,
                  p: int) -> np.ndarray:
    """(len(x), p) int64: for each row of ``x`` (float32, C-contiguous), its ``p`` best among
    the unit rows ``groups[g]`` (numbered ``group_ids[g]``) of the groups ``near[r]`` it
    looks into, by cosine, best first, ties to the lower number; -1 where fewer. Each group's
    rows are scored against the rows looking into it by one BLAS product, and the few that
    may enter a row's list are rescored as :func:`embedcache.top_k` scores them: the same
    order as ``top_k`` over those candidates. The rows are normalized once, whatever the
    number of groups each looks into."""
    from embedcache.index._merge import by_cell

    heap_s = np.full((len(x), p), -np.inf, np.float32)
    heap_i = np.full((len(x), p), NO_INDEX, np.int64)
    if not len(x) or p == 0:
        return heap_i
    inv_x, _ = _stats(x, "x")
    xn = kernels.normalize(x)
    rows, starts = by_cell(near, len(groups))
    margin, rel = _blas_margin(x.shape[1]), 4 * _UNIT
    for g, cent in enumerate(groups):
        r = rows[starts[g] : starts[g + 1]]
        if not len(r) or not len(cent):
            continue
        inv_c, norm_c = _stats(cent, "centroids")
        filt_c = _filter_scale(inv_c, norm_c, 1.0, True)
        s = xn[r] @ cent.T
        _fold(s, x, inv_x, r, r, cent, inv_c, filt_c, group_ids[g], margin, rel, heap_s, heap_i, False)
    heap_i[heap_i == NO_INDEX] = -1
    return heap_i
