"""One bad input, one error: every public function that takes a ``k``, a threshold or a metric
refuses the same bad value with the same exception class and the same message."""

from __future__ import annotations

import numpy as np
import pytest

import embedcache as ec
from embedcache.errors import InvalidInputError

X = np.float32([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.9, 0.1], [0, 0, 1]])


@pytest.fixture
def store(tmp_path):
    with ec.VectorStore(tmp_path / "store") as s:
        s.add([f"r{i}" for i in range(len(X))], X)
        yield s


def takers_of_k(store):
    return {
        "top_k": lambda k: ec.top_k(X[:2], X, k),
        "knn_graph": lambda k: ec.knn_graph(X, k, progress=False),
        "VectorStore.search": lambda k: store.search(X[:2], k),
    }


def takers_of_threshold(store):
    return {
        "similar_pairs": lambda t: ec.similar_pairs(X, t),
        "deduplicate": lambda t: ec.deduplicate(X, threshold=t, progress=False),
        "near_duplicates": lambda t: ec.near_duplicates(X, threshold=t, progress=False),
        "VectorStore.similar_pairs": lambda t: store.similar_pairs(t),
    }


def takers_of_metric(store, tmp_path):
    return {
        "top_k": lambda m: ec.top_k(X[:2], X, 2, metric=m),
        "similar_pairs": lambda m: ec.similar_pairs(X, 0.5, metric=m),
        "knn_graph": lambda m: ec.knn_graph(X, 2, metric=m, progress=False),
        "VectorStore": lambda m: ec.VectorStore(tmp_path / "other", metric=m),
    }


def refusals(calls, value):
    """{function name: (exception class, message)} of each call with the bad value."""
    seen = {}
    for name, call in calls.items():
        with pytest.raises(ec.InvalidInputError) as info:
            call(value)
        seen[name] = (type(info.value), str(info.value))
    return seen


def assert_one_refusal(seen, expected_class, expected_message):
    assert set(seen.values()) == {(expected_class, expected_message)}, seen


@pytest.mark.parametrize(
    "k, error, message",
    [
        (0, ec.InvalidInputError, "k must be >= 1, got 0"),
        (-3, ec.InvalidInputError, "k must be >= 1, got -3"),
        (2.5, ec.InvalidInputTypeError, "k must be an int, got float"),
        (True, ec.InvalidInputTypeError, "k must be an int, got bool"),
        ("3", ec.InvalidInputTypeError, "k must be an int, got str"),
    ],
)
def test_a_bad_k_is_refused_alike_everywhere(store, k, error, message):
    assert_one_refusal(refusals(takers_of_k(store), k), error, message)


@pytest.mark.parametrize(
    "threshold, error, message",
    [
        (1.5, ec.InvalidInputError, "threshold must be in [-1, 1] for cosine, got 1.5"),
        (-2, ec.InvalidInputError, "threshold must be in [-1, 1] for cosine, got -2"),
        (float("nan"), ec.InvalidInputError, "threshold must be finite, got nan"),
        ("0.9", ec.InvalidInputTypeError, "threshold must be a number, got str"),
        (None, ec.InvalidInputTypeError, "threshold must be a number, got NoneType"),
        (True, ec.InvalidInputTypeError, "threshold must be a number, got bool"),
    ],
)
def test_a_bad_threshold_is_refused_alike_everywhere(store, threshold, error, message):
    assert_one_refusal(refusals(takers_of_threshold(store), threshold), error, message)


@pytest.mark.parametrize(
    "metric, error, message",
    [
        ("l2", ec.InvalidInputError, "metric must be one of 'cosine', 'dot', got 'l2'"),
        ("Cosine", ec.InvalidInputError, "metric must be one of 'cosine', 'dot', got 'Cosine'"),
        (3, ec.InvalidInputError, "metric must be one of 'cosine', 'dot', got 3"),
    ],
)
def test_a_bad_metric_is_refused_alike_everywhere(store, tmp_path, metric, error, message):
    assert_one_refusal(refusals(takers_of_metric(store, tmp_path), metric), error, message)


def test_a_finite_value_beyond_float32_is_named_not_called_infinite(tmp_path):
    q = np.ones((1, 4))
    q[0, 2] = -1e300
    with pytest.raises(InvalidInputError, match=r"queries must fit float32 \(magnitudes up to 3\.403e\+38\), "
                                                r"got -1e\+300 in row 0"):
        ec.top_k(q, np.ones((3, 4)), 1)
    with ec.VectorStore(tmp_path / "s") as store:
        store.add(["a", "b"], np.ones((2, 4), np.float32))
        with pytest.raises(InvalidInputError, match="must fit float32"):
            store.search(q, 1)
        with pytest.raises(InvalidInputError, match=r"row 1 is not \(float32 holds values up to 3\.4028e\+38\)"):
            store.add(["c", "d"], np.vstack([np.ones((1, 4)), q]))
        assert len(store) == 2
    with pytest.raises(InvalidInputError, match="must fit float32"):
        ec.normalize(q)
