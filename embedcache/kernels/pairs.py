"""Threshold pairs: every pair of rows scored at or above a threshold."""

from __future__ import annotations

import numpy as np

from embedcache import _config
from embedcache._validation import as_matrix, check_metric, check_same_columns, check_threshold
from embedcache.errors import InvalidInputError
from embedcache.kernels._core import (
    _UNIT,
    _blas_margin,
    _block_stats,
    _filter_scale,
    _forest_tile,
    _gemm_nt,
    _pairs_rows,
    _pairs_tile,
    _roots,
    _rows32,
    _same_root,
)

__all__ = ["descending_bits", "forest_roots", "key_order", "meets_threshold", "pair_order", "similar_pairs",
           "threshold_forest"]

_PAIRS_WIDTH = 16  # matches per row and tile collected in the first scan


def meets_threshold(scores, threshold) -> np.ndarray:
    """Which ``scores`` are at or above ``threshold``, by the rule of :func:`similar_pairs`:
    the float32 score against the threshold rounded to the nearest float32.

    >>> meets_threshold(np.float32([0.8, 0.7999999]), 0.8)
    array([ True, False])
    """
    return np.asarray(scores, np.float32) >= np.float32(threshold)


def similar_pairs(x, threshold, *, y=None, metric="cosine"):
    """Every pair of rows with score >= threshold, exactly once, highest score first.

    x: (n, d) float array (float32, float16 or float64; a ``numpy.memmap`` is read tile by
    tile). y: optional (m, d) array; without it pairs within x with i < j are returned,
    with it every (i, j) with i a row of x and j a row of y.
    threshold: a float; for cosine it must lie in [-1, 1]. Scores are float32 and are
    compared with the threshold rounded to the nearest float32, so a pair whose score
    equals ``numpy.float32(threshold)`` is returned even when the float64 threshold is a
    little higher.
    Returns ``(i, j, scores)``: int64, int64, float32 arrays of equal length, sorted by
    score descending, ties by i then j (the pair order of every embedcache function that
    lists pairs). The scores are those of :func:`cosine_similarity` /
    :func:`dot_similarity` bit for bit. Memory is proportional to the output plus one tile
    of scores; only the upper triangle is computed when y is None.
    """
    i, j, sc = unsorted_pairs(x, threshold, y=y, metric=metric)
    order = pair_order(i, j, sc)
    return i[order], j[order], sc[order]


def unsorted_pairs(x, threshold, *, y=None, metric="cosine"):
    """:func:`similar_pairs` in no particular order (for callers that sort many parts once)."""
    metric = check_metric(metric)
    threshold = check_threshold(threshold, metric)
    x32 = as_matrix(x, "x")
    same = y is None
    y32 = x32 if same else as_matrix(y, "y")
    check_same_columns(x32, "x", y32, "y")
    cosine = metric == "cosine"
    block = _config.PAIRS_BLOCK
    cblock = max(_config.PAIRS_COLUMNS, block)  # tiles of the upper triangle start on its diagonal
    inv_x, norm_x = _block_stats(x32, "x", block)
    inv_y, norm_y = (inv_x, norm_x) if same else _block_stats(y32, "y", block)
    filt_x = _filter_scale(inv_x, norm_x, norm_y.max(initial=0.0), cosine)
    filt_y = _filter_scale(inv_y, norm_y, norm_x.max(initial=0.0), cosine)
    margin = _blas_margin(x32.shape[1])
    thr = np.float32(threshold)  # the comparison is in float32, as documented (meets_threshold)
    n, m = x32.shape[0], y32.shape[0]
    tile = np.empty(min(block, n) * min(cblock, m) if n and m else 0, np.float32)
    # matches per row and tile kept in the first scan; rows with more are rescanned into
    # buffers of their exact size, so memory follows the output, not the busiest row
    width = _PAIRS_WIDTH
    buf_j = np.empty((min(block, n), width), np.int64)
    buf_s = np.empty((min(block, n), width), np.float32)
    parts_i, parts_j, parts_s = [], [], []
    for r0 in range(0, n, block):
        xb = _rows32(x32, r0, block)
        nr = xb.shape[0]
        counts = np.empty(nr, np.int64)
        out_j, out_s = buf_j[:nr], buf_s[:nr]
        for c0 in range(r0 if same else 0, m, cblock):
            yb = _rows32(y32, c0, cblock)
            nc = yb.shape[0]
            s = tile[: nr * nc].reshape(nr, nc)
            _gemm_nt(xb, yb, s)
            if cosine:
                margin_x = np.full(nr, margin)
            else:
                margin_x = margin * norm_x[r0 : r0 + nr] * norm_y[c0 : c0 + nc].max() + 1e-37
            args = (
                s, xb, yb, inv_x[r0:], inv_y[c0:], filt_x[r0:], filt_y[c0:], margin_x,
                4 * _UNIT, thr, same and c0 == r0, cosine,
            )
            _pairs_tile(*args, counts, out_j, out_s)
            over = np.flatnonzero(counts > width)
            kept = counts.copy()
            kept[over] = 0
            rows, cols = np.nonzero(np.arange(width)[None, :] < kept[:, None])
            if len(rows):
                parts_i.append(rows + r0)
                parts_j.append(out_j[rows, cols] + c0)
                parts_s.append(out_s[rows, cols])
            if len(over):
                offsets = np.zeros(len(over) + 1, np.int64)
                np.cumsum(counts[over], out=offsets[1:])
                flat_j = np.empty(offsets[-1], np.int64)
                flat_s = np.empty(offsets[-1], np.float32)
                _pairs_rows(*args, over, offsets, flat_j, flat_s)
                parts_i.append(np.repeat(over, counts[over]) + r0)
                parts_j.append(flat_j + c0)
                parts_s.append(flat_s)
    if not parts_i:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    i = np.concatenate(parts_i).astype(np.int64, copy=False)
    return i, np.concatenate(parts_j), np.concatenate(parts_s)


def pair_order(i, j, score):
    """The order of pairs by score, highest first, ties by ``i`` then ``j``, pairs equal in all
    three kept in their given order: ``numpy.lexsort((j, i, -score))``, about twice as fast.

    i, j: non-negative integer arrays; score: float32 (or values exact in float32; -0.0 ties
    with 0.0, NaN comes last).

    >>> import numpy as np
    >>> pair_order(np.array([2, 0, 1, 0]), np.array([3, 4, 2, 1]), np.array([0.5, 0.9, 0.5, 0.5], np.float32))
    array([1, 3, 2, 0])
    """
    i = np.asarray(i, np.int64).reshape(-1)
    j = np.asarray(j, np.int64).reshape(-1)
    s = np.asarray(score, np.float32).reshape(-1)
    if len(i) == 0:
        return np.empty(0, np.int64)
    width = int(j.max()) + 1
    if len(i) >= 2**32 or i.min() < 0 or j.min() < 0 or int(i.max()) >= (2**62) // width:
        return np.lexsort((j, i, -s.astype(np.float64)))
    return key_order(i * width + j, s)


def key_order(key, score):
    """The order by score, highest first, ties by ``key`` (non-negative int64, fewer than 2**32
    of them), equal entries kept in their given order (``numpy.lexsort((key, -score))``): one
    sort of a 64-bit key, the score's bits (:func:`descending_bits`) above the key's rank."""
    key = np.asarray(key, np.int64).reshape(-1)
    n = len(key)
    by_key = np.argsort(key, kind="stable")
    rank = np.empty(n, np.uint64)
    rank[by_key] = np.arange(n, dtype=np.uint64)
    bits = descending_bits(score)
    bits[np.isnan(np.asarray(score, np.float32).reshape(-1))] = np.uint32(0xFFFFFFFF)  # NaN last
    return np.argsort((bits.astype(np.uint64) << np.uint64(32)) | rank)


def descending_bits(score):
    """uint32 that sort ascending as the float32 scores sort descending (-0.0 as 0.0)."""
    u = (np.asarray(score, np.float32).reshape(-1) + np.float32(0.0)).view(np.uint32)
    up = np.where(u & np.uint32(0x80000000), ~u, u | np.uint32(0x80000000))
    return ~up


def threshold_forest(x, threshold, parent, *, ids=None, y=None, y_ids=None):
    """Join, in the union-find array ``parent``, every pair of rows scored >= threshold,
    without listing the pairs: the connected components of :func:`similar_pairs`'s graph.

    x: (n, d) float array; y: optional (m, d) array (then pairs (row of x, row of y), else
    pairs i < j within x). ids, y_ids: int64 global row numbers of the rows of x and y in
    ``parent`` (default ``arange``; y_ids default to ids when y is None). parent: int64 array
    with ``parent[r] == r`` for roots, updated in place (several calls build one forest).
    A pair is scored only when its rows are not yet connected, and a tile whose rows all
    share one root is skipped, so a block of near-identical rows costs about one strip of
    tiles, not its full triangle. Scores and the threshold rule are those of
    :func:`similar_pairs`, bit for bit.
    Returns ``(i, j, scores)``: the pairs (global row numbers) that joined two trees, at most
    one per row: a spanning forest of the new connections, in no particular order.
    """
    threshold = check_threshold(threshold)
    x32 = as_matrix(x, "x")
    same = y is None
    y32 = x32 if same else as_matrix(y, "y")
    check_same_columns(x32, "x", y32, "y")
    n, m = x32.shape[0], y32.shape[0]
    ids = np.arange(n, dtype=np.int64) if ids is None else np.ascontiguousarray(ids, dtype=np.int64)
    if same:
        y_ids = ids
    elif y_ids is None:
        y_ids = np.arange(m, dtype=np.int64)
    else:
        y_ids = np.ascontiguousarray(y_ids, dtype=np.int64)
    if len(ids) != n or len(y_ids) != m:
        raise InvalidInputError(f"ids must number the rows: got {len(ids)} ids for {n} rows of x, "
                                f"{len(y_ids)} for {m} rows of y")
    out_i = np.empty(n + m, np.int64)
    out_j = np.empty(n + m, np.int64)
    out_s = np.empty(n + m, np.float32)
    if not n or not m:
        return out_i[:0], out_j[:0], out_s[:0]
    block = _config.PAIRS_BLOCK
    cblock = max(_config.PAIRS_COLUMNS, block)
    inv_x, norm_x = _block_stats(x32, "x", block)
    inv_y, norm_y = (inv_x, norm_x) if same else _block_stats(y32, "y", block)
    filt_x = _filter_scale(inv_x, norm_x, norm_y.max(initial=0.0), True)
    filt_y = _filter_scale(inv_y, norm_y, norm_x.max(initial=0.0), True)
    margin = _blas_margin(x32.shape[1])
    thr = np.float32(threshold)
    tile = np.empty(min(block, n) * min(cblock, m), np.float32)
    found = 0
    for r0 in range(0, n, block):
        c_start = r0 if same else 0
        if _same_root(parent, ids[r0:r0 + block], y_ids[c_start:]):
            continue
        xb = None
        for c0 in range(c_start, m, cblock):
            if _same_root(parent, ids[r0:r0 + block], y_ids[c0:c0 + cblock]):
                continue
            if xb is None:
                xb = _rows32(x32, r0, block)
            nr = xb.shape[0]
            yb = _rows32(y32, c0, cblock)
            nc = yb.shape[0]
            s = tile[: nr * nc].reshape(nr, nc)
            _gemm_nt(xb, yb, s)
            found = _forest_tile(
                s, xb, yb, inv_x[r0:], inv_y[c0:], filt_x[r0:], filt_y[c0:], np.full(nr, margin),
                4 * _UNIT, thr, same and c0 == r0, True, ids[r0:r0 + nr], y_ids[c0:c0 + nc],
                parent, out_i, out_j, out_s, found,
            )
    return out_i[:found].copy(), out_j[:found].copy(), out_s[:found].copy()


def forest_roots(parent: np.ndarray) -> np.ndarray:
    """The root of every row of the union-find array ``parent`` (compressing its paths)."""
    out = np.empty(len(parent), np.int64)
    _roots(parent, np.arange(len(parent), dtype=np.int64), out)
    return out
