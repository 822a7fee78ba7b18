"""deduplicate, near_duplicates and knn_graph against brute force on small sets."""

from __future__ import annotations

import io
import re
import sys
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import embedcache as ec
from embedcache import _config
from embedcache.providers.base import Usage

# ---------------------------------------------------------------------------------------
# plain references
# ---------------------------------------------------------------------------------------


def cosine_matrix(x, y=None):
    x = np.asarray(x, dtype=np.float64)
    y = x if y is None else np.asarray(y, dtype=np.float64)
    nx = np.linalg.norm(x, axis=1)
    ny = np.linalg.norm(y, axis=1)
    s = x @ y.T
    denom = np.outer(nx, ny)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(denom > 0, s / np.where(denom > 0, denom, 1), 0.0)
    return np.clip(s, -1, 1)


def components(n, adjacency):
    """Union-find over the boolean adjacency matrix; groups of size > 1, sorted."""
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i in range(n):
        for j in range(i + 1, n):
            if adjacency[i, j]:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def greedy(n, adjacency, scores, order):
    kept, owner = [], {}
    for v in order:
        near = [u for u in kept if adjacency[u, v]]
        if near:
            owner[v] = max(near, key=lambda u: (scores[u, v], -u))
        else:
            kept.append(v)
    return sorted(kept), owner


def separated(s, threshold, gap=1e-4):
    """True when no score is so close to the threshold that float32 rounding could flip it."""
    off = s[~np.eye(len(s), dtype=bool)] if s.shape[0] == s.shape[1] else s.ravel()
    return not np.any(np.abs(off - threshold) < gap)


@st.composite
def planted(draw, max_rows=14, dim=None):
    """Random vectors plus perturbed copies and exact copies of some of them."""
    d = dim or draw(st.integers(2, 6))
    n = draw(st.integers(1, max_rows))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    for k in range(n):
        roll = rng.random()
        if k and roll < 0.25:
            x[k] = x[rng.integers(0, k)]  # exact copy
        elif k and roll < 0.5:
            x[k] = x[rng.integers(0, k)] + rng.normal(scale=0.15, size=d)
    return x


thresholds = st.sampled_from([0.5, 0.8, 0.9, 0.95, 0.99])


# ---------------------------------------------------------------------------------------
# deduplicate on arrays
# ---------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(x=planted(), threshold=thresholds, chunk=st.sampled_from([2, 3, 8192]))
def test_connected_groups_equal_brute_force(x, threshold, chunk):
    s = cosine_matrix(x)
    assume(separated(s, threshold))
    with _config.override(CHUNK_ROWS=chunk):
        res = ec.deduplicate(x, threshold=threshold, progress=False)
    expected = components(len(x), s >= threshold)
    assert [g.tolist() for g in res.groups] == expected
    reps = {g[0] for g in expected}
    members = {i for g in expected for i in g}
    assert res.kept.tolist() == sorted(set(range(len(x))) - (members - reps))
    assert res.removed.tolist() == sorted(members - reps)
    group_first = {i: g[0] for g in expected for i in g}
    assert res.duplicate_of.tolist() == [group_first[i] for i in res.removed.tolist()]
    np.testing.assert_allclose(res.scores, [s[i, group_first[i]] for i in res.removed], atol=1e-5)
    assert res.duplicate_ratio == pytest.approx(len(res.removed) / len(x))


@settings(max_examples=40, deadline=None)
@given(x=planted(), threshold=thresholds)
def test_greedy_follows_the_first_seen_rule(x, threshold):
    s = cosine_matrix(x)
    assume(separated(s, threshold))
    res = ec.deduplicate(x, threshold=threshold, mode="greedy", progress=False)
    kept, owner = greedy(len(x), s >= threshold, s, range(len(x)))
    assert res.kept.tolist() == kept
    assert dict(zip(res.removed.tolist(), res.duplicate_of.tolist())) == owner
    # every removed item is directly similar to the item it duplicates
    assert np.all(res.scores >= threshold - 1e-6)
    # no two kept items are near-duplicates
    sk = s[np.ix_(res.kept, res.kept)]
    assert not np.any(np.triu(sk >= threshold, 1))


def test_connected_and_greedy_differ_on_a_chain():
    # a ~ b ~ c, but a and c are below the threshold
    angles = np.radians([0.0, 20.0, 40.0])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    threshold = float(np.cos(np.radians(25)))
    con = ec.deduplicate(x, threshold=threshold, progress=False)
    gre = ec.deduplicate(x, threshold=threshold, mode="greedy", progress=False)
    assert con.kept.tolist() == [0] and [g.tolist() for g in con.groups] == [[0, 1, 2]]
    assert con.scores[1] < threshold  # c is in a's group through b only
    assert gre.kept.tolist() == [0, 2] and gre.duplicate_of.tolist() == [0]
    text = con.explain(2)
    assert "removed" in text and "item 0" in text and "1 (0.9" in text


def test_zero_rows_are_never_duplicates():
    x = np.array([[0, 0], [0, 0], [1, 0], [1, 0]], dtype=np.float32)
    res = ec.deduplicate(x, threshold=0.5, progress=False)
    assert res.removed.tolist() == [3]  # equal zero rows are not collapsed
    assert [g.tolist() for g in res.groups] == [[2, 3]]


def test_keep_callable_and_validation():
    x = np.array([[1, 0], [1, 0.01], [1, 0.02], [0, 1]], dtype=np.float32)
    res = ec.deduplicate(x, threshold=0.99, keep=lambda group, items: group[-1], progress=False)
    assert res.kept.tolist() == [2, 3] and res.duplicate_of.tolist() == [2, 2]
    with pytest.raises(ec.InvalidInputError, match="one of the group"):
        ec.deduplicate(x, threshold=0.99, keep=lambda group, items: 3, progress=False)
    with pytest.raises(ec.InvalidInputError, match="needs texts"):
        ec.deduplicate(x, threshold=0.99, keep="longest", progress=False)
    with pytest.raises(ec.InvalidInputError, match="keep must be"):
        ec.deduplicate(x, threshold=0.99, keep="last", progress=False)
    with pytest.raises(ec.InvalidInputError, match="greedy"):
        ec.deduplicate(x, threshold=0.99, keep=min, mode="greedy", progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(threshold=1.5), r"threshold must be in \[-1, 1\] for cosine, got 1.5"),
        (dict(threshold="0.9"), "threshold must be a number"),
        (dict(threshold=0.9, mode="fuzzy"), "mode must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ec.InvalidInputError, match=match):
        ec.deduplicate(np.eye(3, dtype=np.float32), progress=False, **kwargs)


def test_bad_arrays():
    with pytest.raises(ec.InvalidInputError, match="2-D array"):
        ec.deduplicate(np.ones(3, dtype=np.float32), progress=False)
    with pytest.raises(ec.InvalidInputError, match="NaN"):
        ec.deduplicate(np.array([[1.0, np.nan]]), progress=False)


def test_empty_and_single():
    res = ec.deduplicate(np.ones((1, 3), dtype=np.float32), progress=False)
    assert res.kept.tolist() == [0] and res.groups == [] and res.duplicate_ratio == 0.0
    res = ec.deduplicate([], progress=False)
    assert res.n == 0 and res.duplicate_ratio == 0.0


@settings(max_examples=30, deadline=None)
@given(x=planted(max_rows=10, dim=4), ref=planted(max_rows=8, dim=4), threshold=thresholds)
def test_against_removes_items_near_the_reference(x, ref, threshold):
    s = cosine_matrix(x, ref)
    assume(separated(s, threshold))
    with _config.override(CHUNK_ROWS=3):
        res = ec.deduplicate(x, against=ref, threshold=threshold, progress=False)
    best = s.max(axis=1)
    assert res.removed.tolist() == np.flatnonzero(best >= threshold).tolist()
    assert res.kept.tolist() == np.flatnonzero(best < threshold).tolist()
    for i, r, sc in zip(res.removed, res.duplicate_of, res.scores):
        assert sc == pytest.approx(best[i], abs=1e-5)
        assert s[i, r] == pytest.approx(best[i], abs=1e-5)
    assert res.groups == [] and res.reference
    assert res.mode == "connected"  # the grouping rule asked for; the reference run says so itself


def test_against_dimension_mismatch():
    match = "items and against must have the same number of columns, got 3 and 2"
    with pytest.raises(ec.DimensionMismatchError, match=match):
        ec.deduplicate(np.eye(3, dtype=np.float32), against=np.eye(2, dtype=np.float32), progress=False)


# ---------------------------------------------------------------------------------------
# texts: collapse, delegate, explain, pandas
# ---------------------------------------------------------------------------------------


class CountingEmbedder:
    """Wraps the hashing embedder and records every text it is asked to embed."""

    def __init__(self):
        self.inner = ec.HashingEmbeddings(dimensions=128)
        self.cache_namespace = "counting|" + self.inner.cache_namespace
        self.model = "counting"
        self.dimensions = 128
        self.usage = Usage()
        self.seen: list[str] = []

    def embed(self, texts, *, on_batch=None):
        self.seen.extend(texts)
        out = self.inner.embed(texts)
        if on_batch is not None:
            on_batch(np.arange(len(texts)), out)
        return out


TEXTS = [
    "The cat sat on the mat.",
    "Stock markets fell sharply on Monday.",
    "The cat sat on the mat!",
    "The cat sat on the mat.",
    "A recipe for lemon cake with yogurt.",
    "Stock markets fell sharply on Monday.",
    "the cat sat on the mat",
]


@pytest.fixture
def embedder(tmp_path):
    inner = CountingEmbedder()
    return inner, ec.CachedEmbedder(inner, cache=ec.EmbeddingCache(tmp_path / "cache"))


def test_texts_collapse_exact_duplicates_and_delegate(embedder):
    inner, emb = embedder
    res = ec.deduplicate(TEXTS, threshold=0.8, embedder=emb, progress=False)
    assert sorted(inner.seen) == sorted(set(TEXTS))  # each distinct text embedded once
    x = inner.inner.embed(TEXTS)
    arr = ec.deduplicate(x, threshold=0.8, progress=False)
    assert res.kept.tolist() == arr.kept.tolist()
    assert [g.tolist() for g in res.groups] == [g.tolist() for g in arr.groups]
    assert res.duplicate_of.tolist() == arr.duplicate_of.tolist()
    assert 3 in res.removed and res.duplicate_of[res.removed.tolist().index(3)] == 0
    assert res.scores[res.removed.tolist().index(3)] == 1.0


def test_texts_as_numpy_or_pandas(embedder):
    import pandas as pd

    _, emb = embedder
    expected = ec.deduplicate(TEXTS, threshold=0.8, embedder=emb, progress=False).kept.tolist()
    for items in (np.array(TEXTS), pd.Series(TEXTS), tuple(TEXTS)):
        assert ec.deduplicate(items, threshold=0.8, embedder=emb, progress=False).kept.tolist() == expected


def test_keep_longest_picks_the_longest_text(embedder):
    _, emb = embedder
    texts = ["short cat text", "short cat text, longer", "short cat text, longer!!!", "unrelated words here"]
    res = ec.deduplicate(texts, threshold=0.7, keep="longest", embedder=emb, progress=False)
    assert [g.tolist() for g in res.groups] == [[0, 1, 2]]
    assert res.kept.tolist() == [2, 3]
    gre = ec.deduplicate(texts, threshold=0.7, keep="longest", mode="greedy", embedder=emb, progress=False)
    assert 2 in gre.kept


@settings(max_examples=25, deadline=None)
@given(picks=st.lists(st.sampled_from(TEXTS + ["The cat sat.", "Stock markets fell", "lemon cake"]),
                      min_size=1, max_size=12),
       threshold=st.sampled_from([0.5, 0.7, 0.9]))
def test_greedy_longest_first_equals_brute_force(tmp_path_factory, picks, threshold):
    emb = ec.CachedEmbedder(CountingEmbedder(), cache=ec.EmbeddingCache(tmp_path_factory.mktemp("c")))
    s = cosine_matrix(emb.embed(picks, progress=False))
    assume(separated(s, threshold))
    order = sorted(range(len(picks)), key=lambda k: (-len(picks[k]), k))
    kept, owner = greedy(len(picks), s >= threshold - 1e-9, s, order)
    res = ec.deduplicate(picks, threshold=threshold, keep="longest", mode="greedy", embedder=emb, progress=False)
    assert res.kept.tolist() == kept
    assert set(dict(zip(res.removed.tolist(), res.duplicate_of.tolist()))) == set(owner)


def test_explain_least_similar_and_pandas(embedder):
    _, emb = embedder
    res = ec.deduplicate(TEXTS, threshold=0.8, embedder=emb, progress=False)
    removed = int(res.removed[0])
    story = res.explain(removed)
    assert "removed as a duplicate of item" in story and repr(TEXTS[removed][:80]) in story
    assert "was kept" in res.explain(4)
    with pytest.raises(ec.InvalidInputError, match="i must be in"):
        res.explain(len(TEXTS))
    weak = res.least_similar_pairs(2)
    with _config.override(DEDUP_FOREST=False):  # every pair at or above the threshold, listed
        pi, pj, ps = ec.deduplicate(TEXTS, threshold=0.8, embedder=emb, progress=False)._pairs
    order = np.lexsort((pj, pi, ps.astype(np.float64)))[:2]
    assert len(weak) == 2 and list(weak.score) == list(ps[order])
    assert weak.i.tolist() == pi[order].tolist() and weak.j.tolist() == pj[order].tolist()
    assert {"text_i", "text_j"} <= set(weak.columns)
    df = res.to_pandas()
    assert len(df) == len(TEXTS) and df["kept"].sum() == len(res.kept)
    assert df.loc[removed, "duplicate_of"] == res.duplicate_of[0]
    assert list(df["text"]) == TEXTS


def test_texts_against_reference(embedder):
    _, emb = embedder
    train = ["The cat sat on the mat.", "A recipe for lemon cake with yogurt."]
    test = ["The cat sat on the mat!", "Something else entirely, about trains.", "A recipe for lemon cake with yogurt."]
    res = ec.deduplicate(test, against=train, threshold=0.8, embedder=emb, progress=False)
    assert res.removed.tolist() == [0, 2] and res.duplicate_of.tolist() == [0, 1]
    assert "reference item 1" in res.explain(2)
    assert "kept" in res.explain(1)


def test_bad_keep_is_refused_before_embedding(embedder):
    inner, emb = embedder
    with pytest.raises(ec.InvalidInputError, match="keep must be"):
        ec.deduplicate(TEXTS, keep="last", embedder=emb, progress=False)
    with pytest.raises(ec.InvalidInputError, match="greedy"):
        ec.deduplicate(TEXTS, keep=min, mode="greedy", embedder=emb, progress=False)
    assert inner.seen == []


def test_invalid_texts_name_the_position(embedder):
    _, emb = embedder
    with pytest.raises(ec.InvalidInputError, match=r"items\[1\] is an empty string"):
        ec.deduplicate(["fine", ""], embedder=emb, progress=False)


def test_progress_bar_only_when_asked(capsys):
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    with _config.override(CHUNK_ROWS=5):
        ec.deduplicate(x, threshold=0.9, progress=False)
    assert capsys.readouterr().err == ""
    with _config.override(CHUNK_ROWS=5):
        ec.deduplicate(x, threshold=0.9, progress=True)
    assert "pairs" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# near_duplicates
# ---------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(x=planted(), threshold=thresholds, chunk=st.sampled_from([3, 8192]))
def test_near_duplicates_equal_brute_force(x, threshold, chunk):
    s = cosine_matrix(x)
    assume(separated(s, threshold))
    with _config.override(CHUNK_ROWS=chunk):
        table = ec.near_duplicates(x, threshold=threshold, progress=False)
    i, j = np.nonzero(np.triu(s >= threshold, 1))
    expected = sorted(zip(i.tolist(), j.tolist()), key=lambda p: (-s[p], p))
    got = list(zip(table.i.tolist(), table.j.tolist()))
    assert sorted(got) == sorted(expected)
    assert np.all(np.diff(table.score) <= 0)  # highest first
    np.testing.assert_allclose(table.score, [s[p] for p in got], atol=1e-5)


def test_near_duplicates_texts_table(embedder, tmp_path):
    inner, emb = embedder
    table = ec.near_duplicates(TEXTS, threshold=0.8, embedder=emb, progress=False)
    x = inner.inner.embed(TEXTS)
    s = cosine_matrix(x)
    i, j = np.nonzero(np.triu(s >= 0.8, 1))
    assert sorted(zip(table.i.tolist(), table.j.tolist())) == sorted(zip(i.tolist(), j.tolist()))
    first = table[0]
    assert first["score"] == pytest.approx(1.0) and first["text_i"] == first["text_j"]
    rows = list(table)
    assert len(rows) == len(table) and rows[0] == first
    buf = io.StringIO()
    table.to_csv(buf)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "i,j,score,text_i,text_j" and len(lines) == len(table) + 1
    df = table.to_pandas()
    assert list(df.columns) == table.columns and len(df) == len(table)
    assert "PairTable(" in repr(table)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4),
                          st.sampled_from([0.5, 0.9, -0.0, 0.0, 1.0, float("nan")])), max_size=12),
       st.booleans())
def test_pair_table_sorts_by_score_then_i_then_j(rows, presorted):
    i, j, s = (np.array(c, dtype=t) for c, t in zip(zip(*rows), (np.int64, np.int64, np.float32))) if rows else \
        (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
    if presorted and len(i):  # what a search returns: given in order (the table keeps it)
        order = np.lexsort((j, i, -s.astype(np.float64)))
        i, j, s = i[order], j[order], s[order]
    t = ec.PairTable(i, j, s)
    want = sorted(zip(i.tolist(), j.tolist(), s.tolist()),
                  key=lambda r: (1, 0.0, r[0], r[1]) if np.isnan(r[2]) else (0, -r[2], r[0], r[1]))
    got = list(zip(t.i.tolist(), t.j.tolist(), t.score.tolist()))
    assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in want]
    assert np.array_equal(t.score, np.array([c for _, _, c in want], np.float32), equal_nan=True)


def test_pair_table_validates_lengths():
    with pytest.raises(ec.InvalidInputError, match="same length"):
        ec.PairTable(np.array([0]), np.array([1, 2]), np.array([0.5]))
    t = ec.PairTable(np.array([0]), np.array([1]), np.array([0.5]))
    with pytest.raises(IndexError):
        t[1]


# ---------------------------------------------------------------------------------------
# knn_graph
# ---------------------------------------------------------------------------------------


def naive_knn(x, k):
    s = cosine_matrix(x)
    np.fill_diagonal(s, -np.inf)
    out = np.zeros_like(s)
    for i in range(len(x)):
        order = sorted(range(len(x)), key=lambda j: (-s[i, j], j))
        for j in order[:k]:
            if j != i:
                out[i, j] = s[i, j]
    return out, s


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12), k=st.integers(1, 5),
       chunk=st.sampled_from([2, 5, 8192]))
def test_knn_graph_equals_brute_force(seed, n, k, chunk):
    x = np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)
    expected, s = naive_knn(x, k)
    with _config.override(CHUNK_ROWS=chunk):
        g = ec.knn_graph(x, k, symmetric=False, progress=False)
    assert g.shape == (n, n) and g.diagonal().sum() == 0
    assert np.all(np.diff(g.indptr) == min(k, n - 1))
    dense = g.toarray()
    np.testing.assert_array_equal(dense != 0, expected != 0)
    np.testing.assert_allclose(dense, expected, atol=1e-5)
    with _config.override(CHUNK_ROWS=chunk):
        sym = ec.knn_graph(x, k, progress=False)
    np.testing.assert_array_equal(sym.toarray() != 0, (expected != 0) | (expected.T != 0))
    assert (abs(sym - sym.T) > 1e-6).nnz == 0
    with _config.override(CHUNK_ROWS=chunk):
        dist = ec.knn_graph(x, k, weights="distance", progress=False)
    np.testing.assert_array_equal(dist.indptr, sym.indptr)
    for i in range(n):
        row = dist.data[dist.indptr[i]:dist.indptr[i + 1]]
        assert np.all(np.diff(row) >= 0)  # each row by increasing distance
    np.testing.assert_allclose(dist.toarray()[sym.toarray() != 0], 1 - sym.toarray()[sym.toarray() != 0],
                               atol=1e-5)


def test_knn_graph_keeps_zero_distances_explicit():
    x = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    g = ec.knn_graph(x, 1, weights="distance", progress=False)
    assert g[0, 1] == 0 and g.nnz >= 2 and 1 in g[0].indices


def test_knn_graph_feeds_scikit_learn_precomputed():
    from sklearn.cluster import DBSCAN
    from sklearn.exceptions import EfficiencyWarning

    rng = np.random.default_rng(3)
    centers = rng.normal(size=(3, 8))
    x = np.concatenate([c + rng.normal(scale=0.05, size=(15, 8)) for c in centers]).astype(np.float32)
    g = ec.knn_graph(x, 10, weights="distance", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EfficiencyWarning)
        labels = DBSCAN(eps=0.05, min_samples=3, metric="precomputed").fit_predict(g)
    dense_labels = DBSCAN(eps=0.05, min_samples=3, metric="cosine").fit_predict(x)
    assert len(set(labels)) == 3 and -1 not in labels
    np.testing.assert_array_equal(labels, dense_labels)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(k=0), "k must be"), (dict(k=2, weights="score"), "weights must be"),
     (dict(k=2, metric="l2"), "metric must be"), (dict(k=2, metric="dot", weights="distance"), "needs metric")],
)
def test_knn_graph_bad_arguments(kwargs, match):
    with pytest.raises(ec.InvalidInputError, match=match):
        ec.knn_graph(np.eye(3, dtype=np.float32), progress=False, **kwargs)


# ---------------------------------------------------------------------------------------
# VectorStore input
# ---------------------------------------------------------------------------------------


def test_store_input_matches_array_input(tmp_path, embedder):
    _, emb = embedder
    with ec.VectorStore(tmp_path / "vs") as store:
        store.add_texts(TEXTS, emb, ids=[f"t{k}" for k in range(len(TEXTS))])
        store.delete(["t1"])
        x = store.vectors().copy()
        res = ec.deduplicate(store, threshold=0.8, keep="longest", progress=False)
        arr = ec.deduplicate(x, threshold=0.8, progress=False)
        assert [g.tolist() for g in res.groups] == [g.tolist() for g in arr.groups]
        assert res.ids == store.ids() and res.texts == [t for k, t in enumerate(TEXTS) if k != 1]
        assert "id 't" in res.explain(int(res.removed[0]))
        ref = ec.deduplicate(["The cat sat on the mat?"], against=store, threshold=0.8, embedder=emb, progress=False)
        assert ref.removed.tolist() == [0] and ref.reference_ids[ref.duplicate_of[0]] in {"t0", "t2", "t3", "t6"}
        table = ec.near_duplicates(store, threshold=0.8, progress=False)
        assert {"id_i", "id_j"} <= set(table.columns) and table[0]["id_i"].startswith("t")
        g = ec.knn_graph(store, 2, progress=False)
        np.testing.assert_allclose(g.toarray(), ec.knn_graph(x, 2, progress=False).toarray())


def test_to_pandas_without_pandas_says_how_to_install(monkeypatch):
    res = ec.deduplicate(np.eye(3, dtype=np.float32), progress=False)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ec.MissingDependencyError, match=r"embedcache-sim\[pandas\]"):
        res.to_pandas()
    with pytest.raises(ec.MissingDependencyError, match="pip install"):
        res.least_similar_pairs().to_pandas()


def test_store_is_read_in_one_snapshot(tmp_path):
    """Another process writing between reads must not pair ids with other rows' vectors."""
    x = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0.01]], dtype=np.float32)
    with ec.VectorStore(tmp_path / "vs") as store, ec.VectorStore(tmp_path / "vs") as writer:
        store.add(["a", "b", "c"], x, metadata=[{"text": t} for t in ("ta", "tb", "tc")])

        def then_upsert(method):
            def wrapped(*args, **kwargs):
                out = method(*args, **kwargs)
                writer.add(["a"], x[:1], metadata=[{"text": "ta"}], upsert=True)  # "a" moves to the end
                return out
            return wrapped

        for name in ("ids", "vectors", "metadata"):
            setattr(store, name, then_upsert(getattr(store, name)))
        for _ in range(2):
            table = ec.near_duplicates(store, threshold=0.9, progress=False)
            assert [(r["id_i"], r["id_j"], r["text_i"], r["text_j"]) for r in table] in (
                [("b", "c", "tb", "tc")], [("c", "b", "tc", "tb")]
            )
            writer.add(["a"], x[:1], metadata=[{"text": "ta"}], upsert=True)


def test_against_refuses_vectors_of_another_embedder(tmp_path, embedder):
    inner, emb = embedder
    with ec.VectorStore(tmp_path / "vs") as store:
        store.add_texts(TEXTS[:3], emb)
        other = CountingEmbedder()
        other.cache_namespace = "other|" + other.inner.cache_namespace
        with pytest.raises(ec.NamespaceMismatchError, match="counting"):
            ec.deduplicate(["The cat sat on the mat?"], against=store, embedder=other, progress=False)
        assert other.seen == []  # refused before anything was embedded
        with pytest.raises(ec.NamespaceMismatchError):  # the default embedder is another one too
            ec.deduplicate(["The cat sat on the mat?"], against=store, progress=False)
        with pytest.raises(ec.NamespaceMismatchError):
            ec.deduplicate(store, against=["The cat sat on the mat?"], embedder=other, progress=False)
        ok = ec.deduplicate(["The cat sat on the mat?"], against=store, embedder=emb, progress=False)
        assert ok.removed.tolist() == [0]


def test_default_embedder_caches_nothing(tmp_path, monkeypatch):
    for var in ("EMBEDCACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.setenv(var, str(tmp_path / var))
    res = ec.deduplicate(TEXTS, threshold=0.8, progress=False)
    table = ec.near_duplicates(TEXTS, threshold=0.8, progress=False)
    assert len(res.removed) and len(table)
    assert list(tmp_path.iterdir()) == []  # no cache directory made anywhere


def test_a_wrapper_made_for_a_bare_embedder_is_closed(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDCACHE_DIR", str(tmp_path / "cache"))
    closed = []
    monkeypatch.setattr(ec.CachedEmbedder, "close", lambda self: closed.append(self.embedder))
    bare = CountingEmbedder()
    ec.deduplicate(TEXTS, threshold=0.8, embedder=bare, progress=False)
    ec.near_duplicates(TEXTS, threshold=0.8, embedder=bare, progress=False)
    assert closed == [bare, bare]
    given = ec.CachedEmbedder(bare, cache=ec.EmbeddingCache(tmp_path / "c2"))
    ec.deduplicate(TEXTS, threshold=0.8, embedder=given, progress=False)
    assert closed == [bare, bare]  # the caller's CachedEmbedder is left open


def test_near_duplicates_with_many_exact_copies_equal_brute_force():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(12, 5)).astype(np.float32)
    base[1] = base[0] + 0.05
    x = base[rng.integers(0, 12, size=90)]
    s = cosine_matrix(x)
    table = ec.near_duplicates(x, threshold=0.95, progress=False)
    i, j = np.nonzero(np.triu(s >= 0.95 - 1e-6, 1))
    assert sorted(zip(table.i.tolist(), table.j.tolist())) == sorted(zip(i.tolist(), j.tolist()))
    np.testing.assert_allclose(table.score, s[table.i, table.j], atol=1e-5)


# ---------------------------------------------------------------------------------------
# one score and one rule for a pair, whatever the path
# ---------------------------------------------------------------------------------------


class ArrayEmbedder:
    """Embeds text ``"v<k>"`` as row k of a given matrix (so distinct texts can share a vector)."""

    def __init__(self, x):
        self.x = x
        digest = __import__("hashlib").sha256(x.tobytes() + str(x.dtype).encode()).hexdigest()
        self.cache_namespace = f"array|{digest}"
        self.model = "array"
        self.dimensions = x.shape[1]
        self.usage = Usage()

    def embed(self, texts, *, on_batch=None):
        out = self.x[[int(t[1:]) for t in texts]]
        if on_batch is not None:
            on_batch(np.arange(len(texts)), out)
        return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("array-cache")


def embedded_as_texts(x, cache_dir):
    """Texts that ArrayEmbedder turns into x, and the embedder."""
    emb = ec.CachedEmbedder(ArrayEmbedder(x), cache=ec.EmbeddingCache(cache_dir))
    return [f"v{k}" for k in range(len(x))], emb


@st.composite
def scored_sets(draw, max_rows=12):
    """Vectors with exact copies, scaled copies (cosine ~1, not exactly), perturbed copies,
    zero rows, rows of very different norms, float32 or float16; and a threshold that is
    often a score that occurs (or one float32 step beside it)."""
    d = draw(st.integers(1, 6))
    n = draw(st.integers(2, max_rows))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(size=(n, d)) * (10.0 ** rng.integers(-3, 4, size=(n, 1)))
    for k in range(1, n):
        roll, src = rng.random(), rng.integers(0, k)
        if roll < 0.25:
            x[k] = x[src]
        elif roll < 0.4:
            x[k] = x[src] * rng.choice([3.0, 0.1, 7.5])
        elif roll < 0.55:
            x[k] = x[src] + rng.normal(scale=0.05 * np.abs(x[src]).max(), size=d)
        elif roll < 0.6:
            x[k] = 0.0
    x = x.astype(draw(st.sampled_from([np.float32, np.float16])))
    s = ec.cosine_similarity(x)
    scores = np.unique(s[np.triu_indices(n, 1)])
    kind = draw(st.sampled_from(["score", "below", "above", "round", "one"]))
    if kind == "round":
        return x, draw(st.sampled_from([-0.5, 0.0, 0.5, 0.8, 0.9, 0.99]))
    if kind == "one":
        return x, 1.0
    t = scores[draw(st.integers(0, len(scores) - 1))]
    if kind != "score":
        t = np.nextafter(t, np.float32(-np.inf if kind == "below" else np.inf), dtype=np.float32)
    return x, float(np.clip(t, -1.0, 1.0))


def pair_dict(i, j, s):
    return {(int(a), int(b)): float(c) for a, b, c in zip(i, j, s)}


@settings(max_examples=60, deadline=None)
@given(case=scored_sets(), chunk=st.sampled_from([3, 8192]))
def test_every_path_publishes_the_same_pairs_and_scores(tmp_path_factory, cache_dir, case, chunk):
    x, t = case
    n = len(x)
    full = ec.cosine_similarity(x)
    assert full.max() <= 1.0 and full.min() >= -1.0
    pairs = pair_dict(*ec.similar_pairs(x, t))
    assert all(full[p] == s for p, s in pairs.items())

    def table_pairs(table):
        assert np.all(np.diff(table.score) <= 0)
        return pair_dict(table.i, table.j, table.score)

    texts, emb = embedded_as_texts(x, cache_dir)
    with _config.override(CHUNK_ROWS=chunk):
        table = ec.near_duplicates(x, threshold=t, progress=False)
    assert table_pairs(table) == pairs
    assert table_pairs(ec.near_duplicates(texts, threshold=t, embedder=emb, progress=False)) == pairs
    with ec.VectorStore(tmp_path_factory.mktemp("vs")) as store:
        store.add([f"r{k}" for k in range(n)], x)
        left, right, s = store.similar_pairs(t)
        assert pair_dict([int(a[1:]) for a in left], [int(b[1:]) for b in right], s) == pairs
        assert table_pairs(ec.near_duplicates(store, threshold=t, progress=False)) == pairs

    adjacency = np.zeros((n, n), dtype=bool)
    for a, b in pairs:
        adjacency[a, b] = adjacency[b, a] = True
    for mode in ("connected", "greedy"):
        with _config.override(CHUNK_ROWS=chunk):
            res = ec.deduplicate(x, threshold=t, mode=mode, progress=False)
        as_texts = ec.deduplicate(texts, threshold=t, mode=mode, embedder=emb, progress=False)
        for a, b in ((res.kept, as_texts.kept), (res.removed, as_texts.removed),
                     (res.duplicate_of, as_texts.duplicate_of), (res.scores, as_texts.scores)):
            np.testing.assert_array_equal(a, b)
        assert [g.tolist() for g in res.groups] == [g.tolist() for g in as_texts.groups]
        np.testing.assert_array_equal(res.scores, full[res.removed, res.duplicate_of])
        if mode == "connected":
            assert [g.tolist() for g in res.groups] == components(n, adjacency)
        else:
            kept, owner = greedy(n, adjacency, full, range(n))
            assert res.kept.tolist() == kept
            assert dict(zip(res.removed.tolist(), res.duplicate_of.tolist())) == owner

    m = n // 2
    across = pair_dict(*ec.similar_pairs(x[:m], t, y=x[m:]))
    with _config.override(CHUNK_ROWS=chunk):
        ref = ec.deduplicate(x[:m], against=x[m:], threshold=t, progress=False)
    assert ref.removed.tolist() == sorted({a for a, _ in across})
    for a, r, s in zip(ref.removed, ref.duplicate_of, ref.scores):
        best = max(v for (p, _), v in across.items() if p == a)
        assert s == best == across[(a, r)]

    graph = ec.knn_graph(x, 3, symmetric=False, progress=False)
    rows = np.repeat(np.arange(n), np.diff(graph.indptr))
    np.testing.assert_array_equal(graph.data, full[rows, graph.indices])


def test_identical_vectors_of_different_texts_are_duplicates_at_threshold_one(cache_dir):
    base = np.random.default_rng(7).normal(size=(20, 16)).astype(np.float32)
    x = np.concatenate([base, base, -base[:1]])
    texts, emb = embedded_as_texts(x, cache_dir)
    for items in (x, texts):
        res = ec.deduplicate(items, threshold=1.0, embedder=emb, progress=False)
        assert res.kept.tolist() == [*range(20), 40]
        assert res.duplicate_of.tolist() == list(range(20)) and (res.scores == 1.0).all()
        table = ec.near_duplicates(items, threshold=1.0, embedder=emb, progress=False)
        assert sorted(zip(table.i.tolist(), table.j.tolist())) == [(k, k + 20) for k in range(20)]


def test_cosine_scores_never_exceed_one():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 7)).astype(np.float32)
    x = np.concatenate([x, x * np.float32(3.0)])
    table = ec.near_duplicates(x, threshold=0.99, progress=False)
    assert len(table) >= 300 and table.score.max() <= 1.0
    res = ec.deduplicate(x, threshold=0.99, progress=False)
    assert res.scores.max() <= 1.0


def test_near_duplicates_keeps_the_pairs_similar_pairs_finds():
    # thresholds equal to scores that occur: the score similar_pairs publishes and the one
    # near_duplicates compares must be the same number
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(40, 64)) * rng.uniform(0.01, 100, size=(40, 1))).astype(np.float32)
    _, _, every = ec.similar_pairs(x, -1.0)
    for t in every[rng.integers(0, len(every), 40)]:
        expected = pair_dict(*ec.similar_pairs(x, float(t)))
        table = ec.near_duplicates(x, threshold=float(t), progress=False)
        assert pair_dict(table.i, table.j, table.score) == expected


# ---------------------------------------------------------------------------------------
# explain(i) tells the truth
# ---------------------------------------------------------------------------------------

LINK = re.compile(r"(\d+) \((-?\d\.\d{4}), (kept|removed as a duplicate of (\d+))\)")


def check_explain(res, full, pairs, order):
    """Check every statement of res.explain(i), for every i, against the exact pairs."""
    t32 = np.float32(res.threshold)
    kept = set(res.kept.tolist())
    dup = dict(zip(res.removed.tolist(), res.duplicate_of.tolist()))
    position = {v: k for k, v in enumerate(order)}
    links = {i: {} for i in range(res.n)}
    for (a, b), s in pairs.items():
        links[a][b] = links[b][a] = s
    for i in range(res.n):
        text = res.explain(i)
        head = text.splitlines()[0]
        mine = sorted(links[i].items(), key=lambda js: (-js[1], js[0]))
        if "no other item scores" in head:
            assert i in kept and not links[i], text
        if "no kept item scores" in head:
            assert i in kept and not any(j in kept for j in links[i]), text
        if "was kept" in head:
            assert i in kept, text
        if "representative of its group" in head and "was kept" in head:
            assert res.mode == "connected" and i in kept and res._group_of[i] >= 0
        m = re.search(r"removed as a duplicate of item (\d+).*?cosine similarity (-?\d\.\d{4})", head)
        if m:
            r = int(m.group(1))
            assert dup[i] == r and m.group(2) == f"{full[i, r]:.4f}", text
            if res.mode == "greedy":
                # "... >= threshold, the most similar of the items kept before it"
                assert ">= threshold" in head and full[i, r] >= t32 and r in kept
                assert position[r] < position[i]
                before = [k for k in links[i] if k in kept and position[k] < position[i]]
                assert max(before, key=lambda k: (full[i, k], -k)) == r
        else:
            assert i in kept, text
        group = re.search(r"Group of (\d+) items \((\w+)\): \[([\d, ]*)\]", text)
        if group:
            g = res.groups[res._group_of[i]]
            assert int(group.group(1)) == len(g) and group.group(2) == res.mode
            assert [int(v) for v in group.group(3).split(", ")] == g[:20].tolist()
            assert i in g.tolist()
        else:
            assert res._group_of[i] < 0
        listed = re.search(r"scoring >= \S+ with it \((\d+)\): (.*)$", text, re.M)
        if not listed:
            assert not links[i], text
            continue
        assert int(listed.group(1)) == len(mine)
        shown = LINK.findall(listed.group(2))
        assert len(shown) == min(5, len(mine))
        for (j, s, fate, d), (ej, es) in zip(shown, mine):
            assert int(j) == ej and s == f"{es:.4f}"
            assert (fate == "kept") == (ej in kept)
            if d:
                assert dup[ej] == int(d)


@settings(max_examples=50, deadline=None)
@given(case=scored_sets(max_rows=14), mode=st.sampled_from(["connected", "greedy"]))
def test_explain_is_true_for_every_item(case, mode):
    x, t = case
    full = ec.cosine_similarity(x)
    pairs = pair_dict(*ec.similar_pairs(x, t))
    res = ec.deduplicate(x, threshold=t, mode=mode, progress=False)
    check_explain(res, full, pairs, list(range(len(x))))


@settings(max_examples=20, deadline=None)
@given(picks=st.lists(st.sampled_from(TEXTS + ["The cat sat.", "Stock markets fell", "lemon cake"]),
                      min_size=1, max_size=12),
       threshold=st.sampled_from([0.5, 0.7, 0.9]), mode=st.sampled_from(["connected", "greedy"]))
def test_explain_is_true_with_keep_longest(tmp_path_factory, picks, threshold, mode):
    emb = ec.CachedEmbedder(CountingEmbedder(), cache=ec.EmbeddingCache(tmp_path_factory.mktemp("c")))
    x = emb.embed(picks, progress=False)
    res = ec.deduplicate(picks, threshold=threshold, keep="longest", mode=mode, embedder=emb, progress=False)
    order = sorted(range(len(picks)), key=lambda k: (-len(picks[k]), k))
    check_explain(res, ec.cosine_similarity(x), pair_dict(*ec.similar_pairs(x, threshold)), order)


def test_greedy_explain_of_a_kept_item_with_a_removed_neighbour():
    # a ~ b ~ c, a and c below the threshold: b goes as a duplicate of a, c stays although
    # it scores above the threshold with b
    angles = np.radians([0.0, 20.0, 40.0])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    res = ec.deduplicate(x, threshold=float(np.cos(np.radians(25))), mode="greedy", progress=False)
    assert res.kept.tolist() == [0, 2]
    text = res.explain(2)
    assert "no other item scores" not in text
    assert "no kept item scores" in text and "1 (0.9397, removed as a duplicate of 0)" in text
    check_explain(res, ec.cosine_similarity(x), pair_dict(*ec.similar_pairs(x, res.threshold)), [0, 1, 2])


# ---------------------------------------------------------------------------------------
# what items may be
# ---------------------------------------------------------------------------------------


def test_ordered_iterables_of_texts_are_accepted(embedder):
    _, emb = embedder
    expected = ec.deduplicate(TEXTS, threshold=0.8, embedder=emb, progress=False)
    as_dict = dict.fromkeys(TEXTS)  # distinct texts, in first-seen order
    for items, want in (((t for t in TEXTS), expected.kept.tolist()),
                        (iter(TEXTS), expected.kept.tolist()),
                        (as_dict.keys(), ec.deduplicate(list(as_dict), threshold=0.8, embedder=emb,
                                                        progress=False).kept.tolist())):
        assert ec.deduplicate(items, threshold=0.8, embedder=emb, progress=False).kept.tolist() == want
    table = ec.near_duplicates((t for t in TEXTS), threshold=0.8, embedder=emb, progress=False)
    assert len(table) == len(ec.near_duplicates(TEXTS, threshold=0.8, embedder=emb, progress=False))
    res = ec.deduplicate(TEXTS[:2], against=(t for t in TEXTS[2:]), threshold=0.8, embedder=emb,
                         progress=False)
    assert res.removed.tolist() == [0, 1]


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: {"a", "b"}, ec.InvalidInputTypeError, r"items must be ordered.*got a set.*sorted\(items\)"),
        (lambda: frozenset({"a"}), ec.InvalidInputTypeError, r"got a frozenset.*sorted\(items\)"),
        (lambda: {"k": "a"}, ec.InvalidInputTypeError, r"got a dict.*list\(items.values\(\)\)"),
        (lambda: [None, "a"], ec.InvalidInputTypeError, r"items\[0\] must be a str, got NoneType"),
        (lambda: [float("nan"), "a b"], ec.InvalidInputTypeError, r"items\[0\] must be a str, got float"),
        (lambda: ["a", 3], ec.InvalidInputTypeError, r"items\[1\] must be a str, got int"),
        (lambda: (t for t in ["a", None]), ec.InvalidInputTypeError,
         r"items\[1\] must be a str, got NoneType"),
        (lambda: [None, None], ec.InvalidInputTypeError,
         r"items must be texts .*, an array of shape \(n, d\) or a VectorStore; got a list of 2 items, "
         r"items\[0\] being NoneType"),
        (lambda: 42, ec.InvalidInputTypeError, r"items must be texts .* got int"),
        (lambda: [[1.0, 2.0], [1.0]], ec.InvalidInputError, r"items must be .*got a list of 2 items"),
    ],
)
def test_items_that_are_neither_texts_nor_vectors_are_named(make, error, match):
    for call in (ec.deduplicate, ec.near_duplicates):
        with pytest.raises(error, match=match):
            call(make(), threshold=0.9, progress=False)
    named = match.replace("items must", "against must").replace(r"items\[", r"against\[")
    with pytest.raises(error, match=named.replace("(items", "(against")):
        ec.deduplicate(["x"], against=make(), threshold=0.9, progress=False)


class _BytesEmbedder:
    """Vectors from the UTF-8 bytes of each text, so NFC and NFD spellings differ."""

    cache_namespace = "test:bytes"

    def embed(self, texts):
        import hashlib as _h

        rows = [np.frombuffer(_h.sha256(t.encode("utf-8")).digest(), dtype=np.uint8) for t in texts]
        return np.asarray(rows, dtype=np.float32) - 127.5


def test_canonically_equivalent_texts_are_exact_duplicates():
    nfc, nfd = "caf\u00e9 au lait", "cafe\u0301 au lait"
    emb = _BytesEmbedder()
    assert ec.cosine_similarity(emb.embed([nfc, nfd]))[0, 1] < 0.9  # the embedder tells them apart
    res = ec.deduplicate([nfc, "tea", nfd], threshold=0.99, embedder=emb, progress=False)
    assert res.kept.tolist() == [0, 1] and res.duplicate_of.tolist() == [0]


def test_a_dataframe_is_read_as_its_values_never_its_column_names():
    import pandas as pd

    from embedcache.errors import InvalidInputTypeError

    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    x[7] = x[3]
    df = pd.DataFrame(x, columns=[f"e{j}" for j in range(8)])
    got = ec.near_duplicates(df, 0.99, progress=False)
    want = ec.near_duplicates(x, 0.99, progress=False)
    assert len(got) == len(want) == 1 and got[0]["i"] == 3 and got[0]["j"] == 7
    assert ec.deduplicate(df, threshold=0.99, progress=False).removed.tolist() == [7]
    texts = pd.DataFrame({"text": ["a cat", "a cat", "a dog"], "id": [1, 2, 3]})
    with pytest.raises(InvalidInputTypeError, match=r"DataFrame of shape \(3, 2\).*df\['text'\]"):
        ec.deduplicate(texts, threshold=0.9, progress=False)


def test_rows_float32_would_round_to_zero_are_refused_not_emptied():
    from embedcache.errors import InvalidInputError

    x = np.array([[1e-50, 1e-50], [2e-50, 2e-50], [1.0, 1.0]])  # parallel rows: cosine 1
    for call in (lambda: ec.near_duplicates(x, 0.99, progress=False), lambda: ec.similar_pairs(x, 0.5),
                 lambda: ec.top_k(x, x, 1), lambda: ec.top_k(np.ones((1, 2)), x, 1),
                 lambda: ec.similar_pairs(np.ones((2, 2)), 0.5, y=x)):
        with pytest.raises(InvalidInputError, match=r"row 0 holds only values below its least magnitude"):
            call()
    ok = np.array([[1.0, 1e-50], [1.0, 1.0]])  # one value lost in a row that stays itself: accepted
    assert len(ec.similar_pairs(ok, 0.5)[0]) == 1


def test_explain_after_a_partitioned_search_says_what_the_search_found():
    from embedcache.errors import InvalidInputTypeError

    x = np.random.default_rng(0).normal(size=(3000, 8)).astype(np.float32)
    res = ec.deduplicate(x, threshold=0.85, method="partitioned", recall=0.9, progress=False)
    assert res.method == "partitioned"
    said = [res.explain(i) for i in range(0, 3000, 97)]
    assert all("no other item scores" not in s and "no kept item scores" not in s for s in said)
    assert any("the partitioned search found no other item scoring >= 0.85" in res.explain(i) for i in res.kept)
    exact = ec.deduplicate(x[:300], threshold=0.85, progress=False)
    assert "found" not in exact.explain(0)
    for bad in (1.5, "a", None):
        with pytest.raises(InvalidInputTypeError):
            res.explain(bad)
        with pytest.raises(InvalidInputTypeError):
            res.least_similar_pairs(bad)
    with pytest.raises(InvalidInputTypeError):
        ec.near_duplicates(x[:50], 0.5, progress=False)[1.5]


def test_a_knn_graph_queried_with_itself_gives_each_rows_nearest_neighbours():
    from sklearn.neighbors import NearestNeighbors

    x = np.random.default_rng(1).normal(size=(200, 6)).astype(np.float32)
    g = ec.knn_graph(x, 5, weights="distance", symmetric=False)
    got = NearestNeighbors(metric="precomputed").fit(g).kneighbors(g, n_neighbors=5, return_distance=False)
    want = ec.top_k(x, x, 5, exclude_self=True)[1]
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(want, axis=1))
