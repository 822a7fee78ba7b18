"""A store's rows as a source of rows for the partition index (:mod:`embedcache.index._source`),
every scan of them run as tasks of an engine.

The index's algorithms run on the client unchanged (k-means on a sample, the recall
calibration, which rows probe which cells); what touches every row runs as tasks that read
the store's files:

- assignment to cells and the nearest cells of every row: one task per block of rows, the
  centroids sent to every worker once;
- the exact side of the recall calibration (sampled rows against all rows): one task per
  block, the sampled rows sent once;
- the search: one task per group of cells (``_config.ENGINE_BLOCK_ROWS`` rows read, its
  rows and the rows probing it), computed by the same per-cell functions as on one machine.

The client holds what one machine holds besides the vectors: the cell of every row, the
nearest cells of every row, and the output.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embedcache import _config
from embedcache.engine import _tasks
from embedcache.engine._plan import pick, plan
from embedcache.index._knn import merge_unique
from embedcache.index._merge import NO_INDEX
from embedcache.index._partition import _by_cell
from embedcache.kernels.pairs import pair_order

__all__ = ["StoreSource"]


class StoreSource:
    """The rows of ``view`` that ``include`` picks (``include(segment) -> mask or None``,
    default the live rows), numbered in store order, read by the tasks of ``engine``."""

    def __init__(self, view: Any, engine: Any, include=None) -> None:
        self.view = view
        self.engine = engine
        self.blocks = plan(view, max(1, int(_config.ENGINE_BLOCK_ROWS)), include)
        self.rows = (np.concatenate([b.rows() for b in self.blocks]) if self.blocks
                     else np.empty(0, np.int64))  # store row of each row of the source
        self.shape = (len(self.rows), view.dim or 0)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        """The vectors of some rows (a sample), read here: float32."""
        from embedcache.store._query import gather

        rows = np.atleast_1d(self.rows[key])
        return np.ascontiguousarray(gather(self.view, rows), dtype=np.float32)

    # --------------------------------------------------------------------- scans of every row

    def _per_block(self, fn, args: tuple, shared: dict[str, Any]):
        """Results of ``fn(block, *args, **shared)`` for every block, in block order."""
        out: list[Any] = [None] * len(self.blocks)
        for t, r in self.engine.run(fn, [(b,) + args for b in self.blocks], shared=shared):
            out[t] = r
        return out

    def nearest(self, centroids: np.ndarray, probes: int, scores: bool = False):
        p = min(probes, len(centroids))
        parts = self._per_block(_tasks.nearest_block, (p, scores), {"centroids": centroids})
        if not scores:
            return np.concatenate(parts) if parts else np.empty((0, p), np.int64)
        if not parts:
            return np.empty((0, p), np.int64), np.empty((0, p), np.float32)
        return np.concatenate([c for c, _ in parts]), np.concatenate([s for _, s in parts])

    def assign(self, centroids: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        if not len(centroids):
            return np.zeros(len(self) if rows is None else len(rows), np.int64)
        if rows is None:
            parts = self._per_block(_tasks.assign_block, (), {"centroids": centroids})
            return np.concatenate(parts) if parts else np.empty(0, np.int64)
        rows = np.asarray(rows, np.int64)
        step = max(1, int(_config.ENGINE_BLOCK_ROWS))
        chunks = [rows[a : a + step] for a in range(0, len(rows), step)]
        # the rows of a cell, in increasing order: picked one by one from their segments
        order = [np.argsort(c, kind="stable") for c in chunks]
        tasks = [(pick(self.view, self.rows[c[o]]),) for c, o in zip(chunks, order)]
        out = np.empty(len(rows), np.int64)
        for t, r in self.engine.run(_tasks.assign_picks, tasks, shared={"centroids": centroids}):
            got = np.empty(len(r), np.int64)
            got[order[t]] = r
            out[t * step : t * step + len(r)] = got
        return out

    def pairs_with(self, q: np.ndarray, threshold: float):
        """As ``similar_pairs(q, threshold, y=rows)``: same pairs, scores and order."""
        parts = self._per_block(_tasks.pairs_block, (threshold,), {"queries": q})
        if not parts:
            e = np.empty(0, np.int64)
            return e, e.copy(), np.empty(0, np.float32)
        i = np.concatenate([p[0] for p in parts])
        j = np.concatenate([p[1] + b.first for p, b in zip(parts, self.blocks)])
        s = np.concatenate([p[2] for p in parts])
        order = pair_order(i, j, s)
        return i[order], j[order], s[order]

    def top_k(self, q: np.ndarray, k: int):
        """As ``top_k(q, rows, k)``: the same rows and scores (ties to the lower row)."""
        top_s = np.full((len(q), 0), -np.inf, np.float32)
        top_i = np.full((len(q), 0), -1, np.int64)
        tasks = [(b, min(k, b.count), "cosine") for b in self.blocks]
        for t, (s, i) in self.engine.run(_tasks.search_block, tasks, shared={"queries": q}):
            gi = np.where(i >= 0, i + self.blocks[t].first, -1)
            top_s, top_i = _tasks.merge_top(top_s, top_i, s, gi, k)
        return top_s, top_i

    def pivot_cosines(self, centroids: np.ndarray, own: np.ndarray) -> np.ndarray:
        """(n,) float64: every row's cosine with its cell's centroid, one task per block
        (:func:`embedcache.index._truth.pivot_cosines`)."""
        tasks = [(b, own[b.first : b.first + b.count]) for b in self.blocks]
        parts = [None] * len(tasks)
        for t, r in self.engine.run(_tasks.pivot_block, tasks, shared={"centroids": centroids}):
            parts[t] = r
        return np.concatenate(parts) if parts else np.empty(0, np.float64)

    def band_pairs(self, q: np.ndarray, work, threshold: float):
        """As :meth:`embedcache.index._source.ArraySource.band_pairs`: the pieces of ``work``
        in tasks of about ``ENGINE_BLOCK_ROWS`` rows read, the queries sent once."""
        target = max(1, int(_config.ENGINE_BLOCK_ROWS))
        tasks, group, rows = [], [], 0
        for piece in list(work) + [None]:
            if piece is not None:
                group.append(piece)
                rows += len(piece[0])
            if group and (piece is None or rows >= target):
                need = np.unique(np.concatenate([p[0] for p in group]))
                tasks.append((pick(self.view, self.rows[need]), need, group, threshold))
                group, rows = [], 0
        parts = [(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))]
        for _, part in self.engine.run(_tasks.band_pairs, tasks, shared={"queries": q}):
            parts.append(part)
        return tuple(np.concatenate(p) for p in zip(*parts))

    # --------------------------------------------------------------------- the search

    def _groups(self, index: Any, qrows: np.ndarray, starts: np.ndarray):
        """Tasks of cells: each ``(cells [(ids, q)], work)``, about ``ENGINE_BLOCK_ROWS`` rows
        read (its cells' rows and the rows probing them; a bigger cell alone)."""
        target = max(1, int(_config.ENGINE_BLOCK_ROWS))
        off = index.offsets
        group: list[tuple[np.ndarray, np.ndarray]] = []
        rows = work = 0
        for c in range(index.cells):
            ids = index.order[off[c] : off[c + 1]]
            q = qrows[starts[c] : starts[c + 1]]
            if not len(ids) or (not len(q) and len(ids) < 2):
                continue
            group.append((ids, q))
            rows += len(ids) + len(q)
            work += len(ids) * ((len(ids) - 1) / 2 + len(q))
            if rows >= target:
                yield group, work
                group, rows, work = [], 0, 0
        if group:
            yield group, work

    def _task(self, cells: list[tuple[np.ndarray, np.ndarray]]):
        need = np.unique(np.concatenate([a for ids, q in cells for a in (ids, q)]))
        return pick(self.view, self.rows[need]), need, cells

    def _biggest_first(self, index: Any, qrows: np.ndarray, starts: np.ndarray):
        """The groups of cells, the most work first: a big cell's task does not start last and
        leave the other workers idle. The merge does not depend on the order."""
        groups = list(self._groups(index, qrows, starts))
        return [groups[t] for t in np.argsort([-w for _, w in groups], kind="stable")]

    def cell_pairs(self, index: Any, qrows: np.ndarray, starts: np.ndarray, threshold: float, bar=None):
        groups = self._biggest_first(index, qrows, starts)
        tasks = [self._task(g) + (threshold,) for g, _ in groups]
        done = (lambda t: bar.update(groups[t][1])) if bar is not None else None
        for _, part in self.engine.run(_tasks.cell_pairs, tasks, on_done=done):
            yield part

    def cell_topk(self, index: Any, near: np.ndarray, k: int, bar=None):
        n = len(self)
        heap_s = np.full((n, k), -np.inf, np.float32)
        heap_i = np.full((n, k), NO_INDEX, np.int64)
        qrows, starts = _by_cell(near, index.cells)
        groups = self._biggest_first(index, qrows, starts)
        tasks = [self._task(g) + (k,) for g, _ in groups]
        work = [sum(len(ids) * len(q) for ids, q in g) for g, _ in groups]
        done = (lambda t: bar.update(work[t])) if bar is not None else None
        for _, (rows, s, i) in self.engine.run(_tasks.cell_topk, tasks, on_done=done):
            merge_unique(heap_s, heap_i, rows, s, i)
        heap_i[heap_i == NO_INDEX] = -1
        return heap_s, heap_i
