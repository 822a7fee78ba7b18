"""pair_order against numpy's lexsort, the plain reference it replaces."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from embedcache.kernels.pairs import pair_order

SCORES = [float("nan"), float("-inf"), -1.0, -0.5, -0.0, 0.0, 1e-30, 0.25, 0.5, 0.9, np.nextafter(np.float32(0.9), np.float32(1)), 1.0, -1e-30]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9), st.sampled_from(SCORES)), max_size=60))
def test_pair_order_is_lexsort_by_score_then_i_then_j(rows):
    i = np.array([r[0] for r in rows], np.int64)
    j = np.array([r[1] for r in rows], np.int64)
    s = np.array([r[2] for r in rows], np.float32)
    # -0.0 and 0.0 are equal scores (lexsort compares them as equal too)
    np.testing.assert_array_equal(pair_order(i, j, s), np.lexsort((j, i, -s.astype(np.float64))))


def test_pair_order_of_random_float32_scores_and_large_indices():
    rng = np.random.default_rng(0)
    n = 20_000
    i = rng.integers(0, 3_000_000_000, n)  # past int32
    j = rng.integers(0, 50, n)
    s = np.round(rng.standard_normal(n), 2).astype(np.float32)  # many ties
    np.testing.assert_array_equal(pair_order(i, j, s), np.lexsort((j, i, -s.astype(np.float64))))
    huge = np.array([2**61, 0]), np.array([2**40, 3]), np.array([0.5, 0.5], np.float32)
    np.testing.assert_array_equal(pair_order(*huge), [1, 0])  # the key would overflow: lexsort
