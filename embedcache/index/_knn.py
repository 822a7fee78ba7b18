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
def _fold(s, qv, inv_q, rows, block, inv_c, filt_c, ids, margin, rel, heap_s, heap_i):
    """Fold the BLAS scores ``s`` (queries ``qv`` = rows ``rows`` x the cell's rows ``block``
    = rows ``ids``) into the sorted lists of ``rows``; each query row is one thread's. A
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
                if j == r:
                    continue
                e = _pair_score(qv[t], block[c], inv_q[t], inv_c[c], True)
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
            _fold(s, qv, inv_q, qc, block, inv_c, filt_c, ids, margin, rel, heap_s, heap_i)
        if bar is not None:
            bar.update(len(q) * len(ids))
    heap_i[heap_i == NO_INDEX] = -1
    return heap_s, heap_i
