"""Which keys a cache surely does not hold, answered in memory (for the proxy's misses).

Looking up 64 absent keys in SQLite costs some 0.1 to 0.7 ms (more as the cache grows, and
while another process commits); most of a miss request's time on a proxy. :class:`KeyFilter`
answers "absent" from the first 8 bytes of every key of the cache, held as sorted ``uint64``
arrays, in a few microseconds.

It is *sound*: "absent" is never wrong, so an item already paid for is never paid for again;
"maybe present" can be (two keys sharing 8 bytes, a row since deleted), and then SQLite is
asked as before. Rows committed by any process after the filter was loaded (the library's,
another proxy's, this proxy's own writer) are read before the next answer: each answer first
asks SQLite whether another connection committed (``PRAGMA data_version``, a microsecond or
two), and if one did, reads the rows added since the last look by rowid, together with the
count of deletions that could let SQLite reuse a rowid
(:class:`~embedcache.cache._diskcache.KeyReader`). If that count moved, the filter reloads in
the background and answers "cannot tell" (``None``) meanwhile, as it does before its first
load completes and after any read error: the caller then asks SQLite for every key.

Memory: 8 bytes per cache entry in the sorted arrays (80 MB for 10 million entries), about
twice that while a load runs (the chunks read and the array they are joined into), plus about
90 bytes for each entry added since the last merge, at most ``_config.KEYFILTER_MERGE_KEYS``
(65,536: some 6 MB) of them. Keys of deleted rows stay until the next full load (they cost
only a SQLite lookup when asked for).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence

import numpy as np

from embedcache import _config
from embedcache.cache._cache import EmbeddingCache
from embedcache.cache._diskcache import KeyReader
from embedcache.errors import CacheError

__all__ = ["KeyFilter"]

logger = logging.getLogger("embedcache.cache")

#: seconds before a load that failed is tried again
_RETRY_SECONDS = 5.0


def prefixes(buffer: bytes, stride: int) -> np.ndarray:
    """The big-endian ``uint64`` of the first 8 of every ``stride`` bytes of ``buffer``, as native
    ``uint64`` (their order is the keys' byte order)."""
    return np.frombuffer(buffer, dtype=">u8")[:: stride // 8].astype(np.uint64)


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two sorted arrays as one, in O(len(a) + len(b))."""
    if not len(a):
        return b
    return np.insert(a, np.searchsorted(a, b), b)


def _member(sorted_values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    n = len(sorted_values)
    if not n:
        return np.zeros(len(queries), dtype=bool)
    at = np.searchsorted(sorted_values, queries)
    np.minimum(at, n - 1, out=at)
    return sorted_values[at] == queries


class KeyFilter:
    """The key prefixes of every entry of ``cache``, kept current, to tell absent keys apart.

    :meth:`start` loads them in a background thread (:meth:`load` in this one);
    :meth:`absent` answers for a batch of raw keys. Use :meth:`absent` from one thread.

    >>> import tempfile, numpy as np
    >>> cache = EmbeddingCache(tempfile.mkdtemp())
    >>> k1, k2 = EmbeddingCache.raw_keys("demo", "m", None, ["stored", "new"])
    >>> cache.put([k1], np.ones((1, 3), dtype=np.float32))
    0
    >>> keys = KeyFilter(cache)
    >>> keys.absent([k1, k2]) is None  # not loaded yet: cannot tell
    True
    >>> keys.load()
    >>> keys.absent([k1, k2]).tolist()
    [False, True]
    >>> cache.put([k2], np.ones((1, 3), dtype=np.float32))  # another connection's commit
    0
    >>> keys.absent([k1, k2]).tolist()
    [False, False]
    >>> keys.close(); cache.close()
    """

    def __init__(self, cache: EmbeddingCache) -> None:
        self._reader = KeyReader(cache._table)
        self._lock = threading.Lock()
        self._base = np.empty(0, dtype=np.uint64)  # sorted; the bulk of the keys
        self._mid = np.empty(0, dtype=np.uint64)  # sorted; keys added since the last merge into base
        self._recent: set[int] = set()  # keys read since the last merge into mid
        self._top = 0  # highest rowid read
        self._tail = -1  # tail_deletes when last read
        self._version: int | None = None  # data_version when last read
        self._ready = False
        self._loading = False
        self._closed = False
        self._retry_at = 0.0

    @property
    def ready(self) -> bool:
        """Whether :meth:`absent` answers (a load completed and nothing since called for another)."""
        return self._ready

    def __len__(self) -> int:
        """Key prefixes held (with duplicates, and keys of rows deleted since the last load)."""
        return len(self._base) + len(self._mid) + len(self._recent)

    # ------------------------------------------------------------------ loading

    def start(self) -> None:
        """Load in a background thread, unless a load runs or failed less than 5 s ago."""
        with self._lock:
            if self._closed or self._loading or self._ready or time.monotonic() < self._retry_at:
                return
            self._loading = True
        threading.Thread(target=self._load_logged, name="embedcache-key-filter", daemon=True).start()

    def _load_logged(self) -> None:
        try:
            self.load()
        except CacheError as exc:
            logger.warning("the filter of absent keys could not load; asking the cache for every key: %s", exc)

    def load(self) -> None:
        """Read every key of the cache (streamed, ``_config.KEYFILTER_CHUNK`` rows at a time)."""
        with self._lock:
            try:
                self._ready = False
                parts = []
                tail = top = 0
                with contextlib.closing(self._reader.read(None, _config.KEYFILTER_CHUNK)) as chunks:
                    for tail, top, buffer in chunks:
                        if self._closed:
                            return
                        parts.append(prefixes(buffer, 8))
                base = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
                del parts
                if len(base) > 1 and not bool((base[:-1] <= base[1:]).all()):
                    base.sort()  # (the key index is read in key order: this does not happen in practice)
                self._base, self._mid, self._recent = base, np.empty(0, dtype=np.uint64), set()
                self._tail, self._top, self._version = tail, top, None
                self._ready = True
            except CacheError:
                self._retry_at = time.monotonic() + _RETRY_SECONDS
                raise
            finally:
                self._loading = False

    def close(self) -> None:
        """Stop a load under way and close the connection."""
        self._closed = True
        self._ready = False
        with self._lock:
            self._reader.close()

    # ------------------------------------------------------------------ answers

    def absent(self, keys: Sequence[bytes]) -> np.ndarray | None:
        """``(len(keys),)`` bool: True where the raw key (32 bytes) is surely not in the cache;
        ``None`` when the filter cannot tell now (not loaded, reloading, a read error)."""
        if not self._ready or not self._lock.acquire(blocking=False):
            self.start()
            return None
        try:
            if not self._ready:
                return None
            reader = self._reader
            version = reader.data_version()
            if version != self._version and not self._catch_up():
                self._ready = False  # rowids may have been reused: read everything again
                self._retry_at = 0.0
                return None
            self._version = version
            joined = b"".join(keys)
            if len(joined) != 32 * len(keys):
                return None
            q = prefixes(joined, 32)
            present = _member(self._base, q)
            if len(self._mid):
                present |= _member(self._mid, q)
            if self._recent:
                recent = self._recent
                present |= np.fromiter((x in recent for x in q.tolist()), dtype=bool, count=len(q))
            return ~present
        except CacheError as exc:
            logger.warning("the filter of absent keys failed; asking the cache for every key: %s", exc)
            self._ready = False
            self._retry_at = time.monotonic() + _RETRY_SECONDS
            return None
        finally:
            self._lock.release()
            if not self._ready:
                self.start()

    def _catch_up(self) -> bool:
        """Read the rows added since the last look; False if rowids may have been reused."""
        recent = self._recent
        with contextlib.closing(self._reader.read(self._top, _config.KEYFILTER_CHUNK)) as chunks:
            for tail, top, buffer in chunks:
                if tail != self._tail:
                    return False
                if buffer:
                    recent.update(prefixes(buffer, 8).tolist())
        self._top = top
        if len(recent) > _config.KEYFILTER_MERGE_KEYS:
            new = np.fromiter(recent, dtype=np.uint64, count=len(recent))
            new.sort()
            self._mid = _merge(self._mid, new)
            recent.clear()
            if len(self._mid) > len(self._base) // 4:
                self._base, self._mid = _merge(self._base, self._mid), np.empty(0, dtype=np.uint64)
        return True
