"""Similarity kernels: normalize, similarity matrices, exact top-k and threshold pairs.

Every public function here is a thin validating wrapper over private ``@njit`` cores that
take only arrays and scalars. Dot products go through BLAS (``np.dot`` inside numba, which
always calls ``gemm`` for two matrices) on blocks sized for the caches; selection, heap
merges and pair collection run in numba ``prange`` loops where each thread writes its own
buffer, merged at the end. The number of threads follows numba's
(``NUMBA_NUM_THREADS`` / :func:`numba.set_num_threads`); results do not depend on it, nor
on the block size.

Scores
    ``metric="dot"``: the float32 dot product.
    ``metric="cosine"``: ``dot(a, b) * (1/|a| * 1/|b|)`` with the norms accumulated in
    float64, clipped to [-1, 1]. A zero vector has similarity 0 with everything, itself
    included.

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

import numpy as np
from numba import njit, prange

from embedcache.errors import (
    DimensionMismatchError,
    InvalidInputError,
    InvalidInputTypeError,
)

__all__ = [
    "FASTMATH",
    "cosine_similarity",
    "dot_similarity",
    "normalize",
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
_PAIRS_BLOCK = 2048


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
# ----------------------------------------------------------------------------------------


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _inv_norms(x):
    """1/|row| for each row of a float32 matrix, accumulated in float64; 0 for zero rows."""
    n, d = x.shape
    out = np.empty(n, np.float32)
    for i in prange(n):
        s = 0.0
        for k in range(d):
            v = np.float64(x[i, k])
            s += v * v
        out[i] = np.float32(1.0 / np.sqrt(s)) if s > 0.0 else np.float32(0.0)
    return out


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _normalize_rows(x, out):
    n, d = x.shape
    for i in prange(n):
        s = 0.0
        for k in range(d):
            v = np.float64(x[i, k])
            s += v * v
        scale = 1.0 / np.sqrt(s) if s > 0.0 else 0.0
        for k in range(d):
            out[i, k] = np.float32(x[i, k] * scale)


@njit(cache=True)
def _gemm_nt(a, b, out):
    """out = a @ b.T through BLAS gemm (for any shapes, never gemv)."""
    np.dot(a, b.T, out)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _scale_clip(s, inv_a, inv_b):
    """Cosine from dot products in place: s[i, j] * (inv_a[i] * inv_b[j]) clipped to [-1, 1]."""
    n, m = s.shape
    for i in prange(n):
        ia = inv_a[i]
        for j in range(m):
            v = s[i, j] * (ia * inv_b[j])
            s[i, j] = min(max(v, np.float32(-1.0)), np.float32(1.0))


@njit(parallel=True, cache=True)
def _mirror_upper(s):
    """Copy the upper triangle onto the lower one so that s is exactly symmetric."""
    n = s.shape[0]
    for j in prange(n):
        for i in range(j):
            s[j, i] = s[i, j]


@njit(inline="always")
def _heap_replace_root(hs, hi, s, j):
    """Replace the root (the worst kept item) of a min-heap ordered by (score, -index)."""
    k = hs.shape[0]
    pos = 0
    while True:
        c = 2 * pos + 1
        if c >= k:
            break
        r = c + 1
        if r < k and (hs[r] < hs[c] or (hs[r] == hs[c] and hi[r] > hi[c])):
            c = r
        if hs[c] < s or (hs[c] == s and hi[c] > j):
            hs[pos] = hs[c]
            hi[pos] = hi[c]
            pos = c
        else:
            break
    hs[pos] = s
    hi[pos] = j


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _select_block(
    s, col0, inv_q, inv_c, cosine, mask, use_mask, row0, exclude_self, heap_s, heap_i
):
    """Fold one score tile (queries row0.. x corpus rows col0..) into the per-query heaps.

    Each query row is owned by one thread and scanned in ascending corpus order, so the
    result does not depend on the thread count.
    """
    nq, nc = s.shape
    for r in prange(nq):
        q = row0 + r
        hs = heap_s[q]
        hi = heap_i[q]
        iq = inv_q[r] if cosine else np.float32(1.0)
        for c in range(nc):
            v = s[r, c]
            if cosine:
                v = min(max(v * (iq * inv_c[c]), np.float32(-1.0)), np.float32(1.0))
            if v >= hs[0]:
                j = col0 + c
                if v == hs[0] and j > hi[0]:
                    continue
                if use_mask and not mask[j]:
                    continue
                if exclude_self and j == q:
                    continue
                _heap_replace_root(hs, hi, v, j)


@njit(parallel=True, cache=True)
def _sort_heaps(heap_s, heap_i, out_s, out_i, no_index):
    """Heaps -> rows sorted best first (score desc, index asc); empty slots -> -inf, -1."""
    nq, k = heap_s.shape
    for q in prange(nq):
        hs = heap_s[q]
        hi = heap_i[q]
        order = np.argsort(hi, kind="mergesort")
        neg = np.empty(k, np.float32)
        for t in range(k):
            neg[t] = -hs[order[t]]
        order2 = np.argsort(neg, kind="mergesort")
        for t in range(k):
            p = order[order2[t]]
            if hi[p] == no_index:
                out_s[q, t] = -np.inf
                out_i[q, t] = -1
            else:
                out_s[q, t] = hs[p]
                out_i[q, t] = hi[p]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _count_pairs(s, threshold, upper_from, counts):
    """counts[r] = number of entries of row r >= threshold at columns >= upper_from[r]."""
    n, m = s.shape
    for r in prange(n):
        c = 0
        for j in range(upper_from[r], m):
            if s[r, j] >= threshold:
                c += 1
        counts[r] = c


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _fill_pairs(s, threshold, upper_from, offsets, row0, col0, out_i, out_j, out_s):
    n, m = s.shape
    for r in prange(n):
        p = offsets[r]
        if offsets[r + 1] == p:
            continue
        for j in range(upper_from[r], m):
            v = s[r, j]
            if v >= threshold:
                out_i[p] = row0 + r
                out_j[p] = col0 + j
                out_s[p] = v
                p += 1


# ----------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------


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
        src = np.ascontiguousarray(x, dtype=np.float32) if x.dtype != np.float64 else x
        _normalize_rows(np.ascontiguousarray(src), out)
    return out


def _similarity(a, b, cosine: bool) -> np.ndarray:
    a32 = _as_float32("a", a)
    if b is None:
        n = a32.shape[0]
        s = np.empty((n, n), np.float32)
        if n:
            _gemm_nt(a32, a32, s)
            if cosine:
                inv = _inv_norms(a32)
                _scale_clip(s, inv, inv)
            _mirror_upper(s)
        return s
    b32 = _as_float32("b", b)
    _check_same_dim("a", a32, "b", b32)
    s = np.empty((a32.shape[0], b32.shape[0]), np.float32)
    if s.size:
        _gemm_nt(a32, b32, s)
        if cosine:
            _scale_clip(s, _inv_norms(a32), _inv_norms(b32))
    return s


def cosine_similarity(a, b=None):
    """Dense cosine similarity matrix, float32, clipped to [-1, 1].

    a: (n, d); b: (m, d) or None. Returns (n, m), or with ``b=None`` the (n, n)
    self-similarity matrix, exactly symmetric (one triangle computed, then mirrored).
    A zero row has similarity 0 with everything. Memory: the (n, m) result; use
    :func:`top_k` or :func:`similar_pairs` when that is too large.
    """
    return _similarity(a, b, cosine=True)


def dot_similarity(a, b=None):
    """Dense dot-product matrix, float32: ``a @ b.T`` (or ``a @ a.T``, exactly symmetric).

    >>> dot_similarity(np.array([[1.0, 2.0]]), np.array([[3.0, 4.0], [1.0, 0.0]]))
    array([[11.,  1.]], dtype=float32)
    """
    return _similarity(a, b, cosine=False)


def top_k(queries, corpus, k, *, metric="cosine", exclude_self=False, mask=None, _block_size=None):
    """Exact k nearest corpus rows of every query, best first.

    queries: (q, d) float array. corpus: (N, d) float32, float16 or float64 array, or a
    ``numpy.memmap``; it is read block by block (float16/float64 blocks upcast/downcast to
    float32), so memory beyond inputs and outputs stays a few blocks whatever N is.
    k: number of neighbours, >= 1. When ``k > N`` only N columns are returned.
    metric: "cosine" (default) or "dot".
    exclude_self: never match query row i with corpus row i (queries and corpus are the
    same set).
    mask: optional bool array (N,); rows where it is False are never returned.

    Returns ``(scores, indices)``: float32 and int64 arrays of shape (q, min(k, N)), sorted
    by score descending, ties broken by the lower index. Slots for which no eligible corpus
    row exists (because of ``mask`` or ``exclude_self``) hold score ``-inf`` and index -1.
    The result is identical for every block size and thread count.
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
    if use_mask:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise InvalidInputTypeError(f"mask must be a bool array, got dtype {mask.dtype}")
        if mask.shape != (n,):
            raise InvalidInputError(f"mask must have shape ({n},), got {mask.shape}")
        mask = np.ascontiguousarray(mask)
    else:
        mask = np.ones(1, np.bool_)
    kk = int(min(k, n))
    nq = q32.shape[0]
    cosine = metric == "cosine"
    cblock = _check_block(_block_size, _TOPK_CORPUS_BLOCK)
    qblock = _check_block(_block_size, _TOPK_QUERY_BLOCK)
    out_s = np.empty((nq, kk), np.float32)
    out_i = np.empty((nq, kk), np.int64)
    if nq == 0 or kk == 0:
        return out_s, out_i
    inv_q = _inv_norms(q32) if cosine else np.ones(nq, np.float32)
    heap_s = np.full((nq, kk), -np.inf, np.float32)
    heap_i = np.full((nq, kk), _NO_INDEX, np.int64)
    tile = np.empty(min(qblock, nq) * min(cblock, n), np.float32)
    dummy = np.ones(1, np.float32)
    for c0 in range(0, n, cblock):
        block = corpus[c0 : c0 + cblock]
        if block.dtype != np.float32 or not block.flags.c_contiguous:
            block = np.ascontiguousarray(block, dtype=np.float32)
        _check_finite("corpus", block)  # names the block's first bad row below
        inv_c = _inv_norms(block) if cosine else dummy
        for r0 in range(0, nq, qblock):
            qb = q32[r0 : r0 + qblock]
            s = tile[: qb.shape[0] * block.shape[0]].reshape(qb.shape[0], block.shape[0])
            _gemm_nt(qb, block, s)
            _select_block(
                s,
                c0,
                inv_q[r0 : r0 + qblock],
                inv_c,
                cosine,
                mask,
                use_mask,
                r0,
                bool(exclude_self),
                heap_s,
                heap_i,
            )
    _sort_heaps(heap_s, heap_i, out_s, out_i, _NO_INDEX)
    return out_s, out_i


def similar_pairs(x, threshold, *, y=None, metric="cosine", _block_size=None):
    """Every pair of rows with score >= threshold, exactly once, sorted by (i, j).

    x: (n, d) float array. y: optional (m, d) array; without it pairs within x with
    i < j are returned, with it every (i, j) with i a row of x and j a row of y.
    threshold: a float; for cosine it must lie in [-1, 1].
    Returns ``(i, j, scores)``: int64, int64, float32 arrays of equal length. Memory is
    proportional to the output plus one tile of scores; only the upper triangle is
    computed when y is None.
    """
    metric = _check_metric(metric)
    try:
        threshold = float(threshold)
    except (TypeError, ValueError) as exc:
        raise InvalidInputTypeError(
            f"threshold must be a number, got {type(threshold).__name__}"
        ) from exc
    if not np.isfinite(threshold):
        raise InvalidInputError(f"threshold must be finite, got {threshold}")
    if metric == "cosine" and not -1.0 <= threshold <= 1.0:
        raise InvalidInputError(f"threshold must be in [-1, 1] for cosine, got {threshold}")
    x32 = _as_float32("x", x)
    same = y is None
    y32 = x32 if same else _as_float32("y", y)
    _check_same_dim("x", x32, "y", y32)
    cosine = metric == "cosine"
    block = _check_block(_block_size, _PAIRS_BLOCK)
    inv_x = _inv_norms(x32) if cosine else None
    inv_y = (inv_x if same else _inv_norms(y32)) if cosine else None
    thr = np.float32(threshold)
    n, m = x32.shape[0], y32.shape[0]
    tile = np.empty(min(block, n) * min(block, m) if n and m else 0, np.float32)
    parts_i, parts_j, parts_s = [], [], []
    for r0 in range(0, n, block):
        xb = x32[r0 : r0 + block]
        nr = xb.shape[0]
        for c0 in range(r0 if same else 0, m, block):
            yb = y32[c0 : c0 + block]
            s = tile[: nr * yb.shape[0]].reshape(nr, yb.shape[0])
            _gemm_nt(xb, yb, s)
            if cosine:
                _scale_clip(s, inv_x[r0 : r0 + nr], inv_y[c0 : c0 + yb.shape[0]])
            if same and c0 == r0:
                upper_from = np.arange(1, nr + 1, dtype=np.int64)
            else:
                upper_from = np.zeros(nr, np.int64)
            counts = np.empty(nr, np.int64)
            _count_pairs(s, thr, upper_from, counts)
            offsets = np.zeros(nr + 1, np.int64)
            np.cumsum(counts, out=offsets[1:])
            total = int(offsets[-1])
            if total:
                oi = np.empty(total, np.int64)
                oj = np.empty(total, np.int64)
                os_ = np.empty(total, np.float32)
                _fill_pairs(s, thr, upper_from, offsets, r0, c0, oi, oj, os_)
                parts_i.append(oi)
                parts_j.append(oj)
                parts_s.append(os_)
    if not parts_i:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    i = np.concatenate(parts_i)
    j = np.concatenate(parts_j)
    sc = np.concatenate(parts_s)
    order = np.lexsort((j, i))
    return i[order], j[order], sc[order]
