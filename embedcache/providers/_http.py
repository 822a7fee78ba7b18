"""HTTP plumbing of the API clients: what any JSON-over-HTTP client needs, nothing about
embeddings.

* :class:`Secret` holds an API key and removes it from any text (:meth:`Secret.redact`);
* :class:`TokenBucket`, the client-side requests-per-second limit;
* :func:`retry_after` reads ``retry-after-ms`` / ``Retry-After``; :func:`server_message` the
  server's explanation from OpenAI-, FastAPI- or plain-style error bodies;
* :func:`status_error` and :func:`request_error` map a reply or a failed request to the typed
  exceptions of :mod:`embedcache.errors`, without the key;
* :class:`RetryPolicy`: which failures are retried, how long to wait (exponential backoff with
  full jitter, or exactly what the server asks), for sync and async callers alike;
* :class:`AbortableTransport`: an httpx transport whose requests under way in other threads
  :meth:`~AbortableTransport.abort` ends at once.
"""

from __future__ import annotations

import email.utils
import inspect
import json
import logging
import math
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpcore
import httpx
import tenacity

from embedcache.errors import (
    APIConnectionError,
    APIError,
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

__all__ = [
    "AbortableTransport",
    "RetryPolicy",
    "Secret",
    "TokenBucket",
    "request_error",
    "retry_after",
    "server_message",
    "status_error",
]

logger = logging.getLogger(__name__)

_RETRYABLE_STATUS = frozenset({408, 409, 429})
#: a server asking us to wait longer than this is waited for this long, then retried
_MAX_RETRY_AFTER = 60.0
_BACKOFF_INITIAL = 0.5
_BACKOFF_MAX = 20.0
#: longest server message kept in an exception (cut after the key is removed)
_MAX_MESSAGE = 500
#: a key shorter than this is no secret (local servers take any word); a run at least this long
#: that begins the key (a key cut short by a server) is removed like the key itself
_MIN_SECRET = 8
#: keys that local servers' docs tell users to pass; they are no secret either (any case)
_PLACEHOLDER_KEYS = frozenset(
    {"dummy", "empty", "lm-studio", "no-key", "none", "not-needed", "null", "ollama",
     "sk-no-key-required", "token-abc123"}
)


# ---------------------------------------------------------------------- the key


class Secret:
    """Holds an API key; every textual form of it is masked, and it refuses to be pickled.

    A key shorter than 8 characters, or a placeholder that local servers document
    (``"EMPTY"``, ``"none"``, ``"sk-no-key-required"``...), is no secret: :meth:`redact` leaves
    it, so that a dummy key such as ``"k"`` does not mangle every word that contains it.

    >>> key = Secret("sk-abcdefgh12345")
    >>> key, key.redact('bad key "sk-abcdefgh12345"')
    ('***', 'bad key "***"')
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def redact(self, text: str) -> str:
        """``text`` without the key: as is, JSON-escaped, or its head cut short (>= 8 chars)."""
        key = self._value
        if len(key) >= _MIN_SECRET and key.lower() not in _PLACEHOLDER_KEYS:
            for form in dict.fromkeys((key, json.dumps(key)[1:-1])):
                text = _remove_key(text, form)
        return text

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("the API key cannot be pickled")


def redact(text: str, key: Secret | None) -> str:
    """``text`` without ``key`` (as it is when there is no key)."""
    return text if key is None else key.redact(text)


def _inside_token(text: str, i: int) -> bool:
    """Whether position ``i`` of ``text`` lies between two characters of a key-like token
    (letters, digits, ``_`` and ``-``, as in ``sk-proj-...``)."""
    return 0 < i < len(text) and all(c.isalnum() or c in "_-" for c in text[i - 1 : i + 1])


def _remove_key(text: str, key: str) -> str:
    """``text`` with ``key`` replaced by ``***`` wherever it occurs, and so is any run of at least
    ``_MIN_SECRET`` characters that begins ``key`` (a key cut short by a server) where it
    stands as a token of its own (see :func:`_inside_token`), so that another key or a word that
    merely starts like this one is kept.

    >>> _remove_key("got sk-abcdefgh12345 and sk-abcdefg… and sk-ab", "sk-abcdefgh12345")
    'got *** and ***… and sk-ab'
    >>> _remove_key("sk-abcdefgXYZ is not it; xsk-abcdefgh1", "sk-abcdefgh12345")
    'sk-abcdefgXYZ is not it; xsk-abcdefgh1'
    """
    text = text.replace(key, "***")
    head = key[:_MIN_SECRET]
    parts, pos = [], 0
    i = text.find(head)
    while i != -1:
        j = i + len(head)
        while j < len(text) and j - i < len(key) and text[j] == key[j - i]:
            j += 1
        if _inside_token(text, i) or _inside_token(text, j):
            i = text.find(head, i + 1)
            continue
        parts += [text[pos:i], "***"]
        pos = j
        i = text.find(head, j)
    parts.append(text[pos:])
    return "".join(parts)


def _clip(text: str, limit: int = _MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------- rate limit


class TokenBucket:
    """Thread-safe token bucket: ``rate`` tokens per second, at most ``burst`` saved up.

    :meth:`reserve` takes one token and returns how long the caller must wait before using
    it (0.0 when one was available). Reservations queue up: the tenth caller in a burst
    of ten beyond the limit waits ten intervals. ``clock`` is injectable for tests.

    >>> clock = iter([0.0, 0.0, 0.0, 0.0]).__next__
    >>> bucket = TokenBucket(rate=2.0, burst=2, clock=clock)
    >>> [bucket.reserve() for _ in range(4)]
    [0.0, 0.0, 0.5, 1.0]
    """

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic):
        self.rate = float(rate)
        self.burst = int(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last: float | None = None
        self._lock = threading.Lock()

    def reserve(self) -> float:
        with self._lock:
            now = self._clock()
            if self._last is not None:
                self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1.0
            return 0.0 if self._tokens >= 0.0 else -self._tokens / self.rate


# ---------------------------------------------------------------------- replies and errors


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asks us to wait, from ``retry-after-ms`` or ``Retry-After`` (seconds
    or an HTTP date); ``None`` when it says nothing usable.

    >>> retry_after(httpx.Headers({"retry-after-ms": "1500", "Retry-After": "9"}))
    1.5
    >>> retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    True
    """
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        return max(0.0, when.timestamp() - time.time())
    return value if math.isfinite(value) and value >= 0 else None


def server_message(response: httpx.Response) -> str:
    """The server's own explanation, from OpenAI-, FastAPI- or plain-style bodies (whole:
    the caller removes the key, then cuts it short).

    >>> server_message(httpx.Response(422, json={"detail": [{"loc": ["body", "input"], "msg": "bad"}]}))
    'body.input: bad'
    """
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError, RecursionError):
        text = response.text.strip()
        return text if text else response.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str) and err:
            return err
        detail = body.get("detail")
        if isinstance(detail, str) and detail:
            return detail
        if isinstance(detail, list) and detail:  # FastAPI validation errors
            parts = []
            for item in detail:
                if isinstance(item, dict):
                    loc = ".".join(str(p) for p in item.get("loc", []) or [])
                    msg = str(item.get("msg", item))
                    parts.append(f"{loc}: {msg}" if loc else msg)
                else:
                    parts.append(str(item))
            return "; ".join(parts)
        if body.get("message"):
            return str(body["message"])
    return json.dumps(body)


def _is_out_of_quota(response: httpx.Response) -> bool:
    """Whether an error reply is OpenAI's ``insufficient_quota`` (no credit left)."""
    try:
        err = response.json().get("error")
    except (ValueError, UnicodeDecodeError, RecursionError, AttributeError):
        return False
    return isinstance(err, dict) and "insufficient_quota" in (err.get("code"), err.get("type"))


def _status_error_class(status: int) -> type[APIStatusError]:
    if status in (400, 422):
        return BadRequestError
    if status == 401:
        return AuthenticationError
    if status == 403:
        return PermissionDeniedError
    if status == 404:
        return NotFoundError
    if status == 429:
        return RateLimitError
    if status >= 500:
        return ServerError
    return APIStatusError


def status_error(response: httpx.Response, what: str, key: Secret | None) -> APIStatusError | None:
    """The typed error a reply of status 300 or more stands for (``None`` below 300), with the
    server's message (without the key) and the wait it asks for in ``retry_after``.

    A 429 whose body says ``insufficient_quota`` (OpenAI: no credit left) is a billing limit,
    not a rate limit: :class:`~embedcache.errors.QuotaExceededError`, never retried.
    """
    status = response.status_code
    if status < 300:
        return None
    if status < 400:
        location = _clip(redact(response.headers.get("location", "?"), key))
        return APIStatusError(
            f"{what} -> {status} redirect to {location}; set base_url to the final URL",
            status_code=status,
        )
    message = _clip(redact(server_message(response), key))
    cls, why = _status_error_class(status), ""
    if status == 429 and _is_out_of_quota(response):
        cls, why = QuotaExceededError, (
            "out of quota: a billing limit, not a rate limit, so it is not retried; "
            "add credit or raise the limit: "
        )
    err = cls(f"{what} -> {status} {response.reason_phrase}: {why}{message}", status_code=status)
    err.message = message
    err.retry_after = retry_after(response.headers)  # type: ignore[attr-defined]
    return err


def request_error(exc: httpx.RequestError, what: str, timeout: float, key: Secret | None) -> APIError:
    """The typed error for a request that got no reply (or an unreadable one)."""
    detail = f"{type(exc).__name__}: {redact(str(exc), key)}".rstrip(": ")
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"{what} timed out (timeout={timeout:g} s): {detail}")
    if isinstance(exc, httpx.DecodingError):  # e.g. a corrupt gzip body: retried like a drop
        return APIConnectionError(f"{what}: the reply could not be decoded: {detail}")
    return APIConnectionError(f"{what} failed to connect or lost the connection: {detail}")


def cancelled(what: str) -> APIConnectionError:
    return APIConnectionError(f"{what} was cancelled: the embedder was closed or the call ended")


# ---------------------------------------------------------------------- retries

T = TypeVar("T")


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, APIConnectionError):  # includes timeouts
        return True
    if isinstance(exc, QuotaExceededError):  # waiting brings no credit
        return False
    if isinstance(exc, APIStatusError):
        return exc.status_code in _RETRYABLE_STATUS or (exc.status_code or 0) >= 500
    return False


class RetryPolicy:
    """Retries connection errors, timeouts, 408, 409, 429 and 5xx up to ``max_retries`` times,
    waiting what the server asks (``retry_after`` of the error, at most 60 s) or else an
    exponential backoff with full jitter. ``sleep`` replaces the waits (for tests); in async
    code it may return an awaitable."""

    _backoff = tenacity.wait_random_exponential(multiplier=_BACKOFF_INITIAL, max=_BACKOFF_MAX)

    def __init__(self, max_retries: int, sleep: Callable[[float], object] | None = None) -> None:
        self.max_retries = max_retries
        self.sleep = sleep

    async def arun(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """``await attempt()`` under the policy, the first attempt outside the retry machinery
        (most pass at once); one that fails retryably is handed to :meth:`aretrying` as its own
        first attempt: the same attempts, waits and log lines as if it had run there."""
        try:
            return await attempt()
        except Exception as exc:
            if self.max_retries <= 0 or not _is_retryable(exc):
                raise
            first: Exception | None = exc

        async def retried() -> T:
            nonlocal first
            if first is not None:
                failed, first = first, None
                raise failed
            return await attempt()

        return await self.aretrying()(retried)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait_s = getattr(exc, "retry_after", None)
        if wait_s is not None:
            return min(float(wait_s), _MAX_RETRY_AFTER)
        return self._backoff(state)

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait_s = state.next_action.sleep if state.next_action is not None else 0.0
        logger.info(
            "retrying in %.2f s (attempt %d of %d): %s",
            wait_s, state.attempt_number + 1, self.max_retries + 1, exc,
        )

    def _kwargs(self) -> dict[str, Any]:
        return dict(
            stop=tenacity.stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=tenacity.retry_if_exception(_is_retryable),
            before_sleep=self._before_sleep,
            reraise=True,
        )

    def retrying(self, stop: threading.Event) -> tenacity.Retrying:
        """For a sync call: no attempt after ``stop`` is set, and a wait ends when it is."""
        kwargs = self._kwargs()
        kwargs["stop"] = kwargs["stop"] | tenacity.stop_when_event_set(stop)
        kwargs["sleep"] = self.sleep if self.sleep is not None else stop.wait
        return tenacity.Retrying(**kwargs)

    def aretrying(self) -> tenacity.AsyncRetrying:
        """For an async call (cancelled like any task)."""
        kwargs = self._kwargs()
        if self.sleep is not None:
            user_sleep = self.sleep

            async def _sleep(seconds: float) -> None:
                result = user_sleep(seconds)
                if inspect.isawaitable(result):
                    await result

            kwargs["sleep"] = _sleep
        return tenacity.AsyncRetrying(**kwargs)


# ---------------------------------------------------------------------- transport


class _TrackedStream(httpcore.NetworkStream):
    """A network stream that :meth:`_AbortableBackend.abort` can cut from another thread."""

    def __init__(self, inner: httpcore.NetworkStream, backend: _AbortableBackend) -> None:
        self._inner = inner
        self._backend = backend
        backend.track(self)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        # TLS takes over the socket: track the new stream, which owns it now
        return _TrackedStream(self._inner.start_tls(ssl_context, server_hostname, timeout),
                              self._backend)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)

    def abort(self) -> None:
        sock = self._inner.get_extra_info("socket")
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading it
            except OSError:
                pass


class _AbortableBackend(httpcore.NetworkBackend):
    """httpcore's blocking backend, remembering its connections so that :meth:`abort` can
    end requests under way in other threads at once (closing a socket does not wake a
    thread blocked reading it; shutting it down does). Once aborted, a connection made later
    is cut as soon as it opens."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()
        self._streams: weakref.WeakSet[_TrackedStream] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._aborted = False

    def track(self, stream: _TrackedStream) -> None:
        with self._lock:
            self._streams.add(stream)
            aborted = self._aborted
        if aborted:
            stream.abort()

    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        return _TrackedStream(self._inner.connect_tcp(*args, **kwargs), self)

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        return _TrackedStream(self._inner.connect_unix_socket(*args, **kwargs), self)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            streams = list(self._streams)
        for stream in streams:
            stream.abort()


#: httpcore's exceptions and the httpx ones they stand for, most specific first
_HTTPCORE_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for core, mapped in _HTTPCORE_ERRORS:
            if isinstance(exc, core):
                raise mapped(str(exc)) from exc
        raise


class _ResponseStream(httpx.SyncByteStream):
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx_errors():
            yield from self._stream

    def close(self) -> None:
        if hasattr(self._stream, "close"):
            self._stream.close()


class AbortableTransport(httpx.BaseTransport):
    """HTTP/1.1 over httpcore's ``ConnectionPool``, on a network backend of our own that
    remembers its sockets: :meth:`abort`, from any thread, ends every request under way at
    once (they raise :class:`httpx.ReadError` or the like) and every later one. Certificates
    are checked as httpx does by default (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` honoured).

    Pass it to ``httpx.Client(transport=...)``; it uses only the public APIs of httpx
    (``BaseTransport``, ``SyncByteStream``) and httpcore (``ConnectionPool``,
    ``NetworkBackend``, ``NetworkStream``).
    """

    def __init__(self, limits: httpx.Limits) -> None:
        self._backend = _AbortableBackend()
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=self._backend,
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _as_httpx_errors():
            response = self._pool.handle_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    def abort(self) -> None:
        """End the requests under way (and any later one) at once; thread-safe."""
        self._backend.abort()

    def close(self) -> None:
        self._pool.close()
