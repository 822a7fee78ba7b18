"""Kernels against the plain-loop reference in tests/support/naive.py, plus hypothesis properties."""

from __future__ import annotations

import contextlib

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedcache import (
    DimensionMismatchError,
    InvalidInputError,
    InvalidInputTypeError,
    _config,
    cosine_similarity,
    dot_similarity,
    normalize,
    similar_pairs,
    top_k,
)
from embedcache.kernels import FASTMATH, meets_threshold, pair_scores
from support import naive
from support.strategies import matrices, matrix_pairs, small_ints

SIZES = [1, 2, 7, 513]
BLOCKS = [None, 5, 17]


def blocks(size):
    """Every block and tile of the kernels ``size`` rows (odd sizes reach the block
    boundaries of small inputs); None keeps the defaults."""
    if size is None:
        return contextlib.nullcontext()
    return _config.override(
        TOPK_CORPUS_BLOCK=size, TOPK_QUERY_BLOCK=size, TOPK_MAX_BLOCK=size, TOPK_STREAM_CHUNK=size,
        PAIRS_BLOCK=size, PAIRS_COLUMNS=size,
    )


def assert_pair_order(i, j, s):
    """Pairs are listed highest score first, ties by i then j."""
    listed = list(zip(i.tolist(), j.tolist(), s.tolist()))
    assert listed == by_score(listed)


def by_score(pairs):
    """(i, j, score) triples in the order of similar_pairs: score descending, then i, then j."""
    return sorted(pairs, key=lambda p: (-float(p[2]), p[0], p[1]))


def int_matrix(n, d, seed, *, low=-3, high=4):
    """Small-integer matrix (exact float32 dot products) with a zero row and duplicates."""
    rng = np.random.default_rng(seed)
    x = rng.integers(low, high, size=(n, d)).astype(np.float32)
    if n >= 3:
        x[n // 2] = 0.0
        x[-1] = x[0]
    return x


def float_matrix(n, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if n >= 3:
        x[1] = 0.0
        x[-1] = x[0]
    return x


def thread_counts():
    """(1, 2): the thread counts whose results must agree. Fails, rather than comparing
    one count with itself, when numba was started with fewer than two threads."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.fail(
            "comparing thread counts needs NUMBA_NUM_THREADS >= 2, got "
            f"{numba.config.NUMBA_NUM_THREADS} (set NUMBA_NUM_THREADS=2 before running)"
        )
    return (1, 2)


@pytest.fixture
def two_threads():
    """Run with numba.set_num_threads(1) and (2) and restore the previous count."""
    counts = thread_counts()
    before = numba.get_num_threads()
    yield counts
    numba.set_num_threads(before)


# ----------------------------------------------------------------------------------------
# normalize and similarity matrices
# ----------------------------------------------------------------------------------------


def test_fastmath_leaves_out_nnan_and_ninf():
    assert "nnan" not in FASTMATH and "ninf" not in FASTMATH and "fast" not in FASTMATH


def test_kernels_use_only_the_fastmath_constant():
    import inspect
    import re

    from embedcache.kernels import _core, pairs, similarity, topk

    source = "".join(inspect.getsource(m) for m in (_core, pairs, similarity, topk))
    flags = re.findall(r"fastmath=([^,)]+)", source)
    assert flags and set(flags) == {"FASTMATH"}


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_normalize_matches_naive(n, dtype):
    x = float_matrix(n, 9, n).astype(dtype)
    got = normalize(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, naive.normalize(x), atol=2e-7 * 3)
    if n >= 3:
        assert not got[1].any()  # zero row stays zero


def test_normalize_out_in_place():
    x = float_matrix(7, 5, 1)
    expected = normalize(x)
    out = normalize(x, out=x)
    assert out is x
    np.testing.assert_array_equal(x, expected)
    with pytest.raises(InvalidInputTypeError, match="out must be a float32"):
        normalize(x, out=np.empty((7, 5)))
    with pytest.raises(InvalidInputError, match=r"out must have shape \(7, 5\)"):
        normalize(x, out=np.empty((5, 7), np.float32))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_similarity_matrices_match_naive(n, metric):
    func = cosine_similarity if metric == "cosine" else dot_similarity
    a = float_matrix(n, 6, n)
    b = float_matrix(max(1, n // 2), 6, n + 1)
    tol = 1e-5 if metric == "cosine" else 1e-4
    np.testing.assert_allclose(func(a), naive.similarity(a, None, metric), atol=tol, rtol=tol)
    np.testing.assert_allclose(func(a, b), naive.similarity(a, b, metric), atol=tol, rtol=tol)


def test_zero_vector_has_similarity_zero_with_everything():
    x = float_matrix(5, 4, 2)
    s = cosine_similarity(x)
    assert not s[1].any() and not s[:, 1].any()
    assert not cosine_similarity(x, np.zeros((3, 4), np.float32)).any()


def test_cosine_of_tiny_and_huge_rows():
    # parallel rows whose float32 squares underflow (or overflow) still have cosine 1
    x = np.array([[1e-30, 2e-30], [1e30, 2e30], [3.0, 6.0], [1e-40, 2e-40]], np.float32)
    x = np.concatenate([x, -x[:1]])
    expected = np.ones((5, 5), np.float32)
    expected[4, :4] = expected[:4, 4] = -1
    np.testing.assert_allclose(cosine_similarity(x), expected, atol=1e-6)
    for n_queries in (1, 20):  # streamed and BLAS-filtered paths
        s, i = top_k(np.repeat(x[:1], n_queries, axis=0), x, 5)
        # cosines of 1 tie exactly (the clip), so they come in index order, for every query
        np.testing.assert_array_equal(s, np.tile(np.float32([1, 1, 1, 1, -1]), (n_queries, 1)))
        np.testing.assert_array_equal(i, np.tile(np.arange(5), (n_queries, 1)))
    i, j, s = similar_pairs(x, 0.999)
    assert sorted(zip(i.tolist(), j.tolist())) == [(a, b) for a in range(4) for b in range(a + 1, 4)]
    assert_pair_order(i, j, s)


@pytest.mark.parametrize("log2_norm", [-45, -29, 0, 20, 31, 40, 49, 55])
def test_a_row_scores_exactly_one_with_itself_at_any_scale(log2_norm):
    # copies of a row are near-duplicates at threshold 1.0 whatever its norm: the norm and
    # the dot product of a row with itself are summed in the same precision
    rng = np.random.default_rng(log2_norm + 100)
    x = rng.standard_normal((40, 384))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True) * 2.0**log2_norm).astype(np.float32)
    twice = np.concatenate([x, x])
    s = cosine_similarity(twice)
    np.testing.assert_array_equal(np.diag(s), 1.0)
    np.testing.assert_array_equal(np.diag(s, 40), 1.0)
    with blocks(17):
        i, j, _ = similar_pairs(twice, 1.0)
    assert {(k, k + 40) for k in range(40)} <= set(zip(i.tolist(), j.tolist()))
    np.testing.assert_array_equal(pair_scores(x, np.arange(40), np.arange(40)), 1.0)


# ----------------------------------------------------------------------------------------
# top_k
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("block", BLOCKS)
def test_top_k_dot_is_exact_with_ties(n, block):
    # small integers: every dot product is exact, so indices must match the reference
    # exactly, ties (duplicated rows, equal scores) going to the lower index
    corpus = int_matrix(n, 5, n)
    queries = np.concatenate([corpus[: min(n, 4)], int_matrix(3, 5, n + 7)])
    for k, queries in [(k, queries) for k in sorted({1, 3, n, n + 4})] + [
        (4, int_matrix(30, 5, n + 8))  # enough queries for the BLAS path
    ]:
        with blocks(block):
            s, i = top_k(queries, corpus, k, metric="dot")
        es, ei = naive.top_k(queries, corpus, k, metric="dot")
        assert s.shape == i.shape == (len(queries), min(k, n))
        assert s.dtype == np.float32 and i.dtype == np.int64
        np.testing.assert_array_equal(i, ei)
        np.testing.assert_array_equal(s, es)


def check_top_k(s, i, full, k, *, atol, eligible=None):
    """(s, i) is a valid top-k of the score matrix ``full`` up to ``atol``: the reported
    scores are the rows' true scores, best first, nothing better was left out, exact ties
    are in ascending index order, and slots are empty only when no eligible row is left."""
    nq, n = full.shape
    eligible = np.ones((nq, n), bool) if eligible is None else eligible
    assert s.shape == i.shape == (nq, min(k, n))
    for r in range(nq):
        filled = i[r] >= 0
        assert filled.sum() == min(k, eligible[r].sum())
        assert (i[r][~filled] == -1).all() and np.isneginf(s[r][~filled]).all()
        chosen = i[r][filled]
        assert len(set(chosen.tolist())) == len(chosen) and eligible[r][chosen].all()
        np.testing.assert_allclose(s[r][filled], full[r, chosen], atol=atol)
        assert (np.diff(s[r][filled]) <= 0).all()
        same = np.diff(s[r][filled]) == 0
        assert (np.diff(chosen)[same] > 0).all()
        rest = eligible[r].copy()
        rest[chosen] = False
        if rest.any() and len(chosen):
            assert full[r, rest].max() <= s[r][filled][-1] + atol


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("n_queries", [1, 3, 40])
def test_top_k_cosine_matches_naive(n, block, n_queries):
    corpus = float_matrix(n, 8, n)
    queries = np.concatenate([corpus[:1], float_matrix(n_queries - 1, 8, n + 3)])
    full = naive.similarity(queries, corpus, "cosine")
    for k in sorted({1, 5, n + 2}):
        with blocks(block):
            s, i = top_k(queries, corpus, k)
        check_top_k(s, i, full, k, atol=2e-6)
        es, _ = naive.top_k(queries, corpus, k, scores=full)
        np.testing.assert_allclose(s, es, atol=2e-6)
        if n >= 3:  # row 0 and its duplicate, row n-1, in index order
            assert i[0, 0] == 0
            if k > 1:
                assert i[0, 1] == n - 1 and s[0, 0] == s[0, 1]


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_top_k_mask_and_exclude_self(block, metric):
    x = int_matrix(40, 4, 3)
    mask = np.zeros(40, bool)
    mask[[0, 3, 5, 17, 39]] = True
    for exclude_self, nq in [(False, 40), (True, 40), (False, 3), (True, 3)]:
        with blocks(block):
            s, i = top_k(x[:nq], x, 8, metric=metric, exclude_self=exclude_self, mask=mask)
        eligible = np.repeat(mask[None, :], 40, axis=0)
        if exclude_self:
            np.fill_diagonal(eligible, False)
        full = naive.similarity(x[:nq], x, metric)
        check_top_k(s, i, full, 8, atol=2e-6, eligible=eligible[:nq])
        assert (i[:, 5:] == -1).all() and np.isneginf(s[:, 5:]).all()
        if exclude_self:
            assert (i != np.arange(nq)[:, None]).all()
            if nq > 3:
                assert (i[3] >= 0).sum() == 4  # row 3 is masked in but excluded for itself


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize(("dtype", "dim"), [(np.float32, 24), (np.float16, 24), (np.float32, 384)])
def test_top_k_same_answer_for_one_query_or_many(metric, dtype, dim):
    # one query streams the corpus, many go through BLAS: the answers agree bit for bit,
    # and equal the ranking of the dense matrix
    corpus = float_matrix(513, dim, 11).astype(dtype)
    corpus[200:230] = corpus[5]
    queries = np.concatenate([corpus[:3].astype(np.float32), float_matrix(37, dim, 12)])
    many = top_k(queries, corpus, 12, metric=metric)
    for r in (0, 1, 2, 20, 39):
        one = top_k(queries[r : r + 1], corpus, 12, metric=metric)
        np.testing.assert_array_equal(one[0], many[0][r : r + 1])
        np.testing.assert_array_equal(one[1], many[1][r : r + 1])
    func = cosine_similarity if metric == "cosine" else dot_similarity
    ms, mi = naive.top_k(queries, corpus, 12, scores=func(queries, corpus.astype(np.float32)))
    np.testing.assert_array_equal(many[1], mi)
    np.testing.assert_array_equal(many[0], ms.astype(np.float32))


def test_top_k_k_beyond_n_returns_n_columns():
    x = int_matrix(3, 4, 0)
    s, i = top_k(x, x, 10, metric="dot")
    assert s.shape == i.shape == (3, 3)
    s, i = top_k(x, x, 10, metric="dot", exclude_self=True)
    assert s.shape == (3, 3) and (i[:, 2] == -1).all() and np.isneginf(s[:, 2]).all()


def test_top_k_empty_inputs():
    x = float_matrix(4, 3, 0)
    s, i = top_k(x[:0], x, 2)
    assert s.shape == i.shape == (0, 2)
    s, i = top_k(x, x[:0], 2)
    assert s.shape == i.shape == (4, 0)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_top_k_other_corpus_dtypes_equal_float32_copy(dtype):
    corpus = float_matrix(513, 16, 4).astype(dtype)
    queries = float_matrix(5, 16, 5)
    for block in BLOCKS:
        with blocks(block):
            s, i = top_k(queries, corpus, 7)
            es, ei = top_k(queries, corpus.astype(np.float32), 7)
        np.testing.assert_array_equal(i, ei)
        np.testing.assert_array_equal(s, es)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_top_k_memmap_corpus(tmp_path, dtype):
    data = float_matrix(513, 8, 6).astype(dtype)
    mm = np.memmap(tmp_path / "corpus.bin", dtype=dtype, mode="w+", shape=data.shape)
    mm[:] = data
    mm.flush()
    ro = np.memmap(tmp_path / "corpus.bin", dtype=dtype, mode="r", shape=data.shape)
    queries = float_matrix(4, 8, 7)
    for block in BLOCKS:
        with blocks(block):
            s, i = top_k(queries, ro, 5)
        es, ei = top_k(queries, data.astype(np.float32), 5)
        np.testing.assert_array_equal(i, ei)
        np.testing.assert_array_equal(s, es)


@pytest.mark.parametrize("bad_value", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("n_queries", [1, 20])
@pytest.mark.parametrize("block", BLOCKS)
def test_top_k_float16_corpus_with_inf_or_nan(bad_value, n_queries, block):
    corpus = float_matrix(100, 16, 3).astype(np.float16)
    corpus[57, 9] = bad_value
    corpus[80, 0] = bad_value
    with pytest.raises(InvalidInputError, match="corpus must be finite.*row 57"):
        with blocks(block):
            top_k(float_matrix(n_queries, 16, 4), corpus, 3)


def test_float16_decoders_are_exact_for_every_bit_pattern():
    from embedcache.kernels import _core

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    expected = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    decoders = [_core._decode_f16_bits]
    if _core._native_half():
        decoders.append(_core._decode_f16)
    for decode in decoders:
        out = np.empty(len(bits), np.float32)
        decode(bits, out)
        np.testing.assert_array_equal(out[~nan].view(np.uint32), expected[~nan].view(np.uint32))
        assert np.isnan(out[nan]).all()


@pytest.mark.parametrize("n_queries", [1, 3, 20])
def test_top_k_float16_extreme_values_equal_float32_copy(n_queries):
    # subnormal, signed zero, largest finite and smallest normal float16 values: the
    # one-query stream decodes float16 itself, and must decode them exactly
    rng = np.random.default_rng(5)
    specials = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF,
                         0x3C00, 0xBC00, 0x0200, 0x83FF], np.uint16)
    bits = rng.choice(specials, size=(300, 37)).astype(np.uint16)
    bits[:100] = rng.integers(0, 0x7C00, size=(100, 37), dtype=np.uint16)
    bits[100:150] |= np.uint16(0x8000) * rng.integers(0, 2, (50, 37)).astype(np.uint16)
    corpus = bits.view(np.float16)
    corpus[150] = corpus[5]
    assert np.isfinite(corpus).all()
    queries = np.concatenate([corpus[[5, 120, 250]].astype(np.float32),
                              float_matrix(17, 37, 6)])[:n_queries]
    for metric in ("cosine", "dot"):
        for block in BLOCKS:
            with blocks(block):
                s, i = top_k(queries, corpus, 9, metric=metric)
                es, ei = top_k(queries, corpus.astype(np.float32), 9, metric=metric)
            np.testing.assert_array_equal(i, ei)
            np.testing.assert_array_equal(s, es)


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("block", [1, 3, 8, 13, 100, None])
def test_top_k_float16_one_query_mask_and_self_equal_float32_copy(metric, block):
    # the one-query stream decodes float16 rows a group at a time: chunks whose length is
    # not a multiple of the group, masked rows and the excluded row give the float32 answer
    corpus = float_matrix(203, 40, 8).astype(np.float16)
    corpus[150:170] = corpus[2]
    mask = np.ones(203, np.bool_)
    mask[[0, 7, 8, 9, 151, 202]] = False
    for r in (0, 2, 9):
        q = corpus[r : r + 1].astype(np.float32)
        for kw in ({}, {"mask": mask}, {"exclude_self": True}, {"mask": mask, "exclude_self": True}):
            with blocks(block):
                s, i = top_k(q, corpus, 11, metric=metric, **kw)
            es, ei = top_k(q, corpus.astype(np.float32), 11, metric=metric, **kw)
            np.testing.assert_array_equal(i, ei)
            np.testing.assert_array_equal(s, es)


@pytest.mark.parametrize("n_queries", [1, 20])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_top_k_mask_with_k_beyond_n(n_queries, metric):
    x = int_matrix(6, 3, 1)
    queries = np.concatenate([x, int_matrix(14, 3, 2)])[:n_queries]
    mask = np.array([False, True, False, True, True, False])
    own = (cosine_similarity if metric == "cosine" else dot_similarity)(queries, x)
    for exclude_self in (False, True):
        s, i = top_k(queries, x, 10, metric=metric, mask=mask, exclude_self=exclude_self)
        assert s.shape == i.shape == (n_queries, 6)
        es, ei = naive.top_k(queries, x, 10, mask=mask, exclude_self=exclude_self, scores=own)
        np.testing.assert_array_equal(i, ei)
        np.testing.assert_array_equal(s, es.astype(np.float32))
        assert (i[:, 3:] == -1).all() and np.isneginf(s[:, 3:]).all()


def test_dot_scores_do_not_overflow_to_nan():
    # float32 lanes of +3e38 and -3e38 overflow to +inf and -inf and sum to NaN; the exact
    # dot product is 0, and the row is still ranked and paired
    x = np.ones((3, 64), np.float32)
    x[0, 0::2] = 3e38
    x[0, 1::2] = -3e38
    q = np.ones((1, 64), np.float32)
    np.testing.assert_array_equal(dot_similarity(q, x), [[0, 64, 64]])
    for n_queries in (1, 20):  # streamed and BLAS-filtered paths
        s, i = top_k(np.repeat(q, n_queries, axis=0), x, 3, metric="dot")
        np.testing.assert_array_equal(i, np.tile([1, 2, 0], (n_queries, 1)))
        np.testing.assert_array_equal(s, np.tile(np.float32([64, 64, 0]), (n_queries, 1)))
    pairs, s = as_lists(similar_pairs(q, -1.0, y=x, metric="dot"))
    assert pairs == [(0, 1), (0, 2), (0, 0)]  # highest score first
    np.testing.assert_array_equal(s, [64, 64, 0])


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_huge_rows_that_overflow_blas_are_still_found(metric):
    # BLAS sums -3e38 - 2e38 to -inf in float32, which must not hide the row: its exact
    # score (cosine -0.98, dot -2e38) beats row 0's (cosine -1, dot -3e38)
    corpus = np.array([[-3e38, 0.0, 0.0], [-3e38, -2e38, 3e38]], np.float32)
    if metric == "cosine":
        corpus[0] = [-1.0, -1.0, -1.0]
    q = np.ones((20, 3), np.float32)
    full = (cosine_similarity if metric == "cosine" else dot_similarity)(q[:1], corpus)
    assert full[0, 1] > full[0, 0] and np.isfinite(full).all()
    for n_queries in (1, 20):
        s, i = top_k(q[:n_queries], corpus, 1, metric=metric)
        assert (i == 1).all() and (s == full[0, 1]).all()
    pairs, s = as_lists(similar_pairs(q[:2], float(full[0, 1]), y=corpus, metric=metric))
    assert pairs == [(0, 1), (1, 1)]
    np.testing.assert_array_equal(s, [full[0, 1]] * 2)


def test_top_k_results_independent_of_thread_count(two_threads):
    corpus = float_matrix(513, 12, 8)
    corpus[100:140] = corpus[0]  # many exact ties
    queries = np.concatenate([corpus[:3], float_matrix(20, 12, 9)])
    results = []
    for threads in two_threads:
        numba.set_num_threads(threads)
        for n_queries in (1, 4, len(queries)):
            for metric in ("cosine", "dot"):
                results.append(top_k(queries[:n_queries], corpus, 9, metric=metric))
    half = len(results) // len(two_threads)
    for a, b in zip(results[:half], results[half:]):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


# ----------------------------------------------------------------------------------------
# similar_pairs
# ----------------------------------------------------------------------------------------


def as_lists(result):
    i, j, s = result
    assert i.dtype == np.int64 and j.dtype == np.int64 and s.dtype == np.float32
    return list(zip(i.tolist(), j.tolist())), s


PAIR_CASES = [(n, b) for n in (1, 2, 7, 120) for b in BLOCKS] + [(513, None), (513, 17)]


@pytest.mark.parametrize(("n", "block"), PAIR_CASES)
def test_similar_pairs_dot_exact(n, block):
    x = int_matrix(n, 3, n, low=-1, high=2)
    y = int_matrix(max(1, n // 3), 3, n + 1, low=-1, high=2)
    for other in (None, y):
        with blocks(block):
            pairs, s = as_lists(similar_pairs(x, 2.0, y=other, metric="dot"))
        expected = by_score(naive.similar_pairs(x, 2.0, y=other, metric="dot"))
        assert pairs == [(a, b) for a, b, _ in expected]
        np.testing.assert_array_equal(s, [v for _, _, v in expected])


@pytest.mark.parametrize(("n", "block"), PAIR_CASES)
def test_similar_pairs_cosine_equals_thresholded_matrix(n, block):
    x = float_matrix(n, 4, n)
    y = float_matrix(max(1, n // 3), 4, n + 1)
    for other in (None, y):
        with blocks(block):
            got = similar_pairs(x, 0.7, y=other)
        pairs, s = as_lists(got)
        full = cosine_similarity(x, other)
        expected = by_score(naive.similar_pairs(x, 0.7, y=other, scores=full))
        assert pairs == [(a, b) for a, b, _ in expected]
        np.testing.assert_array_equal(s, [v for _, _, v in expected])
        # and the scores are right, not only consistent
        ref = naive.similarity(x, other, "cosine")
        np.testing.assert_allclose(s, ref[got[0], got[1]], atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_similar_pairs_other_dtypes_and_memmap(tmp_path, dtype):
    x = float_matrix(100, 6, 5).astype(dtype)
    mm = np.memmap(tmp_path / "x.bin", dtype=dtype, mode="w+", shape=x.shape)
    mm[:] = x
    expected = similar_pairs(x.astype(np.float32), 0.6)
    for data in (x, mm):
        for block in BLOCKS:
            with blocks(block):
                got = similar_pairs(data, 0.6)
            for g, want in zip(got, expected):
                np.testing.assert_array_equal(g, want)
    bad = x.copy()
    bad[42, 3] = np.inf
    with pytest.raises(InvalidInputError, match="x must be finite.*row 42"):
        with blocks(17):
            similar_pairs(bad, 0.6)


def test_similar_pairs_duplicates_found_once():
    x = float_matrix(50, 8, 3)
    x[10] = x[20] = x[30]
    with blocks(17):
        i, j, s = similar_pairs(x, 0.999)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 49), (10, 20), (10, 30), (20, 30)]
    np.testing.assert_allclose(s, 1.0, atol=1e-6)


def test_similar_pairs_float16_with_nan():
    x = float_matrix(60, 6, 5).astype(np.float16)
    x[33, 2] = np.nan
    for block in BLOCKS:
        with pytest.raises(InvalidInputError, match="x must be finite.*row 33"):
            with blocks(block):
                similar_pairs(x, 0.5)


@pytest.mark.parametrize("block", BLOCKS)
def test_similar_pairs_order_is_score_then_i_then_j(block):
    # u, v, u, v, w: copies score exactly 1, and a copy scores bit for bit what its row
    # scores, so ties are exact: cos(v, w) = 0.8 twice, cos(u, v) = 0.6 four times
    u, v, w = [1, 0], [0.6, 0.8], [0, 1]
    x = np.float32([u, v, u, v, w])
    with blocks(block):
        i, j, s = similar_pairs(x, 0.5)
    assert list(zip(i.tolist(), j.tolist())) == [
        (0, 2), (1, 3), (1, 4), (3, 4), (0, 1), (0, 3), (1, 2), (2, 3)
    ]
    # larger inputs, in tiles: within one set and across two, as the matrix ranks them
    x = np.concatenate([float_matrix(60, 3, 1), float_matrix(60, 3, 1)[::-1]])
    y = float_matrix(45, 3, 2)
    for other in (None, y):
        with blocks(block):
            got = similar_pairs(x, 0.9, y=other)
        full = cosine_similarity(x, other)
        expected = by_score(naive.similar_pairs(x, 0.9, y=other, scores=full))
        assert as_lists(got)[0] == [(a, b) for a, b, _ in expected]


def test_similar_pairs_threshold_is_compared_in_float32():
    # the threshold is rounded to float32 first: a float64 threshold just above a float32
    # score still admits that score
    x = float_matrix(30, 5, 2)
    full = cosine_similarity(x)
    target = full[3, 17]
    threshold = float(np.nextafter(np.float64(target), np.inf))
    assert threshold > float(target) and np.float32(threshold) == target
    i, j, s = similar_pairs(x, threshold)
    assert (3, 17) in set(zip(i.tolist(), j.tolist()))
    assert (s >= target).all()


@settings(max_examples=30, deadline=None)
@given(matrix_pairs(max_rows=10, min_rows=1), st.sampled_from(["cosine", "dot"]), st.booleans(),
       st.randoms(use_true_random=False))
def test_pair_scores_are_the_matrix_entries(ab, metric, cross, rnd):
    x, y = ab
    other = y if cross else None
    full = (cosine_similarity if metric == "cosine" else dot_similarity)(x, other)
    i = np.array([rnd.randrange(full.shape[0]) for _ in range(25)], dtype=np.int64)
    j = np.array([rnd.randrange(full.shape[1]) for _ in range(25)], dtype=np.int64)
    got = pair_scores(x, i, j, y=other, metric=metric)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, full[i, j])
    # float16 rows are scored as their (exact) float32 values, as everywhere
    x16 = x.astype(np.float16)
    full16 = (cosine_similarity if metric == "cosine" else dot_similarity)(x16.astype(np.float32), other)
    np.testing.assert_array_equal(pair_scores(x16, i, j, y=other, metric=metric), full16[i, j])


def test_pair_scores_validation():
    x = float_matrix(5, 3, 0)
    with pytest.raises(InvalidInputError, match=r"i and j must have the same length, got 2 and 1"):
        pair_scores(x, [0, 1], [0])
    with pytest.raises(InvalidInputError, match=r"j must index the 5 rows of x, got 5"):
        pair_scores(x, [0], [5])
    with pytest.raises(InvalidInputError, match=r"i must index the 5 rows of x, got -1"):
        pair_scores(x, [-1], [0])
    with pytest.raises(InvalidInputTypeError, match="i must hold integers, got float64"):
        pair_scores(x, [0.5], [0])
    assert pair_scores(x, [], []).shape == (0,)


def test_meets_threshold_is_the_similar_pairs_rule():
    x = float_matrix(30, 5, 2)
    full = cosine_similarity(x)
    target = full[3, 17]
    above = float(np.nextafter(np.float64(target), np.inf))
    # a float64 threshold just above a float32 score still admits it, as in similar_pairs
    assert meets_threshold(np.float32([target]), above).tolist() == [True]
    i, j, s = similar_pairs(x, above)
    upper = np.triu(np.ones_like(full, dtype=bool), 1)
    by_index = np.lexsort((j, i))
    np.testing.assert_array_equal(np.nonzero(meets_threshold(full, above) & upper),
                                  (i[by_index], j[by_index]))


def test_similar_pairs_buffers_do_not_grow_after_a_busy_row(monkeypatch):
    # rows 0 and 100 pair with every other row; the others pair with nothing. Each tile
    # is computed once, and tiles after the busy rows' get the usual small buffers.
    from embedcache.kernels import pairs as pairs_module

    rng = np.random.default_rng(0)
    x = np.concatenate([np.ones((200, 1)), rng.integers(-1, 2, (200, 2))], axis=1)
    x[0] = x[100] = [100.0, 0.0, 0.0]
    x = x.astype(np.float32)
    widths = []
    real = pairs_module._pairs_tile

    def spy(s, *args):
        widths.append(args[-1].shape[1])  # out_s: (rows, width)
        return real(s, *args)

    monkeypatch.setattr(pairs_module, "_pairs_tile", spy)
    with blocks(17):
        pairs, s = as_lists(similar_pairs(x, 50.0, metric="dot"))
    expected = by_score(naive.similar_pairs(x, 50.0, metric="dot"))
    assert len(expected) == 199 + 198
    assert pairs == [(a, b) for a, b, _ in expected]
    np.testing.assert_array_equal(s, [v for _, _, v in expected])
    n_blocks = -(-200 // 17)
    assert len(widths) == n_blocks * (n_blocks + 1) // 2  # every tile once
    assert len(set(widths)) == 1 and widths[0] < 17


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------


def test_validation_messages():
    x = float_matrix(4, 3, 0)
    with pytest.raises(InvalidInputError, match=r"2-D array .* got shape \(3,\)"):
        top_k(x[0], x, 2)
    with pytest.raises(InvalidInputTypeError, match="real numbers .* got dtype <U1"):
        cosine_similarity(np.array([["a", "b"]]))
    # integer arrays are taken as their float32 values, as everywhere in embedcache
    ints = np.array([[1, 2], [3, -4]])
    np.testing.assert_array_equal(cosine_similarity(ints), cosine_similarity(ints.astype(np.float32)))
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(InvalidInputError, match="corpus must be finite.*row 2"):
        top_k(x, bad, 2)
    with pytest.raises(InvalidInputError, match="queries must be finite.*row 2"):
        top_k(bad, x, 2)
    bad[2, 1] = np.inf
    with pytest.raises(InvalidInputError, match="x must be finite"):
        similar_pairs(bad, 0.5)
    with pytest.raises(DimensionMismatchError, match="same number of columns, got 3 and 2"):
        top_k(x, x[:, :2], 2)
    with pytest.raises(DimensionMismatchError):
        cosine_similarity(x, x[:, :2])
    with pytest.raises(InvalidInputError, match="k must be >= 1, got 0"):
        top_k(x, x, 0)
    with pytest.raises(InvalidInputTypeError, match="k must be an int, got float"):
        top_k(x, x, 2.5)
    with pytest.raises(InvalidInputError, match=r"threshold must be in \[-1, 1\].*1.5"):
        similar_pairs(x, 1.5)
    similar_pairs(x, 1.5, metric="dot")  # any threshold is fine for dot
    with pytest.raises(InvalidInputError, match="metric must be one of 'cosine', 'dot', got 'l2'"):
        top_k(x, x, 2, metric="l2")
    with pytest.raises(InvalidInputTypeError, match="mask must be a bool array"):
        top_k(x, x, 2, mask=np.ones(4))
    with pytest.raises(InvalidInputError, match=r"mask must have shape \(4,\)"):
        top_k(x, x, 2, mask=np.ones(3, bool))
    # errors are ValueError / TypeError for callers who do not know the package
    with pytest.raises(ValueError):
        top_k(x, x, -1)
    with pytest.raises(TypeError):
        normalize(np.array([["a"]]))


# ----------------------------------------------------------------------------------------
# hypothesis properties
# ----------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(matrix_pairs(max_rows=10))
def test_cosine_properties(ab):
    a, b = ab
    s = cosine_similarity(a)
    assert ((s >= -1) & (s <= 1)).all()
    np.testing.assert_array_equal(s, s.T)  # exactly symmetric
    nonzero = np.linalg.norm(a.astype(np.float64), axis=1) > 0
    np.testing.assert_allclose(np.diag(s)[nonzero], 1.0, atol=1e-6)
    np.testing.assert_array_equal(cosine_similarity(a, b), cosine_similarity(b, a).T)
    np.testing.assert_array_equal(dot_similarity(a, b), dot_similarity(b, a).T)
    d = dot_similarity(a)
    np.testing.assert_array_equal(d, d.T)


@settings(max_examples=40, deadline=None)
@given(
    matrix_pairs(max_rows=14, min_rows=1),
    st.integers(1, 16),
    st.sampled_from(["cosine", "dot"]),
    st.sampled_from([None, 1, 3, 5]),
)
def test_top_k_properties(ab, k, metric, block):
    queries, corpus = ab
    with blocks(block):
        s, i = top_k(queries, corpus, k, metric=metric)
    assert (np.diff(s, axis=1) <= 0).all()  # best first
    if metric == "cosine":
        assert ((s >= -1) & (s <= 1)).all()
    full = naive.similarity(queries, corpus, metric)  # the matrix's best k
    scale = np.abs(queries).max() * np.abs(corpus).max() * queries.shape[1]
    check_top_k(s, i, full, k, atol=2e-6 if metric == "cosine" else 1e-6 * scale)
    own = (cosine_similarity if metric == "cosine" else dot_similarity)(queries, corpus)
    ms, mi = naive.top_k(queries, corpus, k, scores=own)
    np.testing.assert_array_equal(s, ms.astype(np.float32))
    np.testing.assert_array_equal(i, mi)
    # the same answer for any block size, and when the queries go through BLAS
    with blocks(2):
        s2, i2 = top_k(queries, corpus, k, metric=metric)
    np.testing.assert_array_equal(s, s2)
    np.testing.assert_array_equal(i, i2)
    many = np.concatenate([queries] * (17 // len(queries) + 1))
    with blocks(block):
        s3, i3 = top_k(many, corpus, k, metric=metric)
    np.testing.assert_array_equal(s3[: len(queries)], s)
    np.testing.assert_array_equal(i3[: len(queries)], i)


@settings(max_examples=40, deadline=None)
@given(
    matrix_pairs(max_rows=14, min_rows=1),
    st.floats(-1, 1),
    st.sampled_from([None, 2, 5]),
    st.booleans(),
)
def test_similar_pairs_equals_thresholded_matrix(ab, threshold, block, cross):
    x, y = ab
    other = y if cross else None
    with blocks(block):
        i, j, s = similar_pairs(x, threshold, y=other)
    full = cosine_similarity(x, other)
    if not cross:
        full = np.triu(full, 1) + np.tril(np.full_like(full, -np.inf))
    ei, ej = np.nonzero(full >= np.float32(threshold))
    order = np.lexsort((ej, ei, -full[ei, ej]))  # score descending, then i, then j
    ei, ej = ei[order], ej[order]
    np.testing.assert_array_equal(i, ei)
    np.testing.assert_array_equal(j, ej)
    np.testing.assert_array_equal(s, full[ei, ej])


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 150),
    st.sampled_from([31, 32, 33, 64, 100]),
    st.sampled_from(["cosine", "dot"]),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_similar_pairs_tiles_around_the_scan_groups(n, block, metric, cross, seed):
    # tile widths just below, at and above the scan's group of 32 scores, rows starting
    # their scan mid-group on the diagonal, many exact ties, the threshold an exact score:
    # bit for bit the thresholded matrix, in the pair order
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(n, 6)).astype(np.float32)
    x[rng.integers(0, n, size=n // 3)] = x[0]
    y = np.concatenate([x[: n // 2], rng.integers(-2, 3, size=(40, 6))]).astype(np.float32)
    other = y if cross else None
    full = (cosine_similarity if metric == "cosine" else dot_similarity)(x, other)
    threshold = float(full.flat[rng.integers(0, full.size)])
    with _config.override(PAIRS_BLOCK=block, PAIRS_COLUMNS=block):
        i, j, s = similar_pairs(x, threshold, y=other, metric=metric)
    if not cross:
        full = np.triu(full, 1) + np.tril(np.full_like(full, -np.inf))
    ei, ej = np.nonzero(full >= np.float32(threshold))
    order = np.lexsort((ej, ei, -full[ei, ej]))
    np.testing.assert_array_equal(i, ei[order])
    np.testing.assert_array_equal(j, ej[order])
    np.testing.assert_array_equal(s, full[ei[order], ej[order]])


@settings(max_examples=15, deadline=None)
@given(matrices(max_rows=30, min_rows=1, elements=small_ints), st.integers(1, 8))
def test_results_unchanged_by_thread_count(x, k):
    before = numba.get_num_threads()
    try:
        runs = []
        for threads in thread_counts():
            numba.set_num_threads(threads)
            runs.append((top_k(x, x, k, exclude_self=True), similar_pairs(x, 0.3)))
    finally:
        numba.set_num_threads(before)
    for (a, b), (c, d) in zip(runs, runs[1:]):
        for u, v in zip(a + b, c + d):
            np.testing.assert_array_equal(u, v)


# ----------------------------------------------------------------------------------------
# compiled code cached on disk
# ----------------------------------------------------------------------------------------

_EVERY_KERNEL = """
import json
import numpy as np
import embedcache as ec
from embedcache.kernels import _core

x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
ec.normalize(x)
ec.cosine_similarity(x)
ec.dot_similarity(x, x[:3])
ec.kernels.pair_scores(x, [0, 1], [2, 3])
for corpus in (x, x.astype(np.float16)):
    for metric in ("cosine", "dot"):
        ec.top_k(x[:2], corpus, 3, metric=metric, mask=np.ones(40, bool), exclude_self=True)
        ec.top_k(x, corpus, 3, metric=metric)
        ec.similar_pairs(corpus, 0.5, y=x[:7], metric=metric)
        ec.similar_pairs(corpus, 0.5, metric=metric)
cached = [f for f in vars(_core).values() if getattr(f, "stats", None) and f.stats.cache_path]
print(json.dumps({
    "cached": len(cached),
    "hits": sum(sum(f.stats.cache_hits.values()) for f in cached),
    "misses": sorted(f.__name__ for f in cached if sum(f.stats.cache_misses.values())),
}))
"""


@pytest.mark.slow
def test_a_second_process_loads_every_kernel_from_the_disk_cache():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import embedcache

    root = str(Path(embedcache.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    runs = []
    for _ in range(2):  # the first run compiles what is not cached yet; the second compiles nothing
        proc = subprocess.run([sys.executable, "-c", _EVERY_KERNEL], env=env, capture_output=True,
                              text=True, timeout=240, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    second = runs[1]
    assert second["cached"] >= 10
    assert second["misses"] == [] and second["hits"] > 0


# ----------------------------------------------------------------------------------------
# top_k block shapes and threads
# ----------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 200),
    st.integers(17, 70),
    st.integers(1, 12),
    st.sampled_from(["cosine", "dot"]),
    st.sampled_from([31, 32, 33, 64, 100]),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_top_k_blocks_around_the_scan_groups(n, nq, k, metric, block, masked, corpus_major, seed):
    # corpus blocks and query counts just below, at and above the scan's group of 32 scores,
    # split across threads or folded on one, score tiles of either orientation: bit for bit
    # the plain reference, ties to the lower index
    rng = np.random.default_rng(seed)
    corpus = rng.integers(-2, 3, size=(n, 6)).astype(np.float32)
    corpus[rng.integers(0, n, size=n // 3)] = corpus[0]  # many exact ties
    queries = np.concatenate([corpus[: min(n, nq // 2)], rng.standard_normal((nq, 6))])[:nq]
    queries = queries.astype(np.float32)
    mask = rng.random(n) < 0.7 if masked else None
    with _config.override(
        TOPK_CORPUS_BLOCK=block, TOPK_MAX_BLOCK=block, TOPK_CORPUS_MAJOR=corpus_major
    ):
        s, i = top_k(queries, corpus, k, metric=metric, mask=mask, exclude_self=masked)
    own = (cosine_similarity if metric == "cosine" else dot_similarity)(queries, corpus)
    es, ei = naive.top_k(queries, corpus, k, mask=mask, exclude_self=masked, scores=own)
    np.testing.assert_array_equal(i, ei)
    np.testing.assert_array_equal(s, es.astype(np.float32))


@pytest.mark.parametrize("corpus_major", [True, False])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_top_k_tile_orientations_agree_on_real_sizes(corpus_major, metric):
    # 384 columns, enough queries and rows for several blocks on each thread: the scan of
    # either orientation gives the plain reference's answer bit for bit
    rng = np.random.default_rng(5)
    corpus = rng.standard_normal((3000, 384)).astype(np.float32)
    corpus[::97] = corpus[5]  # exact ties
    corpus[7] *= 1e-30  # a row too small for the float32 filter
    queries = np.concatenate([corpus[:40], rng.standard_normal((60, 384))]).astype(np.float32)
    with _config.override(TOPK_CORPUS_BLOCK=256, TOPK_MAX_BLOCK=256, TOPK_CORPUS_MAJOR=corpus_major):
        s, i = top_k(queries, corpus, 7, metric=metric)
    own = (cosine_similarity if metric == "cosine" else dot_similarity)(queries, corpus)
    es, ei = naive.top_k(queries, corpus, 7, scores=own)
    np.testing.assert_array_equal(i, ei)
    np.testing.assert_array_equal(s, es.astype(np.float32))


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.floats(width=32, allow_nan=False),
        st.floats(-1.0, 1.0, width=32),
    ),
    st.floats(0.0, 1e-3),
    st.sampled_from([0.0, 4 * 2.0**-24, 1e-3]),
)
def test_float32_cutoff_never_above_the_exact_one(kth, margin, rel):
    # the corpus-major scan compares float32 scores with a float32 cut-off: rounded down, a
    # score it rejects is rejected by the float64 cut-off too (no contender skipped)
    from embedcache.kernels._core import _cutoff, _cutoff32

    exact = _cutoff(np.float32(kth), margin, rel)
    low = _cutoff32(np.float32(kth), margin, rel)
    if np.isnan(exact):
        assert np.isnan(low)
    elif np.isinf(exact):
        assert low == exact
    else:  # the largest float32 not above it
        assert float(low) <= exact < float(np.nextafter(low, np.float32(np.inf)))


@pytest.mark.parametrize(
    ("n", "rows", "tile", "least", "most", "expected"),
    [
        (50_000, 1000, 16 << 20, 2048, 65536, 4167),  # 12 equal blocks of the 4194 that fit
        (4194, 1000, 16 << 20, 2048, 65536, 4194),  # one block, exactly the corpus
        (4195, 1000, 16 << 20, 2048, 65536, 2098),  # one row more: two halves, not 4194 + 1
        (10**6, 17, 16 << 20, 2048, 65536, 62500),  # few queries: 16 blocks, at most the longest
        (10**6, 1024, 1 << 20, 2048, 65536, 2045),  # 489 blocks of about the shortest
        (3, 1000, 16 << 20, 2048, 65536, 3),
    ],
)
def test_top_k_corpus_block_sizes(n, rows, tile, least, most, expected):
    from embedcache.kernels.topk import _corpus_block

    with _config.override(TOPK_TILE_BYTES=tile, TOPK_CORPUS_BLOCK=least, TOPK_MAX_BLOCK=most):
        block = _corpus_block(n, rows, True)
    assert block == expected
    count = -(-n // block)
    assert count * block - n < count  # equal blocks: the last is short by less than one row each


def test_top_k_threads_restore_blas_threads_and_run_concurrently():
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    corpus = float_matrix(300, 16, 3)
    queries = float_matrix(40, 16, 4)
    with blocks(37):
        expected = top_k(queries, corpus, 7)
        with ThreadPoolExecutor(4) as pool:  # overlapping calls: the last one out restores
            results = list(pool.map(lambda _: top_k(queries, corpus, 7), range(8)))
        assert blas_threads() == before
        for s, i in results:
            np.testing.assert_array_equal(s, expected[0])
            np.testing.assert_array_equal(i, expected[1])
        bad = corpus.copy()
        bad[[100, 250]] = np.nan
        with pytest.raises(InvalidInputError, match="row 100"):
            top_k(queries, bad, 7)
    assert blas_threads() == before
