"""CachedEmbedder: never pays twice, keeps what was paid for, caches nothing bad."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import pickle
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedcache import _config
from embedcache import CachedEmbedder, EmbeddingCache, EmbedStats, HashingEmbeddings
from embedcache.errors import (
    APIConnectionError,
    CacheError,
    BadRequestError,
    InvalidInputError,
    InvalidInputTypeError,
    InvalidResponseError,
    ServerError,
)
from embedcache.providers.base import Embedder, Usage
from embedcache.cache._diskcache import Table
from embedcache.testing import Fault, expected_vector


def vector_of(text, dim):
    """The fake embedder's deterministic vector for ``text``."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


class FakeEmbedder:
    """Counts what it is asked; answers batch by batch through ``on_batch``.

    fail_after: raise after this many batches were delivered.
    corrupt: a function (batch index, vectors) -> what to deliver instead.
    threads: deliver batches from a pool of worker threads.
    """

    def __init__(self, dim=8, *, namespace="fake|test", dimensions=None, batch_size=3,
                 fail_after=None, corrupt=None, call_on_batch=True, threads=0):
        self.dim = dim
        self.cache_namespace = f"{namespace}|{dim}"
        self.model = "fake-model"
        self.dimensions = dimensions
        self.batch_size = batch_size
        self.fail_after = fail_after
        self.corrupt = corrupt
        self.call_on_batch = call_on_batch
        self.threads = threads
        self.calls: list[list[str]] = []
        self.usage = Usage()

    @property
    def requested(self):
        return [t for call in self.calls for t in call]

    def _batch(self, b, texts, start, on_batch):
        chunk = texts[start : start + self.batch_size]
        vectors = np.stack([vector_of(t, self.dim) for t in chunk])
        if self.corrupt is not None:
            vectors = self.corrupt(b, vectors)
        self.usage.add(requests=1, tokens=sum(len(t) for t in chunk))
        if on_batch is not None and self.call_on_batch:
            on_batch(np.arange(start, start + len(chunk)), vectors)
        return vectors

    def embed(self, texts, *, on_batch=None):
        texts = list(texts)
        self.calls.append(texts)
        starts = list(range(0, len(texts), self.batch_size))
        if self.threads:
            with ThreadPoolExecutor(self.threads) as pool:
                parts = list(pool.map(lambda bs: self._batch(bs[0], texts, bs[1], on_batch),
                                      enumerate(starts)))
        else:
            parts = []
            for b, start in enumerate(starts):
                if self.fail_after is not None and b == self.fail_after:
                    raise ConnectionError(f"connection dropped after {b} batches")
                parts.append(self._batch(b, texts, start, on_batch))
        return np.concatenate(parts)


class AsyncFakeEmbedder(FakeEmbedder):
    async def aembed(self, texts, *, on_batch=None):
        await asyncio.sleep(0)
        return self.embed(texts, on_batch=on_batch)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    with EmbeddingCache(tmp_path_factory.mktemp("shared")) as c:
        yield c


@pytest.fixture
def cache(tmp_path):
    with EmbeddingCache(tmp_path / "cache") as c:
        yield c


def expected(texts, dim=8):
    return np.stack([vector_of(t, dim) for t in texts])


# ----------------------------------------------------------------------------- paying once


def test_second_embed_makes_zero_requests(cache):
    fake = FakeEmbedder()
    emb = CachedEmbedder(fake, cache=cache)
    texts = [f"text {i}" for i in range(10)]
    first = emb.embed(texts)
    assert first.dtype == np.float32 and first.shape == (10, 8) and first.flags.c_contiguous
    np.testing.assert_array_equal(first, expected(texts))
    assert fake.requested == texts and fake.usage.requests == 4
    second = emb.embed(texts)
    np.testing.assert_array_equal(second, first)
    assert len(fake.calls) == 1  # nothing more was asked
    assert emb.stats.hits == 10 and emb.stats.misses == 10
    assert emb.stats.requests == 4 and emb.stats.tokens == sum(map(len, texts))
    assert emb.stats.seconds > 0


def test_a_new_object_on_the_same_cache_makes_zero_requests(cache):
    texts = ["a", "b", "c"]
    CachedEmbedder(FakeEmbedder(), cache=cache).embed(texts)
    fake = FakeEmbedder()
    out = CachedEmbedder(fake, cache=cache).embed(list(reversed(texts)))
    assert fake.calls == []
    np.testing.assert_array_equal(out, expected(list(reversed(texts))))


def test_repeats_within_one_call_are_requested_once(cache):
    fake = FakeEmbedder()
    emb = CachedEmbedder(fake, cache=cache)
    texts = ["x", "y", "x", "x", "z", "y"]
    out = emb.embed(texts)
    assert fake.requested == ["x", "y", "z"]
    np.testing.assert_array_equal(out, expected(texts))
    assert emb.stats == EmbedStats(hits=0, misses=3, requests=1, tokens=3, seconds=emb.stats.seconds)


def test_only_misses_are_requested_and_order_is_kept(cache):
    fake = FakeEmbedder()
    emb = CachedEmbedder(fake, cache=cache)
    emb.embed(["b", "d"])
    texts = ["a", "b", "c", "d", "e", "a"]
    out = emb.embed(texts)
    assert fake.calls[1] == ["a", "c", "e"]
    np.testing.assert_array_equal(out, expected(texts))
    assert (emb.stats.hits, emb.stats.misses) == (2, 5)


any_text = st.text(st.characters(exclude_categories=()) | st.characters(categories=["Cs"]),
                   min_size=1, max_size=12)


@settings(max_examples=30, deadline=None)
@given(
    cached=st.lists(any_text, max_size=12),
    texts=st.lists(any_text, min_size=1, max_size=25),
)
def test_any_mix_of_hits_misses_and_repeats(shared_cache, cached, texts):
    namespace = uuid.uuid4().hex  # a fresh namespace: nothing cached from other examples
    if cached:
        CachedEmbedder(FakeEmbedder(namespace=namespace, batch_size=4), cache=shared_cache).embed(cached)
    fake = FakeEmbedder(namespace=namespace, batch_size=4)
    out = CachedEmbedder(fake, cache=shared_cache).embed(texts)
    np.testing.assert_array_equal(out, expected(texts))
    misses = list(dict.fromkeys(t for t in texts if t not in set(cached)))
    assert fake.requested == misses


def test_namespaces_do_not_share_vectors(cache):
    a, b = FakeEmbedder(namespace="one"), FakeEmbedder(namespace="two")
    CachedEmbedder(a, cache=cache).embed(["same text"])
    CachedEmbedder(b, cache=cache).embed(["same text"])
    assert a.requested == b.requested == ["same text"]
    assert len(cache) == 2


def test_wrapped_embedder_attributes_pass_through(cache):
    fake = FakeEmbedder(dimensions=8)
    emb = CachedEmbedder(fake, cache=cache)
    assert (emb.cache_namespace, emb.model, emb.dimensions) == (fake.cache_namespace, "fake-model", 8)
    assert isinstance(emb, Embedder)
    inner = CachedEmbedder(emb, cache=cache)  # a CachedEmbedder is itself an Embedder
    np.testing.assert_array_equal(inner.embed(["q"]), expected(["q"]))
    assert "EmbeddingCache(directory=" in repr(emb)


def test_with_the_builtin_hashing_embedder(cache):
    texts = ["a red fox", "a red fox!", "stock markets fell"]
    direct = HashingEmbeddings(dimensions=64).embed(texts)
    emb = CachedEmbedder(HashingEmbeddings(dimensions=64), cache=cache)
    np.testing.assert_array_equal(emb.embed(texts), direct)
    np.testing.assert_array_equal(emb.embed(texts), direct)
    assert emb.stats.hits == 3 and emb.stats.misses == 3


def test_default_cache_directory_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBEDCACHE_DIR", str(tmp_path / "env-cache"))
    with CachedEmbedder(FakeEmbedder()) as emb:
        emb.embed(["a"])
        assert emb.cache.directory == str(tmp_path / "env-cache")
    assert len(EmbeddingCache(tmp_path / "env-cache")) == 1


# ----------------------------------------------------------------------------- keeping what was paid for


def test_partial_progress_is_kept_when_the_embedder_fails(cache):
    texts = [f"t{i}" for i in range(9)]
    failing = FakeEmbedder(batch_size=3, fail_after=2)
    with pytest.raises(ConnectionError):
        CachedEmbedder(failing, cache=cache).embed(texts)
    assert len(cache) == 6  # the two batches that arrived
    fake = FakeEmbedder(batch_size=3)
    out = CachedEmbedder(fake, cache=cache).embed(texts)
    assert fake.requested == texts[6:]
    np.testing.assert_array_equal(out, expected(texts))


def test_batches_from_several_threads(cache):
    texts = [f"t{i}" for i in range(40)]
    fake = FakeEmbedder(batch_size=3, threads=4)
    out = CachedEmbedder(fake, cache=cache).embed(texts)
    np.testing.assert_array_equal(out, expected(texts))
    assert len(cache) == 40


def test_an_embedder_that_ignores_on_batch_is_still_cached(cache):
    fake = FakeEmbedder(call_on_batch=False)
    emb = CachedEmbedder(fake, cache=cache)
    emb.embed(["a", "b"])
    emb.embed(["a", "b"])
    assert len(fake.calls) == 1 and len(cache) == 2


def test_dimension_is_learned_from_the_cache_when_not_declared(cache):
    CachedEmbedder(FakeEmbedder(dim=5), cache=cache).embed(["a"])
    fake = FakeEmbedder(dim=5)
    out = CachedEmbedder(fake, cache=cache).embed(["a", "b"])
    assert out.shape == (2, 5) and fake.requested == ["b"]


# ----------------------------------------------------------------------------- nothing bad is cached


def _nan(b, v):
    v = v.copy()
    v[0, 0] = np.nan
    return v


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_nan, "NaN or infinity"),
        (lambda b, v: np.where(v > 0, np.inf, v), "NaN or infinity"),
        (lambda b, v: v[:-1], "expected 3 vectors"),
        (lambda b, v: v[0], "2-D float array"),
        (lambda b, v: v.astype(np.int64), "2-D float array"),
        (lambda b, v: v.tolist(), "2-D float array"),
        (lambda b, v: v[:, :0], "dimension"),
        (lambda b, v: v.astype(np.float64) * 1e300, "must fit float32"),  # finite, beyond float32
    ],
)
def test_bad_vectors_are_rejected_and_never_cached(cache, corrupt, message):
    fake = FakeEmbedder(batch_size=3, corrupt=corrupt)
    with pytest.raises(InvalidResponseError, match=message):
        CachedEmbedder(fake, cache=cache).embed(["a", "b", "c"])
    assert len(cache) == 0


def test_a_bad_later_batch_keeps_the_good_ones(cache):
    fake = FakeEmbedder(batch_size=2, corrupt=lambda b, v: _nan(b, v) if b == 1 else v)
    with pytest.raises(InvalidResponseError):
        CachedEmbedder(fake, cache=cache).embed(["a", "b", "c", "d"])
    assert len(cache) == 2
    ok = FakeEmbedder(batch_size=2)
    CachedEmbedder(ok, cache=cache).embed(["a", "b", "c", "d"])
    assert ok.requested == ["c", "d"]


def test_a_batch_of_another_dimension_is_rejected(cache):
    fake = FakeEmbedder(dim=4, batch_size=2,
                        corrupt=lambda b, v: np.hstack([v, v]) if b == 1 else v)
    with pytest.raises(InvalidResponseError, match="expected dimension 4, got 8"):
        CachedEmbedder(fake, cache=cache).embed(["a", "b", "c"])
    assert len(cache) == 2


def test_declared_dimensions_are_enforced(cache):
    fake = FakeEmbedder(dim=4, dimensions=6)
    with pytest.raises(InvalidResponseError, match="expected dimension 6, got 4"):
        CachedEmbedder(fake, cache=cache).embed(["a"])
    assert len(cache) == 0


def test_bad_positions_from_on_batch_are_rejected(cache):
    class BadPositions(FakeEmbedder):
        def embed(self, texts, *, on_batch=None):
            on_batch(np.array([len(texts)]), np.ones((1, self.dim), np.float32))
            return np.ones((len(texts), self.dim), np.float32)

    with pytest.raises(InvalidResponseError, match="positions"):
        CachedEmbedder(BadPositions(), cache=cache).embed(["a", "b"])
    assert len(cache) == 0


def test_a_damaged_entry_is_requested_again_and_repaired(cache):
    emb = CachedEmbedder(FakeEmbedder(), cache=cache)
    emb.embed(["a", "b"])
    key = EmbeddingCache.make_key(emb.cache_namespace, emb.model, emb.dimensions, "a")
    con = sqlite3.connect(os.path.join(cache.directory, "cache.db"), isolation_level=None)
    con.execute("UPDATE Cache SET value = substr(value, 1, length(value) - 1) WHERE key = ?",
                (bytes.fromhex(key),))
    con.close()
    fake = FakeEmbedder()
    out = CachedEmbedder(fake, cache=cache).embed(["a", "b"])
    assert fake.requested == ["a"]
    np.testing.assert_array_equal(out, expected(["a", "b"]))
    np.testing.assert_array_equal(cache.get_many([key])[0], vector_of("a", 8))


def test_rows_returned_out_of_order_are_placed_by_their_own_key(cache, monkeypatch):
    texts = [f"t{i}" for i in range(30)]
    CachedEmbedder(FakeEmbedder(), cache=cache).embed(texts[::2])
    select = Table.select

    def shuffled(self, *args, **kwargs):  # as if SQLite had not kept the VALUES order
        for start, values in select(self, *args, **kwargs):
            yield start, values[::-1]

    monkeypatch.setattr(Table, "select", shuffled)
    fake = FakeEmbedder()
    out = CachedEmbedder(fake, cache=cache).embed(texts)
    assert fake.requested == texts[1::2]
    np.testing.assert_array_equal(out, expected(texts))


# ----------------------------------------------------------------------------- input and options


@pytest.mark.parametrize(
    "texts, error, message",
    [
        (["ok", ""], InvalidInputError, r"texts\[1\] is an empty string"),
        (["ok", 3], InvalidInputTypeError, r"texts\[1\] must be a str"),
        ("a single string", InvalidInputTypeError, "single str"),
        ([], InvalidInputError, "at least one"),
    ],
)
def test_bad_texts_fail_before_any_request(cache, texts, error, message):
    fake = FakeEmbedder()
    with pytest.raises(error, match=message):
        CachedEmbedder(fake, cache=cache).embed(texts)
    assert fake.calls == []


def test_constructor_checks_its_arguments(cache):
    with pytest.raises(InvalidInputTypeError, match="Embedder protocol"):
        CachedEmbedder(object(), cache=cache)
    with pytest.raises(InvalidInputTypeError, match="EmbeddingCache"):
        CachedEmbedder(FakeEmbedder(), cache="/tmp/somewhere")


def test_progress_bar_only_when_asked(cache, capsys):
    emb = CachedEmbedder(FakeEmbedder(), cache=cache)
    emb.embed(["a", "b"], progress=False)
    assert capsys.readouterr().err == ""
    emb.embed(["c", "d", "e"], progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err
    emb.embed(["c", "d", "e"])  # stderr is not a terminal here: no bar, and no misses anyway
    assert capsys.readouterr().err == ""


def test_stats_is_a_snapshot(cache):
    emb = CachedEmbedder(FakeEmbedder(), cache=cache)
    before = emb.stats
    emb.embed(["a"])
    assert before.misses == 0 and emb.stats.misses == 1
    assert emb.stats.hit_rate == 0.0
    emb.embed(["a"])
    assert emb.stats.hit_rate == 0.5


def test_concurrent_embeds_from_threads(cache):
    fake = FakeEmbedder(batch_size=5)
    emb = CachedEmbedder(fake, cache=cache)
    texts = [f"t{i}" for i in range(60)]
    results = {}

    def work(i):
        results[i] = emb.embed(texts[i * 10 : i * 10 + 30])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        np.testing.assert_array_equal(results[i], expected(texts[i * 10 : i * 10 + 30]))
    assert len(cache) == 60


# ----------------------------------------------------------------------------- async


def test_aembed_uses_the_embedders_aembed(cache):
    fake = AsyncFakeEmbedder()
    emb = CachedEmbedder(fake, cache=cache)
    out = asyncio.run(emb.aembed(["a", "b", "a"]))
    np.testing.assert_array_equal(out, expected(["a", "b", "a"]))
    assert fake.requested == ["a", "b"]
    asyncio.run(emb.aembed(["a", "b"]))
    assert len(fake.calls) == 1


def test_aembed_falls_back_to_embed_in_a_thread(cache):
    fake = FakeEmbedder(batch_size=1, fail_after=1)
    emb = CachedEmbedder(fake, cache=cache)
    with pytest.raises(ConnectionError):
        asyncio.run(emb.aembed(["a", "b"]))
    assert len(cache) == 1
    fake.fail_after = None
    out = asyncio.run(emb.aembed(["a", "b"]))
    np.testing.assert_array_equal(out, expected(["a", "b"]))
    assert fake.calls[-1] == ["b"]


def test_on_batch_reports_every_input_position_once(cache):
    emb = CachedEmbedder(FakeEmbedder(batch_size=2), cache=cache)
    emb.embed(["b", "d"])
    texts = ["a", "b", "c", "a", "d", "e", "b"]
    seen = np.zeros(len(texts), dtype=int)
    got = np.zeros((len(texts), 8), np.float32)

    def on_batch(positions, vectors):
        seen[positions] += 1
        got[positions] = vectors

    out = emb.embed(texts, on_batch=on_batch)
    assert seen.tolist() == [1] * len(texts)
    np.testing.assert_array_equal(got, out)
    np.testing.assert_array_equal(out, expected(texts))


# ----------------------------------------------------------------------------- minimal embedders


class MinimalEmbedder:
    """Only what DESIGN.md requires: ``cache_namespace`` and ``embed(texts)``."""

    cache_namespace = "minimal|test"

    def __init__(self, *, fail_on_call=None):
        self.calls = []
        self.fail_on_call = fail_on_call

    def embed(self, texts):
        self.calls.append(list(texts))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise ConnectionError("dropped")
        return np.stack([vector_of(t, 8) for t in texts])


class MinimalAsyncEmbedder(MinimalEmbedder):
    async def aembed(self, texts):
        await asyncio.sleep(0)
        return self.embed(texts)


def test_a_minimal_embedder_is_wrapped_and_cached(cache):
    fake = MinimalEmbedder()
    emb = CachedEmbedder(fake, cache=cache)
    assert emb.model == "" and emb.dimensions is None
    assert isinstance(emb, Embedder)
    texts = ["a", "b", "a", "c"]
    np.testing.assert_array_equal(emb.embed(texts, progress=False), expected(texts))
    assert fake.calls == [["a", "b", "c"]]
    np.testing.assert_array_equal(emb.embed(texts, progress=False), expected(texts))
    assert len(fake.calls) == 1 and len(cache) == 3


def test_without_a_batch_size_misses_go_in_chunks_of_the_configured_size(cache):
    fake = MinimalEmbedder()
    emb = CachedEmbedder(fake, cache=cache)
    texts = [f"t{i}" for i in range(7)]
    with _config.override(CACHE_MISS_CHUNK=3):
        np.testing.assert_array_equal(emb.embed(texts, progress=False), expected(texts))
    assert fake.calls == [texts[0:3], texts[3:6], texts[6:7]]


@pytest.mark.parametrize("mode", ["sync", "async-embed", "async-aembed"])
def test_a_minimal_embedder_gets_chunks_each_cached_as_it_returns(cache, mode):
    fake = (MinimalAsyncEmbedder if mode == "async-aembed" else MinimalEmbedder)(fail_on_call=3)
    fake.batch_size = 2
    emb = CachedEmbedder(fake, cache=cache)
    texts = [f"t{i}" for i in range(7)]

    def run():
        if mode == "sync":
            return emb.embed(texts, progress=False)
        return asyncio.run(emb.aembed(texts, progress=False))

    with pytest.raises(ConnectionError):
        run()
    assert fake.calls == [texts[0:2], texts[2:4], texts[4:6]]
    assert len(cache) == 4  # the two chunks that came back
    fake.fail_on_call = None
    np.testing.assert_array_equal(run(), expected(texts))
    assert fake.calls[3:] == [texts[4:6], texts[6:7]]


def test_a_minimal_embedder_returning_bad_rows_caches_nothing_of_that_chunk(cache):
    class Short(MinimalEmbedder):
        def embed(self, texts):
            return super().embed(texts)[:-1]

    with pytest.raises(InvalidResponseError, match="expected 2 vectors, got 1"):
        CachedEmbedder(Short(), cache=cache).embed(["a", "b"], progress=False)
    assert len(cache) == 0


# ----------------------------------------------------------------------------- a real server's faults


SERVER_FAULTS = [
    pytest.param(lambda: Fault.nan(), InvalidResponseError, id="nan"),
    pytest.param(lambda: Fault.wrong_dim(), InvalidResponseError, id="wrong-dim"),
    pytest.param(lambda: Fault.all_wrong_dim(), InvalidResponseError, id="all-wrong-dim"),
    pytest.param(lambda: Fault.one_too_few(), InvalidResponseError, id="one-too-few"),
    pytest.param(lambda: Fault.duplicate_index(), InvalidResponseError, id="duplicate-index"),
    pytest.param(lambda: Fault.malformed_json(), InvalidResponseError, id="malformed-json"),
    pytest.param(lambda: Fault.error(400, message="too long"), BadRequestError, id="400"),
    pytest.param(lambda: Fault.error(500), ServerError, id="500-after-retries"),
    pytest.param(lambda: Fault.drop(), APIConnectionError, id="dropped"),
]


@pytest.mark.parametrize("fault, error", SERVER_FAULTS)
def test_server_faults_leave_nothing_cached_for_those_texts(fake_server, cache, fault, error):
    from embedcache.providers.openai import OpenAIEmbeddings

    texts = [f"server text {i}" for i in range(4)]
    # batch 1 is answered (in reverse order, still valid); batch 2 and its retry get the fault
    fake_server.push(Fault.reorder(), fault(), fault())
    provider = OpenAIEmbeddings("test-embed-small", base_url=fake_server.base_url, api_key="test-key",
                                dimensions=8 if fault().kind == "all_wrong_dim" else None,
                                batch_size=2, max_concurrency=1, max_retries=1,
                                requests_per_second=None, sleep=lambda s: None)
    emb = CachedEmbedder(provider, cache=cache)
    with pytest.raises(error):
        emb.embed(texts, progress=False)
    keys = [EmbeddingCache.make_key(emb.cache_namespace, emb.model, emb.dimensions, t) for t in texts]
    got = cache.get_many(keys)
    assert got[2] is None and got[3] is None
    for t, v in zip(texts[:2], got[:2]):
        np.testing.assert_array_equal(v, expected_vector(t, 8))
    assert len(cache) == 2
    fake_server.faults.clear()  # the retry's fault, when the first one was not retried
    # once the server behaves, only the texts of the failed batch are asked for
    before = len(fake_server.embedding_requests)
    np.testing.assert_array_equal(emb.embed(texts, progress=False),
                                  np.stack([expected_vector(t, 8) for t in texts]))
    assert [r.body["input"] for r in fake_server.embedding_requests[before:]] == [texts[2:]]
    provider.close()


# ----------------------------------------------------------------------------- shared by threads


def _run_threads(target, n):
    """Run ``target(i)`` in ``n`` threads started together; re-raise the first error."""
    barrier = threading.Barrier(n)
    errors = []

    def body(i):
        try:
            barrier.wait()
            target(i)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread never finished"
    if errors:
        raise errors[0]


def _server_embedder(fake_server, **kwargs):
    from embedcache.providers.openai import OpenAIEmbeddings

    settings = dict(batch_size=4, max_concurrency=4, requests_per_second=None, sleep=lambda s: None)
    return OpenAIEmbeddings("test-embed-small", base_url=fake_server.base_url, api_key="test-key",
                            **{**settings, **kwargs})


def test_threads_count_exactly_the_requests_and_tokens_they_made(fake_server, cache):
    provider = _server_embedder(fake_server)
    emb = CachedEmbedder(provider, cache=cache)
    texts = {i: [f"thread {i} text {j} of {'word ' * (j % 3)}" for j in range(20)] for i in range(16)}
    # slow replies keep many requests of different calls under way at once
    fake_server.push(*[Fault.slow(0.05) for _ in range(32)])
    results = {}
    _run_threads(lambda i: results.__setitem__(i, emb.embed(texts[i], progress=False)), 16)
    for i, x in results.items():
        np.testing.assert_array_equal(x, np.stack([expected_vector(t, 8) for t in texts[i]]))
    received = fake_server.embedding_requests
    assert len(received) == 16 * 5
    assert emb.stats.requests == len(received)
    assert emb.stats.tokens == sum(len(t.split()) for r in received for t in r.body["input"])
    assert (emb.stats.hits, emb.stats.misses) == (0, 320)
    provider.close()


def test_threads_missing_the_same_texts_at_once_request_each_text_once(fake_server, cache):
    provider = _server_embedder(fake_server)
    emb = CachedEmbedder(provider, cache=cache)
    texts = [f"shared text {j}" for j in range(40)]
    windows = {i: texts[i * 3 : i * 3 + 16] for i in range(8)}  # overlapping windows
    fake_server.push(*[Fault.slow(0.2) for _ in range(8)])  # the first requests are still under way
    results = {}
    _run_threads(lambda i: results.__setitem__(i, emb.embed(windows[i], progress=False)), 8)
    for i, x in results.items():
        np.testing.assert_array_equal(x, np.stack([expected_vector(t, 8) for t in windows[i]]))
    sent = [t for r in fake_server.embedding_requests for t in r.body["input"]]
    wanted = sorted(set().union(*map(set, windows.values())))
    assert sorted(sent) == wanted  # every text once, no text twice
    assert emb.stats.misses == len(wanted)
    assert emb.stats.hits == sum(map(len, windows.values())) - len(wanted)
    assert emb.stats.requests == len(fake_server.embedding_requests)
    provider.close()


class GatedEmbedder:
    """The first call blocks until ``release`` is set, then fails or answers; later calls
    answer at once."""

    cache_namespace = "gated|test"
    model = "gated"
    dimensions = None

    def __init__(self, *, first_fails):
        self.first_fails = first_fails
        self.calls = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.usage = Usage()

    def embed(self, texts, *, on_batch=None):
        self.calls.append(list(texts))
        self.usage.add(requests=1)
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(30)
            if self.first_fails:
                raise ConnectionError("the first request failed")
        return np.stack([vector_of(t, 8) for t in texts])


@pytest.mark.parametrize("first_fails", [False, True])
def test_a_call_waits_for_the_request_another_call_has_under_way(cache, first_fails):
    fake = GatedEmbedder(first_fails=first_fails)
    emb = CachedEmbedder(fake, cache=cache)
    outcome = {}

    def call(name, texts):
        try:
            outcome[name] = emb.embed(texts, progress=False)
        except ConnectionError as exc:
            outcome[name] = exc

    first = threading.Thread(target=call, args=("first", ["x", "y"]))
    first.start()
    assert fake.entered.wait(10)
    second = threading.Thread(target=call, args=("second", ["y", "z"]))
    second.start()
    deadline = time.monotonic() + 10
    while len(fake.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    # the second call asked only for "z", and waits for "y", which the first call is requesting
    assert fake.calls == [["x", "y"], ["z"]] and second.is_alive()
    fake.release.set()
    first.join(10), second.join(10)
    assert not first.is_alive() and not second.is_alive(), "a waiting call never finished"
    np.testing.assert_array_equal(outcome["second"], expected(["y", "z"]))
    if first_fails:
        assert isinstance(outcome["first"], ConnectionError)
        assert fake.calls == [["x", "y"], ["z"], ["y"]]  # the waiter asked for "y" itself
        assert (emb.stats.hits, emb.stats.misses, emb.stats.requests) == (0, 4, 3)
    else:
        np.testing.assert_array_equal(outcome["first"], expected(["x", "y"]))
        assert fake.calls == [["x", "y"], ["z"]]
        assert (emb.stats.hits, emb.stats.misses, emb.stats.requests) == (1, 3, 2)


def test_concurrent_aembed_calls_request_a_text_once(cache):
    fake = AsyncFakeEmbedder(batch_size=2)
    emb = CachedEmbedder(fake, cache=cache)
    texts = [f"a{i}" for i in range(6)]

    async def main():
        return await asyncio.gather(*(emb.aembed(texts, progress=False) for _ in range(4)))

    for x in asyncio.run(main()):
        np.testing.assert_array_equal(x, expected(texts))
    assert sorted(fake.requested) == sorted(texts)
    assert (emb.stats.hits, emb.stats.misses) == (18, 6)


def test_embedding_the_same_texts_inside_on_batch_does_not_wait_for_itself(cache):
    emb = CachedEmbedder(FakeEmbedder(batch_size=2), cache=cache)
    texts = [f"n{i}" for i in range(6)]
    inner = []

    def on_batch(positions, vectors):
        inner.append(emb.embed(texts, progress=False))

    worker = threading.Thread(target=lambda: emb.embed(texts, on_batch=on_batch, progress=False))
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "a call waited for a request of its own caller"
    for x in inner:
        np.testing.assert_array_equal(x, expected(texts))


# ----------------------------------------------------------------------------- other processes


def test_pickled_cached_embedder_works_in_a_process_pool(tmp_path):
    emb = CachedEmbedder(HashingEmbeddings(32), cache=EmbeddingCache(tmp_path / "cache"))
    emb.embed(["warm"])  # locks and counters exist by now
    chunks = [[f"chunk {i} text {j}" for j in range(5)] for i in range(4)]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        got = list(pool.map(emb.embed, chunks))
    for chunk, x in zip(chunks, got):
        np.testing.assert_array_equal(x, HashingEmbeddings(32).embed(chunk))
    assert len(emb.cache) == 21  # the workers wrote to the same cache directory
    before = emb.stats
    emb.embed(chunks[0])
    assert emb.stats.hits == before.hits + 5 and emb.stats.misses == before.misses


def test_usage_pickles_with_its_counts():
    usage = Usage()
    usage.add(requests=2, tokens=7)
    copy = pickle.loads(pickle.dumps(usage))
    assert copy.snapshot() == (2, 7)
    copy.add(requests=1)
    assert copy.snapshot() == (3, 7) and usage.snapshot() == (2, 7)


# ----------------------------------------------------------------------------- a cache that cannot be written


def test_a_cache_that_cannot_be_written_loses_no_paid_for_vector(tmp_path):
    directory = tmp_path / "cache"
    texts = [f"text {i}" for i in range(10)]
    with EmbeddingCache(directory, timeout=0.2) as cache:
        CachedEmbedder(FakeEmbedder(), cache=cache).embed(texts[:2])  # committed before
        blocker = sqlite3.connect(os.path.join(cache.directory, "cache.db"), isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the timeout
        fake = FakeEmbedder()
        emb = CachedEmbedder(fake, cache=cache)
        got = []
        try:
            with pytest.warns(RuntimeWarning) as caught:
                out = emb.embed(texts, on_batch=lambda pos, vec: got.extend(pos.tolist()))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        np.testing.assert_array_equal(out, expected(texts))
        assert sorted(got) == list(range(10))
        assert fake.requested == texts[2:]  # each paid for once, the cached two served
        (warning,) = caught  # said once, however many batches followed
        message = str(warning.message)
        assert f"embedding cache at {str(directory)!r}" in message and "stayed locked" in message
        assert "returned but not cached" in message
        assert emb.stats.hits == 2 and emb.stats.misses == 8
        # the next call, with the cache writable again, asks for them and caches them
        again = FakeEmbedder()
        CachedEmbedder(again, cache=cache).embed(texts)
        assert again.requested == texts[2:]
        assert len(cache) == 10


def test_set_many_called_directly_still_raises(tmp_path):
    with EmbeddingCache(tmp_path, timeout=0.1) as cache:
        cache.set_many([EmbeddingCache.make_key("n", "m", None, "a")], np.ones((1, 2), np.float32))
        blocker = sqlite3.connect(os.path.join(cache.directory, "cache.db"), isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(CacheError, match="stayed locked"):
                cache.set_many([EmbeddingCache.make_key("n", "m", None, "b")], np.ones((1, 2), np.float32))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()


_FSIZE_EMBED_WORKER = r"""
import hashlib, json, os, resource, signal, sys, warnings
import numpy as np
from embedcache import _config
from embedcache import CachedEmbedder, EmbeddingCache

class Embedder:
    cache_namespace, model, dimensions, batch_size = "worker|256", "m", None, 500
    requested = 0
    def embed(self, texts):
        Embedder.requested += len(texts)
        seed = lambda t: int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
        return np.stack([np.random.default_rng(seed(t)).standard_normal(256, np.float32) for t in texts])

directory = sys.argv[1]
emb = CachedEmbedder(Embedder(), cache=EmbeddingCache(directory))
old = [f"old {i}" for i in range(50)]
emb.embed(old)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
largest = max(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
resource.setrlimit(resource.RLIMIT_FSIZE, (largest + 64 * 1024, hard))
texts = old + [f"new {i}" for i in range(3000)]
Embedder.requested = 0
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = emb.embed(texts)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
requested = Embedder.requested
print(json.dumps({
    "same": bool(np.array_equal(got, Embedder().embed(texts))),
    "requested": requested,
    "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
    "entries": len(emb.cache),
}))
"""


def test_embed_past_the_file_size_limit_returns_every_vector_with_a_warning(tmp_path):
    import json
    import subprocess
    import sys

    directory = tmp_path / "cache"
    done = subprocess.run([sys.executable, "-c", _FSIZE_EMBED_WORKER, str(directory)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["same"] and out["requested"] == 3000  # the 50 cached were hits
    (message,) = out["warnings"]
    assert message.startswith(f"cannot write the embedding cache at {str(directory)!r}")
    assert "file-size limit" in message and "returned but not cached" in message
    with EmbeddingCache(directory) as cache:  # the last commit, readable from another process
        assert 50 <= len(cache) < 3050
