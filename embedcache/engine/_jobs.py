"""The store's jobs as task lists, and their results merged on the client.

Each job reads one committed state of the store (its segment list and deleted rows) on the
client, cuts its live rows into blocks of ``_config.ENGINE_BLOCK_ROWS``, runs one task per
block or pair of blocks, and merges what comes back. Memory on the client is bounded by the
output (pairs, or k neighbours per row), never by the store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from embedcache import _config
from embedcache.engine import _tasks
from embedcache.engine._plan import Block, plan
from embedcache.engine._run import Dask, InProcess
from embedcache.errors import ClusterError, StoreError
from embedcache.kernels.pairs import pair_order

__all__ = ["against_job", "pair_job", "knn_job", "search_job", "store_state"]


@contextlib.contextmanager
def _changed_store(store: Any, generation: int) -> Iterator[None]:
    """A worker that cannot find a segment because a newer commit removed it (compact, or a
    merge of small segments) gets an error that says so, rather than blaming the filesystem."""
    try:
        yield
    except ClusterError as exc:
        if store.info()["generation"] != generation:
            raise StoreError(
                f"{store.path} changed during the job (a commit replaced segment files it was reading); "
                "run the job again"
            ) from exc
        raise


def store_state(store: Any, *, ids: bool = False):
    """``(view, [(id, metadata)] or None)`` of one committed state of ``store``."""
    from embedcache.store import _query

    with store._txn.reading() as view:
        rows = _query.live_rows(store._txn.current()) if ids else None
    return view, rows


def _blocks(view, include=None) -> list[Block]:
    return plan(view, max(1, int(_config.ENGINE_BLOCK_ROWS)), include)


def pair_tiles(blocks: list[Block]) -> list[tuple]:
    """Tiles of the upper triangle: each block with itself, and with every later block."""
    return [(a, b if b is not a else None) for n, a in enumerate(blocks) for b in blocks[n:]]


def _bar(progress: Callable | None, total: int):
    """``progress(total)``: a progress bar (a context manager with ``update(n)``), or nothing."""
    return progress(total) if progress is not None else contextlib.nullcontext(None)


def pair_job(store: Any, threshold: float, engine: InProcess | Dask,
             progress: Callable | None = None, view: Any = None):
    """Every pair of live rows (job indices, i < j) with cosine >= threshold, and whether its
    two rows are exact copies: ``(i, j, scores, copy)`` sorted by score descending, then i, j.
    ``progress(total)`` makes the bar that counts finished tasks."""
    if view is None:
        view, _ = store_state(store)
    blocks = _blocks(view)
    tiles = pair_tiles(blocks)
    parts: list[tuple] = []
    with _bar(progress, len(tiles)) as bar, _changed_store(store, view.generation):
        done = (lambda k: bar.update(1)) if bar is not None else None
        for k, (i, j, s, copy) in engine.run(_tasks.pair_tile, [t + (threshold,) for t in tiles], on_done=done):
            a, b = tiles[k]
            parts.append((i + a.first, j + (b or a).first, s, copy))
    if not parts:
        e = np.empty(0, np.int64)
        return e, e.copy(), np.empty(0, np.float32), np.empty(0, bool)
    i, j, s, copy = (np.concatenate(p) for p in zip(*parts))
    order = pair_order(i, j, s)
    return i[order].astype(np.int64), j[order].astype(np.int64), s[order], copy[order]


def knn_job(store: Any, k: int, metric: str, engine: InProcess | Dask,
            progress: Callable | None = None, view: Any = None):
    """For each live row (job order), its ``k`` best live rows, itself included when it
    scores high enough: ``(scores, indices)`` of shape (n, min(k, n)), -1 where none."""
    if view is None:
        view, _ = store_state(store)
    blocks = _blocks(view)
    n = view.live
    kk = min(k, n)
    scores = np.full((n, kk), -np.inf, np.float32)
    idx = np.full((n, kk), -1, np.int64)
    with _bar(progress, len(blocks)) as bar, _changed_store(store, view.generation):
        tasks = [(b, blocks, kk, metric) for b in blocks]
        done = (lambda t: bar.update(1)) if bar is not None else None
        for t, (s, i) in engine.run(_tasks.knn_rows, tasks, on_done=done):
            b = blocks[t]
            scores[b.first : b.first + b.count, : s.shape[1]] = s
            idx[b.first : b.first + b.count, : i.shape[1]] = i
    return scores, idx


def against_job(store: Any, view: Any, engine: InProcess | Dask, *, ref_store: Any = None, ref_view: Any = None,
                reference: np.ndarray | None = None, progress: Callable | None = None):
    """For each live row of ``store`` (job order), its best row of a reference set:
    ``(scores (n,) float32, indices (n,) int64)``, -inf and -1 where the reference is empty;
    ties go to the lower reference row. The reference is the live rows of ``ref_store`` (as
    of ``ref_view``), read by every task one block at a time, or ``reference``, an (m, d)
    array sent to every worker once. Tasks are the blocks of ``store``."""
    blocks = _blocks(view)
    n = view.live
    best_s = np.full(n, -np.inf, np.float32)
    best_i = np.full(n, -1, np.int64)
    if ref_view is not None:
        corpus = _blocks(ref_view)
        fn, tasks, shared = _tasks.knn_rows, [(b, corpus, 1, "cosine") for b in blocks], None
        empty = not corpus
    else:
        fn, tasks, shared = _tasks.top_against, [(b, 1, "cosine") for b in blocks], {"reference": reference}
        empty = reference is None or not len(reference)
    if empty or not blocks:
        return best_s, best_i
    with _bar(progress, len(blocks)) as bar, _changed_store(store, view.generation), \
            (_changed_store(ref_store, ref_view.generation) if ref_view is not None else contextlib.nullcontext()):
        done = (lambda t: bar.update(1)) if bar is not None else None
        for t, (s, i) in engine.run(fn, tasks, shared=shared, on_done=done):
            b = blocks[t]
            best_s[b.first : b.first + b.count] = s[:, 0]
            best_i[b.first : b.first + b.count] = i[:, 0]
    return best_s, best_i


def search_job(store: Any, view: Any, queries: np.ndarray, k: int, eligible: np.ndarray | None,
               engine: InProcess | Dask):
    """Top-``k`` store rows (row numbers, -1 where none) for ``queries`` over the live rows of
    ``view``, or over the sorted rows ``eligible``; ties go to the earlier row."""
    if eligible is None:
        include = None
    else:
        def include(s):
            lo, hi = np.searchsorted(eligible, [s.first_row, s.first_row + s.rows])
            mask = np.zeros(s.rows, bool)
            mask[eligible[lo:hi] - s.first_row] = True
            return mask
    blocks = _blocks(view, include)
    nq = len(queries)
    top_s = np.full((nq, 0), -np.inf, np.float32)
    top_r = np.full((nq, 0), -1, np.int64)
    with _changed_store(store, view.generation):
        tasks = [(b, k, view.metric) for b in blocks]
        for t, (s, i) in engine.run(_tasks.search_block, tasks, shared={"queries": queries}):
            rows = blocks[t].rows()
            r = np.where(i >= 0, rows[np.maximum(i, 0)], -1)
            top_s, top_r = _tasks.merge_top(top_s, top_r, s, r, k)
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_r = np.full((nq, k), -1, np.int64)
    out_s[:, : top_s.shape[1]], out_r[:, : top_r.shape[1]] = top_s, top_r
    return out_s, out_r
