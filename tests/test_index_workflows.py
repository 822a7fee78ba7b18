"""method=, recall= and seed= on the workflows: what auto picks, what the results report, and
that a partitioned answer holds only true pairs with their exact scores."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import embedcache as ec
from embedcache import _config
from embedcache.errors import InvalidInputError, InvalidInputTypeError
from embedcache.index import Recall
from tests.test_index import clustered


@pytest.fixture(scope="module")
def x():
    x = clustered(4000, d=24, clusters=50, noise=0.5, seed=11)
    return np.vstack([x, x[:200]])  # exact copies too


def test_auto_is_exact_for_small_inputs_and_says_so(x):
    t = ec.near_duplicates(x, 0.85, progress=False)
    assert t.method == "exact" and t.recall is None
    with _config.override(INDEX_AUTO_ROWS=100):
        t2 = ec.near_duplicates(x, 0.85, progress=False)
    assert t2.method == "partitioned" and isinstance(t2.recall, Recall)
    assert "partitioned" in repr(t2)


def test_partitioned_pairs_are_true_pairs_with_exact_scores(x):
    exact = ec.near_duplicates(x, 0.85, method="exact", progress=False)
    part = ec.near_duplicates(x, 0.85, method="partitioned", recall=0.95, progress=False)
    n = len(x)
    ek = exact.i * n + exact.j
    pk = part.i * n + part.j
    pos = np.searchsorted(np.sort(ek), pk)
    assert np.isin(pk, ek).all()
    order = np.argsort(ek)
    np.testing.assert_array_equal(part.score, exact.score[order][pos])
    true = len(part) / len(exact)
    assert true >= 0.9
    assert part.recall.low - 0.03 <= true <= part.recall.high + 0.03
    # the 200 exact copies pair with their originals whatever the method
    assert np.isin(np.arange(200) * n + np.arange(4000, 4200), pk).all()


def test_deduplicate_partitioned_agrees_with_exact(x):
    exact = ec.deduplicate(x, threshold=0.9, method="exact", progress=False)
    part = ec.deduplicate(x, threshold=0.9, method="partitioned", recall=0.99, progress=False)
    assert part.method == "partitioned" and part.recall.probes >= 1
    agree = len(np.intersect1d(exact.kept, part.kept)) / len(np.union1d(exact.kept, part.kept))
    assert agree >= 0.97
    assert "method='partitioned'" in repr(part)
    same = ec.deduplicate(x, threshold=0.9, method="partitioned", recall=0.99, progress=False)
    np.testing.assert_array_equal(same.kept, part.kept)  # same seed, same answer


def test_knn_graph_partitioned_stays_plain_csr(x):
    g = ec.knn_graph(x[:3000], 5, method="partitioned", recall=0.95, progress=False)
    assert isinstance(g, sp.csr_matrix)
    g2, rec = ec.knn_graph(x[:3000], 5, method="partitioned", recall=0.95, progress=False,
                           return_recall=True)
    assert (g != g2).nnz == 0 and isinstance(rec, Recall)
    exact, none = ec.knn_graph(x[:3000], 5, method="exact", progress=False, return_recall=True)
    assert none is None
    full = ec.cosine_similarity(x[:3000])
    coo = g.tocoo()
    np.testing.assert_array_equal(coo.data, full[coo.row, coo.col])  # exact scores
    ge, gp = ec.knn_graph(x[:3000], 5, method="exact", symmetric=False, progress=False), \
        ec.knn_graph(x[:3000], 5, method="partitioned", recall=0.95, symmetric=False, progress=False)
    hits = len(set(zip(*ge.nonzero())) & set(zip(*gp.nonzero())))
    true = hits / ge.nnz
    assert true >= 0.9 and rec.low - 0.03 <= true <= rec.high + 0.03


def test_texts_partitioned(tmp_path):
    texts = [f"post number {k % 300} about topic {k % 7}" for k in range(1200)]
    with _config.override(INDEX_AUTO_ROWS=10, INDEX_MIN_CELL=8):
        res = ec.deduplicate(texts, threshold=0.95, progress=False)
    exact = ec.deduplicate(texts, threshold=0.95, method="exact", progress=False)
    assert res.method == "partitioned"
    assert set(res.kept.tolist()) >= set(exact.kept.tolist())  # missing pairs only keep more


@pytest.mark.parametrize("kw, err", [
    ({"method": "fast"}, "method must be one of"),
    ({"recall": 0}, "recall must be in"),
    ({"recall": 1.2}, "recall must be in"),
    ({"seed": -1}, "seed must be >= 0"),
])
def test_bad_method_arguments(x, kw, err):
    for call in (lambda: ec.near_duplicates(x[:10], 0.9, **kw), lambda: ec.deduplicate(x[:10], **kw),
                 lambda: ec.knn_graph(x[:10], 2, **kw)):
        with pytest.raises(InvalidInputError, match=err):
            call()
    with pytest.raises(InvalidInputTypeError):
        ec.near_duplicates(x[:10], 0.9, seed=1.5)
