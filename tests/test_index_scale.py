"""The partition index's large-collection paths on small data: two-level assignment against
brute force, and the search and its recall calibration on cells assigned through two levels."""

from __future__ import annotations

import numpy as np
import pytest
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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=matrices(max_rows=40, min_rows=0, max_dim=6), c=matrices(max_rows=25, min_rows=1, max_dim=6),
       p=st.integers(1, 30), chunk=st.sampled_from([1, 3, 1000]), ties=st.booleans())
def test_nearest_cells_are_the_top_k_order_at_one_level_and_through_every_group(x, c, p, chunk, ties):
    """The nearest cells (BLAS products, exact rescoring near each row's p-th best) list the
    cells as top_k does, ties to the lower cell, one level or through every coarse group."""
    from embedcache.index._cells import nearest, nearest_two_level

    d = min(x.shape[1], c.shape[1])
    x, c = np.ascontiguousarray(x[:, :d]), np.ascontiguousarray(c[:, :d])
    if ties and len(c) > 2:
        c[1] = c[2]
    c = ec.normalize(c)
    want = ec.top_k(x, c, min(p, len(c)))[1] if len(x) else np.zeros((0, min(p, len(c))), np.int64)
    with _config.override(CHUNK_ROWS=chunk):
        np.testing.assert_array_equal(nearest(x, c, p), want)
        coarse, member = coarse_groups(c)
        np.testing.assert_array_equal(nearest_two_level(x, c, coarse, member, len(coarse), min(p, len(c))), want)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=matrices(max_rows=40, min_rows=0, max_dim=6), c=matrices(max_rows=25, min_rows=1, max_dim=6),
       p=st.integers(1, 9), groups=st.integers(1, 6), chunk=st.sampled_from([1, 3, 1000]), ties=st.booleans())
def test_two_level_cells_and_scores_are_the_cell_scorers(x, c, p, groups, chunk, ties):
    """The two-level pass (products of each group's rows side by side in one buffer) lists
    the cells :class:`CellScorer` picks among the same groups, with their exact scores as
    :func:`nearest` gives them, whatever the chunk, ties and empty candidate lists."""
    from embedcache.index._cells import _listed_scores, nearest_two_level
    from embedcache.index._knn import CellScorer
    from embedcache.kernels._core import _stats

    d = min(x.shape[1], c.shape[1])
    x, c = np.ascontiguousarray(x[:, :d]), np.ascontiguousarray(c[:, :d])
    if ties and len(c) > 2:
        c[1] = c[2]
    coarse, member = coarse_groups(c)
    m = min(len(coarse), groups)
    p = min(p, len(c))
    want = np.full((len(x), p), -1, np.int64)
    want_s = np.full((len(x), p), -np.inf, np.float32)
    if len(x):
        near = CellScorer(coarse).best(x, m)
        want = CellScorer(c, member).best(x, p, near=near)
        _listed_scores(x, _stats(x, "x")[0], c, _stats(c, "c")[0], want, want_s)
    with _config.override(CHUNK_ROWS=chunk):
        got, got_s = nearest_two_level(x, c, coarse, member, groups, p, scores=True)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_s.view(np.uint32), want_s.view(np.uint32))


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
    """At 95% coverage, 2 misses of 6 runs or fewer happen with probability 0.998."""
    runs = 6
    reached, covered = calibration_runs(runs, INDEX_TWO_LEVEL_CELLS=8, INDEX_COARSE_PROBES=2)
    assert reached >= runs - 1
    assert covered >= runs - 2


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


def test_cells_grow_as_the_rows_beyond_the_square():
    """Up to ``INDEX_ROWS_PER_CELL**2`` rows about sqrt(n) cells; beyond, the mean cell holds
    ``INDEX_ROWS_PER_CELL`` rows (to rounding), whatever n."""
    from embedcache.index._cells import default_cells

    with _config.override(INDEX_ROWS_PER_CELL=50, INDEX_MIN_CELL=8):
        assert default_cells(900) == 30 and default_cells(2500) == 50
        for n in (2600, 10_000, 123_457, 10**7):
            assert n / default_cells(n) < 50.1
            assert default_cells(n) == round(n / 50)


def _assert_every_cell_is_exact(x, index, t, k):
    """Probing every cell of ``index`` gives exact pairs at ``t`` and exact ``k``-NN, bit for bit."""
    from embedcache.index import partitioned_knn

    i, j, s, _ = partitioned_pairs(x, t, probes=index.cells, index=index)
    ks, ki, _ = partitioned_knn(x, k, probes=index.cells, index=index)
    for a, b in zip((i, j, s), ec.similar_pairs(x, t)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip((ks, ki), ec.top_k(x, x, k, exclude_self=True)):
        np.testing.assert_array_equal(a, b)


def test_two_level_training_gives_every_row_a_cell_and_probing_all_is_exact():
    """Above ``INDEX_TWO_LEVEL_CELLS`` the cells are trained inside coarse groups: about the
    cells asked for, unit centroids, every row in a cell, and probing every cell gives the
    exact pairs and neighbours bit for bit."""

    x = _giant_and_block(2000, seed=7)
    with _config.override(INDEX_TWO_LEVEL_CELLS=8, INDEX_MIN_CELL=8, INDEX_ROWS_PER_CELL=40):
        index = PartitionIndex.build(x, seed=0)
        assert index.two_level and len(x) / 40 * 0.8 <= index.cells
        np.testing.assert_allclose(np.linalg.norm(index.centroids, axis=1), 1, atol=1e-5)
        assert index.own.min() >= 0 and index.own.max() < index.cells
        assert index.sizes.sum() == len(x) and (index.sizes > 0).mean() > 0.9
        _assert_every_cell_is_exact(x, index, 0.8, 6)


def test_kmeans_two_level_on_few_directions():
    from embedcache.index._cells import kmeans_two_level

    rng = np.random.default_rng(0)
    assert kmeans_two_level(np.zeros((10, 4), np.float32), 9, rng, 3).shape == (0, 4)
    x = np.repeat(np.eye(4, dtype=np.float32), 30, axis=0)  # four directions only
    cent = kmeans_two_level(x, 16, rng, 3)
    assert len(cent) == 4  # one per direction: a group of one direction trains one centroid
    np.testing.assert_array_equal(np.unique(cent, axis=0), np.unique(np.eye(4, dtype=np.float32), axis=0))


def both_ways_knn(x, index, near, k):
    """The plain reference of :func:`rows_knn`: row r's best ``k`` other rows (the exact
    ``top_k`` order: score descending, ties to the lower row) among the rows j of the cells
    it probes and the rows j that probe its own cell (``near[j]`` holds ``own[r]``)."""
    n = len(x)
    probes = np.zeros((n, index.cells), bool)
    for r in range(n):
        probes[r, near[r][near[r] >= 0]] = True
    cand = probes[:, index.own] | probes[:, index.own].T  # cand[r, j]
    out_s = np.full((n, k), -np.inf, np.float32)
    out_i = np.full((n, k), -1, np.int64)
    if n < 2:
        return out_s, out_i
    s_all, i_all = ec.top_k(x, x, n - 1, exclude_self=True)
    for r in range(n):
        keep = cand[r, i_all[r]]
        m = min(k, int(keep.sum()))
        out_s[r, :m], out_i[r, :m] = s_all[r][keep][:m], i_all[r][keep][:m]
    return out_s, out_i


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_running_lists_equal_the_best_of_both_ways_candidates(dtype):
    """The kNN of indexed rows (one running list per row, each product folded into both rows'
    lists, BLAS filter, exact rescoring) gives the exact best rows among the rows of the cells
    a row probes and the rows that probe its own cell, at every probe count; every cell probed:
    exact ``top_k`` bit for bit."""
    from embedcache.index._knn import rows_knn

    x = _giant_and_block(1500, seed=8).astype(dtype)
    with _config.override(INDEX_MIN_CELL=8, TOPK_QUERY_BLOCK=7):
        index = PartitionIndex.build(x, cells=25, seed=0)
        for probes in (1, 2, 5, index.cells):
            near = _partition.with_own(index.probe_cells(x, probes), index.own)
            got = rows_knn(x, index, near, 7)
            want = both_ways_knn(x, index, near, 7)
            for u, v in zip(got, want):
                np.testing.assert_array_equal(u, v)
        np.testing.assert_array_equal(got[1], ec.top_k(x, x, 7, exclude_self=True)[1])


def test_running_lists_rescore_rows_blas_cannot_score():
    """Rows so small or so large that their BLAS scores cannot be trusted (a NaN filter) are
    rescored one by one, in both directions: the lists still equal the plain reference."""
    from embedcache.index._knn import rows_knn
    from embedcache.kernels._core import _filter_scale, _stats

    x = clustered(400, d=12, clusters=6, seed=4)
    x[::9] *= np.float32(1e-20)
    x[5::11] *= np.float32(1e37)
    inv, norm = _stats(x, "x")
    assert np.isnan(_filter_scale(inv, norm, 1.0, True)).sum() > 60  # the rows scaled once (not both ways)
    with _config.override(INDEX_MIN_CELL=8, TOPK_QUERY_BLOCK=5):
        index = PartitionIndex.build(x, cells=12, seed=0)
        for probes in (1, 3):
            near = _partition.with_own(index.probe_cells(x, probes), index.own)
            got = rows_knn(x, index, near, 6)
            want = both_ways_knn(x, index, near, 6)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), x=matrices(max_rows=30, min_rows=1, max_dim=4), k=st.integers(1, 5),
       chunk=st.sampled_from([1, 3, 1000]))
def test_running_lists_on_any_probe_lists_equal_the_plain_reference(data, x, k, chunk):
    """Any probe lists (a row need not probe its own cell; -1: none), ties, zero and repeated
    rows, odd chunks: the lists equal :func:`both_ways_knn`, each row at most once in a list."""
    from embedcache.index._knn import rows_knn

    with _config.override(INDEX_MIN_CELL=1, TOPK_QUERY_BLOCK=chunk):
        index = PartitionIndex.build(x, cells=data.draw(st.integers(1, 6)), seed=0)
        p = data.draw(st.integers(1, 3))
        near = np.array(data.draw(st.lists(st.integers(-1, index.cells - 1), min_size=len(x) * p,
                                           max_size=len(x) * p)), np.int64).reshape(len(x), p)
        got = rows_knn(x, index, near, k)
    want = both_ways_knn(x, index, near, k)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_counting_sort_by_cell_equals_a_stable_argsort(data):
    from embedcache.index._merge import by_cell

    n = data.draw(st.integers(0, 40))
    p = data.draw(st.integers(1, 4))
    cells = data.draw(st.integers(1, 6))
    near = np.array(data.draw(st.lists(st.integers(-1, cells - 1), min_size=n * p, max_size=n * p)),
                    np.int64).reshape(n, p)
    own = np.array(data.draw(st.lists(st.integers(0, cells - 1), min_size=n, max_size=n)), np.int64)
    for mode in (0, 1, 2):
        m = near
        if mode == 1:
            m = np.where(near == own[:, None], -1, near)
        elif mode == 2:
            m = _partition.with_own(near, own)
        flat = m.ravel()
        rows = np.repeat(np.arange(n), m.shape[1])
        keep = flat >= 0
        by = np.argsort(flat[keep], kind="stable")
        want_rows = rows[keep][by]
        want_starts = np.concatenate([[0], np.cumsum(np.bincount(flat[keep], minlength=cells))])
        got_rows, got_starts = by_cell(near, cells, own if mode else None, mode)
        np.testing.assert_array_equal(got_rows, want_rows)
        np.testing.assert_array_equal(got_starts, want_starts)


def test_calibrated_recall_holds_with_sampled_partners():
    """Pairs searched among a uniform sample of the rows in the calibration (as above
    ``INDEX_RECALL_COLUMNS`` rows): the recall asked for is still reached and the interval
    still covers the true recall."""
    runs = 4
    reached, covered = calibration_runs(runs, INDEX_RECALL_COLUMNS=768)
    assert reached >= runs - 1
    assert covered >= runs - 1


def _lloyd_reference(x, cent, iters):
    """Flat spherical k-means in plain numpy: nearest centroid from the full cosine matrix
    (ties to the lower cell), centroid = normalized float64 sum of its rows, an emptied cell
    restarted at the rows farthest from their centroids (stable order)."""
    u = ec.normalize(x)
    u = u[np.any(u != 0, axis=1)]
    cent = cent.copy()
    for _ in range(iters):
        cos = ec.cosine_similarity(u, cent)
        a = np.argmax(cos, axis=1)
        s = cos[np.arange(len(u)), a]
        empty = [c for c in range(len(cent)) if not (a == c).any()]
        far = np.argsort(s, kind="stable")[: len(empty)]
        new = np.array([u[a == c].astype(np.float64).sum(axis=0) for c in range(len(cent))])
        new[empty] = u[far]
        new = new.astype(np.float32)
        norm = np.linalg.norm(new, axis=1, keepdims=True)
        cent = np.divide(new, norm, out=np.zeros_like(new), where=norm > 0)
    return cent


def _objective(x, cent):
    """Mean cosine of the rows of x to their nearest centroid (the spherical k-means objective)."""
    return float(ec.cosine_similarity(x, cent).max(axis=1).mean())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=matrices(max_rows=40, min_rows=1, max_dim=6), cells=st.integers(1, 8), seed=st.integers(0, 3),
       twin=st.booleans())
def test_a_refinement_round_is_a_plain_lloyd_round_and_never_lowers_the_objective(x, cells, seed, twin):
    """One flat round equals plain numpy Lloyd (ties, zero rows, duplicated rows and an
    emptied cell included: ``twin`` repeats a centroid, so the copy gets no row)."""
    from embedcache.index._cells import refine

    u = ec.normalize(x)
    rows = np.unique(u[np.any(u != 0, axis=1)], axis=0)
    if not len(rows):
        assert refine(x, np.ones((1, x.shape[1]), np.float32) / np.sqrt(x.shape[1]), 2).shape == (1, x.shape[1])
        return
    cent = rows[np.random.default_rng(seed).choice(len(rows), min(cells, len(rows)), replace=False)]
    if twin:
        cent = np.concatenate([cent, cent[:1]])
    got = refine(x, cent, 1)
    np.testing.assert_allclose(got, _lloyd_reference(x, cent, 1), atol=1e-6)
    assert _objective(x, got) >= _objective(x, cent) - 1e-5


def test_flat_refinement_raises_the_two_level_objective_and_probing_all_stays_exact():
    """On clustered rows with two-level cells forced: more flat rounds after two-level
    training give a k-means objective (mean cosine to the nearest centroid) at least as
    high, several rounds equal plain numpy Lloyd, the same seed gives the same index, and
    probing every cell of the refined index is still exact."""
    from embedcache.index._cells import kmeans_two_level

    x = clustered(6000, d=24, clusters=150, noise=0.6, seed=11)
    objective = []
    for rounds in (0, 1, 2, 4):
        cent = kmeans_two_level(x, 120, np.random.default_rng(0), 4, refine_iters=rounds)
        objective.append(_objective(x, cent))
        if rounds == 0:
            start = cent
    assert all(b >= a - 1e-6 for a, b in zip(objective, objective[1:]))
    assert objective[-1] > objective[0] + 1e-3  # the rounds move the border rows' cells
    np.testing.assert_allclose(cent, _lloyd_reference(x, start, 4), atol=1e-5)

    y = x[:2500]
    with _config.override(INDEX_TWO_LEVEL_CELLS=8, INDEX_MIN_CELL=8, INDEX_REFINE_ITERS=3):
        index = PartitionIndex.build(y, cells=60, seed=1)
        again = PartitionIndex.build(y, cells=60, seed=1)
        assert index.two_level
        np.testing.assert_array_equal(index.centroids, again.centroids)
        np.testing.assert_array_equal(index.own, again.own)
        _assert_every_cell_is_exact(y, index, 0.8, 5)


@pytest.mark.parametrize("resplit", [2.0, 0.5])
@pytest.mark.parametrize("two_level", [True, False])
def test_probe_lists_kept_from_the_build_equal_recomputed_ones(monkeypatch, resplit, two_level):
    """The build's one pass over the rows gives every row its cell and its probe list; the
    list kept for the search equals the one computed afresh for the final cells, bit for
    bit, when the big cells were split on the sample before the pass (one pass) and when
    cells are split again after it (``INDEX_RESPLIT`` below 1: lists computed again); the
    cells are those of a build without lists, and so are the pairs."""
    from embedcache.index import _cells

    calls = []
    real = _cells.probe_order
    monkeypatch.setattr(_cells, "probe_order", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _giant_and_block(2000, seed=8)
    with _config.override(INDEX_TWO_LEVEL_CELLS=8 if two_level else 10**6, INDEX_MIN_CELL=8,
                          INDEX_MAX_CELL_FACTOR=1.5, INDEX_RESPLIT=resplit):
        index = PartitionIndex.build(x, cells=60, seed=0)
        assert len(calls) == (1 if resplit == 2.0 else 2)
        plain = PartitionIndex.build(x, cells=60, seed=0, probe_lists=False)
        assert index.cells > 60 and index.two_level == two_level  # big cells were split
        np.testing.assert_array_equal(index.centroids, plain.centroids)
        np.testing.assert_array_equal(index.own, plain.own)
        p = min(index.cells, _config.INDEX_GAP_PROBES)
        kept_cells, kept_sc = index._near["scored"]
        fresh_cells, fresh_sc = plain.probe_cells_scored(x, p)
        np.testing.assert_array_equal(kept_cells, fresh_cells)
        np.testing.assert_array_equal(kept_sc.view(np.uint32), fresh_sc.view(np.uint32))
        short = index.row_cells_scored(x, 3)  # a longer list's first cells
        np.testing.assert_array_equal(short[0], plain.probe_cells_scored(x, 3)[0])
        for a, b in zip(partitioned_pairs(x, 0.8, gap=0.05, index=index)[:3],
                        partitioned_pairs(x, 0.8, gap=0.05, index=plain)[:3]):
            np.testing.assert_array_equal(a, b)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), n=st.integers(0, 40), d=st.integers(1, 4), neg_zero=st.booleans())
def test_distinct_rows_are_the_first_of_each_unique_row(data, n, d, neg_zero):
    """k-means starts from distinct rows: the first occurrence of each row, equal value for
    value (-0.0 as 0.0), as ``numpy.unique(axis=0)`` finds them."""
    from embedcache.index._cells import distinct_rows

    u = np.array(data.draw(st.lists(st.lists(st.sampled_from([-1.0, -0.5, 0.0, 0.5, 1.0]), min_size=d,
                                             max_size=d), min_size=n, max_size=n)), np.float32).reshape(n, d)
    if neg_zero and n:
        u[0] *= -0.0
    want = np.sort(np.unique(u + np.float32(0.0), axis=0, return_index=True)[1]) if n else np.zeros(0, np.int64)
    np.testing.assert_array_equal(distinct_rows(u), want)
