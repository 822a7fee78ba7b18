"""The HTTP plumbing of embedcache.providers._http, on its own: the abortable transport on a real
loopback socket, Retry-After and error-body parsing, the mapping to typed errors, redaction."""

import email.utils
import socket
import threading
import time

import httpx
import pytest

from embedcache.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    ServerError,
)
from embedcache.providers._http import (
    AbortableTransport,
    Secret,
    request_error,
    retry_after,
    server_message,
    status_error,
)
from embedcache.testing import FakeEmbeddingServer

# ---------------------------------------------------------------- transport


@pytest.fixture
def silent_server():
    """A loopback socket that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for conn in accepted:
        conn.close()


def test_transport_round_trip_on_a_real_server():
    with FakeEmbeddingServer(dimensions=4, api_key="test-key") as server:
        transport = AbortableTransport(httpx.Limits(max_connections=2))
        with httpx.Client(base_url=server.base_url, transport=transport,
                          headers={"Authorization": "Bearer test-key"}) as client:
            for _ in range(3):  # the connection is kept and reused
                reply = client.post("/embeddings", json={"model": "test-embed-small", "input": ["a", "b"],
                                                         "encoding_format": "float"})
                assert reply.status_code == 200 and len(reply.json()["data"]) == 2
            assert client.get("/models").json()["data"][0]["id"] == "test-embed-small"
            assert client.get("/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert server.requests[0].body["input"] == ["a", "b"]


def test_abort_ends_requests_under_way_in_other_threads_at_once(silent_server):
    transport = AbortableTransport(httpx.Limits(max_connections=4))
    client = httpx.Client(base_url=silent_server, transport=transport, timeout=30)
    errors = []

    def call():
        try:
            client.get("/slow")
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # all three are connected and waiting for a reply
    started = time.monotonic()
    transport.abort()
    for t in threads:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in threads)
    assert time.monotonic() - started < 2
    assert len(errors) == 3 and all(isinstance(e, httpx.TransportError) for e in errors), errors
    # once aborted, a new request is cut too (close() is what follows an abort)
    with pytest.raises(httpx.TransportError):
        client.get("/again")
    client.close()


def test_transport_errors_are_httpx_errors(silent_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with httpx.Client(transport=AbortableTransport(httpx.Limits())) as client:
        with pytest.raises(httpx.ConnectError):
            client.get(f"http://127.0.0.1:{closed}/")
        with pytest.raises(httpx.ReadTimeout):
            client.get(silent_server, timeout=0.2)


# ---------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    "headers, seconds",
    [
        ({"Retry-After": "2"}, 2.0),
        ({"Retry-After": "0.5"}, 0.5),
        ({"retry-after-ms": "1500", "Retry-After": "9"}, 1.5),
        ({"retry-after-ms": "junk", "Retry-After": "3"}, 3.0),
        ({"retry-after-ms": "-5", "Retry-After": "3"}, 3.0),
        ({"Retry-After": "-1"}, None),
        ({"Retry-After": "inf"}, None),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers, seconds):
    assert retry_after(httpx.Headers(headers)) == seconds


def test_retry_after_http_date():
    ahead = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after(httpx.Headers({"Retry-After": ahead})) <= 31
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert retry_after(httpx.Headers({"Retry-After": past})) == 0.0


# ---------------------------------------------------------------- error bodies and typed errors


@pytest.mark.parametrize(
    "response, message",
    [
        (httpx.Response(400, json={"error": {"message": "bad input", "code": 1}}), "bad input"),
        (httpx.Response(400, json={"error": "plain error"}), "plain error"),
        (httpx.Response(422, json={"detail": "not here"}), "not here"),
        (httpx.Response(422, json={"detail": [{"loc": ["body", "input", 0], "msg": "too long"}, "other"]}),
         "body.input.0: too long; other"),
        (httpx.Response(500, json={"message": "boom"}), "boom"),
        (httpx.Response(500, json=[1, 2]), "[1, 2]"),
        (httpx.Response(502, text="  Bad Gateway from nginx \n"), "Bad Gateway from nginx"),
        (httpx.Response(503, content=b""), "Service Unavailable"),
    ],
)
def test_server_message(response, message):
    assert server_message(response) == message


@pytest.mark.parametrize(
    "status, cls",
    [(400, BadRequestError), (422, BadRequestError), (401, AuthenticationError), (403, PermissionDeniedError),
     (404, NotFoundError), (429, RateLimitError), (500, ServerError), (503, ServerError), (409, APIStatusError)],
)
def test_status_errors_are_typed(status, cls):
    err = status_error(httpx.Response(status, json={"error": {"message": "why"}}, headers={"Retry-After": "4"}),
                       "POST /embeddings", None)
    assert type(err) is cls and err.status_code == status and err.message == "why"
    assert err.retry_after == 4.0
    assert str(err).startswith(f"POST /embeddings -> {status} ") and str(err).endswith(": why")


def test_success_is_no_error_and_a_redirect_names_its_target():
    assert status_error(httpx.Response(200), "GET /models", None) is None
    key = Secret("sk-secret-redirect-0123")
    err = status_error(httpx.Response(302, headers={"Location": "https://x.example/?k=sk-secret-redirect-0123"}),
                       "GET /models", key)
    assert type(err) is APIStatusError and "x.example/?k=***" in str(err) and "set base_url" in str(err)


def test_out_of_quota_is_not_a_rate_limit():
    body = {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota"}}
    err = status_error(httpx.Response(429, json=body), "POST /embeddings", None)
    assert isinstance(err, QuotaExceededError) and isinstance(err, RateLimitError)
    assert "not retried" in str(err)


def test_messages_are_cut_short_after_the_key_is_removed():
    key = Secret("sk-secret-long-0123456789")
    err = status_error(httpx.Response(400, text="sk-secret-long-0123456789 " + "x" * 2000),
                       "POST /embeddings", key)
    assert err.message.startswith("*** xxx") and err.message.endswith("...") and len(err.message) == 503


def test_request_errors_are_typed_without_the_key():
    key = Secret("sk-secret-in-url-0123")
    request = httpx.Request("GET", "http://x.example/")
    timeout = request_error(httpx.ReadTimeout("timed out", request=request), "GET /models", 2.5, key)
    assert isinstance(timeout, APITimeoutError) and "timeout=2.5 s" in str(timeout)
    dropped = request_error(httpx.RemoteProtocolError("peer closed sk-secret-in-url-0123", request=request),
                            "POST /embeddings", 60, key)
    assert type(dropped) is APIConnectionError and "sk-secret" not in str(dropped)
    assert "lost the connection" in str(dropped)
    garbled = request_error(httpx.DecodingError("bad gzip", request=request), "POST /embeddings", 60, None)
    assert "could not be decoded" in str(garbled)


# ---------------------------------------------------------------- the key


def test_secret_never_shows_and_redacts_its_forms():
    key = Secret('sk-abc"def/0123456789')
    assert repr(key) == str(key) == f"{key!r:s}" == "'***'"
    assert key.redact('got sk-abc\\"def/0123456789 and sk-abc"def/0123456789') == "got *** and ***"
    with pytest.raises(TypeError, match="cannot be pickled"):
        key.__reduce__()
    # no secret: a short key, or a placeholder local servers document
    assert Secret("k").redact("keep k words") == "keep k words"
    assert Secret("sk-no-key-required").redact("sk-no-key-required") == "sk-no-key-required"
