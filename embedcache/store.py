"""An on-disk vector store that never loses a committed row.

>>> import tempfile, numpy as np, embedcache as ec
>>> store = ec.VectorStore(tempfile.mkdtemp(), metric="dot")
>>> store.add(["a", "b", "c"], np.eye(3, dtype=np.float32), metadata=[{"lang": "en"}] * 3)
>>> len(store), "b" in store, store.ids()
(3, True, ['a', 'b', 'c'])
>>> scores, ids = store.search(np.array([[0.0, 1.0, 0.5]]), k=2)
>>> ids.tolist(), scores.tolist()
([['b', 'c']], [[1.0, 0.5]])
>>> store.delete(["b"]); store.search([0.0, 1.0, 0.5], k=1)[1].tolist()
[['c']]
>>> store.close()

Format (version 1)
------------------
A store is a directory::

    store.sqlite          SQLite database (WAL journal): settings, ids, metadata, segment list
    segments/000001.vec   vector segments: raw little-endian float32 (or float16) values,
    segments/000002.vec   row-major, ``rows * dim`` values, no header
    write.lock            lock file held by the one writer (``filelock``)

Tables of ``store.sqlite``:

``settings(key TEXT PRIMARY KEY, value)``
    ``format_version`` (``1``), ``dim`` (NULL until the first add), ``dtype`` (``float32`` or
    ``float16``), ``metric`` (``cosine`` or ``dot``), ``namespace`` and ``model`` (of the
    embedder that made the vectors, or NULL), ``generation`` (incremented by every commit) and
    ``next_segment`` (the number the next segment file will get; numbers are never reused).
    Optional: ``base_url`` and ``dimensions`` of that embedder, recorded by ``add_texts``, and
    ``text_key``, the metadata key under which ``add_texts`` keeps each row's text (``"text"``
    when absent).
``segments(seg INTEGER PRIMARY KEY, file TEXT, first_row INTEGER, rows INTEGER, nbytes INTEGER, crc32 INTEGER)``
    The committed segments. ``file`` is relative to the store directory; the file holds the
    vectors of rows ``first_row .. first_row + rows - 1`` in order, is exactly
    ``nbytes = rows * dim * itemsize`` long, and ``crc32`` is ``zlib.crc32`` of its bytes.
    Segments tile the row numbers ``0 .. N - 1`` without gaps or overlaps. A file in
    ``segments/`` that is not listed here is left over by an interrupted write: readers ignore
    it and the next writer removes it.
``rows(row INTEGER PRIMARY KEY, id TEXT, deleted INTEGER, metadata TEXT)``
    One line per stored vector; ``row`` is its global position (the order of insertion) and
    locates it: the segment whose range holds ``row``, at offset ``row - first_row``.
    ``metadata`` is a JSON object (or NULL for ``{}``). ``deleted = 1`` marks a row removed by
    :meth:`VectorStore.delete` or replaced by an upsert; a unique index over ``id`` among rows
    with ``deleted = 0`` keeps live ids unique. :meth:`VectorStore.compact` drops deleted rows
    and renumbers the live ones ``0 .. L - 1`` in the same order.

Write protocol: every write holds ``write.lock``, writes new segment files under a temporary
name, fsyncs them, renames them into place, fsyncs the directory, and only then commits one
SQLite transaction (``synchronous=FULL``) that registers the segments and rows. Files made
obsolete by a commit (merged or compacted segments) are removed after it. A crash at any point
therefore leaves the last committed state, and nothing half-written is ever listed. Readers take
no lock: each operation reads inside one SQLite read transaction, so it sees one committed state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import numpy as np

from embedcache import kernels
from embedcache.cache import _utf8
from embedcache.errors import (
    ConfigurationError,
    DimensionMismatchError,
    DuplicateIdError,
    InvalidInputError,
    InvalidInputTypeError,
    NamespaceMismatchError,
    StoreCorruptedError,
    StoreError,
    StoreLockedError,
)
from embedcache.providers.base import validate_texts

__all__ = ["FORMAT_VERSION", "VectorStore", "text_ids"]

FORMAT_VERSION = 1
DB_NAME = "store.sqlite"
SEGMENT_DIR = "segments"
LOCK_NAME = "write.lock"
#: segments never exceed this size, so a search touches at most one segment's pages at a time
MAX_SEGMENT_BYTES = 256 * 1024 * 1024
#: vectors are converted, checked and written in pieces of about this size (bounded memory)
_CHUNK_BYTES = 16 * 1024 * 1024
#: add_texts embeds this many texts per call to the embedder
_EMBED_CHUNK = 4096
#: ids sent to SQLite per statement (as one JSON array, unpacked by json_each)
_SQL_CHUNK = 1 << 20
_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_METRICS = ("cosine", "dot")
_SEGMENT_NAME = re.compile(r"^\d+\.vec(\.tmp)?$")

_SCHEMA = """
CREATE TABLE settings(key TEXT PRIMARY KEY, value);
CREATE TABLE segments(
    seg INTEGER PRIMARY KEY,
    file TEXT NOT NULL,
    first_row INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    crc32 INTEGER NOT NULL
);
CREATE TABLE rows(
    row INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    metadata TEXT
);
"""
_ROW_INDEXES = """
CREATE UNIQUE INDEX rows_live_id ON rows(id) WHERE deleted = 0;
CREATE INDEX rows_deleted ON rows(row) WHERE deleted = 1;
"""


@dataclass
class _Segment:
    seg: int
    path: Path
    first_row: int
    rows: int
    nbytes: int
    crc32: int
    array: np.ndarray | None = None


@dataclass
class _View:
    """One committed state: settings, segments (by first row) and the deleted rows."""

    generation: int
    settings: dict[str, Any]
    segments: list[_Segment]
    next_row: int
    deleted: np.ndarray  # sorted int64 row numbers
    _masks: dict[int, np.ndarray | None] = field(default_factory=dict)

    @property
    def dim(self) -> int | None:
        d = self.settings.get("dim")
        return None if d is None else int(d)

    @property
    def live(self) -> int:
        return self.next_row - len(self.deleted)

    def live_mask(self, s: _Segment) -> np.ndarray | None:
        """Bool mask of the live rows of ``s``, or None when all are live."""
        if s.seg not in self._masks:
            lo, hi = np.searchsorted(self.deleted, [s.first_row, s.first_row + s.rows])
            if lo == hi:
                self._masks[s.seg] = None
            else:
                m = np.ones(s.rows, dtype=bool)
                m[self.deleted[lo:hi] - s.first_row] = False
                self._masks[s.seg] = m
        return self._masks[s.seg]


@dataclass
class _Write:
    """One write: the state it starts from and the files it obsoletes (removed after commit).

    Files it makes need no list: after a failure, every segment file that the committed state
    does not name is removed."""

    view: _View
    obsolete: list[Path] = field(default_factory=list)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (it does unless it holds a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_ids(ids: object, what: str = "ids") -> list[str]:
    out = validate_texts(ids, allow_empty_list=True, what=what)
    if not _is_utf8("".join(out)):  # SQLite would keep bytes that are not UTF-8, unreadable later
        k = next(k for k, i in enumerate(out) if not _is_utf8(i))
        raise InvalidInputError(f"{what}[{k}] must be Unicode text without lone surrogates, got {out[k]!r}")
    return out


def _check_unique(ids: list[str]) -> None:
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        for x in ids:
            if x in seen:
                raise DuplicateIdError(f"id {x!r} appears more than once in one call; ids must be unique")
            seen.add(x)


def text_ids(texts: Sequence[str]) -> list[str]:
    """The ids :meth:`VectorStore.add_texts` gives rows by default: the first 32 hex digits of
    the SHA-256 of each text's UTF-8 bytes (lone surrogates encoded as the cache keys them), and
    for a text repeated in ``texts`` ``-2``, ``-3`` ... after the hash of its later occurrences.
    The same texts get the same ids in every call, so adding them again is caught.

    >>> text_ids(["a", "b", "a"])[2] == text_ids(["a"])[0] + "-2"
    True
    """
    seen: dict[str, int] = {}
    out = []
    for t in texts:
        h = hashlib.sha256(_utf8(t)).hexdigest()[:32]
        n = seen[h] = seen.get(h, 0) + 1
        out.append(h if n == 1 else f"{h}-{n}")
    return out


def _metadata_json(metadata: object, n: int) -> list[str | None]:
    if metadata is None:
        return [None] * n
    if isinstance(metadata, (dict, str, bytes)):
        raise InvalidInputTypeError(
            f"metadata must be a sequence of {n} dicts (one per row), got a single {type(metadata).__name__}"
        )
    items = list(metadata)  # type: ignore[call-overload]
    if len(items) != n:
        raise InvalidInputError(f"metadata must have one dict per row: expected {n}, got {len(items)}")
    out: list[str | None] = []
    for i, m in enumerate(items):
        if m is None or (isinstance(m, dict) and not m):
            out.append(None)
            continue
        if not isinstance(m, dict):
            raise InvalidInputTypeError(f"metadata[{i}] must be a dict or None, got {type(m).__name__}")
        bad = _non_str_keys(m)
        if bad:
            raise InvalidInputError(
                f"metadata[{i}] keys must be str (JSON would turn them into text), got key {bad[0]!r} "
                f"of type {type(bad[0]).__name__}"
            )
        try:
            text = json.dumps(m, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise InvalidInputTypeError(f"metadata[{i}] is not JSON-serializable: {exc}") from None
        if not text.isascii() and not _is_utf8(text):  # a lone surrogate: SQLite takes UTF-8, an escape keeps it
            text = json.dumps(m, allow_nan=False, separators=(",", ":"))
        out.append(text)
    return out


def _with_texts(metadata: Sequence[dict[str, Any] | None], texts: list[str], key: str) -> list[dict[str, Any]]:
    """Each metadata dict with its text added under ``key``; one that holds another value there
    is refused (its value would be lost)."""
    out = []
    for i, (m, t) in enumerate(zip(metadata, texts)):
        if m and key in m and m[key] != t:
            raise InvalidInputError(
                f"metadata[{i}] holds another value than texts[{i}] under {key!r}, where add_texts keeps "
                "the text; rename that field (an empty store can take another text_key=)"
            )
        out.append({**(m or {}), key: t})
    return out


def _non_str_keys(obj: object) -> list[object]:
    """Non-str dict keys anywhere in ``obj`` (dicts and lists), at most one: ``[]`` when all are str."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                return [k]
            if isinstance(v, (dict, list, tuple)) and (bad := _non_str_keys(v)):
                return bad
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            if isinstance(v, (dict, list, tuple)) and (bad := _non_str_keys(v)):
                return bad
    return []


def _as_matrix(x: object, what: str) -> np.ndarray:
    """``x`` as a 2-D real array without copying (memmaps stay memmaps)."""
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.dtype.kind not in "fiu" or a.dtype.kind == "b":
        raise InvalidInputTypeError(f"{what} must be a real numeric array, got dtype {a.dtype}")
    if a.ndim != 2:
        raise InvalidInputError(f"{what} must be a 2D array of shape (n, d), got shape {a.shape}")
    return a


def _where_clause(where: object) -> tuple[str, list[Any]]:
    """SQL conditions (joined by AND) and parameters for metadata equality filters."""
    if not isinstance(where, dict):
        raise InvalidInputTypeError(f"where must be a dict of metadata key -> value, got {type(where).__name__}")
    conds: list[str] = []
    params: list[Any] = []
    for key, value in where.items():
        if not isinstance(key, str) or not key or '"' in key:
            raise InvalidInputError(f"where keys must be non-empty strings without '\"', got {key!r}")
        path = f'$."{key}"'
        if value is None:
            conds.append("json_type(metadata, ?) = 'null'")
            params.append(path)
        elif isinstance(value, bool):
            conds.append("json_type(metadata, ?) = ?")
            params += [path, "true" if value else "false"]
        elif isinstance(value, (int, float, np.integer, np.floating)):
            if not math.isfinite(float(value)):
                raise InvalidInputError(f"where[{key!r}] must be finite, got {value!r}")
            conds.append("json_type(metadata, ?) IN ('integer', 'real') AND json_extract(metadata, ?) = ?")
            params += [path, path, value.item() if isinstance(value, np.generic) else value]
        elif isinstance(value, str):
            conds.append("json_type(metadata, ?) = 'text' AND json_extract(metadata, ?) = ?")
            params += [path, path, value]
        else:
            raise InvalidInputTypeError(
                f"where[{key!r}] must be a str, int, float, bool or None, got {type(value).__name__}"
            )
    return " AND ".join(conds), params


def _slices(x: np.ndarray, dt: np.dtype) -> Iterator[np.ndarray]:
    step = max(1, _CHUNK_BYTES // max(1, x.shape[1] * x.dtype.itemsize))
    return _converted((x[a : a + step] for a in range(0, x.shape[0], step)), dt)


def _converted(chunks: Iterable[np.ndarray], dt: np.dtype) -> Iterator[np.ndarray]:
    """Chunks in dtype ``dt``, C-contiguous and checked finite."""
    done = 0
    for c in chunks:
        step = max(1, _CHUNK_BYTES // max(1, c.shape[1] * dt.itemsize))
        for a in range(0, c.shape[0], step):
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
                y = np.ascontiguousarray(c[a : a + step], dtype=dt)
            if not np.isfinite(y).all():
                bad = int(np.flatnonzero(~np.isfinite(y).all(axis=1))[0]) + done + a
                extra = " (float16 holds values up to 65504)" if dt.itemsize == 2 else ""
                raise InvalidInputError(f"vectors must be finite, row {bad} is not{extra}")
            yield y
        done += c.shape[0]


class _RowStream:
    """Hands out exactly the requested number of rows from an iterator of 2-D arrays."""

    def __init__(self, chunks: Iterator[np.ndarray]) -> None:
        self._chunks = chunks
        self._rest: np.ndarray | None = None

    def take(self, n: int) -> Iterator[np.ndarray]:
        while n > 0:
            if self._rest is None or len(self._rest) == 0:
                try:
                    self._rest = next(self._chunks)
                except StopIteration:
                    raise StoreError(f"vector source ended {n} rows early") from None
                continue
            part, self._rest = self._rest[:n], self._rest[n:]
            n -= len(part)
            yield part


class VectorStore:
    """A directory of vectors with string ids and JSON metadata; exact search through the kernels.

    Opens the store at ``path`` or creates it. For a new store ``dtype`` defaults to
    ``"float32"`` (``"float16"`` halves disk and memory traffic) and ``metric`` to ``"cosine"``
    (or ``"dot"``); ``dim``, ``namespace`` and ``model`` are recorded when given, else taken from
    the first add. When opening an existing store, every argument given must agree with what the
    store recorded.

    One writer at a time across processes: each write holds ``write.lock`` in the directory.
    ``lock_timeout=None`` waits for it, ``0`` fails at once, else seconds to wait before
    :class:`~embedcache.StoreLockedError`. Any number of readers; each operation sees the
    latest committed state.

    Vectors are stored as given (not normalized); ``get`` and ``vectors`` return them in the
    store's dtype. Vectors must be finite (a float16 store holds values up to 65504).

    Each add writes new segments; a small last segment is merged into the new one (like a
    binary counter), so many small adds leave O(log n) segments at the cost of rewriting
    O(log n) times. Segments hold at most 256 MiB; :meth:`compact` packs them full.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        dim: int | None = None,
        dtype: str | None = None,
        metric: str | None = None,
        namespace: str | None = None,
        model: str | None = None,
        lock_timeout: float | None = None,
        _max_segment_bytes: int = MAX_SEGMENT_BYTES,
    ) -> None:
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1):
            raise InvalidInputError(f"dim must be a positive int or None, got {dim!r}")
        if dtype is not None:
            try:
                dtype = np.dtype(dtype).name
            except TypeError:
                raise ConfigurationError(f"dtype must be 'float32' or 'float16', got {dtype!r}") from None
            if dtype not in _DTYPES:
                raise ConfigurationError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
        if metric is not None and metric not in _METRICS:
            raise ConfigurationError(f"metric must be 'cosine' or 'dot', got {metric!r}")
        if lock_timeout is not None and not (isinstance(lock_timeout, (int, float)) and lock_timeout >= 0):
            raise InvalidInputError(f"lock_timeout must be None or a number >= 0, got {lock_timeout!r}")
        for name, value in (("namespace", namespace), ("model", model)):
            if value is not None and not isinstance(value, str):
                raise InvalidInputTypeError(f"{name} must be a str or None, got {type(value).__name__}")
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is not a directory; a vector store is a directory")
        self._db_path = self.path / DB_NAME
        self._seg_dir = self.path / SEGMENT_DIR
        self._lock_timeout = -1.0 if lock_timeout is None else float(lock_timeout)
        self._max_segment_bytes = int(_max_segment_bytes)
        # readers share one connection (``_mutex``), writers another (``_wmutex``), so that a
        # write (waiting for the lock, embedding, writing segments) never holds up readers
        self._mutex = threading.RLock()
        self._wmutex = threading.RLock()
        self._tls = threading.local()  # .conn: the connection of the operation under way in this thread
        self._view: _View | None = None
        self._arrays: dict[int, np.ndarray] = {}
        self._conn: sqlite3.Connection | None = None
        self._wconn: sqlite3.Connection | None = None
        made = self._make_dirs()
        self._refuse_lost_database()
        self._flock = filelock.FileLock(self.path / LOCK_NAME, thread_local=False)
        try:
            self._conn = _connect(self._db_path)
            self._wconn = _connect(self._db_path)
            exists = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'settings'"
            ).fetchone()
        except sqlite3.DatabaseError as exc:
            self._close_conn()
            raise StoreCorruptedError(f"{self._db_path}: not a readable store database ({exc})") from None
        try:
            if not exists:
                self._create(dim, dtype or "float32", metric or "cosine", namespace, model)
            if made or not exists:
                _fsync_dir(self.path)  # the new directory entries (segments/, store.sqlite)
            with self._reading() as view:  # checks the format and every segment's length
                pass
            self._adopt_settings(view, dim=dim, dtype=dtype, metric=metric, namespace=namespace, model=model)
        except BaseException:
            self._close_conn()
            raise

    # ------------------------------------------------------------------ opening, views

    def _make_dirs(self) -> bool:
        """Create the store directory and ``segments/`` as needed, each new entry made durable."""
        missing: list[Path] = []
        p = self._seg_dir
        while not p.exists():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        self._seg_dir.mkdir(parents=True, exist_ok=True)
        for d in reversed(missing):
            _fsync_dir(d.parent)
        return bool(missing)

    def _refuse_lost_database(self) -> None:
        """Raise when ``store.sqlite`` is missing or empty but the store held data: creating a
        new database there would make the next write remove every segment as an orphan."""
        try:
            size = self._db_path.stat().st_size
        except FileNotFoundError:
            size = None
        if size:
            return
        wal = self._db_path.with_name(DB_NAME + "-wal")
        segs = sorted(e.name for e in os.scandir(self._seg_dir) if _SEGMENT_NAME.match(e.name))
        has_wal = wal.exists() and wal.stat().st_size > 0
        if segs or has_wal:
            state = "missing" if size is None else "empty (0 bytes)"
            held = f"{len(segs)} segment file(s) in {self._seg_dir}, e.g. {segs[0]}" if segs else f"a write-ahead log {wal}"
            raise StoreCorruptedError(
                f"{self._db_path} is {state} but the store holds {held}; refusing to create a new store "
                "over them (restore the database from a backup, or remove the directory to start afresh)"
            )

    def _create(self, dim: int | None, dtype: str, metric: str, namespace: str | None, model: str | None) -> None:
        with self._wmutex, self._locked():
            conn = self._wconn
            assert conn is not None
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'settings'").fetchone():
                    _execute_script(conn, _SCHEMA + _ROW_INDEXES)
                    settings = {
                        "format_version": FORMAT_VERSION,
                        "dim": None if dim is None else int(dim),
                        "dtype": dtype,
                        "metric": metric,
                        "namespace": namespace,
                        "model": model,
                        "generation": 0,
                        "next_segment": 1,
                    }
                    conn.executemany("INSERT INTO settings(key, value) VALUES (?, ?)", settings.items())
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _adopt_settings(self, view: _View, **given: Any) -> None:
        """Check constructor arguments against the store; record dim/namespace/model not yet set."""
        s = view.settings
        if given["dtype"] is not None and given["dtype"] != s["dtype"]:
            raise ConfigurationError(f"{self.path} holds {s['dtype']} vectors, got dtype={given['dtype']!r}")
        if given["metric"] is not None and given["metric"] != s["metric"]:
            raise ConfigurationError(f"{self.path} uses metric {s['metric']!r}, got metric={given['metric']!r}")
        updates = self._settings_updates(view, given["dim"], given["namespace"], given["model"])
        if updates:
            with self._writing() as w:
                updates = self._settings_updates(w.view, given["dim"], given["namespace"], given["model"])
                self._set_settings(updates)

    def _settings_updates(
        self, view: _View, dim: int | None, namespace: str | None, model: str | None
    ) -> dict[str, Any]:
        """Settings to record, or raise if they contradict the store's."""
        s = view.settings
        updates: dict[str, Any] = {}
        if dim is not None:
            if s["dim"] is None:
                updates["dim"] = int(dim)
            elif int(s["dim"]) != int(dim):
                raise DimensionMismatchError(
                    f"{self.path} holds vectors of dimension {s['dim']}, got dimension {dim}"
                )
        for key, value in (("namespace", namespace), ("model", model)):
            if value is None:
                continue
            if s[key] is None:
                updates[key] = value
            elif s[key] != value:
                raise NamespaceMismatchError(
                    f"{self.path} holds vectors of {key} {s[key]!r}, got {key} {value!r}"
                )
        return updates

    def _record_embedder(self, embedder: Any) -> None:
        """Record the ``base_url`` and ``dimensions`` the embedder was made with, once
        (through a wrapper's ``.embedder``), so that the same embedder can be rebuilt."""
        inner = getattr(embedder, "embedder", None)
        for key in ("base_url", "dimensions"):
            value = getattr(embedder, key, None)
            if value is None and inner is not None:
                value = getattr(inner, key, None)
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                self._check_open().execute(
                    "INSERT OR IGNORE INTO settings(key, value) VALUES (?, ?)", (key, value)
                )

    @staticmethod
    def _text_key(view: _View) -> str:
        return view.settings.get("text_key") or "text"

    def _text_key_for(self, view: _View, text_key: str | None) -> str:
        """The key add_texts keeps texts under: ``text_key`` if given (refused when the store
        has live rows kept under another), else the store's."""
        key = self._text_key(view)
        if text_key is None or text_key == key:
            return key
        if view.live:
            raise ConfigurationError(
                f"{self.path} keeps each row's text under the metadata key {key!r}, got text_key={text_key!r}"
            )
        return text_key

    def _set_settings(self, updates: dict[str, Any]) -> None:
        self._check_open().executemany("UPDATE settings SET value = ? WHERE key = ?", [(v, k) for k, v in updates.items()])

    def _check_open(self) -> sqlite3.Connection:
        """The connection of the read or write under way in this thread (else the read one)."""
        conn = getattr(self._tls, "conn", None) or self._conn
        if conn is None:
            raise StoreError(f"the store at {self.path} is closed")
        return conn

    def _read_view(self, conn: sqlite3.Connection, *, cache: bool) -> _View:
        """The committed state as of ``conn``'s transaction; with ``cache`` (readers, under
        ``_mutex``) reloaded only when it changed and kept for the next read."""
        try:
            row = conn.execute("SELECT value FROM settings WHERE key = 'generation'").fetchone()
            if row is None:
                raise StoreCorruptedError(f"{self._db_path}: settings lack 'generation'")
            if cache and self._view is not None and self._view.generation == row[0]:
                return self._view
            settings = dict(conn.execute("SELECT key, value FROM settings").fetchall())
            version = settings.get("format_version")
            if version != FORMAT_VERSION:
                raise StoreCorruptedError(
                    f"{self._db_path}: unknown format version {version!r}; "
                    f"this version of embedcache reads format {FORMAT_VERSION}"
                )
            for key in ("dim", "dtype", "metric", "namespace", "model", "next_segment"):
                if key not in settings:
                    raise StoreCorruptedError(f"{self._db_path}: settings lack {key!r}")
            if settings["dtype"] not in _DTYPES or settings["metric"] not in _METRICS:
                raise StoreCorruptedError(
                    f"{self._db_path}: unknown dtype {settings['dtype']!r} or metric {settings['metric']!r}"
                )
            segs = conn.execute(
                "SELECT seg, file, first_row, rows, nbytes, crc32 FROM segments ORDER BY first_row"
            ).fetchall()
            deleted = np.array(
                [r for (r,) in conn.execute("SELECT row FROM rows WHERE deleted = 1 ORDER BY row")],
                dtype=np.int64,
            )
        except sqlite3.DatabaseError as exc:
            raise StoreCorruptedError(f"{self._db_path}: cannot read the store database ({exc})") from None
        view = _View(
            generation=row[0],
            settings=settings,
            segments=[_Segment(s, self.path / f, r0, n, nb, crc) for s, f, r0, n, nb, crc in segs],
            next_row=0,
            deleted=deleted,
        )
        itemsize = _DTYPES[settings["dtype"]].itemsize
        expected_row = 0
        for s in view.segments:
            if s.first_row != expected_row or s.rows < 1:
                raise StoreCorruptedError(
                    f"{self._db_path}: segment {s.path.name} covers rows {s.first_row}..{s.first_row + s.rows - 1}, "
                    f"expected it to start at row {expected_row}"
                )
            expected_row += s.rows
            if view.dim is None or s.nbytes != s.rows * view.dim * itemsize:
                raise StoreCorruptedError(
                    f"{self._db_path}: segment {s.path.name} records {s.nbytes} bytes for {s.rows} rows "
                    f"of dimension {view.dim} ({settings['dtype']})"
                )
        view.next_row = expected_row
        arrays = self._open_segments(view)
        if cache:
            self._arrays = arrays
            self._view = view
        return view

    def _open_segments(self, view: _View) -> dict[int, np.ndarray]:
        arrays: dict[int, np.ndarray] = {}
        for s in view.segments:
            a = self._arrays.get(s.seg)
            if a is None:
                try:
                    size = s.path.stat().st_size
                except FileNotFoundError:
                    raise _SegmentMissing(s.path, view.generation) from None
                if size != s.nbytes:
                    raise StoreCorruptedError(
                        f"{s.path}: segment file is {size} bytes, the database records {s.nbytes} "
                        f"({'truncated' if size < s.nbytes else 'longer than committed'})"
                    )
                a = np.memmap(s.path, dtype=_DTYPES[view.settings["dtype"]], mode="r", shape=(s.rows, view.dim))
            arrays[s.seg] = a
            s.array = a
        return arrays

    @contextmanager
    def _reading(self) -> Iterator[_View]:
        """One read transaction: a consistent committed state for the whole operation."""
        with self._mutex:
            conn = self._conn
            if conn is None:
                raise StoreError(f"the store at {self.path} is closed")
            prev = getattr(self._tls, "conn", None)
            self._tls.conn = conn
            try:
                for attempt in range(100):
                    conn.execute("BEGIN")
                    try:
                        view = self._read_view(conn, cache=True)
                    except _SegmentMissing as exc:
                        conn.execute("COMMIT")
                        # a writer removed it after committing a newer state: read that one
                        if attempt < 99 and _generation(conn) != exc.args[1]:
                            continue
                        raise StoreCorruptedError(f"{exc.args[0]}: committed segment file is missing") from None
                    except BaseException:
                        conn.execute("COMMIT")
                        raise
                    try:
                        yield view
                    finally:
                        if conn.in_transaction:
                            conn.execute("COMMIT")
                    return
            finally:
                self._tls.conn = prev

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self._flock.acquire(timeout=self._lock_timeout)
        except filelock.Timeout:
            waited = "" if self._lock_timeout == 0 else f" within {self._lock_timeout:g} s"
            raise StoreLockedError(
                f"another process is writing to {self.path} (lock {self.path / LOCK_NAME} not acquired{waited})"
            ) from None
        try:
            yield
        finally:
            self._flock.release()

    @contextmanager
    def _writing(self) -> Iterator[_Write]:
        """Lock, open a write transaction on the latest state, commit (or undo) at the end.

        Runs on the write connection: readers in other threads go on meanwhile. On failure
        nothing is unlinked by name: the files that the committed state does not list (read
        afresh after the rollback) are removed, so a failure after COMMIT keeps what it committed.
        """
        with self._wmutex:
            conn = self._wconn
            if conn is None:
                raise StoreError(f"the store at {self.path} is closed")
            with self._locked():
                conn.execute("BEGIN IMMEDIATE")
                prev = getattr(self._tls, "conn", None)
                self._tls.conn = conn
                try:
                    try:
                        view = self._read_view(conn, cache=False)
                    except _SegmentMissing as exc:
                        raise StoreCorruptedError(f"{exc.args[0]}: committed segment file is missing") from None
                    w = _Write(view)
                    self._remove_orphans({s.path.name for s in view.segments})
                    yield w
                    conn.execute(
                        "UPDATE settings SET value = ? WHERE key = 'generation'", (view.generation + 1,)
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    try:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        committed = {Path(f).name for (f,) in conn.execute("SELECT file FROM segments")}
                        self._remove_orphans(committed)
                    except Exception:  # the next writer removes what is left
                        pass
                    raise
                finally:
                    self._tls.conn = prev
                for p in w.obsolete:
                    p.unlink(missing_ok=True)

    def _remove_orphans(self, committed: set[str]) -> None:
        """Remove segment files (and temporary ones) that are not in ``committed``; holds the lock."""
        for entry in os.scandir(self._seg_dir):
            if _SEGMENT_NAME.match(entry.name) and entry.name not in committed:
                os.unlink(entry.path)

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int | None:
        """Dimension of the vectors, or None before the first add."""
        with self._reading() as v:
            return v.dim

    @property
    def dtype(self) -> str:
        """``"float32"`` or ``"float16"``: how vectors are stored."""
        with self._reading() as v:
            return str(v.settings["dtype"])

    @property
    def metric(self) -> str:
        """``"cosine"`` or ``"dot"``: the score used by :meth:`search` and :meth:`similar_pairs`."""
        with self._reading() as v:
            return str(v.settings["metric"])

    @property
    def namespace(self) -> str | None:
        """``cache_namespace`` of the embedder that made the vectors, when known."""
        with self._reading() as v:
            return v.settings["namespace"]

    @property
    def model(self) -> str | None:
        """Model that made the vectors, when known."""
        with self._reading() as v:
            return v.settings["model"]

    @property
    def text_key(self) -> str:
        """Metadata key under which :meth:`add_texts` keeps each row's text (``"text"`` unless
        chosen otherwise)."""
        with self._reading() as v:
            return self._text_key(v)

    def __len__(self) -> int:
        with self._reading() as v:
            return v.live

    def __contains__(self, id: object) -> bool:
        if not isinstance(id, str):
            return False
        with self._reading():
            conn = self._check_open()
            return conn.execute("SELECT 1 FROM rows WHERE deleted = 0 AND id = ?", (id,)).fetchone() is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def __repr__(self) -> str:
        if self._conn is None:
            return f"VectorStore({str(self.path)!r}, closed)"
        with self._reading() as v:
            return (
                f"VectorStore({str(self.path)!r}, rows={v.live}, dim={v.dim}, "
                f"dtype={v.settings['dtype']!r}, metric={v.settings['metric']!r})"
            )

    def ids(self) -> list[str]:
        """Live ids in insertion order (an upserted id moves to the end)."""
        with self._reading():
            conn = self._check_open()
            return [i for (i,) in conn.execute("SELECT id FROM rows WHERE deleted = 0 ORDER BY row")]

    # ------------------------------------------------------------------ writing

    def add(
        self,
        ids: Sequence[str],
        vectors: Any,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        *,
        upsert: bool = False,
    ) -> None:
        """Add ``vectors`` (array of shape (n, d)) under ``ids`` (n distinct strings), atomically.

        ``metadata``: one JSON-serializable dict (or None) per row. An id already in the store
        raises :class:`~embedcache.DuplicateIdError` unless ``upsert=True``, which replaces it
        (the new row goes to the end of the order). Large arrays (memmaps too) are converted and
        written in pieces of bounded size; either all rows are committed or none.
        """
        ids = _check_ids(ids)
        _check_unique(ids)
        x = _as_matrix(vectors, "vectors")
        if x.shape[0] != len(ids):
            raise InvalidInputError(f"got {len(ids)} ids for {x.shape[0]} vectors; expected one id per row")
        md = _metadata_json(metadata, len(ids))
        if not ids:
            return
        d = x.shape[1]
        if d < 1:
            raise InvalidInputError(f"vectors must have at least one column, got shape {x.shape}")
        with self._writing() as w:
            self._set_settings(self._settings_updates(w.view, d, None, None))
            self._ingest(w, ids, md, d, _slices(x, _DTYPES[w.view.settings['dtype']]), upsert)

    def add_texts(
        self,
        texts: Sequence[str],
        embedder: Any,
        ids: Sequence[str] | None = None,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        *,
        upsert: bool = False,
        text_key: str | None = None,
    ) -> list[str]:
        """Embed ``texts`` with ``embedder`` (any Embedder, usually a CachedEmbedder) and add them.

        Each text is kept in its row's metadata under :attr:`text_key` (``"text"`` unless the
        first ``add_texts`` on an empty store chose another with ``text_key=``); a metadata dict
        that holds another value under that key is refused, never overwritten. ``ids`` default
        to :func:`text_ids` (a hash of each text), so adding a text again is a
        :class:`~embedcache.DuplicateIdError` (raised before anything is embedded), or a
        refresh with ``upsert=True``. The store records the embedder's ``cache_namespace`` and
        ``model`` and refuses an embedder of another namespace. Texts are embedded in chunks
        while the write lock is held, and all rows commit together. Returns the ids.
        """
        texts = validate_texts(texts)
        ids = _check_ids(text_ids(texts) if ids is None else ids)
        if len(ids) != len(texts):
            raise InvalidInputError(f"got {len(ids)} ids for {len(texts)} texts; expected one id per text")
        _check_unique(ids)
        if text_key is not None and (not isinstance(text_key, str) or not text_key):
            raise InvalidInputError(f"text_key must be a non-empty str or None, got {text_key!r}")
        if metadata is None:
            metadata = [None] * len(texts)
        _metadata_json(metadata, len(texts))  # validates the caller's part
        namespace = getattr(embedder, "cache_namespace", None)
        model = getattr(embedder, "model", None)
        if not isinstance(namespace, str) or not callable(getattr(embedder, "embed", None)):
            raise InvalidInputTypeError(
                f"embedder must provide embed() and a str cache_namespace, got {type(embedder).__name__}"
            )
        with self._reading() as v:
            self._settings_updates(v, None, namespace, None)  # fail before waiting for the lock
        with self._writing() as w:  # and, under it, before embedding anything
            updates = self._settings_updates(w.view, None, namespace, model if isinstance(model, str) else None)
            key = self._text_key_for(w.view, text_key)
            md = _metadata_json(_with_texts(metadata, texts, key), len(texts))
            if not upsert and self._rows_of(ids):
                raise self._duplicate_error(ids)
            if key != self._text_key(w.view):
                self._check_open().execute(
                    "INSERT OR REPLACE INTO settings(key, value) VALUES ('text_key', ?)", (key,)
                )

            def embedded() -> Iterator[np.ndarray]:
                for a in range(0, len(texts), _EMBED_CHUNK):
                    part = texts[a : a + _EMBED_CHUNK]
                    y = _as_matrix(embedder.embed(part), "embedder output")
                    if y.shape[0] != len(part):
                        raise InvalidInputError(
                            f"embedder returned {y.shape[0]} vectors for {len(part)} texts"
                        )
                    yield y

            chunks = embedded()
            first = next(chunks)
            d = first.shape[1]

            def same_width(ys: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
                for y in ys:
                    if y.shape[1] != d:
                        raise DimensionMismatchError(
                            f"{self.path} holds vectors of dimension {w.view.dim or d}, got dimension {y.shape[1]} "
                            "from a later call to the embedder"
                        )
                    yield y
            updates.update(self._settings_updates(w.view, d, None, None))
            self._set_settings(updates)
            self._record_embedder(embedder)

            def all_chunks() -> Iterator[np.ndarray]:
                yield first
                yield from same_width(chunks)

            self._ingest(w, ids, md, d, _converted(all_chunks(), _DTYPES[w.view.settings['dtype']]), upsert)
        return ids


    def _ingest(
        self, w: _Write, ids: list[str], md: list[str | None], d: int, chunks: Iterator[np.ndarray], upsert: bool
    ) -> None:
        """Write rows ``ids`` (vectors from ``chunks``) as new segments and register them in ``w``."""
        conn = self._check_open()
        view = w.view
        if view.dim is not None and view.dim != d:
            raise DimensionMismatchError(f"{self.path} holds vectors of dimension {view.dim}, got dimension {d}")
        dt = _DTYPES[view.settings["dtype"]]
        n = len(ids)
        rows_per_seg = max(1, self._max_segment_bytes // (d * dt.itemsize))
        # merge small trailing segments into the new one (at most log(N) segments from many small adds)
        merged: list[_Segment] = []
        m = n
        tail = list(view.segments)
        while tail and tail[-1].rows <= m and tail[-1].rows + m <= rows_per_seg:
            s = tail.pop()
            merged.insert(0, s)
            m += s.rows
        first_row = merged[0].first_row if merged else view.next_row
        new_first = view.next_row

        def old_rows() -> Iterator[np.ndarray]:
            step = max(1, _CHUNK_BYTES // (d * dt.itemsize))
            for s in merged:
                assert s.array is not None
                for a in range(0, s.rows, step):
                    yield np.ascontiguousarray(s.array[a : a + step])

        source = _RowStream(_chain(old_rows(), chunks))
        stop = threading.Event()
        next_seg = _next_segment(view)
        plan = [(next_seg + i, first_row + a, min(rows_per_seg, m - a)) for i, a in enumerate(range(0, m, rows_per_seg))]

        def write_all() -> list[tuple[int, str, int, int, int, int]]:
            out = []
            for seg, r0, rows in plan:
                nbytes, crc = self._write_segment(w, seg, source.take(rows), stop)
                self._check_length(seg, rows, d, dt, nbytes)
                out.append((seg, f"{SEGMENT_DIR}/{seg:06d}.vec", r0, rows, nbytes, crc))
            return out

        with ThreadPoolExecutor(1, thread_name_prefix="embedcache-store-write") as pool:
            fut = pool.submit(write_all)
            try:
                for a in range(0, n, _SQL_CHUNK):
                    part = ids[a : a + _SQL_CHUNK]
                    if upsert:
                        conn.execute(
                            "UPDATE rows SET deleted = 1 WHERE deleted = 0 AND id IN (SELECT value FROM json_each(?))",
                            (json.dumps(part),),
                        )
                    try:
                        if md[a : a + _SQL_CHUNK].count(None) != len(part):
                            pairs = ",".join(
                                f"[{json.dumps(i)},{m or 'null'}]" for i, m in zip(part, md[a : a + _SQL_CHUNK])
                            )
                            conn.execute(
                                "INSERT INTO rows(row, id, metadata) SELECT ? + key, json_extract(value, '$[0]'), "
                                "json_extract(value, '$[1]') FROM json_each(?)",
                                (new_first + a, f"[{pairs}]"),
                            )
                        else:
                            conn.execute(
                                "INSERT INTO rows(row, id) SELECT ? + key, value FROM json_each(?)",
                                (new_first + a, json.dumps(part)),
                            )
                    except sqlite3.IntegrityError:
                        raise self._duplicate_error(ids) from None
                segments = fut.result()
            except BaseException:
                stop.set()
                raise
        _fsync_dir(self._seg_dir)
        conn.execute(f"DELETE FROM segments WHERE seg IN ({','.join(str(s.seg) for s in merged)})")
        conn.executemany("INSERT INTO segments(seg, file, first_row, rows, nbytes, crc32) VALUES (?, ?, ?, ?, ?, ?)", segments)
        self._set_settings({"next_segment": next_seg + len(plan)})
        w.obsolete += [s.path for s in merged]

    @staticmethod
    def _check_length(seg: int, rows: int, d: int, dt: np.dtype, nbytes: int) -> None:
        if nbytes != rows * d * dt.itemsize:
            raise StoreError(
                f"segment {seg:06d}.vec got {nbytes} bytes, expected {rows * d * dt.itemsize} "
                f"for {rows} rows of dimension {d}; nothing was committed"
            )

    def _duplicate_error(self, ids: list[str]) -> DuplicateIdError:
        found = self._rows_of(ids)
        first = next((i for i in ids if i in found), None)
        return DuplicateIdError(f"id {first!r} is already in the store; pass upsert=True to replace it")

    def _write_segment(
        self, w: _Write, seg: int, chunks: Iterable[np.ndarray], stop: threading.Event
    ) -> tuple[int, int]:
        """Write, fsync and rename one segment file; return its length and crc32."""
        final = self._seg_dir / f"{seg:06d}.vec"
        tmp = self._seg_dir / f"{seg:06d}.vec.tmp"
        crc = 0
        nbytes = 0
        with open(tmp, "wb", buffering=0) as f:
            for c in chunks:
                if stop.is_set():
                    raise StoreError("write cancelled")
                buf = memoryview(c).cast("B")
                done = 0
                while done < buf.nbytes:  # a raw write may take less than all
                    done += f.write(buf[done:])
                crc = zlib.crc32(buf, crc)
                nbytes += buf.nbytes
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return nbytes, crc

    def delete(self, ids: Sequence[str]) -> None:
        """Remove ``ids`` (all must be in the store, else nothing is removed)."""
        ids = list(dict.fromkeys(_check_ids(ids)))
        if not ids:
            return
        with self._writing():
            conn = self._check_open()
            found = self._rows_of(ids)
            missing = [i for i in ids if i not in found]
            if missing:
                raise InvalidInputError(
                    f"{len(missing)} id(s) are not in the store, e.g. {missing[0]!r}; nothing was deleted"
                )
            conn.executemany("UPDATE rows SET deleted = 1 WHERE row = ?", ((r,) for r in found.values()))

    def compact(self) -> None:
        """Rewrite the live rows into full segments and drop deleted rows, in one commit.

        Old segment files are removed only after the commit, so a crash leaves either the old or
        the new state. Row order (and so tie-breaking in :meth:`search`) is kept.
        """
        with self._writing() as w:
            conn = self._check_open()
            view = w.view
            d = view.dim
            if d is None or not view.segments:
                return
            dt = _DTYPES[view.settings["dtype"]]
            rows_per_seg = max(1, self._max_segment_bytes // (d * dt.itemsize))
            full = [s.rows == rows_per_seg for s in view.segments[:-1]]
            if len(view.deleted) == 0 and all(full):
                return
            live = view.live
            step = max(1, _CHUNK_BYTES // (d * dt.itemsize))

            def live_rows() -> Iterator[np.ndarray]:
                for s in view.segments:
                    assert s.array is not None
                    mask = view.live_mask(s)
                    for a in range(0, s.rows, step):
                        block = s.array[a : a + step]
                        if mask is not None:
                            block = block[mask[a : a + step]]
                        if len(block):
                            yield np.ascontiguousarray(block)

            source = _RowStream(live_rows())
            next_seg = _next_segment(view)
            stop = threading.Event()
            segments = []
            for i, a in enumerate(range(0, live, rows_per_seg)):
                rows = min(rows_per_seg, live - a)
                nbytes, crc = self._write_segment(w, next_seg + i, source.take(rows), stop)
                self._check_length(next_seg + i, rows, d, dt, nbytes)
                segments.append((next_seg + i, f"{SEGMENT_DIR}/{next_seg + i:06d}.vec", a, rows, nbytes, crc))
            _fsync_dir(self._seg_dir)
            conn.execute("CREATE TABLE rows_new(row INTEGER PRIMARY KEY, id TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0, metadata TEXT)")
            conn.execute(
                "INSERT INTO rows_new(row, id, deleted, metadata) "
                "SELECT row_number() OVER (ORDER BY row) - 1, id, 0, metadata FROM rows WHERE deleted = 0"
            )
            conn.execute("DROP TABLE rows")
            conn.execute("ALTER TABLE rows_new RENAME TO rows")
            _execute_script(conn, _ROW_INDEXES)
            conn.execute("DELETE FROM segments")
            conn.executemany("INSERT INTO segments(seg, file, first_row, rows, nbytes, crc32) VALUES (?, ?, ?, ?, ?, ?)", segments)
            self._set_settings({"next_segment": next_seg + len(segments)})
            w.obsolete += [s.path for s in view.segments]
        with self._wmutex:  # PASSIVE: copies what it can now, never waits for readers
            if self._wconn is not None:
                try:
                    self._wconn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.OperationalError:
                    pass

    # ------------------------------------------------------------------ reading

    def _rows_of(self, ids: list[str]) -> dict[str, int]:
        """Live row number of each id that is in the store."""
        conn = self._check_open()
        found: dict[str, int] = {}
        for a in range(0, len(ids), _SQL_CHUNK):
            found.update(
                conn.execute(
                    "SELECT id, row FROM rows WHERE deleted = 0 AND id IN (SELECT value FROM json_each(?))",
                    (json.dumps(ids[a : a + _SQL_CHUNK]),),
                )
            )
        return found

    def _rows_or_raise(self, ids: list[str]) -> np.ndarray:
        found = self._rows_of(list(dict.fromkeys(ids)))
        for i in ids:
            if i not in found:
                raise InvalidInputError(f"id {i!r} is not in the store")
        return np.array([found[i] for i in ids], dtype=np.int64)

    def _gather(self, view: _View, rows: np.ndarray) -> np.ndarray:
        d = view.dim or 0
        out = np.empty((len(rows), d), dtype=_DTYPES[view.settings["dtype"]])
        if not len(rows):
            return out
        starts = np.array([s.first_row for s in view.segments], dtype=np.int64)
        which = np.searchsorted(starts, rows, side="right") - 1
        for k in np.unique(which):
            s = view.segments[k]
            pos = np.flatnonzero(which == k)
            assert s.array is not None
            out[pos] = s.array[rows[pos] - s.first_row]
        return out

    def get(self, ids: Sequence[str]) -> np.ndarray:
        """Vectors of ``ids`` (array of shape (n, d), the store's dtype), in the order asked."""
        ids = _check_ids(ids)
        with self._reading() as v:
            return self._gather(v, self._rows_or_raise(ids))

    def metadata(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Metadata dict of each of ``ids``, in the order asked (``{}`` where none was given)."""
        ids = _check_ids(ids)
        with self._reading():
            conn = self._check_open()
            rows = self._rows_or_raise(ids)
            text: dict[int, str | None] = {}
            uniq = sorted(set(rows.tolist()))
            for a in range(0, len(uniq), _SQL_CHUNK):
                text.update(
                    conn.execute(
                        "SELECT row, metadata FROM rows WHERE row IN (SELECT value FROM json_each(?))",
                        (json.dumps(uniq[a : a + _SQL_CHUNK]),),
                    )
                )
        return [json.loads(text[r]) if text[r] else {} for r in rows.tolist()]

    def vectors(self) -> np.ndarray:
        """Read-only array (live rows, d) of the live vectors, in the order of :meth:`ids`.

        A memory-mapped view when the live rows are one segment without deletions (a store up
        to 256 MiB after :meth:`compact`); otherwise a read-only copy in memory. For stores
        larger than memory use :meth:`search` or :meth:`similar_pairs`, which stream.
        """
        with self._reading() as v:
            return self._live_vectors(v)

    def snapshot(self) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
        """``(ids, vectors, metadata)`` of every live row, read in one transaction.

        The same as :meth:`ids`, :meth:`vectors` and :meth:`metadata` of those ids, but from
        one committed state: a write by another process between separate calls could
        otherwise pair ids with the vectors of other rows.
        """
        with self._reading() as v:
            conn = self._check_open()
            rows = conn.execute("SELECT id, metadata FROM rows WHERE deleted = 0 ORDER BY row").fetchall()
            x = self._live_vectors(v)
        return [i for i, _ in rows], x, [json.loads(m) if m else {} for _, m in rows]

    def _live_vectors(self, v: _View) -> np.ndarray:
        if len(v.segments) == 1 and v.live_mask(v.segments[0]) is None:
            a = v.segments[0].array
            assert a is not None
            return a
        out = np.empty((v.live, v.dim or 0), dtype=_DTYPES[v.settings["dtype"]])
        pos = 0
        for s in v.segments:
            assert s.array is not None
            mask = v.live_mask(s)
            block = s.array if mask is None else s.array[mask]
            out[pos : pos + len(block)] = block
            pos += len(block)
        out.flags.writeable = False
        return out

    def _ids_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """Object array shaped like ``rows`` with the id of each row (None where row < 0)."""
        conn = self._check_open()
        out = np.full(rows.shape, None, dtype=object)
        valid = rows >= 0
        uniq = np.unique(rows[valid])
        if not len(uniq):
            return out
        names = np.empty(len(uniq), dtype=object)
        if len(uniq) > 50_000:
            table = conn.execute("SELECT row, id FROM rows ORDER BY row").fetchall()
            r = np.fromiter((t[0] for t in table), dtype=np.int64, count=len(table))
            ids = np.array([t[1] for t in table], dtype=object)
            names[:] = ids[np.searchsorted(r, uniq)]
        else:
            found: dict[int, str] = {}
            ul = uniq.tolist()
            for a in range(0, len(ul), _SQL_CHUNK):
                found.update(
                    conn.execute(
                        "SELECT row, id FROM rows WHERE row IN (SELECT value FROM json_each(?))",
                        (json.dumps(ul[a : a + _SQL_CHUNK]),),
                    )
                )
            names[:] = [found[r] for r in ul]
        out[valid] = names[np.searchsorted(uniq, rows[valid])]
        return out

    def _where_rows(self, where: dict[str, Any]) -> np.ndarray:
        sql, params = _where_clause(where)
        conn = self._check_open()
        return np.array(
            [r for (r,) in conn.execute(f"SELECT row FROM rows WHERE deleted = 0 AND {sql} ORDER BY row", params)],
            dtype=np.int64,
        )

    def search(
        self, queries: Any, k: int = 10, *, where: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` live rows for each query, best first (ties: earlier row first).

        queries: array of shape (q, d) or (d,) (one query). ``where``: metadata equality filter,
        ``{"lang": "en", "year": 2024}`` keeps rows whose metadata has all these values.
        Returns ``scores`` float32 (q, kk) and ``ids`` object (q, kk), kk = min(k, live rows);
        slots with no eligible row (because of ``where``) hold score ``-inf`` and id ``None``.
        Segments are streamed one at a time through :func:`embedcache.top_k`, so a store larger
        than memory works.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k must be an int >= 1, got {k!r}")
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q.reshape(1, -1)
        q = _as_matrix(q, "queries")
        if where is not None:
            _where_clause(where)  # validate before reading
        with self._reading() as v:
            kk = min(int(k), v.live)
            nq = q.shape[0]
            if v.dim is not None and q.shape[1] != v.dim:
                raise DimensionMismatchError(
                    f"queries must have dimension {v.dim} (the store's), got shape {q.shape}"
                )
            qf = np.ascontiguousarray(q, dtype=np.float32)
            if not np.isfinite(qf).all():
                raise InvalidInputError("queries must be finite, got NaN or infinity")
            scores = np.full((nq, kk), -np.inf, dtype=np.float32)
            rows = np.full((nq, kk), -1, dtype=np.int64)
            if kk == 0:
                return scores, np.full((nq, 0), None, dtype=object)
            wrows = self._where_rows(where) if where else None
            # a running (nq, kk) result merged with each segment's: memory bounded by the output
            got_s = got_r = None
            for s in v.segments:
                if wrows is not None:
                    lo, hi = np.searchsorted(wrows, [s.first_row, s.first_row + s.rows])
                    if lo == hi:
                        continue
                    mask = np.zeros(s.rows, dtype=bool)
                    mask[wrows[lo:hi] - s.first_row] = True
                else:
                    mask = v.live_mask(s)
                    if mask is not None and not mask.any():
                        continue
                ss, ii = kernels.top_k(qf, s.array, min(kk, s.rows), metric=v.settings["metric"], mask=mask)
                rr = np.where(ii >= 0, ii + s.first_row, -1)
                if got_s is None:
                    got_s, got_r = ss, rr
                    continue
                # earlier segments hold earlier rows: a stable sort keeps ties in row order
                cat_s = np.concatenate((got_s, ss), axis=1)
                order = np.argsort(-cat_s, axis=1, kind="stable")[:, :kk]
                got_s = np.take_along_axis(cat_s, order, axis=1)
                got_r = np.take_along_axis(np.concatenate((got_r, rr), axis=1), order, axis=1)
            if got_s is not None:
                w = min(kk, got_s.shape[1])
                scores[:, :w] = got_s[:, :w]
                rows[:, :w] = got_r[:, :w]
            return scores, self._ids_of_rows(rows)

    def similar_pairs(
        self, threshold: float, *, other: VectorStore | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pair of live rows with score >= ``threshold``, best first.

        Within this store each pair appears once, left the earlier row; with ``other`` (a store
        of the same dimension, metric and namespace) every pair (row here, row there). Returns
        ``(left_ids, right_ids, scores)``: object arrays of str and float32, sorted by score
        descending, then by row order. Segments go through :func:`embedcache.similar_pairs` two
        at a time, so memory holds two segments plus the output.
        """
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)):
            raise InvalidInputTypeError(f"threshold must be a number, got {type(threshold).__name__}")
        if not math.isfinite(float(threshold)):
            raise InvalidInputError(f"threshold must be finite, got {threshold!r}")
        with self._reading() as v:
            if v.settings["metric"] == "cosine" and not -1.0 <= float(threshold) <= 1.0:
                raise InvalidInputError(f"threshold must be in [-1, 1] for cosine, got {threshold}")
        if other is not None and not isinstance(other, VectorStore):
            raise InvalidInputTypeError(f"other must be a VectorStore or None, got {type(other).__name__}")
        if other is None or other is self:
            with self._reading() as v:
                li, lj, sc = self._pairs(v, v, v.settings["metric"], float(threshold), same=other is None)
                return self._ids_of_rows(li), self._ids_of_rows(lj), sc
        # both stores' locks, always in one order: a.similar_pairs(other=b) and
        # b.similar_pairs(other=a) on two threads would otherwise wait for each other
        first, second = (self, other) if id(self) < id(other) else (other, self)
        with first._reading() as fv, second._reading() as sv:
            v, ov = (fv, sv) if first is self else (sv, fv)
            metric = v.settings["metric"]
            if ov.settings["metric"] != metric:
                raise ConfigurationError(
                    f"both stores must use one metric: {metric!r} here, {ov.settings['metric']!r} in other"
                )
            if v.dim is not None and ov.dim is not None and v.dim != ov.dim:
                raise DimensionMismatchError(
                    f"other must have dimension {v.dim} (this store's), got {ov.dim}"
                )
            ns, ons = v.settings["namespace"], ov.settings["namespace"]
            if ns is not None and ons is not None and ns != ons:
                raise NamespaceMismatchError(
                    f"other must hold vectors of namespace {ns!r} (this store's), got {ons!r}"
                )
            li, lj, sc = self._pairs(v, ov, metric, float(threshold), same=False)
            right = other._ids_of_rows(lj)
            left = self._ids_of_rows(li)
        return left, right, sc

    @staticmethod
    def _live_block(view: _View, s: _Segment) -> tuple[np.ndarray, np.ndarray | None]:
        """Live rows of ``s`` (the memmap itself when all are live) and their offsets."""
        assert s.array is not None
        mask = view.live_mask(s)
        if mask is None:
            return s.array, None
        offsets = np.flatnonzero(mask)
        return s.array[offsets], offsets

    def _pairs(
        self, v: _View, ov: _View, metric: str, threshold: float, *, same: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lefts: list[np.ndarray] = []
        rights: list[np.ndarray] = []
        scores: list[np.ndarray] = []

        def rows_of(s: _Segment, offsets: np.ndarray | None, idx: np.ndarray) -> np.ndarray:
            return (idx if offsets is None else offsets[idx]) + s.first_row

        for a, sa in enumerate(v.segments):
            xa, oa = self._live_block(v, sa)
            if not len(xa):
                continue
            if same:
                i, j, s = kernels.similar_pairs(xa, threshold, metric=metric)
                lefts.append(rows_of(sa, oa, i))
                rights.append(rows_of(sa, oa, j))
                scores.append(s)
            for sb in ov.segments[a + 1 :] if same else ov.segments:
                xb, ob = self._live_block(ov, sb)
                if not len(xb):
                    continue
                i, j, s = kernels.similar_pairs(xa, threshold, y=xb, metric=metric)
                lefts.append(rows_of(sa, oa, i))
                rights.append(rows_of(sb, ob, j))
                scores.append(s)
        if not scores:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        li = np.concatenate(lefts).astype(np.int64, copy=False)
        lj = np.concatenate(rights).astype(np.int64, copy=False)
        sc = np.concatenate(scores).astype(np.float32, copy=False)
        order = np.lexsort((lj, li, -sc))
        return li[order], lj[order], sc[order]

    # ------------------------------------------------------------------ integrity, info

    def verify(self) -> dict[str, int]:
        """Check the whole store; raise :class:`~embedcache.StoreCorruptedError` naming the bad file.

        Checks the format version and settings, that segments tile the rows, that every
        committed segment file exists with the recorded length and crc32, that rows and
        segments agree, that metadata is valid JSON, and SQLite's own integrity check. Returns
        counts: ``segments``, ``rows`` (including deleted), ``live``, ``bytes``.
        """
        with self._reading() as v:
            conn = self._check_open()
            try:
                check = conn.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise StoreCorruptedError(f"{self._db_path}: SQLite integrity check failed: {check}")
                count, lo, hi = conn.execute("SELECT count(*), min(row), max(row) FROM rows").fetchone()
                if count != v.next_row or (count and (lo != 0 or hi != v.next_row - 1)):
                    raise StoreCorruptedError(
                        f"{self._db_path}: rows table holds {count} rows numbered {lo}..{hi}, "
                        f"segments hold rows 0..{v.next_row - 1}"
                    )
                bad = conn.execute(
                    "SELECT row FROM rows WHERE metadata IS NOT NULL AND json_valid(metadata) = 0 LIMIT 1"
                ).fetchone()
                if bad:
                    raise StoreCorruptedError(f"{self._db_path}: metadata of row {bad[0]} is not valid JSON")
                top = max((s.seg for s in v.segments), default=0)
                nxt = v.settings["next_segment"]
                if not isinstance(nxt, int) or nxt <= top:
                    raise StoreCorruptedError(
                        f"{self._db_path}: setting next_segment is {nxt!r}, expected an int above the "
                        f"highest committed segment {top}"
                    )
            except sqlite3.DatabaseError as exc:
                raise StoreCorruptedError(f"{self._db_path}: cannot read the store database ({exc})") from None
            total = 0
            for s in v.segments:
                crc = 0
                size = 0
                try:
                    with open(s.path, "rb") as f:
                        while block := f.read(_CHUNK_BYTES):
                            crc = zlib.crc32(block, crc)
                            size += len(block)
                except FileNotFoundError:
                    raise StoreCorruptedError(f"{s.path}: committed segment file is missing") from None
                if size != s.nbytes:
                    raise StoreCorruptedError(f"{s.path}: segment file is {size} bytes, the database records {s.nbytes}")
                if crc != s.crc32:
                    raise StoreCorruptedError(
                        f"{s.path}: checksum {crc:#010x} differs from the recorded {s.crc32:#010x}"
                    )
                total += size
            return {"segments": len(v.segments), "rows": v.next_row, "live": v.live, "bytes": total}

    def info(self) -> dict[str, Any]:
        """Settings and sizes: path, format_version, dim, dtype, metric, namespace, model,
        base_url and dimensions (of the embedder that made the vectors, when known), text_key,
        rows (live), deleted, segments, size_bytes (segments and database), generation."""
        with self._reading() as v:
            s = v.settings
            db = sum(p.stat().st_size for p in self.path.glob(DB_NAME + "*") if p.is_file())
            return {
                "path": str(self.path),
                "format_version": s["format_version"],
                "dim": v.dim,
                "dtype": s["dtype"],
                "metric": s["metric"],
                "namespace": s["namespace"],
                "model": s["model"],
                "base_url": s.get("base_url"),
                "dimensions": s.get("dimensions"),
                "text_key": self._text_key(v),
                "rows": v.live,
                "deleted": len(v.deleted),
                "segments": len(v.segments),
                "size_bytes": sum(x.nbytes for x in v.segments) + db,
                "generation": v.generation,
            }

    # ------------------------------------------------------------------ closing

    def _close_conn(self) -> None:
        for name in ("_conn", "_wconn"):
            conn = getattr(self, name)
            if conn is not None:
                conn.close()
                setattr(self, name, None)

    def close(self) -> None:
        """Close the database and unmap the segments (idempotent; waits for a write under way)."""
        with self._mutex:  # one lock at a time: a writer may read through this store
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._view = None
            self._arrays = {}
        with self._wmutex:
            if self._wconn is not None:
                self._wconn.close()
                self._wconn = None

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 60000")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA cache_size = -65536")  # 64 MiB: keeps the id index in memory
    return conn


def _generation(conn: sqlite3.Connection) -> int | None:
    row = conn.execute("SELECT value FROM settings WHERE key = 'generation'").fetchone()
    return None if row is None else row[0]


class _SegmentMissing(Exception):
    """Internal: a committed segment file is gone (a newer commit removed it, or damage)."""


def _next_segment(view: _View) -> int:
    """The number of the next segment file: above every committed one even if the setting is damaged."""
    n = view.settings["next_segment"]
    return max(n if isinstance(n, int) else 0, max((s.seg for s in view.segments), default=0) + 1)


def _execute_script(conn: sqlite3.Connection, script: str) -> None:
    """Run ``;``-separated statements inside the current transaction (executescript would commit)."""
    for stmt in script.split(";"):
        if stmt.strip():
            conn.execute(stmt)


def _chain(*iters: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    for it in iters:
        yield from it
