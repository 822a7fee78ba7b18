"""Client for any OpenAI-compatible ``/embeddings`` endpoint (IONOS AI Model Hub by default).

What it does for you:

* splits the texts into batches of at most ``batch_size`` texts and ``max_batch_chars``
  characters (a single longer text goes alone);
* keeps up to ``max_concurrency`` requests in flight (threads for :meth:`~OpenAIEmbeddings.embed`,
  tasks for :meth:`~OpenAIEmbeddings.aembed`) under a token bucket of ``requests_per_second``
  with room for ``burst`` requests at once;
* retries connection errors, timeouts, 408, 409, 429 and 5xx up to ``max_retries`` times with
  exponential backoff and full jitter, or exactly the server's ``retry-after-ms`` /
  ``Retry-After`` (seconds or an HTTP date) when it sends one;
* maps error statuses to the typed exceptions of :mod:`embedcache.errors`, carrying the status
  and the server's own message, whether the body is OpenAI-style ``{"error": {"message": ...}}``
  or FastAPI-style ``{"detail": ...}``;
* checks every reply before anyone sees it: one vector per input, placed by ``data[i].index``
  (a permutation of the batch positions), equal dimensions, finite values, and the requested
  ``dimensions``; anything else raises :class:`~embedcache.errors.InvalidResponseError` and
  is never handed to ``on_batch`` (so never cached);
* reads base64 (little-endian float32) and plain float-list replies alike.

The API key never appears in ``repr``, exception text or log records: it is kept in a
wrapper that hides it, and removed from any server message that echoes it. A key shorter than
8 characters, or a placeholder that local servers document (``"EMPTY"``, ``"none"``,
``"sk-no-key-required"``...), is no secret and is left in messages, so that a dummy key such as
``"k"`` does not mangle every word that contains it.

A 429 whose body says ``insufficient_quota`` (OpenAI: no credit left) is a billing limit, not a
rate limit: it raises :class:`~embedcache.errors.QuotaExceededError` at once, without retries.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import email.utils
import inspect
import json
import logging
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx
import numpy as np
import tenacity

from embedcache.errors import (
    APIConnectionError,
    APIError,
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
from embedcache.providers.base import BatchCallback, Usage, check_int, validate_texts

__all__ = ["DEFAULT_BASE_URL", "OpenAIEmbeddings", "TokenBucket"]

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://openai.inference.de-txl.ionos.com/v1"
_KEY_ENV_VARS = ("IONOS_API_TOKEN", "OPENAI_API_KEY")
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


class _Secret:
    """Holds the API key; every textual form of it is masked."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("the API key cannot be pickled")


def _is_secret(key: str) -> bool:
    return len(key) >= _MIN_SECRET and key.lower() not in _PLACEHOLDER_KEYS


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


def _resolve_key(api_key: str | None) -> _Secret | None:
    if api_key is None:
        for name in _KEY_ENV_VARS:
            value = os.environ.get(name, "").strip()
            if value:
                api_key = value
                break
        else:
            return None
    if not isinstance(api_key, str):
        raise ConfigurationError(f"api_key must be a str, got {type(api_key).__name__}")
    if not api_key or not all(33 <= ord(c) <= 126 for c in api_key):
        # Never echo the value: it may be a real key with a stray newline.
        raise ConfigurationError(
            "api_key must be a non-empty string of printable ASCII characters without spaces"
        )
    return _Secret(api_key)


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidInputTypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0:
        raise InvalidInputError(f"{name} must be > 0, got {value}")
    return float(value)


def _parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asks us to wait, from ``retry-after-ms`` or ``Retry-After``."""
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
        value = when.timestamp() - time.time()
        return max(0.0, value)
    return value if math.isfinite(value) and value >= 0 else None


def _server_message(response: httpx.Response) -> str:
    """The server's own explanation, from OpenAI-, FastAPI- or plain-style bodies (whole:
    the caller removes the key, then cuts it short)."""
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


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, APIConnectionError):  # includes timeouts
        return True
    if isinstance(exc, QuotaExceededError):  # waiting brings no credit
        return False
    if isinstance(exc, APIStatusError):
        return exc.status_code in _RETRYABLE_STATUS or (exc.status_code or 0) >= 500
    return False


def _decode_vector(embedding: object, where: str) -> np.ndarray:
    if isinstance(embedding, str):
        try:
            raw = base64.b64decode(embedding, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidResponseError(f"{where}: embedding is not valid base64") from None
        if len(raw) % 4:
            raise InvalidResponseError(
                f"{where}: base64 embedding has {len(raw)} bytes, expected a multiple of 4 (float32)"
            )
        return np.frombuffer(raw, dtype="<f4")
    if isinstance(embedding, list):
        try:
            arr = np.array(embedding)
        except (ValueError, TypeError, OverflowError):  # ragged nesting, e.g. [0.1, [0.2, 0.3]]
            raise InvalidResponseError(
                f"{where}: embedding must be a flat list of numbers, got a ragged nested list"
            ) from None
        if arr.ndim != 1 or arr.dtype.kind not in "fiu":
            raise InvalidResponseError(
                f"{where}: embedding must be a flat list of numbers, got array of dtype "
                f"{arr.dtype} and shape {arr.shape}"
            )
        with np.errstate(over="ignore"):
            return arr.astype(np.float32)
    raise InvalidResponseError(
        f"{where}: embedding must be a base64 string or a list of numbers, "
        f"got {type(embedding).__name__}"
    )


class _TrackedStream(httpcore.NetworkStream):
    """A network stream that :meth:`_AbortableBackend.abort` can cut from another thread."""

    def __init__(self, inner: httpcore.NetworkStream, backend: _AbortableBackend) -> None:
        self._inner = inner
        backend._track(self)

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
    thread blocked reading it; shutting it down does)."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()
        self._streams: weakref.WeakSet[_TrackedStream] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._aborted = False

    def _track(self, stream: _TrackedStream) -> None:
        stream._backend = self
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


def _abortable_transport(limits: httpx.Limits) -> tuple[httpx.HTTPTransport, _AbortableBackend | None]:
    """httpx's default transport, on a backend whose connections :meth:`~_AbortableBackend.abort`
    can cut (``None`` when this httpx/httpcore version does not let us plug it in)."""
    transport = httpx.HTTPTransport(limits=limits)
    pool = getattr(transport, "_pool", None)
    if isinstance(pool, httpcore.ConnectionPool) and isinstance(
        getattr(pool, "_network_backend", None), httpcore.NetworkBackend
    ):
        backend = _AbortableBackend()
        pool._network_backend = backend
        return transport, backend
    return transport, None


class OpenAIEmbeddings:
    """Embeddings from any OpenAI-compatible endpoint; see the module docstring for the contract.

    model: model id as the server knows it (``.list_models()`` lists them).
    base_url: endpoint root, ending before ``/embeddings``. Defaults to the IONOS AI Model Hub.
    api_key: defaults to ``$IONOS_API_TOKEN``, else ``$OPENAI_API_KEY``; without one, any
        request raises :class:`~embedcache.errors.ConfigurationError`.
    dimensions: ask the model for shorter vectors (models that support it); ``None`` = native.
    batch_size, max_batch_chars: largest batch by count and by total characters.
    max_concurrency: requests in flight at once (and HTTP connections kept).
    requests_per_second, burst: client-side rate limit (``None`` = unlimited); per instance.
    max_retries: retries after the first attempt for retryable failures.
    timeout: seconds for connect, read, write and pool waits of one request.
    encoding_format: ``"base64"`` (compact) or ``"float"``; either reply is accepted.
    transport, async_transport: httpx transports (e.g. ``httpx.MockTransport``) for tests.
    sleep: called with the seconds to wait between retries instead of sleeping (for tests);
        may return an awaitable in :meth:`aembed`.

    >>> emb = OpenAIEmbeddings("BAAI/bge-m3", api_key="sk-example")
    >>> emb
    OpenAIEmbeddings(model='BAAI/bge-m3', base_url='https://openai.inference.de-txl.ionos.com/v1')
    >>> emb.cache_namespace
    'openai|openai.inference.de-txl.ionos.com/v1|BAAI/bge-m3|native'
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        dimensions: int | None = None,
        batch_size: int = 128,
        max_batch_chars: int = 200_000,
        max_concurrency: int = 8,
        requests_per_second: float | None = 5.0,
        burst: int = 10,
        max_retries: int = 6,
        timeout: float = 60.0,
        encoding_format: str = "base64",
        transport: httpx.BaseTransport | None = None,
        async_transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        if not isinstance(model, str) or not model.strip():
            raise InvalidInputError(f"model must be a non-empty string, got {model!r}")
        if not isinstance(base_url, str):
            raise InvalidInputTypeError(f"base_url must be a str, got {type(base_url).__name__}")
        url = httpx.URL(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigurationError(
                f"base_url must be an http(s) URL such as {DEFAULT_BASE_URL!r}, got {base_url!r}"
            )
        if url.userinfo:
            raise ConfigurationError("base_url must not contain credentials; pass api_key instead")
        if dimensions is not None:
            dimensions = check_int("dimensions", dimensions, 1)
        if encoding_format not in ("base64", "float"):
            raise ConfigurationError(
                f"encoding_format must be 'base64' or 'float', got {encoding_format!r}"
            )
        self.model = model
        self.base_url = str(url)
        self.dimensions: int | None = dimensions
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.max_batch_chars = check_int("max_batch_chars", max_batch_chars, 1)
        self.max_concurrency = check_int("max_concurrency", max_concurrency, 1)
        self.max_retries = check_int("max_retries", max_retries, 0)
        self.timeout = _check_positive("timeout", timeout)
        self.encoding_format = encoding_format
        burst = check_int("burst", burst, 1)
        if requests_per_second is None or requests_per_second == math.inf:
            self._bucket: TokenBucket | None = None
        else:
            self._bucket = TokenBucket(_check_positive("requests_per_second", requests_per_second), burst)
        self.requests_per_second = None if self._bucket is None else self._bucket.rate
        self.burst = burst
        self._key = _resolve_key(api_key)
        self._transport = transport
        self._async_transport = async_transport
        self._sleep = sleep
        hostpath = f"{url.host}{':' + str(url.port) if url.port else ''}{url.path}".rstrip("/")
        self.cache_namespace = (
            f"openai|{hostpath}|{model}|{dimensions if dimensions is not None else 'native'}"
        )
        self.usage = Usage()
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._backend: _AbortableBackend | None = None
        self._stops: set[threading.Event] = set()  # one per sync call under way
        self._executor: ThreadPoolExecutor | None = None
        self._aclient: httpx.AsyncClient | None = None
        self._aclient_loop: asyncio.AbstractEventLoop | None = None
        self._seen_dim: int | None = dimensions

    def __repr__(self) -> str:
        return f"OpenAIEmbeddings(model={self.model!r}, base_url={self.base_url!r})"

    # ------------------------------------------------------------------ plumbing

    def _headers(self) -> dict[str, str]:
        if self._key is None:
            raise ConfigurationError(
                "no API key: pass api_key=... or set IONOS_API_TOKEN or OPENAI_API_KEY"
            )
        return {
            "Authorization": f"Bearer {self._key.reveal()}",
            "Accept": "application/json",
            "User-Agent": "embedcache",
        }

    def _limits(self) -> httpx.Limits:
        return httpx.Limits(
            max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
        )

    def _get_client(self, stop: threading.Event, what: str) -> httpx.Client:
        with self._lock:
            if stop.is_set():  # checked under the lock close() takes: no client after close
                raise self._cancelled(what)
            if self._client is None:
                limits = self._limits()
                transport, backend = self._transport, None
                if transport is None:
                    transport, backend = _abortable_transport(limits)
                self._client = httpx.Client(
                    base_url=self.base_url,
                    headers=self._headers(),
                    timeout=self.timeout,
                    limits=limits,
                    transport=transport,
                )
                self._backend = backend
            return self._client

    @contextmanager
    def _call(self) -> Iterator[threading.Event]:
        """A stop event for one sync call: set by :meth:`close`, and when the call ends (so
        work the call no longer waits for makes no further attempt)."""
        stop = threading.Event()
        with self._lock:
            self._stops.add(stop)
        try:
            yield stop
        finally:
            stop.set()
            with self._lock:
                self._stops.discard(stop)

    @staticmethod
    def _cancelled(what: str) -> APIConnectionError:
        return APIConnectionError(f"{what} was cancelled: the embedder was closed or the call ended")

    def _get_executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self.max_concurrency, thread_name_prefix="embedcache-http"
                )
            return self._executor

    def _get_aclient(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aclient_loop is not loop:
            # An AsyncClient is bound to the loop it first ran in; a new loop needs a new one.
            self._aclient = httpx.AsyncClient(
                base_url=self.base_url,
                headers=self._headers(),
                timeout=self.timeout,
                limits=self._limits(),
                transport=self._async_transport,
            )
            self._aclient_loop = loop
        return self._aclient

    def _redact(self, text: str) -> str:
        """``text`` without the key: as is, JSON-escaped, or its head cut short (>= 8 chars).
        A key that is no secret (:func:`_is_secret`) is left, not to mangle words."""
        key = self._key.reveal() if self._key is not None else ""
        if _is_secret(key):
            for form in dict.fromkeys((key, json.dumps(key)[1:-1])):
                text = _remove_key(text, form)
        return text

    def _map_request_error(self, exc: httpx.RequestError, what: str) -> APIError:
        detail = f"{type(exc).__name__}: {self._redact(str(exc))}".rstrip(": ")
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(f"{what} timed out (timeout={self.timeout:g} s): {detail}")
        if isinstance(exc, httpx.DecodingError):  # e.g. a corrupt gzip body: retried like a drop
            return APIConnectionError(f"{what}: the reply could not be decoded: {detail}")
        return APIConnectionError(f"{what} failed to connect or lost the connection: {detail}")

    def _check_status(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status < 300:
            return
        if status < 400:
            location = _clip(self._redact(response.headers.get("location", "?")))
            raise APIStatusError(
                f"{what} -> {status} redirect to {location}; set base_url to the final URL",
                status_code=status,
            )
        message = _clip(self._redact(_server_message(response)))
        cls, why = _status_error_class(status), ""
        if status == 429 and _is_out_of_quota(response):
            cls, why = QuotaExceededError, (
                "out of quota: a billing limit, not a rate limit, so it is not retried; "
                "add credit or raise the limit: "
            )
        err = cls(f"{what} -> {status} {response.reason_phrase}: {why}{message}", status_code=status)
        err.message = message
        err.retry_after = _parse_retry_after(response.headers)  # type: ignore[attr-defined]
        raise err

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(float(retry_after), _MAX_RETRY_AFTER)
        return self._backoff(state)

    _backoff = tenacity.wait_random_exponential(multiplier=_BACKOFF_INITIAL, max=_BACKOFF_MAX)

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait_s = state.next_action.sleep if state.next_action is not None else 0.0
        logger.info(
            "retrying in %.2f s (attempt %d of %d): %s",
            wait_s, state.attempt_number + 1, self.max_retries + 1, exc,
        )

    def _retry_kwargs(self) -> dict[str, Any]:
        return dict(
            stop=tenacity.stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=tenacity.retry_if_exception(_is_retryable),
            before_sleep=self._before_sleep,
            reraise=True,
        )

    def _retrying(self, stop: threading.Event) -> tenacity.Retrying:
        kwargs = self._retry_kwargs()
        kwargs["stop"] = kwargs["stop"] | tenacity.stop_when_event_set(stop)
        kwargs["sleep"] = self._sleep if self._sleep is not None else stop.wait
        return tenacity.Retrying(**kwargs)

    def _aretrying(self) -> tenacity.AsyncRetrying:
        kwargs = self._retry_kwargs()
        if self._sleep is not None:
            user_sleep = self._sleep

            async def _sleep(seconds: float) -> None:
                result = user_sleep(seconds)
                if inspect.isawaitable(result):
                    await result

            kwargs["sleep"] = _sleep
        return tenacity.AsyncRetrying(**kwargs)

    def _body(self, batch: list[str]) -> bytes:
        payload: dict[str, Any] = {
            "model": self.model,
            "input": batch,
            "encoding_format": self.encoding_format,
        }
        if self.dimensions is not None:
            payload["dimensions"] = self.dimensions
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")

    def _parse_embeddings(self, response: httpx.Response, n: int) -> np.ndarray:
        """Validate one /embeddings reply for a batch of ``n`` texts; (n, d) float32."""
        what = "POST /embeddings"
        try:
            body = json.loads(response.content)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidResponseError(
                f"{what} -> {response.status_code}: reply is not valid JSON ({exc})",
                status_code=response.status_code,
            ) from None
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise InvalidResponseError(f"{what}: reply has no 'data' list")
        if len(data) != n:
            raise InvalidResponseError(f"{what}: expected {n} embeddings, got {len(data)}")
        rows: list[np.ndarray | None] = [None] * n
        for k, item in enumerate(data):
            if not isinstance(item, dict):
                raise InvalidResponseError(f"{what}: data[{k}] must be an object, got {type(item).__name__}")
            idx = item.get("index")
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < n:
                raise InvalidResponseError(f"{what}: data[{k}].index must be an int in [0, {n}), got {idx!r}")
            if rows[idx] is not None:
                raise InvalidResponseError(f"{what}: index {idx} appears twice; indexes must be a permutation")
            rows[idx] = _decode_vector(item.get("embedding"), f"{what}: data[{k}]")
        dims = {r.shape[0] for r in rows}  # type: ignore[union-attr]
        if len(dims) != 1:
            raise InvalidResponseError(f"{what}: embeddings of unequal dimensions {sorted(dims)}")
        (dim,) = dims
        if dim == 0:
            raise InvalidResponseError(f"{what}: embeddings are empty")
        if self.dimensions is not None and dim != self.dimensions:
            raise InvalidResponseError(
                f"{what}: requested dimensions={self.dimensions}, got {dim}-d embeddings"
            )
        out = np.stack(rows).astype(np.float32, copy=False)  # type: ignore[arg-type]
        if not np.isfinite(out).all():
            bad = int(np.nonzero(~np.isfinite(out).all(axis=1))[0][0])
            raise InvalidResponseError(f"{what}: embedding {bad} has NaN or infinite values")
        with self._lock:
            if self._seen_dim is None:
                self._seen_dim = dim
            elif dim != self._seen_dim:
                raise InvalidResponseError(
                    f"{what}: model {self.model!r} returned {self._seen_dim}-d embeddings before, "
                    f"{dim}-d now"
                )
        usage = body.get("usage")
        tokens = 0
        if isinstance(usage, dict):
            t = usage.get("total_tokens", usage.get("prompt_tokens"))
            if isinstance(t, int) and not isinstance(t, bool) and t >= 0:
                tokens = t
        self.usage.add(tokens=tokens)
        return out

    def _parse_models(self, response: httpx.Response) -> list[str]:
        try:
            body = json.loads(response.content)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise InvalidResponseError("GET /models: reply is not valid JSON") from None
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or not all(
            isinstance(m, dict) and isinstance(m.get("id"), str) for m in data
        ):
            raise InvalidResponseError("GET /models: expected {'data': [{'id': str}, ...]}")
        return [m["id"] for m in data]

    def _plan(self, texts: list[str]) -> list[tuple[int, int]]:
        """Consecutive ``(start, stop)`` slices within the count and character limits."""
        batches = []
        start, chars = 0, 0
        for i, t in enumerate(texts):
            if i > start and (i - start >= self.batch_size or chars + len(t) > self.max_batch_chars):
                batches.append((start, i))
                start, chars = i, 0
            chars += len(t)
        batches.append((start, len(texts)))
        return batches

    # ------------------------------------------------------------------ sync

    def _request(
        self, method: str, path: str, stop: threading.Event, content: bytes | None = None
    ) -> httpx.Response:
        what = f"{method} {path}"
        if self._bucket is not None:
            delay = self._bucket.reserve()
            if delay > 0 and stop.wait(delay):
                raise self._cancelled(what)
        client = self._get_client(stop, what)
        self.usage.add(requests=1)
        try:
            if content is None:
                response = client.request(method, path)
            else:
                response = client.request(
                    method, path, content=content, headers={"Content-Type": "application/json"}
                )
        except (httpx.RequestError, RuntimeError) as exc:  # RuntimeError: client closed meanwhile
            if stop.is_set():
                raise self._cancelled(what) from None
            if not isinstance(exc, httpx.RequestError):
                raise
            raise self._map_request_error(exc, what) from None
        self._check_status(response, what)
        return response

    def _embed_batch(self, batch: list[str], stop: threading.Event) -> np.ndarray:
        body = self._body(batch)
        return self._retrying(stop)(
            lambda: self._parse_embeddings(
                self._request("POST", "/embeddings", stop, body), len(batch)
            )
        )

    def embed(self, texts: Sequence[str], *, on_batch: BatchCallback | None = None) -> np.ndarray:
        """Embed ``texts``: array of shape (n, d), float32, rows in input order.

        ``on_batch(positions, vectors)`` is called in the calling thread as each batch
        arrives (in completion order), with validated vectors only.

        When the call ends early (an error, ``KeyboardInterrupt``), batches still under way in
        worker threads make no further attempt or retry; :meth:`close` also cuts the requests
        they are waiting on.
        """
        items = validate_texts(texts)
        self._headers()  # no key: fail before any work
        with self._call() as stop:
            return self._embed(items, on_batch, stop)

    def _embed(
        self, items: list[str], on_batch: BatchCallback | None, halt: threading.Event
    ) -> np.ndarray:
        plan = self._plan(items)
        out: np.ndarray | None = None

        def accept(start: int, stop: int, vectors: np.ndarray) -> None:
            nonlocal out
            if out is None:
                out = np.empty((len(items), vectors.shape[1]), dtype=np.float32)
            out[start:stop] = vectors
            if on_batch is not None:
                on_batch(np.arange(start, stop, dtype=np.int64), vectors)

        if len(plan) == 1 or self.max_concurrency == 1:
            for start, stop in plan:
                accept(start, stop, self._embed_batch(items[start:stop], halt))
            assert out is not None
            return out

        executor = self._get_executor()
        pending: dict[Future, tuple[int, int]] = {}
        todo = iter(plan)

        def submit(start: int, stop: int) -> None:
            # a copy of the caller's context: the batch's usage counts toward the caller's meters
            run = contextvars.copy_context().run
            pending[executor.submit(run, self._embed_batch, items[start:stop], halt)] = (start, stop)

        try:
            # Keep at most max_concurrency batches submitted, so a failure stops the rest.
            for start, stop in todo:
                submit(start, stop)
                if len(pending) >= self.max_concurrency:
                    break
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    start, stop = pending.pop(fut)
                    if fut.cancelled():  # close() from another thread
                        raise self._cancelled("POST /embeddings")
                    accept(start, stop, fut.result())
                    nxt = next(todo, None)
                    if nxt is not None:
                        submit(*nxt)
        finally:
            for fut in pending:
                fut.cancel()
        assert out is not None
        return out

    def list_models(self) -> list[str]:
        """Model ids the server offers (``GET /models``)."""
        self._headers()
        with self._call() as halt:
            return self._retrying(halt)(
                lambda: self._parse_models(self._request("GET", "/models", halt))
            )

    def close(self) -> None:
        """Stop every sync call under way and close connections and worker threads (the async
        client: see :meth:`aclose`).

        Safe to call from another thread, or from a ``KeyboardInterrupt`` handler, while
        :meth:`embed` runs: requests under way are cut at once (their connections are shut
        down), nothing is attempted or retried after that, and the interrupted ``embed``
        raises :class:`~embedcache.errors.APIConnectionError`. It does not wait for the
        worker threads; they end as soon as their cut request returns. The object stays
        usable: a later call opens new connections.
        """
        with self._lock:
            for halt in self._stops:
                halt.set()
            client, self._client = self._client, None
            backend, self._backend = self._backend, None
            executor, self._executor = self._executor, None
        if backend is not None:
            backend.abort()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        if client is not None:
            client.close()

    def __enter__(self) -> OpenAIEmbeddings:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ async

    async def _arequest(self, method: str, path: str, content: bytes | None = None) -> httpx.Response:
        client = self._get_aclient()
        what = f"{method} {path}"
        if self._bucket is not None:
            delay = self._bucket.reserve()
            if delay > 0:
                await asyncio.sleep(delay)
        self.usage.add(requests=1)
        try:
            if content is None:
                response = await client.request(method, path)
            else:
                response = await client.request(
                    method, path, content=content, headers={"Content-Type": "application/json"}
                )
        except httpx.RequestError as exc:
            raise self._map_request_error(exc, what) from None
        self._check_status(response, what)
        return response

    async def _aembed_batch(self, batch: list[str], gate: asyncio.Semaphore) -> np.ndarray:
        body = self._body(batch)

        async def attempt() -> np.ndarray:
            async with gate:
                response = await self._arequest("POST", "/embeddings", body)
            return self._parse_embeddings(response, len(batch))

        return await self._aretrying()(attempt)

    async def aembed(
        self, texts: Sequence[str], *, on_batch: BatchCallback | None = None
    ) -> np.ndarray:
        """Async form of :meth:`embed`, for callers inside an event loop."""
        items = validate_texts(texts)
        self._headers()
        plan = self._plan(items)
        gate = asyncio.Semaphore(self.max_concurrency)

        async def run(start: int, stop: int) -> tuple[int, int, np.ndarray]:
            return start, stop, await self._aembed_batch(items[start:stop], gate)

        tasks = [asyncio.ensure_future(run(start, stop)) for start, stop in plan]
        out: np.ndarray | None = None
        try:
            for next_done in asyncio.as_completed(tasks):
                start, stop, vectors = await next_done
                if out is None:
                    out = np.empty((len(items), vectors.shape[1]), dtype=np.float32)
                out[start:stop] = vectors
                if on_batch is not None:
                    on_batch(np.arange(start, stop, dtype=np.int64), vectors)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert out is not None
        return out

    async def alist_models(self) -> list[str]:
        """Async form of :meth:`list_models`."""

        async def attempt() -> list[str]:
            return self._parse_models(await self._arequest("GET", "/models"))

        return await self._aretrying()(attempt)

    async def aclose(self) -> None:
        """Close the async client (and the sync one)."""
        aclient, self._aclient, self._aclient_loop = self._aclient, None, None
        if aclient is not None:
            await aclient.aclose()
        self.close()

    async def __aenter__(self) -> OpenAIEmbeddings:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

