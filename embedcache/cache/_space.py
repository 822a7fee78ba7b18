"""Bytes: sizes written for people (``500MB``, ``40GB``), what a cached vector costs on disk,
and the free-space rule every write of the cache obeys.

What an entry costs
    A vector of ``d`` float32 components is a value of ``4 * d + 48`` bytes (the codec's
    header), plus the row's other columns, its share of the page it sits on and its entries
    in the key and store-time indexes: :data:`ENTRY_OVERHEAD` bytes, measured on caches of
    384-d and 1024-d vectors written with 64 KiB pages (``benchmarks/bench_cache.py``): about
    1,760 bytes per 384-d entry (1,536 of vector) and 4,530 per 1024-d entry (4,096 of vector).
"""

from __future__ import annotations

import math
import re
import shutil

from embedcache import _config
from embedcache._validation import check_int
from embedcache.errors import CacheError, InvalidInputError

__all__ = ["ENTRY_OVERHEAD", "check_free_space", "entry_bytes", "format_size", "parse_size"]

#: measured bytes on disk per entry beyond the 4 * d bytes of its vector (header, key, row,
#: page slack, indexes)
ENTRY_OVERHEAD = 330

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


def entry_bytes(dimensions: int) -> int:
    """Estimated bytes on disk of one cached vector of ``dimensions`` float32 components."""
    return 4 * dimensions + ENTRY_OVERHEAD


def free_bytes(directory: str) -> int:
    """Free bytes on the disk that holds ``directory`` (for this user)."""
    return int(shutil.disk_usage(directory).free)


def check_free_space(directory: str, n: int, payload: int) -> None:
    """Refuse, with :class:`~embedcache.errors.CacheError`, a write of ``n`` values of
    ``payload`` bytes in all that would leave less than ``_config.CACHE_MIN_FREE_BYTES`` free
    on the cache's disk. The write goes through SQLite's write-ahead log first, so it counts
    twice."""
    need = 2 * (payload + n * (ENTRY_OVERHEAD - 48))
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
