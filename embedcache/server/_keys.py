"""Client keys of the proxy: who may call it, under which name it is counted, how often.

A keys file holds one client key per line; ``#`` starts a comment, blank lines are skipped.
A line may name its key first (``alice sk-team-...``); an unnamed key is counted in metrics
under ``key-`` and the first 8 hex digits of its SHA-256, never under the key itself.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from embedcache.errors import ConfigurationError

__all__ = ["ClientKeys", "RequestRate", "read_keys"]

#: the metric label of every request when the proxy takes no keys
ANONYMOUS = "anonymous"
_MIN_KEY = 8


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def read_keys(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(name, key)`` of each key line of the file at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the client keys file {os.fspath(path)!r}: {exc}") from None
    entries = []
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise ConfigurationError(
                f"{os.fspath(path)!r} line {number}: expected 'KEY' or 'NAME KEY', got {len(words)} words"
            )
        key = words[-1]
        name = words[0] if len(words) == 2 else "key-" + _digest(key).hex()[:8]
        entries.append((name, key))
    if not entries:
        raise ConfigurationError(f"the client keys file {os.fspath(path)!r} holds no key")
    return entries


class ClientKeys:
    """The accepted bearer keys, looked up by digest (the keys themselves are not kept).

    >>> keys = ClientKeys([("alice", "sk-alice-0123456789")])
    >>> keys.name_of("Bearer sk-alice-0123456789"), keys.name_of("Bearer nope"), keys.name_of(None)
    ('alice', None, None)
    """

    def __init__(self, entries: Iterable[tuple[str, str]]) -> None:
        self._names: dict[bytes, str] = {}
        for name, key in entries:
            if len(key) < _MIN_KEY or not all(33 <= ord(c) <= 126 for c in key):
                raise ConfigurationError(
                    f"client key {name!r} must be at least {_MIN_KEY} printable ASCII characters "
                    "without spaces"
                )
            self._names[_digest(key)] = name

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ClientKeys:
        return cls(read_keys(path))

    def __len__(self) -> int:
        return len(self._names)

    def name_of(self, authorization: str | None) -> str | None:
        """The name of the key an ``Authorization: Bearer KEY`` header carries, or ``None``."""
        if not authorization or not authorization[:7].lower() == "bearer ":
            return None
        return self._names.get(_digest(authorization[7:].strip()))

    def __repr__(self) -> str:
        return f"ClientKeys({len(self)} keys)"


@dataclass
class _Bucket:
    tokens: float
    last: float


class RequestRate:
    """A requests-per-second limit per client that refuses rather than queues: a client over
    its limit is told to come back in :meth:`admit`'s answer (seconds).

    >>> clock = iter([0.0, 0.0, 0.0, 1.0]).__next__
    >>> limit = RequestRate(1.0, burst=2, clock=clock)
    >>> [limit.admit("a") for _ in range(4)]
    [0.0, 0.0, 1.0, 0.0]
    """

    def __init__(self, rate: float, burst: int | None = None, *, clock=time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = max(1, int(burst if burst is not None else round(rate)))
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def admit(self, client: str) -> float:
        """0.0 when ``client`` may go now (a token is taken), else seconds until it may."""
        with self._lock:
            now = self._clock()
            b = self._buckets.get(client)
            if b is None:
                b = self._buckets[client] = _Bucket(float(self.burst), now)
            b.tokens = min(float(self.burst), b.tokens + (now - b.last) * self.rate)
            b.last = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return 0.0
            return (1.0 - b.tokens) / self.rate
