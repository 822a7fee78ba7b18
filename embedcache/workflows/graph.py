"""The exact k-nearest-neighbour graph: :func:`knn_graph`."""

from __future__ import annotations

from typing import Any

import numpy as np

from embedcache import _config, kernels
from embedcache._validation import check_choice, check_int, check_k, check_metric
from embedcache.index import check_recall, partitioned_knn
from embedcache.errors import InvalidInputError
from embedcache.store import VectorStore
from embedcache.workflows._prepare import METHODS, _method, _progress_bar, _vectors

__all__ = ["knn_graph"]

#: what the graph's entries hold
_WEIGHTS = ("similarity", "distance")


def knn_graph(
    x: Any,
    k: int,
    *,
    metric: str = "cosine",
    weights: str = "similarity",
    symmetric: bool = True,
    progress: bool | None = None,
    client: Any = None,
    method: str = "auto",
    recall: float = 0.99,
    seed: int = 0,
    return_recall: bool = False,
):
    """The exact k-nearest-neighbour graph as a ``scipy.sparse.csr_matrix`` of shape (n, n).

    x: array of shape (n, d) or a VectorStore. Row i holds the k most similar other rows
    (no self loops). weights="similarity" stores the score; weights="distance" stores
    ``1 - cosine`` (clipped at 0, kept as explicit entries even when 0) with each row
    ordered by increasing distance, the form scikit-learn's ``metric="precomputed"``
    (DBSCAN, HDBSCAN, ``NearestNeighbors`` queried with ``kneighbors(G)``: without ``G`` it
    takes each row's first entry for the row itself; spectral embedding) expects. symmetric=True
    adds j -> i for every i -> j (the graph then has k or more entries per row).
    client: a ``distributed.Client`` (x a VectorStore): blocks of rows run as tasks on its
    Dask cluster, whose workers read the store's files (see :mod:`embedcache.engine`); the
    same graph (and, partitioned, the same recall) as without it.

    >>> import numpy as np
    >>> x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    >>> G = knn_graph(x, 1, progress=False)
    >>> G.shape, G.nnz, G[0].indices.tolist()
    ((4, 4), 4, [1])

    method: ``"exact"``; ``"partitioned"`` searches each row's own cell and the cells of a
    partition index nearest to it (:mod:`embedcache.index`), probing enough cells for
    ``recall`` (the share of the true k nearest neighbours found, recall@k), calibrated and
    then measured on sampled rows against the exact graph; ``"auto"`` (default) is exact up to
    ``_config.INDEX_AUTO_ROWS`` rows. Every score is exact; a partitioned row may hold a
    farther neighbour in place of one it missed. metric="dot" is always exact. The graph
    stays a plain CSR matrix; ``return_recall=True`` returns ``(graph, recall)`` instead,
    ``recall`` the :class:`embedcache.index.Recall` measured (None for an exact graph).
    """
    k = check_k(k)
    recall = check_recall(recall)
    check_int("seed", seed, 0)
    check_choice("method", method, METHODS)
    metric = check_metric(metric)
    weights = check_choice("weights", weights, _WEIGHTS)
    if weights == "distance" and metric != "cosine":
        raise InvalidInputError("weights='distance' needs metric='cosine' (distance = 1 - cosine)")
    if client is not None:
        from embedcache.workflows._cluster import cluster_knn

        n, rows, cols, vals, rec = cluster_knn(x, k, metric, client, progress, method=method, recall=recall,
                                               seed=seed)
        graph = _graph(n, rows, cols, vals, symmetric=symmetric, weights=weights)
        return (graph, rec) if return_recall else graph
    arr = _vectors(x.vectors() if isinstance(x, VectorStore) else x, "x")  # one read
    n = len(arr)
    chunk = _config.CHUNK_ROWS
    rows_l, cols_l, vals_l = [], [], []
    method = _method(method, n) if metric == "cosine" else "exact"
    rec = None
    if method == "partitioned" and n > 1:
        with _progress_bar(progress, 0, "knn", unit="comparisons") as bar:
            s, idx, rec = partitioned_knn(arr, k, recall=recall, seed=seed, bar=bar)
        valid = idx >= 0
        rows_l.append(np.nonzero(valid)[0])
        cols_l.append(idx[valid])
        vals_l.append(s[valid])
    elif n > 1:
        with _progress_bar(progress if n > chunk else False, n, "knn") as bar:
            for a in range(0, n, chunk):
                q = arr[a:a + chunk]
                s, idx = _top_k_offset(q, arr, k, metric, a)
                valid = idx >= 0
                rows_l.append(np.nonzero(valid)[0] + a)
                cols_l.append(idx[valid])
                vals_l.append(s[valid])
                bar.update(len(q))
    rows = np.concatenate(rows_l).astype(np.int64) if rows_l else np.empty(0, dtype=np.int64)
    cols = np.concatenate(cols_l).astype(np.int64) if cols_l else np.empty(0, dtype=np.int64)
    vals = np.concatenate(vals_l).astype(np.float32) if vals_l else np.empty(0, dtype=np.float32)
    graph = _graph(n, rows, cols, vals, symmetric=symmetric, weights=weights)
    return (graph, rec) if return_recall else graph


def _graph(n: int, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, *, symmetric: bool, weights: str):
    """The CSR graph of the neighbour lists ``rows -> cols`` (scores ``vals``)."""
    from scipy.sparse import csr_matrix

    if symmetric and len(rows):
        rows, cols, vals = (np.concatenate([rows, cols]), np.concatenate([cols, rows]),
                            np.concatenate([vals, vals]))
        order = np.lexsort((-vals.astype(np.float64), cols, rows))
        rows, cols, vals = rows[order], cols[order], vals[order]
        first = np.r_[True, (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])]
        rows, cols, vals = rows[first], cols[first], vals[first]  # the higher score of i->j, j->i
    if weights == "distance":
        vals = np.maximum(1.0 - vals, 0.0).astype(np.float32)
        order = np.lexsort((cols, vals, rows))
    else:
        order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    graph = csr_matrix((vals, cols, indptr), shape=(n, n))
    graph.has_sorted_indices = weights == "similarity"
    return graph


def _top_k_offset(q: np.ndarray, corpus: np.ndarray, k: int, metric: str, offset: int):
    """top_k of a block of rows of ``corpus`` against all of it, never matching a row to itself."""
    if offset == 0 and len(q) == len(corpus):
        return kernels.top_k(q, corpus, k, metric=metric, exclude_self=True)
    s, idx = kernels.top_k(q, corpus, k + 1, metric=metric)
    return _drop_self(s, idx, k, offset)


def _drop_self(s: np.ndarray, idx: np.ndarray, k: int, offset: int):
    """The k best of the k + 1 best ``(s, idx)`` of rows ``offset ..`` that are not the row itself."""
    own = idx == (np.arange(len(s))[:, None] + offset)
    # drop the row itself where it appears (or the last slot if it did not)
    drop = np.where(own.any(axis=1), own.argmax(axis=1), s.shape[1] - 1)
    keep = np.ones_like(own)
    keep[np.arange(len(s)), drop] = False
    kk = min(k, s.shape[1] - 1)
    return s[keep].reshape(len(s), -1)[:, :kk], idx[keep].reshape(len(s), -1)[:, :kk]
