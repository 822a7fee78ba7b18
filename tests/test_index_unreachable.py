"""A recall only an exact search reaches: an exact fallback on a small collection, a clear
error (with the recall that is in reach) on a large one, never a silent quadratic search."""

from __future__ import annotations

import numpy as np
import pytest

import embedcache as ec
from embedcache import _config
from embedcache.errors import EmbedCacheError, RecallUnreachableError
from embedcache.index import PartitionIndex, partitioned_knn, partitioned_pairs


def _spread(n=3000, d=16, seed=0):
    """Rows with no cluster structure: a row's neighbours lie in many cells."""
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_knn_recall_out_of_reach_raises_on_a_large_collection_and_is_exact_on_a_small_one():
    x = _spread()
    index = PartitionIndex.build(x, cells=40, seed=0)
    with _config.override(INDEX_EXACT_FALLBACK_ROWS=len(x) - 1):
        with pytest.raises(RecallUnreachableError) as got:
            partitioned_knn(x, 10, recall=1.0, index=index)
    err = got.value
    assert isinstance(err, EmbedCacheError)
    assert err.recall == 1.0 and err.rows == len(x) and 1 <= err.probes < index.cells
    assert 0.0 < err.reachable <= 1.0 and "95% CI" in str(err)
    assert "recall 1.0" in str(err) and "probes=" in str(err) and "method='exact'" in str(err)
    # the same search of a collection small enough runs exactly, recall 1
    s, r, rec = partitioned_knn(x, 10, recall=1.0, index=index)
    es, er = ec.top_k(x, x, 10, exclude_self=True)
    np.testing.assert_array_equal(r, er)
    np.testing.assert_array_equal(s, es)
    assert rec.estimate == 1.0 and rec.probes == index.cells
    # a recall in reach is unaffected by the limit
    with _config.override(INDEX_EXACT_FALLBACK_ROWS=len(x) - 1):
        _, _, rec = partitioned_knn(x, 10, recall=0.5, index=index)
    assert rec.probes < index.cells and rec.low > 0.3


def test_pairs_recall_out_of_reach_raises_on_a_large_collection():
    x = _spread(2500, d=8, seed=1)
    index = PartitionIndex.build(x, cells=40, seed=0)
    with _config.override(INDEX_EXACT_FALLBACK_ROWS=len(x) - 1):
        with pytest.raises(RecallUnreachableError) as got:
            partitioned_pairs(x, 0.8, recall=1.0, index=index)
        assert got.value.probes < index.cells
        # probes given: the user's choice, never refused
        i, j, s, rec = partitioned_pairs(x, 0.8, probes=index.cells, index=index)
    assert rec is None
    for a, b in zip((i, j, s), ec.similar_pairs(x, 0.8)):
        np.testing.assert_array_equal(a, b)
