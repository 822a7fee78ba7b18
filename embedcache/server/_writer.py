"""The proxy's cache writer, a process of its own: ``python -m embedcache.server._writer``.

Writing a vector to the cache costs some 30 microseconds of SQLite and Python work per row; in a
thread of the proxy that work holds the interpreter's lock in parts, and every request waits
for it. In a process of its own it does not. The proxy (:class:`~._memory.CacheWriter`) hands
it rows through a pipe; it writes them to the library's cache with
:meth:`~embedcache.EmbeddingCache.put` (the same file, key scheme and format as the library) and
answers, through a second pipe, the sequence number up to which every row is committed.

Frames, little-endian, each ``u32 length`` then ``length`` bytes:

* to the writer, a write: ``b"W"``, ``u64 seq``, ``u32 rows``, ``u32 dim``, ``u32 n``, ``n``
  bytes of the source (JSON ``[namespace, model, dimensions]``), ``32 * rows`` bytes of raw keys,
  ``4 * rows * dim`` bytes of float32 vectors;
* to the writer, ``b"F"``: write what was received now, without waiting to gather more;
* from the writer, an answer: ``u64 seq`` (every write up to it is done), then an error
  message in UTF-8, empty when the rows were committed.

Writes gather as in the thread it replaces: a transaction starts once ``rows`` rows wait or
``delay`` seconds after the first of them came, or at once after ``F``. When its input ends
(the proxy closed it, or exited in any way, a SIGKILL included) it writes everything received
and exits, so a proxy that dies leaves no writer behind and loses no row it handed over.
SIGINT and SIGTERM are ignored: a Ctrl-C or a stop sent to the whole process group lets the
proxy shut down first, and the writer ends with its input.
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import sys
import time

__all__ = ["decode_write", "encode_write", "main"]

_HEAD = struct.Struct("<cQIII")
_LEN = struct.Struct("<I")
ACK = struct.Struct("<QI")
FLUSH = _LEN.pack(1) + b"F"


def encode_write(seq: int, source: tuple[str, str, int | None], keys: list[bytes], vectors: bytes,
                 dim: int) -> bytes:
    """The frame of one write: ``keys`` (32 bytes each) and ``vectors`` (their float32 rows)."""
    src = json.dumps(list(source)).encode()
    body_len = _HEAD.size + len(src) + 32 * len(keys) + len(vectors)
    return b"".join((_LEN.pack(body_len), _HEAD.pack(b"W", seq, len(keys), dim, len(src)), src, *keys, vectors))


def decode_write(body: bytes) -> tuple[int, tuple[str, str, int | None], list[bytes], bytes, int]:
    """``(seq, source, keys, vectors, dim)`` of a write frame's body (without its length)."""
    _, seq, rows, dim, n = _HEAD.unpack_from(body)
    at = _HEAD.size
    namespace, model, dimensions = json.loads(body[at : at + n])
    at += n
    keys = [body[at + 32 * i : at + 32 * (i + 1)] for i in range(rows)]
    at += 32 * rows
    return seq, (namespace, model, dimensions), keys, body[at : at + 4 * rows * dim], dim


def encode_ack(seq: int, error: str = "") -> bytes:
    message = error.encode("utf-8", "replace")
    return ACK.pack(seq, len(message)) + message


class _Input:
    """Frames from a file descriptor, read as they come."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self.ended = False

    def fill(self, timeout: float | None) -> None:
        """Read what is there, waiting at most ``timeout`` seconds (``None``: until some comes)."""
        if self.ended:
            return
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            data = os.read(self.fd, 1 << 20)
            if data:
                self.buffer += data
            else:
                self.ended = True

    def frames(self) -> list[bytes]:
        out = []
        buf = self.buffer
        at = 0
        while len(buf) - at >= 4:
            (n,) = _LEN.unpack_from(buf, at)
            if len(buf) - at - 4 < n:
                break
            out.append(bytes(buf[at + 4 : at + 4 + n]))
            at += 4 + n
        del buf[:at]
        return out


def _commit(cache, writes: list, np) -> str:  # type: ignore[no-untyped-def]
    """One transaction per source and vector length; an error message, or ``""``."""
    parts: dict = {}
    for _, source, keys, vectors, dim in writes:
        part = parts.setdefault((tuple(source), dim), ([], []))
        part[0].extend(keys)
        part[1].append(vectors)
    try:
        for (source, dim), (keys, blobs) in parts.items():
            rows = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(keys), dim)
            cache.put(keys, rows, source=source)
    except Exception as exc:  # a full disk, a locked or read-only file: the proxy logs it
        return f"cache write of {sum(len(w[2]) for w in writes)} vectors failed: {exc}"
    return ""


def run(directory: str, size_limit: int | None, timeout: float, rows_fd: int, acks_fd: int,
        batch_rows: int, delay: float) -> None:
    """Write what comes on ``rows_fd`` until it ends; answer on ``acks_fd``."""
    import numpy as np

    from embedcache.cache import EmbeddingCache

    cache = EmbeddingCache(directory, size_limit=size_limit, timeout=timeout)
    source = _Input(rows_fd)
    writes: list = []
    rows = 0
    first = 0.0
    urgent = False
    answer = True  # whether the proxy still reads the answers
    try:
        while True:
            if not writes:
                wait: float | None = None
            elif urgent or source.ended or rows >= batch_rows:
                wait = 0.0
            else:
                wait = first + delay - time.monotonic()
            if not source.ended and (wait is None or wait > 0):
                source.fill(wait)
            for frame in source.frames():
                if frame[:1] == b"F":
                    urgent = True
                    continue
                write = decode_write(frame)
                if not writes:
                    first = time.monotonic()
                writes.append(write)
                rows += len(write[2])
            if writes and (urgent or source.ended or rows >= batch_rows or time.monotonic() >= first + delay):
                error = _commit(cache, writes, np)
                if answer:
                    try:
                        os.write(acks_fd, encode_ack(writes[-1][0], error))
                    except OSError:  # the proxy is gone: write what is left, then end
                        answer = False
                if error and not answer:
                    print(f"embedcache cache writer: {error}", file=sys.stderr, flush=True)
                writes, rows = [], 0
            if not writes:
                urgent = False
                if source.ended:  # (a partial frame left means the proxy died while handing it over)
                    return
    finally:
        cache.close()


def main(argv: list[str] | None = None) -> None:
    """``DIRECTORY SIZE_LIMIT TIMEOUT ROWS_FD ACKS_FD BATCH_ROWS DELAY`` (``SIZE_LIMIT`` ``-``: none)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    directory, size_limit, timeout, rows_fd, acks_fd, batch_rows, delay = argv if argv is not None else sys.argv[1:]
    run(directory, None if size_limit == "-" else int(size_limit), float(timeout), int(rows_fd), int(acks_fd),
        int(batch_rows), float(delay))


if __name__ == "__main__":
    main()
