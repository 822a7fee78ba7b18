"""The upstream side of the proxy: the library's cache and embedders behind an in-flight map
and a batcher.

* Keys are the ones :class:`~embedcache.CachedEmbedder` uses: ``EmbeddingCache.make_key`` of
  the ``cache_namespace``, ``model`` and ``dimensions`` of an
  :class:`~embedcache.OpenAIEmbeddings` for the requested model and dimensions, and the text.
  A vector embedded through the library is a hit here, and the other way round.
* An item is looked up in memory first (recently served vectors, and answered vectors whose
  cache write has not committed yet: see :mod:`._memory`), then in the cache on disk.
* A missed item that some request is already fetching is not fetched again: the later
  request waits for the first one's future (the in-flight map). The lookup and the claim
  happen in one step of the event loop, and an item leaves the map in the same step as it
  enters the writer's pending map, which it leaves only after its write commits, so no item
  is ever fetched twice at once.
* Misses wait in one queue per (model, dimensions). A batch goes as soon as one of
  ``max_concurrency`` upstream slots is free, with whatever is queued then (up to the
  embedder's ``batch_size`` and ``max_batch_chars``): an idle proxy adds no wait, a busy one
  sends the misses of many requests together.
* Every HTTP attempt, retries included, passes one transport that applies the one rate
  limit of the upstream (the IONOS contract for the IONOS host) and records the upstream
  metrics. Retries, backoff and error mapping are the embedder's own.
* Clients are answered as soon as the upstream answers; the vectors are written to the
  cache in the background (:class:`~._memory.CacheWriter`), within a few milliseconds, and
  all of them on shutdown. A crash of the proxy loses only the vectors not yet committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import NamedTuple

import aiohttp
import httpx
import numpy as np
from httpx_aiohttp import AiohttpTransport

from embedcache import _config
from embedcache.cache import EmbeddingCache
from embedcache.errors import (
    APIConnectionError,
    CacheError,
    ConfigurationError,
    InvalidInputError,
    InvalidResponseError,
    NotFoundError,
)
from embedcache.providers._http import Secret
from embedcache.providers.base import metered
from embedcache.providers.openai import OpenAIEmbeddings, TokenBucket
from embedcache.server._memory import CacheWriter, RecentVectors
from embedcache.server._metrics import Metrics

__all__ = ["Outcome", "Upstream"]

logger = logging.getLogger("embedcache.server")

#: distinct (model, dimensions) pairs the proxy keeps a queue for; a pair the upstream does
#: not know (404) is forgotten again
_MAX_GROUPS = 256


def _no_reply(exc: httpx.TransportError) -> httpx.TransportError:
    """``exc`` as httpx itself would have raised it: the aiohttp transport reports a connection
    the server closed as a connect timeout, which would make a dropped connection a 504."""
    cause = exc.__cause__
    if not isinstance(exc, httpx.TimeoutException) or cause is None:
        return exc
    if isinstance(cause, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return exc
    return httpx.RemoteProtocolError(str(exc))


class _Gate(httpx.AsyncBaseTransport):
    """Every upstream HTTP attempt passes here: the shared rate limit, then the metrics."""

    def __init__(self, bucket: TokenBucket | None, metrics: Metrics, connections: int) -> None:
        self._bucket = bucket
        self._metrics = metrics
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        # aiohttp under httpx's interface (the transport the openai SDK offers for aiohttp): about
        # 1.5 ms less CPU per upstream call than httpx's own pool, most of a miss's overhead.
        self._inner = AiohttpTransport(limits=limits)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._bucket is not None:
            delay = self._bucket.reserve()
            if delay > 0:
                await asyncio.sleep(delay)
        start = time.perf_counter()
        try:
            response = await self._inner.handle_async_request(request)
            await response.aread()  # the whole reply here: its errors mapped below, its time measured
        except httpx.TransportError as exc:
            self._metrics.upstream_requests.labels("error").inc()
            raise _no_reply(exc) from exc.__cause__
        except BaseException:
            self._metrics.upstream_requests.labels("error").inc()
            raise
        self._metrics.upstream_latency.observe(time.perf_counter() - start)
        self._metrics.upstream_requests.labels(str(response.status_code)).inc()
        if response.status_code == 429:
            self._metrics.upstream_429.inc()
        return response

    async def aclose(self) -> None:
        """Shared by the clients of every embedder: :meth:`close` closes it, once."""

    async def close(self) -> None:
        await self._inner.aclose()


class _Item:
    """One distinct missed text on its way upstream; ``future`` gets ``(vector bytes, tokens)``."""

    __slots__ = ("future", "key", "text")

    def __init__(self, key: bytes, text: str, future: asyncio.Future) -> None:
        self.key, self.text, self.future = key, text, future


class _Group:
    """The misses of one (model, dimensions), and the embedder that fetches them."""

    def __init__(self, embedder: OpenAIEmbeddings) -> None:
        self.embedder = embedder
        self.source = (embedder.cache_namespace, embedder.model, embedder.dimensions)
        self.dim: int | None = embedder.dimensions  # length of the vectors seen last
        self.queue: deque[_Item] = deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None


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
        self._gate = _Gate(bucket, metrics, max_concurrency + 1)
        self._models_embedder = self._embedder("models", None)
        self._groups: dict[tuple[str, int | None], _Group] = {}
        self._inflight: dict[bytes, asyncio.Future] = {}
        self.recent = RecentVectors(_config.SERVER_MEMORY_BYTES)
        self.writer = CacheWriter(cache, metrics)
        self._max_pending = _config.SERVER_MAX_PENDING
        self._slots: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task] = set()
        self._models: tuple[float, list[str]] | None = None
        self._models_lock: asyncio.Lock | None = None
        self._tokens_seen = 0.0
        self._chars_seen = 0
        self._queued = 0

    def __repr__(self) -> str:
        return f"Upstream(base_url={self.base_url!r})"

    def _embedder(self, model: str, dimensions: int | None) -> OpenAIEmbeddings:
        return OpenAIEmbeddings(
            model, dimensions=dimensions, requests_per_second=None, async_transport=self._gate,
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
        if group.task is None:
            group.task = asyncio.get_running_loop().create_task(self._dispatch(group))
        return group

    # ------------------------------------------------------------------ requests

    def tokens_per_char(self) -> float:
        """The upstream's mean tokens per character so far (1/4 before any miss)."""
        return self._tokens_seen / self._chars_seen if self._chars_seen else 0.25

    async def embed(self, model: str, dimensions: int | None, texts: list[str]) -> Outcome:
        """The vectors of ``texts`` (validated, non-empty strings) for ``model``."""
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
        waits: list[tuple[bytes, asyncio.Future, bool]] = []
        shared = misses = 0
        if hits < len(text_of):
            inflight = self._inflight
            loop = asyncio.get_running_loop()
            for key in todo:
                if key in have:
                    continue
                future = inflight.get(key)
                if future is not None:
                    shared += 1
                    waits.append((key, future, False))
                    continue
                future = inflight[key] = loop.create_future()
                group.queue.append(_Item(key, text_of[key], future))
                misses += 1
                waits.append((key, future, True))
            if misses:
                self._queued += misses
                self.metrics.queue_depth.set(self._queued)
                group.wake.set()
        tokens = 0.0
        if waits:
            await asyncio.shield(asyncio.gather(*(f for _, f, _ in waits)))
            for key, future, mine in waits:
                row, share = future.result()
                have[key] = row
                if mine:
                    tokens += share
        # tokens not paid for: every item's but those of the misses this request sent
        saved_chars = sum(map(len, texts))
        if misses:
            saved_chars -= sum(len(text_of[k]) for k, _, mine in waits if mine)
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
        """Look ``todo`` up in the cache on disk; what is found goes in ``have`` and in memory."""
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

    async def _dispatch(self, group: _Group) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        slots = self._slots
        while True:
            await group.wake.wait()
            group.wake.clear()
            while group.queue:
                await slots.acquire()  # misses go on queueing meanwhile: they go together
                batch = self._take(group)
                if not batch:
                    slots.release()
                    break
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

    async def _run(self, group: _Group, batch: list[_Item]) -> None:
        """Fetch one batch, hand each item's future its vector, and queue the batch's write.

        In one step of the event loop the vectors enter memory and the writer's pending map,
        the futures get them, and the items leave the in-flight map (``finally``).
        """
        assert self._slots is not None
        self.metrics.in_flight.inc()
        texts = [item.text for item in batch]
        answered = False
        try:
            with metered() as usage:
                vectors = await group.embedder.aembed(texts)
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
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
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
            for item, row, n in zip(batch, rows, chars):
                if not item.future.done():
                    item.future.set_result((row, tokens * n / total))
            answered = True
        finally:
            for item in batch:
                if self._inflight.get(item.key) is item.future:
                    del self._inflight[item.key]
            try:
                if answered and len(self.writer.pending) > self._max_pending:
                    await self.writer.flush()  # a disk slower than the upstream: wait for it
            finally:
                self._slots.release()
                self.metrics.in_flight.dec()

    def _forget(self, group: _Group) -> None:
        for pair, g in list(self._groups.items()):
            if g is group:
                del self._groups[pair]
                if g.task is not None:
                    g.task.cancel()

    # ------------------------------------------------------------------ models, shutdown

    async def models(self) -> list[str]:
        """The upstream's model ids, fetched at most once per ``models_ttl`` seconds."""
        if self._models_lock is None:
            self._models_lock = asyncio.Lock()
        async with self._models_lock:
            now = time.monotonic()
            if self._models is None or now - self._models[0] > self.models_ttl:
                self._models = (now, await self._models_embedder.alist_models())
            return self._models[1]

    async def aclose(self) -> None:
        """Stop the batcher (requests still waiting get an error), write every answered
        vector still pending to the cache, and close connections."""
        tasks = [g.task for g in self._groups.values() if g.task is not None] + list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for group in self._groups.values():
            for item in group.queue:
                if not item.future.done():
                    item.future.set_exception(APIConnectionError("the proxy is shutting down"))
            await group.embedder.aclose()
        await self._models_embedder.aclose()
        await self._gate.close()
        await self.writer.aclose()
