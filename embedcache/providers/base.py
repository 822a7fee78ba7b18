"""The ``Embedder`` protocol shared by every provider, and input validation.

An embedder turns a sequence of non-empty strings into an ``(n, d)`` float32 array, rows in
input order. ``cache_namespace`` says whose vectors these are: two embedders that could
return different vectors for the same text never share a namespace, so a cache keyed by it
never serves one model's vectors for another.

``embed`` accepts ``on_batch(positions, vectors)``: called as each batch of results arrives
(possibly out of order, from the thread that received it), with ``positions`` an int64 array
of indices into ``texts`` and ``vectors`` the matching rows. :class:`embedcache.CachedEmbedder`
uses it to write what was paid for before the whole call finishes.

Providers count what they spend in a :class:`Usage` (``usage.add(requests=1)`` per request
sent, ``usage.add(tokens=n)`` per reply). Every ``add`` is also counted by the
:func:`metered` blocks open in the calling context, so a caller learns what *its* call cost
even while other threads use the same provider. A provider that works in a thread pool
submits its work with ``contextvars.copy_context().run`` so that the pool's threads report
to the caller's meters.
"""

from __future__ import annotations

import threading
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from embedcache.errors import InvalidInputError, InvalidInputTypeError

__all__ = [
    "BatchCallback",
    "Embedder",
    "Usage",
    "metered",
    "normalize_text",
    "validate_texts",
]

BatchCallback = Callable[[np.ndarray, np.ndarray], None]


@runtime_checkable
class Embedder(Protocol):
    """What :class:`embedcache.CachedEmbedder` and the workflows need of an embedder."""

    #: provider kind, endpoint host, model and dimensions, e.g. ``"openai|host|model|1024"``
    cache_namespace: str
    #: model identifier as the provider knows it
    model: str
    #: requested output dimension, or ``None`` for the model's native one
    dimensions: int | None

    def embed(
        self, texts: Sequence[str], *, on_batch: BatchCallback | None = None
    ) -> np.ndarray:
        """Embed ``texts``: array of shape (n, d), float32, rows in input order."""
        ...


@dataclass
class Usage:
    """Cumulative request and token counters of one provider (thread-safe increments).

    Pickles as its counts (a copy in another process counts on from there).
    """

    requests: int = 0
    tokens: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, requests: int = 0, tokens: int = 0) -> None:
        """Count ``requests`` and ``tokens`` here and in every :func:`metered` block open in
        the calling context."""
        self._count(requests, tokens)
        for meter in _meters.get():
            meter._count(requests, tokens)

    def _count(self, requests: int, tokens: int) -> None:
        with self._lock:
            self.requests += requests
            self.tokens += tokens

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.requests, self.tokens

    def __getstate__(self) -> dict[str, int]:
        return {"requests": self.requests, "tokens": self.tokens}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(state["requests"], state["tokens"])  # type: ignore[misc]


_meters: ContextVar[tuple[Usage, ...]] = ContextVar("embedcache_usage_meters", default=())


@contextmanager
def metered() -> Iterator[Usage]:
    """A fresh :class:`Usage` counting every ``Usage.add`` made in this context until the block
    ends: by this thread, by tasks it starts, by ``asyncio.to_thread`` and by pool work
    submitted with a copy of the context. Other threads' work is not counted.

    >>> provider = Usage()
    >>> with metered() as mine:
    ...     provider.add(requests=1, tokens=5)
    >>> provider.add(requests=1)
    >>> mine.snapshot(), provider.snapshot()
    ((1, 5), (2, 5))
    """
    meter = Usage()
    token = _meters.set((*_meters.get(), meter))
    try:
        yield meter
    finally:
        _meters.reset(token)


def normalize_text(text: str) -> str:
    """``text`` in Unicode normalization form NFC, so that canonically equivalent spellings of
    the same visible text (``"caf\\u00e9"`` and ``"cafe\\u0301"``) compare equal.

    >>> normalize_text("cafe\\u0301") == normalize_text("caf\\u00e9") == "caf\\u00e9"
    True
    """
    return unicodedata.normalize("NFC", text)


def validate_texts(
    texts: object, *, allow_empty_list: bool = False, what: str = "texts"
) -> list[str]:
    """Return ``texts`` as a list of str, or raise naming the first offending position.

    Accepts any sequence or iterable of ``str`` (a single ``str`` is refused: it would be
    embedded character by character). Empty strings and non-strings are errors, as is an
    empty list unless ``allow_empty_list``. ``what`` names the argument in messages (the
    vector store checks its ids with it too).
    """
    if isinstance(texts, (str, bytes)):
        raise InvalidInputTypeError(
            f"{what} must be a sequence of strings, got a single {type(texts).__name__}; "
            "wrap it in a list"
        )
    if texts is None:
        raise InvalidInputTypeError(f"{what} must be a sequence of strings, got None")
    try:
        items = list(texts)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidInputTypeError(
            f"{what} must be a sequence of strings, got {type(texts).__name__}"
        ) from None
    if not items and not allow_empty_list:
        raise InvalidInputError(f"{what} must contain at least one string, got an empty sequence")
    if not all(issubclass(t, str) for t in set(map(type, items))):  # C-speed screen, then the culprit
        i, t = next((i, t) for i, t in enumerate(items) if not isinstance(t, str))
        raise InvalidInputTypeError(f"{what}[{i}] must be a str, got {type(t).__name__}: {t!r:.60}")
    if "" in items:
        raise InvalidInputError(
            f"{what}[{items.index('')}] is an empty string; every item of {what} must be non-empty"
        )
    return items
