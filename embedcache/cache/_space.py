"""Bytes: sizes written for people (``500MB``, ``40GB``), what a cached vector costs on disk,
and the free-space rule every write of the cache obeys.

What an entry costs
    A vector of ``d`` float32 components is a value of ``4 * d + 48`` bytes (the codec's
    header). SQLite stores it in a row of its table with the key and diskcache's other
    columns, and as many whole rows fit on a page as fit: a row never shares a page
    partially, so the cost of an entry is a page divided by the rows it holds (a row larger
    than the page spills into overflow pages), plus its entries in the key, store-time and
    expire-time indexes. :func:`entry_bytes` follows SQLite's page layout, and is within 1%
    of what caches of 384-, 768-, 1024- and 1536-d vectors take on disk at every page size
    from 4 to 64 KiB (``benchmarks/bench_cache.py --study``). With the 4 KiB pages of a new
    cache: 2,128 bytes per 384-d entry (1,536 of vector), 4,176 per 768-d (3,072), 4,688 per
    1024-d (4,096; the rest of the value spills into one overflow page), 8,272 per 1536-d.
"""

from __future__ import annotations

import math
import re
import shutil

from embedcache import _config
from embedcache._validation import check_int
from embedcache.errors import CacheError, InvalidInputError

__all__ = ["check_free_space", "entry_bytes", "format_size", "parse_size", "stored_bytes"]

#: bytes of a row's record beyond its value: record header (14), key (32), two times (16), tag
_RECORD_EXTRA = 63
#: bytes of a table cell beyond its record: payload length and rowid varints, cell pointer
_CELL_EXTRA = 8
#: bytes per entry in the indexes on (key, raw), store_time and expire_time, measured
#: (B-tree pages of random keys are about three quarters full)
_INDEX_BYTES = 80

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)
_NO_LIMIT = ("none", "unlimited")


def parse_size(name: str, value: object) -> int | None:
    """A size limit in bytes from an int or a string such as ``"500MB"``, ``"40GB"``,
    ``"1.5GiB"`` or ``"1000000"`` (k, M, G, T are powers of 1000; KiB, MiB, GiB, TiB of 1024);
    ``None``, ``"none"`` or ``"unlimited"``: no limit.

    >>> parse_size("size", "500MB"), parse_size("size", "2GiB"), parse_size("size", "none")
    (500000000, 2147483648, None)
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in _NO_LIMIT:
            return None
        m = _SIZE.fullmatch(value)
        unit = _UNITS.get(m[2].lower()) if m else None
        if m is None or unit is None:
            raise InvalidInputError(
                f"{name} must be a number of bytes or a size such as 500MB, 40GB or 2GiB "
                f"(or 'none' for no limit), got {value!r:.60}"
            )
        value = math.floor(float(m[1]) * unit)
    return check_int(name, value, 1)


def format_size(n: int | float | None) -> str:
    """``n`` bytes for people: ``"1.5 GB"``; ``None``: ``"no limit"``.

    >>> format_size(1_500_000_000), format_size(512), format_size(None)
    ('1.5 GB', '512 B', 'no limit')
    """
    if n is None:
        return "no limit"
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def stored_bytes(value: int, page_size: int | None = None) -> int:
    """Estimated bytes on disk of one cache entry whose value is ``value`` bytes, in a database
    of ``page_size`` pages (``None``: that of a new cache, ``_config.CACHE_PAGE_SIZE``).

    SQLite's layout (https://sqlite.org/fileformat2.html, B-tree pages): a record up to
    ``page - 35`` bytes lies whole on a table leaf, with as many others as fit; a larger one
    keeps a part on the leaf and the rest in overflow pages of ``page - 4`` bytes each.

    >>> stored_bytes(4 * 384 + 48, 4096), stored_bytes(4 * 384 + 48, 65536)
    (2128, 1760)
    """
    page = int(_config.CACHE_PAGE_SIZE if page_size is None else page_size)
    payload = value + _RECORD_EXTRA
    max_local = page - 35
    if payload <= max_local:
        table = page / max((page - 8) // (payload + _CELL_EXTRA), 1)
    else:
        min_local = (page - 12) * 32 // 255 - 23
        local = min_local + (payload - min_local) % (page - 4)
        if local > max_local:
            local = min_local
        overflow = -(-(payload - local) // (page - 4))
        table = page / max((page - 8) // (local + 4 + _CELL_EXTRA), 1) + overflow * page
    return round(table + _INDEX_BYTES)


def entry_bytes(dimensions: int, page_size: int | None = None) -> int:
    """Estimated bytes on disk of one cached vector of ``dimensions`` float32 components (see
    :func:`stored_bytes`).

    >>> entry_bytes(384, 4096), entry_bytes(1024, 4096)
    (2128, 4688)
    """
    return stored_bytes(4 * dimensions + 48, page_size)


def free_bytes(directory: str) -> int:
    """Free bytes on the disk that holds ``directory`` (for this user)."""
    return int(shutil.disk_usage(directory).free)


def check_free_space(directory: str, n: int, payload: int, page_size: int | None = None) -> None:
    """Refuse, with :class:`~embedcache.errors.CacheError`, a write of ``n`` values of
    ``payload`` bytes in all, into a database of ``page_size`` pages, that would leave less
    than ``_config.CACHE_MIN_FREE_BYTES`` free on the cache's disk. The write goes through
    SQLite's write-ahead log first, so it counts twice."""
    need = 2 * n * stored_bytes(-(-payload // max(n, 1)), page_size)
    try:
        free = free_bytes(directory)
    except OSError:
        return  # the write itself will say what is wrong
    keep = _config.CACHE_MIN_FREE_BYTES
    if free - need < keep:
        raise CacheError(
            f"not writing to the embedding cache at {directory!r}: its disk has {format_size(free)} "
            f"free, and writing {n} vectors (about {format_size(need)}) would leave less than the "
            f"{format_size(keep)} kept free; free some space, move the cache (EMBEDCACHE_DIR or "
            "--cache-dir), or remove a model's vectors (embedcache cache prune --namespace ...)"
        )
