"""The upstream side of the proxy: the library's cache and embedders behind an in-flight map
and a batcher.

* Keys are the ones :class:`~embedcache.CachedEmbedder` uses: ``EmbeddingCache.make_key`` of
  the ``cache_namespace``, ``model`` and ``dimensions`` of an
  :class:`~embedcache.OpenAIEmbeddings` for the requested model and dimensions, and the text.
  A vector embedded through the library is a hit here, and the other way round.
* An item is looked up in memory first (recently served vectors, and answered vectors whose
  cache write has not committed yet: see :mod:`._memory`), then in the cache on disk, unless
  the filter of absent keys (:mod:`embedcache.cache._keyfilter`: the 8-byte prefixes of every
  key of the cache, 8 bytes per entry, kept current with every process's commits) shows that
  the cache lacks it: a miss request then costs no SQL read (some 0.1 to 0.7 ms for 64 keys,
  growing with the cache). Until the filter has loaded, or when it cannot tell, SQLite answers.
* A missed item that some request is already fetching is not fetched again: the later
  request waits for the first one's item (the in-flight map). The lookup and the claim
  happen in one step of the event loop, and an item leaves the map in the same step as it
  enters the writer's pending map, which it leaves only after its write commits, so no item
  is ever fetched twice at once. A request waits on one future, set when the last of its
  items has its vector (or at the first failure).
* Misses wait in one queue per (model, dimensions). A batch starts as soon as one of
  ``max_concurrency`` upstream slots is free, in the same step of the event loop, with
  whatever is queued then (up to the embedder's ``batch_size`` and ``max_batch_chars``, and
  in parts within the limits learned for the upstream): an idle proxy adds no wait, a busy
  one sends the misses of many requests together when a slot frees. Groups take turns.
* Every HTTP attempt, retries included, goes through one aiohttp session (keep-alive
  connections), under the one rate limit of the upstream (the IONOS contract for the IONOS
  host), and is counted in the upstream metrics. Retries, backoff, ``Retry-After``, error
  mapping, reply checks and the splitting of a batch the upstream refuses as too large are
  the embedder's own (:meth:`~embedcache.OpenAIEmbeddings.aembed_batch`).
* Clients are answered as soon as the upstream answers; in the same step the vectors are
  handed to the writer process (:class:`~._memory.CacheWriter`), which commits them within
  about a tenth of a second, and all of them on shutdown; what a crash can lose is stated in
  :mod:`._memory`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, NamedTuple

import aiohttp
import httpx
import numpy as np

from embedcache import _config
from embedcache.cache import EmbeddingCache
from embedcache.cache._keyfilter import KeyFilter
from embedcache.errors import (
    APIConnectionError,
    APIError,
    CacheError,
    ConfigurationError,
    InvalidInputError,
    InvalidResponseError,
    NotFoundError,
)
from embedcache.providers._http import Secret, request_error
from embedcache.providers.base import metered
from embedcache.providers.openai import OpenAIEmbeddings, TokenBucket
from embedcache.server._memory import CacheWriter, RecentVectors
from embedcache.server._metrics import Metrics

__all__ = ["Outcome", "Upstream"]

logger = logging.getLogger("embedcache.server")

#: distinct (model, dimensions) pairs the proxy keeps a queue for; a pair the upstream does
#: not know (404) is forgotten again
_MAX_GROUPS = 256


class _Ok(NamedTuple):
    """A reply below 300: what the embedder reads of it."""

    status_code: int
    content: bytes


class _Client:
    """The proxy's HTTP client of the upstream: one aiohttp session with up to ``connections``
    keep-alive connections. Every attempt, retries included, waits for the shared rate limit
    (the IONOS contract for the IONOS host), then is counted in the metrics.

    :meth:`send` is the ``send`` of :meth:`OpenAIEmbeddings.aembed_batch`: the embedder keeps
    its retries, error mapping, reply checks and batch splitting; this replaces only the HTTP
    client (httpx's ``AsyncClient`` costs about a millisecond of CPU per call more).
    """

    def __init__(self, base_url: str, headers: dict[str, str], *, timeout: float, bucket: TokenBucket | None,
                 metrics: Metrics, connections: int, key: Secret | None) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {**headers, "Content-Type": "application/json"}
        self._timeout = timeout
        self._bucket = bucket
        self._metrics = metrics
        self._connections = connections
        self._key = key
        self._session: aiohttp.ClientSession | None = None
        self._status: dict[int, Any] = {}  # the metric's child of each status seen

    def __repr__(self) -> str:
        return f"_Client(base_url={self._base!r})"

    def _open(self) -> aiohttp.ClientSession:
        timeout = self._timeout
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._connections, ssl=httpx.create_ssl_context()),
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=None, connect=timeout, sock_connect=timeout, sock_read=timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self._session

    async def send(self, request: Any) -> _Ok | httpx.Response:
        """One attempt of ``request`` (``method``, ``path``, ``content``, ``what``): a reply, or
        :class:`~embedcache.errors.APIConnectionError` / ``APITimeoutError`` when none came."""
        if self._bucket is not None:
            delay = self._bucket.reserve()
            if delay > 0:
                await asyncio.sleep(delay)
        session = self._session if self._session is not None else self._open()
        metrics = self._metrics
        start = time.perf_counter()
        try:
            async with session.request(request.method, self._base + request.path, data=request.content,
                                       allow_redirects=False) as response:
                content = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            metrics.upstream_requests.labels("error").inc()
            raise self._no_reply(exc, request.what) from None
        except BaseException:
            metrics.upstream_requests.labels("error").inc()
            raise
        metrics.upstream_latency.observe(time.perf_counter() - start)
        status = response.status
        counter = self._status.get(status)
        if counter is None:
            counter = self._status[status] = metrics.upstream_requests.labels(str(status))
        counter.inc()
        if status < 300:
            return _Ok(status, content)
        if status == 429:
            metrics.upstream_429.inc()
        reason = {"reason_phrase": response.reason.encode("latin-1", "replace")} if response.reason else None
        return httpx.Response(status, headers=list(response.raw_headers), content=content, extensions=reason)

    def _no_reply(self, exc: BaseException, what: str) -> APIError:
        """The library's error for a request that got no reply: a timeout (a 504 to the client),
        or a connection refused, dropped or spoken to wrongly (a 502)."""
        message = str(exc) or type(exc).__name__
        if isinstance(exc, asyncio.TimeoutError):  # aiohttp's timeouts are TimeoutErrors too
            mapped: httpx.RequestError = httpx.ReadTimeout(message)
        elif isinstance(exc, aiohttp.ClientConnectorError):
            mapped = httpx.ConnectError(message)
        else:
            mapped = httpx.RemoteProtocolError(message)
        return request_error(mapped, what, self._timeout, self._key)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Wait:
    """One request waiting for its missed items: ``future`` is set when the last of them has
    its vector, or at the first failure."""

    __slots__ = ("future", "left")

    def __init__(self, future: asyncio.Future) -> None:
        self.future = future
        self.left = 0


class _Item:
    """One distinct missed text on its way upstream, and the requests waiting for it; ``row``
    (its vector's float32 bytes) and ``share`` (its part of the batch's tokens) once answered."""

    __slots__ = ("key", "row", "share", "text", "waits")

    def __init__(self, key: bytes, text: str) -> None:
        self.key, self.text = key, text
        self.row: bytes | None = None
        self.share = 0.0
        self.waits: list[_Wait] = []


class _Group:
    """The misses of one (model, dimensions), and the embedder that fetches them."""

    def __init__(self, embedder: OpenAIEmbeddings) -> None:
        self.embedder = embedder
        self.source = (embedder.cache_namespace, embedder.model, embedder.dimensions)
        self.dim: int | None = embedder.dimensions  # length of the vectors seen last
        self.queue: deque[_Item] = deque()


class Outcome(NamedTuple):
    """The answer to one embeddings request."""

    #: (n, d) float32, row i the vector of input i
    vectors: np.ndarray
    hits: int  # distinct items found in the cache
    shared: int  # distinct items another request was fetching
    misses: int  # distinct items this request sent upstream
    repeats: int  # items that repeat an earlier item of the request
    tokens: float  # upstream tokens attributed to this request's misses
    saved_tokens: float  # estimated tokens of the items it did not pay for


class Upstream:
    """The cache, the in-flight map, the batcher and the upstream embedders of one proxy.

    Arguments as in :func:`embedcache.server.create_app`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        cache: EmbeddingCache,
        metrics: Metrics,
        api_key: str | None,
        requests_per_second: float | str | None,
        burst: int,
        max_concurrency: int,
        batch_size: int,
        max_batch_chars: int,
        max_retries: int,
        timeout: float,
        models_ttl: float,
    ) -> None:
        # One embedder that validates the settings and resolves "auto" and the key; it also
        # answers GET /models.
        self._settings = dict(
            base_url=base_url, batch_size=batch_size, max_batch_chars=max_batch_chars,
            max_concurrency=1, max_retries=max_retries, timeout=timeout, encoding_format="base64",
        )
        probe = OpenAIEmbeddings(
            "models", api_key=api_key, requests_per_second=requests_per_second, burst=burst,
            **self._settings,  # type: ignore[arg-type]
        )
        if probe.key_source is None:
            host = httpx.URL(probe.base_url).host
            raise ConfigurationError(
                f"no API key for the upstream {host}: set OPENAI_API_KEY (IONOS_API_TOKEN for "
                f"the IONOS AI Model Hub) or pass api_key; for a server that takes any key, OPENAI_API_KEY=none"
            )
        self.base_url = probe.base_url
        self.requests_per_second = probe.requests_per_second
        self.burst = probe.burst
        self.key_source = probe.key_source
        self._api_key = None if api_key is None else Secret(api_key)
        self.cache = cache
        self.metrics = metrics
        self.max_concurrency = max_concurrency
        self.models_ttl = models_ttl
        bucket = None if probe.requests_per_second is None else TokenBucket(probe.requests_per_second, burst)
        self._client = _Client(probe.base_url, probe._headers(), timeout=probe.timeout, bucket=bucket,
                               metrics=metrics, connections=max_concurrency + 1, key=probe._key)
        self._models_embedder = probe
        self._groups: dict[tuple[str, int | None], _Group] = {}
        self._inflight: dict[bytes, _Item] = {}
        self.recent = RecentVectors(_config.SERVER_MEMORY_BYTES)
        self.writer = CacheWriter(cache, metrics)
        #: which keys the cache surely lacks (loads in the background; SQLite answers meanwhile)
        self.keys = KeyFilter(cache)
        self.keys.start()
        self._max_pending = _config.SERVER_MAX_PENDING
        self._free = max_concurrency  # upstream slots not in use
        self._ready: deque[_Group] = deque()  # groups with queued misses, taken in turn
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self._models: tuple[float, list[str]] | None = None
        self._models_lock: asyncio.Lock | None = None
        self._tokens_seen = 0.0
        self._chars_seen = 0
        self._queued = 0

    def __repr__(self) -> str:
        return f"Upstream(base_url={self.base_url!r})"

    def _embedder(self, model: str, dimensions: int | None) -> OpenAIEmbeddings:
        return OpenAIEmbeddings(
            model, dimensions=dimensions, requests_per_second=None,
            api_key=None if self._api_key is None else self._api_key.reveal(),
            **self._settings,  # type: ignore[arg-type]
        )

    def _group(self, model: str, dimensions: int | None) -> _Group:
        group = self._groups.get((model, dimensions))
        if group is None:
            if len(self._groups) >= _MAX_GROUPS:
                raise InvalidInputError(
                    f"the proxy serves at most {_MAX_GROUPS} (model, dimensions) pairs at once, "
                    f"got a new one: model={model!r}, dimensions={dimensions}"
                )
            group = self._groups[(model, dimensions)] = _Group(self._embedder(model, dimensions))
            if group.dim is None:  # the width the cache holds for it, from an earlier run: a reply
                group.dim = self._cached_width(group.source)  # of another is refused, never cached
                if group.dim is not None:
                    group.embedder.expect_width(group.dim)
        return group

    def _cached_width(self, source: tuple[str, str, int | None]) -> int | None:
        """The length of the vectors the cache holds for ``source`` (None: none, or unreadable)."""
        namespace, model, dimensions = source
        try:
            held = self.cache.info()["namespaces"]
        except CacheError:
            return None
        for entry in held:
            if (entry["namespace"], entry["model"], entry["dimensions"]) == (namespace, model, dimensions) \
                    and entry["entries"] and entry["vector_dimensions"]:
                return int(entry["vector_dimensions"])
        return None

    # ------------------------------------------------------------------ requests

    def tokens_per_char(self) -> float:
        """The upstream's mean tokens per character so far (1/4 before any miss)."""
        return self._tokens_seen / self._chars_seen if self._chars_seen else 0.25

    async def embed(self, model: str, dimensions: int | None, texts: list[str]) -> Outcome:
        """The vectors of ``texts`` (validated, non-empty strings) for ``model``."""
        if self._closed:
            raise APIConnectionError("the proxy is shutting down")
        group = self._group(model, dimensions)
        keys = self.cache.raw_keys(*group.source, texts)
        text_of = dict(zip(keys, texts))  # distinct keys, in order of first appearance
        # From here to the first await, nothing else runs: the lookups and the claims are one step.
        have: dict[bytes, bytes] = {}
        recent, pending = self.recent, self.writer.pending
        todo: list[bytes] = []
        for key in text_of:
            row = recent.get(key)
            if row is None:
                row = pending.get(key)
                if row is None:
                    todo.append(key)
                    continue
            have[key] = row
        if todo:
            self._read(group, todo, have)
        hits = len(have)
        misses = shared = 0
        tokens = 0.0
        if hits < len(text_of):
            inflight = self._inflight
            wait = _Wait(asyncio.get_running_loop().create_future())
            items: list[_Item] = []
            new: list[_Item] = []
            for key in todo:
                if key in have:
                    continue
                item = inflight.get(key)
                if item is None:
                    item = inflight[key] = _Item(key, text_of[key])
                    new.append(item)
                item.waits.append(wait)
                items.append(item)
            wait.left = len(items)
            misses = len(new)
            shared = len(items) - misses
            if new:
                group.queue.extend(new)
                self._queued += misses
                self.metrics.queue_depth.set(self._queued)
                if group not in self._ready:
                    self._ready.append(group)
                self._pump()  # an idle proxy sends them now, without waiting for a batch to gather
            await wait.future
            for item in items:
                have[item.key] = item.row  # type: ignore[assignment]
            for item in new:
                tokens += item.share
        # tokens not paid for: every item's but those of the misses this request sent
        saved_chars = sum(map(len, texts))
        if misses:
            saved_chars -= sum(len(item.text) for item in new)
        rows = [have[k] for k in keys]
        size = len(rows[0])
        if any(len(r) != size for r in rows):
            raise InvalidResponseError(
                f"model {model!r} gave vectors of unequal dimensions {sorted({len(r) // 4 for r in rows})} "
                "(cached and fresh ones differ)"
            )
        vectors = np.frombuffer(b"".join(rows), dtype="<f4").reshape(len(rows), size // 4)
        repeats = len(keys) - len(text_of)
        return Outcome(vectors, hits, shared, misses, repeats, tokens, saved_chars * self.tokens_per_char())

    def _read(self, group: _Group, todo: list[bytes], have: dict[bytes, bytes]) -> None:
        """Look ``todo`` up in the cache on disk; what is found goes in ``have`` and in memory.
        Keys the filter of absent keys rules out are not asked for."""
        absent = self.keys.absent(todo)
        if absent is not None:
            skipped = int(absent.sum())
            if skipped:
                self.metrics.lookups_skipped.inc(skipped)
                if skipped == len(todo):
                    return
                todo = [k for k, a in zip(todo, absent.tolist()) if not a]
        try:
            found, vectors = self.cache.lookup(todo, group.dim)
        except CacheError as exc:
            logger.warning("cache read failed, treating %d items as misses: %s", len(todo), exc)
            self.metrics.cache_errors.inc()
            return
        if vectors is None:
            return
        group.dim = vectors.shape[1]
        put = self.recent.put
        for j in np.flatnonzero(found).tolist():
            row = vectors[j].tobytes()
            have[todo[j]] = row
            put(todo[j], row)

    # ------------------------------------------------------------------ batcher

    def _pump(self) -> None:
        """Start a batch for each free upstream slot while misses wait, in this step of the
        event loop: an idle proxy adds no wait, and a busy one sends what queued meanwhile
        together when a slot frees."""
        ready = self._ready
        while self._free and ready and not self._closed:
            group = ready.popleft()
            batch = self._take(group)
            if group.queue:
                ready.append(group)  # the groups take turns
            self._free -= 1
            task = asyncio.get_running_loop().create_task(self._run(group, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self, group: _Group) -> list[_Item]:
        emb, queue = group.embedder, group.queue
        batch: list[_Item] = []
        chars = 0
        while queue and len(batch) < emb.batch_size:
            size = len(queue[0].text)
            if batch and chars + size > emb.max_batch_chars:
                break
            batch.append(queue.popleft())
            chars += size
        self._queued -= len(batch)
        self.metrics.queue_depth.set(self._queued)
        return batch

    async def _fetch(self, embedder: OpenAIEmbeddings, texts: list[str]) -> np.ndarray:
        """The vectors of one batch, in parts within the limits learned for the upstream."""
        send = self._client.send
        plan = embedder.plan(texts)
        if len(plan) == 1:
            return await embedder.aembed_batch(texts, send)
        return np.concatenate([await embedder.aembed_batch(texts[a:b], send) for a, b in plan])

    async def _run(self, group: _Group, batch: list[_Item]) -> None:
        """Fetch one batch, hand its vectors to the requests waiting, and queue its write.

        In one step of the event loop the vectors enter memory and the writer's pending map,
        the waiting requests get them, and the items leave the in-flight map (``finally``).
        """
        self.metrics.in_flight.inc()
        texts = [item.text for item in batch]
        answered = False
        try:
            with metered() as usage:
                vectors = await self._fetch(group.embedder, texts)
            tokens = float(usage.snapshot()[1])
            vectors = np.ascontiguousarray(vectors, dtype="<f4")
            group.dim = vectors.shape[1]
            keys = [item.key for item in batch]
            rows = [row.tobytes() for row in vectors]
            self.writer.add(group.source, keys, vectors, rows)
            put = self.recent.put
            for key, row in zip(keys, rows):
                put(key, row)
        except BaseException as exc:
            error: BaseException = exc
            if isinstance(exc, asyncio.CancelledError):
                error = APIConnectionError("the proxy is shutting down")
            elif not isinstance(exc, Exception):
                error = APIConnectionError(f"upstream request failed: {type(exc).__name__}")
            _fail(batch, error)
            if isinstance(exc, NotFoundError) and not group.queue:
                self._forget(group)
            if not isinstance(exc, Exception):
                raise
            logger.info("upstream batch of %d items failed: %s", len(batch), exc)
        else:
            chars = [len(t) for t in texts]
            total = sum(chars) or 1
            self.metrics.tokens_used.inc(tokens)
            self._tokens_seen += tokens
            self._chars_seen += total
            per_char = tokens / total
            for item, row, n in zip(batch, rows, chars):
                item.row = row
                item.share = per_char * n
                for wait in item.waits:
                    wait.left -= 1
                    if not wait.left and not wait.future.done():
                        wait.future.set_result(None)
            answered = True
        finally:
            inflight = self._inflight
            for item in batch:
                if inflight.get(item.key) is item:
                    del inflight[item.key]
            try:
                if answered and len(self.writer.pending) > self._max_pending:
                    await self.writer.flush()  # a disk slower than the upstream: wait for it
            finally:
                self._free += 1
                self.metrics.in_flight.dec()
                self._pump()

    def _forget(self, group: _Group) -> None:
        for pair, g in list(self._groups.items()):
            if g is group:
                del self._groups[pair]

    # ------------------------------------------------------------------ models, shutdown

    async def models(self) -> list[str]:
        """The upstream's model ids, fetched at most once per ``models_ttl`` seconds."""
        if self._models_lock is None:
            self._models_lock = asyncio.Lock()
        async with self._models_lock:
            now = time.monotonic()
            if self._models is None or now - self._models[0] > self.models_ttl:
                self._models = (now, await self._models_embedder.alist_models(send=self._client.send))
            return self._models[1]

    async def aclose(self) -> None:
        """Stop the batcher (requests still waiting get an error), write every answered
        vector still pending to the cache, and close connections."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for group in self._groups.values():
            _fail(group.queue, APIConnectionError("the proxy is shutting down"))
            group.queue.clear()
            await group.embedder.aclose()
        await self._models_embedder.aclose()
        await self._client.close()
        await self.writer.aclose()
        self.keys.close()


def _fail(items: Iterable[_Item], error: BaseException) -> None:
    """Every request waiting for one of ``items`` gets ``error``."""
    for item in items:
        for wait in item.waits:
            if not wait.future.done():
                wait.future.set_exception(error)
