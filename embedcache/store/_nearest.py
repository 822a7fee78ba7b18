"""The cells nearest each query: the ranking of :func:`embedcache.top_k` over the centroids
(as a set, ties to the lower cell), for a few queries through the centroids' 8-bit copy
(:func:`._codes.coarse`): each cell's score bounded within its rounding, and only the
cells whose bound reaches the ``p``-th best lower bound scored as the kernel scores them.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from embedcache import _config, kernels
from embedcache.kernels._core import FASTMATH, _pair_score
from embedcache.store._codes import Coarse, _dot_i8, _inverse_norms, coarse
from embedcache.store._threads import shares_for
from embedcache.store._select import _kth_of


@njit(fastmath=FASTMATH, cache=True)
def _cell_scores(query, cent, inv_q, inv_c, cand, out):
    """The kernels' cosine of ``query`` with the centroids ``cand`` (as top_k scores them)."""
    for t in range(cand.shape[0]):
        c = cand[t]
        out[t] = _pair_score(query, cent[c], inv_q, inv_c[c], True)


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _coarse_scores(query, codes, scale, c0, c1, out):
    """out[c] = scale[c] * (query . codes[c]) for centroids ``c0 .. c1``, float32 products."""
    for c in range(c0, c1):
        out[c] = scale[c] * _dot_i8(query, codes[c])


@njit(parallel=True, cache=True)
def _coarse_scores_shares(query, codes, scale, out, shares):
    n = codes.shape[0]
    for t in prange(shares):
        _coarse_scores(query, codes, scale, n * t // shares, n * (t + 1) // shares, out)


@njit(cache=True, nogil=True)
def _nearest_of(query, inv_q, est, inv_c, err, centroids, out):
    """The ``len(out)`` cells nearest ``query`` (inverse norm ``inv_q``) into ``out``, best
    first (ties: the lower cell), from ``est``, its float32 products with the centroids'
    8-bit copy (``err``: each one's distance from its centroid; ``inv_c``: the centroids'
    inverse norms): the cells whose bound reaches the ``len(out)``-th best lower bound are
    scored as :func:`embedcache.top_k` scores them."""
    cells, d = centroids.shape
    p = out.shape[0]
    high = np.empty(cells)
    low = np.empty(cells)
    # the 8-bit copy is within err[c] of c: the product within |q| err[c]; float32 products
    # of length d are within d * 2**-24 * |q| |c| of the exact ones, on either side
    slack = (d + 8) * 2.0**-22 / inv_q
    for c in range(cells):
        e = est[c] * inv_c[c]  # (q . c) / |c| within the bound
        bound = err[c] * inv_c[c] / inv_q + slack
        low[c] = e - bound
        high[c] = e + bound
    cand = np.flatnonzero(high >= _kth_of(low, p - 1))
    sc = np.empty(len(cand), np.float32)
    _cell_scores(query, centroids, inv_q, inv_c, cand, sc)
    order = np.argsort(-sc, kind="mergesort")  # stable: ties keep the lower cell first
    for t in range(p):
        out[t] = cand[order[t]]


def nearest_cells(queries: np.ndarray, centroids: np.ndarray, probes: int,
                  inv_c: np.ndarray | None = None, small: Coarse | None = None) -> np.ndarray:
    """(q, min(probes, cells)) int64: each query's nearest cells, ties to the lower cell (the
    ranking of :func:`embedcache.top_k`, as a set): for a few queries, the centroids' 8-bit
    copy (``small``, :func:`coarse`) bounds each cell's score within its rounding, and the
    cells whose bound reaches the ``probes``-th best lower bound are then scored as the kernel
    scores them; the kernel itself for more. ``inv_c``: the centroids' inverse norms."""
    nq, cells = len(queries), len(centroids)
    p = min(probes, cells)
    if nq > _config.STORE_INDEX_FEW_QUERIES:
        return kernels.top_k(queries, centroids, p)[1]
    if inv_c is None:
        inv_c = _inverse_norms(centroids)
    if small is None:
        small = coarse(centroids)
    d = queries.shape[1]
    inv_q = _inverse_norms(queries)
    if not np.all((inv_q >= 2.0**-40) & (inv_q <= 2.0**40)):  # zero, tiny or huge: where float32
        return kernels.top_k(queries, centroids, p)[1]  # products lose the bounds used below
    out = np.empty((nq, p), np.int64)
    est = np.empty(cells, np.float32)
    shares = shares_for(cells * d // 8)  # a product of a row by 8 bits: about an eighth of a row's scan
    for i in range(nq):
        if shares > 1:
            _coarse_scores_shares(queries[i], small.codes, small.scale, est, shares)
        else:
            _coarse_scores(queries[i], small.codes, small.scale, 0, cells, est)
        _nearest_of(queries[i], inv_q[i], est, inv_c, small.err, centroids, out[i])
    return out


