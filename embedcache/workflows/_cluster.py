"""The workflows over a store with ``client=``: the same answers, computed by the engine.

The engine (:mod:`embedcache.engine`) lists the pairs of live rows in tiles, on a Dask
cluster or in this process, each pair flagged when its two rows are exact copies. From them
this module rebuilds what one machine builds from the vectors (:mod:`._prepare`: distinct
rows, each item's row, the first item of each row; :class:`~.pairs._Pairs`), so grouping,
keeping and explaining run unchanged on the client, without the vectors.

The partitioned method runs :mod:`embedcache.index` itself, over a source of rows whose
scans are tasks (:class:`embedcache.engine._source.StoreSource`): first the exact-copy classes
(a digest of every row, on the workers), then the index and the search over the distinct
rows, as one machine runs them over its array of distinct rows; the same cells, probes,
recall and pairs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embedcache import _config, kernels
from embedcache.errors import InvalidInputTypeError
from embedcache.index import partitioned_knn, partitioned_pairs
from embedcache.index._copies import classes
from embedcache.index._partition import first_of_each
from embedcache.store import VectorStore
from embedcache.workflows._prepare import _method, _Prepared, _progress_bar
from embedcache.workflows.pairs import _Pairs

__all__ = ["cluster_against", "cluster_knn", "cluster_pairs", "store_items"]


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


def store_items(items: Any) -> _StoreItems:
    """The items of a job with ``client=``: the live rows of a store, in the order of ``ids()``."""
    from embedcache.engine._jobs import store_state

    if not isinstance(items, VectorStore):
        raise InvalidInputTypeError(
            "client= runs jobs over a VectorStore, whose segment files the workers read; got "
            f"{type(items).__name__} (run without client=, or add the vectors to a store first)"
        )
    view, rows = store_state(items, ids=True)
    key = view.text_key
    texts = [m.get(key) if isinstance(m, dict) else None for _, m in rows]
    texts_ok = bool(texts) and all(isinstance(t, str) for t in texts)
    n = len(rows)
    p = _StoreItems(np.zeros((0, view.dim or 1), np.float32), np.arange(n, dtype=np.int64),
                    np.arange(n, dtype=np.int64), texts if texts_ok else None, [i for i, _ in rows])
    p.store, p.view = items, view
    return p


def cluster_pairs(p: _StoreItems, threshold: float, client: Any, progress: bool | None, *,
                  method: str = "exact", recall: float = 0.99, seed: int = 0) -> _Pairs:
    """The pairs of ``p`` at or above ``threshold``, found by the engine of ``client``; sets
    ``p.inverse`` and ``p.first`` (exact copies) as :func:`._prepare._prepare` would.
    ``method``, ``recall``, ``seed``: as on one machine (``"auto"``: exact up to
    ``_config.INDEX_AUTO_ROWS`` distinct rows), with the same answer."""
    from embedcache.engine import engine_for
    from embedcache.engine._jobs import pair_job

    engine = engine_for(client)
    if method == "partitioned" or (method == "auto" and p.n > _config.INDEX_AUTO_ROWS):
        found = _partitioned_pairs(p, threshold, engine, progress, method, recall, seed)
        if found is not None:
            return found
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
    pos = first_of_each(ui * len(p.first) + uj)  # in (ui, uj) order
    ui, uj, us = ui[pos], uj[pos], rs[pos]
    order = np.argsort(-us.astype(np.float64), kind="stable")
    return _Pairs(inv, p.first, ui[order], uj[order], us[order], copy_score)


def cluster_against(p: _StoreItems, ref: _Prepared, client: Any, progress: bool | None):
    """For each distinct row of ``p`` (each live row of its store), the score and distinct row
    of ``ref`` of its best reference row, found by the engine of ``client``: what one machine
    finds with ``top_k(p.x, ref.x, 1)``. A reference store is read by the workers (every row:
    its exact copies are not collapsed, and ties go to the lower row, the first of a class of
    copies, as one machine's ``ref.first`` picks); a reference array is sent to them once."""
    from embedcache.engine import engine_for
    from embedcache.engine._jobs import against_job

    engine = engine_for(client)
    kw: dict[str, Any] = ({"ref_store": ref.store, "ref_view": ref.view} if isinstance(ref, _StoreItems)
                          else {"reference": ref.x})
    return against_job(p.store, p.view, engine, **kw,
                       progress=lambda total: _progress_bar(progress, total, "against", "tasks"))


def _partitioned_pairs(p: _StoreItems, threshold: float, engine: Any, progress: bool | None, method: str,
                       recall: float, seed: int) -> _Pairs | None:
    """The partitioned search of one machine (:func:`embedcache.index.partitioned_pairs` over
    the distinct rows), its scans run by ``engine``; None when ``method`` ("auto") means exact
    for the number of distinct rows."""
    from embedcache.engine import _tasks
    from embedcache.engine._jobs import _changed_store
    from embedcache.engine._source import StoreSource

    with _changed_store(p.store, p.view.generation):
        live = StoreSource(p.view, engine)
        keys = live._per_block(_tasks.row_keys, (), {})
        digests, nonzero, selfs = ((np.concatenate(a) for a in zip(*keys)) if keys else
                                   (np.zeros(0, "S16"), np.zeros(0, bool), np.zeros(0, np.float32)))
        inverse, first = classes(digests, nonzero)
        if _method(method, len(first)) == "exact":
            return None
        src = StoreSource(p.view, engine, _picked(live.rows[first]))
        with _progress_bar(progress, 0, "pairs", unit="comparisons") as bar:
            ui, uj, us, rec = partitioned_pairs(src, threshold, recall=recall, seed=seed, bar=bar)
    p.inverse, p.first = inverse, first
    rows = np.flatnonzero(np.bincount(inverse, minlength=len(first)) > 1)
    own = selfs[first[rows]]  # what copies of a row score with each other
    copy_score = np.full(len(first), np.nan, dtype=np.float32)
    linked = kernels.meets_threshold(own, threshold)
    copy_score[rows[linked]] = own[linked]
    return _Pairs(inverse, first, ui, uj, us, copy_score, "partitioned", rec)


def _picked(rows: np.ndarray):
    """``include(segment)`` of the sorted store rows ``rows``: a mask of the segment's rows."""
    def include(s):
        lo, hi = np.searchsorted(rows, [s.first_row, s.first_row + s.rows])
        mask = np.zeros(s.rows, bool)
        mask[rows[lo:hi] - s.first_row] = True
        return mask

    return include


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


def cluster_knn(store: Any, k: int, metric: str, client: Any, progress: bool | None, *,
                method: str = "exact", recall: float = 0.99, seed: int = 0):
    """``(n, rows, cols, vals, recall)`` of the k-nearest-neighbour lists of a store's live rows,
    computed by the engine of ``client``; the same lists (and recall) as one machine's."""
    from embedcache.engine import engine_for
    from embedcache.engine._jobs import _changed_store, knn_job, store_state
    from embedcache.engine._source import StoreSource
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
        return n, e, e.copy(), np.empty(0, np.float32), None
    if metric == "cosine" and _method(method, n) == "partitioned":
        with _changed_store(store, view.generation), _progress_bar(progress, 0, "knn", unit="comparisons") as bar:
            s, idx, rec = partitioned_knn(StoreSource(view, engine), k, recall=recall, seed=seed, bar=bar)
        valid = idx >= 0
        return n, np.nonzero(valid)[0].astype(np.int64), idx[valid].astype(np.int64), s[valid], rec
    s, idx = knn_job(store, k + 1, metric, engine, view=view,
                     progress=lambda total: _progress_bar(progress, total, "knn", "tasks"))
    s, idx = _drop_self(s, idx, k, 0)
    valid = idx >= 0
    return (n, np.nonzero(valid)[0].astype(np.int64), idx[valid].astype(np.int64),
            s[valid].astype(np.float32), None)
