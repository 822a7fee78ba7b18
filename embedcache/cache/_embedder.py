"""CachedEmbedder: an embedder that asks the wrapped one only for texts it never embedded.

It speaks to the cache only through :meth:`EmbeddingCache.lookup` and
:meth:`EmbeddingCache.put` (raw keys in, vectors out): what a value looks like on disk is
the codec's business. The vectors of each batch are written as the batch arrives; when the
cache cannot be written (a full disk, a file-size limit, a read-only directory, a writer that
holds the lock too long), the call still returns every vector it paid for, with a
:class:`RuntimeWarning` naming the directory and the cause, and stops writing for the rest
of that call.

A text longer than the embedder's ``input_window`` is handled as ``long_texts`` says
(:mod:`embedcache.providers._window`): its chunks are embedded like any text (each one
cached, so a header many texts share is paid for once) and pooled into one vector, cached
under a namespace that names the policy and the window; or its first window is embedded; or
the call is refused. Texts within the window take exactly the path, and the keys, they
always did.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from embedcache import _config
from embedcache.cache._cache import CacheEvictionWarning, EmbeddingCache
from embedcache.cache._codec import float32_rows
from embedcache.cache._space import format_size
from embedcache.errors import CacheError, InvalidInputError, InvalidInputTypeError, InvalidResponseError
from embedcache.providers._window import DEFAULT_LONG_TEXTS, InputWindow, check_long_texts, cut, find_long, pool
from embedcache.providers.base import BatchCallback, Embedder, Usage, metered, validate_texts

__all__ = ["CachedEmbedder", "EmbedStats"]



def _user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by this function's caller that points at
    the first frame outside the embedcache package: the user's line, however deep the call."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

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
    evicted: cached vectors that writing this embedder's misses evicted to keep the cache under
        its size limit (never, without one); each call that evicts warns with a
        :class:`~embedcache.cache.CacheEvictionWarning`.
    long_texts: distinct texts of each call over the embedder's input window.
    chunks: pieces they were embedded as (chunks, or first windows when truncating), whether
        from the cache or not.
    chunk_requests, chunk_tokens: the requests and tokens spent on those pieces (included in
        ``requests`` and ``tokens``): what long texts cost.
    """

    hits: int = 0
    misses: int = 0
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0
    evicted: int = 0
    long_texts: int = 0
    chunks: int = 0
    chunk_requests: int = 0
    chunk_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses), 0.0 before any call."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _check_vectors(vectors: object, rows: int, dim: int | None, what: str) -> np.ndarray:
    """The embedder's ``vectors`` as finite C-contiguous float32 (rows, d), or
    InvalidResponseError: a bad answer is never cached."""
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
        return float32_rows(vectors, what)
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
        digests = owner.cache.raw_keys(owner.cache_namespace, owner.model, owner.dimensions, self.texts)
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
        self.n_evicted = 0  # older entries our writes evicted
        self.claims: dict[int, _Pending] = {}  # slot -> what this call must settle
        self.waiting: list[tuple[int, _Pending]] = []
        self.closed = False
        self.lock = threading.Lock()
        self.bar = None
        self.write_error: CacheError | None = None  # once a write failed, this call writes no more
        self._round(np.zeros(0, dtype=np.int64))
        self._lookup(None)

    def _round(self, slots: np.ndarray) -> None:
        """Make ``slots`` the misses the embedder is asked for next."""
        self.missing = slots
        self.miss_texts = [self.distinct_texts[s] for s in slots]
        self.written = np.zeros(len(slots), dtype=bool)

    def _alloc(self, dim: int) -> None:
        self.vectors = np.empty((len(self.keys), dim), dtype=np.float32)

    def _lookup(self, slots: np.ndarray | None) -> None:
        """Take the cached vectors of ``slots`` (``None``: every slot)."""
        keys = self.keys if slots is None else [self.keys[s] for s in slots]
        found, vectors = self.owner.cache.lookup(keys, self.dim)
        if vectors is None:
            return
        self.dim = vectors.shape[1]  # when unknown, the embedder's dimension is the cache's
        if slots is None:
            self.vectors = vectors  # the lookup's array becomes this call's: no copy
        else:
            if self.vectors is None:
                self._alloc(self.dim)
            self.vectors[slots[found]] = vectors[found]  # type: ignore[index]
        targets = found if slots is None else slots[found]
        self.have[targets] = True
        self.n_hits += int(found.sum())

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
        self._write([self.keys[s] for s in slots], batch)
        self.vectors[slots] = batch  # type: ignore[index]
        self.written[pos] = True
        self.have[slots] = True
        self._release(slots, batch)  # after the write: whoever comes later finds it cached
        if self.bar is not None:
            self.bar.update(int(pos.size))
        return slots

    def _write(self, keys: list[bytes], batch: np.ndarray) -> None:
        """Cache one batch. A cache that cannot be written loses no paid-for vector: the call
        goes on without caching, and says so once."""
        if self.write_error is not None:
            return
        try:
            owner = self.owner
            self.n_evicted += owner.cache.put(keys, batch, source=(owner.cache_namespace, owner.model, owner.dimensions))
        except CacheError as exc:
            self.write_error = exc
            warnings.warn(
                f"{exc}; the vectors of this call are returned but not cached",
                RuntimeWarning,
                stacklevel=_user_stacklevel(),
            )

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
            evicted=self.n_evicted,
        )
        if self.n_evicted:
            cache = self.owner.cache
            warnings.warn(
                f"this call evicted {self.n_evicted} paid-for vectors from the embedding cache at "
                f"{cache.directory!r} to keep it under its size limit of {format_size(cache.size_limit)}; "
                "they will be paid for again when needed: raise size_limit, or pass size_limit=None "
                "to keep everything",
                CacheEvictionWarning,
                stacklevel=_user_stacklevel(),
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
    long_texts: what to do with a text over the embedder's ``input_window`` (an embedder
        without one has no limit): ``"chunk"`` (default) embeds it in window-sized chunks
        and pools them into one unit vector weighted by their token counts; ``"truncate"``
        embeds its first window, as the server would; ``"error"`` raises
        :class:`~embedcache.errors.TextTooLongError` naming the row.

    Misses are written to the cache as each batch of results arrives, so an error half-way
    keeps what was already paid for. A cache that cannot be written (full disk, file-size
    limit, read-only directory) does not fail the call: it returns every vector with a
    :class:`RuntimeWarning` naming the directory and the cause. Vectors that are not a finite 2-D float array of the
    right shape raise :class:`~embedcache.errors.InvalidResponseError` and are never cached.

    One object may serve many threads (and ``aembed`` tasks) at once: a text that one call
    is requesting is not requested again by another; that call waits for the first one's
    answer and counts it as a hit (if the first request fails, the waiting call asks for the
    text itself). Each call counts in :attr:`stats` only the requests and tokens of its own
    requests. A CachedEmbedder pickles (e.g. for ``ProcessPoolExecutor().map(emb.embed,
    chunks)``) when its embedder does: the copy opens the same cache directory, and its
    ``stats`` count on from a copy of this object's.
    """

    def __init__(
        self, embedder: Embedder, cache: EmbeddingCache | None = None, *, long_texts: str = DEFAULT_LONG_TEXTS
    ) -> None:
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
        self.long_texts = check_long_texts(long_texts)
        self._embed_takes_on_batch = _takes_on_batch(embedder.embed)
        aembed = getattr(embedder, "aembed", None)
        self._aembed = aembed if callable(aembed) else None
        self._aembed_takes_on_batch = aembed is not None and _takes_on_batch(aembed)
        chunk = getattr(embedder, "batch_size", None)
        valid = isinstance(chunk, (int, np.integer)) and not isinstance(chunk, bool) and chunk >= 1
        self._chunk: int | None = int(chunk) if valid else None  # None: _config.CACHE_MISS_CHUNK
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
    def input_window(self) -> InputWindow | None:
        """The wrapped embedder's input window (``None``: it has no limit)."""
        return getattr(self.embedder, "input_window", None)

    @property
    def stats(self) -> EmbedStats:
        """A snapshot of the cumulative counters."""
        with self._stats_lock:
            return dataclasses.replace(self._stats)

    def _record(self, *, hits: int, misses: int, requests: int, tokens: int, seconds: float,
                evicted: int = 0) -> None:
        with self._stats_lock:
            self._stats.evicted += evicted
            self._stats.hits += hits
            self._stats.misses += misses
            self._stats.requests += requests
            self._stats.tokens += tokens
            self._stats.seconds += seconds

    def _record_long(self, **counts: int) -> None:
        with self._stats_lock:
            for name, value in counts.items():
                setattr(self._stats, name, getattr(self._stats, name) + value)

    def _find_long(self, texts: list[str]) -> tuple[InputWindow, np.ndarray] | None:
        """The window and the rows of ``texts`` over it; ``None`` when none is."""
        window = self.input_window
        if window is None:
            return None
        rows, _ = find_long(texts, window, self.long_texts, model=self.model)
        return (window, rows) if rows.size else None

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
            texts served from the cache, then as each batch of misses arrives (texts over the
            input window: once, at the end).
        """
        items = validate_texts(texts)
        long = self._find_long(items)
        if long is not None:
            return self._embed_long(items, *long, progress, on_batch)
        return self._embed_texts(items, progress, on_batch)

    def _embed_long(self, items: list[str], window: InputWindow, rows: np.ndarray,
                    progress: bool | None, on_batch: BatchCallback | None) -> np.ndarray:
        """:meth:`embed` for texts some of which (``rows``) are over ``window``."""
        started = time.perf_counter()
        distinct = list(dict.fromkeys(items[i] for i in rows.tolist()))
        if self.long_texts == "truncate":
            first = {t: cut(t, window, "truncate")[0][0] for t in distinct}
            with metered() as cost:
                out = self._embed_texts([first.get(t, t) for t in items], progress, on_batch)
            requests, tokens = cost.snapshot()
            self._record_long(long_texts=len(distinct), chunks=len(distinct),
                              chunk_requests=requests, chunk_tokens=tokens)
            return out
        is_long = np.zeros(len(items), dtype=bool)
        is_long[rows] = True
        short = np.flatnonzero(~is_long)
        short_vectors = None
        if short.size:
            relay = None if on_batch is None else (lambda p, v: on_batch(short[p], v))
            short_vectors = self._embed_texts([items[i] for i in short], progress, relay)
        pooled, n_chunks, hits, requests, tokens = self._pooled(distinct, window, progress, short_vectors)
        vectors = np.stack([pooled[t] for t in distinct])
        out = np.empty((len(items), vectors.shape[1]), dtype=np.float32)
        if short_vectors is not None:
            out[short] = short_vectors
        where = {t: k for k, t in enumerate(distinct)}
        out[rows] = vectors[[where[items[i]] for i in rows.tolist()]]
        if on_batch is not None:
            on_batch(rows.astype(np.int64), out[rows])
        self._record(hits=hits, misses=0, requests=0, tokens=0, seconds=time.perf_counter() - started)
        self._record_long(long_texts=len(distinct), chunks=n_chunks, chunk_requests=requests,
                          chunk_tokens=tokens)
        return out

    def _pooled(self, texts: list[str], window: InputWindow, progress: bool | None,
                like: np.ndarray | None) -> tuple[dict[str, np.ndarray], int, int, int, int]:
        """The pooled vectors of ``texts`` (all over ``window``): from the cache, else from
        their chunks (embedded through the cache), then cached. Also returns the chunks
        embedded, the pooled vectors found, and the requests and tokens the chunks cost."""
        namespace = f"{self.cache_namespace}|{window.key('chunk')}"
        keys = self.cache.raw_keys(namespace, self.model, self.dimensions, texts)
        dim = like.shape[1] if like is not None else self.dimensions
        found, cached = self.cache.lookup(keys, dim)
        pooled = {t: cached[k] for k, t in enumerate(texts) if found[k]}  # type: ignore[index]
        todo = [k for k in range(len(texts)) if not found[k]]
        if not todo:
            return pooled, 0, len(texts), 0, 0
        pieces, weights = zip(*(cut(texts[k], window, "chunk") for k in todo))
        flat = [p for ps in pieces for p in ps]
        with metered() as cost:
            chunk_vectors = self._embed_texts(flat, progress, None)
        made = np.empty((len(todo), chunk_vectors.shape[1]), dtype=np.float32)
        start = 0
        for m, (ps, w) in enumerate(zip(pieces, weights)):
            made[m] = pool(chunk_vectors[start : start + len(ps)], w)
            start += len(ps)
        try:
            self.cache.put([keys[k] for k in todo], made)
        except CacheError as exc:
            warnings.warn(f"{exc}; the pooled vectors of this call are returned but not cached",
                          RuntimeWarning, stacklevel=_user_stacklevel())
        pooled.update((texts[k], made[m]) for m, k in enumerate(todo))
        requests, tokens = cost.snapshot()
        return pooled, len(flat), int(found.sum()), requests, tokens

    def _embed_texts(self, texts: list[str], progress: bool | None,
                     on_batch: BatchCallback | None) -> np.ndarray:
        """:meth:`embed` for texts within the window (or an embedder without one)."""
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
        the event loop are written to the cache there (one short transaction each). A call
        with texts over the input window runs :meth:`embed` in a worker thread.
        """
        items = await asyncio.to_thread(validate_texts, texts)
        long = await asyncio.to_thread(self._find_long, items)
        if long is not None:
            return await asyncio.to_thread(self._embed_long, items, *long, progress, on_batch)
        with metered() as usage:
            call = await asyncio.to_thread(
                _Call, self, items, progress, on_batch, usage, thread=threading.get_ident(), blocking=False
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
        for start, stop in _spans(len(call.miss_texts), self._chunk or _config.CACHE_MISS_CHUNK):
            call.on_batch(_arange(start, stop), await aembed(call.miss_texts[start:stop]))
        return call.written_vectors()

    def _embed_misses(self, call: _Call) -> object:
        """Ask the embedder for ``call``'s misses; what it returns goes to ``call.finish``."""
        if self._embed_takes_on_batch:
            return self.embedder.embed(call.miss_texts, on_batch=call.on_batch)
        for start, stop in _spans(len(call.miss_texts), self._chunk or _config.CACHE_MISS_CHUNK):
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
