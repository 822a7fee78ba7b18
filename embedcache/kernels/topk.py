"""Exact top-k: the k best corpus rows of every query."""

from __future__ import annotations

import numba
import numpy as np

from embedcache import _config
from embedcache._validation import as_float32, as_matrix, check_k, check_metric, check_same_columns
from embedcache.errors import InvalidInputError, InvalidInputTypeError
from embedcache.kernels._core import (
    _NO_INDEX,
    _UNIT,
    _blas_margin,
    _filter_scale,
    _gemm_nt,
    _select_tile,
    _sort_heaps,
    _stats,
    _stream,
)
from embedcache.kernels.similarity import normalize

__all__ = ["top_k"]

# a corpus that is not C-contiguous float32 is converted block by block, in blocks of at most
# this many rows
_CONVERT_BLOCK = 8192


def _check_mask(mask, n: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise InvalidInputTypeError(f"mask must be a bool array, got dtype {mask.dtype}")
    if mask.shape != (n,):
        raise InvalidInputError(f"mask must have shape ({n},), got {mask.shape}")
    return np.ascontiguousarray(mask)


def top_k(queries, corpus, k, *, metric="cosine", exclude_self=False, mask=None):
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
    metric = check_metric(metric)
    q32 = as_float32(queries, "queries")
    corpus = as_matrix(corpus, "corpus")
    check_same_columns(q32, "queries", corpus, "corpus")
    k = check_k(k)
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
        nq <= _config.STREAM_MAX_QUERIES
        and base.dtype in (np.float32, np.float16)
        and base.flags.c_contiguous
    ):
        # one chunk per thread, or chunks of TOPK_STREAM_CHUNK rows when that is set
        rows = _config.TOPK_STREAM_CHUNK
        chunks = -(-n // rows) if rows > 0 else numba.get_num_threads()
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
    largest = _config.TOPK_MAX_BLOCK if direct else min(_config.TOPK_MAX_BLOCK, _CONVERT_BLOCK)
    cblock = max(_config.TOPK_CORPUS_BLOCK, min((1 << 23) // nq, largest))
    qblock = _config.TOPK_QUERY_BLOCK
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

