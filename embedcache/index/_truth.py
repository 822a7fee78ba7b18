"""The exact pairs of a few sampled rows, reading only the rows that can pair with them.

The recall calibration needs, for each of a few thousand sampled rows q, every row x with
``score(q, x) >= threshold``: a scan of the whole collection per row (at ten million rows of
384 dimensions, most of the calibration's time). The partition index bounds where they can
be, exactly. Every cell has a unit centroid c (a pivot); a row x at angle ``a(x)`` to it and
a query q at angle ``θ`` to it are at an angle of at least ``|θ - a(x)|`` to each other
(the triangle inequality on the sphere). Within each cell the rows are ordered by their
angle to the centroid and cut in bands of ``INDEX_RECALL_TRUTH_BAND`` rows (an annulus
``[a_lo, a_hi]`` each); a band can hold a pair of q only when
``max(0, θ - a_hi, a_lo - θ) <= arccos(threshold)``, and only those bands are scanned, by the
same kernels (:func:`embedcache.kernels.pairs.unsorted_pairs`, whose score of a pair does not
depend on the rows it is computed with): the pairs found are the plain scan's, bit for bit.
In high dimension a cell's rows lie far from its centroid (about 75 degrees on the
benchmark's data), so a cell alone prunes little; its bands prune most of the rest.

Rounding: the angles to the centroids are computed in float64 from the rows' float32 (or
float16) values and the centroid scaled to unit length, so they are the true ones to about
1e-15; the published score of a pair is a float32 dot product, off the true cosine by at
most ``d * 2**-24`` (the classical bound, whatever the summation order). Every cosine
compared is widened by :func:`margin` (twice that and a few units), so no band that can
hold a pair at the published score is skipped. Zero rows (score 0 with everything) are no
points of the sphere: below a threshold of :func:`margin` nothing is pruned.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, prange

from embedcache import _config


def margin(d: int) -> float:
    """How far a cosine is widened: twice the float32 dot product's rounding bound for
    ``d`` dimensions, and a few units more."""
    return (d + 8) * 2.0**-23


@njit(parallel=True, cache=True)
def _pivot_cos(x, centroids, inv_c, own, out):
    for r in prange(x.shape[0]):
        c = own[r]
        dot = 0.0
        sq = 0.0
        for t in range(x.shape[1]):
            v = np.float64(x[r, t])
            dot += v * np.float64(centroids[c, t])
            sq += v * v
        out[r] = 0.0 if sq == 0.0 else min(1.0, max(-1.0, dot / math.sqrt(sq) * inv_c[c]))


def pivot_cosines(x: np.ndarray, centroids: np.ndarray, own: np.ndarray) -> np.ndarray:
    """(n,) float64: the cosine of every row of ``x`` ((n, d), float16/32/64) with its cell's
    centroid ``centroids[own]`` taken at unit length (0 for a zero row), in float64."""
    c = np.ascontiguousarray(centroids, np.float64)
    nrm = np.sqrt((c * c).sum(axis=1))
    inv = np.divide(1.0, nrm, out=np.zeros_like(nrm), where=nrm > 0)
    out = np.empty(len(x), np.float64)
    step = max(1, int(_config.CHUNK_ROWS) * 8)
    for a in range(0, len(x), step):
        xb = np.asarray(x[a : a + step])
        if xb.dtype not in (np.float32, np.float64):
            xb = xb.astype(np.float32)
        _pivot_cos(np.ascontiguousarray(xb), c, inv, np.ascontiguousarray(own[a : a + step], np.int64),
                   out[a : a + step])
    return out


class Bands:
    """The rows of an index's cells ordered by angle to their centroid, in bands.

    rows: (n,) int64, the rows of cell 0 then cell 1 ..., each cell's nearest its centroid
    first. start: (bands + 1,) int64, band b is ``rows[start[b]:start[b + 1]]``; cell: (bands,)
    the cell of each band; lo, hi: (bands,) float64, the least and greatest angle (radians)
    to the centroid of the band's rows, widened by the rounding margin.
    """

    def __init__(self, index: Any, cosines: np.ndarray, d: int) -> None:
        eps = margin(d)
        self.d = d
        self.rows = np.lexsort((-cosines, index.own)).astype(np.int64)
        width = max(1, int(_config.INDEX_RECALL_TRUTH_BAND))
        sizes = index.sizes
        per = -(-sizes // width)  # bands per cell
        self.cell = np.repeat(np.arange(index.cells), per)
        first = np.repeat(index.offsets[:-1], per)
        k = np.arange(len(self.cell)) - np.repeat(np.cumsum(per) - per, per)
        self.start = np.append(first + k * width, len(self.rows)).astype(np.int64)
        cs = cosines[self.rows]
        stop = np.append(self.start[1:-1], len(self.rows))
        top = cs[self.start[:-1]] if len(self.cell) else np.empty(0)
        bottom = cs[stop - 1] if len(self.cell) else np.empty(0)
        self.lo = np.arccos(np.minimum(1.0, top + eps))
        self.hi = np.arccos(np.maximum(-1.0, bottom - eps))

    def plan(self, centroids: np.ndarray, q: np.ndarray, threshold: float):
        """The work for queries ``q`` ((m, d)), cell by cell (a generator of pieces
        ``(rows, bounds, qpos, ranges)``): ``rows`` the rows of the cell's bands that can hold
        a pair at ``threshold`` with one of the queries (band k: ``rows[bounds[k]:bounds[k + 1]]``,
        each band's rows in increasing order), ``qpos`` positions in ``q`` of the queries
        that need one of them (by cosine with the centroid), band k needing
        ``qpos[ranges[k, 0]:ranges[k, 1]]``: a cell's rows and queries are gathered once."""
        eps = margin(self.d)
        reach = math.acos(max(-1.0, min(1.0, threshold - eps)))
        c = np.array(centroids, np.float64)  # a copy: the index's centroids stay as they are
        c /= np.maximum(np.sqrt((c * c).sum(axis=1)), 1e-300)[:, None]
        qq = np.asarray(q, np.float64)
        qq = qq / np.maximum(np.sqrt((qq * qq).sum(axis=1)), 1e-300)[:, None]
        # a band needs the queries with cos(q, c) in [cos(min(pi, hi + reach)) - eps, cos(max(0, lo - reach)) + eps]
        need_lo = np.cos(np.minimum(math.pi, self.hi + reach)) - eps
        need_hi = np.cos(np.maximum(0.0, self.lo - reach)) + eps
        bstart = np.searchsorted(self.cell, np.arange(len(c) + 1))
        step = max(1, (1 << 24) // max(1, len(qq)))
        for a in range(0, len(c), step):
            s = qq @ c[a : a + step].T  # (m, cells of this step)
            for cc in range(s.shape[1]):
                cell = a + cc
                b0, b1 = bstart[cell], bstart[cell + 1]
                if b0 == b1:
                    continue
                col = s[:, cc]
                cand = np.flatnonzero(col >= need_lo[b0:b1].min())
                if not len(cand):
                    continue
                cand = cand[np.argsort(col[cand], kind="stable")]
                sc = col[cand]
                left = np.searchsorted(sc, need_lo[b0:b1], "left")
                right = np.searchsorted(sc, need_hi[b0:b1], "right")
                keep = np.flatnonzero(right > left)
                if not len(keep):
                    continue
                first, last = left[keep].min(), right[keep].max()
                parts = [np.sort(self.rows[self.start[b0 + k] : self.start[b0 + k + 1]]) for k in keep]
                bounds = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
                ranges = np.stack([left[keep], right[keep]], axis=1) - first
                yield np.concatenate(parts), bounds, cand[first:last], ranges

    def work(self, pieces: list) -> int:
        """Row-by-query products of ``pieces`` (:meth:`plan`)."""
        return int(sum(int(((b[1:] - b[:-1]) * (r[:, 1] - r[:, 0])).sum()) for _, b, _, r in pieces))


def piece_pairs(block: np.ndarray, qblock: np.ndarray, piece, threshold: float) -> list:
    """The ``(i, j, s)`` parts of one piece of :meth:`Bands.plan` (i: positions in the
    queries, j: rows), from the piece's rows ``block`` and queries ``qblock`` (in its order)."""
    from embedcache.kernels.pairs import unsorted_pairs

    rows, bounds, qpos, ranges = piece
    out = []
    for k in range(len(ranges)):
        u, v = ranges[k]
        a, b = bounds[k], bounds[k + 1]
        i, j, s = unsorted_pairs(qblock[u:v], threshold, y=block[a:b])
        out.append((qpos[u + i], rows[a + j], s))
    return out


def bands_of(src: Any, index: Any) -> Bands:
    """The :class:`Bands` of ``index`` over the rows of ``src``, computed once per index."""
    have = index._near.get("truth_bands")
    if have is None:
        have = Bands(index, src.pivot_cosines(index.centroids, index.own), src.shape[1])
        index._near["truth_bands"] = have
    return have


def prunes(src: Any, index: Any, threshold: float) -> bool:
    """Whether the sampled rows' exact pairs can be searched band by band: an index with more
    than one cell over these rows, a source that can, and a threshold above the margin."""
    return (index is not None and index.cells > 1 and len(index.own) == len(src)
            and hasattr(src, "band_pairs") and threshold > margin(src.shape[1]))


def sampled_pairs(src: Any, index: Any, q: np.ndarray, threshold: float):
    """``src.pairs_with(q, threshold)`` (every pair of a query and a row, i: position in
    ``q``, j: row), searched only in the bands of ``index`` that can hold one: the same
    pairs and scores, in no particular order. When the bands leave more than
    ``INDEX_RECALL_TRUTH_SHARE`` of the products to compute, the plain scan (faster then)."""
    bands = bands_of(src, index)
    pieces = list(bands.plan(index.centroids, q, threshold))
    if bands.work(pieces) > float(_config.INDEX_RECALL_TRUTH_SHARE) * len(q) * len(src):
        return src.pairs_with(q, threshold)
    return src.band_pairs(q, pieces, threshold)
