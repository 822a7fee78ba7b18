"""The workflows over a store with ``client=``: the same answers, computed by the engine.

The engine (:mod:`embedcache.engine`) lists the pairs of live rows in tiles, on a Dask
cluster or in this process, each pair flagged when its two rows are exact copies. From them
this module rebuilds what one machine builds from the vectors (:mod:`._prepare`: distinct
rows, each item's row, the first item of each row; :class:`~.pairs._Pairs`), so grouping,
keeping and explaining run unchanged on the client, without the vectors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embedcache import kernels
from embedcache.errors import InvalidInputError, InvalidInputTypeError
from embedcache.store import VectorStore
from embedcache.workflows._prepare import _Prepared, _progress_bar
from embedcache.workflows.pairs import _Pairs

__all__ = ["cluster_knn", "cluster_pairs", "exact_only", "store_items"]


class _StoreItems(_Prepared):
    """The live rows of a store as items, without their vectors (read only where needed)."""

    store: Any = None
    view: Any = None

    def scores(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        from embedcache.store._query import gather

        deleted = self.view.deleted  # live index -> store row: skip the deleted rows before it
        before = deleted - np.arange(len(deleted))

        def rows(items: np.ndarray) -> np.ndarray:
            return items + np.searchsorted(before, items, side="right")

        x = np.concatenate([gather(self.view, rows(np.asarray(i))), gather(self.view, rows(np.asarray(j)))])
        m = len(i)
        return kernels.pair_scores(x, np.arange(m), np.arange(m, 2 * m))


def exact_only(method: str) -> None:
    """Refuse ``method="partitioned"``: the cluster runs the exact method (``"auto"`` means exact)."""
    if method == "partitioned":
        raise InvalidInputError(
            "method='partitioned' does not run on a cluster yet; use method='exact' or 'auto' with client="
        )


def store_items(items: Any, *, against: Any = None, method: str = "exact") -> _StoreItems:
    """The items of a job with ``client=``: the live rows of a store, in the order of ``ids()``.
    The cluster runs the exact method (``"auto"`` means exact there)."""
    from embedcache.engine._jobs import store_state

    exact_only(method)
    if not isinstance(items, VectorStore):
        raise InvalidInputTypeError(
            "client= runs jobs over a VectorStore, whose segment files the workers read; got "
            f"{type(items).__name__} (run without client=, or add the vectors to a store first)"
        )
    if against is not None:
        raise InvalidInputError("client= does not take against= yet; run without client= for a reference set")
    view, rows = store_state(items, ids=True)
    key = view.text_key
    texts = [m.get(key) if isinstance(m, dict) else None for _, m in rows]
    texts_ok = bool(texts) and all(isinstance(t, str) for t in texts)
    n = len(rows)
    p = _StoreItems(np.zeros((0, view.dim or 1), np.float32), np.arange(n, dtype=np.int64),
                    np.arange(n, dtype=np.int64), texts if texts_ok else None, [i for i, _ in rows])
    p.store, p.view = items, view
    return p


def cluster_pairs(p: _StoreItems, threshold: float, client: Any, progress: bool | None) -> _Pairs:
    """The pairs of ``p`` at or above ``threshold``, found by the engine of ``client``; sets
    ``p.inverse`` and ``p.first`` (exact copies) as :func:`._prepare._prepare` would."""
    from embedcache.engine import engine_for
    from embedcache.engine._jobs import pair_job

    engine = engine_for(client)
    n = p.n
    i, j, s, copy = pair_job(p.store, threshold, engine, view=p.view,
                             progress=lambda total: _progress_bar(progress, total, "pairs", "tasks"))
    p.inverse, p.first = _copy_classes(n, i[copy], j[copy])
    inv = p.inverse
    copy_score = np.full(len(p.first), np.nan, np.float32)
    copy_score[inv[i[copy]]] = s[copy]
    other = ~copy
    ri, rj, rs = inv[i[other]], inv[j[other]], s[other]
    ui, uj = np.minimum(ri, rj), np.maximum(ri, rj)
    # pairs of items expand pairs of distinct rows: keep each pair of rows once
    _, pos = np.unique(ui * len(p.first) + uj, return_index=True)
    ui, uj, us = ui[pos], uj[pos], rs[pos]
    order = np.lexsort((uj, ui, -us.astype(np.float64)))
    return _Pairs(inv, p.first, ui[order], uj[order], us[order], copy_score)


def _copy_classes(n: int, ci: np.ndarray, cj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(inverse, first)`` of ``n`` items joined by the copy pairs ``(ci, cj)``: distinct
    rows numbered in the order of their first item, as ``_prepare`` numbers them."""
    if not len(ci):
        return np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(ci), bool), (ci, cj)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    rep = np.full(labels.max() + 1, n, np.int64)
    np.minimum.at(rep, labels, np.arange(n, dtype=np.int64))
    first = np.unique(rep)  # the first item of each class, in item order
    return np.searchsorted(first, rep[labels]).astype(np.int64), first.astype(np.int64)


def cluster_knn(store: Any, k: int, metric: str, client: Any, progress: bool | None):
    """``(n, rows, cols, vals)`` of the k-nearest-neighbour lists of a store's live rows,
    computed by the engine of ``client``; the same lists as one machine's."""
    from embedcache.engine import engine_for
    from embedcache.engine._jobs import knn_job, store_state
    from embedcache.workflows.graph import _drop_self

    if not isinstance(store, VectorStore):
        raise InvalidInputTypeError(
            f"client= runs jobs over a VectorStore, whose segment files the workers read; got {type(store).__name__}"
        )
    engine = engine_for(client)
    view, _ = store_state(store)
    n = view.live
    if n < 2:
        e = np.empty(0, np.int64)
        return n, e, e.copy(), np.empty(0, np.float32)
    s, idx = knn_job(store, k + 1, metric, engine, view=view,
                     progress=lambda total: _progress_bar(progress, total, "knn", "tasks"))
    s, idx = _drop_self(s, idx, k, 0)
    valid = idx >= 0
    return n, np.nonzero(valid)[0].astype(np.int64), idx[valid].astype(np.int64), s[valid].astype(np.float32)
