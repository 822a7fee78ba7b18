"""Partition index: k-means cells, assignment, probing, recall calibration.

For collections too large for an exact all-pairs or all-neighbours search. Rows are grouped
into cells (spherical k-means on a sample, assigned through coarse groups of cells when there
are many, big cells split again, see :mod:`._cells`); each
row is compared only with the rows of the cells nearest to it (:mod:`._partition`). How many
cells to probe is chosen for the recall asked for, on a sample of query rows checked against
the exact answer, and the recall reached is measured on another sample, which took no part
in the choice, and reported with a 95% interval (:class:`Recall`, :mod:`._recall`). Scores always come from the exact kernels:
an approximate answer may miss a pair, never invent one or misreport a score, and probing
every cell gives the exact answer bit for bit.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(2000, 16)).astype(np.float32)
>>> i, j, s, rec = partitioned_pairs(x, 0.6, recall=0.9, seed=0)
>>> bool(np.all(s >= np.float32(0.6))), rec.probes >= 1
(True, True)
"""

from __future__ import annotations

import numpy as np

from embedcache import _config
from embedcache._validation import check_gap, check_int, check_k, check_number, check_threshold
from embedcache.errors import InvalidInputError
from embedcache.index import _partition, _recall
from embedcache.index._partition import PartitionIndex
from embedcache.index._recall import Recall

__all__ = ["PartitionIndex", "Recall", "check_recall", "partitioned_forest", "partitioned_knn", "partitioned_pairs"]


def check_recall(recall: object) -> float:
    """A target recall: a number in (0, 1]."""
    r = check_number("recall", recall)
    if not 0.0 < r <= 1.0:
        raise InvalidInputError(f"recall must be in (0, 1], got {recall}")
    return r


def _setup(x, cells, seed, index, probes, probe_lists=True):
    seed = check_int("seed", seed, 0)
    if probes is not None:
        probes = check_int("probes", probes, 1)
    if index is None:
        index = PartitionIndex.build(x, cells=cells, seed=seed, probe_lists=probe_lists)
    elif len(index.own) != len(x):
        raise InvalidInputError(f"index covers {len(index.own)} rows, x has {len(x)}")
    return index, seed, probes


def partitioned_pairs(x: np.ndarray, threshold: float, *, recall: float = 0.99, probes: int | None = None,
                      cells: int | None = None, seed: int = 0, index: PartitionIndex | None = None,
                      bar=None, gap: float | None = None):
    """Pairs of rows of ``x`` ((n, d) float array) with cosine >= ``threshold``, through cells.

    recall: the share of true pairs to find. Each row searches its own cell, and of its
    first ``INDEX_GAP_PROBES`` cells those whose centroid scores within a gap of its best
    centroid's (rows deep inside a cell search it alone; rows near a border the cells
    across it); the gap is calibrated for ``recall`` (a fixed number of probes per row when
    no gap reaches it). ``probes``: probe that many cells per row instead (or, with ``gap``,
    those of them within ``gap``); then nothing is sampled and the returned recall is None.
    Returns ``(i, j, scores, recall)``: pairs i < j sorted by score descending, ties by i then
    j, each with its exact score; ``recall`` a :class:`Recall` measured on sampled rows (with
    the gap and the mean probes per row when the gap rule ran).
    ``bar``: optional progress bar, updated with row-by-row comparisons.
    """
    index, probes, gap, rec, scored = _pair_probes(x, threshold, recall, probes, cells, seed, index, gap)
    if gap is None and _every_cell(x, index, probes):
        from embedcache.kernels import similar_pairs

        i, j, s = similar_pairs(x, threshold)
        return i, j, s, _exact_recall(index, rec)
    near, rec = _gap_probes(x, index, probes, gap, rec, scored)
    del scored
    if bar is not None:
        bar.total = _partition.pair_work(index, len(x), probes, near)
    i, j, s = _partition.pairs(x, index, threshold, probes, bar, near=near)
    return i, j, s, rec


def partitioned_forest(x: np.ndarray, threshold: float, parent: np.ndarray, *, recall: float = 0.99,
                       probes: int | None = None, cells: int | None = None, seed: int = 0,
                       index: PartitionIndex | None = None, bar=None, gap: float | None = None):
    """The connected components of the pairs :func:`partitioned_pairs` finds, without listing
    them: every such pair is joined in the union-find array ``parent`` ((n,) int64, roots
    with ``parent[r] == r``, updated in place), in memory bounded by the rows however many
    pairs a cluster of near-identical rows holds. Same probes (or gap), calibration and recall.

    Returns ``(i, j, scores, recall)``: the pairs that joined two trees (a spanning forest,
    at most n - 1 pairs, in no particular order) and the :class:`Recall`.
    """
    index, probes, gap, rec, scored = _pair_probes(x, threshold, recall, probes, cells, seed, index, gap)
    if gap is None and _every_cell(x, index, probes):
        from embedcache.kernels.pairs import threshold_forest

        i, j, s = threshold_forest(x, threshold, parent)
        return i, j, s, _exact_recall(index, rec)
    near, rec = _gap_probes(x, index, probes, gap, rec, scored)
    del scored
    if bar is not None:
        bar.total = _partition.pair_work(index, len(x), probes, near)
    i, j, s = _partition.forest(x, index, threshold, probes, parent, bar, near=near)
    return i, j, s, rec


def _scored_lists(x, index: PartitionIndex, probes: int):
    """Every row's first ``probes`` cells and their centroid scores, as a search by score gap
    probes them (:func:`._partition.probed`): for the border rows of the calibration's
    design, then for the search itself (computed once)."""
    from embedcache.index._source import ArraySource, source_of

    src = source_of(x)
    if isinstance(src, ArraySource):
        return index.row_cells_scored(src.x, probes)
    got = index.kept_scored(len(src), probes)
    return got if got is not None else src.nearest(index.centroids, probes, scores=True)


def _gap_probes(x, index: PartitionIndex, probes: int, gap: float | None, rec: Recall | None, scored=None):
    """(the probe lists of a search by score ``gap``, ``rec`` with its mean probes per row);
    (None, rec) for a fixed number of probes. ``scored``: :func:`_scored_lists` at ``probes``
    when computed already."""
    if gap is None:
        return None, rec
    from dataclasses import replace

    from embedcache.index._source import source_of

    if scored is not None and scored[0].shape[1] == min(probes, index.cells):
        near = _partition.within_gap(scored[0], scored[1], gap, index.small_cells()[index.own])
    else:
        near = _partition.probed(source_of(x), index, probes, gap)
    if rec is not None:
        rec = replace(rec, mean_probes=_partition.probes_per_row(near, index.own))
    return near, rec


def _every_cell(x, index: PartitionIndex, probes: int) -> bool:
    """Whether a search probes every cell of an index too large for per-row probe lists
    (rows × cells entries past ``INDEX_EVERY_CELL_ENTRIES``): the exact kernels then give the
    same answer (probing every cell is exact, bit for bit) without those lists."""
    return probes >= index.cells > 1 and len(x) * index.cells > _config.INDEX_EVERY_CELL_ENTRIES


def _exact_recall(index: PartitionIndex, rec: Recall | None) -> Recall | None:
    """The recall of a calibrated search that ran exactly: 1, whatever the sample measured
    (None stays None: probes given, nothing sampled)."""
    return None if rec is None else Recall(1.0, 1.0, 1.0, index.cells, rec.sample)


def _pair_probes(x, threshold, recall, probes, cells, seed, index, gap=None):
    """(index, probes, gap, recall, scored) of a pair search: the score gap (at most
    ``INDEX_GAP_PROBES`` probes) calibrated for ``recall``, else (no gap reaches it, or
    ``INDEX_GAP_PROBES`` is 0) the probes; unless ``probes`` or ``gap`` are given (gap
    None: a fixed number of probes). ``scored``: every row's probe cells and scores when
    the calibration computed them (:func:`_scored_lists`), else None."""
    threshold = check_threshold(threshold)
    recall = check_recall(recall)
    index, seed, probes = _setup(x, cells, seed, index, probes)
    if gap is not None:
        gap = check_gap(gap)
        probes = probes if probes is not None else max(1, min(index.cells, int(_config.INDEX_GAP_PROBES)))
        return index, probes, gap, None, None
    rec = None
    scored = None
    if probes is None and (len(x) < 2 or index.cells <= 1):
        probes = max(1, index.cells)  # one cell: the search is exact
        rec = Recall(1.0, 1.0, 1.0, probes, 0)
    if probes is None:
        truth = _recall.SampledPairs(x, threshold, index)

        def evidence(sample, rng, nearest=False, gap_probes=None):
            return _recall.pair_evidence(x, index, sample, threshold, rng, nearest, gap_probes, truth)

        evidence.prefetch = truth.prefetch

        density = _recall.cell_density(x, index, threshold, np.random.default_rng([seed, 11]))
        cap = min(index.cells, int(_config.INDEX_GAP_PROBES))
        border = None
        if 0 < cap < index.cells and _config.INDEX_RECALL_BORDER > 0:  # else the search's own
            scored = _scored_lists(x, index, cap)
            border = _recall.border_rows(scored[1])

        def design():
            return _recall.Design(len(x), index, density, border)

        if 0 < cap < index.cells:
            def gap_evidence(s, r):
                return evidence(s, r, gap_probes=cap)

            gap_evidence.prefetch = truth.prefetch
            rec = _recall.calibrate(gap_evidence, len(x), index.cells, recall,
                                    seed, fallback=lambda s, r: evidence(s, r, True, cap),
                                    design=design(), choice=_recall.ScoreGap(cap))
            if rec is not None:
                return index, cap, rec.gap, rec, scored
        rec = _recall.calibrate(evidence, len(x), index.cells, recall, seed,
                                fallback=lambda s, r: evidence(s, r, True),
                                design=design(),
                                largest_exact=_config.INDEX_EXACT_FALLBACK_ROWS)
        probes = rec.probes
    return index, probes, None, rec, None


def partitioned_knn(x: np.ndarray, k: int, *, recall: float = 0.95, probes: int | None = None,
                    cells: int | None = None, seed: int = 0, index: PartitionIndex | None = None,
                    bar=None):
    """The ``k`` most similar other rows of every row of ``x``, through cells.

    Returns ``(scores, rows, recall)``: float32 and int64 arrays (n, min(k, n - 1)) as
    :func:`embedcache.top_k` with ``exclude_self=True`` gives them (best first, ties by the
    lower row, -inf / -1 where a row found fewer), and the :class:`Recall` at k (None when
    ``probes`` was given).
    """
    k = check_k(k)
    recall = check_recall(recall)
    index, seed, probes = _setup(x, cells, seed, index, probes, probe_lists=False)
    kk = max(0, min(k, len(x) - 1))
    if kk == 0:
        return np.empty((len(x), 0), np.float32), np.empty((len(x), 0), np.int64), None
    rec = None
    if probes is None and index.cells <= 1:
        probes = max(1, index.cells)  # one cell: the search is exact
        rec = Recall(1.0, 1.0, 1.0, probes, 0)
    if probes is None:
        truth = _recall.SampledNeighbours(x, kk)

        def evidence(sample, rng):
            return _recall.knn_evidence(x, index, sample, kk, rng, truth)

        evidence.prefetch = truth.prefetch
        rec = _recall.calibrate(evidence, len(x), index.cells, recall, seed,
                                largest_exact=_config.INDEX_EXACT_FALLBACK_ROWS)
        probes = rec.probes
    if _every_cell(x, index, probes):
        from embedcache.kernels import top_k

        s, r = top_k(x, x, kk, exclude_self=True)
        return s, r, _exact_recall(index, rec)
    if bar is not None:
        bar.total = float(len(x)) * (min(probes, index.cells) + 1) * len(x) / max(1, index.cells)
    s, r = _partition.knn(x, index, kk, probes, bar)
    return s, r, rec
