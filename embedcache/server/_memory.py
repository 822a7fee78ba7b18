"""What the proxy keeps in memory in front of the cache: recently served vectors, and answered
vectors on their way to the disk.

* :class:`RecentVectors` is a least-recently-used map of raw key to the vector's float32 bytes,
  bounded in bytes (``_config.SERVER_MEMORY_BYTES``). A hit found there costs no SQL read. It
  is filled from the cache's own reads and from the upstream's answers, so what it holds
  equals what is (or is about to be) on disk. It is not told of entries another process
  removes from the disk (``clear``, ``prune``, eviction): it goes on serving those vectors,
  which are still the vectors of their texts, until it forgets them.
* :class:`CacheWriter` writes answered vectors to the cache in the background, so that a
  client is answered as soon as the upstream is. Until a vector's write commits it stays in
  :attr:`CacheWriter.pending`, from which the proxy serves it: an item is never sent upstream
  again while its write is under way. Writes go in batches, one transaction per (namespace,
  model, dimensions): one write runs at a time, and it starts once
  ``_config.SERVER_WRITE_ROWS`` vectors wait or ``_config.SERVER_WRITE_DELAY`` seconds (0.1)
  after the oldest of them was answered, whichever comes first. Fewer, larger transactions
  cost a third of the CPU per row, CPU that a busy proxy's requests need. A vector is
  therefore committed within about a tenth of a second of being answered, plus two writes.
  :meth:`CacheWriter.aclose` (the app's shutdown, e.g. on SIGTERM) writes everything still
  pending at once; a crash (SIGKILL, power loss) loses the vectors answered but not yet
  committed, which are then paid for again when next asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from embedcache import _config
from embedcache.cache import EmbeddingCache
from embedcache.server._metrics import Metrics

__all__ = ["CacheWriter", "RecentVectors"]

logger = logging.getLogger("embedcache.server")

#: bytes an entry of :class:`RecentVectors` costs beyond its vector (key, bytes object, map slot)
ENTRY_OVERHEAD = 200


class RecentVectors:
    """Vectors (float32 bytes) by raw key; beyond ``max_bytes`` the least recently used go.

    >>> recent = RecentVectors(max_bytes=2 * (ENTRY_OVERHEAD + 8))
    >>> recent.put(b"a", b"12345678"); recent.put(b"b", b"abcdefgh")
    >>> recent.get(b"a")  # now the most recently used
    b'12345678'
    >>> recent.put(b"c", b"ABCDEFGH")  # evicts b, the least recently used
    >>> recent.get(b"b") is None, len(recent), recent.nbytes == recent.max_bytes
    (True, 2, True)
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._map: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, key: bytes) -> bytes | None:
        value = self._map.get(key)
        if value is not None:
            self._map.move_to_end(key)
        return value

    def put(self, key: bytes, value: bytes) -> None:
        size = len(value) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        old = self._map.pop(key, None)
        if old is not None:
            self.nbytes -= len(old) + ENTRY_OVERHEAD
        self._map[key] = value
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, gone = self._map.popitem(last=False)
            self.nbytes -= len(gone) + ENTRY_OVERHEAD

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, key: object) -> bool:
        return key in self._map


class _Write(NamedTuple):
    source: tuple[str, str, int | None]  # (namespace, model, dimensions) of the keys
    keys: list[bytes]
    vectors: np.ndarray  # float32 (n, d), row i the vector of keys[i]
    rows: list[bytes]  # the same vectors as bytes, the objects held in ``pending``


class CacheWriter:
    """Writes answered vectors to ``cache`` from one background thread, in batches.

    Use it from one event loop. :meth:`add` never waits; :meth:`flush` waits until every
    vector added so far is committed (or its write failed, which is logged and counted in the
    ``cache_errors`` metric: such vectors are fetched again when next asked for).
    """

    def __init__(self, cache: EmbeddingCache, metrics: Metrics) -> None:
        self.cache = cache
        self.metrics = metrics
        self.batch_rows = _config.SERVER_WRITE_ROWS
        self.delay = _config.SERVER_WRITE_DELAY
        #: answered vectors (float32 bytes) by raw key, until their write commits
        self.pending: dict[bytes, bytes] = {}
        self._queue: list[_Write] = []
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="embedcache-writer")
        self._queued_rows = 0
        self._urgent = 0  # flushes waiting: no delay meanwhile
        self._wake: asyncio.Event | None = None
        self._full: asyncio.Event | None = None  # batch_rows are queued, or a flush waits
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def add(self, source: tuple[str, str, int | None], keys: list[bytes], vectors: np.ndarray,
            rows: list[bytes]) -> None:
        """Queue ``vectors`` (finite float32 (n, d)) for writing under ``keys``; ``rows`` are the
        same vectors as bytes, served from :attr:`pending` until the write commits."""
        if self._task is None:
            self._wake, self._full, self._idle = asyncio.Event(), asyncio.Event(), asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        assert self._wake is not None and self._full is not None and self._idle is not None
        self.pending.update(zip(keys, rows))
        self._queue.append(_Write(source, keys, vectors, rows))
        self._queued_rows += len(keys)
        self.metrics.pending_writes.set(len(self.pending))
        self._idle.clear()
        self._wake.set()
        if self._queued_rows >= self.batch_rows:
            self._full.set()

    async def flush(self) -> None:
        """Wait until everything added so far is written (at once, without the delay)."""
        if self._idle is None or self._full is None:
            return
        self._urgent += 1
        try:
            self._full.set()
            await self._idle.wait()
        finally:
            self._urgent -= 1

    async def _run(self) -> None:
        assert self._wake is not None and self._full is not None and self._idle is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                if not self._urgent and not self._full.is_set():  # let a batch gather, up to the delay
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._full.wait(), self.delay)
                batch, self._queue, self._queued_rows = self._queue, [], 0
                self._full.clear()
                try:
                    await loop.run_in_executor(self._thread, self._commit, batch)
                except Exception as exc:  # a full disk, a read-only file...: served from memory meanwhile
                    logger.warning("cache write of %d vectors failed: %s", sum(len(w.keys) for w in batch), exc)
                    self.metrics.cache_errors.inc()
                finally:
                    # Here, on the loop's thread: a request's lookup (memory, then disk) never
                    # runs between the commit and this removal, so it finds the item in one.
                    pending = self.pending
                    for write in batch:
                        for key, row in zip(write.keys, write.rows):
                            if pending.get(key) is row:
                                del pending[key]
                    self.metrics.pending_writes.set(len(pending))
            if not self._queue:
                self._idle.set()

    def _commit(self, batch: list[_Write]) -> None:
        """In the writer thread: one transaction per source and vector length."""
        parts: dict[tuple[tuple[str, str, int | None], int], list[_Write]] = {}
        for write in batch:
            parts.setdefault((write.source, write.vectors.shape[1]), []).append(write)
        for (source, _), writes in parts.items():
            keys = [k for w in writes for k in w.keys]
            vectors = writes[0].vectors if len(writes) == 1 else np.concatenate([w.vectors for w in writes])
            self.cache.put(keys, vectors, source=source)

    async def aclose(self) -> None:
        """Write everything still pending, then stop the writer thread."""
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self.cache.close)  # the writer thread's connection
        self._thread.shutdown(wait=True)
