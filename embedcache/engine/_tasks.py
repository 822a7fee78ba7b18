"""What one task computes, on a worker or in this process: blocks in, small arrays out.

Each function takes :class:`~embedcache.engine._plan.Block` descriptions (never vectors),
reads them read-only, calls the kernels and returns indices local to its blocks (the client
adds the offsets). Scores come from the kernels unchanged, so they are the scores of one
machine bit for bit.
"""

from __future__ import annotations

import os

import numpy as np

from embedcache import kernels
from embedcache.engine._plan import Block, Picks, read, read_picks
from embedcache.index._cells import assign, probe_order
from embedcache.index._copies import row_digests
from embedcache.index._partition import pairs_of_cell

__all__ = ["band_pairs", "cell_pairs", "cell_topk", "knn_rows", "merge_top", "assign_block", "assign_picks",
           "nearest_block", "pair_tile", "pairs_block", "pivot_block", "row_keys", "search_block", "top_against"]

#: pairs compared for byte equality at a time (bounds the memory of the copy check)
_COPY_CHUNK = 65536


def _threads() -> None:
    """On a Dask worker, run the kernels on as many numba threads as the worker's
    ``OMP_NUM_THREADS`` (Dask sets it to 1 in each worker process, one core per worker
    thread), so that workers sharing a machine do not oversubscribe it."""
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return
    import numba

    want = os.environ.get("OMP_NUM_THREADS", "")
    n = int(want) if want.isdigit() and int(want) > 0 else numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


def _copies(xa: np.ndarray, xb: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """For each pair, whether its rows are exact copies (equal bytes, not all zero)."""
    out = np.empty(len(i), bool)
    u = np.dtype(f"u{xa.dtype.itemsize}")
    for a in range(0, len(i), _COPY_CHUNK):
        ra, rb = xa[i[a : a + _COPY_CHUNK]], xb[j[a : a + _COPY_CHUNK]]
        out[a : a + _COPY_CHUNK] = (ra.view(u) == rb.view(u)).all(axis=1) & ra.any(axis=1)
    return out


def pair_tile(a: Block, b: Block | None, threshold: float):
    """Cosine pairs >= threshold within ``a`` (b None: i < j) or between ``a`` and ``b``.

    Returns ``(i, j, scores, copy)``: indices local to ``a`` and ``b`` (``a`` again when b is
    None), float32 scores, and whether the two rows are exact copies."""
    _threads()
    xa = read(a)
    if b is None:
        xb = xa
        i, j, s = kernels.similar_pairs(xa, threshold)
    else:
        xb = read(b)
        i, j, s = kernels.similar_pairs(xa, threshold, y=xb)
    return i, j, s, _copies(xa, xb, i, j)


def merge_top(s1, i1, s2, i2, k: int):
    """The best ``k`` of two top lists per row, by score descending, then lower index; the
    index -1 (an empty slot, score -inf) sorts last."""
    s = np.concatenate((s1, s2), axis=1)
    i = np.concatenate((i1, i2), axis=1)
    key = np.where(i < 0, np.iinfo(np.int64).max, i)
    order = np.lexsort((key, -s.astype(np.float64)), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


def knn_rows(a: Block, corpus: list[Block], k: int, metric: str):
    """The ``k`` best rows of the job for each row of ``a``, as ``(scores, indices)`` (job
    indices, -1 where none), from ``corpus`` read one block at a time. The row itself is
    among them when it scores high enough: ask for one more and drop it."""
    _threads()
    q = read(a)
    top_s = np.full((a.count, 0), -np.inf, np.float32)
    top_i = np.full((a.count, 0), -1, np.int64)
    for c in corpus:
        s, idx = kernels.top_k(q, read(c), min(k, c.count), metric=metric)
        top_s, top_i = merge_top(top_s, top_i, s, np.where(idx >= 0, idx + c.first, -1), k)
    return top_s, top_i


def top_against(a: Block, k: int, metric: str, *, reference: np.ndarray):
    """The ``k`` best rows of ``reference`` for each row of ``a``: ``(scores, indices)``."""
    _threads()
    return kernels.top_k(read(a), reference, min(k, len(reference)), metric=metric)


def search_block(b: Block, k: int, metric: str, *, queries: np.ndarray):
    """Top ``k`` rows of ``b`` for each query: ``(scores, indices local to b)``."""
    _threads()
    return kernels.top_k(queries, read(b), min(k, b.count), metric=metric)


# ----------------------------------------------------------------------------- partitioned


def row_keys(b: Block):
    """For each row of ``b``: its digest and whether it is nonzero (the exact-copy classes of
    :mod:`embedcache.index._copies`), and its score with itself (what its copies score)."""
    _threads()
    x = read(b)
    digests, nonzero = row_digests(x)
    r = np.arange(len(x))
    return digests, nonzero, kernels.pair_scores(np.ascontiguousarray(x, np.float32), r, r)


def nearest_block(b: Block, probes: int, scores: bool = False, *, centroids: np.ndarray):
    """The cells each row of ``b`` probes (as :func:`embedcache.index._cells.probe_order`;
    ``scores``: and their scores)."""
    _threads()
    return probe_order(read(b), centroids, probes, scores=scores)


def assign_block(b: Block, *, centroids: np.ndarray):
    """The cell of each row of ``b`` (as :func:`embedcache.index._cells.assign`)."""
    _threads()
    return assign(read(b), centroids)


def assign_picks(p: Picks, *, centroids: np.ndarray):
    """The cell of each row of ``p`` (as :func:`embedcache.index._cells.assign`)."""
    _threads()
    return assign(read_picks(p), centroids)


def pairs_block(b: Block, threshold: float, *, queries: np.ndarray):
    """Pairs (query, row of ``b``) with cosine >= threshold: ``(i, j local to b, scores)``."""
    _threads()
    return kernels.similar_pairs(queries, threshold, y=read(b))


def pivot_block(b: Block, own: np.ndarray, *, centroids: np.ndarray):
    """Each row's cosine with its cell's centroid (:func:`embedcache.index._truth.pivot_cosines`;
    ``own``: the cell of each row of ``b``)."""
    from embedcache.index._truth import pivot_cosines

    _threads()
    return pivot_cosines(read(b), centroids, own)


def band_pairs(picks: Picks, need: np.ndarray, work: list, threshold: float, *, queries: np.ndarray):
    """Pairs of queries with rows, for the pieces of ``work`` (:meth:`embedcache.index._truth.
    Bands.plan`; job rows read by ``picks`` as the sorted ``need``): ``(i, j, scores)``, i a
    position in ``queries``, j the row's position in the source."""
    from embedcache.index._truth import piece_pairs

    _threads()
    x = read_picks(picks)
    parts = [(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))]
    for piece in work:
        parts.extend(piece_pairs(x[np.searchsorted(need, piece[0])], queries[piece[2]], piece, threshold))
    return tuple(np.concatenate(p) for p in zip(*parts))


def _cell_rows(picks: Picks, need: np.ndarray, cells: list[tuple[np.ndarray, np.ndarray]]):
    """The vectors of ``need`` (sorted row numbers of the job, read by ``picks``) and, for each
    cell ``(ids, q)``, the positions of its rows and of the rows probing it among them."""
    x = read_picks(picks)
    return x, [(np.searchsorted(need, ids), np.searchsorted(need, q)) for ids, q in cells]


def cell_pairs(picks: Picks, need: np.ndarray, cells: list[tuple[np.ndarray, np.ndarray]], threshold: float):
    """The pairs of a group of cells, each ``(ids, q)``: its rows and the rows probing it (job
    row numbers); computed by :func:`embedcache.index._partition.pairs_of_cell` as on one
    machine. Returns ``(i, j, scores)`` in job row numbers (a pair may come twice)."""
    _threads()
    x, where = _cell_rows(picks, need, cells)
    parts = [part for (ids, q), (pi, pq) in zip(cells, where)
             for part in pairs_of_cell(x[pi], ids, x[pq], q, threshold)]
    if not parts:
        e = np.empty(0, np.int64)
        return e, e.copy(), np.empty(0, np.float32)
    return tuple(np.concatenate(p) for p in zip(*parts))


def cell_topk(picks: Picks, need: np.ndarray, cells: list[tuple[np.ndarray, np.ndarray]], k: int):
    """The best ``k`` other rows, from a group of cells ``(ids, q)``, of every row of them or
    probing one of them, as :func:`embedcache.index._knn.rows_knn` folds them (each product
    serving both rows): ``(rows, scores, indices)``, -1 where none."""
    from embedcache.index._knn import fold_cell
    from embedcache.index._merge import NO_INDEX

    _threads()
    x, where = _cell_rows(picks, need, cells)
    heap_s = np.full((len(need), k), -np.inf, np.float32)
    heap_i = np.full((len(need), k), NO_INDEX, np.int64)
    for (ids, q), (pi, pq) in zip(cells, where):
        fold_cell(x[pq], pq, np.asarray(q, np.int64), x[pi], pi, np.asarray(ids, np.int64), heap_s, heap_i)
    heap_i[heap_i == NO_INDEX] = -1
    return need, heap_s, heap_i
