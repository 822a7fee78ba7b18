"""The caching proxy, through real clients, against a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import base64
import uuid

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("starlette", reason="needs the server extra")  # installed by the dev extra

from embedcache import CachedEmbedder, EmbeddingCache, OpenAIEmbeddings  # noqa: E402
from embedcache.testing import FakeEmbeddingServer, expected_vector  # noqa: E402
from tests.support.proxy import CLIENT_KEY, UPSTREAM_KEY, running_proxy, wait_written  # noqa: E402

MODEL = "test-embed-small"
DIM = 8
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


@pytest.fixture(scope="module")
def upstream():
    with FakeEmbeddingServer(dimensions=DIM, api_key=UPSTREAM_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("proxy-cache"))


@pytest.fixture(scope="module")
def proxy(upstream, cache_dir):
    with running_proxy(upstream.base_url, cache=cache_dir, keys=[CLIENT_KEY]) as p:
        yield p


def _upstream_texts(upstream, since: int) -> list[str]:
    return [t for r in upstream.embedding_requests[since:] for t in r.body["input"]]


def _expected(texts, dim=DIM):
    return np.stack([expected_vector(t, dim) for t in texts])


def _vec(embedding) -> np.ndarray:
    """A reply's embedding: a float list, or base64 that an SDK asked for explicitly hands back as is."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.array(embedding, dtype=np.float32)


def _post(proxy, body, headers=AUTH):
    return httpx.post(proxy.base_url + "/embeddings", json=body, headers=headers, timeout=30)


# ---------------------------------------------------------------------------- clients


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_openai_sdk_sync(proxy, encoding_format):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=proxy.base_url, api_key=CLIENT_KEY, max_retries=0)
    texts = [f"sdk sync {encoding_format} {i}" for i in range(5)]
    reply = client.embeddings.create(model=MODEL, input=texts, encoding_format=encoding_format)
    assert [d.index for d in reply.data] == list(range(5))
    got = np.stack([_vec(d.embedding) for d in reply.data])
    np.testing.assert_array_equal(got, _expected(texts))


def test_openai_sdk_default_asks_base64(proxy, upstream):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=proxy.base_url, api_key=CLIENT_KEY, max_retries=0)
    reply = client.embeddings.create(model=MODEL, input="one string alone")  # the SDK's base64 path
    np.testing.assert_array_equal(np.array(reply.data[0].embedding, dtype=np.float32),
                                  expected_vector("one string alone", DIM))


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_openai_sdk_async(proxy, encoding_format):
    openai = pytest.importorskip("openai")

    async def main():
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=CLIENT_KEY, max_retries=0)
        try:
            batches = [[f"sdk async {encoding_format} {j} {i}" for i in range(4)] + ["shared item"]
                       for j in range(6)]
            replies = await asyncio.gather(*(
                client.embeddings.create(model=MODEL, input=b, encoding_format=encoding_format)
                for b in batches))
        finally:
            await client.close()
        return batches, replies

    batches, replies = asyncio.run(main())
    for texts, reply in zip(batches, replies):
        got = np.stack([_vec(d.embedding) for d in sorted(reply.data, key=lambda d: d.index)])
        np.testing.assert_array_equal(got, _expected(texts))


def test_library_client_through_the_proxy(proxy):
    emb = OpenAIEmbeddings(MODEL, base_url=proxy.base_url, api_key=CLIENT_KEY, batch_size=3)
    texts = [f"library {i}" for i in range(10)]
    np.testing.assert_array_equal(emb.embed(texts), _expected(texts))
    assert asyncio.run(emb.aembed(texts[::-1])).tolist() == _expected(texts[::-1]).tolist()
    emb.close()


def test_langchain_openai_embeddings(proxy):
    lc = pytest.importorskip("langchain_openai")
    # check_embedding_ctx_length=False: send text, not tiktoken ids (which the proxy refuses)
    emb = lc.OpenAIEmbeddings(model=MODEL, base_url=proxy.base_url, api_key=CLIENT_KEY,
                              check_embedding_ctx_length=False, max_retries=0)
    docs = ["langchain doc one", "langchain doc two", "langchain doc one"]
    np.testing.assert_array_equal(np.array(emb.embed_documents(docs), dtype=np.float32), _expected(docs))
    np.testing.assert_array_equal(np.array(emb.embed_query("langchain query"), dtype=np.float32),
                                  expected_vector("langchain query", DIM))


def test_token_arrays_are_refused_openai_shaped(proxy):
    for tokens in ([1, 2, 3], [[1, 2], [3]]):
        r = _post(proxy, {"model": MODEL, "input": tokens})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "input" and "check_embedding_ctx_length=False" in err["message"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": MODEL, "input": []}, "at least one string"),
        ({"model": MODEL, "input": ["ok", ""]}, "input[1] is an empty string"),
        ({"model": MODEL, "input": ["ok", 3]}, "input[1] must be a str"),
        ({"model": MODEL}, "input must be a string or a list of strings, got nothing"),
        ({"input": ["x"]}, "model must be a non-empty string"),
        ({"model": MODEL, "input": ["x"], "encoding_format": "int8"}, "encoding_format must be"),
        ({"model": MODEL, "input": ["x"], "dimensions": 0}, "dimensions must be >= 1, got 0"),
        ({"model": MODEL, "input": ["x"] * 2049}, "at most 2048 items"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_requests_get_one_line_400s(proxy, upstream, body, fragment):
    before = len(upstream.embedding_requests)
    r = _post(proxy, body)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]
    assert len(upstream.embedding_requests) == before


def test_not_json(proxy):
    r = httpx.post(proxy.base_url + "/embeddings", content=b"{nope", headers=AUTH)
    assert r.status_code == 400 and "must be JSON" in r.json()["error"]["message"]


def test_a_body_past_the_limit_is_refused_with_or_without_its_length(proxy, upstream, monkeypatch):
    import json

    from embedcache.server import _app

    monkeypatch.setattr(_app, "MAX_BODY", 2000)
    body = json.dumps({"model": MODEL, "input": ["x" * 3000]}).encode()
    before = len(upstream.embedding_requests)

    def chunks(data):  # no Content-Length: sent with Transfer-Encoding: chunked
        for a in range(0, len(data), 500):
            yield data[a : a + 500]

    for content in (body, chunks(body)):
        r = httpx.post(proxy.base_url + "/embeddings", content=content, headers=AUTH, timeout=30)
        assert r.status_code == 413, r.text
        assert "must be at most 2000 bytes" in r.json()["error"]["message"]
    small = json.dumps({"model": MODEL, "input": ["a chunked request"]}).encode()
    r = httpx.post(proxy.base_url + "/embeddings", content=chunks(small), headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    assert len(upstream.embedding_requests) == before + 1


# ---------------------------------------------------------------------------- the cache


def test_mixed_hits_misses_and_repeats_keep_each_index(proxy, upstream):
    warm = ["mixed A", "mixed C"]
    assert _post(proxy, {"model": MODEL, "input": warm}).status_code == 200
    before = len(upstream.embedding_requests)
    texts = ["mixed B", "mixed A", "mixed B", "mixed D", "mixed C", "mixed A", "mixed E"]
    r = _post(proxy, {"model": MODEL, "input": texts, "encoding_format": "base64", "user": "u1"})
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(len(texts)))
    got = np.stack([_vec(d["embedding"]) for d in data])
    np.testing.assert_array_equal(got, _expected(texts))
    assert sorted(_upstream_texts(upstream, before)) == ["mixed B", "mixed D", "mixed E"]
    assert r.headers["x-embedcache-hits"] == "2" and r.headers["x-embedcache-misses"] == "3"
    # `user` is no part of the key
    r2 = _post(proxy, {"model": MODEL, "input": texts, "user": "someone else"})
    assert r2.headers["x-embedcache-misses"] == "0"


def test_dimensions_are_part_of_the_key(proxy, upstream):
    r4 = _post(proxy, {"model": MODEL, "input": ["dims text"], "dimensions": 4})
    r6 = _post(proxy, {"model": MODEL, "input": ["dims text"], "dimensions": 6})
    np.testing.assert_array_equal(np.array(r4.json()["data"][0]["embedding"], dtype=np.float32),
                                  expected_vector("dims text", 4))
    assert len(r6.json()["data"][0]["embedding"]) == 6
    assert r6.headers["x-embedcache-misses"] == "1"


def test_library_and_proxy_share_one_cache_both_ways(proxy, upstream, cache_dir):
    direct = OpenAIEmbeddings(MODEL, base_url=upstream.base_url, api_key=UPSTREAM_KEY)
    with EmbeddingCache(cache_dir) as cache:
        emb = CachedEmbedder(direct, cache=cache)
        emb.embed(["embedded by the library"])
        before = len(upstream.embedding_requests)
        r = _post(proxy, {"model": MODEL, "input": ["embedded by the library"]})
        assert r.headers["x-embedcache-misses"] == "0"
        assert len(upstream.embedding_requests) == before
        assert _post(proxy, {"model": MODEL, "input": ["embedded by the proxy"]}).headers[
            "x-embedcache-misses"] == "1"
        wait_written(proxy)  # answered first, committed in the background (milliseconds)
        before = len(upstream.embedding_requests)
        X = emb.embed(["embedded by the proxy"])
        assert emb.stats.hits == 1 and len(upstream.embedding_requests) == before
        np.testing.assert_array_equal(X, _expected(["embedded by the proxy"]))
    direct.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(
        st.lists(st.integers(0, 15), min_size=1, max_size=12), min_size=2, max_size=12),
)
def test_concurrent_clients_get_their_own_vectors_and_each_item_goes_once(proxy, upstream, requests):
    _concurrent_clients(proxy, upstream, requests)


@pytest.fixture(scope="module")
def one_slot(upstream, tmp_path_factory):
    """A proxy with one upstream slot: misses queue behind the batch under way and go together."""
    with running_proxy(upstream.base_url, cache=str(tmp_path_factory.mktemp("one-slot")), keys=[CLIENT_KEY],
                       max_concurrency=1) as p:
        yield p


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(
        st.lists(st.integers(0, 15), min_size=1, max_size=12), min_size=2, max_size=12),
)
def test_queued_and_batched_misses_get_the_same_answers(one_slot, upstream, requests):
    """With one slot the first request's misses go at once (the idle path) and the rest queue
    and go together (the batched path): each client still gets its own vectors."""
    _concurrent_clients(one_slot, upstream, requests)


def _concurrent_clients(proxy, upstream, requests):
    salt = uuid.uuid4()  # fresh items for every example, whatever hypothesis replays
    pool = [f"{salt} item {i}" for i in range(16)]
    before = len(upstream.embedding_requests)

    async def main():
        async with httpx.AsyncClient(base_url=proxy.base_url, headers=AUTH, timeout=30) as client:
            return await asyncio.gather(*(
                client.post("/embeddings", json={"model": MODEL, "input": [pool[i] for i in idx],
                                                 "encoding_format": fmt})
                for idx, fmt in zip(requests, ["float", "base64"] * len(requests))))

    replies = asyncio.run(main())
    for idx, reply in zip(requests, replies):
        assert reply.status_code == 200
        data = reply.json()["data"]
        assert [d["index"] for d in data] == list(range(len(idx)))
        for d, i in zip(data, idx):
            np.testing.assert_array_equal(_vec(d["embedding"]), expected_vector(pool[i], DIM))
    sent = _upstream_texts(upstream, before)
    assert len(sent) == len(set(sent))  # no item went upstream twice
    assert set(sent) == {pool[i] for idx in requests for i in idx}


def test_misses_of_concurrent_requests_go_together(upstream, tmp_path):
    from embedcache.testing import Fault

    with running_proxy(upstream.base_url, cache=str(tmp_path), max_concurrency=1) as p:
        async def main():
            async with httpx.AsyncClient(base_url=p.base_url, timeout=30) as client:
                first = asyncio.ensure_future(client.post("/embeddings", json={"model": MODEL, "input": ["slow one"]}))
                while not p.upstream.metrics.in_flight._value.get():
                    await asyncio.sleep(0.005)
                rest = [client.post("/embeddings", json={"model": MODEL, "input": [f"batched {i}", "shared"]})
                        for i in range(6)]
                return await asyncio.gather(first, *rest)

        before = len(upstream.embedding_requests)
        upstream.push(Fault.slow(0.4))
        replies = asyncio.run(main())
        assert all(r.status_code == 200 for r in replies)
        batches = [r.body["input"] for r in upstream.embedding_requests[before:]]
        assert len(batches) == 2, batches
        assert sorted(batches[1]) == sorted([f"batched {i}" for i in range(6)] + ["shared"])


def test_one_rate_limit_for_every_model_and_client(upstream, tmp_path):
    with running_proxy(upstream.base_url, cache=str(tmp_path), requests_per_second=10, burst=1,
                       max_concurrency=4) as p:
        before = len(upstream.embedding_requests)

        async def main():
            async with httpx.AsyncClient(base_url=p.base_url, timeout=30) as client:
                return await asyncio.gather(*(
                    client.post("/embeddings", json={"model": m, "input": [f"rate {m} {i}"]})
                    for i in range(3) for m in ("test-embed-small", "test-embed-large")))

        assert all(r.status_code == 200 for r in asyncio.run(main()))
        arrived = sorted(r.arrived for r in upstream.embedding_requests[before:])
        assert len(arrived) >= 2
        # burst 1 at 10/s: n requests leave over (n - 1) / 10 s, whatever the model; one interval
        # of slack for a first request's connection set-up under load (unlimited: all within ms)
        assert arrived[-1] - arrived[0] >= (len(arrived) - 2) / 10


def test_models_health_and_metrics(proxy, upstream):
    r = httpx.get(proxy.base_url + "/models", headers=AUTH)
    assert [m["id"] for m in r.json()["data"]] == list(upstream.models)
    gets = sum(1 for q in upstream.requests if q.method == "GET")
    httpx.get(proxy.base_url + "/models", headers=AUTH)
    assert sum(1 for q in upstream.requests if q.method == "GET") == gets  # kept, not fetched again
    assert httpx.get(proxy.url + "/health").json() == {"status": "ok"}
    _post(proxy, {"model": MODEL, "input": ["metrics one", "metrics one"]})
    text = httpx.get(proxy.url + "/metrics").text
    for name in ("embedcache_proxy_requests_total", 'embedcache_proxy_items_total{client="key-1",result="hit"}',
                 'result="miss"', 'result="repeat"', "embedcache_proxy_upstream_tokens_total",
                 "embedcache_proxy_tokens_saved_total", "embedcache_proxy_upstream_latency_seconds_bucket",
                 "embedcache_proxy_queue_depth", "embedcache_proxy_upstream_rate_limited_total"):
        assert name in text
    assert UPSTREAM_KEY not in text and CLIENT_KEY not in text


def test_a_route_or_method_not_served_is_answered_openai_shaped(proxy):
    r = httpx.post(proxy.base_url + "/embedding", json={"model": MODEL, "input": ["a"]}, headers=AUTH, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["message"] == "no such route: POST /v1/embedding"
    r = httpx.get(proxy.base_url + "/embeddings", headers=AUTH, timeout=30)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in r.headers["allow"]
