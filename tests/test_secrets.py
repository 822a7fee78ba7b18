"""The API key never shows: not in exception text, log records, repr, or cache files."""

import asyncio
import logging
import pickle
import socket
import traceback

import numpy as np
import pytest

from embedcache import CachedEmbedder, EmbeddingCache
from embedcache.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    InvalidResponseError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
)
from embedcache.providers.openai import OpenAIEmbeddings
from embedcache.testing import Fault

SECRET = "sk-SECRET-7f3a9c1e5b2d4f6a8c0e"


@pytest.fixture
def server(fake_server):
    fake_server.api_key = SECRET
    return fake_server


def make(server, **kwargs):
    kwargs.setdefault("api_key", SECRET)
    return OpenAIEmbeddings("test-embed-small", base_url=server.base_url, requests_per_second=None,
                            sleep=lambda s: None, max_retries=1, timeout=0.5, **kwargs)


def all_text_of(exc: BaseException) -> str:
    """Everything an exception could print: message, repr, attributes, chained causes."""
    parts = ["".join(traceback.format_exception(exc)), repr(exc), repr(vars(exc))]
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts += [str(exc), repr(exc), repr(getattr(exc, "args", ()))]
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


ECHO = f"key {SECRET} is not allowed here"
FAULTS = [
    (Fault.error(400, message=ECHO), BadRequestError),
    (Fault.error(422, style="fastapi", message=ECHO), BadRequestError),
    (Fault.error(403, message=ECHO), PermissionDeniedError),
    (Fault.error(404, style="text", message=ECHO), NotFoundError),
    (Fault.error(429, message=ECHO, retry_after="0"), RateLimitError),
    (Fault.error(500, style="fastapi", message=ECHO), ServerError),
    (Fault.error(409, message=ECHO), APIStatusError),
    (Fault.drop(), APIConnectionError),
    (Fault.slow(5.0), APITimeoutError),
    (Fault.nan(), InvalidResponseError),
    (Fault.malformed_json(), InvalidResponseError),
]


@pytest.mark.parametrize("fault, exc_type", FAULTS, ids=lambda x: getattr(x, "kind", None) or x.__name__)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_no_key_in_any_error_or_log(server, caplog, fault, exc_type, mode):
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "embedcache"):
        caplog.set_level(logging.DEBUG, logger=name)
    server.push(*[fault] * 2)
    emb = make(server)
    with pytest.raises(exc_type) as info:
        if mode == "sync":
            emb.embed(["a", "b"])
        else:
            asyncio.run(emb.aembed(["a", "b"]))
    emb.close()
    assert SECRET not in all_text_of(info.value)
    assert caplog.records, "expected DEBUG records from httpx/httpcore"
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert SECRET not in repr(record.args)
    assert SECRET not in caplog.text


def test_server_echoing_a_wrong_key_is_redacted(server, caplog):
    caplog.set_level(logging.DEBUG)
    server.api_key = "the-right-key"  # the server answers: "Incorrect API key provided: <ours>"
    emb = make(server)
    for call in (lambda: emb.embed(["a"]), emb.list_models):
        with pytest.raises(AuthenticationError) as info:
            call()
        assert "Incorrect API key provided: ***" in str(info.value)
        assert SECRET not in all_text_of(info.value)
    assert SECRET not in caplog.text


def test_connection_refused_and_bad_key_settings(caplog):
    caplog.set_level(logging.DEBUG)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    emb = OpenAIEmbeddings("m", base_url=f"http://127.0.0.1:{port}/v1", api_key=SECRET,
                           max_retries=1, sleep=lambda s: None)
    with pytest.raises(APIConnectionError) as info:
        emb.embed(["a"])
    assert SECRET not in all_text_of(info.value)
    with pytest.raises(ConfigurationError) as info:
        OpenAIEmbeddings("m", api_key=SECRET + "\n")
    assert SECRET not in all_text_of(info.value)
    assert SECRET not in caplog.text


def test_no_key_in_repr_or_pickle(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)  # what a loopback server takes
    for emb in (make(server), make(server, api_key=None)):
        emb.embed(["warm up the client"])
        for text in (repr(emb), str(emb), repr(vars(emb)), emb.cache_namespace):
            assert SECRET not in text
        with pytest.raises(Exception) as info:
            pickle.dumps(emb)
        assert SECRET not in all_text_of(info.value)
        emb.close()


def test_no_key_in_any_cache_file(server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    directory = tmp_path / "cache"
    with EmbeddingCache(directory) as cache:
        emb = CachedEmbedder(make(server, batch_size=2), cache=cache)
        X = emb.embed([f"text {i}" for i in range(7)], progress=False)
        assert emb.embed([f"text {i}" for i in range(7)], progress=False).tobytes() == X.tobytes()
        server.push(Fault.error(401, message=ECHO))
        with pytest.raises(APIError):
            emb.embed(["a new text"], progress=False)
        assert SECRET not in repr(emb) and SECRET not in repr(cache.info())
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert files, "the cache wrote no files"
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    assert np.isfinite(X).all()
    assert SECRET not in caplog.text


def _answer(status, **kwargs):
    """An embedder whose server always answers ``httpx.Response(status, **kwargs)``."""
    import httpx

    return lambda key: OpenAIEmbeddings(
        "m", api_key=key, requests_per_second=None, max_retries=0,
        transport=httpx.MockTransport(lambda r: httpx.Response(status, **kwargs)))


QUOTED = 'sk-"quoted\\key-9b8d7c6e5f4a'


@pytest.mark.parametrize(
    "key, make_emb",
    [
        # the key crosses the point where a long message is cut
        (SECRET, _answer(400, text="x" * 480 + SECRET + " is not allowed")),
        (SECRET, _answer(400, json={"error": {"message": "y" * 490 + SECRET}})),
        # a body of no known shape is shown as JSON, which escapes quotes and backslashes
        (QUOTED, _answer(400, json={"unexpected": f"echo {QUOTED}"})),
        (QUOTED, _answer(400, json={"error": {"message": f"echo {QUOTED}"}})),
        # a server that cut the key short itself
        (SECRET, _answer(401, text=f"Incorrect API key provided: {SECRET[:14]}***")),
        (SECRET, _answer(401, json={"detail": f"bad key {SECRET[:9]}… (shortened)"})),
        (SECRET, _answer(302, headers={"Location": f"https://elsewhere/{SECRET[:10]}"})),
    ],
    ids=["text-cut", "message-cut", "json-fallback", "json-message", "text-shortened",
         "detail-shortened", "location-shortened"],
)
def test_no_part_of_the_key_in_long_escaped_or_shortened_echoes(key, make_emb):
    with pytest.raises(APIError) as info:
        make_emb(key).embed(["a"])
    text = all_text_of(info.value)
    assert "***" in str(info.value)
    for form in (key, key.replace("\\", "\\\\").replace('"', '\\"')):
        assert form[:8] not in text
    assert len(info.value.message or "") <= 503


@pytest.mark.parametrize("key", ["k", "none", "EMPTY", "sk-no-key-required"])
@pytest.mark.parametrize(
    "fault",
    [
        Fault.error(413, style="text", message="inputs must have less than 512 tokens. Given: 600"),
        Fault.error(500, message="backend error: none of the workers is ready"),
        Fault.error(400, style="fastapi", message="input is EMPTY; sk-no-key-required is fine"),
    ],
    ids=["tei-413", "backend-500", "fastapi-400"],
)
def test_a_short_or_placeholder_key_leaves_server_messages_whole(fake_server, key, fault):
    fake_server.api_key = None  # a local server: any key will do
    fake_server.push(fault)
    emb = OpenAIEmbeddings("test-embed-small", base_url=fake_server.base_url, api_key=key,
                           requests_per_second=None, max_retries=0)
    with pytest.raises(APIStatusError) as info:
        emb.embed(["a"])
    emb.close()
    assert info.value.message == fault.message
    assert str(info.value).endswith(f": {fault.message}")


def test_only_the_key_is_removed_not_words_that_share_its_first_characters(fake_server):
    key = "sk-proj-7f3a9c1e5b2d4f6a8c0e"
    fake_server.api_key = None
    message = (f"sk-proj-keys of other projects are refused; got {key}, "
               f"shown as {key[:12]}… and {key[:10]}*** and embedded{key}")
    fake_server.push(Fault.error(403, message=message))
    with pytest.raises(PermissionDeniedError) as info:
        make(fake_server, api_key=key).embed(["a"])
    assert info.value.message == (
        "sk-proj-keys of other projects are refused; got ***, shown as ***… and ****** and embedded***"
    )
    assert key[:9] not in all_text_of(info.value)
