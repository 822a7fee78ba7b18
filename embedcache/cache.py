"""A content-hash cache of embedding vectors, and an embedder that uses it.

:class:`EmbeddingCache` keeps float32 vectors in a `diskcache`_ directory (one SQLite file,
safe for several threads and processes at once). :class:`CachedEmbedder` wraps any
:class:`~embedcache.providers.base.Embedder` so that a text is never embedded twice.

Keys
    SHA-256 over a length-prefixed encoding of (format version, namespace, model,
    dimensions, text). Every field carries a tag and its byte length, so no two different
    tuples encode to the same bytes (model ``"a"`` + text ``"bc"`` is not model ``"ab"`` +
    text ``"c"``), and nothing is truncated. :meth:`EmbeddingCache.make_key` gives it as 64
    hex digits; the database stores the 32 raw bytes.

Values
    A 48-byte header (magic ``b"ECv1"``, dtype code, dimension, a checksum: the sum of the
    payload's 32-bit words modulo 2**32, and the entry's own 32-byte key) followed by the
    raw little-endian float32 components, stored inline in the database row. A value whose header, length or checksum
    does not match is a miss, never an error. Values are checked a block at a time with
    numpy, so reading is bound by SQLite, not by Python.

Nothing is ever unpickled
    diskcache pickles every value that is not ``bytes``/``str``/number, and unpickles what
    it reads back, so whoever can write to the cache directory could run code in the
    reading process (CVE-2025-69872). This module stores bytes only, through a
    :class:`diskcache.Disk` subclass that refuses to write anything else and refuses to read
    any row that is not raw bytes; the batch reader applies the same rule itself.

Eviction
    ``least-recently-stored``: when the database grows past ``size_limit``, the oldest
    writes go first. Reads never write (unlike least-recently-used, which updates a row on
    every hit).

.. _diskcache: https://grantjenks.com/docs/diskcache/
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache
import numpy as np
from tqdm.auto import tqdm

from embedcache.errors import (
    CacheError,
    DimensionMismatchError,
    InvalidInputError,
    InvalidInputTypeError,
    InvalidResponseError,
)
from embedcache.providers.base import BatchCallback, Embedder, Usage, metered, validate_texts

__all__ = ["CachedEmbedder", "EmbedStats", "EmbeddingCache"]

#: Bumped whenever the key encoding or the value layout changes: old entries become misses.
FORMAT_VERSION = 1

_MAGIC = b"ECv1"
_DTYPE_FLOAT32 = 1
# magic, dtype code, 3 pad bytes, dimension, checksum of the payload, the entry's own key
_HEADER = struct.Struct("<4sB3xII32s")
_HEADER_SIZE = _HEADER.size  # 48: keeps the payload 16-byte aligned within the value
_KEY_AT = 16
_MAX_DIM = 2**24
_FLOAT32_LE = np.dtype("<f4")
_LENGTH = struct.Struct(">Q")

# SQLite builds before 3.32 allow 999 parameters per statement.
_SQL_CHUNK = 900

#: texts per call to an embedder whose ``embed`` takes no ``on_batch`` (and has no ``batch_size``)
_MISS_CHUNK = 256


# --------------------------------------------------------------------------- keys


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _LENGTH.pack(len(payload)) + payload


def _utf8(s: str) -> bytes:
    # surrogatepass keeps the encoding injective for strings with lone surrogates
    return s.encode("utf-8", "surrogatepass")


def _key_prefix(namespace: str, model: str, dimensions: int | None) -> Any:
    """A SHA-256 object fed with every field but the text, to be ``copy()``-ed per text."""
    for name, value in (("namespace", namespace), ("model", model)):
        if not isinstance(value, str):
            raise InvalidInputTypeError(f"{name} must be a str, got {type(value).__name__}")
    if dimensions is None:
        dims = _field(b"D", b"")
    elif isinstance(dimensions, (int, np.integer)) and not isinstance(dimensions, bool):
        dims = _field(b"I", str(int(dimensions)).encode("ascii"))
    else:
        raise InvalidInputTypeError(
            f"dimensions must be an int or None, got {type(dimensions).__name__}"
        )
    h = hashlib.sha256()
    h.update(_field(b"V", str(FORMAT_VERSION).encode("ascii")))
    h.update(_field(b"N", _utf8(namespace)))
    h.update(_field(b"M", _utf8(model)))
    h.update(dims)
    return h


def _digests(prefix: Any, texts: list[str]) -> list[bytes]:
    """The 32-byte key of each text: ``prefix`` + the text's field (``_field(b"T", ...)``,
    inlined: this loop is on the hot path)."""
    copy, pack, out = prefix.copy, _LENGTH.pack, []
    for t in texts:
        b = _utf8(t)
        h = copy()
        h.update(b"T" + pack(len(b)) + b)
        out.append(h.digest())
    return out


def _parse_keys(keys: Sequence[str]) -> list[bytes]:
    """Public hex keys to the 32-byte form stored in the database."""
    if isinstance(keys, (str, bytes)):
        raise InvalidInputTypeError("keys must be a sequence of str keys, got a single key")
    out = []
    for i, k in enumerate(keys):
        if type(k) is not str:
            raise InvalidInputTypeError(f"keys[{i}] must be a str, got {type(k).__name__}")
        try:
            b = bytes.fromhex(k)
        except ValueError:
            b = b""
        if len(b) != 32:
            raise InvalidInputError(
                f"keys[{i}] must be a key from EmbeddingCache.make_key (64 hex digits), got {k!r:.80}"
            )
        out.append(b)
    return out


# --------------------------------------------------------------------------- values


def _checksum(words: np.ndarray) -> np.ndarray:
    """Sum of the payload's little-endian uint32 words modulo 2**32, per row of ``words``."""
    return words.sum(axis=-1, dtype=np.uint32)


def _expected_header(dim: int) -> np.ndarray:
    """The first 12 header bytes of every valid value of dimension ``dim``."""
    return np.frombuffer(_HEADER.pack(_MAGIC, _DTYPE_FLOAT32, dim, 0, b"")[:12], dtype=np.uint8)


def _key_rows(keys: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)


def _encode_rows(keys: list[bytes], vectors: np.ndarray) -> list[bytes]:
    """The value of each (key, row) of a finite float32 (n, d) array."""
    n, dim = vectors.shape
    buf = np.empty((n, _HEADER_SIZE + 4 * dim), dtype=np.uint8)
    buf[:, :12] = _expected_header(dim)
    buf[:, _KEY_AT : _KEY_AT + 32] = _key_rows(keys)
    payload = buf[:, _HEADER_SIZE:].view(_FLOAT32_LE)
    payload[:] = vectors
    buf[:, 12:16].view("<u4")[:, 0] = _checksum(payload.view("<u4"))
    raw = buf.tobytes()
    size = buf.shape[1]
    return [raw[i * size : (i + 1) * size] for i in range(n)]


def _decode_block(
    blobs: list[bytes], dim: int, keys: list[bytes] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Check values that all have the length of dimension ``dim``.

    Returns ``ok`` (m,) bool, whether header, checksum and (unless ``keys`` is None) the
    embedded key match, and a float32 (m, dim) view of the payloads (rows where ``ok`` is
    False hold garbage).
    """
    size = _HEADER_SIZE + 4 * dim
    buf = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), size)
    words = buf[:, _HEADER_SIZE:].view("<u4")
    ok = (buf[:, :12] == _expected_header(dim)).all(axis=1)
    ok &= buf[:, 12:16].view("<u4")[:, 0] == _checksum(words)
    if keys is not None:
        ok &= (buf[:, _KEY_AT : _KEY_AT + 32] == _key_rows(keys)).all(axis=1)
    return ok, words.view(_FLOAT32_LE)


def _value_dim(blob: bytes | None) -> int | None:
    """The dimension of a valid value, or ``None``."""
    if blob is None or len(blob) <= _HEADER_SIZE or (len(blob) - _HEADER_SIZE) % 4:
        return None
    dim = (len(blob) - _HEADER_SIZE) // 4
    ok, _ = _decode_block([blob], dim, None)
    return dim if ok[0] else None


def _aligned(keys: list[bytes], values: list[bytes | None]) -> list[bytes | None]:
    """``values`` in the order of ``keys``, going by the key each value carries.

    SQLite returns the rows of a VALUES list joined to an index in the list's order, but
    SQL does not promise it: a reader that finds a value under the wrong position calls
    this rather than trusting the order.
    """
    carried = {v[_KEY_AT : _KEY_AT + 32]: v for v in values if v is not None}
    return [carried.get(k) for k in keys]


def _finite_float32(x: np.ndarray, label: str) -> np.ndarray:
    """``x`` as C-contiguous float32, refusing non-float dtypes and non-finite values."""
    if x.dtype.kind != "f":
        raise InvalidInputTypeError(f"{label} must be floating point, got dtype {x.dtype}")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise InvalidInputError(
            f"{label} must be finite (as float32), got NaN or infinity at index {first}"
        )
    return out


def _as_matrix(vectors: np.ndarray, n: int) -> np.ndarray:
    """Validate a 2-D array for :meth:`EmbeddingCache.set_many`: (n, d) finite floats."""
    if vectors.shape[0] != n:
        raise InvalidInputError(f"expected {n} vectors, one per key, got {vectors.shape[0]}")
    if not 1 <= vectors.shape[1] <= _MAX_DIM:
        raise DimensionMismatchError(
            f"vectors must have 1..{_MAX_DIM} components, got shape {vectors.shape}"
        )
    return _finite_float32(vectors, "vectors")


def _as_rows(vectors: object, n: int) -> list[np.ndarray]:
    """Validate n 1-D vectors (of any lengths) for :meth:`EmbeddingCache.set_many`."""
    if isinstance(vectors, np.ndarray):
        raise DimensionMismatchError(
            f"vectors must be a 2-D array (n, d), got shape {vectors.shape}"
        )
    try:
        rows = [np.asarray(v) for v in vectors]  # type: ignore[union-attr]
    except TypeError:
        raise InvalidInputTypeError(
            f"vectors must be a 2-D array or a sequence of 1-D arrays, got {type(vectors).__name__}"
        ) from None
    if len(rows) != n:
        raise InvalidInputError(f"expected {n} vectors, one per key, got {len(rows)}")
    for i, v in enumerate(rows):
        if v.ndim != 1 or not 1 <= v.shape[0] <= _MAX_DIM:
            raise DimensionMismatchError(
                f"vectors[{i}] must be 1-D with 1..{_MAX_DIM} components, got shape {v.shape}"
            )
        rows[i] = _finite_float32(v, f"vectors[{i}]")
    return rows


# --------------------------------------------------------------------------- diskcache


class _RefusedValue(OSError):
    """A row that is not raw bytes; diskcache treats an ``OSError`` from fetch as a miss."""


class BytesOnlyDisk(diskcache.Disk):
    """A :class:`diskcache.Disk` that stores ``bytes`` or ``str`` keys and ``bytes`` values,
    inline, and never pickles or unpickles anything.

    Writing any other value raises :class:`~embedcache.errors.InvalidInputTypeError`;
    reading a row stored in another mode (a pickle, a file) is refused as a miss.
    """

    def put(self, key: object) -> tuple[bytes | str, bool]:
        if type(key) is not bytes and type(key) is not str:
            raise InvalidInputTypeError(f"cache keys must be bytes or str, got {type(key).__name__}")
        return key, True

    def get(self, key: object, raw: bool) -> bytes | str:
        if raw and type(key) in (bytes, str):
            return key  # type: ignore[return-value]
        raise CacheError("refusing to read a cache key that is not plain bytes or str")

    def store(self, value: object, read: bool, key: object = diskcache.core.UNKNOWN) -> tuple:
        if read or type(value) is not bytes:
            raise InvalidInputTypeError(
                f"the embedding cache stores bytes only, got {type(value).__name__}"
            )
        return 0, diskcache.core.MODE_RAW, None, value

    def fetch(self, mode: int, filename: str | None, value: object, read: bool) -> bytes:
        if mode != diskcache.core.MODE_RAW or filename is not None or type(value) is not bytes:
            raise _RefusedValue(f"refusing a cache row stored in mode {mode}, not raw bytes")
        return value

    def remove(self, file_path: str) -> None:
        # Values are never files here, so a row naming one was written by someone else:
        # delete it (on eviction, replacement or clear) only if it lies inside the cache.
        root = os.path.realpath(self._directory)
        target = os.path.realpath(os.path.join(root, file_path))
        if os.path.commonpath([root, target]) == root and target != root:
            super().remove(file_path)


def _default_directory() -> Path:
    explicit = os.environ.get("EMBEDCACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "embedcache"
    return Path.home() / ".cache" / "embedcache"


class EmbeddingCache:
    """A size-limited, process-safe cache of float32 vectors keyed by :meth:`make_key`.

    directory: where the cache lives (created if missing). Default: ``$EMBEDCACHE_DIR``, else
        ``$XDG_CACHE_HOME/embedcache``, else ``~/.cache/embedcache``.
    size_limit: bytes on disk beyond which the oldest writes are evicted.
    timeout: seconds a write waits for another process's write to finish before
        :class:`~embedcache.errors.CacheError`.

    Use :meth:`get_many` and :meth:`set_many`: one SQL statement per 900 keys and one
    transaction per call, many times faster than one ``get`` per key.

    >>> import tempfile, numpy as np
    >>> with EmbeddingCache(tempfile.mkdtemp()) as cache:
    ...     key = EmbeddingCache.make_key("demo", "m", None, "hello")
    ...     cache.set_many([key], np.ones((1, 3), dtype=np.float32))
    ...     cache.get_many([key, EmbeddingCache.make_key("demo", "m", None, "bye")])
    [array([1., 1., 1.], dtype=float32), None]
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        size_limit: int = 4 * 2**30,
        timeout: float = 60.0,
    ) -> None:
        if isinstance(size_limit, bool) or not isinstance(size_limit, (int, np.integer)):
            raise InvalidInputTypeError(f"size_limit must be an int, got {type(size_limit).__name__}")
        if size_limit <= 0:
            raise InvalidInputError(f"size_limit must be > 0 bytes, got {size_limit}")
        if not timeout > 0:
            raise InvalidInputError(f"timeout must be > 0 seconds, got {timeout}")
        path = Path(directory).expanduser() if directory is not None else _default_directory()
        self._directory = str(path)
        self._size_limit = int(size_limit)
        self._timeout = float(timeout)
        try:
            self._dc = diskcache.Cache(
                self._directory,
                timeout=self._timeout,
                disk=BytesOnlyDisk,
                size_limit=self._size_limit,
                eviction_policy="least-recently-stored",
                statistics=0,
                tag_index=0,
                sqlite_mmap_size=2**30,  # reads of a large cache go through memory, not read()
            )
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            raise CacheError(
                f"cannot open the embedding cache at {self._directory!r}: {exc}"
            ) from exc

    # ------------------------------------------------------------------ keys

    @staticmethod
    def make_key(namespace: str, model: str, dimensions: int | None, text: str) -> str:
        """The cache key (64 hex characters) of ``text`` embedded by one embedder.

        >>> k = EmbeddingCache.make_key("ns", "a", None, "bc")
        >>> len(k), k == EmbeddingCache.make_key("ns", "ab", None, "c")
        (64, False)
        """
        if not isinstance(text, str):
            raise InvalidInputTypeError(f"text must be a str, got {type(text).__name__}")
        return _digests(_key_prefix(namespace, model, dimensions), [text])[0].hex()

    # ------------------------------------------------------------------ reads and writes

    def get_many(self, keys: Sequence[str]) -> list[np.ndarray | None]:
        """The vector stored under each key (float32, 1-D), or ``None`` for a miss.

        A missing, expired, damaged or non-bytes entry is a miss.
        """
        keys = _parse_keys(keys)
        out: list[np.ndarray | None] = [None] * len(keys)
        where: dict[bytes, list[int]] = {}
        for i, k in enumerate(keys):
            where.setdefault(k, []).append(i)
        distinct = list(where)
        for chunk, values in self._select(distinct):
            if any(v is not None and v[_KEY_AT : _KEY_AT + 32] != k for k, v in zip(chunk, values)):
                values = _aligned(chunk, values)
            by_size: dict[int, list[int]] = {}
            for j, v in enumerate(values):
                if v is not None and len(v) > _HEADER_SIZE and not (len(v) - _HEADER_SIZE) % 4:
                    by_size.setdefault(len(v), []).append(j)
            for size, js in by_size.items():
                ok, vecs = _decode_block(
                    [values[j] for j in js], (size - _HEADER_SIZE) // 4, [chunk[j] for j in js]  # type: ignore[misc]
                )
                block = np.array(vecs)  # one contiguous copy; each result row is a view of it
                for j, good, row in zip(js, ok, block):
                    if good:
                        for i in where[chunk[j]]:
                            out[i] = row
        return out

    def set_many(self, keys: Sequence[str], vectors: np.ndarray | Sequence[np.ndarray]) -> None:
        """Store ``vectors[i]`` under ``keys[i]``, all in one transaction.

        vectors: array of shape (n, d), or n 1-D arrays; any float dtype, stored as float32.
        Non-finite values are refused. A key given twice keeps its last vector.
        """
        keys = _parse_keys(keys)
        if isinstance(vectors, np.ndarray) and vectors.ndim == 2:
            values = _encode_rows(keys, _as_matrix(vectors, len(keys)))
        else:
            rows = _as_rows(vectors, len(keys))
            values = [_encode_rows([k], v[None, :])[0] for k, v in zip(keys, rows)]
        self._store(dict(zip(keys, values)))

    def _select(
        self, keys: list[bytes], size: int | None = None
    ) -> Iterator[tuple[list[bytes], list[bytes | None]]]:
        """``(chunk, values)``: the stored values of each chunk of distinct ``keys``.

        One SELECT per chunk, a ``VALUES`` list LEFT JOINed to the key index: one row per
        key, ``None`` where absent, in the list's order in practice (not by contract: every
        value carries its key, and readers check it). Only the value column comes back, and
        a read never writes. Only raw rows stored inline qualify: a pickled or file-backed
        row is never read. ``size``: only values of exactly this many bytes qualify.
        """
        now = time.time()
        size_filter = "" if size is None else f" AND length(c.value) = {int(size)}"
        try:
            sql = self._dc._sql  # the cache's own (thread-local, fork-aware) connection
            for start in range(0, len(keys), _SQL_CHUNK):
                chunk = keys[start : start + _SQL_CHUNK]
                rows = sql(
                    f"SELECT c.value FROM (VALUES {','.join(['(?)'] * len(chunk))}) AS q"
                    " LEFT JOIN Cache AS c ON c.key = q.column1 AND c.raw = 1"
                    f" AND c.mode = {diskcache.core.MODE_RAW} AND c.filename IS NULL"
                    f" AND typeof(c.value) = 'blob'{size_filter}"
                    " AND (c.expire_time IS NULL OR c.expire_time > ?)",
                    (*chunk, now),
                ).fetchall()
                if len(rows) != len(chunk):
                    raise CacheError(f"expected {len(chunk)} rows from the cache, got {len(rows)}")
                yield chunk, [r[0] for r in rows]
        except sqlite3.Error as exc:
            raise CacheError(f"cannot read the embedding cache at {self._directory!r}: {exc}") from exc

    def _store(self, values: dict[bytes, bytes]) -> None:
        """Insert or replace ``values`` in one transaction, keeping diskcache's accounting."""
        if not values:
            return
        keys = list(values)
        now = time.time()
        try:
            with self._dc._transact(retry=False) as (sql, cleanup):
                existing: dict[bytes, tuple[int, str | None]] = {}
                for start in range(0, len(keys), _SQL_CHUNK):
                    chunk = keys[start : start + _SQL_CHUNK]
                    rows = sql(
                        "SELECT key, rowid, filename FROM Cache WHERE raw = 1"
                        f" AND key IN ({','.join('?' * len(chunk))})",
                        chunk,
                    ).fetchall()
                    existing.update((k, (rowid, fn)) for k, rowid, fn in rows)
                con = self._dc._con
                con.executemany(
                    "UPDATE Cache SET store_time = ?, expire_time = NULL, access_time = ?,"
                    " access_count = 0, tag = NULL, size = 0, mode = ?, filename = NULL,"
                    " value = ? WHERE rowid = ?",
                    [
                        (now, now, diskcache.core.MODE_RAW, values[k], rowid)
                        for k, (rowid, _) in existing.items()
                    ],
                )
                con.executemany(
                    "INSERT INTO Cache(key, raw, store_time, expire_time, access_time,"
                    " access_count, tag, size, mode, filename, value)"
                    " VALUES (?, 1, ?, NULL, ?, 0, NULL, 0, ?, NULL, ?)",
                    [
                        (k, now, now, diskcache.core.MODE_RAW, v)
                        for k, v in values.items()
                        if k not in existing
                    ],
                )
                for _, filename in existing.values():
                    cleanup(filename)  # files of replaced rows are removed after COMMIT
                self._evict(sql, cleanup, now)
        except diskcache.Timeout as exc:
            raise CacheError(
                f"the embedding cache at {self._directory!r} stayed locked by another writer "
                f"for more than {self._timeout:g} s"
            ) from exc
        except sqlite3.Error as exc:
            raise CacheError(f"cannot write the embedding cache at {self._directory!r}: {exc}") from exc

    def _evict(self, sql: Any, cleanup: Any, now: float) -> None:
        """Least-recently-stored eviction, inside the writing transaction.

        diskcache culls up to ``cull_limit`` rows per ``set`` while over the limit; a batch
        removes about as many of the oldest rows as bring the cache back under the limit
        (estimated from the mean row size: freed pages are returned at COMMIT), and never the
        rows it has just written.
        """
        volume = self._dc.volume()
        if volume < self._size_limit:
            return
        count = max(len(self._dc), 1)
        excess = int((volume - self._size_limit) * count / volume) + self._dc.cull_limit
        rows = sql(
            "SELECT rowid, filename FROM Cache WHERE store_time < ? ORDER BY store_time LIMIT ?",
            (now, excess),
        ).fetchall()
        for start in range(0, len(rows), _SQL_CHUNK):
            chunk = rows[start : start + _SQL_CHUNK]
            sql(f"DELETE FROM Cache WHERE rowid IN ({','.join('?' * len(chunk))})", [r[0] for r in chunk])
        for _, filename in rows:
            cleanup(filename)

    # ------------------------------------------------------------------ housekeeping

    @property
    def directory(self) -> str:
        return self._directory

    @property
    def size_limit(self) -> int:
        return self._size_limit

    def info(self) -> dict[str, Any]:
        """``directory``, ``entries``, ``size_bytes`` (on disk) and ``size_limit``."""
        try:
            return {
                "directory": self._directory,
                "entries": len(self._dc),
                "size_bytes": int(self._dc.volume()),
                "size_limit": self._size_limit,
            }
        except sqlite3.Error as exc:
            raise CacheError(f"cannot read the embedding cache at {self._directory!r}: {exc}") from exc

    def clear(self) -> int:
        """Remove every entry; returns how many were removed."""
        try:
            return int(self._dc.clear(retry=True))
        except sqlite3.Error as exc:
            raise CacheError(f"cannot clear the embedding cache at {self._directory!r}: {exc}") from exc

    def __len__(self) -> int:
        return int(len(self._dc))

    def close(self) -> None:
        """Close this thread's database connection (it reopens on next use)."""
        self._dc.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingCache(directory={self._directory!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Pickled as its settings: the copy reopens the same directory (e.g. in a subprocess).
        return {"directory": self._directory, "size_limit": self._size_limit, "timeout": self._timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], size_limit=state["size_limit"], timeout=state["timeout"])  # type: ignore[misc]


# --------------------------------------------------------------------------- CachedEmbedder


@dataclass
class EmbedStats:
    """Cumulative counters of a :class:`CachedEmbedder`.

    hits: distinct texts of each call served from the cache, or by the request another call
        had under way for the same text.
    misses: distinct texts of each call sent to the embedder (a text repeated within one
        call counts once).
    requests, tokens: what the wrapped embedder counted for the requests each call made, in
        a :class:`~embedcache.providers.base.Usage` (0 when it keeps none), whatever other
        threads do with the same embedder meanwhile.
    seconds: wall time spent in ``embed``.
    """

    hits: int = 0
    misses: int = 0
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses), 0.0 before any call."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _check_vectors(vectors: object, rows: int, dim: int | None, what: str) -> np.ndarray:
    """``vectors`` as C-contiguous float32 (rows, d), or InvalidResponseError."""
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or vectors.dtype.kind != "f":
        desc = (
            f"shape {vectors.shape}, dtype {vectors.dtype}"
            if isinstance(vectors, np.ndarray)
            else type(vectors).__name__
        )
        raise InvalidResponseError(f"{what} must be a 2-D float array, got {desc}")
    if vectors.shape[0] != rows:
        raise InvalidResponseError(f"{what}: expected {rows} vectors, got {vectors.shape[0]}")
    if vectors.shape[1] == 0 or (dim is not None and vectors.shape[1] != dim):
        expected = f"dimension {dim}" if dim is not None else "a dimension >= 1"
        raise InvalidResponseError(f"{what}: expected {expected}, got {vectors.shape[1]}")
    try:
        return _finite_float32(vectors, what)
    except InvalidInputError as exc:
        raise InvalidResponseError(str(exc)) from None


def _show_progress(progress: bool | None) -> bool:
    if progress is None:
        stream = sys.stderr
        return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())
    return bool(progress)


def _takes_on_batch(fn: object) -> bool:
    """Whether ``fn`` accepts an ``on_batch=`` keyword (a parameter of that name or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()  # type: ignore[arg-type]
    except (TypeError, ValueError):  # no signature to read: call it the minimal way
        return False
    return any(
        p.kind is p.VAR_KEYWORD
        or (p.name == "on_batch" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        for p in params
    )


def _spans(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _arange(start: int, stop: int) -> np.ndarray:
    return np.arange(start, stop, dtype=np.int64)


class _Pending:
    """A text that one call is requesting. Calls that want it too wait for ``done``, then take
    ``vector``: ``None`` when the request failed, and they ask for the text themselves."""

    __slots__ = ("blocking", "done", "thread", "vector")

    def __init__(self, thread: int, blocking: bool) -> None:
        self.done = threading.Event()
        self.thread = thread  # the thread that drives the requesting call
        self.blocking = blocking  # whether that call blocks its thread (embed, not aembed)
        self.vector: np.ndarray | None = None


class _Call:
    """One ``embed`` call: what was served from the cache, what it waits for from other calls,
    and what the embedder must supply (``missing``, in rounds: a text another call failed to
    get comes back to this one).

    thread, blocking: the thread driving this call, and whether the call blocks it (``embed``)
    or runs in its event loop (``aembed``).
    """

    def __init__(
        self,
        owner: CachedEmbedder,
        texts: object,
        progress: bool | None,
        on_batch: BatchCallback | None,
        usage: Usage,
        *,
        thread: int,
        blocking: bool,
    ) -> None:
        self.owner = owner
        self.user_on_batch = on_batch
        self.progress = progress
        self.usage = usage
        self.thread, self.blocking = thread, blocking
        self._order: np.ndarray | None = None
        self._bounds: np.ndarray | None = None
        self.started = time.perf_counter()
        self.texts = validate_texts(texts)
        prefix = _key_prefix(owner.cache_namespace, owner.model, owner.dimensions)
        digests = _digests(prefix, self.texts)
        # slots: distinct keys in order of first appearance; without repeats, slot == position
        self.inverse: np.ndarray | None = None  # input position -> slot, when there are repeats
        if len(dict.fromkeys(digests)) == len(digests):
            self.keys, self.distinct_texts = digests, self.texts
        else:
            slot_of: dict[bytes, int] = {}
            self.distinct_texts = []
            self.inverse = np.empty(len(digests), dtype=np.int64)
            for i, (t, key) in enumerate(zip(self.texts, digests)):
                slot = slot_of.setdefault(key, len(slot_of))
                if slot == len(self.distinct_texts):
                    self.distinct_texts.append(t)
                self.inverse[i] = slot
            self.keys = list(slot_of)
        self.dim = owner.dimensions
        self.vectors: np.ndarray | None = None
        self.have = np.zeros(len(self.keys), dtype=bool)
        self.n_hits = self.n_misses = 0
        self.claims: dict[int, _Pending] = {}  # slot -> what this call must settle
        self.waiting: list[tuple[int, _Pending]] = []
        self.closed = False
        self.lock = threading.Lock()
        self.bar = None
        self._round(np.zeros(0, dtype=np.int64))
        self._lookup(None)

    def _round(self, slots: np.ndarray) -> None:
        """Make ``slots`` the misses the embedder is asked for next."""
        self.missing = slots
        self.miss_texts = [self.distinct_texts[s] for s in slots]
        self.written = np.zeros(len(slots), dtype=bool)

    def _alloc(self, dim: int) -> None:
        self.vectors = np.empty((len(self.keys), dim), dtype=np.float32)

    def _size(self) -> int | None:
        return None if self.dim is None else _HEADER_SIZE + 4 * self.dim

    def _lookup(self, slots: np.ndarray | None) -> None:
        """Take the valid cached values of ``slots`` (``None``: every slot)."""
        keys = self.keys if slots is None else [self.keys[s] for s in slots]
        start = 0
        for chunk, values in self.owner.cache._select(keys, self._size()):
            stop = start + len(values)
            if self.dim is None:  # the embedder's dimension is the first valid value's
                self.dim = next((d for v in values if (d := _value_dim(v)) is not None), None)
            if self.dim is not None:
                self._take_hits(slice(start, stop) if slots is None else slots[start:stop], chunk, values)
            start = stop

    def _take_hits(
        self, slots: slice | np.ndarray, chunk: list[bytes], values: list[bytes | None]
    ) -> None:
        """Copy the valid values of ``chunk`` (keys of ``slots``) into their slots."""
        if self.vectors is None:
            self._alloc(self.dim)  # type: ignore[arg-type]
        size = self._size()

        def usable() -> list[int]:  # a value of another length under this key is damage
            if None not in values and set(map(len, values)) == {size}:  # type: ignore[arg-type]
                return list(range(len(values)))
            return [j for j, v in enumerate(values) if v is not None and len(v) == size]

        js = usable()
        if not js:
            return
        everything = len(js) == len(values)
        for attempt in range(2):
            ok, vecs = _decode_block(
                values if everything else [values[j] for j in js],  # type: ignore[misc]
                self.dim,  # type: ignore[arg-type]
                chunk if everything else [chunk[j] for j in js],
            )
            if ok.all() or attempt:
                break
            realigned = _aligned(chunk, values)  # a value under the wrong key: SQLite reordered
            if realigned == values:
                break  # no: damaged values, which are misses
            values = realigned
            js = usable()
            everything = len(js) == len(values)
        if everything and ok.all():
            self.vectors[slots] = vecs  # type: ignore[index]
            self.have[slots] = True
            self.n_hits += len(values)
        else:
            picked = np.asarray(js, dtype=np.int64)[ok]
            targets = picked + slots.start if isinstance(slots, slice) else slots[picked]
            self.vectors[targets] = vecs[ok]  # type: ignore[index]
            self.have[targets] = True
            self.n_hits += len(targets)

    def claim(self, slots: np.ndarray) -> None:
        """Get ``slots`` (texts not had yet): wait for those another call is requesting, and
        request the rest, unless the cache has them by now (they may have been written since
        this call looked)."""
        mine, fresh = [], []
        registry = self.owner._inflight
        with self.owner._inflight_lock:
            if self.closed:
                return
            for s in slots.tolist():
                pending = registry.get(self.keys[s])
                if pending is None:
                    self.claims[s] = registry[self.keys[s]] = _Pending(self.thread, self.blocking)
                    fresh.append(s)
                    mine.append(s)
                elif pending.thread == self.thread and (pending.blocking or self.blocking):
                    mine.append(s)  # its call waits on this thread for this one: never wait for it
                else:
                    self.waiting.append((s, pending))
        if fresh:
            found = np.asarray(fresh, dtype=np.int64)
            self._lookup(found)
            found = found[self.have[found]]
            if found.size:
                self._release(found, self.vectors[found])  # type: ignore[index]
                self.deliver(found)
                mine = [s for s in mine if not self.have[s]]
        self._round(np.asarray(mine, dtype=np.int64))
        self.n_misses += len(mine)
        if mine and self.bar is None:
            self.bar = tqdm(total=len(mine), unit="text", desc="embedding",
                            disable=not _show_progress(self.progress))
        elif mine:
            self.bar.total += len(mine)  # type: ignore[union-attr]
            self.bar.refresh()  # type: ignore[union-attr]

    def _release(self, slots: np.ndarray | list[int], rows: np.ndarray | None) -> None:
        """Settle this call's claims on ``slots``: the calls waiting for them get ``rows``
        (copies of the vectors, in the order of ``slots``), or ``None`` to ask themselves."""
        with self.owner._inflight_lock:
            for i, s in enumerate(slots):
                pending = self.claims.pop(int(s), None)
                if pending is not None:
                    pending.vector = None if rows is None else rows[i]
                    del self.owner._inflight[self.keys[s]]
                    pending.done.set()

    def wait(self) -> None:
        """Block until every text this call waits for is settled."""
        for _, pending in self.waiting:
            pending.done.wait()

    async def await_waiting(self) -> None:
        """:meth:`wait` for an event loop: polls, so that no thread is held while waiting."""
        delay = 0.001
        for _, pending in self.waiting:
            while not pending.done.is_set():
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.02)

    def take_waited(self) -> None:
        """Take the texts the other calls got for this one; claim again those they did not."""
        self.wait()
        waited, self.waiting = self.waiting, []
        got = [(s, p.vector) for s, p in waited if p.vector is not None]
        if self.dim is None and got:
            self.dim = got[0][1].shape[0]  # type: ignore[union-attr]
        got = [(s, v) for s, v in got if v.shape[0] == self.dim]  # type: ignore[union-attr]
        if got:
            if self.vectors is None:
                self._alloc(self.dim)  # type: ignore[arg-type]
            slots = np.asarray([s for s, _ in got], dtype=np.int64)
            self.vectors[slots] = np.stack([v for _, v in got])  # type: ignore[index]
            self.have[slots] = True
            self.n_hits += len(slots)
            self.deliver(slots)
        retry = [s for s, _ in waited if not self.have[s]]
        if retry:
            self.claim(np.asarray(retry, dtype=np.int64))

    def on_batch(self, positions: object, vectors: object) -> None:
        """Validate one batch from the embedder and write it to the cache at once."""
        pos = np.asarray(positions)
        n = len(self.missing)
        if pos.ndim != 1 or pos.dtype.kind not in "iu" or (pos.size and (pos.min() < 0 or pos.max() >= n)):
            raise InvalidResponseError(
                f"on_batch positions must be a 1-D integer array of indices in [0, {n}), "
                f"got {pos.dtype} array of shape {pos.shape}"
            )
        with self.lock:
            batch = _check_vectors(vectors, pos.shape[0], self.dim, "embedder batch vectors")
            slots = self._accept(pos.astype(np.int64), batch)
        self.deliver(slots)

    def _accept(self, pos: np.ndarray, batch: np.ndarray) -> np.ndarray:
        """Store validated rows for miss positions ``pos`` (caller holds the lock).

        Returns the slots that were new.
        """
        if self.vectors is None:
            self.dim = batch.shape[1]
            self._alloc(self.dim)
        fresh = ~self.written[pos]
        pos, batch = pos[fresh], batch[fresh]  # boolean indexing: batch is our own copy now
        slots = self.missing[pos]
        if not pos.size:
            return slots
        keys = [self.keys[s] for s in slots]
        self.owner.cache._store(dict(zip(keys, _encode_rows(keys, batch))))
        self.vectors[slots] = batch  # type: ignore[index]
        self.written[pos] = True
        self.have[slots] = True
        self._release(slots, batch)  # after the write: whoever comes later finds it cached
        if self.bar is not None:
            self.bar.update(int(pos.size))
        return slots

    def deliver(self, slots: np.ndarray) -> None:
        """Pass the input positions of ``slots`` and their vectors to the caller's on_batch."""
        if self.user_on_batch is None or not slots.size:
            return
        if self.inverse is None:
            positions = slots
        else:
            if self._bounds is None:  # input positions grouped by slot, built once
                self._order = np.argsort(self.inverse, kind="stable")
                self._bounds = np.searchsorted(self.inverse[self._order], np.arange(len(self.keys) + 1))
            b = self._bounds
            positions = np.concatenate([self._order[b[s] : b[s + 1]] for s in slots])
        rows = positions if self.inverse is None else self.inverse[positions]
        self.user_on_batch(positions, self.vectors[rows])  # type: ignore[index]

    def written_vectors(self) -> np.ndarray:
        """The misses' vectors, once every one came through :meth:`on_batch`."""
        assert self.vectors is not None and self.written.all()
        return self.vectors[self.missing]

    def finish(self, result: object) -> None:
        """Check the embedder's full answer for this round and cache what on_batch did not."""
        with self.lock:
            full = _check_vectors(result, len(self.missing), self.dim, "embedder vectors")
            slots = self._accept(np.arange(len(self.missing)), full)
            self._round(np.zeros(0, dtype=np.int64))
        self.deliver(slots)

    def result(self) -> np.ndarray:
        """The (n, d) answer, once every slot is had."""
        assert self.vectors is not None and self.have.all()
        return self.vectors if self.inverse is None else self.vectors[self.inverse]

    def close(self) -> None:
        """Settle what this call still holds (its waiters then ask themselves) and record its
        counts."""
        with self.owner._inflight_lock:
            self.closed = True  # a claim() still under way in a worker thread takes nothing
            held = list(self.claims)
        self._release(held, None)
        if self.bar is not None:
            self.bar.close()
        requests, tokens = self.usage.snapshot()
        self.owner._record(
            hits=self.n_hits,
            misses=self.n_misses,
            requests=requests,
            tokens=tokens,
            seconds=time.perf_counter() - self.started,
        )


class CachedEmbedder:
    """An :class:`~embedcache.providers.base.Embedder` that asks the wrapped one only for
    texts it has never embedded.

    embedder: any Embedder (its ``cache_namespace``, ``model`` and ``dimensions`` are part of
        every key, and are exposed unchanged, so a CachedEmbedder is itself an Embedder).
        Only ``cache_namespace`` and ``embed(texts)`` are required: ``model`` defaults to
        ``""`` and ``dimensions`` to ``None``. An ``embed`` (or ``aembed``) that takes no
        ``on_batch`` is called on chunks of ``batch_size`` misses (the embedder's attribute,
        else 256), each chunk cached as it returns.
    cache: an :class:`EmbeddingCache`; default: one at the default directory.

    Misses are written to the cache as each batch of results arrives, so an error half-way
    keeps what was already paid for. Vectors that are not a finite 2-D float array of the
    right shape raise :class:`~embedcache.errors.InvalidResponseError` and are never cached.

    One object may serve many threads (and ``aembed`` tasks) at once: a text that one call
    is requesting is not requested again by another; that call waits for the first one's
    answer and counts it as a hit (if the first request fails, the waiting call asks for the
    text itself). Each call counts in :attr:`stats` only the requests and tokens of its own
    requests. A CachedEmbedder pickles (e.g. for ``ProcessPoolExecutor().map(emb.embed,
    chunks)``) when its embedder does: the copy opens the same cache directory, and its
    ``stats`` count on from a copy of this object's.
    """

    def __init__(self, embedder: Embedder, cache: EmbeddingCache | None = None) -> None:
        for attr in ("cache_namespace", "embed"):
            if not hasattr(embedder, attr):
                raise InvalidInputTypeError(
                    f"embedder must follow the Embedder protocol; "
                    f"{type(embedder).__name__} has no {attr!r}"
                )
        if cache is not None and not isinstance(cache, EmbeddingCache):
            raise InvalidInputTypeError(
                f"cache must be an EmbeddingCache or None, got {type(cache).__name__}"
            )
        self.embedder = embedder
        self._embed_takes_on_batch = _takes_on_batch(embedder.embed)
        aembed = getattr(embedder, "aembed", None)
        self._aembed = aembed if callable(aembed) else None
        self._aembed_takes_on_batch = aembed is not None and _takes_on_batch(aembed)
        chunk = getattr(embedder, "batch_size", None)
        valid = isinstance(chunk, (int, np.integer)) and not isinstance(chunk, bool) and chunk >= 1
        self._chunk = int(chunk) if valid else _MISS_CHUNK  # type: ignore[arg-type]
        self._owns_cache = cache is None
        self.cache = cache if cache is not None else EmbeddingCache()
        self._stats = EmbedStats()
        self._init_locks()

    def _init_locks(self) -> None:
        self._stats_lock = threading.Lock()
        # key -> the request for it under way in one call; other calls wanting it wait for it
        self._inflight: dict[bytes, _Pending] = {}
        self._inflight_lock = threading.Lock()

    @property
    def cache_namespace(self) -> str:
        return self.embedder.cache_namespace

    @property
    def model(self) -> str:
        model = getattr(self.embedder, "model", None)
        return "" if model is None else model

    @property
    def dimensions(self) -> int | None:
        return getattr(self.embedder, "dimensions", None)

    @property
    def stats(self) -> EmbedStats:
        """A snapshot of the cumulative counters."""
        with self._stats_lock:
            s = self._stats
            return EmbedStats(s.hits, s.misses, s.requests, s.tokens, s.seconds)

    def _record(self, *, hits: int, misses: int, requests: int, tokens: int, seconds: float) -> None:
        with self._stats_lock:
            self._stats.hits += hits
            self._stats.misses += misses
            self._stats.requests += requests
            self._stats.tokens += tokens
            self._stats.seconds += seconds

    def embed(
        self,
        texts: Sequence[str],
        *,
        progress: bool | None = None,
        on_batch: BatchCallback | None = None,
    ) -> np.ndarray:
        """Vectors of ``texts``: array of shape (n, d), float32, rows in input order.

        progress: ``None`` shows a progress bar over the misses only when stderr is a
            terminal, ``True`` always, ``False`` never.
        on_batch: ``on_batch(positions, vectors)`` as in the Embedder protocol: once for the
            texts served from the cache, then as each batch of misses arrives.
        """
        with metered() as usage:
            call = _Call(self, texts, progress, on_batch, usage, thread=threading.get_ident(), blocking=True)
            try:
                call.deliver(np.flatnonzero(call.have))
                call.claim(np.flatnonzero(~call.have))
                while len(call.missing) or call.waiting:
                    if len(call.missing):
                        call.finish(self._embed_misses(call))
                    call.take_waited()
                return call.result()
            finally:
                call.close()

    async def aembed(
        self,
        texts: Sequence[str],
        *,
        progress: bool | None = None,
        on_batch: BatchCallback | None = None,
    ) -> np.ndarray:
        """:meth:`embed` for callers inside an event loop.

        Uses the wrapped embedder's ``aembed`` when it has one, else runs its ``embed`` in a
        worker thread; the cache lookup runs in a worker thread too. Batches that arrive on
        the event loop are written to the cache there (one short transaction each).
        """
        with metered() as usage:
            call = await asyncio.to_thread(
                _Call, self, texts, progress, on_batch, usage, thread=threading.get_ident(), blocking=False
            )
            try:
                call.deliver(np.flatnonzero(call.have))
                await asyncio.to_thread(call.claim, np.flatnonzero(~call.have))
                while len(call.missing) or call.waiting:
                    if len(call.missing):
                        await asyncio.to_thread(call.finish, await self._aembed_misses(call))
                    await call.await_waiting()
                    await asyncio.to_thread(call.take_waited)
                return call.result()
            finally:
                call.close()

    async def _aembed_misses(self, call: _Call) -> object:
        """:meth:`_embed_misses` for :meth:`aembed`."""
        aembed = self._aembed
        if aembed is None:
            return await asyncio.to_thread(self._embed_misses, call)
        if self._aembed_takes_on_batch:
            return await aembed(call.miss_texts, on_batch=call.on_batch)
        for start, stop in _spans(len(call.miss_texts), self._chunk):
            call.on_batch(_arange(start, stop), await aembed(call.miss_texts[start:stop]))
        return call.written_vectors()

    def _embed_misses(self, call: _Call) -> object:
        """Ask the embedder for ``call``'s misses; what it returns goes to ``call.finish``."""
        if self._embed_takes_on_batch:
            return self.embedder.embed(call.miss_texts, on_batch=call.on_batch)
        for start, stop in _spans(len(call.miss_texts), self._chunk):
            call.on_batch(_arange(start, stop), self.embedder.embed(call.miss_texts[start:stop]))
        return call.written_vectors()

    def close(self) -> None:
        """Close the cache if this object opened it."""
        if self._owns_cache:
            self.cache.close()

    def __enter__(self) -> CachedEmbedder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CachedEmbedder({self.embedder!r}, cache={self.cache!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Locks and the requests under way stay in this process; the copy starts from the
        # counters as they are now.
        local = ("_stats_lock", "_inflight", "_inflight_lock")
        state = {k: v for k, v in self.__dict__.items() if k not in local}
        state["_stats"] = self.stats
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_locks()
