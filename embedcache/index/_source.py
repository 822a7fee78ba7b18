"""Where a partitioned search finds its rows: an array here, or a store's rows on a cluster.

The algorithms of :mod:`embedcache.index` (k-means cells, probes, recall calibration, the cell
by cell search) are written once, against the few operations of a *source*:

``len(src)``, ``src.shape``, ``src[idx]``  the vectors of some rows (samples, small)
``src.assign(centroids, rows)``           the nearest centroid of every row, or of ``rows``
``src.nearest(centroids, p, scores)``     the ``p`` nearest centroids of every row (and their scores)
``src.pairs_with(q, threshold)``          ``similar_pairs(q, threshold, y=x)``
``src.top_k(q, k)``                       ``top_k(q, x, k)``
``src.cell_pairs(...)``, ``src.cell_topk(...)``  the search itself, cell by cell

:class:`ArraySource` does each with the kernels on an array in this process. The store's
engine (:mod:`embedcache.engine`) does each as tasks over the store's files, calling the same
per-cell functions (:func:`._partition.pairs_of_cell`, :func:`._knn.fold_cell`) on the
same rows with the same kernels, whose scores do not depend on how rows are batched: the same
cells, the same probes and the same answer, bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embedcache import kernels


class ArraySource:
    """The rows of an (n, d) array (or array-like with slices and index arrays)."""

    def __init__(self, x: Any) -> None:
        self.x = x
        self.shape = x.shape

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.x[key]

    def assign(self, centroids: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        from embedcache.index._cells import assign

        return assign(self.x if rows is None else self.x[rows], centroids)

    def nearest(self, centroids: np.ndarray, probes: int, scores: bool = False):
        from embedcache.index._cells import probe_order

        return probe_order(self.x, centroids, probes, scores=scores)

    def pairs_with(self, q: np.ndarray, threshold: float, cols: np.ndarray | None = None):
        """``similar_pairs(q, threshold, y=x)``; with ``cols`` (sorted row numbers) against
        those rows only, read chunk by chunk (j: row numbers of x)."""
        if cols is None:
            return kernels.similar_pairs(q, threshold, y=self.x)
        parts = []
        step = 8 * 8192
        for a in range(0, len(cols), step):
            c = cols[a : a + step]
            i, j, s = kernels.similar_pairs(q, threshold, y=self.x[c])
            parts.append((i, c[j], s))
        if not parts:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        return tuple(np.concatenate(p) for p in zip(*parts))

    def top_k(self, q: np.ndarray, k: int):
        return kernels.top_k(q, self.x, k)

    def pivot_cosines(self, centroids: np.ndarray, own: np.ndarray) -> np.ndarray:
        """(n,) float64: every row's cosine with its cell's centroid (:func:`._truth.pivot_cosines`)."""
        from embedcache.index._truth import pivot_cosines

        return pivot_cosines(self.x, centroids, own)

    def band_pairs(self, q: np.ndarray, work, threshold: float):
        """``(i, j, s)``: the pairs at ``threshold`` of queries ``q`` with rows of x, searched
        in the pieces of ``work`` only (:meth:`._truth.Bands.plan`: rows of x and positions
        in ``q`` of the queries to score against them); in no particular order."""
        from embedcache.index._truth import piece_pairs

        parts = [(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))]
        for piece in work:
            parts.extend(piece_pairs(self.x[piece[0]], q[piece[2]], piece, threshold))
        return tuple(np.concatenate(p) for p in zip(*parts))

    def cell_pairs(self, index: Any, qrows: np.ndarray, starts: np.ndarray, threshold: float, bar=None,
                   near: np.ndarray | None = None):
        """``(i, j, s)`` parts, cell by cell (see :func:`._partition.pairs`). Each cell's rows
        and the rows probing it are gathered from x (in increasing order) when it is searched:
        no copy of x is made, so a memory map stays on disk. ``near``: the cells each row
        probes (:func:`._partition.pairs`' lists); with it, a pair whose two rows probe each
        other's cell is kept only from the row of the lower cell (each pair once)."""
        from embedcache.index._partition import pairs_of_cell

        off, own = index.offsets, index.own
        for c in range(index.cells):
            lo, hi = off[c], off[c + 1]
            if hi == lo:
                continue
            q = qrows[starts[c] : starts[c + 1]]
            ids = index.order[lo:hi]
            for k, (i, j, s) in enumerate(pairs_of_cell(self.x[ids], ids, self.x[q], q, threshold)):
                if k and near is not None and len(i):  # i probes c = own[j]; j probes own[i]?
                    oi = own[i]
                    both = (near[j] == oi[:, None].astype(near.dtype)).any(axis=1)
                    keep = ~both | (oi < c)
                    i, j, s = i[keep], j[keep], s[keep]
                yield i, j, s
            if bar is not None:
                bar.update((hi - lo) * ((hi - lo - 1) / 2 + len(q)))

    def cell_topk(self, index: Any, near: np.ndarray, k: int, bar=None):
        """The best ``k`` other rows of every row from the cells ``near`` and the rows that
        probe its own cell (see :func:`._partition.knn`), through :func:`._knn.rows_knn`,
        rows gathered from x cell by cell."""
        from embedcache.index._knn import rows_knn

        return rows_knn(self.x, index, near, k, bar)


def source_of(x: Any) -> Any:
    """``x`` when it is a source already (has ``cell_pairs``), else an :class:`ArraySource`."""
    return x if hasattr(x, "cell_pairs") else ArraySource(x)
