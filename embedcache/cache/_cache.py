"""EmbeddingCache: float32 vectors on disk, keyed by a hash of the text and its embedder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedcache._validation import check_number
from embedcache.cache import _codec, _space
from embedcache.cache._diskcache import Table
from embedcache.errors import InvalidInputError, InvalidInputTypeError

__all__ = ["CacheEvictionWarning", "EmbeddingCache"]


class CacheEvictionWarning(RuntimeWarning):
    """Writing vectors evicted others that were paid for, to keep the cache under its size
    limit; they will be paid for again when they are needed."""


def _default_directory() -> Path:
    explicit = os.environ.get("EMBEDCACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "embedcache"
    return Path.home() / ".cache" / "embedcache"


def _rows(vectors: object, n: int) -> list[np.ndarray]:
    """n 1-D vectors (of any lengths), each as a finite float32 (1, d) array."""
    try:
        rows = [np.asarray(v) for v in vectors]  # type: ignore[union-attr]
    except TypeError:
        raise InvalidInputTypeError(
            f"vectors must be a 2-D array or a sequence of 1-D arrays, got {type(vectors).__name__}"
        ) from None
    if len(rows) != n:
        raise InvalidInputError(f"expected {n} vectors, one per key, got {len(rows)}")
    for i, v in enumerate(rows):
        if v.ndim != 1:
            raise InvalidInputError(f"vectors[{i}] must be a 1-D array, got shape {v.shape}")
        rows[i] = _codec.float32_rows(v[None, :], f"vectors[{i}]")
    return rows


class EmbeddingCache:
    """A process-safe cache of float32 vectors keyed by :meth:`make_key`.

    directory: where the cache lives (created if missing). Default: ``$EMBEDCACHE_DIR``, else
        ``$XDG_CACHE_HOME/embedcache``, else ``~/.cache/embedcache``.
    size_limit: ``None`` (the default): keep everything, never evict. Else bytes on disk (an
        int, or a str such as ``"500MB"``, ``"40GB"``, ``"2GiB"``) beyond which the oldest
        writes of this object are evicted (``least-recently-stored``: reads never write);
        :meth:`put` returns how many, :class:`CachedEmbedder` counts and warns, and
        :meth:`info` keeps the lifetime count. A vector of ``d`` dimensions takes its
        ``4 * d`` bytes and a share of its database page on disk
        (:func:`~embedcache.cache._space.entry_bytes`: 2,128 bytes at 384-d, 4,688 at 1024-d).
    timeout: seconds a write waits for another process's write to finish before
        :class:`~embedcache.errors.CacheError`.

    Use :meth:`get_many` and :meth:`set_many`: one SQL statement per 900 keys and one
    transaction per call, many times faster than one ``get`` per key. A write the machine
    refuses (full disk, file-size limit, read-only file) raises
    :class:`~embedcache.errors.CacheError` naming the directory and keeps nothing of that
    call; what was written before is still served. So does a write that would leave less than
    256 MB free on the cache's disk, before it starts (the message says how much is free).

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
        size_limit: int | str | None = None,
        timeout: float = 60.0,
    ) -> None:
        size_limit = _space.parse_size("size_limit", size_limit)
        timeout = check_number("timeout", timeout)
        if not timeout > 0:
            raise InvalidInputError(f"timeout must be > 0 seconds, got {timeout:g}")
        path = Path(directory).expanduser() if directory is not None else _default_directory()
        self._directory = str(path)
        self._size_limit = size_limit
        self._timeout = timeout
        self._table = Table(self._directory, size_limit=size_limit, timeout=timeout)

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
        return _codec.digests(namespace, model, dimensions, [text])[0].hex()

    @staticmethod
    def raw_keys(namespace: str, model: str, dimensions: int | None, texts: Sequence[str]) -> list[bytes]:
        """The keys of ``texts`` (validated ``str``) as 32 raw bytes each, the form
        :meth:`lookup` and :meth:`put` take: ``bytes.fromhex(make_key(...))``, faster."""
        return _codec.digests(namespace, model, dimensions, texts)

    # ------------------------------------------------------------------ reads and writes

    def lookup(self, keys: list[bytes], dimensions: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The batch read every other read goes through.

        keys: distinct raw keys (see :meth:`raw_keys`).
        dimensions: the length of the vectors wanted; ``None``: that of the first valid value.

        Returns ``found``, (n,) bool, and ``vectors``, a new float32 (n, dimensions) array
        whose rows where ``found`` is True hold the cached vectors (the others are
        uninitialised), or ``None`` when ``dimensions`` is None and nothing valid was found.
        A missing, expired, damaged or non-bytes entry, or one of another length, is not found.
        """
        n = len(keys)
        found = np.zeros(n, dtype=bool)
        vectors = None
        dim = dimensions
        size = None if dim is None else _codec.value_size(dim)
        for start, values in self._table.select(keys, size):
            if dim is None and (dim := _codec.first_dim(values)) is None:
                continue
            if vectors is None:
                vectors = np.empty((n, dim), dtype=np.float32)
            stop = start + len(values)
            found[start:stop] = _codec.decode(keys[start:stop], values, vectors[start:stop])
        return found, vectors

    def put(
        self, keys: list[bytes], vectors: np.ndarray, *, source: tuple[str, str, int | None] | None = None
    ) -> int:
        """Store row i of ``vectors`` (finite float32 (n, d), checked by the caller) under raw
        key ``keys[i]``, all in one transaction; a key given twice keeps its last row.

        source: the (namespace, model, dimensions) the keys were made from, counted per
            namespace in :meth:`info` and removed by :meth:`prune`; ``None``: not recorded.

        Returns how many older entries were evicted to stay under the size limit.
        """
        label = None if source is None else (source[0], source[1], source[2] or 0)
        return self._table.replace(dict(zip(keys, _codec.encode(keys, vectors))), label)

    def get_many(self, keys: Sequence[str]) -> list[np.ndarray | None]:
        """The vector stored under each key (float32, 1-D), or ``None`` for a miss.

        A missing, expired, damaged or non-bytes entry is a miss.
        """
        raw = _codec.parse_keys(keys)
        got: dict[bytes, np.ndarray] = {}
        todo = list(dict.fromkeys(raw))
        while todo:  # one round per vector length present (one, in practice)
            found, vectors = self.lookup(todo)
            if vectors is None or not found.any():
                break
            got.update((todo[j], vectors[j]) for j in np.flatnonzero(found))
            todo = [k for k, f in zip(todo, found.tolist()) if not f]
        return [got.get(k) for k in raw]

    def set_many(self, keys: Sequence[str], vectors: np.ndarray | Sequence[np.ndarray]) -> None:
        """Store ``vectors[i]`` under ``keys[i]``, all in one transaction.

        vectors: array of shape (n, d), or n 1-D arrays; any float dtype, stored as float32.
        Non-finite values are refused. A key given twice keeps its last vector.
        """
        raw = _codec.parse_keys(keys)
        if isinstance(vectors, np.ndarray) and vectors.ndim != 1:
            matrix = _codec.float32_rows(vectors, "vectors")
            if matrix.shape[0] != len(raw):
                raise InvalidInputError(f"expected {len(raw)} vectors, one per key, got {matrix.shape[0]}")
            values = _codec.encode(raw, matrix)
        elif isinstance(vectors, np.ndarray):
            raise InvalidInputError(f"vectors must be a 2-D array (n, d), got shape {vectors.shape}")
        else:
            values = [_codec.encode([k], v)[0] for k, v in zip(raw, _rows(vectors, len(raw)))]
        self._table.replace(dict(zip(raw, values)))

    # ------------------------------------------------------------------ housekeeping

    @property
    def directory(self) -> str:
        return self._directory

    @property
    def size_limit(self) -> int | None:
        """Bytes beyond which the oldest writes are evicted; ``None``: no limit."""
        return self._size_limit

    def info(self) -> dict[str, Any]:
        """What the cache holds, read from a few counters (as fast at 10M entries as at 10).

        ``directory``; ``entries``; ``size_bytes`` (on disk); ``size_limit`` (``None``: no
        limit); ``evicted``: entries evicted over the cache's lifetime, by any process;
        ``free_bytes``: free space on its disk; ``page_size``: that of its database, fixed when
        the cache was made (it sets what an entry costs); ``namespaces``: one dict per (namespace,
        model, dimensions) with entries, ``{"namespace", "model", "dimensions", "entries",
        "vector_dimensions"}`` (``dimensions``: the embedder's setting, ``None`` when it left it
        to the model; ``vector_dimensions``: the length of the vectors last written), for the
        vectors written by :class:`CachedEmbedder` or :meth:`put` with a ``source``.
        """
        return {
            "directory": self._directory,
            "entries": len(self._table),
            "size_bytes": self._table.volume(),
            "size_limit": self._size_limit,
            "evicted": self._table.evicted(),
            "free_bytes": _space.free_bytes(self._directory),
            "page_size": self._table.page_size,
            "namespaces": [
                {"namespace": ns, "model": model, "dimensions": dims or None, "entries": n,
                 "vector_dimensions": (size - _codec.HEADER_SIZE) // 4 if size else None}
                for ns, model, dims, n, size in self._table.sources()
            ],
        }

    def prune(self, namespace: str) -> int:
        """Remove every vector written under ``namespace`` (see :meth:`info`), whatever its
        model and dimensions, a few thousand per transaction; returns how many were removed.
        Vectors written without a ``source`` are not touched."""
        if not isinstance(namespace, str):
            raise InvalidInputTypeError(f"namespace must be a str, got {type(namespace).__name__}")
        return self._table.prune(namespace)

    def clear(self) -> int:
        """Remove every entry; returns how many were removed."""
        return self._table.clear()

    def __len__(self) -> int:
        return len(self._table)

    def close(self) -> None:
        """Close this thread's database connection (it reopens on next use)."""
        self._table.close()

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
