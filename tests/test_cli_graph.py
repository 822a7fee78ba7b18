"""``embedcache graph``: the kNN graph of a file's rows or a store's vectors as a scipy
``.npz``, equal to ``ec.knn_graph`` on the same vectors, and taken as it is by scikit-learn's
DBSCAN and HDBSCAN with ``metric="precomputed"``. End to end through the ``run`` fixture of
test_cli.py."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy.sparse import load_npz
from scipy.sparse.csgraph import connected_components

import embedcache as ec
from test_cli import EXAMPLE, ROWS, TEXTS, assert_one_line_error, run  # noqa: F401 (run: a fixture)



def blobs(per=40, d=16, centres=3, seed=0):
    """``centres`` clusters of ``per`` rows each, and the cluster of each row."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d))
    x = np.concatenate([m + rng.normal(scale=0.3, size=(per, d)) for m in c]).astype(np.float32)
    return x, np.repeat(np.arange(centres), per)


def store_of(path, x):
    ids = [f"p{k}" for k in range(len(x))]
    with ec.VectorStore(path) as vs:
        vs.add(ids, x, metadata=[{"text": f"point {k}"} for k in range(len(x))])
    return ids


def same_graph(a, b):
    assert a.shape == b.shape and a.format == b.format == "csr"
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)


def test_graph_of_a_file_equals_knn_graph_of_its_vectors(run, tmp_path):
    proc = run("graph", EXAMPLE, "-k", "5", "-o", "g.npz")
    assert "hashing" in proc.stderr  # says which embedder made the vectors
    x = ec.HashingEmbeddings().embed(TEXTS)
    same_graph(load_npz(tmp_path / "g.npz"), ec.knn_graph(x, 5, weights="distance", progress=False))
    assert f"graph of {len(TEXTS)} rows, k=5" in proc.stdout and "(distance, symmetric)" in proc.stdout
    run("graph", EXAMPLE, "-k", "3", "-o", "s.npz", "--weights", "similarity", "--no-symmetric", "-q",
        inproc=True)
    g = load_npz(tmp_path / "s.npz")
    same_graph(g, ec.knn_graph(x, 3, weights="similarity", symmetric=False, progress=False))
    assert np.all(np.diff(g.indptr) == 3)  # k per row, no mirrored entries


def test_graph_of_a_store_with_its_ids_feeds_dbscan_and_hdbscan(run, tmp_path):
    from sklearn.cluster import DBSCAN, HDBSCAN
    from sklearn.metrics import adjusted_rand_score

    x, truth = blobs()
    ids = store_of(tmp_path / "vs", x)
    proc = run("graph", "vs", "-k", "40", "-o", "g.npz", "--ids", "ids.csv")
    assert "embedder" not in proc.stderr  # the store's vectors, nothing embedded
    g = load_npz(tmp_path / "g.npz")
    with ec.VectorStore(tmp_path / "vs") as vs:
        same_graph(g, ec.knn_graph(vs, 40, weights="distance", progress=False))
    with open(tmp_path / "ids.csv", newline="") as f:
        assert [(int(r["row"]), r["id"]) for r in csv.DictReader(f)] == list(enumerate(ids))
    # DBSCAN on the graph equals DBSCAN on all distances while every eps-neighbourhood lies
    # within the k nearest (checked here on the dense matrix)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    dense = np.clip(1.0 - xn @ xn.T, 0.0, None)
    eps = 0.1
    assert ((dense <= eps).sum(axis=1) - 1).max() <= 40
    sparse_labels = DBSCAN(eps=eps, min_samples=5, metric="precomputed").fit_predict(g)
    dense_labels = DBSCAN(eps=eps, min_samples=5, metric="precomputed").fit_predict(dense)
    np.testing.assert_array_equal(sparse_labels, dense_labels)
    assert adjusted_rand_score(truth, sparse_labels) > 0.9
    # HDBSCAN takes the sparse graph when it is one connected component
    assert connected_components(g)[0] == 1
    labels = HDBSCAN(min_cluster_size=10, metric="precomputed", copy=True).fit_predict(g)
    assert adjusted_rand_score(truth, labels) > 0.9


def test_a_float16_store_and_fewer_rows_than_k(run, tmp_path):
    x, _ = blobs(per=3, centres=2, seed=2)
    with ec.VectorStore(tmp_path / "half", dtype="float16") as vs:
        vs.add([f"h{k}" for k in range(len(x))], x)
    run("graph", "half", "-k", "15", "-o", "g.npz", "--no-symmetric", "-q", inproc=True)
    g = load_npz(tmp_path / "g.npz")
    with ec.VectorStore(tmp_path / "half") as vs:
        same_graph(g, ec.knn_graph(vs, 15, weights="distance", symmetric=False, progress=False))
    assert np.all(np.diff(g.indptr) == len(x) - 1)  # every other row, never itself
    assert np.all(g.indices != np.repeat(np.arange(len(x)), np.diff(g.indptr)))


def test_graph_user_errors_are_one_line(run, tmp_path):
    x, _ = blobs(per=5)
    store_of(tmp_path / "vs", x)
    (tmp_path / "lines.txt").write_text("one text\nanother text\n")
    (tmp_path / "empty").mkdir()
    cases = [
        (("graph", "vs", "-o", "g.csv"), ("-o g.csv", ".npz")),
        (("graph", "lines.txt", "-o", "g.npz", "--ids", "ids.csv"), ("no field 'id' for --ids", "--id-field")),
        (("graph", "empty", "-o", "g.npz"), ("INPUT empty", "without a vector store")),
        (("graph", "vs", "-o", "g.npz", "--model", "m"), ("--model does not apply",)),
        (("graph", "vs", "-o", "g.npz", "--ids", "g.npz"), ("--ids g.npz is the same file as -o g.npz",)),
        (("graph", "vs", "-o", "g.npz", "-k", "0"), ("-k",)),
        (("graph", "vs", "-o", "g.npz", "--method", "exact", "--recall", "0.5"), ("--recall applies",)),
        (("graph", "vs", "-o", "g.npz", "--recall", "1.5"), ("--recall",)),
    ]
    for args, fragments in cases:
        assert_one_line_error(run(*args, ok=False, inproc=True), *fragments)
    assert not (tmp_path / "g.npz").exists() and not (tmp_path / "ids.csv").exists()


def test_graph_method_and_recall(run, tmp_path):
    x, _ = blobs(per=200, centres=5, seed=4)
    store_of(tmp_path / "vs", x)
    proc = run("graph", "vs", "-k", "10", "-o", "auto.npz", "-q", inproc=True)
    assert proc.stdout.strip().endswith("; method: exact (auto)")
    proc = run("graph", "vs", "-k", "10", "-o", "p.npz", "--method", "partitioned", "--recall", "0.9", "-q",
               inproc=True)
    with ec.VectorStore(tmp_path / "vs") as vs:
        g, rec = ec.knn_graph(vs, 10, weights="distance", method="partitioned", recall=0.9,
                              return_recall=True, progress=False)
        exact = ec.knn_graph(vs, 10, weights="distance", method="exact", progress=False)
    same_graph(load_npz(tmp_path / "p.npz"), g)
    same_graph(load_npz(tmp_path / "auto.npz"), exact)
    assert rec is not None and (f"; method: partitioned, recall {rec.estimate:.4f} "
                                f"(95% CI {rec.low:.4f}-{rec.high:.4f}, {rec.sample} sampled rows)") in proc.stdout
