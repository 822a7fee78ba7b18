import asyncio
import base64
import email.utils
import json
import threading
import time

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedcache.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    InvalidInputError,
    InvalidInputTypeError,
    InvalidResponseError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    ServerError,
)
from embedcache.providers.openai import DEFAULT_BASE_URL, OpenAIEmbeddings, TokenBucket
from embedcache.testing import Fault, expected_vector

MODEL = "test-embed-small"


def make(server, **kwargs):
    kwargs.setdefault("api_key", "test-key")
    kwargs.setdefault("requests_per_second", None)
    kwargs.setdefault("sleep", lambda s: None)
    return OpenAIEmbeddings(kwargs.pop("model", MODEL), base_url=server.base_url, **kwargs)


def expected(texts, dim=8):
    return np.stack([expected_vector(t, dim) for t in texts])


TEXTS = [f"sentence number {i}" for i in range(23)]


# ---------------------------------------------------------------- happy paths


@pytest.mark.parametrize("encoding_format", ["base64", "float"])
@pytest.mark.parametrize("max_concurrency", [1, 4])
def test_embeds_in_input_order_across_batches(fake_server, encoding_format, max_concurrency):
    with make(fake_server, batch_size=5, encoding_format=encoding_format,
              max_concurrency=max_concurrency) as emb:
        X = emb.embed(TEXTS)
    assert X.dtype == np.float32 and X.shape == (23, 8)
    np.testing.assert_array_equal(X, expected(TEXTS))
    bodies = [r.body for r in fake_server.embedding_requests]
    assert len(bodies) == 5
    assert all(b["encoding_format"] == encoding_format and b["model"] == MODEL for b in bodies)
    assert sorted(t for b in bodies for t in b["input"]) == sorted(TEXTS)
    assert emb.usage.requests == 5
    assert emb.usage.tokens == sum(len(t.split()) for t in TEXTS)


def test_batches_by_count_and_by_characters(fake_server):
    texts = ["aaaa", "bbbb", "cc", "d" * 30, "ee", "ff", "gg", "hh", "ii"]
    with make(fake_server, batch_size=3, max_batch_chars=10, max_concurrency=1) as emb:
        np.testing.assert_array_equal(emb.embed(texts), expected(texts))
    batches = [r.body["input"] for r in fake_server.embedding_requests]
    assert batches == [["aaaa", "bbbb", "cc"], ["d" * 30], ["ee", "ff", "gg"], ["hh", "ii"]]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=40),
    batch_size=st.integers(1, 8),
    max_chars=st.integers(1, 60),
)
def test_batch_plan_covers_everything_within_limits(lengths, batch_size, max_chars):
    emb = OpenAIEmbeddings(MODEL, api_key="k", batch_size=batch_size, max_batch_chars=max_chars)
    texts = ["x" * n for n in lengths]
    plan = emb.plan(texts)
    assert plan[0][0] == 0 and plan[-1][1] == len(texts)
    for (a, b), (c, _) in zip(plan, plan[1:]):
        assert b == c
    for a, b in plan:
        assert 1 <= b - a <= batch_size
        assert b - a == 1 or sum(lengths[a:b]) <= max_chars
    # greedy: the next text would not have fitted into the previous batch
    for (a, b), _ in zip(plan, plan[1:]):
        assert b - a == batch_size or sum(lengths[a : b + 1]) > max_chars


def test_reordered_reply_is_placed_by_index(fake_server):
    fake_server.push(Fault.reorder())
    with make(fake_server) as emb:
        X = emb.embed(["one", "two", "three"])
    np.testing.assert_array_equal(X, expected(["one", "two", "three"]))


def test_float_reply_to_a_base64_request_is_accepted(fake_server):
    fake_server.push(Fault.floats())
    with make(fake_server, encoding_format="base64") as emb:
        np.testing.assert_array_equal(emb.embed(["p", "q"]), expected(["p", "q"]))


def test_dimensions_are_requested_and_checked(fake_server):
    with make(fake_server, dimensions=5) as emb:
        X = emb.embed(["a", "b"])
        assert X.shape == (2, 5)
        np.testing.assert_array_equal(X, expected(["a", "b"], 5))
        assert fake_server.embedding_requests[-1].body["dimensions"] == 5
        fake_server.push(Fault.all_wrong_dim())
        with pytest.raises(InvalidResponseError, match="dimensions=5"):
            emb.embed(["a", "b"])


def test_a_model_that_changes_dimension_between_calls_is_refused(fake_server):
    with make(fake_server) as emb:
        emb.embed(["a"])
        fake_server.dimensions = 16
        with pytest.raises(InvalidResponseError, match="8-d embeddings before, 16-d now"):
            emb.embed(["b"])


def test_list_models(fake_server):
    with make(fake_server) as emb:
        assert emb.list_models() == ["test-embed-small", "test-embed-large"]
    assert fake_server.requests[-1].method == "GET"


def test_a_key_in_the_base_url_is_refused_and_never_shown():
    with pytest.raises(ConfigurationError, match=r"query string or fragment \(got http://127\.0\.0\.1:9/v1\?…\)") as e:
        OpenAIEmbeddings(MODEL, base_url="http://127.0.0.1:9/v1?api-key=sk-0123456789", api_key="test-key")
    assert "sk-0123456789" not in str(e.value)


def test_a_model_list_that_echoes_the_key_shows_it_masked():
    from embedcache.testing import FakeEmbeddingServer

    key = "sk-echoed-0123456789"
    with FakeEmbeddingServer(api_key=key, models=(MODEL, key, f"{key}-large")) as server, \
            make(server, api_key=key) as emb:
        assert emb.list_models() == [MODEL, "***", "***-large"]


def test_on_batch_gets_each_batch_once_with_positions(fake_server):
    calls = []
    with make(fake_server, batch_size=4, max_concurrency=3) as emb:
        X = emb.embed(TEXTS, on_batch=lambda p, v: calls.append((p.copy(), v.copy())))
    positions = np.concatenate([p for p, _ in calls])
    assert sorted(positions.tolist()) == list(range(len(TEXTS)))
    assert all(p.dtype == np.int64 for p, _ in calls)
    for p, v in calls:
        np.testing.assert_array_equal(v, X[p])


def test_connections_are_reused_and_bounded_by_concurrency(fake_server):
    seen = set()
    lock = threading.Lock()
    original = fake_server.httpd.RequestHandlerClass.handle

    def handle(self):
        with lock:
            seen.add(self.client_address)
        original(self)

    fake_server.httpd.RequestHandlerClass.handle = handle
    with make(fake_server, batch_size=1, max_concurrency=3) as emb:
        emb.embed(TEXTS)
    assert len(fake_server.embedding_requests) == len(TEXTS)
    assert 1 <= len(seen) <= 3


def test_requests_run_concurrently_up_to_the_limit():
    in_flight = peak = 0
    lock = threading.Lock()

    def handler(request):
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.05)
        texts = json.loads(request.content)["input"]
        with lock:
            in_flight -= 1
        return httpx.Response(200, json=_reply([expected_vector(t, 4) for t in texts]))

    emb = OpenAIEmbeddings(MODEL, api_key="k", batch_size=1, max_concurrency=3,
                           requests_per_second=None, transport=httpx.MockTransport(handler))
    with emb:
        emb.embed([f"t{i}" for i in range(12)])
    assert 2 <= peak <= 3


# ---------------------------------------------------------------- retries

RETRIED = [
    pytest.param(Fault.error(429, retry_after="2"), 2.0, id="429-retry-after-seconds"),
    pytest.param(Fault.error(429, retry_after_ms="1500", retry_after="9"), 1.5, id="429-retry-after-ms"),
    pytest.param(Fault.error(500), None, id="500"),
    pytest.param(Fault.error(503, style="fastapi", retry_after="0"), 0.0, id="503-fastapi"),
    pytest.param(Fault.error(502, style="text"), None, id="502-text"),
    pytest.param(Fault.error(408), None, id="408"),
    pytest.param(Fault.error(409), None, id="409"),
    pytest.param(Fault.drop(), None, id="dropped-connection"),
    pytest.param(Fault.slow(5.0), None, id="slow-past-timeout"),
]


@pytest.mark.parametrize("fault, wait", RETRIED)
def test_transient_faults_are_retried_then_succeed(fake_server, fault, wait):
    waits = []
    fake_server.push(fault)
    with make(fake_server, sleep=waits.append, timeout=0.5) as emb:
        X = emb.embed(["alpha", "beta"])
    np.testing.assert_array_equal(X, expected(["alpha", "beta"]))
    assert len(fake_server.embedding_requests) == 2
    assert len(waits) == 1
    if wait is not None:
        assert waits[0] == pytest.approx(wait)
    else:
        assert 0 <= waits[0] <= 20


def test_retry_after_http_date_is_honoured():
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    answers = iter([httpx.Response(429, headers={"Retry-After": when}, json={"error": {"message": "later"}}),
                    httpx.Response(200, json=_reply([np.ones(3, np.float32)]))])
    waits = []
    emb = OpenAIEmbeddings(MODEL, api_key="k", requests_per_second=None, sleep=waits.append,
                           transport=httpx.MockTransport(lambda r: next(answers)))
    emb.embed(["x"])
    assert 25 <= waits[0] <= 31


def test_backoff_grows_and_is_jittered(fake_server):
    waits = []
    fake_server.push(*[Fault.error(500)] * 5)
    with make(fake_server, sleep=waits.append, max_retries=5) as emb:
        emb.embed(["a"])
    assert len(waits) == 5
    caps = [0.5 * 2**k for k in range(5)]
    assert all(0 <= w <= c for w, c in zip(waits, caps))
    assert len(set(waits)) > 1


@pytest.mark.parametrize(
    "fault, exc, status",
    [
        (Fault.error(429, retry_after="0", message="slow down"), RateLimitError, 429),
        (Fault.error(503, message="overloaded"), ServerError, 503),
        (Fault.drop(), APIConnectionError, None),
        (Fault.slow(5.0), APITimeoutError, None),
        (Fault.error(408), APIStatusError, 408),
    ],
)
def test_retries_give_up_with_the_typed_error(fake_server, fault, exc, status):
    waits = []
    fake_server.push(*[fault] * 3)
    with make(fake_server, max_retries=2, sleep=waits.append, timeout=0.5) as emb:
        with pytest.raises(exc) as info:
            emb.embed(["a"])
    assert info.value.status_code == status
    assert len(fake_server.embedding_requests) == 3 and len(waits) == 2
    if fault.kind == "status":
        assert fault.message in str(info.value) and info.value.message == fault.message


# ---------------------------------------------------------------- errors that are not retried


@pytest.mark.parametrize(
    "fault, exc, text",
    [
        (Fault.error(400, message="input too long"), BadRequestError, "input too long"),
        (Fault.error(422, style="fastapi", message="field required"), BadRequestError,
         "body.input: field required"),
        (Fault.error(401, message="bad key"), AuthenticationError, "bad key"),
        (Fault.error(403, style="fastapi", message="not your model"), PermissionDeniedError, "not your model"),
        (Fault.error(404, message="no such model"), NotFoundError, "no such model"),
        (Fault.error(418, style="text", message="teapot"), APIStatusError, "teapot"),
    ],
)
def test_client_errors_are_typed_and_not_retried(fake_server, fault, exc, text):
    fake_server.push(fault)
    with make(fake_server) as emb:
        with pytest.raises(exc, match=text) as info:
            emb.embed(["a"])
    assert info.value.status_code == fault.status
    assert str(fault.status) in str(info.value)
    assert len(fake_server.embedding_requests) == 1


def test_unknown_model_and_wrong_key_from_the_server_itself(fake_server):
    with make(fake_server, model="no-such-model") as emb:
        with pytest.raises(NotFoundError, match="no-such-model"):
            emb.embed(["a"])
    with make(fake_server, api_key="wrong-key") as emb:
        with pytest.raises(AuthenticationError):
            emb.list_models()


@pytest.mark.parametrize(
    "fault, text",
    [
        (Fault.one_too_few(), "expected 3 embeddings, got 2"),
        (Fault.nan(), "NaN"),
        (Fault.wrong_dim(), "unequal dimensions"),
        (Fault.duplicate_index(), "twice"),
        (Fault.malformed_json(), "not valid JSON"),
    ],
)
def test_bad_replies_raise_and_never_reach_on_batch(fake_server, fault, text):
    fake_server.push(fault)
    seen = []
    with make(fake_server) as emb:
        with pytest.raises(InvalidResponseError, match=text):
            emb.embed(["a", "b", "c"], on_batch=lambda p, v: seen.append(p))
    assert seen == []
    assert len(fake_server.embedding_requests) == 1


def test_a_bad_batch_among_good_ones_reports_only_the_good(fake_server):
    fake_server.push(Fault.reorder(), Fault.nan())  # first two requests to arrive
    seen = {}
    with make(fake_server, batch_size=2, max_concurrency=1) as emb:
        with pytest.raises(InvalidResponseError):
            emb.embed(TEXTS[:6], on_batch=lambda p, v: seen.update(zip(p.tolist(), v.copy())))
    assert sorted(seen) == [0, 1]
    for p, v in seen.items():
        np.testing.assert_array_equal(v, expected_vector(TEXTS[p], 8))


def _reply(vectors, *, b64=True, usage=None):
    data = [
        {"index": i, "embedding": base64.b64encode(np.asarray(v, "<f4").tobytes()).decode() if b64 else v}
        for i, v in enumerate(vectors)
    ]
    body = {"data": data}
    if usage is not None:
        body["usage"] = usage
    return body


def test_redirect_is_an_error_that_names_the_target():
    redirect = httpx.Response(308, headers={"Location": "https://elsewhere.example/v1/embeddings"})
    emb = OpenAIEmbeddings(MODEL, api_key="k", requests_per_second=None,
                           transport=httpx.MockTransport(lambda r: redirect))
    with pytest.raises(APIStatusError, match="elsewhere.example") as info:
        emb.embed(["x"])
    assert info.value.status_code == 308 and emb.usage.requests == 1


@pytest.mark.parametrize(
    "usage, tokens",
    [({"prompt_tokens": 7, "total_tokens": 9}, 9), ({"prompt_tokens": 7}, 7), (None, 0), ({"total_tokens": "x"}, 0)],
)
def test_usage_tokens(usage, tokens):
    body = _reply([[0.5, 0.5]], b64=False, usage=usage)
    emb = OpenAIEmbeddings(MODEL, api_key="k", requests_per_second=None,
                           transport=httpx.MockTransport(lambda r: httpx.Response(200, json=body)))
    np.testing.assert_array_equal(emb.embed(["x"]), [[0.5, 0.5]])
    assert (emb.usage.requests, emb.usage.tokens) == (1, tokens)


# ---------------------------------------------------------------- input and configuration


@pytest.mark.parametrize("texts, exc", [([], InvalidInputError), (["a", ""], InvalidInputError),
                                        (["a", None], InvalidInputTypeError), ("abc", InvalidInputTypeError)])
def test_bad_input_is_refused_before_any_request(fake_server, texts, exc):
    with make(fake_server) as emb:
        with pytest.raises(exc):
            emb.embed(texts)
        with pytest.raises(exc):
            asyncio.run(emb.aembed(texts))
    assert fake_server.requests == []


def test_missing_key_is_a_configuration_error_before_any_request(fake_server, monkeypatch):
    monkeypatch.delenv("IONOS_API_TOKEN", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    emb = make(fake_server, api_key=None)
    for call in (lambda: emb.embed(["a"]), emb.list_models, lambda: asyncio.run(emb.aembed(["a"]))):
        with pytest.raises(ConfigurationError, match="IONOS_API_TOKEN"):
            call()
    assert fake_server.requests == []


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"model": ""}, InvalidInputError),
        ({"base_url": "ftp://example.com"}, ConfigurationError),
        ({"base_url": "https://user:pw@example.com/v1"}, ConfigurationError),
        ({"base_url": "https://example.com/v1?api-key=sk-0123456789"}, ConfigurationError),
        ({"base_url": "https://example.com/v1#sk-0123456789"}, ConfigurationError),
        ({"dimensions": 0}, InvalidInputError),
        ({"batch_size": 0}, InvalidInputError),
        ({"max_batch_chars": 0}, InvalidInputError),
        ({"max_concurrency": 1.5}, InvalidInputTypeError),
        ({"requests_per_second": 0}, InvalidInputError),
        ({"burst": 0}, InvalidInputError),
        ({"max_retries": -1}, InvalidInputError),
        ({"timeout": 0}, InvalidInputError),
        ({"encoding_format": "int8"}, ConfigurationError),
        ({"api_key": "has space"}, ConfigurationError),
        ({"api_key": 123}, ConfigurationError),
    ],
)
def test_bad_settings(kwargs, exc):
    kwargs = {"model": MODEL, "api_key": "k", **kwargs}
    with pytest.raises(exc):
        OpenAIEmbeddings(kwargs.pop("model"), **kwargs)


def test_repr_and_namespace():
    emb = OpenAIEmbeddings("m", api_key="secret-value-123")
    assert repr(emb) == f"OpenAIEmbeddings(model='m', base_url='{DEFAULT_BASE_URL}')"
    spaces = {
        emb.cache_namespace,
        OpenAIEmbeddings("m2", api_key="k").cache_namespace,
        OpenAIEmbeddings("m", api_key="k", dimensions=256).cache_namespace,
        OpenAIEmbeddings("m", api_key="k", base_url="http://localhost:8000/v1").cache_namespace,
        OpenAIEmbeddings("m", api_key="k", base_url="http://localhost:8001/v1").cache_namespace,
    }
    assert len(spaces) == 5
    # settings that do not change vectors do not change the namespace
    same = OpenAIEmbeddings("m", api_key="other", batch_size=3, encoding_format="float",
                            base_url=DEFAULT_BASE_URL + "/")
    assert same.cache_namespace == emb.cache_namespace
    assert emb.model == "m" and emb.dimensions is None


# ---------------------------------------------------------------- credentials and limits scoped to their host

IONOS_TOKEN = "ionos-token-0123456789"
OPENAI_KEY = "sk-openai-0123456789"


def _recording_transport(seen):
    """A MockTransport answering every embeddings request, recording its Authorization."""

    def handler(request):
        seen.append(request.headers.get("authorization"))
        texts = json.loads(request.content)["input"]
        return httpx.Response(200, json=_reply([expected_vector(t, 4) for t in texts]))

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    "ionos_env, openai_env, api_key, want, source",
    [
        (IONOS_TOKEN, OPENAI_KEY, "from-arg-123", "from-arg-123", "api_key"),
        (IONOS_TOKEN, OPENAI_KEY, None, IONOS_TOKEN, "IONOS_API_TOKEN"),
        ("", OPENAI_KEY, None, OPENAI_KEY, "OPENAI_API_KEY"),
    ],
)
def test_the_ionos_host_takes_its_token_then_openai_api_key(monkeypatch, ionos_env, openai_env, api_key,
                                                            want, source):
    monkeypatch.setenv("IONOS_API_TOKEN", ionos_env)
    monkeypatch.setenv("OPENAI_API_KEY", openai_env)
    seen = []
    emb = OpenAIEmbeddings(MODEL, api_key=api_key, transport=_recording_transport(seen))
    assert emb.base_url == DEFAULT_BASE_URL and emb.key_source == source
    emb.embed(["a"])
    assert seen == [f"Bearer {want}"]


@pytest.mark.parametrize("mode", ["embed", "aembed", "list_models"])
def test_a_loopback_server_never_receives_the_ionos_token(fake_server, monkeypatch, mode):
    monkeypatch.setenv("IONOS_API_TOKEN", IONOS_TOKEN)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    fake_server.api_key = None
    calls = {"embed": lambda e: e.embed(["a"]), "aembed": lambda e: asyncio.run(e.aembed(["a"])),
             "list_models": lambda e: e.list_models()}
    with make(fake_server, api_key=None) as emb:
        assert emb.key_source is None
        with pytest.raises(ConfigurationError, match="OPENAI_API_KEY") as info:
            calls[mode](emb)
        assert "IONOS_API_TOKEN is sent only to openai.inference.de-txl.ionos.com" in str(info.value)
    assert fake_server.requests == []
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    with make(fake_server, api_key=None) as emb:
        assert emb.key_source == "OPENAI_API_KEY"
        calls[mode](emb)
    assert [r.authorization for r in fake_server.requests] == [f"Bearer {OPENAI_KEY}"]


@pytest.mark.parametrize(
    "base_url",
    [
        "https://api.openai.com/v1",
        "http://openai.inference.de-txl.ionos.com/v1",  # the IONOS host, but in clear text
        "https://openai.inference.de-txl.ionos.com.example.net/v1",
        "https://evil.example/openai.inference.de-txl.ionos.com/v1",
    ],
)
def test_other_hosts_take_openai_api_key_only_and_are_not_throttled(monkeypatch, base_url):
    monkeypatch.setenv("IONOS_API_TOKEN", IONOS_TOKEN)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    seen = []
    emb = OpenAIEmbeddings(MODEL, base_url=base_url, transport=_recording_transport(seen))
    assert emb.key_source is None and emb.requests_per_second is None
    with pytest.raises(ConfigurationError):
        emb.embed(["a"])
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    emb = OpenAIEmbeddings(MODEL, base_url=base_url, transport=_recording_transport(seen))
    emb.embed(["a"])
    assert seen == [f"Bearer {OPENAI_KEY}"]


def test_the_ionos_limit_is_the_default_for_the_ionos_host_only():
    ionos = OpenAIEmbeddings(MODEL, api_key="k")
    assert (ionos.requests_per_second, ionos.burst) == (5.0, 10)
    local = OpenAIEmbeddings(MODEL, api_key="k", base_url="http://127.0.0.1:8000/v1")
    assert local.requests_per_second is None
    # a limit the user sets applies to any host; None (or infinity) lifts the IONOS one
    assert OpenAIEmbeddings(MODEL, api_key="k", base_url="http://127.0.0.1:8000/v1",
                            requests_per_second=20).requests_per_second == 20.0
    assert OpenAIEmbeddings(MODEL, api_key="k", requests_per_second=None).requests_per_second is None
    assert OpenAIEmbeddings(MODEL, api_key="k", requests_per_second=float("inf")).requests_per_second is None
    with pytest.raises(InvalidInputTypeError, match="requests_per_second must be a number, got str"):
        OpenAIEmbeddings(MODEL, api_key="k", requests_per_second="fast")


def test_forty_requests_to_a_loopback_server_are_not_throttled(fake_server):
    # the IONOS limit (5/s, burst 10) would spread them over at least 6 s
    texts = [f"text {i}" for i in range(40)]
    with OpenAIEmbeddings(MODEL, base_url=fake_server.base_url, api_key="test-key", batch_size=1) as emb:
        np.testing.assert_array_equal(emb.embed(texts), expected(texts))
    arrived = [r.arrived for r in fake_server.embedding_requests]
    assert len(arrived) == 40
    assert max(arrived) - min(arrived) < 3.0


# ---------------------------------------------------------------- rate limit


def test_token_bucket_refills_at_rate_up_to_burst():
    now = [0.0]
    bucket = TokenBucket(rate=5.0, burst=10, clock=lambda: now[0])
    assert [bucket.reserve() for _ in range(10)] == [0.0] * 10
    assert bucket.reserve() == pytest.approx(0.2)
    assert bucket.reserve() == pytest.approx(0.4)
    now[0] = 100.0  # long idle: refills to the burst, not beyond
    assert [bucket.reserve() for _ in range(10)] == [0.0] * 10
    assert bucket.reserve() == pytest.approx(0.2)


def test_requests_are_spread_by_the_rate_limit(fake_server):
    with make(fake_server, requests_per_second=25.0, burst=2, batch_size=1, max_concurrency=4) as emb:
        started = time.monotonic()  # the server runs in this process: same clock
        emb.embed([f"t{i}" for i in range(7)])
    last = max(r.arrived for r in fake_server.embedding_requests)
    # 2 at once from the burst, then one each 40 ms: the 7th no earlier than 5 * 40 ms in
    assert last - started >= 0.2 - 1e-3


# ---------------------------------------------------------------- async


def test_async_embed_matches_sync_and_reports_batches(fake_server):
    calls = []

    async def main():
        async with make(fake_server, batch_size=4, max_concurrency=3) as emb:
            X = await emb.aembed(TEXTS, on_batch=lambda p, v: calls.append(p))
            models = await emb.alist_models()
            return X, models

    X, models = asyncio.run(main())
    np.testing.assert_array_equal(X, expected(TEXTS))
    assert models == ["test-embed-small", "test-embed-large"]
    assert sorted(np.concatenate(calls).tolist()) == list(range(len(TEXTS)))


def test_async_retries_and_typed_errors(fake_server):
    waits = []

    async def fake_sleep(s):
        waits.append(s)

    emb = make(fake_server, sleep=fake_sleep, timeout=0.5, max_retries=3)
    fake_server.push(Fault.error(429, retry_after="3"), Fault.drop(), Fault.slow(5.0))
    X = asyncio.run(emb.aembed(["a", "b"]))
    np.testing.assert_array_equal(X, expected(["a", "b"]))
    assert waits[0] == 3.0 and len(waits) == 3
    fake_server.push(Fault.error(401, style="fastapi", message="who are you"))
    with pytest.raises(AuthenticationError, match="who are you"):
        asyncio.run(emb.aembed(["a"]))
    fake_server.push(Fault.nan())
    with pytest.raises(InvalidResponseError):
        asyncio.run(emb.aembed(["a", "b"]))
    fake_server.push(*[Fault.error(500)] * 4)
    with pytest.raises(ServerError):
        asyncio.run(emb.aembed(["a"]))
    emb.close()


def test_async_rate_limit_and_concurrency_with_mock_transport():
    in_flight = peak = 0

    async def handler(request):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        texts = json.loads(request.content)["input"]
        return httpx.Response(200, json=_reply([expected_vector(t, 4) for t in texts]))

    emb = OpenAIEmbeddings(MODEL, api_key="k", batch_size=1, max_concurrency=2, requests_per_second=None,
                           async_transport=httpx.MockTransport(handler))
    X = asyncio.run(emb.aembed([f"t{i}" for i in range(8)]))
    assert X.shape == (8, 4) and peak == 2


# ---------------------------------------------------------------- damaged replies


def _gzip_marked(content):
    # the body is decoded as the reply is read, inside the client's request
    return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=content)


def test_a_reply_that_cannot_be_decoded_is_retried_then_typed():
    import gzip

    good = gzip.compress(json.dumps(_reply([np.ones(3, np.float32)])).encode())
    answers = iter([b"not gzip at all", good])
    waits = []
    emb = OpenAIEmbeddings(MODEL, api_key="test-key-123", requests_per_second=None, sleep=waits.append,
                           transport=httpx.MockTransport(lambda r: _gzip_marked(next(answers))))
    np.testing.assert_array_equal(emb.embed(["x"]), np.ones((1, 3), np.float32))
    assert len(waits) == 1

    calls = []
    emb = OpenAIEmbeddings(MODEL, api_key="test-key-123", requests_per_second=None, max_retries=2,
                           sleep=lambda s: None,
                           transport=httpx.MockTransport(lambda r: calls.append(r) or _gzip_marked(b"junk")))
    with pytest.raises(APIConnectionError, match="could not be decoded"):
        emb.embed(["x"])
    assert len(calls) == 3


# ---------------------------------------------------------------- stopping


def _http_threads():
    return [t for t in threading.enumerate() if t.name.startswith("embedcache-http")]


def test_a_failed_call_leaves_no_retries_running(fake_server):
    # one batch fails for good while the others keep getting 500s with a short Retry-After
    fake_server.push(Fault.error(400, message="bad batch"),
                     *[Fault.error(500, retry_after_ms="50")] * 200)
    emb = make(fake_server, batch_size=1, max_concurrency=3, max_retries=100, sleep=None)
    with pytest.raises(BadRequestError):
        emb.embed(["a", "b", "c"])
    time.sleep(0.3)  # requests already on the wire when the call ended may still land
    settled = len(fake_server.embedding_requests)
    time.sleep(0.5)
    assert len(fake_server.embedding_requests) == settled
    assert settled < 10
    emb.close()


@pytest.mark.parametrize("max_concurrency", [1, 2])
def test_close_cuts_requests_under_way(fake_server, max_concurrency):
    make(fake_server).embed(["warm"])  # a server that has answered gets every batch at once
    warm = len(fake_server.embedding_requests)
    fake_server.push(*[Fault.slow(20.0)] * max_concurrency)
    emb = make(fake_server, batch_size=1, max_concurrency=max_concurrency, max_retries=5, timeout=30)
    outcome = {}

    def run():
        try:
            outcome["result"] = emb.embed(["a", "b"])
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    caller = threading.Thread(target=run)
    caller.start()
    deadline = time.monotonic() + 5
    while len(fake_server.embedding_requests) < warm + max_concurrency and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    started = time.monotonic()
    emb.close()
    caller.join(timeout=5)
    assert not caller.is_alive()
    assert time.monotonic() - started < 3
    assert isinstance(outcome.get("error"), APIConnectionError), outcome
    assert "cancelled" in str(outcome["error"])
    deadline = time.monotonic() + 3
    while _http_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _http_threads()
    assert len(fake_server.embedding_requests) == warm + max_concurrency  # nothing retried
    # still usable afterwards
    np.testing.assert_array_equal(emb.embed(["c"]), expected(["c"]))
    emb.close()


# ---------------------------------------------------------------- out of quota


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_insufficient_quota_fails_at_once_and_says_so(fake_server, mode):
    fault = Fault.insufficient_quota(retry_after="3")
    fake_server.push(*[fault] * 3)
    # real sleeps: a retry would wait the 3 s the server asks for
    with make(fake_server, sleep=None, max_retries=2) as emb:
        started = time.monotonic()
        with pytest.raises(QuotaExceededError) as info:
            if mode == "sync":
                emb.embed(["a"])
            else:
                asyncio.run(emb.aembed(["a"]))
        elapsed = time.monotonic() - started
    assert len(fake_server.embedding_requests) == 1
    assert elapsed < 2.0
    assert isinstance(info.value, RateLimitError) and info.value.status_code == 429
    assert "quota" in str(info.value).split(fault.message)[0]
    assert info.value.message == fault.message


@pytest.mark.parametrize("failures", [0, 1, 3, 4])
def test_async_batch_attempts_waits_and_log_lines_as_the_retry_policy_says(failures, caplog):
    """The first attempt runs outside the retry machinery; a failure hands over to it with the
    same attempts, waits and log lines as if it had run that attempt too."""
    sent, waits = [], []

    async def send(request):
        sent.append(request)
        if len(sent) <= failures:
            return httpx.Response(503, json={"error": {"message": "busy"}}, headers={"Retry-After": "2"})
        texts = json.loads(request.content)["input"]
        return httpx.Response(200, json=_reply([expected_vector(t, 4) for t in texts]))

    async def fake_sleep(s):
        waits.append(s)

    emb = OpenAIEmbeddings(MODEL, api_key="k", max_retries=3, requests_per_second=None, sleep=fake_sleep)
    with caplog.at_level("INFO", logger="embedcache"):
        if failures > 3:
            with pytest.raises(ServerError, match="busy"):
                asyncio.run(emb.aembed_batch(["a", "b"], send))
        else:
            X = asyncio.run(emb.aembed_batch(["a", "b"], send))
            np.testing.assert_array_equal(X, expected(["a", "b"], 4))
    assert len(sent) == min(failures + 1, 4)
    assert waits == [2.0] * min(failures, 3)
    retried = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert [m.split("(")[1].split(")")[0] for m in retried] == [f"attempt {i + 2} of 4" for i in range(min(failures, 3))]
    assert emb.usage.snapshot()[0] == len(sent)
