"""deduplicate's connected rule through a spanning forest equals the all-pairs path, bit for bit.

The all-pairs path (``_config.DEDUP_FOREST=False``) lists every pair at or above the threshold
and then finds connected components; the forest path joins pairs inside the pair search and
never lists them. Inputs are the awkward ones for a forest: one giant cluster of
near-identical rows with singletons around it, all rows identical, exact copies, thresholds
on and one float32 step beside the scores inside the cluster, float16 vectors.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

import embedcache as ec
from embedcache import _config
from embedcache.index import PartitionIndex, partitioned_forest, partitioned_pairs
from embedcache.kernels.pairs import forest_roots, threshold_forest


@st.composite
def giant_cluster(draw, max_cluster=60, max_single=40):
    """(x, threshold): a cluster of near-identical rows among singletons, some exact copies,
    float32 or float16, and a threshold on, just above or just below a score in the cluster."""
    d = draw(st.integers(2, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["cluster", "cluster", "identical", "random"]))
    n_cluster = draw(st.integers(0, max_cluster))
    n_single = draw(st.integers(0, max_single))
    base = rng.normal(size=d)
    noise = draw(st.sampled_from([0.0, 1e-4, 1e-2, 0.1, 0.3]))
    if kind == "identical":
        x = np.repeat(base[None, :], n_cluster + n_single, axis=0)
    elif kind == "random":
        x = rng.normal(size=(n_cluster + n_single, d))
    else:
        x = np.concatenate([base + noise * rng.normal(size=(n_cluster, d)), rng.normal(size=(n_single, d))])
    if len(x) and draw(st.booleans()):
        x = x[rng.permutation(len(x))]
    if len(x) >= 2 and draw(st.booleans()):  # exact copies of a few rows
        picks = rng.integers(0, len(x), size=draw(st.integers(1, 5)))
        x = np.concatenate([x, x[picks]])
    if len(x) >= 2 and draw(st.booleans()):
        x[rng.integers(0, len(x))] = 0.0
    x = x.astype(draw(st.sampled_from([np.float32, np.float16])))
    scores = ec.cosine_similarity(x) if len(x) else np.zeros((0, 0), np.float32)
    iu = np.triu_indices(len(x), 1)
    how = draw(st.sampled_from(["score", "above", "below", "uniform"]))
    if how == "uniform" or not len(iu[0]):
        return x, draw(st.floats(0.3, 1.0))
    s = np.float32(scores[iu][draw(st.integers(0, len(iu[0]) - 1))])
    if how == "above":
        s = np.nextafter(s, np.float32(2))
    elif how == "below":
        s = np.nextafter(s, np.float32(-2))
    return x, float(np.clip(s, -1.0, 1.0))


def assert_same_result(a, b, *, details=True):
    """Two DedupResults agree bit for bit (explain and least_similar_pairs too with details)."""
    assert a.kept.tolist() == b.kept.tolist()
    assert a.removed.tolist() == b.removed.tolist()
    assert a.duplicate_of.tolist() == b.duplicate_of.tolist()
    assert a.scores.tobytes() == b.scores.tobytes()
    assert len(a.groups) == len(b.groups)
    assert all(ga.tolist() == gb.tolist() for ga, gb in zip(a.groups, b.groups))
    assert a._group_of.tolist() == b._group_of.tolist()
    assert (a.method, str(a.recall)) == (b.method, str(b.recall))
    if details:
        for i in range(0, a.n, max(1, a.n // 7)):
            assert a.explain(i) == b.explain(i)
        la, lb = a.least_similar_pairs(9), b.least_similar_pairs(9)
        assert la.i.tolist() == lb.i.tolist() and la.j.tolist() == lb.j.tolist()
        assert la.score.tobytes() == lb.score.tobytes()


def all_pairs(x, threshold, **kw):
    with _config.override(DEDUP_FOREST=False):
        return ec.deduplicate(x, threshold=threshold, progress=False, **kw)


def last_of_group(group, items):
    return int(group[-1])


@settings(max_examples=80, deadline=None)
@given(giant_cluster(), st.sampled_from(["first", last_of_group]))
def test_exact_forest_equals_all_pairs(case, keep):
    x, t = case
    with _config.override(PAIRS_BLOCK=7, PAIRS_COLUMNS=5, CHUNK_ROWS=23):  # many tiles, skipped ones too
        got = ec.deduplicate(x, threshold=t, keep=keep, method="exact", progress=False)
    assert_same_result(got, all_pairs(x, t, keep=keep, method="exact"))


@settings(max_examples=30, deadline=None)
@given(giant_cluster(max_cluster=120, max_single=80), st.sampled_from([0.3, 0.9, 1.0]))
def test_partitioned_forest_equals_all_pairs(case, recall):
    """Same seed, same index and probes: the forest joins exactly the pairs the partitioned
    search lists; probing every cell, explain and least_similar_pairs agree too."""
    x, t = case
    with _config.override(INDEX_MIN_CELL=4, PAIRS_BLOCK=16, PAIRS_COLUMNS=16):
        got = ec.deduplicate(x, threshold=t, method="partitioned", recall=recall, progress=False)
        ref = all_pairs(x, t, method="partitioned", recall=recall)
    full = got.recall is None or got.recall.low == 1.0
    assert_same_result(got, ref, details=full)


def components(n, i, j):
    graph = coo_matrix((np.ones(len(i), bool), (i, j)), shape=(n, n)).tocsr()
    labels = connected_components(graph, directed=False)[1]
    _, first = np.unique(labels, return_index=True)
    return np.searchsorted(np.sort(first), first[np.searchsorted(np.unique(labels), labels)])


def canonical(roots):
    """Labels numbered by first member, so two labelings of one partition compare equal."""
    _, first, inv = np.unique(roots, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inv]


@settings(max_examples=60, deadline=None)
@given(giant_cluster(), st.sampled_from([1, 5, 9, 31, 33]), st.sampled_from([1, 9, 32, 33, 70]))
def test_forest_kernel_joins_what_similar_pairs_lists(case, block, cols):
    x, t = case
    n = len(x)
    i, j, _ = ec.similar_pairs(x, t)
    parent = np.arange(n, dtype=np.int64)
    with _config.override(PAIRS_BLOCK=block, PAIRS_COLUMNS=cols):
        fi, fj, fs = threshold_forest(x, t, parent)
    roots = forest_roots(parent)
    assert canonical(roots).tolist() == canonical(components(n, i, j)).tolist()
    assert len(fi) == n - len(np.unique(roots))  # a spanning forest: one pair per join
    if len(fi):  # every forest pair is a true pair with its exact score
        s = ec.cosine_similarity(x)[fi, fj]
        assert fs.tobytes() == s.astype(np.float32).tobytes()
        assert np.all(fs >= np.float32(t))


@settings(max_examples=40, deadline=None)
@given(giant_cluster(), st.data())
def test_forest_kernel_between_two_sets_with_global_ids(case, data):
    x, t = case
    n = len(x)
    cut = data.draw(st.integers(0, n))
    perm = np.random.default_rng(cut).permutation(n)
    a, b = perm[:cut], perm[cut:]
    parent = np.arange(n, dtype=np.int64)
    with _config.override(PAIRS_BLOCK=3, PAIRS_COLUMNS=4):
        threshold_forest(x[a], t, parent, ids=a, y=x[b], y_ids=b)
    i, j, _ = ec.similar_pairs(x[a], t, y=x[b])
    assert canonical(forest_roots(parent)).tolist() == canonical(components(n, a[i], b[j])).tolist()


@pytest.mark.parametrize("probes", [1, 2, 5, 1000])
def test_partitioned_forest_joins_the_pairs_partitioned_pairs_finds(probes):
    rng = np.random.default_rng(probes)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    x[:800] = x[0] + 0.02 * rng.normal(size=(800, 16)).astype(np.float32)  # a giant cluster
    x = x[rng.permutation(len(x))]
    index = PartitionIndex.build(x, seed=0)
    i, j, _, _ = partitioned_pairs(x, 0.8, probes=probes, index=index)
    parent = np.arange(len(x), dtype=np.int64)
    fi, _, _, _ = partitioned_forest(x, 0.8, parent, probes=probes, index=index)
    assert canonical(forest_roots(parent)).tolist() == canonical(components(len(x), i, j)).tolist()
    assert len(fi) < len(x)


def test_giant_cluster_lists_no_more_pairs_than_rows():
    """20,000 near-identical rows hold 2e8 pairs; the forest path keeps one per row."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24_000, 32)).astype(np.float32)
    x[:20_000] = x[0] + 0.01 * rng.normal(size=(20_000, 32)).astype(np.float32)
    x = x[rng.permutation(len(x))]
    res = ec.deduplicate(x, threshold=0.95, method="exact", progress=False)
    assert len(res.groups) == 1 and len(res.groups[0]) == 20_000
    assert len(res._pairs[0]) == 19_999
    some = slice(0, None, 997)
    expected = np.diagonal(ec.cosine_similarity(x[res.removed[some]], x[res.duplicate_of[some]]))
    assert res.scores[some].tobytes() == expected.tobytes()
    story = res.explain(int(res.removed[0]))
    assert "Group of 20000 items" in story and "(19999)" in story


@settings(max_examples=80, deadline=None)
@given(giant_cluster())
def test_greedy_sweep_equals_all_pairs(case):
    """The first-seen rule from each block's pairs with the rows kept before it."""
    x, t = case
    with _config.override(CHUNK_ROWS=7, PAIRS_BLOCK=5, PAIRS_COLUMNS=6):
        got = ec.deduplicate(x, threshold=t, mode="greedy", method="exact", progress=False)
    assert_same_result(got, all_pairs(x, t, mode="greedy", method="exact"))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["red", "fox", "the", "a", "jumps", "lazy", "dog", "over"]),
                         min_size=1, max_size=6).map(" ".join), min_size=0, max_size=40),
       st.sampled_from([0.5, 0.7, 0.9]))
def test_greedy_sweep_longest_first_on_texts(texts, t):
    with _config.override(CHUNK_ROWS=5):
        got = ec.deduplicate(texts, threshold=t, mode="greedy", keep="longest", method="exact", progress=False)
    assert_same_result(got, all_pairs(texts, t, mode="greedy", keep="longest", method="exact"))
