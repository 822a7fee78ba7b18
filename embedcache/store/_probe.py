"""Queries through the store's index in one compiled pass.

The probed cells of all queries are grouped by cell and taken nearest first (by the best
rank any query gives them): each probed cell is read once, from the index's cell-ordered
copy of the vectors (one contiguous piece per cell), and each of its rows is scored against
every query that probes it while the row is in the cache. Each cell's rows are split evenly
between the numba threads, each folding into heaps of its own, merged at the end; a small
search runs on one thread. A score is the kernels' own per-pair score
(:func:`embedcache.kernels._core._pair_score` on the row decoded exactly, as the exact scan
computes it), so a result equals what the exact scan gives for the same rows, bit for bit;
ties go to the lower row number. The cells a query probes are its nearest centroids as
:func:`embedcache.top_k` ranks them (ties to the lower cell; :mod:`._nearest`).

Through the index's codes (:mod:`._codes`) when fewer than every cell is probed: with the
8-bit codes, each query keeps the best ``max(STORE_INDEX_SHORTLIST,
STORE_INDEX_SHORTLIST_PER_K * k)`` rows by their estimate, which are then scored exactly,
from the vectors, as above: a reported score is always the exact one, and a row can be
missed only when its estimate ranks it below the shortlist (the measured recall includes
that). With the 1-bit codes as well, a first pass over them keeps each query's best
``max(STORE_INDEX_SIGN_SHORTLIST, STORE_INDEX_SIGN_SHORTLIST_PER_K * k,
STORE_INDEX_SIGN_SHORTLIST_SHARE * rows)`` rows by their estimate (``rows``: what its
probes hold on average; in buffers that keep their best when full, :mod:`._select`), and
those are estimated again from their 8-bit codes into that shortlist. The rows of a
shortlist are read in index order, each asked for from memory a few rows ahead of its
scoring.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
from numba.cpython.unsafe.numbers import trailing_zeros

from embedcache import _config
from embedcache.kernels._core import (
    _NO_INDEX,
    FASTMATH,
    _better,
    _decode_f16,
    _dot32,
    _heap_replace_root,
    _inv_norm,
    _pair_score,
    _sort_few_heaps,
    _sort_heaps,
    _sumsq,
)
from embedcache.store._codes import SIGN_BLOCK, Coarse, Codes, _dot_i8, _inverse_norms, query_planes
from embedcache.store._nearest import nearest_cells
from embedcache.store._threads import shares_for
from embedcache.store._select import _buffered_best, _keep_best


@intrinsic
def _popcount(typingctx, x):
    """The number of bits set in a uint64 (LLVM's ctpop: one instruction where the CPU has one)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, args)

    return sig, codegen


#: every bit of a uint64
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


@intrinsic
def _prefetch(typingctx, arr, i, off):
    """Ask for the cache line holding byte ``off`` of row ``i`` of the 2-d array ``arr``
    (LLVM's prefetch: a hint, never a fault)."""
    sig = types.void(arr, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        stride = builder.extract_value(ary.strides, 0)
        base = builder.ptrtoint(ary.data, ir.IntType(64))
        addr = builder.add(base, builder.add(builder.mul(args[1], stride), args[2]))
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], fnty)
        # read, keep in every cache level, data
        builder.call(fn, [builder.inttoptr(addr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _prefetch_row(arr, i):
    """Ask for every cache line of ``arr[i]`` (the whole of it when ``arr`` is C-contiguous:
    its first stride's bytes)."""
    for off in range(0, arr.strides[0], 64):
        _prefetch(arr, i, off)


#: a query's buffer of 1-bit estimates holds this many times its shortlist (and a block of
#: rows more); a full one keeps its best shortlist (:func:`_keep_best`: passes over the
#: buffer, so wider buffers pass less)
BUFFER_SPAN = 3

#: rows of a shortlist asked for this far ahead of the one being scored (random rows: each a
#: wait on memory otherwise)
AHEAD = 16


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


@njit(inline="always", fastmath=FASTMATH)
def _code_estimate(code, qq, qc, fac_j):
    """A row's 8-bit estimate: ``gain * (qc + scale * (qq . code))`` (``fac_j``: scale, gain)."""
    return fac_j[1] * (qc + fac_j[0] * _dot_i8(qq, code))


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _fold_codes(codes, fac, j0, j1, rows, deleted, use_dead, ql, qc, projected, hs, hi):
    """Fold the estimates of index rows ``j0 .. j1`` of one cell (their codes) into the
    shortlists of the queries ``ql`` (``qc``: each one's product with the cell's centroid;
    ``projected``: the queries in the codes' basis).
    One compact loop per cell: it vectorizes, where a call per row would not."""
    for j in range(j0, j1):
        if use_dead and _dead(deleted, rows[j]):
            continue
        for u in range(ql.shape[0]):
            q = ql[u]
            e = _code_estimate(codes[j], projected[q], qc[u], fac[j])
            if _better(e, j, hs[q, 0], hi[q, 0]):
                _heap_replace_root(hs[q], hi[q], e, j)


@njit(cache=True, nogil=True)  # not fastmath: a row's estimate the same bits in any lane
def _fold_signs(bits, sfac, j0, j1, rows, deleted, use_dead, ql, qc, planes, terms, bs, bi, fill, bar, barj, keep):
    """Collect the 1-bit estimates of index rows ``j0 .. j1`` of one cell (their
    :class:`Signs` ``bits``, ``sfac``) for the queries ``ql`` (``qc``: each one's product with
    the cell's centroid; ``planes``, ``terms``: the queries in bits, :func:`query_planes`):
    query q's buffer ``bs[q], bi[q]`` holds ``fill[q]`` entries, every one seen at least as
    good as ``(bar[q], barj[q])``; one filled to within a block of its end keeps its best
    ``keep`` (:func:`_keep_best`), and their worst becomes the bar. A buffer, not a heap: a
    few thousand best of a few hundred thousand rows displace each other too often. The bits
    of all 64 rows of a block are counted a word at a time (one vector instruction for
    several rows), those of the block's rows outside ``j0 .. j1`` then left out; the rows
    that pass the bar are marked in a 64-bit mask (compared in vectors) and those alone
    visited."""
    w = bits.shape[1]
    limit = bs.shape[1] - SIGN_BLOCK
    count = np.empty(SIGN_BLOCK, np.uint64)
    est = np.empty(SIGN_BLOCK, np.float32)
    for u in range(ql.shape[0]):
        q = ql[u]
        n, b, bj = fill[q], bar[q], barj[q]
        sq, iq = bs[q], bi[q]
        last = (j1 + SIGN_BLOCK - 1) // SIGN_BLOCK
        for blk in range(j0 // SIGN_BLOCK, last):
            for r in range(SIGN_BLOCK):
                count[r] = 0
            for t in range(w):
                p0, p1, p2, p3 = planes[q, 0, t], planes[q, 1, t], planes[q, 2, t], planes[q, 3, t]
                xs = bits[blk, t]
                for r in range(SIGN_BLOCK):  # every row of the block (a fixed count: it vectorizes)
                    x = xs[r]
                    count[r] += (_popcount(x & p0) + (_popcount(x & p1) << np.uint64(1))
                                 + (_popcount(x & p2) << np.uint64(2)) + (_popcount(x & p3) << np.uint64(3)))
            base = blk * SIGN_BLOCK
            r0, r1 = max(j0 - base, 0), min(SIGN_BLOCK, j1 - base)
            qcu, t0, t1, t2 = qc[u], terms[q, 0], terms[q, 1], terms[q, 2]
            gain, factor, ones = sfac[blk, 0], sfac[blk, 1], sfac[blk, 2]
            for r in range(SIGN_BLOCK):  # the estimates of the whole block (it vectorizes)
                est[r] = gain[r] * (qcu + factor[r] * (t0 * np.float32(count[r]) + t1 * ones[r] - t2))
            passed = np.uint64(0)  # a bit for each row of the block that passes the bar
            for r in range(SIGN_BLOCK):  # (it vectorizes)
                e = est[r]
                passed |= np.uint64((e > b) | ((e == b) & (base + r <= bj))) << np.uint64(r)
            passed &= (_ALL << np.uint64(r0)) & (_ALL >> np.uint64(SIGN_BLOCK - r1))
            while passed:  # those rows alone, lowest first
                r = trailing_zeros(passed)
                passed &= passed - np.uint64(1)
                jj = base + r
                if use_dead and _dead(deleted, rows[jj]):
                    continue
                sq[n], iq[n] = est[r], jj
                n += 1
            if n > limit:
                n, b, bj = _keep_best(sq, iq, n, keep)
        fill[q], bar[q], barj[q] = n, b, bj


@njit(inline="always")
def _share_of(t, share, shares, first, lengths, qstart, qlist):
    """(j0, j1, queries): the index rows ``j0 .. j1`` of share ``share`` of ``shares`` of
    listed cell ``t`` (its rows split evenly) and the queries that probe it (j0 = j1: none,
    or no rows)."""
    ql = qlist[qstart[t] : qstart[t + 1]]
    if not len(ql):
        return first[t], first[t], ql
    return first[t] + lengths[t] * share // shares, first[t] + lengths[t] * (share + 1) // shares, ql


@njit(inline="always", fastmath=FASTMATH)
def _products(queries, ql, centroid, out):
    """out[u] = queries[ql[u]] . centroid (summed as :func:`_dot32` sums it)."""
    for u in range(len(ql)):
        out[u] = _dot32(queries[ql[u]], centroid)


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _scan(share, shares, first, lengths, cells, qstart, qlist, queries, inv_q, vec32, vec16, half, rows, deleted,
          use_dead, cosine, mode, cent, codes, fac, projected, hs, hi):
    """Fold share ``share`` of ``shares`` of the listed cells into the heaps ``hs, hi`` ((q,
    k)): that share of the rows of each cell, in list order. Cell ``t`` of the list (cell
    number ``cells[t]``) holds index rows ``first[t] .. first[t] + lengths[t]``, probed by
    queries ``qlist[qstart[t]:qstart[t + 1]]``. ``mode`` 0: the heaps collect row numbers by
    exact score; 1: index positions by the 8-bit codes' estimate."""
    qc = np.empty(qlist.shape[0], np.float32)
    for t in range(len(first)):
        j0, j1, ql = _share_of(t, share, shares, first, lengths, qstart, qlist)
        if j0 >= j1:
            continue
        if mode == 0:
            _fold_rows(vec32, vec16, half, j0, j1, rows, deleted, use_dead, ql, queries, inv_q, cosine, hs, hi)
            continue
        _products(queries, ql, cent[cells[t]], qc)
        _fold_codes(codes, fac, j0, j1, rows, deleted, use_dead, ql, qc[: len(ql)], projected, hs, hi)


@njit(parallel=True, cache=True)
def _scan_shares(first, lengths, cells, qstart, qlist, queries, inv_q, vec32, vec16, half, rows, deleted, use_dead,
                 cosine, mode, cent, codes, fac, projected, heap_s, heap_i):
    shares = heap_s.shape[0]
    for t in prange(shares):
        _scan(t, shares, first, lengths, cells, qstart, qlist, queries, inv_q, vec32, vec16, half, rows, deleted,
              use_dead, cosine, mode, cent, codes, fac, projected, heap_s[t], heap_i[t])


@njit(inline="always")
def _signs_share(share, shares, first, lengths, cells, qstart, qlist, queries, rows, deleted, use_dead, cent, bits,
                 sfac, planes, terms, bs, bi, fill, bar, barj):
    """Collect the 1-bit estimates of share ``share`` of ``shares`` of the listed cells' rows
    (split as :func:`_scan` splits them) into that share's buffers ``bs, bi`` with ``fill,
    bar, barj`` (:func:`_fold_signs`), each left with its best ``keep`` at most (on every
    thread: what :func:`_buffered_best` then merges on one is no more than it keeps)."""
    keep = (bs.shape[1] - SIGN_BLOCK) // BUFFER_SPAN
    qc = np.empty(qlist.shape[0], np.float32)
    for t in range(len(first)):
        j0, j1, ql = _share_of(t, share, shares, first, lengths, qstart, qlist)
        if j0 >= j1:
            continue
        _products(queries, ql, cent[cells[t]], qc)
        _fold_signs(bits, sfac, j0, j1, rows, deleted, use_dead, ql, qc[: len(ql)], planes, terms, bs, bi, fill, bar,
                    barj, keep)
    for q in range(bs.shape[0]):
        if fill[q] > keep:
            fill[q], bar[q], barj[q] = _keep_best(bs[q], bi[q], fill[q], keep)


# the 1-bit scan has kernels of its own, the loop over the cells inside them: through
# ``_scan`` (one function for every mode) the same fold ran a fifth slower


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _scan_signs_shares(first, lengths, cells, qstart, qlist, queries, rows, deleted, use_dead, cent, bits, sfac,
                       planes, terms, bs, bi, fill, bar, barj):
    """:func:`_signs_share` on every share ((shares, q, width) buffers), one thread each."""
    shares = bs.shape[0]
    for t in prange(shares):
        _signs_share(t, shares, first, lengths, cells, qstart, qlist, queries, rows, deleted, use_dead, cent, bits,
                     sfac, planes, terms, bs[t], bi[t], fill[t], bar[t], barj[t])


@njit(fastmath=FASTMATH, cache=True)
def _scan_signs(first, lengths, cells, qstart, qlist, queries, rows, deleted, use_dead, cent, bits, sfac, planes,
                terms, bs, bi, fill, bar, barj):
    """:func:`_signs_share` as the only share, on this thread."""
    _signs_share(0, 1, first, lengths, cells, qstart, qlist, queries, rows, deleted, use_dead, cent, bits, sfac,
                 planes, terms, bs, bi, fill, bar, barj)


@njit(cache=True)
def _merge_shares(heap_s, heap_i):
    """Fold the heaps of shares 1 .. into share 0's: each query's best entries over all
    shares (the same set, whatever the shares: the order is total)."""
    for t in range(1, heap_s.shape[0]):
        for q in range(heap_s.shape[1]):
            for u in range(heap_s.shape[2]):
                j = heap_i[t, q, u]
                if j != _NO_INDEX and _better(heap_s[t, q, u], j, heap_s[0, q, 0], heap_i[0, q, 0]):
                    _heap_replace_root(heap_s[0, q], heap_i[0, q], heap_s[t, q, u], j)


@njit(inline="always")
def _part(t, shares, shape, by_query):
    """(q0, q1, u0, u1, heap) of thread ``t`` of ``shares`` over candidates of ``shape`` (q,
    m): its queries, all their candidates, into heap 0 (``by_query``); or all queries, its
    part of each one's candidates, into heap ``t``."""
    nq, m = shape
    t = np.int64(t)  # (a parallel loop's index may come unsigned)
    if by_query:
        return nq * t // shares, nq * (t + 1) // shares, np.int64(0), m, np.int64(0)
    return np.int64(0), nq, m * t // shares, m * (t + 1) // shares, t


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _reestimate(q0, q1, u0, u1, cand, codes, fac, projected, offsets, near, qc_near, hs, hi):
    """Estimate the index positions ``cand[q0:q1, u0:u1]`` (of queries ``q0 .. q1``; each
    query's in ascending order, then ``_NO_INDEX``) from their 8-bit codes, as
    :func:`_fold_codes` does (``near``: each query's probed cells, sorted; ``qc_near``: its
    products with them), into heaps ``hs, hi`` (index positions). The cells of a query's
    candidates come in the order of its probed cells: each found by walking them."""
    for q in range(q0, q1):
        if u0 >= u1 or cand[q, u0] == _NO_INDEX:
            continue
        x = np.searchsorted(near[q], np.searchsorted(offsets, cand[q, u0], side="right") - 1)
        for u in range(u0, u1):
            if u + AHEAD < u1 and cand[q, u + AHEAD] != _NO_INDEX:
                _prefetch_row(codes, cand[q, u + AHEAD])
                _prefetch_row(fac, cand[q, u + AHEAD])
            j = cand[q, u]
            if j == _NO_INDEX:
                break
            while offsets[near[q, x] + 1] <= j:  # a later probed cell holds j
                x += 1
            e = _code_estimate(codes[j], projected[q], qc_near[q, x], fac[j])
            if _better(e, j, hs[q, 0], hi[q, 0]):
                _heap_replace_root(hs[q], hi[q], e, j)


@njit(parallel=True, cache=True)
def _reestimate_shares(cand, codes, fac, projected, offsets, near, qc_near, hs, hi, by_query, shares):
    """:func:`_reestimate` on ``shares`` threads: the queries split between them
    (``by_query``, into heaps ``hs[0], hi[0]``), or each query's candidates (into heaps
    ``hs[t], hi[t]`` of thread t, then merged)."""
    for t in prange(shares):
        q0, q1, u0, u1, h = _part(t, shares, cand.shape, by_query)
        _reestimate(q0, q1, u0, u1, cand, codes, fac, projected, offsets, near, qc_near, hs[h], hi[h])


@njit(fastmath=FASTMATH, cache=True)
def _near_products(queries, cent, near, out):
    """out[q, t] = queries[q] . cent[near[q, t]], as :func:`_scan` computes it."""
    for q in range(near.shape[0]):
        for t in range(near.shape[1]):
            out[q, t] = _dot32(queries[q], cent[near[q, t]])


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _rescore(q0, q1, u0, u1, cand, queries, inv_q, vec32, vec16, half, rows, cosine, hs, hi):
    """Score the shortlisted index positions ``cand[q0:q1, u0:u1]`` (of queries ``q0 ..
    q1``) exactly into heaps ``hs, hi`` ((q, k), row numbers)."""
    d = queries.shape[1]
    buf = np.empty(d, np.float32)
    for q in range(q0, q1):
        for u in range(u0, u1):
            if u + AHEAD < u1 and cand[q, u + AHEAD] != _NO_INDEX:
                if half:
                    _prefetch_row(vec16, cand[q, u + AHEAD])
                else:
                    _prefetch_row(vec32, cand[q, u + AHEAD])
            j = cand[q, u]
            if j == _NO_INDEX:
                continue
            row = _row_at(vec32, vec16, half, j, buf)
            r = rows[j]
            e = _pair_score(queries[q], row, inv_q[q], _inv_norm(_sumsq(row)), cosine)
            if _better(e, r, hs[q, 0], hi[q, 0]):
                _heap_replace_root(hs[q], hi[q], e, r)


@njit(parallel=True, cache=True)
def _rescore_shares(cand, queries, inv_q, vec32, vec16, half, rows, cosine, hs, hi, by_query, shares):
    """:func:`_rescore` on ``shares`` threads: the queries split between them (``by_query``,
    into heaps ``hs[0], hi[0]``), or each query's shortlist (into heaps ``hs[t], hi[t]`` of
    thread t, then merged)."""
    for t in prange(shares):
        q0, q1, u0, u1, h = _part(t, shares, cand.shape, by_query)
        _rescore(q0, q1, u0, u1, cand, queries, inv_q, vec32, vec16, half, rows, cosine, hs[h], hi[h])


@njit(fastmath=FASTMATH, cache=True)
def _project(queries, axes, out):
    """out[q, c] = queries[q] . axes[c], each product summed as :func:`_dot32` sums it
    (a query alone and in a batch: the same bits, so the same shortlist)."""
    for q in range(queries.shape[0]):
        for c in range(axes.shape[0]):
            out[q, c] = _dot32(queries[q], axes[c])


def _ro(a: np.ndarray) -> np.ndarray:
    """A read-only plain view of ``a``: the index's arrays reach the kernels with one type
    (memory maps and stand-ins alike), so each kernel compiles once."""
    v = np.asarray(a).view(np.ndarray)
    v.flags.writeable = False
    return v


def _best(heap_s: np.ndarray, heap_i: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's best ``k`` of the candidates (q, m), sorted (score desc, index asc); -inf / -1
    where fewer."""
    nq = len(heap_s)
    out_s = np.empty((nq, k), np.float32)
    out_i = np.empty((nq, k), np.int64)
    # a few lists: sorted without a parallel launch
    (_sort_heaps if nq > _config.STORE_INDEX_FEW_QUERIES else _sort_few_heaps)(heap_s, heap_i, out_s, out_i, _NO_INDEX)
    return out_s, out_i


def _flat(heap_s: np.ndarray, heap_i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shares, q, m) heaps -> (q, shares * m) candidate lists."""
    shares, nq, m = heap_s.shape
    return (np.ascontiguousarray(heap_s.transpose(1, 0, 2)).reshape(nq, shares * m),
            np.ascontiguousarray(heap_i.transpose(1, 0, 2)).reshape(nq, shares * m))


def _over_threads(one, shares, cand: np.ndarray, args: tuple, m: int, many: bool) -> tuple[np.ndarray, np.ndarray]:
    """Heaps ``(q, m)`` of the candidates ``cand`` (q, c) folded by ``one(q0, q1, u0, u1,
    cand, *args, hs, hi)``: on every thread when there are many queries (split between
    them) or a long list of a few (each list split, the threads' heaps then merged), on this
    one otherwise (``shares``: ``one`` on threads, :func:`_reestimate_shares`' arguments)."""
    nq, threads = len(cand), numba.get_num_threads()
    parts = threads if many or cand.shape[1] >= 2 * _config.STORE_INDEX_SHORTLIST * threads else 1
    hs = np.full((1 if many else parts, nq, m), -np.inf, np.float32)
    hi = np.full(hs.shape, _NO_INDEX, np.int64)
    if parts > 1:
        shares(cand, *args, hs, hi, many, parts)
        if not many:
            _merge_shares(hs, hi)
    else:
        one(0, nq, 0, cand.shape[1], cand, *args, hs[0], hi[0])
    return hs[0], hi[0]


def _top(first, lengths, cells, qstart, qlist, queries, inv_q, vectors, rows, k, cosine, deleted,
         codes: tuple | None = None, shortlist: int = 0):
    """Top-``k`` (scores, rows) per query over the listed cells (index rows ``first[t] ..
    first[t] + lengths[t]`` of cell ``cells[t]``, probed by ``qlist[qstart[t]:qstart[t +
    1]]``); through the ``shortlist`` best estimates of the 8-bit codes when ``codes``
    ((centroids, Codes, each query's probed cells sorted, the index's cell offsets, the 1-bit
    shortlist)) is given, and first through the 1-bit codes' best when the Codes hold them."""
    nq = len(queries)
    shares = shares_for(int(np.dot(lengths, np.diff(qstart))))
    base = _ro(vectors)
    half = base.dtype == np.float16
    d = queries.shape[1]
    vec32 = _ro(np.empty((0, d), np.float32)) if half else base
    vec16 = base.view(np.uint16) if half else _ro(np.empty((0, d), np.uint16))
    use_dead = deleted is not None and len(deleted) > 0
    dead = _ro(deleted if use_dead else np.empty(0, np.int64))
    rows = _ro(rows)
    if codes is None:
        mode, m = 0, k
        cdata = (np.empty((0, d), np.float32), _ro(np.empty((0, d), np.int8)), _ro(np.empty((0, 2), np.float32)),
                 np.empty((nq, d), np.float32))
    else:
        cent, c, near, offsets, wide = codes
        est_q = _estimable(queries, inv_q)
        projected = np.empty((nq, c.axes.shape[0]), np.float32)
        _project(est_q, c.axes, projected)
        mode, m = 1, max(k, shortlist)
        if c.signs is not None and wide > m:
            mode, m = 2, wide
        cdata = (cent, _ro(c.codes), _ro(c.fac), projected)
    # the 1-bit estimates: buffers of several shortlists, and a block's rows beyond them
    width = BUFFER_SPAN * m + SIGN_BLOCK if mode == 2 else m
    heap_s = np.full((shares, nq, width), -np.inf, np.float32)
    heap_i = np.full((shares, nq, width), _NO_INDEX, np.int64)
    if mode == 2:
        turned = np.empty((nq, c.signs.axes.shape[0]), np.float32)
        _project(est_q, c.signs.axes, turned)
        fill = np.zeros((shares, nq), np.int64)
        bar = np.full((shares, nq), -np.inf, np.float32)
        barj = np.full((shares, nq), _NO_INDEX, np.int64)
        sargs = (first, lengths, cells, qstart, qlist, est_q, rows, dead, use_dead, cent, _ro(c.signs.bits),
                 _ro(c.signs.fac), *query_planes(turned, c.signs.words))
        if shares == 1:
            _scan_signs(*sargs, heap_s[0], heap_i[0], fill[0], bar[0], barj[0])
        else:
            _scan_signs_shares(*sargs, heap_s, heap_i, fill, bar, barj)
    else:
        args = (first, lengths, cells, qstart, qlist, queries if mode == 0 else est_q, inv_q, vec32, vec16, half, rows,
                dead, use_dead, cosine, mode, *cdata)  # mode 1 reads the queries for its estimates alone
        if shares == 1:
            _scan(0, 1, *args, heap_s[0], heap_i[0])
        else:
            _scan_shares(*args, heap_s, heap_i)
    if mode == 0:
        return _best(*_flat(heap_s, heap_i), k)
    # a shortlist: the best ``m`` estimates over all shares (so one query alone and in a
    # batch, on one thread or several, shortlists the same rows), in index order (the rows'
    # pages in turn)
    cand = np.empty((nq, m), np.int64)
    if mode == 2:
        _buffered_best(heap_s, heap_i, fill, m, cand)
    else:
        _merge_shares(heap_s, heap_i)
        cand[:] = np.sort(heap_i[0], axis=1)
    many = nq > _config.STORE_INDEX_FEW_QUERIES
    if mode == 2:  # the 1-bit shortlist, estimated again from the 8-bit codes
        qc_near = np.empty(near.shape, np.float32)
        _near_products(est_q, cent, near, qc_near)
        cargs = (_ro(c.codes), _ro(c.fac), projected, offsets, near, qc_near)
        hi = _over_threads(_reestimate, _reestimate_shares, cand, cargs, max(k, shortlist), many)[1]
        cand = np.sort(hi, axis=1)
    # then scored exactly
    hs, hi = _over_threads(_rescore, _rescore_shares, cand, (queries, inv_q, vec32, vec16, half, rows, cosine), k, many)
    return _best(hs, hi, k)


def _estimable(queries: np.ndarray, inv_q: np.ndarray) -> np.ndarray:
    """The queries each scaled by a power of two to a length in [0.5, 1) (a zero one as it
    is), for the codes' estimates: they only rank one query's rows, which its scale does not
    change, and float32 products of a code and a query far from unit length overflow or
    lose their bits (the exact scores are computed from ``queries`` as they are)."""
    _, e = np.frexp(np.divide(1.0, inv_q, out=np.zeros_like(inv_q), where=inv_q > 0))
    scale = np.ldexp(1.0, -e)  # in float64: 2**149 for a query of length 1e-45
    return np.ascontiguousarray(queries * scale[:, None], np.float32)


def _listing(near: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cells, qstart, qlist): the cells that the queries' probed cells ``near`` (q, p) list,
    nearest first (by the best rank any query gives them: the heaps fill with good rows
    early, and fewer rows after them displace one), cell ``cells[t]`` probed by the queries
    ``qlist[qstart[t]:qstart[t + 1]]`` (in order)."""
    if len(near) == 1:  # one query: its cells in its order, without the sorts below
        return near[0].astype(np.int64), np.arange(near.shape[1] + 1, dtype=np.int64), np.zeros(near.shape[1], np.int64)
    cells_of = near.reshape(-1)
    order = np.argsort(cells_of, kind="stable")  # queries of one cell together, in order
    qlist = (order // near.shape[1]).astype(np.int64)
    listed = cells_of[order]
    head = np.flatnonzero(np.r_[True, listed[1:] != listed[:-1]]) if len(listed) else np.zeros(0, np.int64)
    cells = listed[head].astype(np.int64)
    qstart = np.append(head, len(listed)).astype(np.int64)
    if len(head):  # nearest cells first
        lead = np.argsort(np.minimum.reduceat(order % near.shape[1], head), kind="stable")
        size = np.diff(qstart)[lead]
        start = np.zeros(len(lead) + 1, np.int64)
        np.cumsum(size, out=start[1:])
        qlist = qlist[np.repeat(qstart[lead] - start[:-1], size) + np.arange(start[-1])]
        cells, qstart = cells[lead], start
    return cells, qstart, qlist


def probe(queries: np.ndarray, centroids: np.ndarray, probes: int, offsets: np.ndarray, vectors: np.ndarray,
          rows: np.ndarray, k: int, metric: str, deleted: np.ndarray | None, *, codes: Codes | None = None,
          inv_c: np.ndarray | None = None, small: Coarse | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores float32, row numbers int64; -inf / -1 where fewer) of float32
    ``queries`` (q, d) over the rows of each query's ``probes`` nearest cells
    (:func:`nearest_cells` of the ``centroids``) in the index's cell-ordered ``vectors``
    (float32 or float16; rows ``rows``, cell c at ``offsets[c] .. offsets[c + 1]``).
    ``deleted``: sorted row numbers never returned (None: none). ``codes``: the rows' codes,
    used (through shortlists of each query's best estimates, the last scored exactly) when
    fewer than every cell is probed; then queries go in blocks (each one's shortlists are
    held while its block is searched: at most ``STORE_INDEX_QUERY_BLOCK`` queries, fewer
    when their 1-bit shortlists are long). ``inv_c``, ``small``: the centroids' inverse
    norms and :func:`coarse` copy, when kept."""
    shortlist = max(_config.STORE_INDEX_SHORTLIST, _config.STORE_INDEX_SHORTLIST_PER_K * k)
    # the 1-bit shortlist grows with the rows probed (on average): more rows, more of them
    # near the query's best, and the same share of its true neighbours kept
    held_rows = min(probes, len(centroids)) * len(rows) / max(len(centroids), 1)
    wide = max(_config.STORE_INDEX_SIGN_SHORTLIST, _config.STORE_INDEX_SIGN_SHORTLIST_PER_K * k,
               min(int(np.ceil(held_rows * _config.STORE_INDEX_SIGN_SHORTLIST_SHARE)),
                   _config.STORE_INDEX_SIGN_SHORTLIST_MAX))
    use = codes is not None and probes < len(centroids)
    # each query of a block holds its shortlists while the block runs (the 1-bit one in a
    # buffer of each thread): blocks of at most STORE_INDEX_QUERY_BLOCK queries holding as
    # many entries between them as that many 8-bit shortlists
    signs = use and codes.signs is not None and wide > shortlist
    held = BUFFER_SPAN * wide * numba.get_num_threads() if signs else shortlist
    block = max(1, _config.STORE_INDEX_QUERY_BLOCK * shortlist // max(held, 1))
    if use and len(queries) > block:
        parts = [probe(queries[a : a + block], centroids, probes, offsets, vectors, rows, k, metric, deleted,
                       codes=codes, inv_c=inv_c, small=small) for a in range(0, len(queries), block)]
        return np.concatenate([s for s, _ in parts]), np.concatenate([r for _, r in parts])
    near = nearest_cells(queries, centroids, probes, inv_c, small)
    cells, qstart, qlist = _listing(near)
    first = np.asarray(offsets[cells], np.int64)
    lengths = np.asarray(offsets[cells + 1], np.int64) - first
    cdata = None
    if use:
        cdata = (np.ascontiguousarray(centroids, np.float32), codes, np.sort(near, axis=1),
                 np.asarray(offsets, np.int64), wide)
    return _top(first, lengths, cells, qstart, qlist, queries, _inverse_norms(queries), vectors,
                rows.view(np.ndarray), k, metric == "cosine", deleted, cdata, shortlist)
