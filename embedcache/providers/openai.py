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

The API key comes from ``api_key``, else from the environment, scoped to its host:
``IONOS_API_TOKEN`` is sent only to the IONOS AI Model Hub (``https://`` + :data:`IONOS_HOST`),
which also takes ``OPENAI_API_KEY`` when no IONOS token is set; any other host takes
``OPENAI_API_KEY`` only (as the OpenAI SDK does). ``key_source`` says which one was used. The
key never appears in ``repr``, exception text or log records: it is kept in a wrapper that
hides it, and removed from any server message that echoes it. A key shorter than 8 characters,
or a placeholder that local servers document (``"EMPTY"``, ``"none"``,
``"sk-no-key-required"``...), is no secret and is left in messages, so that a dummy key such as
``"k"`` does not mangle every word that contains it.

The IONOS limit (5 requests per second, burst 10) is the default rate limit for the IONOS host
only; other hosts are not throttled unless ``requests_per_second`` is set.

The HTTP plumbing (transport, retries, error mapping, key redaction, rate limit) lives in
:mod:`embedcache.providers._http`, the reading of replies in :mod:`embedcache.providers._reply`.
The sync and async paths share request building, reply handling and result storing; only the
sending differs (threads and a transport that :meth:`OpenAIEmbeddings.close` can cut, or tasks).

A batch the server refuses as too large (a 413, as text-embeddings-inference answers above
32 inputs; a 400 ``max_tokens_per_request``, as OpenAI answers above 300,000 tokens) is split
and its parts sent; the limit learned (the one the server states, else half the batch) is
remembered for that server and said once in a log warning (:mod:`embedcache.providers._limits`).
Until a server has answered one batch, a call sends its first batch alone, so that a limit
costs one refusal, not one per batch in flight.

``input_window`` is what the model reads (:mod:`embedcache.providers._window`):
``max_input_tokens``, else the window of a known model, else an assumption said once; tokens
are counted with ``tokenizer`` (a ``tokenizer.json``) when given, else estimated, and the
estimate is calibrated against the ``usage`` the server reports.

A 429 whose body says ``insufficient_quota`` (OpenAI: no credit left) is a billing limit, not a
rate limit: it raises :class:`~embedcache.errors.QuotaExceededError` at once, without retries.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import math
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple, Protocol

import httpx
import numpy as np

from embedcache._validation import check_int, check_positive
from embedcache.errors import (
    APIStatusError,
    ConfigurationError,
    InvalidInputError,
    InvalidInputTypeError,
    InvalidResponseError,
)
from embedcache.providers._http import (
    AbortableTransport,
    RetryPolicy,
    Secret,
    TokenBucket,
    cancelled,
    redact,
    request_error,
    status_error,
)
from embedcache.providers._limits import limits_for, refusal
from embedcache.providers._reply import parse_embeddings, parse_models
from embedcache.providers._window import EstimateCounter, ExactCounter, InputWindow, resolve_window
from embedcache.providers.base import BatchCallback, Usage, validate_texts

__all__ = ["DEFAULT_BASE_URL", "IONOS_HOST", "OpenAIEmbeddings", "TokenBucket"]

#: the IONOS AI Model Hub, the only host ``IONOS_API_TOKEN`` is sent to (over https)
IONOS_HOST = "openai.inference.de-txl.ionos.com"
DEFAULT_BASE_URL = f"https://{IONOS_HOST}/v1"
#: the IONOS contract: 5 requests per second, bursts of 10 (the default for the IONOS host only)
IONOS_REQUESTS_PER_SECOND = 5.0


def is_ionos(url: httpx.URL | str) -> bool:
    """Whether ``url`` is the IONOS AI Model Hub (https, its host exactly).

    >>> is_ionos(DEFAULT_BASE_URL), is_ionos("http://127.0.0.1:8000/v1")
    (True, False)
    """
    url = httpx.URL(url)
    return url.scheme == "https" and url.host == IONOS_HOST


def key_sources(url: httpx.URL | str) -> tuple[str, ...]:
    """The environment variables a key for ``url`` is read from, in order.

    >>> key_sources(DEFAULT_BASE_URL), key_sources("https://api.openai.com/v1")
    (('IONOS_API_TOKEN', 'OPENAI_API_KEY'), ('OPENAI_API_KEY',))
    """
    return ("IONOS_API_TOKEN", "OPENAI_API_KEY") if is_ionos(url) else ("OPENAI_API_KEY",)


def _resolve_key(api_key: object, sources: tuple[str, ...]) -> tuple[Secret | None, str | None]:
    """The key and where it came from: ``"api_key"`` (the argument) or an environment variable."""
    source = "api_key"
    if api_key is None:
        for name in sources:
            value = os.environ.get(name, "").strip()
            if value:
                api_key, source = value, name
                break
        else:
            return None, None
    if not isinstance(api_key, str):
        raise ConfigurationError(f"api_key must be a str, got {type(api_key).__name__}")
    if not api_key or not all(33 <= ord(c) <= 126 for c in api_key):
        # Never echo the value: it may be a real key with a stray newline.
        raise ConfigurationError(
            "api_key must be a non-empty string of printable ASCII characters without spaces"
        )
    return Secret(api_key), source


try:  # a request body in a few microseconds (the server extra brings it)
    import orjson

    def _dumps(payload: dict[str, Any]) -> bytes:
        try:
            return orjson.dumps(payload)
        except TypeError:  # what orjson refuses (a lone surrogate...): the stdlib's says why
            return json.dumps(payload, ensure_ascii=False).encode("utf-8")
except ImportError:  # pragma: no cover - the stdlib's alone
    def _dumps(payload: dict[str, Any]) -> bytes:
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")


class Reply(Protocol):
    """What the embedder reads of a reply: :class:`httpx.Response` has it, and so may a
    lighter object for replies below 300 (see :meth:`OpenAIEmbeddings.aembed_batch`)."""

    @property
    def status_code(self) -> int: ...

    @property
    def content(self) -> bytes: ...


class _Request(NamedTuple):
    """One request as both clients send it."""

    method: str
    path: str
    content: bytes | None = None

    @property
    def what(self) -> str:
        return f"{self.method} {self.path}"

    def send_args(self) -> dict[str, Any]:
        if self.content is None:
            return {"method": self.method, "url": self.path}
        return {"method": self.method, "url": self.path, "content": self.content,
                "headers": {"Content-Type": "application/json"}}


_MODELS = _Request("GET", "/models")


class _Results:
    """The (n, d) output of one embed call, filled batch by batch in whatever order batches
    arrive; each batch goes to ``on_batch`` as it is stored."""

    def __init__(self, n: int, on_batch: BatchCallback | None) -> None:
        self._n = n
        self._on_batch = on_batch
        self._out: np.ndarray | None = None

    def store(self, start: int, stop: int, vectors: np.ndarray) -> None:
        if self._out is None:
            self._out = np.empty((self._n, vectors.shape[1]), dtype=np.float32)
        self._out[start:stop] = vectors
        if self._on_batch is not None:
            self._on_batch(np.arange(start, stop, dtype=np.int64), vectors)

    def array(self) -> np.ndarray:
        assert self._out is not None
        return self._out


class OpenAIEmbeddings:
    """Embeddings from any OpenAI-compatible endpoint; see the module docstring for the contract.

    model: model id as the server knows it (``.list_models()`` lists them).
    base_url: endpoint root, ending before ``/embeddings``. Defaults to the IONOS AI Model Hub.
    api_key: defaults to ``$IONOS_API_TOKEN`` (IONOS host only), else ``$OPENAI_API_KEY``;
        without one, any request raises :class:`~embedcache.errors.ConfigurationError`.
        ``key_source`` tells which was used (``"api_key"``, the variable's name, or ``None``).
    dimensions: ask the model for shorter vectors (models that support it); ``None`` = native.
    batch_size, max_batch_chars: largest batch by count and by total characters.
    max_concurrency: requests in flight at once (and HTTP connections kept).
    requests_per_second, burst: client-side rate limit, per instance. ``"auto"``: the IONOS
        limit (5/s, burst 10) for the IONOS host, none for other hosts; ``None`` = unlimited.
    max_retries: retries after the first attempt for retryable failures.
    timeout: seconds for connect, read, write and pool waits of one request.
    encoding_format: ``"base64"`` (compact) or ``"float"``; either reply is accepted.
    transport, async_transport: httpx transports (e.g. ``httpx.MockTransport``) for tests.
    sleep: called with the seconds to wait between retries instead of sleeping (for tests);
        may return an awaitable in :meth:`aembed`.
    max_input_tokens: the model's input window in tokens; default: known for the models of
        :data:`~embedcache.providers._window.KNOWN_WINDOWS`, else assumed (and said once).
    tokenizer: path of the model's ``tokenizer.json`` (or a directory holding it), to count
        tokens exactly; default: a conservative estimate.

    >>> emb = OpenAIEmbeddings("BAAI/bge-m3", api_key="sk-example")
    >>> emb
    OpenAIEmbeddings(model='BAAI/bge-m3', base_url='https://openai.inference.de-txl.ionos.com/v1')
    >>> emb.cache_namespace
    'openai|openai.inference.de-txl.ionos.com/v1|BAAI/bge-m3|native'
    >>> emb.requests_per_second, OpenAIEmbeddings("m", base_url="http://127.0.0.1:8000/v1").requests_per_second
    (5.0, None)
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
        requests_per_second: float | Literal["auto"] | None = "auto",
        burst: int = 10,
        max_retries: int = 6,
        timeout: float = 60.0,
        encoding_format: str = "base64",
        transport: httpx.BaseTransport | None = None,
        async_transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], object] | None = None,
        max_input_tokens: int | None = None,
        tokenizer: str | os.PathLike[str] | None = None,
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
        if url.query or url.fragment:  # a key there would be shown in messages and kept in stores
            shown = str(url.copy_with(query=None, fragment=None))
            raise ConfigurationError(f"base_url must not carry a query string or fragment (got {shown}?…); "
                                     "pass a key as api_key instead")
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
        self.timeout = check_positive("timeout", timeout)
        self.encoding_format = encoding_format
        self.burst = check_int("burst", burst, 1)
        if isinstance(requests_per_second, str) and requests_per_second == "auto":
            requests_per_second = IONOS_REQUESTS_PER_SECOND if is_ionos(url) else None
        rate = None if requests_per_second is None else check_positive("requests_per_second", requests_per_second)
        self._bucket = None if rate is None or rate == math.inf else TokenBucket(rate, self.burst)
        self.requests_per_second = None if self._bucket is None else self._bucket.rate
        self._key_sources = key_sources(url)
        self._key, self.key_source = _resolve_key(api_key, self._key_sources)
        self._transport = transport
        self._async_transport = async_transport
        self._retry = RetryPolicy(self.max_retries, sleep)
        hostpath = f"{url.host}{':' + str(url.port) if url.port else ''}{url.path}".rstrip("/")
        self.cache_namespace = (
            f"openai|{hostpath}|{model}|{dimensions if dimensions is not None else 'native'}"
        )
        self.usage = Usage()
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._abortable: AbortableTransport | None = None
        self._stops: set[threading.Event] = set()  # one per sync call under way
        self._executor: ThreadPoolExecutor | None = None
        self._aclient: httpx.AsyncClient | None = None
        self._aclient_loop: asyncio.AbstractEventLoop | None = None
        self._seen_dim: int | None = dimensions
        self.max_input_tokens = None if max_input_tokens is None else check_int(
            "max_input_tokens", max_input_tokens, 4)
        self._tokenizer = ExactCounter.from_file(tokenizer) if tokenizer is not None else None
        self._window: InputWindow | None = None
        self._estimate = EstimateCounter()  # plans batches under a learned token limit
        self._limits = limits_for(f"{self.base_url}|{model}")

    def __repr__(self) -> str:
        return f"OpenAIEmbeddings(model={self.model!r}, base_url={self.base_url!r})"

    # ------------------------------------------------------------------ shared by sync and async

    def _headers(self) -> dict[str, str]:
        if self._key is None:
            if len(self._key_sources) > 1:
                raise ConfigurationError(
                    "no API key: pass api_key=... or set IONOS_API_TOKEN or OPENAI_API_KEY"
                )
            raise ConfigurationError(
                f"no API key for {httpx.URL(self.base_url).host}: pass api_key=... or set "
                f"OPENAI_API_KEY (IONOS_API_TOKEN is sent only to {IONOS_HOST}; a server that "
                'takes any key: api_key="none")'
            )
        return {
            "Authorization": f"Bearer {self._key.reveal()}",
            "Accept": "application/json",
            "User-Agent": "embedcache",
        }

    def _client_settings(self) -> dict[str, Any]:
        limits = httpx.Limits(
            max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
        )
        return dict(base_url=self.base_url, headers=self._headers(), timeout=self.timeout, limits=limits)

    @property
    def input_window(self) -> InputWindow:
        """The model's input window and how tokens are counted (resolved on first use)."""
        if self._window is None:
            counter = self._tokenizer if self._tokenizer is not None else self._estimate
            self._window = resolve_window(self.model, setting=self.max_input_tokens, counter=counter)
        return self._window

    def _token_estimates(self, texts: Sequence[str]) -> np.ndarray:
        counter = self._window.counter if self._window is not None else self._estimate
        return counter.counts(texts) + counter.specials

    def plan(self, texts: list[str]) -> list[tuple[int, int]]:
        """Consecutive ``(start, stop)`` slices of ``texts`` within :attr:`batch_size`,
        :attr:`max_batch_chars` and the limits learned for this server."""
        return self._limits.plan(texts, self.batch_size, self.max_batch_chars, self._token_estimates)

    def _split_refused(self, exc: APIStatusError, batch: list[str]) -> list[list[str]] | None:
        """The parts to send instead of ``batch``, which the server refused with ``exc``;
        ``None`` when it is not a refusal of the batch's size, or the batch is one text."""
        kind = refusal(exc.status_code, getattr(exc, "message", "") or str(exc))
        if kind is None or len(batch) < 2:
            return None
        tokens = int(self._token_estimates(batch).sum()) if kind[0] == "tokens" else 0
        self._limits.learn(kind[0], kind[1], len(batch), tokens, exc.status_code or 0)
        plan = self.plan(batch)
        if len(plan) == 1:  # the learned limits do not split it: halves
            plan = [(0, len(batch) // 2), (len(batch) // 2, len(batch))]
        return [batch[a:b] for a, b in plan]

    def _calibrate(self, batch: list[str], reported: int) -> None:
        """Grow the token estimate when the server counted more (once a window is in use)."""
        window = self._window
        if window is not None and reported > 0 and isinstance(window.counter, EstimateCounter):
            estimated = int(self._token_estimates(batch).sum())
            window.counter.calibrate(estimated, reported, where=self.base_url)

    def _embeddings_request(self, batch: list[str]) -> _Request:
        payload: dict[str, Any] = {
            "model": self.model,
            "input": batch,
            "encoding_format": self.encoding_format,
        }
        if self.dimensions is not None:
            payload["dimensions"] = self.dimensions
        return _Request("POST", "/embeddings", _dumps(payload))

    def _delay(self) -> float:
        """Seconds to wait before the next request may go (the rate limit)."""
        return self._bucket.reserve() if self._bucket is not None else 0.0

    def _checked(self, response: Reply, what: str) -> Reply:
        err = status_error(response, what, self._key)
        if err is not None:
            raise err
        return response

    def expect_width(self, width: int) -> None:
        """Refuse replies whose vectors are not ``width`` long, as if vectors of that length
        had come before (a width known from elsewhere: the cache the vectors go into)."""
        width = check_int("width", width, 1)
        with self._lock:
            if self._seen_dim is None:
                self._seen_dim = width

    def _embeddings_from(self, response: Reply, batch: list[str]) -> np.ndarray:
        """The vectors of one checked /embeddings reply for ``batch``."""
        reply = parse_embeddings(
            response.content, len(batch), dimensions=self.dimensions, status_code=response.status_code
        )
        dim = reply.vectors.shape[1]
        with self._lock:
            if self._seen_dim is None:
                self._seen_dim = dim
            elif dim != self._seen_dim:
                raise InvalidResponseError(
                    f"POST /embeddings: model {self.model!r} returned {self._seen_dim}-d embeddings "
                    f"before, {dim}-d now"
                )
        self.usage.add(tokens=reply.tokens)
        self._limits.answered = True
        self._calibrate(batch, reply.tokens)
        return reply.vectors

    # ------------------------------------------------------------------ sync

    def _get_client(self, stop: threading.Event, what: str) -> httpx.Client:
        with self._lock:
            if stop.is_set():  # checked under the lock close() takes: no client after close
                raise cancelled(what)
            if self._client is None:
                settings = self._client_settings()
                transport = self._transport
                if transport is None:
                    transport = self._abortable = AbortableTransport(settings["limits"])
                self._client = httpx.Client(**settings, transport=transport)
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

    def _get_executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self.max_concurrency, thread_name_prefix="embedcache-http"
                )
            return self._executor

    def _send(self, request: _Request, stop: threading.Event) -> httpx.Response:
        delay = self._delay()
        if delay > 0 and stop.wait(delay):
            raise cancelled(request.what)
        client = self._get_client(stop, request.what)
        self.usage.add(requests=1)
        try:
            response = client.request(**request.send_args())
        except (httpx.RequestError, RuntimeError) as exc:  # RuntimeError: client closed meanwhile
            if stop.is_set():
                raise cancelled(request.what) from None
            if not isinstance(exc, httpx.RequestError):
                raise
            raise request_error(exc, request.what, self.timeout, self._key) from None
        return self._checked(response, request.what)

    def _embed_batch(self, batch: list[str], stop: threading.Event) -> np.ndarray:
        request = self._embeddings_request(batch)
        try:
            return self._retry.retrying(stop)(
                lambda: self._embeddings_from(self._send(request, stop), batch)
            )
        except APIStatusError as exc:
            parts = self._split_refused(exc, batch)
            if parts is None:
                raise
        return np.concatenate([self._embed_batch(part, stop) for part in parts])

    def _probe(self, items: list[str], results: _Results, plan: list[tuple[int, int]],
               run: Callable[[list[str]], np.ndarray]) -> list[tuple[int, int]] | None:
        """Until this server has answered a batch, send the first one alone and plan the rest
        within what it taught (returned); ``None`` when there is nothing to probe."""
        if len(plan) < 2 or self._limits.answered:
            return None
        start, stop = plan[0]
        results.store(start, stop, run(items[start:stop]))
        return [(a + stop, b + stop) for a, b in self.plan(items[stop:])]

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
            return self._embed(items, _Results(len(items), on_batch), stop)

    def _embed(self, items: list[str], results: _Results, halt: threading.Event) -> np.ndarray:
        plan = self.plan(items)
        rest = self._probe(items, results, plan, lambda batch: self._embed_batch(batch, halt))
        if rest is not None:
            plan = rest
        if len(plan) == 1 or self.max_concurrency == 1:
            for start, stop in plan:
                results.store(start, stop, self._embed_batch(items[start:stop], halt))
            return results.array()

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
                        raise cancelled("POST /embeddings")
                    results.store(start, stop, fut.result())
                    nxt = next(todo, None)
                    if nxt is not None:
                        submit(*nxt)
        finally:
            for fut in pending:
                fut.cancel()
        return results.array()

    def list_models(self) -> list[str]:
        """Model ids the server offers (``GET /models``; the key masked in any that echo it)."""
        self._headers()
        with self._call() as halt:
            names = self._retry.retrying(halt)(lambda: parse_models(self._send(_MODELS, halt).content))
        return [redact(name, self._key) for name in names]

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
            abortable, self._abortable = self._abortable, None
            executor, self._executor = self._executor, None
        if abortable is not None:
            abortable.abort()
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

    def _get_aclient(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aclient_loop is not loop:
            # An AsyncClient is bound to the loop it first ran in; a new loop needs a new one.
            self._aclient = httpx.AsyncClient(**self._client_settings(), transport=self._async_transport)
            self._aclient_loop = loop
        return self._aclient

    async def _asend(self, request: _Request) -> httpx.Response:
        client = self._get_aclient()
        delay = self._delay()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            response = await client.request(**request.send_args())
        except httpx.RequestError as exc:
            raise request_error(exc, request.what, self.timeout, self._key) from None
        return self._checked(response, request.what)

    async def _aembed_batch(self, batch: list[str], gate: asyncio.Semaphore) -> np.ndarray:
        async def send(request: _Request) -> httpx.Response:
            async with gate:
                return await self._asend(request)

        return await self.aembed_batch(batch, send)

    async def aembed_batch(self, batch: list[str], send: Callable[[_Request], Awaitable[Reply]]) -> np.ndarray:
        """The vectors of one batch of validated texts (within :attr:`batch_size` and
        :attr:`max_batch_chars`), sent by ``send``: the request is built once, each attempt
        sent by ``send(request)`` under the retry policy, the reply checked; a batch the server
        refuses as too large is split within the limit learned and its parts sent one after
        another (:mod:`embedcache.providers._limits`).

        ``send`` takes the request (``method``, ``path``, ``content`` bytes, ``what``) and
        returns a reply with ``status_code``, ``content`` and (for errors) ``headers``,
        ``reason_phrase``, ``json()`` and ``text`` as :class:`httpx.Response` has them; it
        raises :class:`~embedcache.errors.APIConnectionError` or
        :class:`~embedcache.errors.APITimeoutError` when no reply came. It is the seam for a
        caller with its own HTTP client and rate limit (the proxy), which keeps this
        embedder's retries, error mapping, reply checks and batch splitting.
        """
        request = self._embeddings_request(batch)

        async def attempt() -> np.ndarray:
            self.usage.add(requests=1)
            response = self._checked(await send(request), request.what)
            return self._embeddings_from(response, batch)

        try:
            return await self._retry.arun(attempt)
        except APIStatusError as exc:
            parts = self._split_refused(exc, batch)
            if parts is None:
                raise
        return np.concatenate([await self.aembed_batch(part, send) for part in parts])

    async def aembed(
        self, texts: Sequence[str], *, on_batch: BatchCallback | None = None
    ) -> np.ndarray:
        """Async form of :meth:`embed`, for callers inside an event loop."""
        items = validate_texts(texts)
        self._headers()
        results = _Results(len(items), on_batch)
        gate = asyncio.Semaphore(self.max_concurrency)

        async def run(start: int, stop: int) -> tuple[int, int, np.ndarray]:
            return start, stop, await self._aembed_batch(items[start:stop], gate)

        plan = self.plan(items)
        if len(plan) > 1 and not self._limits.answered:  # the first batch alone: see _probe
            start, stop = plan[0]
            results.store(*await run(start, stop))
            plan = [(a + stop, b + stop) for a, b in self.plan(items[stop:])]
        tasks = [asyncio.ensure_future(run(start, stop)) for start, stop in plan]
        try:
            for next_done in asyncio.as_completed(tasks):
                results.store(*await next_done)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return results.array()

    async def alist_models(self, *, send: Callable[[_Request], Awaitable[Reply]] | None = None) -> list[str]:
        """Async form of :meth:`list_models`; ``send`` as for :meth:`aembed_batch`."""
        sender = self._asend if send is None else send

        async def attempt() -> list[str]:
            self.usage.add(requests=1)
            return parse_models(self._checked(await sender(_MODELS), _MODELS.what).content)

        return await self._retry.aretrying()(attempt)

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
