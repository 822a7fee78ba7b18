"""Similarity kernels: normalize, similarity matrices, exact top-k and threshold pairs.

Every public function here is a thin validating wrapper over private ``@njit`` cores that
take only arrays and scalars. For many rows, dot products go through BLAS (numpy's
``matmul``) on blocks sized for the caches; selection, heap merges and pair collection
run in numba ``prange`` loops where each thread writes its own buffer, merged at the end.
For a few queries, top_k streams the corpus once through all threads instead. The number of threads follows numba's
(``NUMBA_NUM_THREADS`` / :func:`numba.set_num_threads`); results do not depend on it, nor
on the block size.

Scores
    ``metric="dot"``: the dot product of the float32 rows, accumulated in float32 in one
    fixed (vectorized) order; in float64 (then rounded) when ``|a| |b| > 2**120``, where
    float32 partial sums could overflow to infinity or NaN.
    ``metric="cosine"``: ``dot(a, b) * (1/|a| * 1/|b|)`` scaled in float64 (float64
    accumulation too for rows tiny or huge enough to underflow or overflow float32),
    clipped to [-1, 1] and rounded to float32. A zero vector has similarity 0 with everything,
    itself included. The same pair gets the same score bit for bit from every function.

Ties are broken by the lower index. The first call of each kernel compiles it (a few
seconds); compiled code is cached on disk (``cache=True``), so later processes start fast.

>>> import numpy as np
>>> x = np.array([[1, 0], [1, 1], [0, 0], [-1, 0]], dtype=np.float32)
>>> cosine_similarity(x).round(3)
array([[ 1.   ,  0.707,  0.   , -1.   ],
       [ 0.707,  1.   ,  0.   , -0.707],
       [ 0.   ,  0.   ,  0.   ,  0.   ],
       [-1.   , -0.707,  0.   ,  1.   ]], dtype=float32)
>>> scores, idx = top_k(x[:1], x, k=2)
>>> idx
array([[0, 1]])
>>> i, j, s = similar_pairs(x, 0.5)
>>> i, j, s.round(3)
(array([0]), array([1]), array([0.707], dtype=float32))
"""

from __future__ import annotations

import os

# numba's OpenMP threads spin for milliseconds after each parallel loop, and so do BLAS's
# threads after each gemm; on few cores, alternating between the two pools then costs
# ~20 ms per hand-over. Passive waiting removes that. Set OMP_WAIT_POLICY yourself (before
# importing embedcache) to choose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402

from embedcache.errors import (  # noqa: E402
    DimensionMismatchError,
    InvalidInputError,
    InvalidInputTypeError,
)

__all__ = [
    "FASTMATH",
    "cosine_similarity",
    "dot_similarity",
    "meets_threshold",
    "normalize",
    "pair_scores",
    "similar_pairs",
    "top_k",
]

#: The one set of fastmath flags used by every kernel. ``nnan`` and ``ninf`` are left out
#: on purpose: NaN and infinity must keep their meaning in comparisons.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

_METRICS = ("cosine", "dot")
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_NO_INDEX = np.iinfo(np.int64).max  # heap sentinel: sorts after every real index

# Rows of the corpus per block in top_k, and tile sides in similar_pairs. The score tile of
# one block is (queries in block) x (corpus rows in block) float32.
_TOPK_CORPUS_BLOCK = 4096
_TOPK_QUERY_BLOCK = 1024
_TOPK_MAX_BLOCK = 65536
_PAIRS_BLOCK = 2048
_PAIRS_COLUMNS = 4 * _PAIRS_BLOCK  # tiles of 2048 x 8192 scores (64 MiB)
_PAIRS_WIDTH = 16  # matches per row and tile collected in the first scan


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------


def _as_matrix(name: str, x: object) -> np.ndarray:
    """Return ``x`` as a 2-D float16/32/64 ndarray (no copy when it already is one)."""
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise InvalidInputTypeError(
                f"{name} must be a 2-D float array, got {type(x).__name__}"
            ) from exc
    if x.dtype not in _FLOAT_DTYPES:
        raise InvalidInputTypeError(
            f"{name} must have dtype float32, float16 or float64, got {x.dtype}"
        )
    if x.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2-D array (n, d), got shape {x.shape}")
    if x.shape[1] == 0:
        raise InvalidInputError(f"{name} must have at least one column, got shape {x.shape}")
    return x


def _check_finite(name: str, x: np.ndarray, block: int = 8192) -> None:
    """Raise InvalidInputError naming ``name`` and the first bad row if x has NaN/inf."""
    for start in range(0, x.shape[0], block):
        part = x[start : start + block]
        if not np.isfinite(part).all():
            bad = start + int(np.flatnonzero(~np.isfinite(part).all(axis=1))[0])
            raise InvalidInputError(f"{name} must be finite, got NaN or infinity in row {bad}")


def _as_float32(name: str, x: object) -> np.ndarray:
    """Validated, finite, C-contiguous float32 copy (or the array itself when it is one)."""
    x = _as_matrix(name, x)
    _check_finite(name, x)
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_metric(metric: object) -> str:
    if metric not in _METRICS:
        raise InvalidInputError(f"metric must be 'cosine' or 'dot', got {metric!r}")
    return metric  # type: ignore[return-value]


def _check_same_dim(a_name: str, a: np.ndarray, b_name: str, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise DimensionMismatchError(
            f"{a_name} and {b_name} must have the same number of columns, "
            f"got {a.shape[1]} and {b.shape[1]}"
        )


def _check_block(block: int | None, default: int) -> int:
    if block is None:
        return default
    if int(block) < 1:
        raise InvalidInputError(f"_block_size must be >= 1, got {block}")
    return int(block)


# ----------------------------------------------------------------------------------------
# njit cores
#
# Every score that leaves this module is made by `_pair_score(a, b, inv_a, inv_b)`: one
# compiled dot-product loop (float32, fixed order; float64 for rows so small or large that
# float32 would underflow or overflow), scaled in float64 and rounded once. BLAS (float32
# gemm) does the bulk of the arithmetic, but its rounding depends on the shapes it is
# called with, so its scores are only used as a filter: a pair whose BLAS score is within
# the BLAS error bound of the current cut-off is rescored exactly. The result is the same
# bit for bit for every block size, thread count and code path, and the same score for the
# same pair in cosine_similarity, top_k and similar_pairs.
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


# Parallel loops run over contiguous chunks, one serial (vectorized) call per chunk:
# numba vectorizes a plain serial function better than the body of a prange loop.


@njit(fastmath=FASTMATH, cache=True)
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


@njit(fastmath=FASTMATH, cache=True)
def _select_row(
    srow, q, qrow, iq, margin, rel, block, inv_c, filt_c, col0, cosine,
    mask, use_mask, exclude_self, hs, hi,
):
    cut = _cutoff(hs[0], margin, rel)
    for c in range(srow.shape[0]):
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


@njit(parallel=True, cache=True)
def _sort_heaps(heap_s, heap_i, out_s, out_i, no_index):
    """Rows of candidates -> the best out.shape[1] of each, sorted (score desc, index asc).

    Empty slots (the sentinel index) become score -inf, index -1.
    """
    nq, m = heap_s.shape
    kk = out_s.shape[1]
    for q in prange(nq):
        hs = heap_s[q]
        hi = heap_i[q]
        order = np.argsort(hi, kind="mergesort")
        neg = np.empty(m, np.float32)
        for t in range(m):
            neg[t] = -hs[order[t]]
        order2 = np.argsort(neg, kind="mergesort")
        for t in range(kk):
            p = order[order2[t]]
            if hi[p] == no_index:
                out_s[q, t] = -np.inf
                out_i[q, t] = -1
            else:
                out_s[q, t] = hs[p]
                out_i[q, t] = hi[p]


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


@njit(fastmath=FASTMATH, cache=True)
def _pairs_row(srow, xrow, yb, ix, inv_y, fx, filt_y, cut, thr, start, cosine, out_j, out_s):
    width = out_j.shape[0]
    n_found = 0
    for c in range(start, srow.shape[0]):
        if not srow[c] * (fx * filt_y[c]) < cut:  # NaN: rescore
            e = _pair_score(xrow, yb[c], ix, inv_y[c], cosine)
            if e >= thr:
                if n_found < width:
                    out_j[n_found] = c
                    out_s[n_found] = e
                n_found += 1
    return n_found


# ----------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------

_UNIT = 2.0**-24  # float32 unit roundoff
# Up to this many queries, top_k streams the corpus once through numba (memory-bound);
# above it, BLAS gemm on blocks does the arithmetic.
_STREAM_MAX_QUERIES = 16


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
    """1/|row| and |row| of every row, converting and checking one block at a time."""
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


def normalize(x, *, out=None):
    """Scale every row to unit L2 norm (float64 accumulation); zero rows stay zero.

    x: array of shape (n, d), float16/float32/float64. out: optional float32 C-contiguous
    array of shape (n, d) to write into (may be ``x`` itself when x is float32).
    Returns a float32 array of shape (n, d).

    >>> normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    array([[0.6, 0.8],
           [0. , 0. ]], dtype=float32)
    """
    x = _as_matrix("x", x)
    _check_finite("x", x)
    if out is None:
        out = np.empty(x.shape, np.float32)
    elif not isinstance(out, np.ndarray) or out.dtype != np.float32:
        raise InvalidInputTypeError(
            f"out must be a float32 ndarray, got {getattr(out, 'dtype', type(out).__name__)}"
        )
    elif out.shape != x.shape:
        raise InvalidInputError(f"out must have shape {x.shape}, got {out.shape}")
    elif not out.flags.c_contiguous or not out.flags.writeable:
        raise InvalidInputError("out must be a writeable C-contiguous array")
    if x.shape[0]:
        src = x if x.dtype == np.float64 else x.astype(np.float32, copy=False)
        _normalize_rows(np.ascontiguousarray(src), out)
    return out


def _similarity(a, b, cosine: bool) -> np.ndarray:
    a32 = _as_float32("a", a)
    b32 = a32 if b is None else _as_float32("b", b)
    _check_same_dim("a", a32, "b", b32)
    inv_a, _ = _stats(a32, "a")
    inv_b = inv_a if b is None else _stats(b32, "b")[0]
    out = np.empty((a32.shape[0], b32.shape[0]), np.float32)
    if out.size:
        _dense(a32, b32, inv_a, inv_b, cosine, b is None, out)
    return out


def cosine_similarity(a, b=None):
    """Dense cosine similarity matrix, float32, clipped to [-1, 1].

    a: (n, d); b: (m, d) or None. Returns (n, m), or with ``b=None`` the (n, n)
    self-similarity matrix, exactly symmetric (one triangle computed, then mirrored).
    ``cosine_similarity(a, b) == cosine_similarity(b, a).T`` exactly, and every entry is
    the score top_k and similar_pairs give the same pair. A zero row has similarity 0
    with everything. Memory: the (n, m) result; for large inputs use :func:`top_k` or
    :func:`similar_pairs`, which use BLAS and never build the whole matrix.
    """
    return _similarity(a, b, cosine=True)


def dot_similarity(a, b=None):
    """Dense dot-product matrix, float32: ``a @ b.T`` (or ``a @ a.T``, exactly symmetric).

    >>> dot_similarity(np.array([[1.0, 2.0]]), np.array([[3.0, 4.0], [1.0, 0.0]]))
    array([[11.,  1.]], dtype=float32)
    """
    return _similarity(a, b, cosine=False)


def _check_mask(mask, n: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise InvalidInputTypeError(f"mask must be a bool array, got dtype {mask.dtype}")
    if mask.shape != (n,):
        raise InvalidInputError(f"mask must have shape ({n},), got {mask.shape}")
    return np.ascontiguousarray(mask)


def top_k(queries, corpus, k, *, metric="cosine", exclude_self=False, mask=None, _block_size=None):
    """Exact k nearest corpus rows of every query, best first.

    queries: (q, d) float array. corpus: (N, d) float32, float16 or float64 array, or a
    ``numpy.memmap``; it is read block by block (float16 and float64 blocks converted to
    float32), so memory beyond inputs and outputs stays a few blocks whatever N is.
    k: number of neighbours, >= 1. When ``k > N`` only N columns are returned.
    metric: "cosine" (default) or "dot".
    exclude_self: never match query row i with corpus row i (for queries that are the
    first rows of the corpus, as in a k-nearest-neighbour graph).
    mask: optional bool array (N,); rows where it is False are never returned.

    Returns ``(scores, indices)``: float32 and int64 arrays of shape (q, min(k, N)), sorted
    by score descending, ties broken by the lower index. Slots for which no eligible corpus
    row exists (because of ``mask`` or ``exclude_self``) hold score ``-inf`` and index -1.
    The result is identical for every block size and thread count.

    Up to a few queries the corpus is streamed once through all threads (memory-bound);
    for more, BLAS multiplies blocks of queries and corpus rows and a fused scan keeps a
    heap per query, rescoring exactly the few candidates near its current k-th best.
    """
    metric = _check_metric(metric)
    q32 = _as_float32("queries", queries)
    corpus = _as_matrix("corpus", corpus)
    _check_same_dim("queries", q32, "corpus", corpus)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidInputTypeError(f"k must be an integer, got {type(k).__name__}")
    if k < 1:
        raise InvalidInputError(f"k must be >= 1, got {k}")
    n = corpus.shape[0]
    use_mask = mask is not None
    mask = _check_mask(mask, n) if use_mask else np.ones(1, np.bool_)
    exclude_self = bool(exclude_self)
    kk = int(min(k, n))
    nq = q32.shape[0]
    cosine = metric == "cosine"
    out_s = np.empty((nq, kk), np.float32)
    out_i = np.empty((nq, kk), np.int64)
    if nq == 0 or kk == 0:
        return out_s, out_i
    inv_q, norm_q = _stats(q32, "queries")
    base = corpus.view(np.ndarray) if isinstance(corpus, np.ndarray) else corpus
    if (
        nq <= _STREAM_MAX_QUERIES
        and base.dtype in (np.float32, np.float16)
        and base.flags.c_contiguous
    ):
        if _block_size is None:
            chunks = numba.get_num_threads()
        else:
            chunks = -(-n // _check_block(_block_size, n))
        chunks = max(1, min(chunks, n))
        heap_s = np.full((chunks, nq, kk), -np.inf, np.float32)
        heap_i = np.full((chunks, nq, kk), _NO_INDEX, np.int64)
        if base.dtype == np.float16:
            base = base.view(np.uint16)
        bad = _stream(q32, inv_q, base, cosine, mask, use_mask, exclude_self, heap_s, heap_i)
        if bad >= 0:
            raise InvalidInputError(f"corpus must be finite, got NaN or infinity in row {bad}")
        heap_s = np.ascontiguousarray(heap_s.transpose(1, 0, 2)).reshape(nq, chunks * kk)
        heap_i = np.ascontiguousarray(heap_i.transpose(1, 0, 2)).reshape(nq, chunks * kk)
        _sort_heaps(heap_s, heap_i, out_s, out_i, _NO_INDEX)
        return out_s, out_i

    # score tiles of about 32 MiB: fewer, larger blocks when there are few queries (each
    # block costs a hand-over between the BLAS and numba threads)
    direct = base.dtype == np.float32 and base.flags.c_contiguous
    default_block = max(_TOPK_CORPUS_BLOCK, min((1 << 23) // nq, _TOPK_MAX_BLOCK if direct else 8192))
    cblock = _check_block(_block_size, default_block)
    qblock = _check_block(_block_size, _TOPK_QUERY_BLOCK)
    margin = _blas_margin(q32.shape[1])
    if cosine:
        qf = normalize(q32)  # BLAS (filter) input; exact scores use the raw rows
        margin_q = np.full(nq, margin)
    else:
        qf = q32
    heap_s = np.full((nq, kk), -np.inf, np.float32)
    heap_i = np.full((nq, kk), _NO_INDEX, np.int64)
    tile = np.empty(min(qblock, nq) * min(cblock, n), np.float32)
    for c0 in range(0, n, cblock):
        block = base[c0 : c0 + cblock]
        if block.dtype != np.float32 or not block.flags.c_contiguous:
            block = np.ascontiguousarray(block, dtype=np.float32)
        inv_c, norm_c = _stats(block, "corpus", c0)
        # cosine queries go to BLAS normalized
        filt_c = _filter_scale(inv_c, norm_c, 1.0 if cosine else norm_q.max(), cosine)
        if not cosine:
            margin_q = margin * norm_q * norm_c.max() + 1e-37
        for r0 in range(0, nq, qblock):
            qb = qf[r0 : r0 + qblock]
            s = tile[: qb.shape[0] * block.shape[0]].reshape(qb.shape[0], block.shape[0])
            _gemm_nt(qb, block, s)
            _select_tile(
                s, q32, inv_q, margin_q, 4 * _UNIT, block, inv_c, filt_c, c0, r0, cosine,
                mask, use_mask, exclude_self, heap_s, heap_i,
            )
    _sort_heaps(heap_s, heap_i, out_s, out_i, _NO_INDEX)
    return out_s, out_i


def _check_index(name: str, idx: object, n: int, rows_of: str) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.size == 0:
        return np.empty(0, np.int64)
    if idx.dtype.kind not in "iu":
        raise InvalidInputTypeError(f"{name} must hold integers, got {idx.dtype}")
    if idx.ndim != 1:
        raise InvalidInputError(f"{name} must be a 1-D array, got shape {idx.shape}")
    bad = (idx < 0) | (idx >= n)
    if bad.any():
        raise InvalidInputError(f"{name} must index the {n} rows of {rows_of}, got {idx[bad][0]}")
    return idx.astype(np.int64, copy=False)


def pair_scores(x, i, j, *, y=None, metric="cosine"):
    """The score of each listed pair of rows: ``score(x[i[k]], y[j[k]])`` for every k.

    x: (n, d) float array; y: (m, d) float array, or None for pairs within x. i, j: integer
    arrays of one length. Returns float32 scores of that length, each the one
    :func:`cosine_similarity` / :func:`dot_similarity`, :func:`top_k` and
    :func:`similar_pairs` give the same pair, bit for bit. Only the rows named are read.

    >>> x = np.array([[1, 0], [1, 1], [3, 0]], dtype=np.float32)
    >>> pair_scores(x, [0, 0], [1, 2]).round(3)
    array([0.707, 1.   ], dtype=float32)
    """
    metric = _check_metric(metric)
    x = _as_matrix("x", x)
    other = x if y is None else _as_matrix("y", y)
    _check_same_dim("x", x, "y", other)
    i = _check_index("i", i, x.shape[0], "x")
    j = _check_index("j", j, other.shape[0], "x" if y is None else "y")
    if len(i) != len(j):
        raise InvalidInputError(f"i and j must have the same length, got {len(i)} and {len(j)}")
    out = np.empty(len(i), np.float32)
    if not len(i):
        return out
    rows_a, ia = np.unique(i, return_inverse=True)
    rows_b, jb = np.unique(j, return_inverse=True)
    a = _as_float32("x", x[rows_a])
    b = _as_float32("x" if y is None else "y", other[rows_b])
    inv_a, inv_b = _stats(a, "x")[0], _stats(b, "y")[0]
    _listed_pairs(a, b, inv_a, inv_b, ia.reshape(-1), jb.reshape(-1), metric == "cosine", out)
    return out


def meets_threshold(scores, threshold) -> np.ndarray:
    """Which ``scores`` are at or above ``threshold``, by the rule of :func:`similar_pairs`:
    the float32 score against the threshold rounded to the nearest float32.

    >>> meets_threshold(np.float32([0.8, 0.7999999]), 0.8)
    array([ True, False])
    """
    return np.asarray(scores, np.float32) >= np.float32(threshold)


def similar_pairs(x, threshold, *, y=None, metric="cosine", _block_size=None):
    """Every pair of rows with score >= threshold, exactly once, sorted by (i, j).

    x: (n, d) float array (float32, float16 or float64; a ``numpy.memmap`` is read tile by
    tile). y: optional (m, d) array; without it pairs within x with i < j are returned,
    with it every (i, j) with i a row of x and j a row of y.
    threshold: a float; for cosine it must lie in [-1, 1]. Scores are float32 and are
    compared with the threshold rounded to the nearest float32, so a pair whose score
    equals ``numpy.float32(threshold)`` is returned even when the float64 threshold is a
    little higher.
    Returns ``(i, j, scores)``: int64, int64, float32 arrays of equal length. The scores
    are those of :func:`cosine_similarity` / :func:`dot_similarity` bit for bit. Memory
    is proportional to the output plus one tile of scores; only the upper triangle is
    computed when y is None.
    """
    metric = _check_metric(metric)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)):
        raise InvalidInputTypeError(
            f"threshold must be a number, got {type(threshold).__name__}"
        )
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise InvalidInputError(f"threshold must be finite, got {threshold}")
    if metric == "cosine" and not -1.0 <= threshold <= 1.0:
        raise InvalidInputError(f"threshold must be in [-1, 1] for cosine, got {threshold}")
    x32 = _as_matrix("x", x)
    same = y is None
    y32 = x32 if same else _as_matrix("y", y)
    _check_same_dim("x", x32, "y", y32)
    cosine = metric == "cosine"
    block = _check_block(_block_size, _PAIRS_BLOCK)
    cblock = block if _block_size is not None else _PAIRS_COLUMNS
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
    j = np.concatenate(parts_j)
    sc = np.concatenate(parts_s)
    order = np.lexsort((j, i))
    return i[order], j[order], sc[order]
