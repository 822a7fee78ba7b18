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

With the index's 8-bit codes (:class:`Codes`) and fewer than every cell probed, the probed
rows are read as codes instead: each code holds the row's offset from its cell's centroid
(the row scaled to unit length first) in the leading ``m`` directions of those offsets'
principal axes (as many as hold ``STORE_INDEX_CODE_ENERGY`` of their energy, measured at
build time), 8 bits each with one scale per row, so ``gain * (query . centroid + scale *
(query . basis) . code)`` approximates the row's score (times ``|query|`` for cosine, the
same for every row of a query), closest where a cell's rows are closest together
(near-duplicates, near-identical blocks). A row reads ``m + 8`` bytes instead of ``4 d``
(``2 d`` for a float16 store).
The ``shortlist`` best rows of each query by that estimate are then scored exactly, from the
vectors, as above: a reported score is always the exact one, and a row can be missed only
when its estimate ranks it below the shortlist (the measured recall includes that).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from embedcache import _config, kernels
from embedcache.kernels._core import (
    _NO_INDEX,
    FASTMATH,
    _better,
    _decode_f16,
    _dot32,
    _heap_replace_root,
    _inv_norm,
    _pair_score,
    _row_stats_chunk,
    _sort_heaps,
    _sumsq,
)

#: largest code magnitude: codes are symmetric, -127 .. 127
CODE_MAX = 127


@dataclass
class Codes:
    """The 8-bit codes of an index's rows, in cell order: ``codes`` (n, m) int8, ``fac``
    (n, 2) float32 (each row's scale and gain) and ``axes`` (m, d) float32 (orthonormal
    rows: the basis of :func:`code_basis`, transposed once for the searches): row i is about
    ``gain * (centroid + scale * axes.T @ codes[i])`` (gain 1 for cosine, the row's norm for
    dot)."""

    codes: np.ndarray
    fac: np.ndarray
    axes: np.ndarray


def residuals(x: np.ndarray, centroids: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each row scaled to unit length minus its cell's centroid (rows, d) float32, the rows'
    inverse norms); a zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    inv = _inverse_norms(x)
    resid = (x * inv[:, None]).astype(np.float32)  # float64 first: no overflow
    resid -= centroids[cell]
    return resid, inv


def code_basis(gram: np.ndarray, energy: float) -> np.ndarray:
    """(d, m) float32: the leading principal axes of offsets whose (uncentred) Gram matrix
    ``resid.T @ resid`` is ``gram`` (d, d), as many as hold ``energy`` of their sum of
    squares, ``m`` rounded up to a multiple of 16."""
    d = gram.shape[0]
    w, v = np.linalg.eigh(gram)
    order = np.argsort(-w, kind="stable")
    w, v = np.maximum(w[order], 0.0), v[:, order]
    total = w.sum()
    m = d if total <= 0 else int(np.searchsorted(np.cumsum(w) / total, min(energy, 1.0) - 1e-12)) + 1
    m = min(d, -(-m // 16) * 16)
    return np.ascontiguousarray(v[:, :m], dtype=np.float32)


def encode(x: np.ndarray, centroids: np.ndarray, cell: np.ndarray, cosine: bool,
           basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes (rows, m) int8, factors (rows, 2) float32: scale, gain) of rows ``x`` of cells
    ``cell`` in the ``basis`` (d, m)."""
    unit, inv = residuals(x, centroids, cell)
    resid = unit @ basis
    top = np.abs(resid).max(axis=1) if resid.shape[1] else np.zeros(len(resid), np.float32)
    scale = (top / CODE_MAX).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    codes = np.clip(np.rint(resid / safe[:, None]), -CODE_MAX, CODE_MAX).astype(np.int8)
    fac = np.empty((len(resid), 2), np.float32)
    fac[:, 0] = scale
    with np.errstate(divide="ignore"):
        # the row's norm, within float32 (a larger one would make every estimate inf or NaN)
        fac[:, 1] = 1.0 if cosine else np.minimum(np.where(inv > 0, 1.0 / inv, 0.0), np.finfo(np.float32).max)
    return codes, fac


@njit(inline="always")
def _row_at(vec32, vec16, half, j, buf):
    """Index row ``j`` as float32: the row itself, or a float16 row decoded into ``buf``."""
    if half:
        _decode_f16(vec16[j], buf)
        return buf
    return vec32[j]


@njit(inline="always")
def _dead(deleted, r):
    """Row number ``r`` is in the sorted ``deleted``."""
    x = np.searchsorted(deleted, r)
    return x < len(deleted) and deleted[x] == r


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _fold_rows(vec32, vec16, half, j0, j1, rows, deleted, use_dead, ql, queries, inv_q, cosine, hs, hi):
    """Fold index rows ``j0 .. j1`` of one cell into the heaps of the queries ``ql``, each
    row scored as the exact scan's ``_stream_row`` scores it: the same score, bit for bit."""
    buf = np.empty(queries.shape[1], np.float32)
    for j in range(j0, j1):
        r = rows[j]
        if use_dead and _dead(deleted, r):
            continue
        row = _row_at(vec32, vec16, half, j, buf)
        inv_r = _inv_norm(_sumsq(row))
        for u in range(ql.shape[0]):
            q = ql[u]
            e = _pair_score(queries[q], row, inv_q[q], inv_r, cosine)
            if _better(e, r, hs[q, 0], hi[q, 0]):
                _heap_replace_root(hs[q], hi[q], e, r)


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _fold_codes(codes, fac, j0, j1, rows, deleted, use_dead, ql, qc, projected, hs, hi):
    """Fold the estimates of index rows ``j0 .. j1`` of one cell (their codes) into the
    shortlists of the queries ``ql`` (``qc``: each one's product with the cell's centroid;
    ``projected``: the queries in the codes' basis).
    One compact loop per cell: it vectorizes, where a call per row would not."""
    d = codes.shape[1]
    for j in range(j0, j1):
        if use_dead and _dead(deleted, rows[j]):
            continue
        code = codes[j]
        for u in range(ql.shape[0]):
            q = ql[u]
            qq = projected[q]
            acc = np.float32(0.0)
            for t in range(d):
                acc += qq[t] * np.float32(code[t])
            e = fac[j, 1] * (qc[u] + fac[j, 0] * acc)
            if _better(e, j, hs[q, 0], hi[q, 0]):
                _heap_replace_root(hs[q], hi[q], e, j)


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _scan(a, b, work, first, cells, qstart, qlist, queries, inv_q, vec32, vec16, half, rows, deleted, use_dead,
          cosine, use_codes, cent, codes, fac, projected, hs, hi):
    """Fold the work ``a .. b`` into the heaps ``hs, hi`` ((q, k)). Cell ``t`` of the list
    (cell number ``cells[t]``) holds index rows ``first[t] ..`` (as many as ``(work[t + 1] -
    work[t])`` divided by its query count), probed by queries ``qlist[qstart[t]:qstart[t +
    1]]``; its row ``i`` is unit ``work[t] + i * queries`` of the work, and belongs to the
    share holding that unit. With ``use_codes`` the heaps collect index positions by the
    codes' estimate; else row numbers by exact score."""
    qc = np.empty(qlist.shape[0], np.float32)
    t = np.searchsorted(work, a, side="right") - 1
    while t < len(first) and work[t] < b:
        nq = qstart[t + 1] - qstart[t]
        if nq > 0:
            lo = max(0, (a - work[t] + nq - 1) // nq)
            hi_row = (min(b, work[t + 1]) - work[t] + nq - 1) // nq
            ql = qlist[qstart[t] : qstart[t + 1]]
            if use_codes:
                for u in range(nq):
                    qc[u] = _dot32(queries[ql[u]], cent[cells[t]])
                _fold_codes(codes, fac, first[t] + lo, first[t] + hi_row, rows, deleted, use_dead, ql, qc[:nq],
                            projected, hs, hi)
            else:
                _fold_rows(vec32, vec16, half, first[t] + lo, first[t] + hi_row, rows, deleted, use_dead, ql,
                           queries, inv_q, cosine, hs, hi)
        t += 1


@njit(parallel=True, cache=True)
def _scan_shares(work, first, cells, qstart, qlist, queries, inv_q, vec32, vec16, half, rows, deleted, use_dead,
                 cosine, use_codes, cent, codes, fac, projected, heap_s, heap_i):
    total = work[-1]
    shares = heap_s.shape[0]
    for t in prange(shares):
        _scan(total * t // shares, total * (t + 1) // shares, work, first, cells, qstart, qlist, queries, inv_q,
              vec32, vec16, half, rows, deleted, use_dead, cosine, use_codes, cent, codes, fac, projected,
              heap_s[t], heap_i[t])


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _rescore(q0, q1, cand, queries, inv_q, vec32, vec16, half, rows, cosine, hs, hi):
    """Score the shortlisted index positions ``cand`` (q, m) of queries ``q0 .. q1`` exactly
    into heaps ``hs, hi`` ((q, k), row numbers)."""
    d = queries.shape[1]
    buf = np.empty(d, np.float32)
    for q in range(q0, q1):
        for u in range(cand.shape[1]):
            j = cand[q, u]
            if j == _NO_INDEX:
                continue
            row = _row_at(vec32, vec16, half, j, buf)
            r = rows[j]
            e = _pair_score(queries[q], row, inv_q[q], _inv_norm(_sumsq(row)), cosine)
            if _better(e, r, hs[q, 0], hi[q, 0]):
                _heap_replace_root(hs[q], hi[q], e, r)


@njit(parallel=True, cache=True)
def _rescore_shares(cand, queries, inv_q, vec32, vec16, half, rows, cosine, hs, hi, shares):
    nq = cand.shape[0]
    for t in prange(shares):
        _rescore(nq * t // shares, nq * (t + 1) // shares, cand, queries, inv_q, vec32, vec16, half, rows, cosine,
                 hs, hi)


@njit(fastmath=FASTMATH, cache=True)
def _project(queries, axes, out):
    """out[q, c] = queries[q] . axes[c], each product summed as :func:`_dot32` sums it
    (a query alone and in a batch: the same bits, so the same shortlist)."""
    for q in range(queries.shape[0]):
        for c in range(axes.shape[0]):
            out[q, c] = _dot32(queries[q], axes[c])


@njit(fastmath=FASTMATH, cache=True)
def _cell_scores(query, cent, inv_q, inv_c, cand, out):
    """The kernels' cosine of ``query`` with the centroids ``cand`` (as top_k scores them)."""
    for t in range(cand.shape[0]):
        c = cand[t]
        out[t] = _pair_score(query, cent[c], inv_q, inv_c[c], True)


def _inverse_norms(x: np.ndarray) -> np.ndarray:
    """1/|x_i| (0 for a zero row) by the kernels' own function (rows already checked finite)."""
    inv = np.empty(x.shape[0], np.float64)
    _row_stats_chunk(x, inv, np.empty(x.shape[0], np.float64))
    return inv


def _shares(work: np.ndarray) -> int:
    share = max(1, _config.STORE_INDEX_SHARE_ROWS)
    return max(1, min(numba.get_num_threads(), int(work[-1]) // share))


def _best(heap_s: np.ndarray, heap_i: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's best ``k`` of the candidates (q, m), sorted (score desc, index asc); -inf / -1
    where fewer."""
    nq = len(heap_s)
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


def _flat(heap_s: np.ndarray, heap_i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shares, q, m) heaps -> (q, shares * m) candidate lists."""
    shares, nq, m = heap_s.shape
    return (np.ascontiguousarray(heap_s.transpose(1, 0, 2)).reshape(nq, shares * m),
            np.ascontiguousarray(heap_i.transpose(1, 0, 2)).reshape(nq, shares * m))


def _top(first, lengths, cells, qstart, qlist, queries, inv_q, vectors, rows, k, cosine, deleted,
         codes: tuple | None = None, shortlist: int = 0):
    """Top-``k`` (scores, rows) per query over the listed cells (index rows ``first[t] ..
    first[t] + lengths[t]`` of cell ``cells[t]``, probed by ``qlist[qstart[t]:qstart[t +
    1]]``); through the ``shortlist`` best estimates of ``codes`` ((centroids, Codes)) when
    given."""
    nq = len(queries)
    work = np.zeros(len(first) + 1, np.int64)
    np.cumsum(lengths * np.diff(qstart), out=work[1:])
    shares = _shares(work)
    use_codes = codes is not None
    m = max(k, shortlist) if use_codes else k
    heap_s = np.full((shares, nq, m), -np.inf, np.float32)
    heap_i = np.full((shares, nq, m), _NO_INDEX, np.int64)
    base = vectors.view(np.ndarray)
    half = base.dtype == np.float16
    d = queries.shape[1]
    vec32 = np.empty((0, d), np.float32) if half else base
    vec16 = base.view(np.uint16) if half else np.empty((0, d), np.uint16)
    use_dead = deleted is not None and len(deleted) > 0
    dead = deleted if use_dead else np.empty(0, np.int64)
    if use_codes:
        cent, c = codes
        projected = np.empty((nq, c.axes.shape[0]), np.float32)
        _project(queries, c.axes, projected)
        cdata = (cent, c.codes, c.fac, projected)
    else:
        cdata = (np.empty((0, d), np.float32), np.empty((0, d), np.int8), np.empty((0, 2), np.float32),
                 np.empty((nq, d), np.float32))
    args = (work, first, cells, qstart, qlist, queries, inv_q, vec32, vec16, half, rows, dead, use_dead, cosine,
            use_codes, *cdata)
    if shares == 1:
        _scan(0, work[-1], *args, heap_s[0], heap_i[0])
    else:
        _scan_shares(*args, heap_s, heap_i)
    flat_s, flat_i = _flat(heap_s, heap_i)
    if not use_codes:
        return _best(flat_s, flat_i, k)
    # the shortlist: the best ``m`` estimates over all shares (so one query alone and in a
    # batch, on one thread or several, shortlists the same rows), then scored exactly
    _, cand = _best(flat_s, flat_i, m) if shares > 1 else (None, flat_i)
    cand = np.where(cand < 0, _NO_INDEX, cand)
    hs = np.full((nq, k), -np.inf, np.float32)
    hi = np.full((nq, k), _NO_INDEX, np.int64)
    if nq > _config.STORE_INDEX_FEW_QUERIES:
        _rescore_shares(cand, queries, inv_q, vec32, vec16, half, rows, cosine, hs, hi, numba.get_num_threads())
    else:
        _rescore(0, nq, cand, queries, inv_q, vec32, vec16, half, rows, cosine, hs, hi)
    return _best(hs, hi, k)


def nearest_cells(queries: np.ndarray, centroids: np.ndarray, probes: int,
                  inv_c: np.ndarray | None = None) -> np.ndarray:
    """(q, min(probes, cells)) int64: each query's nearest cells, ties to the lower cell (the
    ranking of :func:`embedcache.top_k`, as a set): for a few queries, one matrix-vector
    product picks the cells within rounding of the nearest, which are then scored as the
    kernel scores them; the kernel itself for more. ``inv_c``: the centroids' inverse norms."""
    nq, cells = len(queries), len(centroids)
    p = min(probes, cells)
    if nq > _config.STORE_INDEX_FEW_QUERIES:
        return kernels.top_k(queries, centroids, p)[1]
    if inv_c is None:
        inv_c = _inverse_norms(centroids)
    d = queries.shape[1]
    inv_q = _inverse_norms(queries)
    if not np.all((inv_q >= 2.0**-40) & (inv_q <= 2.0**40)):  # zero, tiny or huge: where float32
        return kernels.top_k(queries, centroids, p)[1]  # products lose the bounds used below
    est = (queries @ centroids.T) * inv_c[None, :]  # (q . c) / |c|, float32 products
    out = np.empty((nq, p), np.int64)
    for i in range(nq):
        e = est[i]
        kth = np.partition(e, cells - p)[cells - p]
        # float32 products of length d are within d * 2**-24 * |q| |c| of the exact ones, on
        # either side: cells within twice that and more of the p-th estimate are listed
        margin = (d + 8) * 2.0**-22 / inv_q[i]
        cand = np.flatnonzero(e >= kth - margin).astype(np.int64)
        sc = np.empty(len(cand), np.float32)
        _cell_scores(queries[i], centroids, inv_q[i], inv_c, cand, sc)
        out[i] = cand[np.lexsort((cand, -sc))[:p]]
    return out


def probe(queries: np.ndarray, centroids: np.ndarray, probes: int, offsets: np.ndarray, vectors: np.ndarray,
          rows: np.ndarray, k: int, metric: str, deleted: np.ndarray | None, *, codes: Codes | None = None,
          inv_c: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores float32, row numbers int64; -inf / -1 where fewer) of float32
    ``queries`` (q, d) over the rows of each query's ``probes`` nearest cells
    (:func:`nearest_cells` of the ``centroids``) in the index's cell-ordered ``vectors``
    (float32 or float16; rows ``rows``, cell c at ``offsets[c] .. offsets[c + 1]``).
    ``deleted``: sorted row numbers never returned (None: none). ``codes``: the rows' codes,
    used (through a shortlist of each query's best estimates, scored exactly) when fewer
    than every cell is probed; then queries go ``STORE_INDEX_QUERY_BLOCK`` at a time (each
    one's shortlist is held while its block is searched)."""
    block = max(1, _config.STORE_INDEX_QUERY_BLOCK)
    if codes is not None and probes < len(centroids) and len(queries) > block:
        parts = [probe(queries[a : a + block], centroids, probes, offsets, vectors, rows, k, metric, deleted,
                       codes=codes, inv_c=inv_c) for a in range(0, len(queries), block)]
        return np.concatenate([s for s, _ in parts]), np.concatenate([r for _, r in parts])
    near = nearest_cells(queries, centroids, probes, inv_c)
    cells_of = near.reshape(-1)
    order = np.argsort(cells_of, kind="stable")  # queries of one cell together, in order
    qlist = (order // near.shape[1]).astype(np.int64)
    listed = cells_of[order]
    head = np.flatnonzero(np.r_[True, listed[1:] != listed[:-1]]) if len(listed) else np.zeros(0, np.int64)
    cells = listed[head].astype(np.int64)
    qstart = np.append(head, len(listed)).astype(np.int64)
    first = np.asarray(offsets[cells], np.int64)
    lengths = np.asarray(offsets[cells + 1], np.int64) - first
    use = codes is not None and near.shape[1] < len(centroids)
    shortlist = max(_config.STORE_INDEX_SHORTLIST, _config.STORE_INDEX_SHORTLIST_PER_K * k)
    return _top(first, lengths, cells, qstart, qlist, queries, _inverse_norms(queries), vectors,
                rows.view(np.ndarray), k, metric == "cosine", deleted,
                (np.ascontiguousarray(centroids, np.float32), codes) if use else None, shortlist)
