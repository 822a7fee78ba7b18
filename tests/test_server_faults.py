"""The proxy when things go wrong: upstream faults, bad client keys, a SIGKILL under load."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("starlette", reason="needs the server extra")  # installed by the dev extra

from embedcache import EmbeddingCache, OpenAIEmbeddings  # noqa: E402
from embedcache.cli import main  # noqa: E402
from embedcache.testing import Fault, FakeEmbeddingServer, expected_vector  # noqa: E402
from tests.support.proxy import CLIENT_KEY, UPSTREAM_KEY, free_port, running_proxy  # noqa: E402

MODEL = "test-embed-small"
DIM = 8


@pytest.fixture(scope="module")
def upstream():
    with FakeEmbeddingServer(dimensions=DIM, api_key=UPSTREAM_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(upstream, tmp_path_factory):
    with running_proxy(upstream.base_url, cache=str(tmp_path_factory.mktemp("c")), max_retries=1,
                       max_concurrency=1) as p:
        yield p


def _post(proxy, texts, **headers):
    return httpx.post(proxy.base_url + "/embeddings", json={"model": MODEL, "input": texts},
                      headers=headers, timeout=30)


# ---------------------------------------------------------------------------- upstream faults

RECOVERED = [
    [Fault.error(429, retry_after="0")],
    [Fault.error(503, retry_after="0")],
    [Fault.error(500, style="text", retry_after="0")],
    [Fault.drop()],
    [Fault.slow(0.2)],
    [Fault.reorder()],
    [Fault.floats()],
]


@pytest.mark.parametrize("faults", RECOVERED, ids=lambda f: f[0].kind + str(f[0].status))
def test_faults_the_library_recovers_from(proxy, upstream, faults):
    texts = [f"recover {faults[0].kind} {faults[0].status} {i}" for i in range(3)]
    upstream.push(*faults)
    r = _post(proxy, texts)
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, np.stack([expected_vector(t, DIM) for t in texts]))


FAILED = [
    (Fault.error(400, message="input too long"), 400, "input too long"),
    (Fault.error(422, style="fastapi", message="bad item"), 400, "bad item"),
    (Fault.error(404, message="no such model"), 404, "no such model"),
    (Fault.error(401), 502, "refused the proxy's own key"),
    (Fault.error(403), 502, "refused the proxy's own key"),
    (Fault.insufficient_quota(), 429, "out of quota"),
    (Fault.nan(), 502, "NaN"),
    (Fault.wrong_dim(), 502, "unequal dimensions"),
    (Fault.all_wrong_dim(), 502, "embeddings"),
    (Fault.one_too_few(), 502, "expected 2 embeddings, got 1"),
    (Fault.duplicate_index(), 502, "appears twice"),
    (Fault.malformed_json(), 502, "not valid JSON"),
]


@pytest.mark.parametrize(("fault", "status", "fragment"), FAILED, ids=lambda x: getattr(x, "kind", str(x)))
def test_faults_answered_openai_shaped_and_nothing_bad_cached(proxy, upstream, fault, status, fragment):
    texts = [f"fail {fault.kind} {fault.status} {fault.style} a", f"fail {fault.kind} {fault.status} b"]
    upstream.push(fault)
    r = _post(proxy, texts)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and set(err) == {"message", "type", "param", "code"}
    again = _post(proxy, texts)  # the fault is spent: the next request gets true vectors, as misses
    assert again.status_code == 200 and again.headers["x-embedcache-misses"] == "2"
    np.testing.assert_array_equal(np.array(again.json()["data"][1]["embedding"], dtype=np.float32),
                                  expected_vector(texts[1], DIM))


def _rate_limited(proxy) -> float:
    for line in httpx.get(proxy.url + "/metrics").text.splitlines():
        if line.startswith("embedcache_proxy_upstream_rate_limited_total "):
            return float(line.split()[1])
    raise AssertionError("no rate-limited counter")


def test_still_rate_limited_after_retries_is_a_429_with_retry_after(proxy, upstream):
    seen = _rate_limited(proxy)
    upstream.push(Fault.error(429, retry_after="0"), Fault.error(429, retry_after="0"))
    r = _post(proxy, ["rate limited twice"])
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert "Retry-After" in r.headers
    assert _rate_limited(proxy) == seen + 2


@pytest.mark.parametrize(("fault", "status", "fragment"), [
    (Fault.drop(), 502, "lost the connection"),
    (Fault.slow(2.0), 504, "timed out"),
], ids=["dropped", "too-slow"])
def test_no_reply_from_the_upstream_is_a_502_or_a_504(upstream, tmp_path, fault, status, fragment):
    """A connection the upstream drops and a reply that does not come in time, retries spent."""
    with running_proxy(upstream.base_url, cache=str(tmp_path), max_retries=0, timeout=0.5) as p:
        upstream.push(fault)
        r = _post(p, [f"no reply {fault.kind}"])
        assert r.status_code == status, r.text
        assert fragment in r.json()["error"]["message"]
        assert _post(p, [f"no reply {fault.kind}"]).status_code == 200  # nothing bad kept


def test_a_wrong_upstream_key_never_reaches_a_client(upstream, tmp_path):
    wrong = "sk-wrong-upstream-key-98765"
    with running_proxy(upstream.base_url, cache=str(tmp_path), api_key=wrong, max_retries=0) as p:
        r = _post(p, ["key test"])  # the fake upstream echoes the key it got in its 401
        assert r.status_code == 502
        assert wrong not in r.text and "***" in r.text
        assert wrong not in httpx.get(p.url + "/metrics").text


def test_failed_batch_fails_every_request_waiting_on_it_then_recovers(upstream, tmp_path):
    import asyncio

    with running_proxy(upstream.base_url, cache=str(tmp_path), max_retries=0, max_concurrency=1) as p:
        upstream.push(Fault.slow(0.3))
        upstream.push(Fault.error(500))

        async def main():
            async with httpx.AsyncClient(base_url=p.base_url, timeout=30) as c:
                first = asyncio.ensure_future(c.post("/embeddings", json={"model": MODEL, "input": ["w0"]}))
                await asyncio.sleep(0.1)
                rest = [c.post("/embeddings", json={"model": MODEL, "input": ["w1", "w2"]}) for _ in range(3)]
                return await asyncio.gather(first, *rest)

        replies = asyncio.run(main())
        assert replies[0].status_code == 200
        assert [r.status_code for r in replies[1:]] == [502, 502, 502]
        assert _post(p, ["w1", "w2"]).status_code == 200


# ---------------------------------------------------------------------------- client keys


@pytest.fixture(scope="module")
def keyed(upstream, tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    keys = d / "keys.txt"
    keys.write_text(f"# team keys\nalice {CLIENT_KEY}\n\nbob-key-0123456789  # unnamed\n")
    with running_proxy(upstream.base_url, cache=str(d), keys=str(keys), client_rate=1, client_burst=2) as p:
        yield p


@pytest.mark.parametrize("auth", [None, "Bearer nope-nope-nope", f"Basic {CLIENT_KEY}", "Bearer", CLIENT_KEY])
def test_bad_client_keys_get_openai_shaped_401s(keyed, auth):
    headers = {} if auth is None else {"Authorization": auth}
    for r in (_post(keyed, ["x"], **headers), httpx.get(keyed.base_url + "/models", headers=headers)):
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert "nope" not in r.text


def test_openai_sdk_with_a_wrong_key_raises_authentication_error(keyed):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=keyed.base_url, api_key="wrong-key-123456", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.embeddings.create(model=MODEL, input=["x"])


def test_per_key_rate_and_names_in_metrics(keyed):
    codes = [_post(keyed, [f"rate {i}"], Authorization=f"Bearer {CLIENT_KEY}").status_code for i in range(4)]
    assert codes[:2] == [200, 200] and 429 in codes[2:]
    r = _post(keyed, ["bob"], Authorization="Bearer bob-key-0123456789")
    assert r.status_code == 200  # its own bucket
    text = httpx.get(keyed.url + "/metrics").text
    assert 'client="alice"' in text and 'client="key-' in text and "bob-key-0123456789" not in text
    assert CLIENT_KEY not in text


def test_keys_file_errors_are_one_line(tmp_path):
    from embedcache.errors import ConfigurationError
    from embedcache.server._keys import ClientKeys

    bad = tmp_path / "k.txt"
    bad.write_text("a b c\n")
    with pytest.raises(ConfigurationError, match="line 1: expected 'KEY' or 'NAME KEY'"):
        ClientKeys.from_file(bad)
    bad.write_text("# nothing\n")
    with pytest.raises(ConfigurationError, match="holds no key"):
        ClientKeys.from_file(bad)
    bad.write_text("short\n")
    with pytest.raises(ConfigurationError, match="at least 8"):
        ClientKeys.from_file(bad)


def test_cli_refuses_a_public_interface_without_keys(capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", UPSTREAM_KEY)
    assert main(["serve", "--upstream", "http://127.0.0.1:9/v1", "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to serve on 0.0.0.0 without client keys" in err


def test_cli_without_an_upstream_key(capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("IONOS_API_TOKEN", raising=False)
    assert main(["serve", "--upstream", "http://127.0.0.1:9/v1"]) == 1
    assert "no API key for the upstream 127.0.0.1" in capsys.readouterr().err


# ---------------------------------------------------------------------------- SIGKILL


def _start(upstream, cache_dir, port):
    env = dict(os.environ, OPENAI_API_KEY=UPSTREAM_KEY, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedcache.cli", "serve", "--upstream", upstream.base_url,
         "--port", str(port), "--cache-dir", cache_dir, "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.05)
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode())
    proc.kill()
    raise RuntimeError("the proxy did not start")


def _load(port, seconds):
    """Six clients send misses (and one shared item) until stopped; returns the stop event, the
    threads, and the list of (time answered, texts) they fill."""
    answered: list[tuple[float, list[str]]] = []
    lock, stop = threading.Lock(), threading.Event()

    def client(n):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=10) as c:
            for i in range(10_000):
                if stop.is_set():
                    return
                texts = [f"load {port} {n} {i} {j}" for j in range(16)] + [f"load {port} shared {i % 7}"]
                try:
                    r = c.post("/embeddings", json={"model": MODEL, "input": texts})
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    with lock:
                        answered.append((time.monotonic(), texts))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    return stop, threads, answered


def _cached(upstream, cache_dir, texts) -> list[bool]:
    """Whether the library finds each text in the cache (and the vector is the upstream's)."""
    emb = OpenAIEmbeddings(MODEL, base_url=upstream.base_url, api_key=UPSTREAM_KEY)
    with EmbeddingCache(cache_dir) as cache:
        keys = [EmbeddingCache.make_key(emb.cache_namespace, emb.model, emb.dimensions, t) for t in texts]
        got = cache.get_many(keys)
    for t, v in zip(texts, got):
        if v is not None:
            np.testing.assert_array_equal(v, expected_vector(t, DIM))
    return [v is not None for v in got]


#: a vector answered this long before a crash is committed (its write takes milliseconds; the
#: margin is for a machine busy with other work, and a WAL checkpoint)
COMMITTED_WITHIN = 1.5


@pytest.mark.slow
def test_sigkill_under_load_then_restart_serves_what_was_committed(upstream, tmp_path):
    cache_dir, port = str(tmp_path / "cache"), free_port()
    proc = _start(upstream, cache_dir, port)
    stop, threads, answered = _load(port, 3.0)
    proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    proc.wait(timeout=10)
    stop.set()
    for t in threads:
        t.join(timeout=20)
    # Writes run in the background: what was answered well before the kill is on disk; what
    # was answered in its last moments may not be (it is fetched again when next asked for).
    early = list(dict.fromkeys(t for when, texts in answered if when < killed - COMMITTED_WITHIN for t in texts))
    assert len(early) > 100
    proc2 = _start(upstream, cache_dir, port)
    try:
        before = len(upstream.embedding_requests)
        for start in range(0, len(early), 512):
            texts = early[start:start + 512]
            r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"model": MODEL, "input": texts},
                           timeout=30)
            assert r.headers["x-embedcache-misses"] == "0"
            got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
            np.testing.assert_array_equal(got, np.stack([expected_vector(t, DIM) for t in texts]))
        assert len(upstream.embedding_requests) == before
    finally:
        proc2.kill()
        proc2.wait(timeout=10)
    # and the library reads every entry that is there, none damaged (nothing half-written)
    everything = list(dict.fromkeys(t for _, texts in answered for t in texts))
    assert all(_cached(upstream, cache_dir, early))
    _cached(upstream, cache_dir, everything)


def _writer_of(proc):
    """The proxy's cache writer process (started with its first write)."""
    import psutil

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        children = psutil.Process(proc.pid).children()
        if children:
            assert len(children) == 1
            return children[0]
        time.sleep(0.05)
    raise AssertionError("the proxy started no cache writer")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_the_writer_process_ends_with_the_proxy_and_writes_every_row_handed_over(upstream, tmp_path, sig):
    """The proxy hands each vector to its writer process before it answers; when the proxy
    ends, however it ends, the writer writes what it was handed and exits (no orphan)."""
    import psutil

    cache_dir, port = str(tmp_path / "cache"), free_port()
    proc = _start(upstream, cache_dir, port)
    stop, threads, answered = _load(port, 1.0)
    writer = _writer_of(proc)
    assert writer.is_running()
    proc.send_signal(sig)
    proc.wait(timeout=30)
    stop.set()
    for t in threads:
        t.join(timeout=20)
    try:
        writer.wait(timeout=30)
    except psutil.TimeoutExpired:
        writer.kill()
        raise AssertionError("the cache writer outlived the proxy") from None
    everything = list(dict.fromkeys(t for _, texts in answered for t in texts))
    assert len(everything) > 50
    cached = _cached(upstream, cache_dir, everything)
    assert all(cached), f"{cached.count(False)} of {len(everything)} answered items not written"


def _metric(port, name) -> float:
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


@pytest.mark.slow
def test_sigterm_under_load_writes_everything_answered(upstream, tmp_path):
    cache_dir, port = str(tmp_path / "cache"), free_port()
    proc = _start(upstream, cache_dir, port)
    # Another process holds the cache's write lock (as a long write of the library would):
    # the proxy goes on answering, from memory, and its writes wait.
    other = sqlite3.connect(os.path.join(cache_dir, "cache.db"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        stop, threads, answered = _load(port, 1.5)
        assert _metric(port, "embedcache_proxy_pending_writes") > 0
        proc.send_signal(signal.SIGTERM)  # uvicorn finishes the requests under way, then the app flushes
        time.sleep(0.5)
        assert proc.poll() is None  # still waiting to write
    finally:
        other.rollback()
        other.close()
    # uvicorn re-raises the signal once it has shut down: the exit is by SIGTERM, not a crash
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert b"Traceback" not in proc.stderr.read()
    stop.set()
    for t in threads:
        t.join(timeout=20)
    everything = list(dict.fromkeys(t for _, texts in answered for t in texts))
    assert len(everything) > 100
    cached = _cached(upstream, cache_dir, everything)
    assert all(cached), f"{cached.count(False)} of {len(everything)} answered items not written"


# ---------------------------------------------------------------------------- the upstream client


@pytest.mark.parametrize("fault, wait", [
    (Fault.error(429, retry_after="0.25"), "0.25"),
    (Fault.error(503, retry_after_ms="150"), "0.15"),
    (Fault.error(502, style="text", retry_after="0.05"), "0.05"),
], ids=["429-retry-after", "503-retry-after-ms", "502-text"])
def test_retries_wait_what_the_upstream_asks(proxy, upstream, fault, wait, caplog):
    """The proxy's own HTTP client keeps the library's retry policy: the status is retried,
    after the wait the upstream asked for, and the second attempt's vectors are answered."""
    texts = [f"retry {fault.status} {wait} {i}" for i in range(2)]
    before = len(upstream.embedding_requests)
    upstream.push(fault)
    with caplog.at_level("INFO", logger="embedcache.providers._http"):
        r = _post(proxy, texts)
    assert r.status_code == 200, r.text
    assert any(f"retrying in {wait} s" in m for m in caplog.messages), caplog.messages
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, np.stack([expected_vector(t, DIM) for t in texts]))
    assert len(upstream.embedding_requests) - before == 2  # one refused, one answered


def test_an_upstream_that_is_not_there_is_a_502(tmp_path):
    with running_proxy(f"http://127.0.0.1:{free_port()}/v1", cache=str(tmp_path), max_retries=1) as p:
        r = _post(p, ["nobody home"])
        assert r.status_code == 502, r.text
        assert "failed to connect" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "upstream_error"


def test_a_batch_the_upstream_refuses_as_too_large_is_split(tmp_path):
    """A 413 teaches the embedder's limit; the proxy sends the parts within it."""
    with FakeEmbeddingServer(dimensions=DIM, api_key=UPSTREAM_KEY) as upstream, \
            running_proxy(upstream.base_url, cache=str(tmp_path), max_retries=0) as p:
        texts = [f"split {i}" for i in range(6)]
        before = len(upstream.embedding_requests)
        upstream.push(Fault.error(413, message="batch size 6 > maximum allowed batch size 4"))
        r = _post(p, texts)
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        np.testing.assert_array_equal(got, np.stack([expected_vector(t, DIM) for t in texts]))
        sizes = [len(q.body["input"]) for q in upstream.embedding_requests[before:]]
        assert sizes[0] == 6 and max(sizes[1:]) <= 4 and sum(sizes[1:]) == 6


def test_after_a_restart_a_reply_of_another_width_is_refused_never_cached(upstream, tmp_path):
    from embedcache import EmbeddingCache

    cache = str(tmp_path / "c")
    with running_proxy(upstream.base_url, cache=cache, max_retries=0) as p:
        assert _post(p, ["the first text"]).status_code == 200
    with running_proxy(upstream.base_url, cache=cache, max_retries=0) as p:  # knows the width from the cache
        upstream.push(Fault.all_wrong_dim())
        r = _post(p, ["a new text"])
        assert r.status_code == 502, r.text
        assert f"returned {DIM}-d embeddings before, {DIM + 1}-d now" in r.json()["error"]["message"]
        r = _post(p, ["a new text", "the first text"])  # the model still served
        assert r.status_code == 200, r.text
        assert [len(d["embedding"]) for d in r.json()["data"]] == [DIM, DIM]
    with EmbeddingCache(cache) as c:
        assert [n["vector_dimensions"] for n in c.info()["namespaces"]] == [DIM]
        assert c.info()["entries"] == 2
