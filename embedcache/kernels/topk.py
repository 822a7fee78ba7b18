"""Exact top-k: the k best corpus rows of every query."""

from __future__ import annotations

import contextlib
import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from embedcache import _config
from embedcache._validation import as_float32, as_matrix, check_finite, check_k, check_metric, check_same_columns
from embedcache.errors import InvalidInputError, InvalidInputTypeError
from embedcache.kernels._core import (
    _NO_INDEX,
    _UNIT,
    _blas_margin,
    _filter_scale,
    _gemm_nt,
    _row_stats,
    _row_stats_chunk,
    _select_cols,
    _select_rows,
    _select_tile,
    _select_tile_cols,
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


def _corpus_block(n: int, rows: int, direct: bool) -> int:
    """Corpus rows per block for score tiles of ``rows`` query rows.

    The tile (rows x block float32) is sized to stay in the last-level cache between the
    BLAS call that writes it and the scan that reads it: few queries get long tiles (each
    block costs a hand-over between the BLAS and numba threads), many get short ones. The
    corpus is then cut into blocks of equal size, so the last one is not a sliver.
    """
    largest = _config.TOPK_MAX_BLOCK if direct else min(_config.TOPK_MAX_BLOCK, _CONVERT_BLOCK)
    block = max(_config.TOPK_CORPUS_BLOCK, min(_config.TOPK_TILE_BYTES // (4 * rows), largest))
    if block >= n:
        return max(1, n)
    count = -(-n // block)
    return -(-n // count)


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
    heap per query, rescoring exactly the few candidates near its current k-th best. Each
    of numba's threads takes corpus blocks in turn and runs both steps on them (BLAS limited
    to one thread for the duration of the call, through threadpoolctl), keeping heaps of
    its own that are merged at the end.
    """
    metric = check_metric(metric)
    q32 = as_float32(queries, "queries")
    corpus = as_matrix(corpus, "corpus")
    if corpus.dtype.kind == "f" and corpus.dtype.itemsize > 4:  # values float32 cannot hold, named
        check_finite(corpus, "corpus")
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

    qblock = _config.TOPK_QUERY_BLOCK
    cblock = _corpus_block(n, min(nq, qblock), base.dtype == np.float32 and base.flags.c_contiguous)
    margin = _blas_margin(q32.shape[1])
    qf = normalize(q32) if cosine else q32  # BLAS (filter) input; exact scores use raw rows
    fold = _BlockFolder(
        q32, qf, inv_q, norm_q, margin, base, cblock, qblock, cosine, mask, use_mask, exclude_self
    )
    starts = range(0, n, cblock)
    workers = min(numba.get_num_threads(), len(starts))
    if workers <= 1:
        # one block (or one thread): BLAS and the scan each use every thread in turn
        heap_s = np.full((1, nq, kk), -np.inf, np.float32)
        heap_i = np.full((1, nq, kk), _NO_INDEX, np.int64)
        for c0 in starts:
            bad = fold(c0, heap_s[0], heap_i[0], parallel=True)
            if bad >= 0:
                _raise_bad(bad)
    else:
        heap_s, heap_i = _fold_threads(fold, starts, workers, nq, kk)
    workers = heap_s.shape[0]
    heap_s = np.ascontiguousarray(heap_s.transpose(1, 0, 2)).reshape(nq, workers * kk)
    heap_i = np.ascontiguousarray(heap_i.transpose(1, 0, 2)).reshape(nq, workers * kk)
    _sort_heaps(heap_s, heap_i, out_s, out_i, _NO_INDEX)
    return out_s, out_i


def _raise_bad(row: int) -> None:
    raise InvalidInputError(f"corpus must be finite, got NaN or infinity in row {row}")


class _BlockFolder:
    """Folds one corpus block into a set of per-query heaps: BLAS score tiles, then the scan
    that rescores exactly the candidates near each query's current k-th best."""

    def __init__(
        self, q32, qf, inv_q, norm_q, margin, base, cblock, qblock, cosine, mask, use_mask,
        exclude_self,
    ):
        self.q32, self.qf, self.inv_q, self.norm_q = q32, qf, inv_q, norm_q
        self.max_q = float(norm_q.max())
        self.margin, self.base, self.cblock, self.qblock = margin, base, cblock, qblock
        self.cosine, self.mask, self.use_mask, self.exclude_self = cosine, mask, use_mask, exclude_self
        self.margin_q = np.full(q32.shape[0], margin) if cosine else None

    def tile(self) -> np.ndarray:
        rows = min(self.qblock, self.q32.shape[0])
        return np.empty(rows * min(self.cblock, self.base.shape[0]), np.float32)

    def __call__(self, c0, heap_s, heap_i, *, parallel, tile=None):
        """Fold rows c0.. of the corpus; returns the first row holding NaN/inf, or -1 (then
        nothing is folded). ``parallel``: the scan and the row statistics use all numba
        threads (else the calling thread only, without the GIL)."""
        block = self.base[c0 : c0 + self.cblock]
        if block.dtype != np.float32 or not block.flags.c_contiguous:
            block = np.ascontiguousarray(block, dtype=np.float32)
        m = block.shape[0]
        inv_c = np.empty(m, np.float64)
        norm_c = np.empty(m, np.float64)
        if parallel:
            bad = _row_stats(block, inv_c, norm_c, max(1, min(numba.get_num_threads(), m)))
        else:
            bad = _row_stats_chunk(block, inv_c, norm_c)
        if bad >= 0:
            return c0 + bad
        cosine = self.cosine
        # cosine queries go to BLAS normalized
        filt_c = _filter_scale(inv_c, norm_c, 1.0 if cosine else self.max_q, cosine)
        margin_q = self.margin_q
        if not cosine:
            margin_q = self.margin * self.norm_q * norm_c.max() + 1e-37
        tile = self.tile() if tile is None else tile
        nq = self.q32.shape[0]
        for r0 in range(0, nq, self.qblock):
            qb = self.qf[r0 : r0 + self.qblock]
            rows = qb.shape[0]
            args = (
                self.q32, self.inv_q, margin_q, 4 * _UNIT, block, inv_c, filt_c, c0, r0,
                cosine, self.mask, self.use_mask, self.exclude_self, heap_s, heap_i,
            )
            if _config.TOPK_CORPUS_MAJOR:
                # corpus rows x query rows: BLAS is a few per cent faster in this orientation
                s = tile[: rows * m].reshape(m, rows)
                _gemm_nt(block, qb, s)
                if parallel:
                    _select_tile_cols(s, max(1, min(numba.get_num_threads(), rows)), *args)
                else:
                    _select_cols(s, 0, rows, *args)
            else:
                s = tile[: rows * m].reshape(rows, m)
                _gemm_nt(qb, block, s)
                (_select_tile if parallel else _select_rows)(s, *args)
        return -1


def _fold_threads(fold, starts, workers, nq, kk):
    """Fold corpus blocks on ``workers`` threads, each taking the next block when it is done
    with one and running BLAS (single-threaded) and the scan on it: no hand-over between
    thread pools per block, and a thread slowed by other work on the machine simply takes
    fewer blocks. Each thread keeps its own heaps; returns them, (workers, nq, kk)."""
    heap_s = np.full((workers, nq, kk), -np.inf, np.float32)
    heap_i = np.full((workers, nq, kk), _NO_INDEX, np.int64)
    pending = iter(starts)
    lock = threading.Lock()
    bad_rows = []

    def work(t):
        tile = fold.tile()
        while True:
            with lock:
                c0 = None if bad_rows else next(pending, None)
            if c0 is None:
                return
            bad = fold(c0, heap_s[t], heap_i[t], parallel=False, tile=tile)
            if bad >= 0:
                with lock:
                    bad_rows.append(bad)

    with _single_threaded_blas(), ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(work, t) for t in range(workers)]:
            future.result()
    if bad_rows:
        # blocks are taken in order, and every block taken is checked: the smallest bad row
        # found is the first of the corpus
        _raise_bad(min(bad_rows))
    return heap_s, heap_i


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter = None


@contextlib.contextmanager
def _single_threaded_blas():
    """BLAS runs on the calling thread only while any top_k folds blocks on threads of its
    own (the first to enter sets the limit, the last to leave restores the old one)."""
    global _blas_users, _blas_limiter
    with _blas_lock:
        if _blas_users == 0:
            _blas_limiter = _blas_controller().limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


@functools.lru_cache(maxsize=1)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()
