"""Cells: spherical k-means on a sample, assignment by BLAS products and exact rescoring, big cells split.

Every vector gets one cell (its *own* cell). How many: about sqrt(n), and beyond
``INDEX_ROWS_PER_CELL**2`` rows as many as keep the mean cell at ``INDEX_ROWS_PER_CELL`` rows,
so the rows a probe reads, and the work per row of a search, do not grow with n. Cells are
trained by spherical k-means on a sample of unit rows (above ``INDEX_TWO_LEVEL_CELLS`` cells
inside coarse groups, :func:`kmeans_two_level`, so training costs ``sqrt(cells)`` per row, then
``INDEX_REFINE_ITERS`` flat rounds over all centroids, :func:`refine`, so border rows of a
coarse group still shape the cells they are nearest to); every
row is then assigned to its nearest centroid in the order :func:`embedcache.top_k` gives
(:class:`._knn.CellScorer`: a BLAS product, then the few centroids near a row's best rescored
exactly; no Python loop over rows); with more than
``_config.INDEX_TWO_LEVEL_CELLS`` centroids, through two levels (about sqrt(cells) coarse
groups of centroids, then the centroids of a row's nearest groups), so assignment costs about
``n * sqrt(cells)`` products instead of ``n * cells``. A cell holding more than
``_config.INDEX_MAX_CELL_FACTOR`` times the mean cell size (of the training sample's; after
every row is assigned, more than ``_config.INDEX_RESPLIT`` times that) is split again by
k-means on its own members, recursively, so the work of a pair search (which grows with the sum of squared
cell sizes) stays near-linear even when one cluster holds a large part of the data. The split
is made on the training sample first (:func:`build_cells_listed`), so that one pass over all
rows gives each row its cell and, for a pair search, its probe list. Rows that
k-means cannot tell apart (near-identical directions) stay one block: they are compared with
each other anyway, and their pairs are the true output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from embedcache import _config, kernels
from embedcache.kernels._core import FASTMATH, _cutoff, _pair_score, _stats
from embedcache.index._knn import _insert

#: BLAS scores held at once when rows are scored against centroids (float32 each: 128 MiB)
_SCORES = 1 << 25


def default_cells(n: int) -> int:
    """How many cells for ``n`` rows: about ``INDEX_CELLS_PER_SQRT * sqrt(n)``, and at least
    ``n / INDEX_ROWS_PER_CELL`` (large collections: cells of bounded size, so the work of a
    probe per row does not grow with n), at least 1."""
    if n < 2 * _config.INDEX_MIN_CELL:
        return 1
    c = max(_config.INDEX_CELLS_PER_SQRT * np.sqrt(n), n / _config.INDEX_ROWS_PER_CELL)
    return int(max(1, min(n // _config.INDEX_MIN_CELL, round(c))))


def _unit(x: np.ndarray) -> np.ndarray:
    return kernels.normalize(np.ascontiguousarray(x, dtype=np.float32))


def spherical_kmeans(x: np.ndarray, cells: int, rng: np.random.Generator, iters: int) -> np.ndarray:
    """``cells`` unit centroids (fewer when x has fewer distinct directions) of the rows of x.

    Starts from distinct random rows; each round assigns every row to its nearest centroid
    (top-1 through the kernels) and moves each centroid to the normalized sum of its rows. An
    emptied cell restarts at the row farthest from its centroid.
    """
    u = _unit(x)
    u = u[np.any(u != 0, axis=1)]  # zero rows have no direction
    if not len(u):
        return np.zeros((0, x.shape[1]), np.float32)
    uniq = distinct_rows(u)
    cells = min(cells, len(uniq))
    cent = u[uniq[rng.choice(len(uniq), cells, replace=False)]]
    return _lloyd(u, cent, iters)


def distinct_rows(u: np.ndarray) -> np.ndarray:
    """Where each distinct row of the float32 matrix ``u`` first occurs (increasing): rows
    equal value for value (-0.0 as 0.0) count once. By a hash of each row, rows of equal
    hash compared in full (no sort of whole rows)."""
    h = _row_hashes(np.ascontiguousarray(u, dtype=np.float32).view(np.uint32))
    order = np.argsort(h, kind="stable")
    return np.sort(_first_of_equal(u, h, order))


@njit(parallel=True, cache=True)
def _row_hashes(bits):
    """A 64-bit hash of each row of float32 bits (-0.0 hashed as 0.0)."""
    out = np.empty(bits.shape[0], np.uint64)
    for r in prange(bits.shape[0]):
        h = np.uint64(0x9E3779B97F4A7C15)
        for k in range(bits.shape[1]):
            b = np.uint64(bits[r, k])
            if b == np.uint64(0x80000000):
                b = np.uint64(0)
            h = (h ^ b) * np.uint64(0x100000001B3)
            h ^= h >> np.uint64(29)
        out[r] = h
    return out


@njit(cache=True)
def _first_of_equal(u, h, order):
    """Of the rows in ``order`` (sorted by hash ``h``, equal hashes by row), the first of
    each set of equal rows."""
    keep = np.empty(len(order), np.int64)
    nk = 0
    a = 0
    while a < len(order):
        b = a + 1
        while b < len(order) and h[order[b]] == h[order[a]]:
            b += 1
        for t in range(a, b):  # a run of equal hashes: almost always one row
            r = order[t]
            new = True
            for q in range(a, t):
                o = order[q]
                same = True
                for k in range(u.shape[1]):
                    if u[r, k] != u[o, k]:
                        same = False
                        break
                if same:
                    new = False
                    break
            if new:
                keep[nk] = r
                nk += 1
        a = b
    return keep[:nk]


def _lloyd(u: np.ndarray, cent: np.ndarray, iters: int) -> np.ndarray:
    """Up to ``iters`` rounds of spherical k-means (Lloyd) on the unit rows ``u`` from the unit
    centroids ``cent``: each row goes to its nearest centroid (top-1 through the kernels:
    exact, ties to the lower cell), each centroid moves to the normalized sum of its rows, an
    emptied one to the row farthest from its own centroid. Stops early when the centroids no
    longer move."""
    cells = len(cent)
    for _ in range(iters):
        s, a = kernels.top_k(u, cent, 1)
        a, s = a[:, 0], s[:, 0]
        counts = np.bincount(a, minlength=cells)
        sums = np.zeros((cells, u.shape[1]), np.float64)
        order = np.argsort(a, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)])
        _cell_sums(u, order, starts, sums)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            far = np.argsort(s, kind="stable")[: len(empty)]
            sums[empty] = u[far]
        new = _unit(sums)
        if np.array_equal(new, cent):
            break
        cent = new
    return cent


@njit(parallel=True, cache=True)
def _cell_sums(u, order, starts, out):
    """out[c] += the rows ``order[starts[c]:starts[c + 1]]`` of ``u``, in float64, in that
    order (each cell one thread's)."""
    for c in prange(out.shape[0]):
        for t in range(starts[c], starts[c + 1]):
            r = order[t]
            for k in range(u.shape[1]):
                out[c, k] += np.float64(u[r, k])


def refine(x: np.ndarray, centroids: np.ndarray, iters: int) -> np.ndarray:
    """The unit ``centroids`` after up to ``iters`` rounds of flat spherical k-means on the rows
    of ``x``: every row goes to its nearest of *all* the centroids (:func:`embedcache.top_k`:
    BLAS products, exact scores; the order :func:`nearest` gives), as the index assigns rows
    below ``INDEX_TWO_LEVEL_CELLS`` cells. Each round costs ``len(x) * cells`` products
    (320,000 x 10,000 at 10M rows: about 25 s on two cores); the k-means objective (mean
    cosine of a row to its nearest centroid) never decreases. An emptied cell restarts at
    the row farthest from its centroid, as in :func:`spherical_kmeans`."""
    u = _unit(x)
    u = u[np.any(u != 0, axis=1)]
    cent = np.ascontiguousarray(centroids, dtype=np.float32)
    if not len(u) or not len(cent) or iters <= 0:
        return cent
    return _lloyd(u, cent, iters)


def kmeans_two_level(x: np.ndarray, cells: int, rng: np.random.Generator, iters: int,
                     refine_iters: int | None = None) -> np.ndarray:
    """About ``cells`` unit centroids of the rows of x, trained in two levels: about
    sqrt(cells) coarse centroids by :func:`spherical_kmeans` on all rows, then each coarse
    group's rows (their nearest coarse centroid) get their share of the cells, by spherical
    k-means on those rows alone. Costs about ``2 sqrt(cells)`` products per row and round
    instead of ``cells``; every group with rows gets at least one centroid.

    Then ``refine_iters`` (default ``INDEX_REFINE_ITERS``) flat rounds (:func:`refine`) on
    the same rows: a row near the border of its coarse group moves to the nearest centroid of
    any group, which two-level training alone never gives it."""
    u = _unit(x)
    u = u[np.any(u != 0, axis=1)]
    if not len(u):
        return np.zeros((0, x.shape[1]), np.float32)
    g = max(1, int(round(np.sqrt(cells))))
    coarse = spherical_kmeans(u, g, rng, iters)
    group = nearest(u, coarse, 1)[:, 0]
    sizes = np.bincount(group, minlength=len(coarse))
    # each group's share of the cells, in proportion to its rows (rounded, at least one)
    share = np.maximum(1, np.round(cells * sizes / len(u))).astype(np.int64)
    share[sizes == 0] = 0
    order = np.argsort(group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    parts = [spherical_kmeans(u[order[starts[t] : starts[t + 1]]], int(share[t]), rng, iters)
             for t in range(len(coarse)) if share[t]]
    cent = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    rounds = _config.INDEX_REFINE_ITERS if refine_iters is None else refine_iters
    return refine(u, cent, int(rounds))


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The cell of every row: its nearest centroid (cosine, ties to the lower cell).

    Up to ``INDEX_TWO_LEVEL_CELLS`` centroids every row is compared with every centroid; above,
    through two levels (:func:`assign_two_level`), which costs about ``2 sqrt(cells)`` instead of
    ``cells`` products per row and may give a row its second-nearest cell. Scores stay exact
    either way (a cell only decides which rows are compared); the recall calibration measures
    the search against the cells as assigned.
    """
    if len(centroids) > _config.INDEX_TWO_LEVEL_CELLS:
        return assign_two_level(x, centroids)
    out = np.zeros(len(x), np.int64)
    if not len(centroids):
        return out
    return nearest(x, centroids, 1)[:, 0]


def nearest(x: np.ndarray, centroids: np.ndarray, probes: int, scores: bool = False):
    """(n, min(probes, cells)) int64: the nearest centroids of each row of ``x``, nearest first
    (cosine, ties to the lower cell), chunk by chunk. A row's answer does not depend on the
    rows it is computed with (the kernels' scores are per pair). ``scores``: also return
    each listed cell's score (float32, -inf for -1: the kernels' exact pair score, the one
    the cells are ranked by)."""
    from embedcache.index._knn import CellScorer

    p = min(probes, len(centroids))
    out = np.empty((len(x), p), np.int64)
    sc = np.empty((len(x), p), np.float32) if scores else None
    scorer = CellScorer(centroids)
    chunk = max(1, min(_config.CHUNK_ROWS * 8, _SCORES // max(1, len(centroids))))
    for a in range(0, len(x), chunk):
        xc = np.ascontiguousarray(x[a : a + chunk], dtype=np.float32)
        inv_x, _ = _stats(xc, "x")
        out[a : a + chunk] = scorer.best(xc, p, inv_x=inv_x)
        if scores:
            _listed_scores(xc, inv_x, scorer.cent, scorer.inv_c, out[a : a + chunk], sc[a : a + chunk])
    return (out, sc) if scores else out


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _listed_scores(x, inv_x, cent, inv_c, cells, out):
    for r in prange(x.shape[0]):
        for t in range(cells.shape[1]):
            c = cells[r, t]
            out[r, t] = _pair_score(x[r], cent[c], inv_x[r], inv_c[c], True) if c >= 0 else -np.inf


def probe_order(x: np.ndarray, centroids: np.ndarray, probes: int,
                groups: tuple[np.ndarray, np.ndarray] | None = None, scores: bool = False):
    """(n, min(probes, cells)) int64: the cells a partitioned search probes for each row of
    ``x``, in order: :func:`nearest`, or above ``INDEX_TWO_LEVEL_CELLS`` cells (unless every
    cell is probed) :func:`nearest_two_level` through :func:`coarse_groups` (-1 where a row
    has fewer candidates). One function for every caller, so one machine and a cluster probe
    the same cells. ``groups``: ``coarse_groups(centroids)`` when the caller keeps it.
    ``scores``: also return the (n, p) float32 score of each listed cell (-inf for -1),
    computed in the same pass over ``x``."""
    p = min(probes, len(centroids))
    if len(centroids) <= _config.INDEX_TWO_LEVEL_CELLS or p >= len(centroids):
        return nearest(x, centroids, p, scores)
    coarse, member = coarse_groups(centroids) if groups is None else groups
    return nearest_two_level(x, centroids, coarse, member, None, p, scores)


def coarse_groups(centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(coarse centroids (g, d), group of every centroid (c,))``: about sqrt(c) groups, by
    spherical k-means on the centroids themselves (same centroids, same groups)."""
    g = max(1, int(round(np.sqrt(len(centroids)))))
    coarse = spherical_kmeans(centroids, g, np.random.default_rng(0), _config.INDEX_KMEANS_ITERS)
    if not len(coarse):
        return np.zeros((1, centroids.shape[1]), np.float32), np.zeros(len(centroids), np.int64)
    return coarse, kernels.top_k(centroids, coarse, 1)[1][:, 0]


def assign_two_level(x: np.ndarray, centroids: np.ndarray, groups: int | None = None) -> np.ndarray:
    """The cell of every row through two levels: the ``groups`` (default
    ``INDEX_COARSE_PROBES``) nearest coarse centroids of :func:`coarse_groups`, then the
    nearest centroid among the members of those groups (ties to the lower cell).

    Equals :func:`assign` for every row whose nearest centroid lies in one of its nearest
    groups (all rows when ``groups`` covers every group); chunk by chunk, so memory stays a
    few chunks of rows whatever ``len(x)``.
    """
    if not len(centroids):
        return np.zeros(len(x), np.int64)
    coarse, member = coarse_groups(centroids)
    out = nearest_two_level(x, centroids, coarse, member, groups, 1)[:, 0]
    lost = np.flatnonzero(out < 0)  # only empty groups looked into
    if len(lost):
        out[lost] = kernels.top_k(np.ascontiguousarray(x[lost]), centroids, 1)[1][:, 0]
    return out


def candidates(q: np.ndarray, coarse: np.ndarray, member: np.ndarray, groups: int | None) -> np.ndarray:
    """(len(q), cells) bool: the cells of the ``groups`` nearest coarse groups of each row."""
    m = min(len(coarse), _config.INDEX_COARSE_PROBES if groups is None else max(1, int(groups)))
    near = kernels.top_k(np.ascontiguousarray(q, dtype=np.float32), coarse, m)[1]
    hit = np.zeros((len(q), len(coarse)), bool)
    hit[np.arange(len(q))[:, None], near] = True
    return hit[:, member]


def nearest_two_level(x: np.ndarray, centroids: np.ndarray, coarse: np.ndarray, member: np.ndarray,
                      groups: int | None, p: int, scores: bool = False):
    """(n, p) int64: the ``p`` nearest of each row's candidate cells (the members of its
    ``groups`` nearest coarse groups, default ``INDEX_COARSE_PROBES``), nearest first, ties
    to the lower cell; -1 where a row has fewer candidates. ``scores``: also their scores
    (as :func:`nearest`).

    Chunk by chunk: each row's nearest groups (:class:`._knn.CellScorer` on the coarse
    centroids), then for each group one BLAS product of the rows that look into it (gathered
    by a compiled loop) with its centroids, written side by side into one buffer, and a
    compiled pick of each row's best cells from it (:func:`_pick_listed`): the cells and
    scores :class:`._knn.CellScorer` gives, without copying the products into a row-major
    matrix."""
    import numba

    from embedcache.index._knn import CellScorer

    m = min(len(coarse), _config.INDEX_COARSE_PROBES if groups is None else max(1, int(groups)))
    top = CellScorer(coarse)
    fine = CellScorer(centroids, member)
    out = np.empty((len(x), p), np.int64)
    sc = np.empty((len(x), p), np.float32)
    if not len(x) or p <= 0:
        return (out, sc) if scores else out
    widest = int(np.sort(fine.sizes)[::-1][:m].sum())
    chunk = max(1, min(_config.CHUNK_ROWS * 16, _SCORES // max(1, widest, len(coarse))))
    gather = np.empty((0, x.shape[1]), np.float32)
    filt_m = np.ascontiguousarray(fine.filt_c[fine.members])  # in the order of each group's cells
    for a in range(0, len(x), chunk):
        xc = np.ascontiguousarray(x[a : a + chunk], dtype=np.float32)
        inv_x, _ = _stats(xc, "x")
        xn = kernels.normalize(xc)
        near = np.ascontiguousarray(top.best(xc, m, xn=xn, inv_x=inv_x))
        starts, base, rows, loc = _group_entries(near, fine.sizes)
        s = np.empty(max(1, int(base[-1])), np.float32)
        most = int(np.diff(starts).max(initial=0))
        if len(gather) < most:
            gather = np.empty((most, x.shape[1]), np.float32)
        for g in range(fine.groups):
            lo, hi = starts[g], starts[g + 1]
            if lo == hi or not fine.sizes[g]:
                continue
            xg = gather[: hi - lo]
            _gather_rows(xn, rows[lo:hi], xg)
            block = s[base[g] : base[g + 1]].reshape(hi - lo, fine.sizes[g])
            np.matmul(xg, fine.fine[g].T, out=block)
        chunks = max(1, min(numba.get_num_threads() * 4, len(xc)))
        _pick_listed(s, loc, near, fine.sizes, fine.members, fine.mstart, xc, inv_x, fine.cent, fine.inv_c,
                     filt_m, fine.margin, fine.rel, out[a : a + len(xc)], sc[a : a + len(xc)], chunks)
    return (out, sc) if scores else out


@njit(cache=True)
def _group_entries(near, sizes):
    """Each row's listed groups ``near`` ((n, m), -1: none) by group: ``(starts, base, rows,
    loc)``; the rows listing group g are ``rows[starts[g]:starts[g + 1]]`` (increasing), and
    their BLAS scores against its ``sizes[g]`` cells lie in one block from ``base[g]`` (row
    after row); ``loc[r, t]``: where the scores of row r's t-th group begin (-1: none)."""
    n, m = near.shape
    ng = sizes.shape[0]
    starts = np.zeros(ng + 1, np.int64)
    for r in range(n):
        for t in range(m):
            if near[r, t] >= 0:
                starts[near[r, t] + 1] += 1
    base = np.zeros(ng + 1, np.int64)
    for g in range(ng):
        base[g + 1] = base[g] + starts[g + 1] * sizes[g]
        starts[g + 1] += starts[g]
    fill = starts[:-1].copy()
    rows = np.empty(starts[ng], np.int64)
    loc = np.full((n, m), -1, np.int64)
    for r in range(n):
        for t in range(m):
            g = near[r, t]
            if g >= 0:
                k = fill[g]
                fill[g] = k + 1
                rows[k] = r
                loc[r, t] = base[g] + (k - starts[g]) * sizes[g]
    return starts, base, rows, loc


@njit(parallel=True, cache=True)
def _gather_rows(x, rows, out):
    """out[t] = x[rows[t]], rows copied in parallel."""
    for t in prange(rows.shape[0]):
        out[t, :] = x[rows[t], :]


#: candidate cells tested at once by their largest BLAS score in the pick (a loop the
#: compiler vectorizes); only a group that may hold one of a row's best is walked cell by cell
_GROUP = 32


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _pick_listed_rows(lo, hi, s, loc, near, sizes, members, mstart, x, inv_x, cent, inv_c, filt_m, margin, rel,
                      out, out_s):
    p = out.shape[1]
    blas = np.empty(p, np.float32)
    hs = np.empty(p, np.float32)
    hidx = np.empty(p, np.int64)
    none = np.iinfo(np.int64).max
    for r in range(lo, hi):
        # the p-th best BLAS score among the row's candidates (NaN filters: rescored anyway);
        # a run of _GROUP cells none of which beats the p-th best so far is passed over
        blas[:] = -np.inf
        for t in range(near.shape[1]):
            g = near[r, t]
            if g < 0:
                continue
            o = loc[r, t]
            f = mstart[g]
            for u0 in range(0, sizes[g], _GROUP):
                u1 = min(u0 + _GROUP, sizes[g])
                mx = np.float32(-np.inf)
                for u in range(u0, u1):
                    v = s[o + u] * filt_m[f + u]
                    mx = v if v > mx else mx
                if not mx > blas[p - 1]:
                    continue
                for u in range(u0, u1):
                    v = s[o + u] * filt_m[f + u]
                    if v > blas[p - 1]:
                        pos = p - 1
                        while pos > 0 and blas[pos - 1] < v:
                            blas[pos] = blas[pos - 1]
                            pos -= 1
                        blas[pos] = v
        # a cell of the exact best p scores at least the p-th best BLAS score less one error
        # bound, and its BLAS score at most one bound below that
        kth = np.float64(blas[p - 1])
        cut = _cutoff(_cutoff(kth, margin, rel), margin, rel) if kth > -np.inf else -np.inf
        hs[:] = -np.inf
        hidx[:] = none
        for t in range(near.shape[1]):
            g = near[r, t]
            if g < 0:
                continue
            o = loc[r, t]
            f = mstart[g]
            for u0 in range(0, sizes[g], _GROUP):
                u1 = min(u0 + _GROUP, sizes[g])
                hit = False
                for u in range(u0, u1):
                    hit |= not (s[o + u] * filt_m[f + u] < cut)
                if not hit:
                    continue
                for u in range(u0, u1):
                    if s[o + u] * filt_m[f + u] < cut:
                        continue
                    c = members[f + u]
                    e = _pair_score(x[r], cent[c], inv_x[r], inv_c[c], True)
                    _insert(hs, hidx, e, c)  # score descending, ties to the lower cell
        for t in range(p):
            found = hidx[t] != none
            out[r, t] = hidx[t] if found else -1
            out_s[r, t] = hs[t] if found else -np.inf


@njit(parallel=True, cache=True)
def _pick_listed(s, loc, near, sizes, members, mstart, x, inv_x, cent, inv_c, filt_m, margin, rel, out, out_s,
                 chunks):
    """For each row r of x: the ``p = out.shape[1]`` best cells (cosine, exact scores, ties to
    the lower cell; -1 where fewer) among the members of the groups ``near[r]`` (-1: none)
    and their exact scores (``out_s``, -inf for -1), group g's cells being
    ``members[mstart[g]:mstart[g] + sizes[g]]`` (``filt_m``: their filter scales, in that
    order); the BLAS scores of row r against the t-th of them start at ``s[loc[r, t]]``.
    Only cells within two error bounds of the p-th best BLAS score are rescored exactly (as
    :class:`._knn.CellScorer` picks)."""
    n = x.shape[0]
    for t in prange(chunks):
        _pick_listed_rows(n * t // chunks, n * (t + 1) // chunks, s, loc, near, sizes, members, mstart, x, inv_x,
                          cent, inv_c, filt_m, margin, rel, out, out_s)


def build_cells(
    x: Any, cells: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(centroids (c, d) float32 unit rows, own cell of each row (n,) int64)``.

    x: an (n, d) array, or a source of rows (:mod:`._source`): samples are read with
    ``x[rows]``, every row is assigned with ``x.assign``. Trained on a sample of at most
    ``INDEX_SAMPLE_PER_CELL * cells`` rows; cells larger than ``INDEX_MAX_CELL_FACTOR`` times
    the mean (and than ``INDEX_MIN_CELL``) are split again, on the sample, then, once every
    row is assigned, those past ``INDEX_RESPLIT`` times that size.
    """
    cent, own, _ = build_cells_listed(x, cells, seed, 0)
    return cent, own


def build_cells_listed(x: Any, cells: int | None, seed: int, probes: int):
    """:func:`build_cells`, and with ``probes`` > 0 the probe lists of the rows themselves:
    ``(centroids, own, lists)``, ``lists`` being ``probe_order(x, centroids, probes,
    scores=True)`` (the cells and their scores), or None.

    Every row is read once: cells the training sample shows too big are split on the
    sample's rows first (:func:`_split_big` on the sample, the cap scaled to its size), then
    one pass lists each row's nearest cells (``x.nearest``), its own cell being the first
    (as ``x.assign`` gives it). Cells still too big on all rows are split as in
    :func:`build_cells` (a cell the sample under-counted); only then, the centroids having
    changed, are the lists computed again.
    """
    from embedcache.index._source import ArraySource, source_of

    x = source_of(x)
    n, d = x.shape
    rng = np.random.default_rng(seed)
    c = default_cells(n) if cells is None else max(1, min(int(cells), n))
    if n == 0:
        return np.zeros((0, d), np.float32), np.zeros(0, np.int64), None
    if c == 1:
        cent = spherical_kmeans(x[rng.choice(n, min(n, 4096), replace=False)], 1, rng, 1)
        if not len(cent):
            cent = np.zeros((1, d), np.float32)
        return cent, np.zeros(n, np.int64), None
    size = min(n, _config.INDEX_SAMPLE_PER_CELL * c)
    sample = np.sort(rng.choice(n, size, replace=False))
    xs = np.ascontiguousarray(x[sample], dtype=np.float32)
    if c > _config.INDEX_TWO_LEVEL_CELLS:
        cent = kmeans_two_level(xs, c, rng, _config.INDEX_KMEANS_ITERS)
    else:
        cent = spherical_kmeans(xs, c, rng, _config.INDEX_KMEANS_ITERS)
    if not len(cent):  # only zero rows
        return np.zeros((1, d), np.float32), np.zeros(n, np.int64), None
    cap = max(_config.INDEX_MIN_CELL, int(_config.INDEX_MAX_CELL_FACTOR * n / len(cent)))
    if size < n:  # big cells split on the sample: the pass over every row sees the final cells
        cap_s = max(2, int(cap * size / n))
        cent, _ = _split_big(ArraySource(xs), cent, assign(xs, cent), cap_s, rng)
    del xs
    if probes >= len(cent) > _config.INDEX_TWO_LEVEL_CELLS:
        probes = 0  # lists of every cell are one-level, the cells two-level: computed apart
    if probes > 0:
        lists = x.nearest(cent, probes, scores=True)
        own = _own_of(x, lists[0], cent)
    else:
        lists, own = None, x.assign(cent)
    before = len(cent), cent.copy()
    if size < n:
        cap = max(cap, int(cap * _config.INDEX_RESPLIT))
    cent, own = _split_big(x, cent, own, cap, rng)
    if lists is not None and (len(cent) != before[0] or not np.array_equal(cent, before[1])):
        lists = x.nearest(cent, probes, scores=True)
    return cent, own, lists


def _own_of(x: Any, near: np.ndarray, cent: np.ndarray) -> np.ndarray:
    """The own cell of every row from its probe list ``near`` (its first cell, the one
    :func:`assign` gives), rows listing none assigned as :func:`assign_two_level` does."""
    own = near[:, 0].astype(np.int64)
    lost = np.flatnonzero(own < 0)
    if len(lost):
        own[lost] = kernels.top_k(np.ascontiguousarray(x[lost], dtype=np.float32), cent, 1)[1][:, 0]
    return own


def _split_big(
    x: Any, cent: np.ndarray, own: np.ndarray, cap: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split every cell of more than ``cap`` rows by k-means on its members, recursively."""
    cent = [row for row in cent]
    todo = list(np.flatnonzero(np.bincount(own, minlength=len(cent)) > cap))
    while todo:
        cell = todo.pop()
        members = np.flatnonzero(own == cell)
        k = int(min(64, -(-2 * len(members) // cap)))
        sub_sample = members if len(members) <= 64 * k else rng.choice(members, 64 * k, replace=False)
        sub = spherical_kmeans(x[sub_sample], k, rng, _config.INDEX_KMEANS_ITERS)
        if len(sub) < 2:
            continue  # one direction: a block compared as a whole
        local = x.assign(sub, members)
        counts = np.bincount(local, minlength=len(sub))
        if counts.max() == len(members):
            continue  # k-means cannot separate these rows: keep them one block
        # sub-cell 0 keeps the parent's number, the others are appended
        ids = np.concatenate([[cell], len(cent) + np.arange(len(sub) - 1)]).astype(np.int64)
        cent[cell] = sub[0]
        cent.extend(sub[1:])
        own[members] = ids[local]
        todo.extend(int(ids[t]) for t in np.flatnonzero(counts > cap))
    return np.ascontiguousarray(np.stack(cent), dtype=np.float32), own
