"""Probing by score gap: a row searches its own cell and those of its first cells whose centroid
scores within a gap of its best. Against the exact kernels (every cell within an infinite gap:
bit for bit), against a plain reference of the rule, and the calibration's evidence against
what the search finds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embedcache as ec
from embedcache import _config
from embedcache.errors import InvalidInputError, InvalidInputTypeError
from embedcache.index import PartitionIndex, Recall, _partition, _recall, partitioned_forest, partitioned_pairs
from embedcache.index._source import source_of
from tests.support.strategies import matrices
from tests.test_index import _giant_and_block, assert_true_pairs, clustered


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=matrices(max_rows=40, min_rows=0), t=st.sampled_from([-0.5, 0.0, 0.5, 0.9, 1.0]),
       cells=st.integers(1, 8), seed=st.integers(0, 3))
def test_every_cell_within_an_infinite_gap_equals_exact_bit_for_bit(x, t, cells, seed):
    """Also with a cell's own pairs searched in bands of 2 rows (its parts are still told
    apart from the probing rows' pairs, whose copies are dropped)."""
    with _config.override(INDEX_MIN_CELL=1):
        index = PartitionIndex.build(x, cells=cells, seed=seed)
    with _config.override(INDEX_TRIANGLE_ROWS=2):
        i, j, s, rec = partitioned_pairs(x, t, probes=max(1, index.cells), gap=math.inf, index=index)
    ei, ej, es = ec.similar_pairs(x, t)
    assert rec is None
    np.testing.assert_array_equal(i, ei)
    np.testing.assert_array_equal(j, ej)
    np.testing.assert_array_equal(s, es)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=matrices(max_rows=60, min_rows=2, max_dim=5), probes=st.integers(1, 4),
       cells=st.integers(2, 10), t=st.sampled_from([0.0, 0.5, 0.8]),
       gap=st.sampled_from([0.0, 1e-3, 0.05, 0.3, 2.0]))
def test_every_pair_found_by_gap_is_true_with_its_exact_score(x, probes, cells, t, gap):
    with _config.override(INDEX_MIN_CELL=1):
        index = PartitionIndex.build(x, cells=cells, seed=1)
    i, j, s, _ = partitioned_pairs(x, t, probes=probes, gap=gap, index=index)
    with _config.override(INDEX_TRIANGLE_ROWS=3):  # cells searched in bands: the same pairs
        bi, bj, bs, _ = partitioned_pairs(x, t, probes=probes, gap=gap, index=index)
    np.testing.assert_array_equal(bi, i)
    np.testing.assert_array_equal(bj, j)
    np.testing.assert_array_equal(bs, s)
    assert_true_pairs(x, t, i, j, s)
    # a wider gap finds a superset, and so does the forest: the same components
    wi, wj, _, _ = partitioned_pairs(x, t, probes=probes, gap=gap + 0.5, index=index)
    assert set(zip(i.tolist(), j.tolist())) <= set(zip(wi.tolist(), wj.tolist()))
    parent = np.arange(len(x), dtype=np.int64)
    partitioned_forest(x, t, parent, probes=probes, gap=gap, index=index)
    root = _roots(parent)
    assert (root[i] == root[j]).all()
    assert len(np.unique(root)) == len(x) - _spanning(len(x), i, j)


def _roots(parent):
    from embedcache.kernels.pairs import forest_roots

    return forest_roots(parent)


def _spanning(n, i, j):
    """Edges of a spanning forest of the pairs: n - components."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    return n - connected_components(g, directed=False)[0]


@settings(max_examples=100, deadline=None)
@given(scores=st.lists(st.lists(st.floats(-1, 1, width=32), min_size=4, max_size=4), min_size=1, max_size=12),
       holes=st.lists(st.booleans(), min_size=48, max_size=48), gap=st.floats(0, 2.5))
def test_within_gap_is_the_plain_rule(scores, holes, gap):
    sc = np.array(scores, np.float32)
    n, p = sc.shape
    near = np.arange(n * p, dtype=np.int32).reshape(n, p) % 7
    near[np.array(holes[: n * p]).reshape(n, p)] = -1
    got = _partition.within_gap(near, sc, gap)
    g = _partition.row_gaps(near, sc)
    for r in range(n):
        listed = [float(sc[r, t]) for t in range(p) if near[r, t] >= 0]
        best = max(listed) if listed else -math.inf
        for t in range(p):
            keep = near[r, t] >= 0 and best - float(sc[r, t]) <= gap
            assert got[r, t] == (near[r, t] if keep else -1)
            assert (g[r, t] <= gap) == keep
    assert _partition.probes_per_row(got, np.zeros(n, np.int64)) == pytest.approx(
        1 + ((got >= 0) & (got != 0)).sum() / n)


def test_gap_evidence_predicts_exactly_what_the_search_finds():
    """For a fixed index (big cells split, a block kept whole) and any gap, the evidence's
    found / missed for every true pair is what the search by that gap returns."""
    x = _giant_and_block(2000)
    n = len(x)
    with _config.override(INDEX_MIN_CELL=8, INDEX_MAX_CELL_FACTOR=1.5, INDEX_RECALL_PAIRS_PER_ROW=10**9):
        index = PartitionIndex.build(x, cells=30, seed=2)
        ev = _recall.pair_evidence(x, index, np.arange(n), 0.8, np.random.default_rng(0), gap_probes=4)
    a, b = np.minimum(ev.row, ev.partner), np.maximum(ev.row, ev.partner)
    gaps = np.quantile(ev.need[np.isfinite(ev.need) & (ev.need > 0)], [0.0, 0.3, 0.7])
    for gap in [0.0, *gaps, math.inf]:
        near = _partition.probed(source_of(x), index, 4, gap)
        i, j, _ = _partition.pairs(x, index, 0.8, 4, near=near)
        found = np.isin(a * n + b, i * n + j)
        assert 0 < found.mean() <= 1
        said = (ev.need <= gap) & np.isfinite(ev.need)  # inf: beyond the listed cells, never
        np.testing.assert_array_equal(said, found, err_msg=f"gap {gap}")
        np.testing.assert_array_equal(ev.found(gap), np.bincount(ev.row[found], minlength=n))


def test_calibrated_gap_reaches_the_recall_and_probes_fewer_cells():
    """On clustered data the calibrated gap reaches the recall asked for on the whole
    collection, reports the gap and the mean probes per row (fewer than its cap), and the
    interval covers the truth."""
    runs, reached, covered = 6, 0, 0
    with _config.override(INDEX_RECALL_SAMPLE=400, INDEX_MIN_CELL=16, INDEX_GAP_PROBES=12):
        for seed in range(runs):
            x = _giant_and_block(1600, seed=seed)
            ei, _, _ = ec.similar_pairs(x, 0.8)
            i, _, _, rec = partitioned_pairs(x, 0.8, recall=0.95, seed=seed, cells=40)
            assert rec.gap is not None and rec.probes == 12
            assert 1.0 <= rec.mean_probes < rec.probes
            assert f"{rec.mean_probes:.2f} probes per row" in str(rec)
            true = len(i) / len(ei)
            reached += true >= 0.95
            covered += rec.low <= true <= rec.high
    assert reached >= runs - 1
    assert covered >= runs - 1


def test_a_recall_out_of_the_gap_rules_reach_falls_back_to_a_number_of_probes():
    """With one listed cell per row the gap rule cannot find pairs across cells a row does
    not list first: recall 1.0 asked is out of its reach, and the calibration chooses a
    number of probes instead (no gap reported)."""
    x = clustered(3000, seed=5)
    with _config.override(INDEX_RECALL_SAMPLE=300, INDEX_GAP_PROBES=1):
        _, _, _, rec = partitioned_pairs(x, 0.85, recall=1.0, seed=0, cells=30)
    assert isinstance(rec, Recall) and rec.gap is None and rec.mean_probes is None


def test_gap_calibration_moves_up_when_a_measurement_misses_the_target():
    """The calibration sample finds everything at gap 0.01; later samples need 0.05 for a
    fifth of their pairs: the gap is chosen again on all the evidence, checked afresh, and
    the recall reported measured on the report's own sample."""
    calls = []

    def evidence_of(sample, rng):
        calls.append(len(sample))
        m = len(sample)
        row = np.repeat(np.arange(m), 5)
        need = np.tile([-1.0, 0.0, 0.01, 0.01, 0.01 if len(calls) == 1 else 0.05], m)
        return _recall.Evidence(np.full(m, 5.0), row, need, np.ones(len(row)))

    with _config.override(INDEX_RECALL_SAMPLE=300, INDEX_RECALL_ROUNDS=3):
        rec = _recall.calibrate(evidence_of, 10_000, 50, 0.95, seed=0, choice=_recall.ScoreGap(8))
    assert len(calls) == 4
    assert rec.gap == 0.05 and rec.probes == 8 and rec.estimate == 1.0 and rec.low > 0.95


def test_smallest_gap_is_the_first_whose_lower_bound_reaches_the_target():
    rng = np.random.default_rng(0)
    m = 400
    row = np.repeat(np.arange(m), 4)
    need = np.where(rng.random(4 * m) < 0.9, -1.0, rng.uniform(0, 0.2, 4 * m))
    need[rng.random(4 * m) < 0.005] = np.inf
    ev = _recall.Evidence(np.full(m, 4.0), row, need, np.ones(4 * m))
    got = ev.smallest_gap(0.97, 0.9)
    steps = np.unique(np.concatenate([[0.0], need[np.isfinite(need) & (need > 0)]]))
    lows = np.array([ev.interval(v, 0.8)[1] for v in steps])
    assert got == steps[np.argmax(lows >= 0.97)]
    assert ev.smallest_gap(0.9999, 0.9) == math.inf  # some pairs are never found
    assert ev.smallest_gap(0.5, 0.5) == 0.0


def test_bad_gaps_raise_clear_errors():
    x = clustered(300, seed=1)
    with pytest.raises(InvalidInputError, match="gap must be >= 0"):
        partitioned_pairs(x, 0.9, gap=-0.1)
    with pytest.raises(InvalidInputError, match="gap must be >= 0"):
        partitioned_pairs(x, 0.9, gap=float("nan"))
    with pytest.raises(InvalidInputTypeError, match="gap must be a number"):
        partitioned_pairs(x, 0.9, gap="wide")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=matrices(max_rows=70, min_rows=0, max_dim=5), band=st.integers(1, 9), t=st.sampled_from([0.0, 0.7, 1.0]))
def test_a_cell_searched_in_bands_gives_the_exact_triangle(x, band, t):
    """Bands of a few rows (each with itself and the rows after it) give the pairs and
    scores of one exact search of the cell."""
    with _config.override(INDEX_TRIANGLE_ROWS=band):
        parts = list(_partition._triangle(x, t))
    i = np.concatenate([p[0] for p in parts])
    j = np.concatenate([p[1] for p in parts])
    s = np.concatenate([p[2] for p in parts])
    order = np.lexsort((j, i, -s))
    ei, ej, es = ec.similar_pairs(x, t)
    np.testing.assert_array_equal(i[order], ei)
    np.testing.assert_array_equal(j[order], ej)
    np.testing.assert_array_equal(s[order], es)


def test_rows_of_small_cells_probe_all_their_first_cells():
    """A row of a cell of at most ``INDEX_GAP_SMALL_CELL`` rows keeps every listed cell at
    gap 0; the other rows only their best; the calibration's needs say the same."""
    x = _giant_and_block(1200, seed=4)
    with _config.override(INDEX_MIN_CELL=4, INDEX_GAP_SMALL_CELL=12):
        index = PartitionIndex.build(x, cells=60, seed=0)
        small = index.small_cells()
        assert small.any() and not small.all()
        near = _partition.probed(source_of(x), index, 3, 0.0)
        listed = index.probe_cells(x, 3)
        wide = small[index.own]
        np.testing.assert_array_equal(near[wide], listed[wide])
        assert ((near[~wide] >= 0).sum(axis=1) <= 2).all()  # the best (and exact ties)
        rows = np.repeat(np.arange(len(x)), 3)
        need = index.gaps_needed(x, rows, listed.ravel(), 3, index.own)
        np.testing.assert_array_equal(need <= 0.0, (near >= 0).ravel())


def test_sampled_pairs_in_one_pass_are_each_rows_exact_pairs():
    """Rows of several samples (repeats included) searched in one pass, or added later:
    each sampled row's partners are its exact pairs, the row itself left out."""
    x = clustered(900, d=8, seed=2)
    truth = _recall.SampledPairs(x, 0.9)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 900, 50), rng.integers(0, 900, 40)
    truth.prefetch(np.concatenate([a, b]))
    ei, ej, _ = ec.similar_pairs(x, 0.9)
    for sample in (np.sort(a), np.sort(b), np.sort(rng.integers(0, 900, 30))):
        qi, jj = truth(sample)
        want = sorted((q, int(j)) for q, r in enumerate(sample.tolist())
                      for j in np.concatenate([ej[ei == r], ei[ej == r]]).tolist())
        assert sorted(zip(qi.tolist(), jj.tolist())) == want
