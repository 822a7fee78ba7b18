"""The partition index over an array, and the searches that probe it.

A :class:`PartitionIndex` groups the rows of a collection ``x`` by cell. A search probes, for
every query row, its ``probes`` nearest cells (by centroid) and scores the rows of those cells
with the exact kernels (:func:`embedcache.similar_pairs`, :func:`embedcache.top_k`), so a
reported score is always the exact one: probing fewer cells can miss a pair or a neighbour,
never invent one. Probing every cell gives the exact answer bit for bit.

A pair search may instead probe by score gap (:func:`within_gap`): of a row's first cells,
those whose centroid scores within a gap of its best. With a fixed count, the extra probes
are most of the work (a row compares with its own cell's rows once, with each other cell's
rows in full) though most rows lie deep inside their cell, where the next cells hold no pair
at a high threshold; by gap, only rows near a border look across it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit, prange

from embedcache import _config
from embedcache._validation import check_int
from embedcache.index._cells import build_cells_listed, coarse_groups, nearest, probe_order
from embedcache.index._merge import by_cell
from embedcache.index._source import ArraySource, source_of
from embedcache.index._spill import PairRuns


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
    #: computed once per index: the indexed rows' probe cells (:meth:`row_cells`), coarse groups
    _near: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, x: np.ndarray, *, cells: int | None = None, seed: int = 0,
              probe_lists: bool = True) -> PartitionIndex:
        """Train cells on a sample of ``x`` ((n, d) float array) and assign every row.

        cells: number of cells before big ones are split (default :func:`._cells.default_cells`:
        about sqrt(n), and cells of at most ``INDEX_ROWS_PER_CELL`` rows on average); seed: the
        sample and k-means start (same seed, same index). probe_lists: the pass that assigns
        every row also lists its first ``INDEX_GAP_PROBES`` cells and their scores, kept for
        the first pair search by score gap (:meth:`row_cells_scored`, the same lists it
        would compute) when within ``INDEX_ROW_CELLS_BYTES``.
        """
        if cells is not None:
            cells = check_int("cells", cells, 1)
        seed = check_int("seed", seed, 0)
        p = max(0, int(_config.INDEX_GAP_PROBES)) if probe_lists else 0
        if len(x) * p * 8 > _config.INDEX_ROW_CELLS_BYTES:
            p = 0
        cent, own, lists = build_cells_listed(x, cells, seed, p)
        index = cls.from_assignment(cent, own)
        if lists is not None:
            index._keep_scored(*lists)
        return index

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
        return nearest(q, self.centroids, probes)

    @property
    def two_level(self) -> bool:
        """Whether searches find a row's nearest cells through coarse groups of cells
        (more than ``INDEX_TWO_LEVEL_CELLS`` cells)."""
        return self.cells > _config.INDEX_TWO_LEVEL_CELLS

    def _groups(self) -> tuple[np.ndarray, np.ndarray]:
        if "groups" not in self._near:
            self._near["groups"] = coarse_groups(self.centroids)
        return self._near["groups"]

    def probe_cells(self, q: np.ndarray, probes: int) -> np.ndarray:
        """(m, min(probes, cells)) int64: the cells a search probes for each row of ``q``,
        in order. :meth:`nearest_cells` unless :attr:`two_level`; then the nearest among the
        cells of the row's ``INDEX_COARSE_PROBES`` nearest coarse groups (-1 where fewer),
        and every cell when ``probes`` covers them all (the exact answer)."""
        return probe_order(q, self.centroids, probes, self._groups() if self.two_level else None)

    def probes_needed(self, q: np.ndarray, rows: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """For each k: the fewest probes with which row ``rows[k]`` of ``q`` probes cell
        ``cells[k]``: its place in :meth:`probe_cells`' own list (the search's order,
        near-ties included: the cells of a near-identical block split in many have centroids
        within rounding of each other, and scores computed any other way order them
        differently), looked up to ``INDEX_RECALL_DEPTH`` probes; ``cells + 1`` beyond
        (reached only by probing every cell)."""
        # short of every cell (the exact order): a two-level index's own order
        depth = min(self.cells - 1 if self.two_level else self.cells, max(1, int(_config.INDEX_RECALL_DEPTH)))
        need = np.full(len(rows), self.cells + 1, np.int64)
        if not len(rows):
            return need
        near = self.probe_cells(q, depth)
        step = max(1, (1 << 22) // depth)
        for a in range(0, len(rows), step):
            hit = near[rows[a : a + step]] == np.asarray(cells[a : a + step])[:, None]
            found = hit.any(axis=1)
            need[a : a + step][found] = hit.argmax(axis=1)[found] + 1
        return need

    def probe_cells_scored(self, q: np.ndarray, probes: int) -> tuple[np.ndarray, np.ndarray]:
        """(:meth:`probe_cells`, the (m, p) float32 score of each listed cell, -inf for -1)."""
        return probe_order(q, self.centroids, probes, self._groups() if self.two_level else None, scores=True)

    def small_cells(self) -> np.ndarray:
        """(cells,) bool: cells of at most ``INDEX_GAP_SMALL_CELL`` rows, whose rows probe all
        their first cells whatever the gap in a search by score gap: a few rows each, often
        the stray rows of a near-identical block split by k-means, each with thousands of
        pairs across a wide gap (and rows a sample rarely holds)."""
        return self.sizes <= int(_config.INDEX_GAP_SMALL_CELL)

    def gaps_needed(self, q: np.ndarray, rows: np.ndarray, cells: np.ndarray, probes: int,
                    own: np.ndarray | None = None) -> np.ndarray:
        """(k,) float64: for each k, the smallest score gap (:func:`within_gap`) at which row
        ``rows[k]`` of ``q`` probes cell ``cells[k]``: its best listed cell's score less that
        cell's (0 for a row of one of :meth:`small_cells`; ``own``: the cell of each row of
        ``q``), when the cell is among its first ``probes`` of :meth:`probe_cells`; inf beyond."""
        need = np.full(len(rows), np.inf)
        if not len(rows):
            return need
        near, sc = self.probe_cells_scored(q, probes)
        gaps = row_gaps(near, sc, None if own is None else self.small_cells()[own])
        p = max(1, near.shape[1])
        step = max(1, (1 << 22) // p)
        for a in range(0, len(rows), step):
            r = rows[a : a + step]
            hit = near[r] == np.asarray(cells[a : a + step])[:, None]
            found = hit.any(axis=1)
            need[a : a + step][found] = gaps[r[found], hit.argmax(axis=1)[found]]
        return need

    def row_cells_scored(self, x: np.ndarray, probes: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`probe_cells_scored` of the indexed rows ``x`` (cells as int32), kept for the
        next search of the same index when within ``INDEX_ROW_CELLS_BYTES`` (lists kept for
        more probes serve fewer: a row's first cells are the same whatever the count)."""
        got = self.kept_scored(len(x), probes)
        if got is not None:
            return got
        cells, sc = self.probe_cells_scored(x, min(probes, self.cells))
        return self._keep_scored(cells, sc)

    def kept_scored(self, n: int, probes: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The kept probe lists of the ``n`` indexed rows (from the build's pass or an earlier
        search) at ``probes`` cells, when kept for as many cells or more; else None. An index
        belongs to the rows it was built on: its lists are theirs."""
        p = min(probes, self.cells)
        have = self._near.get("scored")
        if have is None or len(have[0]) != n:
            return None
        kept = have[0].shape[1]
        if kept == p:
            return have
        # a longer list's first p cells, unless it lists every cell of a two-level index
        # (then in the one-level order)
        if p < kept and (kept < self.cells or not self.two_level):
            return np.ascontiguousarray(have[0][:, :p]), np.ascontiguousarray(have[1][:, :p])
        return None

    def _keep_scored(self, cells: np.ndarray, sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The probe lists ``cells`` (as int32) and their scores, kept with the index when
        within ``INDEX_ROW_CELLS_BYTES``."""
        cells = cells.astype(np.int32 if self.cells < 2**31 else np.int64)
        if cells.nbytes + sc.nbytes <= _config.INDEX_ROW_CELLS_BYTES:
            self._near["scored"] = (cells, sc)
        return cells, sc

    def row_cells(self, x: np.ndarray, probes: int) -> np.ndarray:
        """:meth:`probe_cells` of the indexed rows ``x`` themselves, computed once for at least
        ``INDEX_ROW_CELLS`` probes and kept (int32) for the next search of the same index."""
        p = min(probes, self.cells)
        have = self._near.get("cells")
        if have is None or have.shape[1] < p:
            keep = min(self.cells, max(p, _config.INDEX_ROW_CELLS))
            if len(x) * keep * 4 > _config.INDEX_ROW_CELLS_BYTES:
                keep = p  # a large collection: the probes at hand only
            have = self.probe_cells(x, keep).astype(np.int32 if self.cells < 2**31 else np.int64)
            self._near["cells"] = have
        return have if have.shape[1] == p else np.ascontiguousarray(have[:, :p])

    def sorted_rows(self, x: np.ndarray) -> np.ndarray:
        """``x`` with its rows in cell order (one copy, the dtype of x). ``x`` is read in order,
        chunk by chunk (a memmap is streamed from disk, not read row by row at random)."""
        out = np.empty(x.shape, x.dtype)
        pos = np.empty(len(x), np.int64)
        pos[self.order] = np.arange(len(x))
        chunk = _config.CHUNK_ROWS * 8
        for a in range(0, len(x), chunk):
            out[pos[a : a + chunk]] = x[a : a + chunk]
        return out


def row_gaps(near: np.ndarray, scores: np.ndarray, wide: np.ndarray | None = None) -> np.ndarray:
    """(n, p) float64: each listed cell's gap, the row's best listed score less the cell's
    (inf where ``near`` is -1; 0 on the rows ``wide`` marks, (n,) bool: they probe every
    listed cell at any gap); as :func:`within_gap` computes it."""
    sc = np.where(near >= 0, scores.astype(np.float64), -np.inf)
    best = sc.max(axis=1, initial=-np.inf)[:, None]
    with np.errstate(invalid="ignore"):
        g = best - sc
    if wide is not None:
        g[np.asarray(wide, bool)] = 0.0
    g[near < 0] = np.inf
    return g


@njit(parallel=True, cache=True)
def _within_gap(near, scores, gap, wide, out):
    for r in prange(near.shape[0]):
        best = -np.inf
        for t in range(near.shape[1]):
            if near[r, t] >= 0 and scores[r, t] > best:
                best = np.float64(scores[r, t])
        for t in range(near.shape[1]):
            c = near[r, t]
            out[r, t] = c if c >= 0 and (wide[r] or best - np.float64(scores[r, t]) <= gap) else -1


def within_gap(near: np.ndarray, scores: np.ndarray, gap: float, wide: np.ndarray | None = None) -> np.ndarray:
    """The probe lists ``near`` ((n, p), -1: none) with -1 for every cell whose score (in
    ``scores``, (n, p) float32) is more than ``gap`` below the row's best listed score,
    except on the rows ``wide`` marks ((n,) bool, default none), which keep every listed
    cell: the cells a search by score gap probes (besides each row's own cell). A row deep
    inside its cell probes its nearest cell only; a row near a border also those across it."""
    out = np.empty_like(near)
    if near.size:
        w = np.zeros(len(near), np.bool_) if wide is None else np.ascontiguousarray(wide, np.bool_)
        _within_gap(near, scores, float(gap), w, out)
    return out


def probes_per_row(near: np.ndarray, own: np.ndarray) -> float:
    """Mean cells searched per row: its own and those of ``near`` ((n, p), -1: none)."""
    if not len(near):
        return 0.0
    return 1.0 + float(_other_cells(near, own).sum()) / len(near)


def _other_cells(near: np.ndarray, own: np.ndarray) -> np.ndarray:
    """(n, p) bool: the entries of the probe lists ``near`` that name a cell other than the
    row's own (-1 entries excluded)."""
    return (near >= 0) & (near != own[:, None].astype(near.dtype))


def probed(src: Any, index: PartitionIndex, probes: int, gap: float | None = None) -> np.ndarray:
    """The cells every row of ``src`` probes (-1: none): its ``probes`` first cells, or those
    of them within the score ``gap`` (:func:`within_gap`). Kept with the index for an array
    (reused by the next search), computed by the source's engine otherwise; the same cells
    either way."""
    if gap is None:
        if isinstance(src, ArraySource):
            return index.row_cells(src.x, probes)
        return src.nearest(index.centroids, probes)
    if isinstance(src, ArraySource):
        near, sc = index.row_cells_scored(src.x, probes)
    else:
        got = index.kept_scored(len(src), probes)
        near, sc = got if got is not None else src.nearest(index.centroids, probes, scores=True)
    return within_gap(near, sc, gap, index.small_cells()[index.own])


def _by_cell(cells_of: np.ndarray, ncells: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, starts): rows probing cell c are ``rows[starts[c]:starts[c + 1]]`` (in order)."""
    return by_cell(cells_of, ncells)


def pairs(x: Any, index: PartitionIndex, threshold: float, probes: int, bar=None, near: np.ndarray | None = None):
    """Pairs ``(i, j, s)``, i < j, score >= threshold, found by probing ``probes`` cells per row.

    x: an (n, d) array or a source of rows (:mod:`._source`). A pair is found when both rows
    share a cell, or one of them probes the other's cell. Sorted by score descending, then i,
    then j (as :func:`embedcache.similar_pairs`). ``bar``: optional progress bar updated with
    units of work (row-by-row comparisons). ``near``: the cells each row probes ((n, p), -1:
    none; default :func:`probed` with ``probes``), e.g. by score gap.
    """
    src = source_of(x)
    n = len(src)
    if n < 2:
        e = np.empty(0, np.int64)
        return e, e.copy(), np.empty(0, np.float32)
    # own cell left out: its pairs are the triangle of the cell's rows
    near = probed(src, index, probes) if near is None else near
    qrows, starts = by_cell(near, index.cells, index.own, 1)
    if isinstance(src, ArraySource):  # each pair found once: no copies to sort out
        return merge_pairs(src.cell_pairs(index, qrows, starts, threshold, bar, near=near), n, unique=True)
    return merge_pairs(src.cell_pairs(index, qrows, starts, threshold, bar), n)


def pairs_of_cell(block: np.ndarray, ids: np.ndarray, xq: np.ndarray, q: np.ndarray, threshold: float):
    """The pairs one cell gives: within its rows ``block`` (row numbers ``ids``), and between
    the rows ``xq`` (row numbers ``q``) that probe it and its rows: two ``(i, j, s)`` parts,
    in that order (the second only when ``q`` has rows; callers tell them apart by place),
    pairs in no particular order (:func:`merge_pairs` sorts them all once)."""
    from embedcache.kernels.pairs import unsorted_pairs

    parts = list(_triangle(block, threshold))  # one part: callers tell it from the probing rows'
    i, j, s = parts[0] if len(parts) == 1 else (np.concatenate(p) for p in zip(*parts))
    yield ids[i], ids[j], s
    if len(q):
        i, j, s = unsorted_pairs(xq, threshold, y=block)
        yield q[i], ids[j], s


def _triangle(block: np.ndarray, threshold: float):
    """The pairs within ``block`` (positions i < j), in parts: bands of
    ``INDEX_TRIANGLE_ROWS`` rows, each with itself and with the rows after it, so the BLAS
    products cover about the upper triangle (a cell as one tile computes the whole square,
    twice the work). Scores are the kernels' exact ones whatever the bands."""
    from embedcache.kernels.pairs import unsorted_pairs

    m = len(block)
    b = max(1, int(_config.INDEX_TRIANGLE_ROWS))
    if m <= 2 * b:
        yield unsorted_pairs(block, threshold)
        return
    for a in range(0, m, b):
        band = block[a : a + b]
        i, j, s = unsorted_pairs(band, threshold)
        yield i + a, j + a, s
        if a + b < m:
            i, j, s = unsorted_pairs(band, threshold, y=block[a + b :])
            yield i + a, j + a + b, s


def merge_pairs(parts, n: int, unique: bool = False):
    """The ``(i, j, s)`` parts of a search as one list: each pair once (i < j), sorted by score
    descending, then i, then j. A pair found twice has the same score both times.
    ``unique``: the parts hold each pair once. The parts are kept compactly (spilled to a
    temporary file when many) and sorted by score bands (:class:`._spill.PairRuns`): the
    peak memory is about the output plus one band."""
    with PairRuns(n) as runs:
        for i, j, s in parts:
            runs.add(i, j, s)
        return runs.sorted(unique)


def first_of_each(keys: np.ndarray) -> np.ndarray:
    """Where each distinct value of ``keys`` first occurs, in increasing order of the values
    (``np.unique(keys, return_index=True)[1]``, with one sort)."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    head = np.ones(len(sk), bool)
    head[1:] = sk[1:] != sk[:-1]
    return order[head]


def forest(x: np.ndarray, index: PartitionIndex, threshold: float, probes: int, parent: np.ndarray, bar=None,
           near: np.ndarray | None = None):
    """Join in the union-find ``parent`` the pairs :func:`pairs` would find (the same probe
    lists ``near``, default :func:`probed`), without listing
    them (:func:`embedcache.kernels.pairs.threshold_forest`): the same connected components,
    in memory bounded by the rows. Returns the spanning-forest pairs ``(i, j, s)`` that
    joined two trees (at most ``n - 1``, in no particular order)."""
    from embedcache.kernels.pairs import threshold_forest

    n = len(x)
    parts_i, parts_j, parts_s = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.float32)]
    if n < 2:
        return parts_i[0], parts_j[0], parts_s[0]
    near = probed(ArraySource(x), index, probes) if near is None else near
    qrows, starts = by_cell(near, index.cells, index.own, 1)  # own cell: the triangle below
    off = index.offsets
    for c in range(index.cells):
        lo, hi = off[c], off[c + 1]
        if hi == lo:
            continue
        ids = index.order[lo:hi]
        block = x[ids]
        i, j, s = threshold_forest(block, threshold, parent, ids=ids)
        parts_i.append(i), parts_j.append(j), parts_s.append(s)
        q = qrows[starts[c] : starts[c + 1]]
        if len(q):
            i, j, s = threshold_forest(x[q], threshold, parent, ids=q, y=block, y_ids=ids)
            parts_i.append(i), parts_j.append(j), parts_s.append(s)
        if bar is not None:
            bar.update((hi - lo) * ((hi - lo - 1) / 2 + len(q)))
    return np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_s)


def pair_work(index: PartitionIndex, n: int, probes: int, near: np.ndarray | None = None) -> float:
    """About how many row-by-row comparisons :func:`pairs` makes (for progress bars); exactly
    that many given the probe lists ``near``."""
    sizes = index.sizes.astype(np.float64)
    if near is not None:
        return float((sizes * (sizes - 1) / 2).sum() + sizes[near[_other_cells(near, index.own)]].sum())
    mean = sizes.mean() if len(sizes) else 0.0
    return float((sizes * (sizes - 1) / 2).sum() + n * max(0, min(probes, index.cells) - 1) * mean)


def with_own(near: np.ndarray, own: np.ndarray) -> np.ndarray:
    """``near`` with each row's own cell added as a last column where it is missing (-1 else)."""
    has = (near == own[:, None]).any(axis=1)
    return np.concatenate([near, np.where(has, -1, own).astype(near.dtype)[:, None]], axis=1)


def knn(x: Any, index: PartitionIndex, k: int, probes: int, bar=None):
    """The ``k`` nearest other rows of every row among the rows of its own cell and of its
    ``probes`` nearest cells, and the rows that probe its own cell (:mod:`._knn`).
    x: an (n, d) array or a source of rows (:mod:`._source`)."""
    src = source_of(x)
    near = with_own(probed(src, index, probes), index.own)
    return src.cell_topk(index, near, k, bar)
