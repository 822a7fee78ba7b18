"""embedcache.langchain.EmbedcacheEmbeddings: LangChain's own standard suites (unit and
integration, offline: the hashing embedder, and a real OpenAI-compatible server on loopback),
then what the adapter adds: model-namespaced SHA-256 keys, float32 values, each distinct text
of a batch requested once, queries cached too."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_tests.integration_tests import EmbeddingsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests

import embedcache as ec
from embedcache.langchain import EmbedcacheEmbeddings
from embedcache.testing import FakeEmbeddingServer, expected_vector

DIM = 16


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """The default cache directory of every adapter made in this module: a fresh one."""
    monkeypatch.setenv("EMBEDCACHE_DIR", str(tmp_path / "cache"))
    for key in ("IONOS_API_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def server():
    with FakeEmbeddingServer(dimensions=DIM, api_key="test-key") as s:
        yield s


# ---------------------------------------------------------------------------------------
# LangChain's standard suites (async tests run on anyio's pytest plugin)
# ---------------------------------------------------------------------------------------


class Hashing:
    """The adapter over the offline hashing embedder."""

    @property
    def embeddings_class(self):
        return EmbedcacheEmbeddings

    @property
    def embedding_model_params(self):
        return {"embedder": ec.HashingEmbeddings(dimensions=DIM)}


class TestHashingUnit(Hashing, EmbeddingsUnitTests):
    @property
    def init_from_env_params(self):
        # an OpenAI-compatible server other than IONOS takes its key from OPENAI_API_KEY
        return ({"OPENAI_API_KEY": "sk-from-env"},
                {"model": "test-embed-small", "base_url": "http://127.0.0.1:9/v1"},
                {"model": "test-embed-small", "key_source": "OPENAI_API_KEY"})


@pytest.mark.anyio
class TestHashingIntegration(Hashing, EmbeddingsIntegrationTests):
    pass


@pytest.mark.anyio
class TestServerIntegration(EmbeddingsIntegrationTests):
    """Through a real HTTP server on 127.0.0.1, made the way a LangChain user makes
    OpenAIEmbeddings: a model id and a base URL."""

    base_url = ""

    @pytest.fixture(autouse=True)
    def _server(self, server):
        type(self).base_url = server.base_url

    @property
    def embeddings_class(self):
        return EmbedcacheEmbeddings

    @property
    def embedding_model_params(self):
        return {"model": "test-embed-small", "base_url": self.base_url, "api_key": "test-key"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


# ---------------------------------------------------------------------------------------
# the cache behind it
# ---------------------------------------------------------------------------------------


def requested(server, since: int) -> list[str]:
    """The texts sent to the server in the embedding requests after the first ``since``."""
    texts = []
    for rec in server.embedding_requests[since:]:
        texts += rec.body["input"] if isinstance(rec.body["input"], list) else [rec.body["input"]]
    return texts


def adapter(server, tmp_path, model="test-embed-small", **kw):
    return EmbedcacheEmbeddings(model=model, base_url=server.base_url, api_key="test-key",
                                cache=tmp_path / "lc-cache", **kw)


def test_each_distinct_text_is_requested_once_and_queries_are_cached(server, tmp_path):
    with adapter(server, tmp_path) as emb:
        before = len(server.embedding_requests)
        docs = ["alpha", "beta", "alpha", "gamma", "beta"]
        vectors = emb.embed_documents(docs)
        assert sorted(requested(server, before)) == ["alpha", "beta", "gamma"]
        for text, v in zip(docs, vectors):
            assert isinstance(v[0], float)
            np.testing.assert_array_equal(np.asarray(v, np.float32), expected_vector(text, DIM))
        before = len(server.embedding_requests)
        assert emb.embed_query("beta") == vectors[1]  # a document's vector serves the query
        assert emb.embed_documents(["gamma", "alpha"]) == [vectors[3], vectors[0]]
        assert requested(server, before) == []
        emb.embed_query("a new question")
        assert requested(server, before) == ["a new question"]
        emb.embed_query("a new question")  # queries are cached too
        assert requested(server, before) == ["a new question"]
        assert (emb.stats.misses, emb.stats.hits) == (4, 4)  # a repeat within one batch is neither


def test_async_pair_uses_the_same_cache(server, tmp_path):
    with adapter(server, tmp_path) as emb:
        before = len(server.embedding_requests)

        async def go():
            docs = await emb.aembed_documents(["one", "two", "one"])
            query = await emb.aembed_query("two")
            return docs, query

        docs, query = asyncio.run(go())
        assert sorted(requested(server, before)) == ["one", "two"]
        assert query == docs[1] and docs[0] == docs[2]
        assert emb.embed_documents(["one", "two"]) == docs[:2]
        assert sorted(requested(server, before)) == ["one", "two"]


def test_keys_are_sha256_of_model_namespace_and_text_values_float32(server, tmp_path):
    with adapter(server, tmp_path) as small, adapter(server, tmp_path, model="test-embed-large") as large:
        v = small.embed_query("shared text")
        before = len(server.embedding_requests)
        large.embed_query("shared text")  # another model: its own key, a request of its own
        assert requested(server, before) == ["shared text"]
        inner = small.cached
        key = ec.EmbeddingCache.make_key(inner.cache_namespace, inner.model, inner.dimensions, "shared text")
        assert len(key) == 64 and int(key, 16) >= 0  # 256 bits, hex
        [stored] = inner.cache.get_many([key])
        assert stored.dtype == np.float32 and stored.tolist() == v
        other = ec.EmbeddingCache.make_key(large.cached.cache_namespace, "test-embed-large", None, "shared text")
        assert other != key


def test_wraps_a_langchain_embeddings_under_the_namespace_given(tmp_path):
    class Counting(DeterministicFakeEmbedding):
        calls: list = []

        def embed_documents(self, texts):
            self.calls.append(list(texts))
            return super().embed_documents(texts)

    inner = Counting(size=8)
    with pytest.raises(ec.ConfigurationError, match="namespace"):
        EmbedcacheEmbeddings(inner, cache=tmp_path / "c")
    with EmbedcacheEmbeddings(inner, namespace="fake-8", cache=tmp_path / "c") as emb:
        out = emb.embed_documents(["x", "y", "x"])
        assert inner.calls == [["x", "y"]]
        np.testing.assert_allclose(out, inner.embed_documents(["x", "y", "x"]), rtol=1e-6)
        assert emb.embed_query("y") == out[1] and len(inner.calls) == 2
        assert asyncio.run(emb.aembed_documents(["x"])) == [out[0]]
        assert "langchain|Counting|fake-8" == emb.cached.cache_namespace


def test_a_langchain_vector_store_finds_the_right_document(tmp_path):
    texts = ["the battery lasts two days", "the screen cracked on day one", "shipping was fast"]
    with EmbedcacheEmbeddings(ec.HashingEmbeddings(), cache=tmp_path / "c") as emb:
        store = InMemoryVectorStore.from_texts(texts, emb)
        [hit] = store.similarity_search("how long does the battery last", k=1)
        assert hit.page_content == texts[0]


def test_bad_arguments_are_one_clear_error(tmp_path):
    hashing = ec.HashingEmbeddings(dimensions=8)
    with pytest.raises(ec.ConfigurationError, match="either an embedder or model"):
        EmbedcacheEmbeddings()
    with pytest.raises(ec.ConfigurationError, match="both"):
        EmbedcacheEmbeddings(hashing, model="m")
    with pytest.raises(ec.ConfigurationError, match="base_url"):
        EmbedcacheEmbeddings(hashing, base_url="http://x")
    with pytest.raises(ec.ConfigurationError, match="namespace applies"):
        EmbedcacheEmbeddings(hashing, namespace="x")
    with pytest.raises(ec.InvalidInputTypeError, match="cache must be"):
        EmbedcacheEmbeddings(hashing, cache=3)
    cached = ec.CachedEmbedder(hashing, cache=ec.EmbeddingCache(tmp_path / "c"))
    with pytest.raises(ec.ConfigurationError, match="has its cache"):
        EmbedcacheEmbeddings(cached, cache=tmp_path / "d")
    emb = EmbedcacheEmbeddings(cached)
    assert emb.cached is cached and emb.embed_documents([]) == []
    assert asyncio.run(emb.aembed_documents([])) == []
    with pytest.raises(ec.InvalidInputTypeError, match="single str"):
        emb.embed_documents("abc")
    with pytest.raises(ec.InvalidInputError, match="empty string"):
        emb.embed_query("")
    with pytest.raises(ec.InvalidInputError, match=r"texts\[1\] is an empty string"):
        emb.embed_documents(["a", ""])
    cached.cache.close()


def test_the_key_never_shows(server, tmp_path):
    with EmbedcacheEmbeddings(model="m", base_url=server.base_url, api_key="sk-secret-123",
                              cache=tmp_path / "c") as emb:
        assert "sk-secret" not in repr(emb) and emb.key_source == "api_key"


def test_without_langchain_core_the_import_says_how_to_install():
    code = textwrap.dedent("""
        import sys
        sys.modules["langchain_core"] = None
        try:
            import embedcache.langchain
        except ImportError as exc:
            print(type(exc).__name__, exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("MissingDependencyError") and 'pip install "embedcache-sim[langchain]"' in out
