import math
import multiprocessing
import os
import subprocess
import sys
import unicodedata
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedcache.errors import InvalidInputError, InvalidInputTypeError
from embedcache.providers.hashing import HashingEmbeddings


def _fnv1a_fmix(data: bytes) -> int:
    mask = (1 << 64) - 1
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & mask
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & mask
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & mask
    h ^= h >> 33
    return h


def _probe(h: int, p: int) -> int:
    mask = (1 << 64) - 1
    z = (h + (p + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def naive_embed(text, dim, lo, hi, lowercase=True):
    """Obviously correct pure-Python version of the documented algorithm."""
    text = unicodedata.normalize("NFKC", text)
    if lowercase:
        text = unicodedata.normalize("NFKC", text.lower())
    text = " " + " ".join(text.split()) + " "
    grams = [text[s : s + n] for n in range(lo, hi + 1) for s in range(len(text) - n + 1)]
    if not grams:
        grams = [text]
    counts = {}
    for g in grams:
        counts[g] = counts.get(g, 0) + 1
    vec = np.zeros(dim, dtype=np.float64)
    for g, c in sorted(counts.items(), key=lambda kv: _fnv1a_fmix(kv[0].encode("utf-8", "surrogatepass"))):
        h = _fnv1a_fmix(g.encode("utf-8", "surrogatepass"))
        for p in range(4):
            z = _probe(h, p)
            sign = -1.0 if z & 1 else 1.0
            vec[(z >> 1) % dim] += sign * (1.0 + math.log(c))
    norm = np.linalg.norm(vec)
    return (vec / norm if norm > 0 else vec).astype(np.float32)


text_st = st.text(min_size=1, max_size=40).filter(lambda t: t != "")


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(text_st, min_size=1, max_size=6),
    dim=st.integers(1, 70),
    lo=st.integers(1, 4),
    extra=st.integers(0, 3),
    lowercase=st.booleans(),
)
def test_matches_naive_reference(texts, dim, lo, extra, lowercase):
    emb = HashingEmbeddings(dim, ngram_range=(lo, lo + extra), lowercase=lowercase, batch_size=4)
    X = emb.embed(texts)
    assert X.shape == (len(texts), dim) and X.dtype == np.float32
    ref = np.stack([naive_embed(t, dim, lo, lo + extra, lowercase) for t in texts])
    np.testing.assert_allclose(X, ref, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(text_st, min_size=1, max_size=8))
def test_rows_are_unit_or_zero_and_order_independent(texts):
    emb = HashingEmbeddings(32)
    X = emb.embed(texts)
    norms = np.linalg.norm(X, axis=1)
    assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))
    # each row depends on its own text only
    for i, t in enumerate(texts):
        np.testing.assert_array_equal(emb.embed([t])[0], X[i])


def test_vectors_are_the_same_in_another_process():
    # this process has a random PYTHONHASHSEED; the child a fixed one
    code = (
        "import embedcache.providers.hashing as h;"
        "print(h.HashingEmbeddings(16).embed(['Grüße, world! 😀', 'abc']).tobytes().hex())"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    ).stdout.strip()
    here = HashingEmbeddings(16).embed(["Grüße, world! 😀", "abc"]).tobytes().hex()
    assert child == here


def test_lexical_near_duplicates_score_higher_than_unrelated_texts():
    emb = HashingEmbeddings()
    X = emb.embed(
        [
            "The quick brown fox jumps over the lazy dog.",
            "the quick brown fox jumped over the lazy dog",
            "Quarterly revenue grew by four percent in Europe.",
        ]
    )
    assert X[0] @ X[1] > 0.7
    assert abs(X[0] @ X[2]) < 0.2


def test_case_and_whitespace_folding():
    emb = HashingEmbeddings(64)
    X = emb.embed(["Hello   World", "hello world", "hello\tworld\n"])
    np.testing.assert_array_equal(X[0], X[1])
    np.testing.assert_array_equal(X[1], X[2])
    cased = HashingEmbeddings(64, lowercase=False).embed(["Hello World", "hello world"])
    assert not np.array_equal(cased[0], cased[1])


def test_namespace_changes_with_every_vector_changing_parameter():
    spaces = {
        HashingEmbeddings().cache_namespace,
        HashingEmbeddings(256).cache_namespace,
        HashingEmbeddings(ngram_range=(2, 4)).cache_namespace,
        HashingEmbeddings(lowercase=False).cache_namespace,
    }
    assert len(spaces) == 4
    # batch_size does not change vectors, so it does not change the namespace
    assert HashingEmbeddings(batch_size=3).cache_namespace == HashingEmbeddings().cache_namespace
    emb = HashingEmbeddings(128)
    assert emb.dimensions == 128 and emb.model == "hashing-char-3-5"


def test_on_batch_reports_every_position_once_with_matching_rows():
    emb = HashingEmbeddings(32, batch_size=3)
    texts = [f"text number {i}" for i in range(10)]
    seen = {}

    def on_batch(positions, vectors):
        assert positions.dtype == np.int64 and vectors.shape == (len(positions), 32)
        for p, v in zip(positions, vectors):
            assert p not in seen
            seen[int(p)] = v.copy()

    X = emb.embed(texts, on_batch=on_batch)
    assert sorted(seen) == list(range(10))
    for p, v in seen.items():
        np.testing.assert_array_equal(v, X[p])
    assert emb.usage.requests == 4


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"dimensions": 0}, InvalidInputError),
        ({"dimensions": 2.5}, InvalidInputTypeError),
        ({"dimensions": True}, InvalidInputTypeError),
        ({"ngram_range": (0, 3)}, InvalidInputError),
        ({"ngram_range": (4, 3)}, InvalidInputError),
        ({"ngram_range": "ab"}, InvalidInputTypeError),
        ({"batch_size": 0}, InvalidInputError),
    ],
)
def test_bad_settings(kwargs, exc):
    with pytest.raises(exc):
        HashingEmbeddings(**kwargs)


@pytest.mark.parametrize(
    "texts, match",
    [([], "empty sequence"), (["a", ""], r"texts\[1\]"), (["a", 3], r"texts\[1\]"), ("abc", "single str")],
)
def test_bad_texts_name_the_position(texts, match):
    with pytest.raises(InvalidInputError, match=match):
        HashingEmbeddings().embed(texts)


# ----------------------------------------------------------------------------- real text


def test_canonically_equivalent_spellings_give_the_same_vector():
    emb = HashingEmbeddings()
    nfc, nfd = "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e", unicodedata.normalize("NFD", "café crème brûlée")
    assert nfc != nfd
    X = emb.embed([nfc, nfd, "\uff43\uff41\uff46\u00e9 cr\u00e8me br\u00fbl\u00e9e"])  # full-width "café"
    np.testing.assert_array_equal(X[0], X[1])
    np.testing.assert_array_equal(X[0], X[2])  # NFKC: compatibility forms hash as plain ones


def test_distinct_single_characters_give_distinct_vectors():
    from embedcache import deduplicate

    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 20_000)]  # CJK unified ideographs
    X = HashingEmbeddings().embed(chars)
    assert len(np.unique(X, axis=0)) == len(chars)
    kept = deduplicate(X, threshold=0.9).kept
    assert len(kept) >= len(chars) - 10


def test_different_emoji_are_far_apart():
    emoji = [chr(c) for c in range(0x1F300, 0x1F300 + 200)]
    X = HashingEmbeddings().embed(emoji)
    S = X @ X.T
    np.fill_diagonal(S, 0.0)
    assert np.abs(S).max() <= 0.5


def test_vectors_of_the_first_version_are_never_reused():
    # version 1 hashed unnormalized text with one bucket per n-gram
    assert HashingEmbeddings().cache_namespace != "hashing|v1|dim=512|ngram=3-5|lowercase=1"


def test_works_in_a_process_pool():
    emb = HashingEmbeddings(32, batch_size=2)
    emb.embed(["warm"])
    chunks = [[f"chunk {i} text {j}" for j in range(5)] for i in range(3)]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        got = list(pool.map(emb.embed, chunks))
    for chunk, x in zip(chunks, got):
        np.testing.assert_array_equal(x, emb.embed(chunk))


def test_dimensions_name_the_output_size_and_the_namespace_is_unchanged():
    emb = HashingEmbeddings(dimensions=64)
    assert emb.dimensions == 64 and emb.embed(["kitten"]).shape == (1, 64)
    assert repr(emb) == "HashingEmbeddings(dimensions=64, ngram_range=(3, 5), lowercase=True)"
    assert not hasattr(emb, "dim")
    # vectors cached or stored before the rename are still found: the namespace keeps its form
    assert HashingEmbeddings().cache_namespace == "hashing|v2|dim=512|ngram=3-5|lowercase=1"
