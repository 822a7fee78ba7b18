"""The calibration's exact pairs of sampled rows, searched only in the bands of cells that can
hold one (:mod:`embedcache.index._truth`): the plain scan's pairs and scores, bit for bit."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embedcache as ec
from embedcache import _config
from embedcache.engine import InProcess
from embedcache.engine._jobs import store_state
from embedcache.engine._source import StoreSource
from embedcache.index import PartitionIndex, _recall, _truth
from embedcache.index._source import ArraySource
from embedcache.kernels.pairs import pair_order


def _sorted(i, j, s):
    o = pair_order(i, j, s)
    return i[o], j[o], s[o]


def _assert_same(got, want):
    for g, w in zip(_sorted(*got), want):
        assert np.array_equal(g, w)


def _vectors(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "giant":  # one cluster of near-identical rows holds most of them
        base = rng.standard_normal(d)
        x = base + 0.02 * rng.standard_normal((n, d))
        x[: n // 5] = rng.standard_normal((n // 5, d))
    elif kind == "identical":
        x = np.tile(rng.standard_normal(d), (n, 1))
    elif kind == "clusters":
        centres = rng.standard_normal((6, d))
        x = centres[rng.integers(0, 6, n)] + 0.4 * rng.standard_normal((n, d))
    else:
        x = rng.standard_normal((n, d))
    x = x.astype(np.float32)
    k = min(n, int(rng.integers(0, 4)))
    x[rng.choice(n, k, replace=False)] = 0.0  # zero rows: score 0 with everything
    copies = rng.choice(n, min(n, 6), replace=False)
    x[copies[3:]] = x[copies[:3]][: len(copies[3:])]  # exact copies
    return x


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["giant", "identical", "clusters", "noise"]),
       n=st.integers(2, 600), d=st.sampled_from([3, 8, 24]), seed=st.integers(0, 2**16),
       threshold=st.sampled_from([-0.999, -0.5, 0.0, 1e-6, 0.3, 0.8, 0.95, 0.999, 0.99999, 1.0]),
       half=st.booleans(), band=st.sampled_from([1, 3, 16, 256]), cells=st.integers(1, 12))
def test_pairs_searched_by_band_are_the_plain_scan_bit_for_bit(kind, n, d, seed, threshold, half, band, cells):
    x = _vectors(kind, n, d, seed)
    if half:
        x = x.astype(np.float16)
    rng = np.random.default_rng(seed)
    q = np.asarray(x[rng.choice(n, min(n, 40), replace=False)], np.float32)
    index = PartitionIndex.build(x, cells=min(cells, n), seed=seed % 7)
    src = ArraySource(x)
    want = ec.similar_pairs(q, threshold, y=x)
    with _config.override(INDEX_RECALL_TRUTH_BAND=band, INDEX_RECALL_TRUTH_SHARE=1.0):
        if _truth.prunes(src, index, threshold):
            _assert_same(_truth.sampled_pairs(src, index, q, threshold), want)
        else:  # one cell, or a threshold at or below the rounding margin: the plain scan
            assert index.cells <= 1 or threshold <= _truth.margin(d)


def test_bands_skip_most_work_on_clustered_rows_and_miss_nothing():
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, 32))
    x = (centres[rng.integers(0, 40, 8000)] + 0.5 * rng.standard_normal((8000, 32))).astype(np.float32)
    x[:300] = x[0] + 0.01 * rng.standard_normal((300, 32))  # near-duplicates
    index = PartitionIndex.build(x, cells=40, seed=0)
    src = ArraySource(x)
    q = x[rng.choice(len(x), 200, replace=False)]
    with _config.override(INDEX_RECALL_TRUTH_BAND=32):
        bands = _truth.bands_of(src, index)
        pieces = list(bands.plan(index.centroids, q, 0.9))
        work = bands.work(pieces)
        _assert_same(src.band_pairs(q, pieces, 0.9), ec.similar_pairs(q, 0.9, y=x))
        _assert_same(_truth.sampled_pairs(src, index, q, 0.9), ec.similar_pairs(q, 0.9, y=x))
    assert 0 < work < 0.4 * len(q) * len(x)
    for rows, bounds, qpos, ranges in pieces:  # each band: rows of one cell, queries by cosine
        assert len(np.unique(index.own[rows])) == 1 and bounds[-1] == len(rows)
        assert (ranges[:, 0] < ranges[:, 1]).all() and ranges.min() == 0 and ranges.max() == len(qpos)


def test_a_band_rows_angles_bound_their_cosines_with_the_centroid():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 8)).astype(np.float32)
    x[7] = 0
    index = PartitionIndex.build(x, cells=5, seed=0)
    cos = _truth.pivot_cosines(x, index.centroids, index.own)
    u = x.astype(np.float64) / np.maximum(np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True), 1e-300)
    c = index.centroids.astype(np.float64)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    assert np.allclose(cos, (u * c[index.own]).sum(axis=1), atol=1e-12) and cos[7] == 0.0
    with _config.override(INDEX_RECALL_TRUTH_BAND=16):
        b = _truth.Bands(index, cos, 8)
    assert np.array_equal(np.sort(b.rows), np.arange(500))
    for k in range(len(b.cell)):
        rows = b.rows[b.start[k] : b.start[k + 1]]
        assert 0 < len(rows) <= 16 and (index.own[rows] == b.cell[k]).all()
        ang = np.arccos(np.clip(cos[rows], -1, 1))
        assert (b.lo[k] <= ang).all() and (ang <= b.hi[k]).all()


def test_the_calibration_truth_is_the_plain_one_with_or_without_an_index():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    x[:100] = x[0] + 0.05 * rng.standard_normal((100, 16))
    index = PartitionIndex.build(x, seed=0)
    rows = np.sort(rng.choice(len(x), 150, replace=False))
    a, b = _recall.SampledPairs(x, 0.8), _recall.SampledPairs(x, 0.8, index)
    # the bands leave most of the work here: a share of 1 keeps them from falling back to the
    # plain scan, so the banded search is the one compared
    with _config.override(INDEX_RECALL_TRUTH_SHARE=1.0):
        a.prefetch(rows[:90]), b.prefetch(rows[:90])
        for s in (rows[50:], rows):  # a second prefetch adds only the new rows
            for u, v in zip(a(s), b(s)):
                assert np.array_equal(u, v)


def test_a_store_source_searches_by_band_as_the_array(tmp_path):
    from support.stores import SMALL, ids_of

    rng = np.random.default_rng(2)
    x = (rng.standard_normal((8, 16))[rng.integers(0, 8, 400)] + 0.3 * rng.standard_normal((400, 16)))
    x = x.astype(np.float32)
    with _config.override(MAX_SEGMENT_BYTES=SMALL):
        store = ec.VectorStore(tmp_path / "s", dtype="float16")
        store.add(ids_of(200), x[:200])
        store.add(ids_of(400)[200:], x[200:])
    store.delete(["r3", "r250"])
    view, _ = store_state(store)
    live = store.vectors().astype(np.float32)
    q = live[rng.choice(len(live), 30, replace=False)]
    index = PartitionIndex.build(live, cells=9, seed=0)
    with _config.override(ENGINE_BLOCK_ROWS=37, INDEX_RECALL_TRUTH_BAND=8, INDEX_RECALL_TRUTH_SHARE=1.0):
        src = StoreSource(view, InProcess())
        assert np.allclose(src.pivot_cosines(index.centroids, index.own),
                           _truth.pivot_cosines(live, index.centroids, index.own), atol=1e-12)
        assert _truth.prunes(src, index, 0.8)
        _assert_same(_truth.sampled_pairs(src, index, q, 0.8), ec.similar_pairs(q, 0.8, y=live))
    store.close()


def test_sampled_neighbours_searched_together_are_each_rows_own_top_lists():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1500, 12)).astype(np.float32)
    x[10:20] = x[10]  # ties: the lower row first, however the rows are batched
    truth = _recall.SampledNeighbours(x, 5)
    first, second = np.sort(rng.choice(1500, 70, replace=False)), np.arange(5, 40)
    truth.prefetch(np.concatenate([first, second]))
    for s in (first, second, np.array([3, 11, 1499])):
        assert np.array_equal(truth(s), ec.top_k(x[s], x, 6)[1])
