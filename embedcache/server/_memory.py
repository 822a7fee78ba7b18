"""What the proxy keeps in memory in front of the cache: recently served vectors, and answered
vectors on their way to the disk.

* :class:`RecentVectors` is a least-recently-used map of raw key to the vector's float32 bytes,
  bounded in bytes (``_config.SERVER_MEMORY_BYTES``). A hit found there costs no SQL read. It
  is filled from the cache's own reads and from the upstream's answers, so what it holds
  equals what is (or is about to be) on disk. It is not told of entries another process
  removes from the disk (``clear``, ``prune``, eviction): it goes on serving those vectors,
  which are still the vectors of their texts, until it forgets them.
* :class:`CacheWriter` hands answered vectors to a writer process (:mod:`._writer`) that
  writes them to the cache, so that a client is answered as soon as the upstream is and
  SQLite's work (some 30 microseconds a row) never holds the interpreter's lock of the
  proxy. The rows go through a pipe in the step that answers them, before the reply is
  sent. Until the writer says a vector is committed it stays in :attr:`CacheWriter.pending`,
  from which the proxy serves it: an item is never sent upstream again while its write is
  under way. The writer gathers rows into batches, one transaction per (namespace, model,
  dimensions): a write starts once ``_config.SERVER_WRITE_ROWS`` vectors wait or
  ``_config.SERVER_WRITE_DELAY`` seconds (0.1) after the oldest of them came, whichever comes
  first (fewer, larger transactions cost a third of the CPU per row). A vector is therefore
  committed within about a tenth of a second of being answered, plus two writes.
  :meth:`CacheWriter.aclose` (the app's shutdown, e.g. on SIGTERM) writes everything still
  pending at once.

  What a crash can lose, precisely. *The proxy dies alone* (SIGKILL, a crash): nothing it
  answered. The writer's input ends; it writes every row it received, then exits (no orphan
  is left). The one exception is a writer more than a pipe's worth behind (1 MiB on Linux,
  about 650 vectors of 384 dimensions; 64 KiB elsewhere): the rows the pipe could not take yet
  wait in the proxy's memory and die with it. *The writer dies alone*: nothing; the proxy sees
  its exit, logs a warning, counts it in ``cache_errors``, starts another and hands it every
  row not yet committed. *Both die at once* (the process group killed, the machine's power
  lost): the rows received and not yet committed, those answered in about the last
  ``SERVER_WRITE_DELAY`` plus one write. A lost vector is paid for again when next asked for;
  a row is committed whole or not at all. (The pipes are served by the event loop: a POSIX
  system is needed.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from embedcache import _config
from embedcache.cache import EmbeddingCache
from embedcache.server import _writer
from embedcache.server._metrics import Metrics

__all__ = ["CacheWriter", "RecentVectors"]

logger = logging.getLogger("embedcache.server")

#: seconds before a writer process that failed at once is started again (doubling, up to the max)
_FIRST_BACKOFF = 1.0
_MAX_BACKOFF = 60.0
#: writers killed by a signal before their first answer that are replaced at once, in a row
_MAX_KILLED = 3

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
    keys: list[bytes]
    rows: list[bytes]  # the vectors as float32 bytes, the objects held in ``pending``
    frame: bytes  # what the writer process is sent


class _Acks:
    """The writer process's answers: ``u64 seq``, ``u32 n``, an error message of ``n`` bytes."""

    def __init__(self, writer: CacheWriter) -> None:
        self.writer = writer
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        at, head = 0, _writer.ACK.size
        while len(buf) - at >= head:
            seq, n = _writer.ACK.unpack_from(buf, at)
            if len(buf) < at + head + n:
                break
            error = bytes(buf[at + head : at + head + n]).decode("utf-8", "replace")
            at += head + n
            self.writer._acked(seq, error)
        del buf[:at]


class _PipeWriter:
    """Writes to a non-blocking pipe from the event loop: at once, and what the pipe cannot
    take yet when it can. A pipe whose reader is gone takes nothing more (the writer's exit
    is seen on its answers, and every row not committed is sent again)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop, self.fd = loop, fd
        self.buffer = bytearray()
        self.closing = self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed or self.closing:
            return
        if not self.buffer:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._close()
                return
            if n == len(data):
                return
            self.loop.add_writer(self.fd, self._drain)
            self.buffer += memoryview(data)[n:]
        else:
            self.buffer += data

    def _drain(self) -> None:
        try:
            n = os.write(self.fd, self.buffer)
        except BlockingIOError:
            return
        except OSError:
            self._close()
            return
        del self.buffer[:n]
        if not self.buffer:
            self.loop.remove_writer(self.fd)
            if self.closing:
                self._close()

    def close(self) -> None:
        """Close once what is buffered is sent."""
        self.closing = True
        if not self.buffer:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.buffer.clear()
            self.loop.remove_writer(self.fd)
            os.close(self.fd)


class CacheWriter:
    """Writes answered vectors to ``cache`` in a background process, in batches
    (:mod:`._writer`).

    Use it from one event loop. :meth:`add` never waits: it hands the rows to the writer
    process (through a pipe, in the same step) and keeps them in :attr:`pending` until the
    writer answers that they are committed. :meth:`flush` waits until every vector added so
    far is committed (or its write failed, which is logged and counted in the
    ``cache_errors`` metric: such vectors are fetched again when next asked for). A writer
    process that dies is reported the same way (a warning and ``cache_errors``), started
    again, and handed every row not yet committed.
    """

    def __init__(self, cache: EmbeddingCache, metrics: Metrics) -> None:
        self.cache = cache
        self.metrics = metrics
        self.batch_rows = _config.SERVER_WRITE_ROWS
        self.delay = _config.SERVER_WRITE_DELAY
        #: answered vectors (float32 bytes) by raw key, until their write commits
        self.pending: dict[bytes, bytes] = {}
        self._unacked: dict[int, _Write] = {}  # by sequence number, in order
        self._seq = 0
        self._process: subprocess.Popen | None = None
        self._rows: _PipeWriter | None = None
        self._acks: _Acks | None = None
        self._idle: asyncio.Event | None = None
        self._closing = False
        self._flushing = 0
        self._ack_fd = -1
        self._progressed = False  # whether the writer now running has answered
        self._retry_at = 0.0  # no writer is started before this (time.monotonic())
        self._backoff = _FIRST_BACKOFF
        self._killed = 0  # writers killed by a signal in a row before they answered

    @property
    def pid(self) -> int | None:
        """The writer process's id (``None`` before the first write)."""
        return None if self._process is None else self._process.pid

    def _start(self) -> None:
        """Start a writer process, with a pipe for rows and one for its answers."""
        loop = asyncio.get_running_loop()
        rows_r, rows_w = os.pipe()
        acks_r, acks_w = os.pipe()
        with contextlib.suppress(OSError, AttributeError, ImportError):  # Linux: room for a few writes
            import fcntl

            fcntl.fcntl(rows_w, fcntl.F_SETPIPE_SZ, 1 << 20)  # type: ignore[attr-defined]
        cache = self.cache
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(_writer.__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        for name in ("OPENAI_API_KEY", "IONOS_API_TOKEN"):  # it needs no key: none goes with it
            env.pop(name, None)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "embedcache.server._writer", cache.directory,
                 "-" if cache.size_limit is None else str(cache.size_limit), repr(cache._timeout),
                 str(rows_r), str(acks_w), str(self.batch_rows), repr(self.delay)],
                pass_fds=(rows_r, acks_w), stdin=subprocess.DEVNULL, env=env)
        finally:
            os.close(rows_r)
            os.close(acks_w)
        self._progressed = False
        os.set_blocking(rows_w, False)
        os.set_blocking(acks_r, False)
        self._acks = _Acks(self)
        self._rows = _PipeWriter(loop, rows_w)
        self._ack_fd = acks_r
        loop.add_reader(acks_r, self._read_acks)

    def _read_acks(self) -> None:
        try:
            data = os.read(self._ack_fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        assert self._acks is not None
        if data:
            self._acks.data_received(data)
        else:
            self._lost(self._acks)

    def add(self, source: tuple[str, str, int | None], keys: list[bytes], vectors: np.ndarray,
            rows: list[bytes]) -> None:
        """Hand ``vectors`` (finite float32 (n, d)) to the writer under ``keys``; ``rows`` are
        the same vectors as bytes, served from :attr:`pending` until the write commits."""
        if self._idle is None:
            self._idle = asyncio.Event()
        if self._rows is None:  # (a writer that died is started again when its exit is seen)
            if time.monotonic() < self._retry_at or not self._try_start():
                return  # no writer (its failure was logged): these vectors are not cached
        assert self._rows is not None
        self._seq += 1
        frame = _writer.encode_write(self._seq, source, keys, np.ascontiguousarray(vectors, "<f4").tobytes(),
                                     vectors.shape[1])
        self._unacked[self._seq] = _Write(keys, rows, frame)
        self.pending.update(zip(keys, rows))
        self.metrics.pending_writes.set(len(self.pending))
        self._idle.clear()
        self._rows.write(frame)

    def _try_start(self) -> bool:
        try:
            self._start()
        except OSError as exc:
            self._failed_start(f"the cache writer process could not start: {exc}")
            return False
        return True

    def _failed_start(self, message: str) -> None:
        """A writer that could not start, or exited before writing anything: its rows are
        dropped (as a failed write's are) and no other is started for ``_backoff`` seconds."""
        dropped = self._drop(self._unacked)
        logger.warning("%s; %d vectors not written; trying again in %g s", message, dropped, self._backoff)
        self.metrics.cache_errors.inc()
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(2 * self._backoff, _MAX_BACKOFF)
        self._rows = None

    def _drop(self, writes: dict[int, _Write]) -> int:
        """Forget ``writes``: out of the unanswered ones, their rows out of ``pending``."""
        pending, n = self.pending, 0
        for seq in list(writes):
            write = self._unacked.pop(seq)
            n += len(write.keys)
            for key, row in zip(write.keys, write.rows):
                if pending.get(key) is row:
                    del pending[key]
        self.metrics.pending_writes.set(len(pending))
        if not self._unacked and self._idle is not None:
            self._idle.set()
        return n

    def _acked(self, seq: int, error: str) -> None:
        """Every write up to ``seq`` is done (committed, or failed with ``error``)."""
        self._progressed = True
        self._backoff = _FIRST_BACKOFF
        self._killed = 0
        if error:
            logger.warning("%s", error)
            self.metrics.cache_errors.inc()
        pending, unacked = self.pending, self._unacked
        # Here, on the loop's thread: a request's lookup (memory, then disk) never runs
        # between the commit and this removal, so it finds the item in one.
        while unacked:
            first = next(iter(unacked))
            if first > seq:
                break
            write = unacked.pop(first)
            for key, row in zip(write.keys, write.rows):
                if pending.get(key) is row:
                    del pending[key]
        self.metrics.pending_writes.set(len(pending))
        if not unacked and self._idle is not None:
            self._idle.set()

    def _lost(self, acks: _Acks) -> None:
        """The writer process's answers ended: it exited (or was killed)."""
        if acks is not self._acks:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._ack_fd)
        os.close(self._ack_fd)
        assert self._rows is not None and self._process is not None
        self._rows._close()
        self._acks = None
        code = self._process.wait()
        if self._closing and not self._unacked:
            return
        if not self._progressed:
            # killed by a signal before its first answer (by someone, not by its cache): its rows
            # go to the next one, like those of a writer killed later; a writer that exits on its
            # own without writing anything (an unusable cache directory...), or is killed again
            # and again before it answers, is a failed start
            if code >= 0 or self._killed >= _MAX_KILLED:
                self._failed_start(f"the cache writer process exited (code {code}) without writing anything")
                return
            self._killed += 1
        logger.warning("the cache writer process exited (code %s) with %d vectors not yet written; "
                       "starting it again", code, sum(len(w.keys) for w in self._unacked.values()))
        self.metrics.cache_errors.inc()
        if not self._try_start():
            return
        assert self._rows is not None
        for write in self._unacked.values():
            self._rows.write(write.frame)
        if self._closing or self._flushing:
            self._rows.write(_writer.FLUSH)

    async def flush(self) -> None:
        """Wait until everything added so far is written (at once, without the delay)."""
        if self._rows is None or self._idle is None or not self._unacked:
            return
        self._flushing += 1
        try:
            self._rows.write(_writer.FLUSH)
            await self._idle.wait()
        finally:
            self._flushing -= 1

    async def aclose(self) -> None:
        """Write everything still pending, then end the writer process."""
        await self.flush()
        self._closing = True
        if self._rows is None or self._process is None:
            return
        self._rows.close()  # its input ends: the writer exits
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._process.wait)
        if self._acks is not None:
            loop.remove_reader(self._ack_fd)
            os.close(self._ack_fd)
            self._acks = None
