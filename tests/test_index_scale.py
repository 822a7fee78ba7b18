"""The partition index's large-collection paths on small data: two-level assignment against
brute force, and the search and its recall calibration on cells assigned through two levels."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embedcache as ec
from embedcache import _config
from embedcache.index import PartitionIndex, _partition, _recall, partitioned_pairs
from embedcache.index._cells import assign, assign_two_level, coarse_groups
from tests.support.strategies import matrices
from tests.test_index import _giant_and_block, calibration_runs, clustered


def brute(x, cent):
    """Nearest centroid of every row from the full score matrix (ties to the lower cell)."""
    s = ec.cosine_similarity(x, cent)
    return np.argmax(s, axis=1) if len(x) else np.zeros(0, np.int64)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=matrices(max_rows=50, min_rows=0, max_dim=6), c=matrices(max_rows=30, min_rows=1, max_dim=6),
       chunk=st.sampled_from([1, 3, 1000]))
def test_two_level_looking_into_every_group_equals_brute_force(x, c, chunk):
    d = min(x.shape[1], c.shape[1])
    x, c = np.ascontiguousarray(x[:, :d]), np.ascontiguousarray(c[:, :d])
    with _config.override(CHUNK_ROWS=chunk):
        got = assign_two_level(x, c, groups=len(c))
    np.testing.assert_array_equal(got, brute(x, c))


def test_two_level_agrees_with_brute_force_on_clustered_rows():
    """With the default coarse probes most rows get their nearest cell, and the others a cell
    almost as near (here many centroids sit in one cluster: near-ties across groups)."""
    x = clustered(20000, d=32, clusters=200, noise=0.5, seed=1)
    rng = np.random.default_rng(0)
    cent = ec.normalize(x[rng.choice(len(x), 900, replace=False)])
    exact = brute(x, cent)
    got = assign_two_level(x, cent)
    assert (got == exact).mean() >= 0.85
    s = ec.cosine_similarity(x, cent)
    rows = np.arange(len(x))
    assert np.quantile(s[rows, exact] - s[rows, got], 0.99) < 0.05
    with _config.override(INDEX_TWO_LEVEL_CELLS=100):  # assign() switches to two levels
        np.testing.assert_array_equal(assign(x, cent), got)
    np.testing.assert_array_equal(assign(x, cent), exact)


def test_coarse_groups_cover_every_cell():
    cent = ec.normalize(clustered(400, d=16, seed=2))
    coarse, member = coarse_groups(cent)
    assert len(coarse) == 20 and member.shape == (400,)
    assert member.min() >= 0 and member.max() < len(coarse)


def test_two_level_index_every_cell_probed_equals_exact():
    x = _giant_and_block(2000, seed=3)
    with _config.override(INDEX_TWO_LEVEL_CELLS=8, INDEX_COARSE_PROBES=1, INDEX_MIN_CELL=8):
        index = PartitionIndex.build(x, cells=60, seed=0)
        i, j, s, _ = partitioned_pairs(x, 0.8, probes=index.cells, index=index)
    ei, ej, es = ec.similar_pairs(x, 0.8)
    np.testing.assert_array_equal(i, ei)
    np.testing.assert_array_equal(j, ej)
    np.testing.assert_array_equal(s, es)


def test_evidence_predicts_the_search_on_two_level_cells():
    """Cells assigned through one coarse probe (so some rows are not in their nearest cell):
    the recall evidence still says, pair by pair, what the search finds."""
    x = _giant_and_block(2000, seed=4)
    n = len(x)
    with _config.override(INDEX_TWO_LEVEL_CELLS=8, INDEX_COARSE_PROBES=1, INDEX_MIN_CELL=8,
                          INDEX_RECALL_PAIRS_PER_ROW=10**9):
        index = PartitionIndex.build(x, cells=60, seed=2)
        nearest = brute(x, index.centroids)
        assert (index.own != nearest).any()  # the case this test is about
        ev = _recall.pair_evidence(x, index, np.arange(n), 0.8, np.random.default_rng(0))
        assert index.two_level  # probing goes through the coarse groups too
        near = index.probe_cells(x, index.cells - 1)
        assert (near < 0).any()  # rows that never probe some cells short of all of them
        kev = _recall.knn_evidence(x, index, np.arange(n), 5, np.random.default_rng(0))
        for probes in (1, 3, 40):
            i, j, _ = _partition.pairs(x, index, 0.8, probes)
            a, b = np.minimum(ev.row, ev.partner), np.maximum(ev.row, ev.partner)
            np.testing.assert_array_equal(ev.need <= probes, np.isin(a * n + b, i * n + j))
            _, rows = _partition.knn(x, index, 5, probes)
            got = (rows[kev.row] == kev.partner[:, None]).any(axis=1)
            np.testing.assert_array_equal(kev.need <= probes, got)


def test_two_level_probing_through_every_group_is_the_exact_cell_order():
    x = _giant_and_block(1000, seed=6)
    with _config.override(INDEX_TWO_LEVEL_CELLS=8, INDEX_MIN_CELL=8):
        index = PartitionIndex.build(x, cells=40, seed=0)
        groups = len(index._groups()[0])
        with _config.override(INDEX_COARSE_PROBES=groups):
            np.testing.assert_array_equal(index.probe_cells(x, 7), index.nearest_cells(x, 7))
        np.testing.assert_array_equal(index.probe_cells(x, index.cells), index.nearest_cells(x, index.cells))


def test_calibrated_recall_holds_on_two_level_cells():
    runs = 4
    reached, covered = calibration_runs(runs, INDEX_TWO_LEVEL_CELLS=8, INDEX_COARSE_PROBES=2)
    assert reached >= runs - 1
    assert covered >= runs - 1


def test_memmap_rows_give_the_same_index_and_pairs(tmp_path):
    """A collection on disk (memmap, as at 10M rows) gives what the same rows in memory give."""
    x = _giant_and_block(1500, seed=5)
    path = tmp_path / "x.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    with _config.override(INDEX_MIN_CELL=8, CHUNK_ROWS=100):
        a, b = PartitionIndex.build(x, cells=30, seed=1), PartitionIndex.build(mm, cells=30, seed=1)
        np.testing.assert_array_equal(a.own, b.own)
        np.testing.assert_array_equal(a.sorted_rows(x), x[a.order])
        np.testing.assert_array_equal(b.sorted_rows(mm), x[a.order])
        got = partitioned_pairs(mm, 0.8, probes=2, index=b)[:3]
        for u, v in zip(got, partitioned_pairs(x, 0.8, probes=2, index=a)[:3]):
            np.testing.assert_array_equal(u, v)
