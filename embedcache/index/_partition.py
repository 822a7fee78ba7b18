"""The partition index over an array, and the searches that probe it.

A :class:`PartitionIndex` groups the rows of a collection ``x`` by cell. A search probes, for
every query row, its ``probes`` nearest cells (by centroid) and scores the rows of those cells
with the exact kernels (:func:`embedcache.similar_pairs`, :func:`embedcache.top_k`), so a
reported score is always the exact one: probing fewer cells can miss a pair or a neighbour,
never invent one. Probing every cell gives the exact answer bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from embedcache import _config, kernels
from embedcache._validation import check_int
from embedcache.index._cells import build_cells
from embedcache.index._merge import NO_INDEX, merge_topk

#: what a cell gives a search: (its vectors, their row numbers, mask of eligible rows or None)
CellBlock = Callable[[int], "tuple[np.ndarray, np.ndarray, np.ndarray | None]"]


@dataclass(frozen=True, eq=False)
class PartitionIndex:
    """Rows grouped by cell.

    centroids: (c, d) float32 unit rows. own: (n,) int64, the cell of every row. order: (n,)
    int64, the rows sorted by cell (rows of one cell in increasing order). offsets: (c + 1,)
    int64; the rows of cell ``c`` are ``order[offsets[c]:offsets[c + 1]]``.
    """

    centroids: np.ndarray
    own: np.ndarray
    order: np.ndarray
    offsets: np.ndarray

    @classmethod
    def build(cls, x: np.ndarray, *, cells: int | None = None, seed: int = 0) -> PartitionIndex:
        """Train cells on a sample of ``x`` ((n, d) float array) and assign every row.

        cells: number of cells before big ones are split (default about sqrt(n)); seed: the
        sample and k-means start (same seed, same index).
        """
        if cells is not None:
            cells = check_int("cells", cells, 1)
        seed = check_int("seed", seed, 0)
        cent, own = build_cells(x, cells, seed)
        return cls.from_assignment(cent, own)

    @classmethod
    def from_assignment(cls, centroids: np.ndarray, own: np.ndarray) -> PartitionIndex:
        order = np.argsort(own, kind="stable").astype(np.int64)
        offsets = np.zeros(len(centroids) + 1, np.int64)
        np.cumsum(np.bincount(own, minlength=len(centroids)), out=offsets[1:])
        return cls(centroids, own, order, offsets)

    @property
    def cells(self) -> int:
        return len(self.centroids)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self, c: int) -> np.ndarray:
        return self.order[self.offsets[c] : self.offsets[c + 1]]

    def nearest_cells(self, q: np.ndarray, probes: int) -> np.ndarray:
        """(m, min(probes, cells)) int64: the nearest cells of each row of ``q``, nearest first
        (cosine to the centroids, ties to the lower cell)."""
        p = min(probes, self.cells)
        out = np.empty((len(q), p), np.int64)
        chunk = _config.CHUNK_ROWS * 8
        for a in range(0, len(q), chunk):
            out[a : a + chunk] = kernels.top_k(q[a : a + chunk], self.centroids, p)[1]
        return out

    def sorted_rows(self, x: np.ndarray) -> np.ndarray:
        """``x`` with its rows in cell order (one copy, the dtype of x)."""
        return np.ascontiguousarray(x[self.order])


def _by_cell(cells_of: np.ndarray, ncells: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, starts): rows probing cell c are ``rows[starts[c]:starts[c + 1]]`` (in order)."""
    flat = cells_of.ravel()
    rows = np.repeat(np.arange(cells_of.shape[0], dtype=np.int64), cells_of.shape[1])
    keep = flat >= 0
    flat, rows = flat[keep], rows[keep]
    by = np.argsort(flat, kind="stable")
    starts = np.zeros(ncells + 1, np.int64)
    np.cumsum(np.bincount(flat, minlength=ncells), out=starts[1:])
    return rows[by], starts


def pairs(x: np.ndarray, index: PartitionIndex, threshold: float, probes: int, bar=None):
    """Pairs ``(i, j, s)``, i < j, score >= threshold, found by probing ``probes`` cells per row.

    A pair is found when both rows share a cell, or one of them probes the other's cell.
    Sorted by score descending, then i, then j (as :func:`embedcache.similar_pairs`).
    ``bar``: optional progress bar updated with units of work (row-by-row comparisons).
    """
    n = len(x)
    if n < 2:
        e = np.empty(0, np.int64)
        return e, e.copy(), np.empty(0, np.float32)
    near = index.nearest_cells(x, probes)
    near = np.where(near == index.own[:, None], -1, near)  # own cell: the triangle below
    qrows, starts = _by_cell(near, index.cells)
    xs = index.sorted_rows(x)
    off = index.offsets
    parts_i, parts_j, parts_s = [], [], []
    for c in range(index.cells):
        lo, hi = off[c], off[c + 1]
        if hi == lo:
            continue
        block, ids = xs[lo:hi], index.order[lo:hi]
        i, j, s = kernels.similar_pairs(block, threshold)
        parts_i.append(ids[i]), parts_j.append(ids[j]), parts_s.append(s)
        q = qrows[starts[c] : starts[c + 1]]
        if len(q):
            i, j, s = kernels.similar_pairs(x[q], threshold, y=block)
            parts_i.append(q[i]), parts_j.append(ids[j]), parts_s.append(s)
        if bar is not None:
            bar.update((hi - lo) * ((hi - lo - 1) / 2 + len(q)))
    i, j, s = np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_s)
    a, b = np.minimum(i, j), np.maximum(i, j)
    _, first = np.unique(a * n + b, return_index=True)  # a pair found from both sides: once
    a, b, s = a[first], b[first], s[first]
    order = np.lexsort((b, a, -s))
    return a[order], b[order], s[order]


def forest(x: np.ndarray, index: PartitionIndex, threshold: float, probes: int, parent: np.ndarray, bar=None):
    """Join in the union-find ``parent`` the pairs :func:`pairs` would find, without listing
    them (:func:`embedcache.kernels.pairs.threshold_forest`): the same connected components,
    in memory bounded by the rows. Returns the spanning-forest pairs ``(i, j, s)`` that
    joined two trees (at most ``n - 1``, in no particular order)."""
    from embedcache.kernels.pairs import threshold_forest

    n = len(x)
    parts_i, parts_j, parts_s = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.float32)]
    if n < 2:
        return parts_i[0], parts_j[0], parts_s[0]
    near = index.nearest_cells(x, probes)
    near = np.where(near == index.own[:, None], -1, near)  # own cell: the triangle below
    qrows, starts = _by_cell(near, index.cells)
    xs = index.sorted_rows(x)
    off = index.offsets
    for c in range(index.cells):
        lo, hi = off[c], off[c + 1]
        if hi == lo:
            continue
        block, ids = xs[lo:hi], index.order[lo:hi]
        i, j, s = threshold_forest(block, threshold, parent, ids=ids)
        parts_i.append(i), parts_j.append(j), parts_s.append(s)
        q = qrows[starts[c] : starts[c + 1]]
        if len(q):
            i, j, s = threshold_forest(x[q], threshold, parent, ids=q, y=block, y_ids=ids)
            parts_i.append(i), parts_j.append(j), parts_s.append(s)
        if bar is not None:
            bar.update((hi - lo) * ((hi - lo - 1) / 2 + len(q)))
    return np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_s)


def pair_work(index: PartitionIndex, n: int, probes: int) -> float:
    """About how many row-by-row comparisons :func:`pairs` makes (for progress bars)."""
    sizes = index.sizes.astype(np.float64)
    mean = sizes.mean() if len(sizes) else 0.0
    return float((sizes * (sizes - 1) / 2).sum() + n * max(0, min(probes, index.cells) - 1) * mean)


def probe_topk(
    queries: np.ndarray,
    near: np.ndarray,
    cell_block: CellBlock,
    ncells: int,
    k: int,
    self_ids: np.ndarray | None = None,
    bar=None,
    metric: str = "cosine",
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` rows of the cells ``near[t]`` (-1: none) for each query row ``t``.

    ``cell_block(c)`` gives a cell's vectors, their row numbers and an optional mask of
    eligible rows. ``self_ids``: a row number per query never returned for it. Returns
    (scores float32, rows int64), shape (q, k), best first, ties by the lower row; empty slots
    hold -inf and -1, as in :func:`embedcache.top_k`. ``metric``: the score, as in top_k.
    """
    nq = len(queries)
    heap_s = np.full((nq, k), -np.inf, np.float32)
    heap_i = np.full((nq, k), NO_INDEX, np.int64)
    qrows, starts = _by_cell(near, ncells)
    use_self = self_ids is not None
    selfs = self_ids if use_self else np.zeros(nq, np.int64)
    extra = 1 if use_self else 0
    for c in range(ncells):
        q = qrows[starts[c] : starts[c + 1]]
        if not len(q):
            continue
        block, ids, mask = cell_block(c)
        if not len(block):
            continue
        s, li = kernels.top_k(queries[q], block, min(k + extra, len(block)), metric=metric, mask=mask)
        gi = np.where(li >= 0, ids[np.maximum(li, 0)], -1)
        merge_topk(heap_s, heap_i, q, s, gi, selfs[q], use_self)
        if bar is not None:
            bar.update(len(q) * len(block))
    heap_i[heap_i == NO_INDEX] = -1
    return heap_s, heap_i


def with_own(near: np.ndarray, own: np.ndarray) -> np.ndarray:
    """``near`` with each row's own cell added as a last column where it is missing (-1 else)."""
    has = (near == own[:, None]).any(axis=1)
    return np.concatenate([near, np.where(has, -1, own)[:, None]], axis=1)


def knn(x: np.ndarray, index: PartitionIndex, k: int, probes: int, bar=None):
    """The ``k`` nearest other rows of every row (own cell plus ``probes`` nearest cells)."""
    near = with_own(index.nearest_cells(x, probes), index.own)
    xs = index.sorted_rows(x)
    off = index.offsets

    def block(c: int):
        return xs[off[c] : off[c + 1]], index.order[off[c] : off[c + 1]], None

    return probe_topk(x, near, block, index.cells, k, np.arange(len(x), dtype=np.int64), bar)
