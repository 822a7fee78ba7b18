"""The compiled core of the kernels: every ``@njit`` function, and the few helpers around them.

Every score that leaves the kernels is made by ``_pair_score(a, b, inv_a, inv_b)``: one
compiled dot-product loop (float32, fixed order; float64 for rows so small or large that
float32 would underflow or overflow), scaled in float64 and rounded once. BLAS (float32
gemm) does the bulk of the arithmetic, but its rounding depends on the shapes it is
called with, so its scores are only used as a filter: a pair whose BLAS score is within
the BLAS error bound of the current cut-off is rescored exactly. The result is the same
bit for bit for every block size, thread count and code path, and the same score for the
same pair in cosine_similarity, top_k and similar_pairs.

The compiled functions take only arrays and scalars; validation happens in the public
wrappers (:mod:`.similarity`, :mod:`.topk`, :mod:`.pairs`). They all live in this one
module on purpose: numba's on-disk cache (``cache=True``) is invalidated only by a change
of the file that defines a function, and a kernel inlines the primitives it calls, so a
kernel in another file than its primitives could keep running stale compiled code after
a primitive changed.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from embedcache._validation import check_finite
from embedcache.errors import InvalidInputError

__all__ = ["FASTMATH"]

#: The one set of fastmath flags used by every kernel. ``nnan`` and ``ninf`` are left out
#: on purpose: NaN and infinity must keep their meaning in comparisons.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

_NO_INDEX = np.iinfo(np.int64).max  # heap sentinel: sorts after every real index
_UNIT = 2.0**-24  # float32 unit roundoff


# ----------------------------------------------------------------------------------------
# scoring primitives
# ----------------------------------------------------------------------------------------

@njit(inline="always", fastmath=FASTMATH)
def _dot32(a, b):
    """Dot product of two float32 vectors, float32 accumulation (vectorized, fixed order)."""
    s = np.float32(0.0)
    for k in range(a.shape[0]):
        s += a[k] * b[k]
    return s


@njit(fastmath=FASTMATH, cache=True)
def _dot64(a, b):
    """Dot product of two float32 vectors, accumulated in float64."""
    s = 0.0
    for k in range(a.shape[0]):
        s += np.float64(a[k]) * np.float64(b[k])
    return s


@njit(inline="always", fastmath=FASTMATH)
def _sumsq(a):
    """Squared norm; float64 accumulation when float32 could underflow or overflow."""
    s = _dot32(a, a)
    if s >= 2.0**-60 and s <= 2.0**60:
        return np.float64(s)
    return _dot64(a, a)


@njit(inline="always", fastmath=FASTMATH)
def _inv_norm(sumsq):
    return 1.0 / np.sqrt(sumsq) if sumsq > 0.0 else 0.0


@njit(inline="always", fastmath=FASTMATH)
def _pair_score(a, b, inv_a, inv_b, cosine):
    """The published score of rows a and b: float32, cosine clipped to [-1, 1]."""
    p = inv_a * inv_b
    if not cosine:
        if p < 2.0**-120:  # |a| |b| > 2**120: float32 partial sums could overflow
            return np.float32(_dot64(a, b))
        return _dot32(a, b)
    dot = _dot32(a, b)
    if p == 0.0:
        return np.float32(0.0)
    d = np.float64(dot)
    # tiny or huge rows: no float32 under/overflow. The bounds are those of _sumsq, so a
    # row and its copy are summed as the row's norm was and score exactly 1
    if not (p <= 2.0**60 and p >= 2.0**-60):
        d = _dot64(a, b)
    v = d * p
    return np.float32(min(max(v, -1.0), 1.0))


@njit(inline="always")
def _better(s, j, s0, j0):
    """(s, j) ranks before (s0, j0): higher score, or equal score and lower index."""
    return s > s0 or (s == s0 and j < j0)


@njit(inline="always")
def _heap_replace_root(hs, hi, s, j):
    """Replace the root (the worst kept item) of a heap whose root ranks last."""
    k = hs.shape[0]
    pos = 0
    while True:
        c = 2 * pos + 1
        if c >= k:
            break
        r = c + 1
        if r < k and _better(hs[c], hi[c], hs[r], hi[r]):
            c = r
        if _better(s, j, hs[c], hi[c]):
            hs[pos] = hs[c]
            hi[pos] = hi[c]
            pos = c
        else:
            break
    hs[pos] = s
    hi[pos] = j


# ----------------------------------------------------------------------------------------
# row statistics, normalization and dense matrices
# ----------------------------------------------------------------------------------------


# Parallel loops run over contiguous chunks, one serial (vectorized) call per chunk:
# numba vectorizes a plain serial function better than the body of a prange loop.


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _row_stats_chunk(x, inv, norm):
    bad = -1
    for i in range(x.shape[0]):
        ss = _sumsq(x[i])
        if not np.isfinite(ss):
            if bad < 0:
                bad = i
            ss = 0.0
        inv[i] = _inv_norm(ss)
        norm[i] = np.sqrt(ss)
    return bad


@njit(parallel=True, cache=True)
def _row_stats(x, inv, norm, chunks):
    """inv[i] = 1/|x_i| (0 for a zero row), norm[i] = |x_i| (float64 accumulation).

    Returns the first row that holds NaN or infinity, or -1.
    """
    n = x.shape[0]
    bad = np.full(chunks, -1, np.int64)
    for t in prange(chunks):
        lo = n * t // chunks
        hi = n * (t + 1) // chunks
        b = _row_stats_chunk(x[lo:hi], inv[lo:hi], norm[lo:hi])
        if b >= 0:
            bad[t] = lo + b
    for t in range(chunks):
        if bad[t] >= 0:
            return bad[t]
    return -1


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _normalize_rows(x, out):
    n, d = x.shape
    for i in prange(n):
        scale = _inv_norm(_dot64(x[i], x[i]))
        for k in range(d):
            out[i, k] = np.float32(x[i, k] * scale)


def _gemm_nt(a, b, out):
    """out = a @ b.T through numpy's BLAS (one BLAS thread pool in the process: numba's
    ``np.dot`` would start a second one, from scipy, and the two spin against each
    other). Overflow is harmless here: the filter rescores non-finite scores exactly."""
    with np.errstate(over="ignore", invalid="ignore"):
        np.matmul(a, b.T, out=out)


@njit(fastmath=FASTMATH, cache=True)
def _dense_row(arow, ia, b, inv_b, cosine, start, out):
    for j in range(start, b.shape[0]):
        out[j] = _pair_score(arow, b[j], ia, inv_b[j], cosine)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _dense(a, b, inv_a, inv_b, cosine, symmetric, out):
    """out[i, j] = score(a_i, b_j); with symmetric (b is a) one triangle, mirrored."""
    n = a.shape[0]
    for i in prange(n):
        _dense_row(a[i], inv_a[i], b, inv_b, cosine, i if symmetric else 0, out[i])
    if symmetric:
        for j in prange(n):
            for i in range(j):
                out[j, i] = out[i, j]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _listed_pairs(a, b, inv_a, inv_b, i, j, cosine, out):
    """out[k] = score(a[i[k]], b[j[k]])."""
    for k in prange(i.shape[0]):
        out[k] = _pair_score(a[i[k]], b[j[k]], inv_a[i[k]], inv_b[j[k]], cosine)


# ----------------------------------------------------------------------------------------
# top-k, many queries: BLAS tiles folded into per-query heaps
# ----------------------------------------------------------------------------------------


@njit(inline="always")
def _cutoff(kth, margin, rel):
    """Lowest BLAS score that may still beat ``kth`` once rescored exactly."""
    return kth - (margin + rel * abs(kth))


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _select_tile(
    s, queries, inv_q, margin_q, rel, block, inv_c, filt_c, col0, row0, cosine,
    mask, use_mask, exclude_self, heap_s, heap_i,
):
    """Fold a BLAS score tile (queries row0.. x corpus rows col0..) into per-query heaps.

    ``filt_c`` scales BLAS scores into the filter's units (1/|c| for cosine, whose queries
    went to BLAS normalized; 1 for dot); ``margin_q[q]`` bounds the BLAS error there. Each
    query row belongs to one thread and is scanned in ascending corpus order.
    """
    for r in prange(s.shape[0]):
        q = row0 + r
        _select_row(
            s[r], q, queries[q], inv_q[q], margin_q[q], rel, block, inv_c, filt_c, col0,
            cosine, mask, use_mask, exclude_self, heap_s[q], heap_i[q],
        )


# scores per group in the top-k scan: a group is tested with one vectorized pass, and only a
# group holding a candidate is walked one score at a time
_SCAN_GROUP = 32


@njit(inline="always", fastmath=FASTMATH)
def _group_hits(s, f, cut):
    """How many of the scores ``s * f`` are not below ``cut`` (NaN counts).

    ``s`` and ``f`` are slices that start at the group: the index runs from 0, so numba's
    negative-index wraparound folds away and LLVM's loop vectorizer turns the loop into
    vector compares. (Indexing the whole row at an offset compiled to gathers, and a loop
    of constant length is unrolled into scalar code instead: either made the scan cost a
    third of the BLAS time.)
    """
    hits = 0
    for t in range(s.shape[0]):
        hits += not s[t] * f[t] < cut
    return hits


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _select_rows(
    s, queries, inv_q, margin_q, rel, block, inv_c, filt_c, col0, row0, cosine,
    mask, use_mask, exclude_self, heap_s, heap_i,
):
    """As :func:`_select_tile` on the calling thread only, without the GIL."""
    for r in range(s.shape[0]):
        q = row0 + r
        _select_row(
            s[r], q, queries[q], inv_q[q], margin_q[q], rel, block, inv_c, filt_c, col0,
            cosine, mask, use_mask, exclude_self, heap_s[q], heap_i[q],
        )


@njit(fastmath=FASTMATH, cache=True)
def _select_row(
    srow, q, qrow, iq, margin, rel, block, inv_c, filt_c, col0, cosine,
    mask, use_mask, exclude_self, hs, hi,
):
    cut = _cutoff(hs[0], margin, rel)
    n = srow.shape[0]
    g = _SCAN_GROUP
    for c0 in range(0, n, g):
        if c0 + g <= n and _group_hits(srow[c0 : c0 + g], filt_c[c0 : c0 + g], cut) == 0:
            continue
        for c in range(c0, min(c0 + g, n)):
            v = srow[c] * filt_c[c]
            if not v < cut:  # NaN (a row too small for the filter) is a candidate
                j = col0 + c
                if use_mask and not mask[j]:
                    continue
                if exclude_self and j == q:
                    continue
                e = _pair_score(qrow, block[c], iq, inv_c[c], cosine)
                if _better(e, j, hs[0], hi[0]):
                    _heap_replace_root(hs, hi, e, j)
                    cut = _cutoff(hs[0], margin, rel)


@njit(inline="always", fastmath=FASTMATH)
def _group_hits_cols(s, f, cut):
    """How many of the scores ``s * f`` are not below their own cut-off ``cut`` (NaN
    counts); ``s`` and ``cut`` are float32 slices that start at the group (see
    :func:`_group_hits`)."""
    hits = 0
    for t in range(s.shape[0]):
        hits += not s[t] * f < cut[t]
    return hits


@njit(inline="always")
def _down32(cut):
    """The largest float32 not above ``cut``: a float32 score below it is below ``cut``
    too, so a scan compares float32 with float32 and still passes every contender."""
    c32 = np.float32(cut)
    if c32 > cut:
        c32 = np.nextafter(c32, np.float32(-np.inf))
    return c32


@njit(inline="always")
def _cutoff32(kth, margin, rel):
    """:func:`_cutoff` rounded down to float32 (see :func:`_down32`)."""
    return _down32(_cutoff(kth, margin, rel))


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _select_cols(
    st, lo, hi, queries, inv_q, margin_q, rel, block, inv_c, filt_c, col0, row0, cosine,
    mask, use_mask, exclude_self, heap_s, heap_i,
):
    """Fold query rows ``lo..hi`` of a corpus-major BLAS score tile (``st[c, r]``: corpus row
    col0 + c against query row0 + r) into their heaps, on the calling thread, without the GIL.

    Corpus rows are walked in ascending order and each query keeps its own cut-off, so every
    query meets its candidates in the order of a row-by-row scan; a candidate the filter
    lets through in excess is rescored and loses, so the heaps end the same.
    """
    w = hi - lo
    cut = np.empty(w, np.float32)
    for r in range(w):
        q = row0 + lo + r
        cut[r] = _cutoff32(heap_s[q, 0], margin_q[q], rel)
    g = _SCAN_GROUP
    for c in range(st.shape[0]):
        j = col0 + c
        if use_mask and not mask[j]:
            continue
        srow = st[c]
        fc = filt_c[c]
        for r0 in range(0, w, g):
            r1 = min(r0 + g, w)
            if _group_hits_cols(srow[lo + r0 : lo + r1], fc, cut[r0:r1]) == 0:
                continue
            for r in range(r0, r1):
                if not srow[lo + r] * fc < cut[r]:  # NaN (a row too small for the filter) too
                    q = row0 + lo + r
                    if exclude_self and j == q:
                        continue
                    e = _pair_score(queries[q], block[c], inv_q[q], inv_c[c], cosine)
                    if _better(e, j, heap_s[q, 0], heap_i[q, 0]):
                        _heap_replace_root(heap_s[q], heap_i[q], e, j)
                        cut[r] = _cutoff32(heap_s[q, 0], margin_q[q], rel)


@njit(parallel=True, cache=True)
def _select_tile_cols(
    st, chunks, queries, inv_q, margin_q, rel, block, inv_c, filt_c, col0, row0, cosine,
    mask, use_mask, exclude_self, heap_s, heap_i,
):
    """As :func:`_select_cols` for all query rows of the tile, cut into ``chunks`` slices
    that numba's threads take in parallel."""
    w = st.shape[1]
    for t in prange(chunks):
        _select_cols(
            st, w * t // chunks, w * (t + 1) // chunks, queries, inv_q, margin_q, rel, block,
            inv_c, filt_c, col0, row0, cosine, mask, use_mask, exclude_self, heap_s, heap_i,
        )


# ----------------------------------------------------------------------------------------
# top-k, few queries: the corpus streamed once
# ----------------------------------------------------------------------------------------


@njit(fastmath=FASTMATH, cache=True)
def _stream_row(row, j, queries, inv_q, cosine, mask, use_mask, exclude_self, hs, hi):
    """Fold corpus row ``j`` into every query's heap; False (and nothing folded) when the
    row holds inf or NaN."""
    ss = _sumsq(row)  # float16 values cannot overflow it: non-finite means inf/NaN
    if not np.isfinite(ss):
        return False
    if use_mask and not mask[j]:
        return True
    inv_r = _inv_norm(ss)
    for q in range(queries.shape[0]):
        if exclude_self and j == q:
            continue
        e = _pair_score(queries[q], row, inv_q[q], inv_r, cosine)
        if _better(e, j, hs[q, 0], hi[q, 0]):
            _heap_replace_root(hs[q], hi[q], e, j)
    return True


@njit(fastmath=FASTMATH, cache=True)
def _stream_chunk_f32(part, lo, queries, inv_q, cosine, mask, use_mask, exclude_self, hs, hi):
    bad = -1
    for jj in range(part.shape[0]):
        if not _stream_row(part[jj], lo + jj, queries, inv_q, cosine, mask, use_mask, exclude_self, hs, hi):
            if bad < 0:
                bad = lo + jj
    return bad


# ----------------------------------------------------------------------------------------
# float16 rows, decoded exactly
# ----------------------------------------------------------------------------------------


def _native_half() -> bool:
    """Whether numba compiles for a CPU with float16 conversion instructions (x86 F16C);
    elsewhere LLVM would call a runtime function that numba's JIT does not link."""
    from numba.core.registry import cpu_target

    features = getattr(cpu_target.target_context.codegen(), "_tm_features", "") or ""
    return "+f16c" in features.split(",")


@intrinsic
def _f16_to_f32_native(typingctx, h):
    """The float32 value of the float16 bit pattern ``h`` (uint16): one instruction,
    vectorized (needs F16C)."""
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _u32_as_f32(typingctx, u):
    """The float32 whose bit pattern is ``u`` (uint32)."""
    if u != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@njit(inline="always", fastmath=FASTMATH)
def _f16_to_f32_bits(h):
    """The float32 value of the float16 bit pattern ``h`` by integer operations: sign and
    magnitude move to their float32 places and a multiplication by 2**112 rebiases the
    exponent (exact, subnormals included); an all-ones exponent (inf/NaN) gets the
    float32 one."""
    v = np.uint32(h)
    mag = v & np.uint32(0x7FFF)
    u = ((v & np.uint32(0x8000)) << np.uint32(16)) | (mag << np.uint32(13))
    if mag >= np.uint32(0x7C00):
        u |= np.uint32(0x70000000)
    return _u32_as_f32(np.uint32(u)) * np.float32(2.0**112)


_f16_to_f32 = _f16_to_f32_native if _native_half() else _f16_to_f32_bits


@njit(fastmath=FASTMATH, cache=True)
def _decode_f16(h, out):
    """float16 bit patterns (uint16) -> float32 values, exactly (one vectorized loop)."""
    for k in range(h.shape[0]):
        out[k] = _f16_to_f32(h[k])


@njit(fastmath=FASTMATH, cache=True)
def _decode_f16_bits(h, out):
    """As _decode_f16 without conversion instructions (tests compare the two)."""
    for k in range(h.shape[0]):
        out[k] = _f16_to_f32_bits(h[k])


# float16 rows decoded per group: a few rows' float32 values (a few KiB) stay in L1
_F16_GROUP = 8


@njit(fastmath=FASTMATH, cache=True)
def _stream_chunk_f16(part, lo, queries, inv_q, cosine, mask, use_mask, exclude_self, hs, hi):
    """As _stream_chunk_f32 for float16 rows (uint16 bit patterns), decoded to float32
    first, exactly (a group of rows per call), so both give the same scores bit for bit."""
    bad = -1
    n, d = part.shape
    g = _F16_GROUP
    buf = np.empty((g, d), np.float32)
    flat = buf.reshape(g * d)
    for j0 in range(0, n, g):
        m = min(g, n - j0)
        _decode_f16(part[j0 : j0 + m].reshape(m * d), flat[: m * d])
        for r in range(m):
            j = lo + j0 + r
            if not _stream_row(buf[r], j, queries, inv_q, cosine, mask, use_mask, exclude_self, hs, hi):
                if bad < 0:
                    bad = j
    return bad


def _stream_chunk(part, lo, queries, inv_q, cosine, mask, use_mask, exclude_self, hs, hi):
    """Dispatch on the corpus dtype (float32 rows, or float16 as uint16 bit patterns)."""


@overload(_stream_chunk)
def _stream_chunk_impl(part, lo, queries, inv_q, cosine, mask, use_mask, exclude_self, hs, hi):
    chunk = _stream_chunk_f16 if part.dtype == types.uint16 else _stream_chunk_f32

    def impl(part, lo, queries, inv_q, cosine, mask, use_mask, exclude_self, hs, hi):
        return chunk(part, lo, queries, inv_q, cosine, mask, use_mask, exclude_self, hs, hi)

    return impl


@njit(parallel=True, cache=True)
def _stream(queries, inv_q, corpus, cosine, mask, use_mask, exclude_self, heap_s, heap_i):
    """Few queries: every chunk of the corpus is read once, by one thread, into its own heaps.

    corpus: float32 rows, or float16 rows as uint16 bit patterns. heap_s / heap_i:
    (chunks, q, k). Returns the first row holding NaN/inf, or -1.
    """
    n = corpus.shape[0]
    chunks = heap_s.shape[0]
    bad = np.full(chunks, -1, np.int64)
    for t in prange(chunks):
        lo = n * t // chunks
        part = corpus[lo : n * (t + 1) // chunks]
        bad[t] = _stream_chunk(
            part, lo, queries, inv_q, cosine, mask, use_mask, exclude_self, heap_s[t], heap_i[t]
        )
    for t in range(chunks):
        if bad[t] >= 0:
            return bad[t]
    return -1


# ----------------------------------------------------------------------------------------
# top-k: merging the heaps
# ----------------------------------------------------------------------------------------


@njit(inline="always")
def _sort_heap(hs, hi, out_s, out_i, no_index):
    """One row of candidates -> its best len(out_s), sorted (score desc, index asc); empty
    slots (the sentinel index) become score -inf, index -1."""
    m = hs.shape[0]
    order = np.argsort(hi, kind="mergesort")
    neg = np.empty(m, np.float32)
    for t in range(m):
        neg[t] = -hs[order[t]]
    order2 = np.argsort(neg, kind="mergesort")
    for t in range(out_s.shape[0]):
        p = order[order2[t]]
        if hi[p] == no_index:
            out_s[t] = -np.inf
            out_i[t] = -1
        else:
            out_s[t] = hs[p]
            out_i[t] = hi[p]


@njit(parallel=True, cache=True)
def _sort_heaps(heap_s, heap_i, out_s, out_i, no_index):
    """Rows of candidates -> the best out.shape[1] of each, sorted (score desc, index asc).

    Empty slots (the sentinel index) become score -inf, index -1.
    """
    for q in prange(heap_s.shape[0]):
        _sort_heap(heap_s[q], heap_i[q], out_s[q], out_i[q], no_index)


@njit(cache=True)
def _sort_few_heaps(heap_s, heap_i, out_s, out_i, no_index):
    """:func:`_sort_heaps` on one thread (a few rows: no parallel launch)."""
    for q in range(heap_s.shape[0]):
        _sort_heap(heap_s[q], heap_i[q], out_s[q], out_i[q], no_index)


# ----------------------------------------------------------------------------------------
# threshold pairs
# ----------------------------------------------------------------------------------------


@njit(inline="always")
def _pair_cut(thr, margin, rel):
    return thr - (margin + rel * abs(thr))


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _pairs_tile(
    s, xb, yb, inv_x, inv_y, filt_x, filt_y, margin_x, rel, thr, diagonal, cosine,
    counts, out_j, out_s,
):
    """Pairs of one BLAS tile whose exact score is >= thr.

    Row r writes its matches (column, score) into out_j[r, :] / out_s[r, :] up to their
    width and counts every match in counts[r]; the caller rescans the rows that
    overflow with :func:`_pairs_rows`. With ``diagonal`` only columns c > r are considered.
    """
    for r in prange(s.shape[0]):
        counts[r] = _pairs_row(
            s[r], xb[r], yb, inv_x[r], inv_y, filt_x[r], filt_y,
            _pair_cut(thr, margin_x[r], rel), thr, r + 1 if diagonal else 0, cosine,
            out_j[r], out_s[r],
        )


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _pairs_rows(
    s, xb, yb, inv_x, inv_y, filt_x, filt_y, margin_x, rel, thr, diagonal, cosine,
    rows, offsets, out_j, out_s,
):
    """Rescan rows ``rows`` of a tile (as :func:`_pairs_tile`): the matches of row rows[t]
    fill out_j / out_s[offsets[t]:offsets[t + 1]], sized by its count from the first scan."""
    for t in prange(rows.shape[0]):
        r = rows[t]
        lo, hi = offsets[t], offsets[t + 1]
        _pairs_row(
            s[r], xb[r], yb, inv_x[r], inv_y, filt_x[r], filt_y,
            _pair_cut(thr, margin_x[r], rel), thr, r + 1 if diagonal else 0, cosine,
            out_j[lo:hi], out_s[lo:hi],
        )


@njit(inline="always", fastmath=FASTMATH)
def _pair_group_hits(s, fx, f, cut):
    """How many of the filter scores ``s * (fx * f)`` are not below ``cut`` (NaN counts);
    slices that start at the group, as in :func:`_group_hits`."""
    hits = 0
    for t in range(s.shape[0]):
        hits += not s[t] * (fx * f[t]) < cut
    return hits


@njit(fastmath=FASTMATH, cache=True)
def _pairs_row(srow, xrow, yb, ix, inv_y, fx, filt_y, cut, thr, start, cosine, out_j, out_s):
    cut = _down32(cut)
    width = out_j.shape[0]
    n_found = 0
    n = srow.shape[0]
    g = _SCAN_GROUP
    for c0 in range(start, n, g):
        c1 = min(c0 + g, n)
        if _pair_group_hits(srow[c0:c1], fx, filt_y[c0:c1], cut) == 0:
            continue
        for c in range(c0, c1):
            if not srow[c] * (fx * filt_y[c]) < cut:  # NaN: rescore
                e = _pair_score(xrow, yb[c], ix, inv_y[c], cosine)
                if e >= thr:
                    if n_found < width:
                        out_j[n_found] = c
                        out_s[n_found] = e
                    n_found += 1
    return n_found


# ----------------------------------------------------------------------------------------
# threshold forest: connected components of the threshold graph, pairs not listed
# ----------------------------------------------------------------------------------------


@njit(inline="always")
def _find(parent, a):
    """Root of ``a`` in the union-find array ``parent``, compressing the path."""
    root = a
    while parent[root] != root:
        root = parent[root]
    while parent[a] != root:
        nxt = parent[a]
        parent[a] = root
        a = nxt
    return root


@njit(cache=True)
def _same_root(parent, ids_x, ids_y):
    """Whether every row of ``ids_x`` and ``ids_y`` already has one root."""
    root = _find(parent, ids_x[0]) if ids_x.shape[0] else _find(parent, ids_y[0])
    for t in range(ids_x.shape[0]):
        if _find(parent, ids_x[t]) != root:
            return False
    for t in range(ids_y.shape[0]):
        if _find(parent, ids_y[t]) != root:
            return False
    return True


@njit(cache=True)
def _roots(parent, ids, out):
    for t in range(ids.shape[0]):
        out[t] = _find(parent, ids[t])


@njit(fastmath=FASTMATH, cache=True)
def _first_candidate(srow, fx, filt_y, cut, start):
    cut = _down32(cut)
    n = srow.shape[0]
    g = _SCAN_GROUP
    for c0 in range(start, n, g):
        c1 = min(c0 + g, n)
        if _pair_group_hits(srow[c0:c1], fx, filt_y[c0:c1], cut) == 0:
            continue
        for c in range(c0, c1):
            if not srow[c] * (fx * filt_y[c]) < cut:
                return c
    return -1


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _first_candidates(s, filt_x, filt_y, margin_x, rel, thr, diagonal, out):
    """The first column of each tile row that the BLAS filter lets through (-1: none)."""
    for r in prange(s.shape[0]):
        out[r] = _first_candidate(s[r], filt_x[r], filt_y, _pair_cut(thr, margin_x[r], rel),
                                  r + 1 if diagonal else 0)


@njit(fastmath=FASTMATH, cache=True)
def _forest_tile(
    s, xb, yb, inv_x, inv_y, filt_x, filt_y, margin_x, rel, thr, diagonal, cosine,
    ids_x, ids_y, parent, out_i, out_j, out_s, n_out,
):
    """Fold the pairs of one BLAS tile whose exact score is >= thr into ``parent``.

    A pair is scored only when its rows are not yet connected; a scored pair that joins two
    trees is written at ``out_*[n_out]`` (global row numbers ``ids_x[r]``, ``ids_y[c]``), so
    the output is a spanning forest: at most one pair per row. Serial: the union-find is
    shared by the whole tile. Returns the new ``n_out``.
    """
    first = np.empty(s.shape[0], np.int64)
    _first_candidates(s, filt_x, filt_y, margin_x, rel, thr, diagonal, first)
    for r in range(s.shape[0]):
        if first[r] < 0:
            continue
        cut = _pair_cut(thr, margin_x[r], rel)
        fx = filt_x[r]
        gx = ids_x[r]
        for c in range(first[r], s.shape[1]):
            if not s[r, c] * (fx * filt_y[c]) < cut:  # NaN: rescore
                a = _find(parent, gx)
                b = _find(parent, ids_y[c])
                if a != b:
                    e = _pair_score(xb[r], yb[c], inv_x[r], inv_y[c], cosine)
                    if e >= thr:
                        if a < b:
                            parent[b] = a
                        else:
                            parent[a] = b
                        out_i[n_out] = gx
                        out_j[n_out] = ids_y[c]
                        out_s[n_out] = e
                        n_out += 1
    return n_out


# ----------------------------------------------------------------------------------------
# helpers of the public wrappers
# ----------------------------------------------------------------------------------------

def _blas_margin(d: int) -> float:
    """Bound on |BLAS float32 dot - published dot| / (|a| |b|) for d-dimensional rows
    (both are float32 sums of d products, in different orders), with room for the
    rounding of the scaled filter score."""
    return 1.1 * (2 * d + 8) * _UNIT


def _filter_scale(inv: np.ndarray, norm: np.ndarray, other: float, cosine: bool) -> np.ndarray:
    """float32 factors for BLAS scores in the filter: 1/|row| for cosine, 1 for dot.

    NaN (always rescored) for rows whose BLAS score cannot be trusted: cosine rows so
    small that their float32 products underflow, and rows so large that a float32 sum
    may overflow to infinity against a row of norm ``other`` (the largest on the other
    side of the product).
    """
    if cosine:
        with np.errstate(over="ignore"):
            filt = inv.astype(np.float32)
        filt[(norm > 0) & (norm < 2.0**-60)] = np.nan
    else:
        filt = np.ones(norm.shape[0], np.float32)
    filt[norm * other > 2.0**120] = np.nan
    return filt


def _rows32(x: np.ndarray, start: int, count: int) -> np.ndarray:
    """Rows start..start+count of x as C-contiguous float32 (a view when they are)."""
    part = x[start : start + count]
    if part.dtype == np.float32 and part.flags.c_contiguous:
        return part.view(np.ndarray)
    return np.ascontiguousarray(part, dtype=np.float32)


def _block_stats(x: np.ndarray, name: str, block: int):
    """1/|row| and |row| of every row, converting and checking one block at a time (a wider
    float type first checked to fit float32: see :func:`check_finite`)."""
    if x.dtype.kind == "f" and x.dtype.itemsize > 4:
        check_finite(x, name)
    inv = np.empty(x.shape[0], np.float64)
    norm = np.empty(x.shape[0], np.float64)
    for start in range(0, x.shape[0], block):
        b_inv, b_norm = _stats(_rows32(x, start, block), name, start)
        inv[start : start + block] = b_inv
        norm[start : start + block] = b_norm
    return inv, norm


def _stats(x: np.ndarray, name: str, offset: int = 0):
    inv = np.empty(x.shape[0], np.float64)
    norm = np.empty(x.shape[0], np.float64)
    bad = _row_stats(x, inv, norm, max(1, min(numba.get_num_threads(), x.shape[0])))
    if bad >= 0:
        raise InvalidInputError(
            f"{name} must be finite, got NaN or infinity in row {offset + bad}"
        )
    return inv, norm

