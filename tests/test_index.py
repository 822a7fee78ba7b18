"""The partition index against the exact kernels: equal when every cell is probed, never a
pair or score the exact search would not give, recall intervals that cover the true recall."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embedcache as ec
from embedcache import _config
from embedcache.errors import InvalidInputError
from embedcache.index import PartitionIndex, Recall, partitioned_knn, partitioned_pairs
from embedcache.index._partition import first_of_each, merge_pairs
from embedcache.index._recall import interval, wilson
from tests.support.strategies import matrices


def clustered(n, d=16, clusters=20, noise=0.3, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(clusters, d))
    sizes = rng.zipf(1.6, clusters).astype(float)
    lab = rng.choice(clusters, n, p=sizes / sizes.sum())
    return (c[lab] + noise * rng.normal(size=(n, d))).astype(dtype)


def exact_knn(x, k):
    return ec.top_k(x, x, min(k, len(x) - 1), exclude_self=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=matrices(max_rows=40, min_rows=0), t=st.sampled_from([-0.5, 0.0, 0.5, 0.9, 1.0]),
       cells=st.integers(1, 8), seed=st.integers(0, 3))
def test_every_cell_probed_equals_exact_bit_for_bit(x, t, cells, seed):
    with _config.override(INDEX_MIN_CELL=1):
        index = PartitionIndex.build(x, cells=cells, seed=seed)
    i, j, s, rec = partitioned_pairs(x, t, probes=max(1, index.cells), index=index)
    ei, ej, es = ec.similar_pairs(x, t)
    assert rec is None
    np.testing.assert_array_equal(i, ei)
    np.testing.assert_array_equal(j, ej)
    np.testing.assert_array_equal(s, es)
    if len(x) > 1:
        ks, ki, _ = partitioned_knn(x, 3, probes=max(1, index.cells), index=index)
        es2, ei2 = exact_knn(x, 3)
        np.testing.assert_array_equal(ks, es2)
        np.testing.assert_array_equal(ki, ei2)


def assert_true_pairs(x, t, i, j, s):
    """Every pair ``(i, j, s)`` is a true pair of ``x`` at ``t`` with its exact score, i < j,
    each once, sorted by score descending then i, j."""
    ei, ej, es = ec.similar_pairs(x, t)
    exact = {(a, b): v for a, b, v in zip(ei.tolist(), ej.tolist(), es.tolist())}
    assert (i < j).all()
    assert len(set(zip(i.tolist(), j.tolist()))) == len(i)  # each pair once
    for a, b, v in zip(i.tolist(), j.tolist(), s.tolist()):
        assert exact[(a, b)] == v
    np.testing.assert_array_equal(np.lexsort((j, i, -s)), np.arange(len(i)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=matrices(max_rows=60, min_rows=2, max_dim=5), probes=st.integers(1, 3),
       cells=st.integers(2, 10), t=st.sampled_from([0.0, 0.5, 0.8]))
def test_every_reported_pair_is_true_with_its_exact_score(x, probes, cells, t):
    with _config.override(INDEX_MIN_CELL=1):
        index = PartitionIndex.build(x, cells=cells, seed=1)
    i, j, s, _ = partitioned_pairs(x, t, probes=probes, index=index)
    assert_true_pairs(x, t, i, j, s)
    ks, ki, _ = partitioned_knn(x, 2, probes=probes, index=index)
    full = ec.cosine_similarity(x)
    valid = ki >= 0
    rows = np.nonzero(valid)[0]
    assert (ki[valid] != rows).all()
    np.testing.assert_array_equal(ks[valid], full[rows, ki[valid]])


def test_partitioned_finds_what_it_promises_on_clustered_data():
    x = clustered(3500, seed=3)
    ei, ej, _ = ec.similar_pairs(x, 0.85)
    i, j, s, rec = partitioned_pairs(x, 0.85, recall=0.95, seed=0)
    true = np.isin(i * len(x) + j, ei * len(x) + ej).sum() / len(ei)
    assert true == len(i) / len(ei)  # nothing invented
    assert rec.low <= true <= rec.high or abs(true - rec.estimate) < 0.02
    assert rec.estimate >= 0.9 and rec.probes < PartitionIndex.build(x).cells


@pytest.mark.parametrize("kind", ["giant", "identical", "duplicates", "float16", "few_rows", "zero_rows", "empty"])
def test_adversarial_inputs(kind):
    rng = np.random.default_rng(5)
    if kind == "giant":  # thousands of near-identical rows and a scattered rest
        base = rng.normal(size=32)
        x = np.vstack([base + 1e-3 * rng.normal(size=(1200, 32)), rng.normal(size=(600, 32))]).astype(np.float32)
    elif kind == "identical":
        x = np.tile(rng.normal(size=(1, 8)), (500, 1)).astype(np.float32)
    elif kind == "duplicates":
        x = clustered(800, seed=1)
        x = np.vstack([x, x[:300]])
    elif kind == "float16":
        x = clustered(1500, seed=2, dtype=np.float16)
    elif kind == "few_rows":
        x = clustered(5, seed=2)
    elif kind == "zero_rows":
        x = clustered(300, seed=2)
        x[::7] = 0
    else:
        x = np.zeros((0, 8), np.float32)
    with _config.override(INDEX_MIN_CELL=4):
        index = PartitionIndex.build(x, cells=64, seed=0)
        assert index.cells <= max(1, len(x))
        assert index.order.shape == (len(x),) and index.offsets[-1] == len(x)
        if kind == "giant":  # the cluster is split: no cell near the 3000 rows
            assert index.sizes.max() <= 600
        i, j, s, _ = partitioned_pairs(x, 0.9, probes=max(1, index.cells), index=index)
        ei, ej, es = ec.similar_pairs(x, 0.9)
        np.testing.assert_array_equal(s, es)
        np.testing.assert_array_equal(i, ei)
        np.testing.assert_array_equal(j, ej)
        i, j, s, rec = partitioned_pairs(x, 0.9, recall=0.9, index=index)
        assert np.isin(i * len(x) + j, ei * len(x) + ej).all()


def test_giant_cluster_work_stays_near_linear():
    """Cost grows with the sum of squared cell sizes: a big cluster must be split."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=32)
    giant = base + 0.05 * rng.normal(size=(20000, 32))
    x = np.vstack([giant, rng.normal(size=(4000, 32))]).astype(np.float32)
    index = PartitionIndex.build(x, seed=0)
    sq = float((index.sizes.astype(float) ** 2).sum())
    assert sq < 0.02 * len(x) ** 2, (index.cells, index.sizes.max())


def test_bad_arguments_raise_clear_errors():
    x = clustered(100)
    with pytest.raises(InvalidInputError, match="recall must be in"):
        partitioned_pairs(x, 0.9, recall=1.5)
    with pytest.raises(InvalidInputError, match="cells must be >= 1"):
        PartitionIndex.build(x, cells=0)
    with pytest.raises(InvalidInputError, match="index covers"):
        partitioned_knn(x[:50], 3, index=PartitionIndex.build(x))


def test_same_seed_same_index():
    x = clustered(3000)
    a, b = PartitionIndex.build(x, seed=4), PartitionIndex.build(x, seed=4)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.own, b.own)


# --------------------------------------------------------------------------- the interval


def test_wilson_matches_the_textbook_values():
    low, high = wilson(81, 263)  # Wilson (1927) example as tabulated by Newcombe (1998)
    assert round(low, 4) == 0.2553 and round(high, 4) == 0.3662
    assert wilson(0, 0) == (0.0, 1.0)


def test_interval_covers_the_true_recall_at_about_the_stated_rate():
    """Simulated rows with correlated pair outcomes: the true ratio falls inside the
    interval in at least ~93% of repetitions (stated 95%)."""
    rng = np.random.default_rng(0)
    true_recall = 0.97
    hits = 0
    reps = 400
    for _ in range(reps):
        m = rng.geometric(0.3, 300)  # true pairs per sampled row, many rows with several
        p_row = rng.beta(true_recall * 8, (1 - true_recall) * 8, 300)  # rows differ
        f = rng.binomial(m, p_row)
        est, low, high = interval(f, m)
        hits += low <= true_recall <= high
    assert hits / reps >= 0.93


def test_calibrated_recall_interval_covers_the_truth_on_small_sets():
    """The reported interval contains the recall measured against the exact answer, in most
    of several independent runs (different data and seeds)."""
    covered = 0
    runs = 12
    with _config.override(INDEX_RECALL_SAMPLE=300):
        for seed in range(runs):
            x = clustered(2000, d=12, clusters=60, noise=0.6, seed=seed)
            ei, ej, _ = ec.similar_pairs(x, 0.8)
            i, j, _, rec = partitioned_pairs(x, 0.8, recall=0.9, seed=seed, cells=40)
            true = len(i) / len(ei)
            assert isinstance(rec, Recall)
            covered += rec.low <= true <= rec.high
    assert covered >= runs - 2


def test_interval_covers_when_a_few_rows_hold_most_pairs():
    """Heavy-tailed rows (6% of rows hold 99% of the pairs, misses concentrated in a few of
    them, as near-identical blocks and giant clusters make them): the truth falls inside the
    interval at about the stated rate, and above its lower bound in >= 97% of samples. (The
    interval without the effective degrees of freedom covered 91% and overclaimed in 6%.)"""
    rng = np.random.default_rng(0)
    n = 20000
    heavy = rng.random(n) < 0.06
    m = np.where(heavy, np.minimum(3000, (rng.pareto(1.2, n) + 1) * 200),
                 rng.geometric(0.5, n) * (rng.random(n) < 0.15)).astype(np.int64)
    p_row = np.where(rng.random(n) < np.where(heavy, 0.08, 0.02), rng.beta(2, 2, n), 1.0)
    f = rng.binomial(m, p_row)
    truth = f.sum() / m.sum()
    covered = below = 0
    reps = 400
    for _ in range(reps):
        s = rng.choice(n, 1000, replace=False)
        _, low, high = interval(f[s], m[s])
        covered += low <= truth <= high
        below += truth < low
    assert covered / reps >= 0.93
    assert below / reps <= 0.03


def _giant_and_block(n=3000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = clustered(n, d=d, clusters=40, noise=0.5, seed=seed)
    giant = rng.normal(size=d) * 3 + 0.6 * rng.normal(size=(n // 2, d))  # one big cluster, split
    block = rng.normal(size=d) + 1e-4 * rng.normal(size=(n // 10, d))  # near-identical rows
    return np.vstack([x, giant, block]).astype(np.float32)


def test_recall_evidence_predicts_exactly_what_the_search_finds():
    """For a fixed index (big cells split, a near-identical block kept whole) and any probe
    count, the evidence's found / missed for every true pair (and every true neighbour) is
    what the search returns. (The evidence is built once and checked against 1, 2, 3 and 5
    probes.)"""
    from embedcache.index import _partition, _recall

    x = _giant_and_block(2000)
    n = len(x)
    with _config.override(INDEX_MIN_CELL=8, INDEX_MAX_CELL_FACTOR=1.5, INDEX_RECALL_PAIRS_PER_ROW=10**9):
        index = PartitionIndex.build(x, cells=30, seed=2)
        assert index.cells > 30  # the giant cluster was split
        ev = _recall.pair_evidence(x, index, np.arange(n), 0.8, np.random.default_rng(0))
        kev = _recall.knn_evidence(x, index, np.arange(n), 5, np.random.default_rng(0))
        a, b = np.minimum(ev.row, ev.partner), np.maximum(ev.row, ev.partner)
        for probes in (1, 2, 3, 5):
            i, j, _ = _partition.pairs(x, index, 0.8, probes)
            found = np.isin(a * n + b, i * n + j)
            assert 0 < found.mean() < 1
            np.testing.assert_array_equal(ev.need <= probes, found, err_msg=f"pairs, {probes} probes")
            _, rows = _partition.knn(x, index, 5, probes)
            got = (rows[kev.row] == kev.partner[:, None]).any(axis=1)
            np.testing.assert_array_equal(kev.need <= probes, got, err_msg=f"knn, {probes} probes")


def test_calibration_reaches_the_recall_asked_for_on_the_whole_collection():
    """The recall of the whole collection (every true pair, not a sample) at the chosen
    probes reaches the target in nearly every run, and the reported interval covers it."""
    runs = 8
    reached, covered = calibration_runs(runs)
    assert reached >= runs - 1
    assert covered >= runs - 1


def calibration_runs(runs, **knobs):
    """Over ``runs`` seeds of giant-cluster data, pairs at recall 0.95 asked: (runs whose true
    recall reached 0.95, runs whose reported interval covers the true recall)."""
    reached = covered = 0
    with _config.override(INDEX_RECALL_SAMPLE=400, INDEX_MIN_CELL=16, **knobs):
        for seed in range(runs):
            x = _giant_and_block(1600, seed=seed)
            ei, ej, _ = ec.similar_pairs(x, 0.8)
            i, j, _, rec = partitioned_pairs(x, 0.8, recall=0.95, seed=seed, cells=40)
            true = len(i) / len(ei)
            reached += true >= 0.95
            covered += rec.low <= true <= rec.high
    return reached, covered


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6),
                                   st.sampled_from([0.5, 0.75, 0.9, 1.0])), max_size=8), max_size=4))
def test_merge_pairs_lists_each_pair_once_by_score_then_i_then_j(parts):
    n = 7
    score = {}  # a pair found twice has one score: the first part's
    for part in parts:
        for i, j, s in part:
            if i != j:
                score.setdefault((min(i, j), max(i, j)), s)
    arrays = [(np.array([i for i, j, _ in p if i != j], np.int64), np.array([j for i, j, _ in p if i != j], np.int64),
               np.array([score[min(i, j), max(i, j)] for i, j, _ in p if i != j], np.float32)) for p in parts]
    a, b, s = merge_pairs(arrays, n)
    want = sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))
    assert list(zip(a.tolist(), b.tolist())) == [k for k, _ in want]
    assert s.tolist() == [np.float32(v) for _, v in want]


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30),
                                         st.sampled_from([-1.0, -0.5, -0.0, 0.0, 0.25, 0.9, 0.9000001, 1.0])),
                               max_size=12), max_size=6),
       spill=st.integers(1, 9), band=st.integers(1, 7), unique=st.booleans())
def test_merge_pairs_spilled_and_sorted_in_bands_equals_one_sort(parts, spill, band, unique):
    """Runs written to a temporary file past INDEX_SPILL_PAIRS and sorted in score bands of
    INDEX_SORT_BAND pairs: the same list as one sort of the distinct pairs (-0.0 ties 0.0)."""
    n = 31
    score = {}
    for part in parts:
        for i, j, v in part:
            if i != j:
                score.setdefault((min(i, j), max(i, j)), v)
    seen = set()
    arrays = []
    for part in parts:
        rows = [(i, j) for i, j, _ in part if i != j and (not unique or (min(i, j), max(i, j)) not in seen)]
        seen.update((min(i, j), max(i, j)) for i, j in rows)
        if unique:
            rows = list(dict.fromkeys(rows, None))
            rows = [r for k, r in enumerate(rows) if (min(r), max(r)) not in {(min(q), max(q)) for q in rows[:k]}]
        arrays.append((np.array([i for i, _ in rows], np.int64), np.array([j for _, j in rows], np.int64),
                       np.array([score[min(r), max(r)] for r in rows], np.float32)))
    with _config.override(INDEX_SPILL_PAIRS=spill, INDEX_SORT_BAND=band):
        a, b, s = merge_pairs(arrays, n, unique=unique)
    want = sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))
    assert list(zip(a.tolist(), b.tolist())) == [k for k, _ in want]
    assert s.tolist() == [np.float32(v) for _, v in want]
    assert a.dtype == b.dtype == np.int64 and s.dtype == np.float32


@given(st.lists(st.integers(-3, 3), max_size=30))
def test_first_of_each_is_where_unique_finds_each_value(keys):
    keys = np.array(keys, np.int64)
    assert np.array_equal(first_of_each(keys), np.unique(keys, return_index=True)[1])


def test_probing_every_cell_of_a_large_index_runs_the_exact_kernels(monkeypatch):
    """Past INDEX_EVERY_CELL_ENTRIES (rows × cells), probing every cell goes straight to the
    exact kernels: the same answer, without a per-row list of every cell (which at millions of
    rows would not fit in memory)."""
    from embedcache.index import _partition, partitioned_forest

    x = clustered(400, seed=3)
    with _config.override(INDEX_MIN_CELL=1):
        index = PartitionIndex.build(x, cells=6, seed=0)

    def listed(*a, **k):
        raise AssertionError("a per-row list of every cell was built")

    ei, ej, es = ec.similar_pairs(x, 0.8)
    ks, ki = exact_knn(x, 4)
    parent = np.arange(len(x))
    ec.kernels.pairs.threshold_forest(x, 0.8, parent)
    with _config.override(INDEX_EVERY_CELL_ENTRIES=0):
        for name in ("pairs", "forest", "knn"):
            monkeypatch.setattr(_partition, name, listed)
        i, j, s, rec = partitioned_pairs(x, 0.8, probes=index.cells, index=index)
        assert rec is None
        np.testing.assert_array_equal(i, ei), np.testing.assert_array_equal(j, ej)
        np.testing.assert_array_equal(s, es)
        s2, r2, _ = partitioned_knn(x, 4, probes=index.cells, index=index)
        np.testing.assert_array_equal(s2, ks), np.testing.assert_array_equal(r2, ki)
        p2 = np.arange(len(x))
        partitioned_forest(x, 0.8, p2, probes=index.cells, index=index)
        r1, r2 = ec.kernels.pairs.forest_roots(parent), ec.kernels.pairs.forest_roots(p2)
        np.testing.assert_array_equal(r1[:, None] == r1[None, :], r2[:, None] == r2[None, :])
    monkeypatch.undo()
    # below the limit the partitioned search itself runs (and still equals exact)
    i, j, s, _ = partitioned_pairs(x, 0.8, probes=index.cells, index=index)
    np.testing.assert_array_equal(i, ei)
