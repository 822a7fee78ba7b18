"""The adapter to diskcache: the only module of embedcache that imports it.

diskcache reads and writes one key per call; a batch of thousands of keys that way is several
times slower than one SQL statement per 900 keys. So :class:`Table` runs its own SQL on
diskcache's ``Cache`` table, through the cache's own thread-local, fork-aware connection
(``Cache._con``) and its :class:`~diskcache.Disk` (``Cache._disk``). These internals, and the
table's columns (:data:`COLUMNS`), are checked when a cache opens and by the test suite; the
tested diskcache versions are pinned in ``pyproject.toml`` (:data:`TESTED`). Everything else
(``len``, ``volume``, ``clear``, ``close``, eviction settings) is diskcache's public API.

Nothing is ever unpickled
    diskcache pickles every value that is not ``bytes``/``str``/number, and unpickles what
    it reads back, so whoever can write to the cache directory could run code in the
    reading process (CVE-2025-69872). :class:`BytesOnlyDisk` refuses to write anything but
    bytes and refuses to read any row that is not raw bytes; the batch reader applies the
    same rule in its SQL.

Namespaces and evictions
    Keys are hashes, so a row does not say whose vector it holds: each write labels its rows
    in diskcache's ``tag`` column with the id of its (namespace, model, dimensions) in a
    small side table, ``Embedcache_sources``, whose per-source entry counts SQLite triggers
    keep as rows come and go (whoever deletes them: eviction, ``clear``, prune). The
    lifetime count of evicted rows lives in ``Embedcache_counters``. Reading either is a
    handful of rows, whatever the size of the cache.

Page size
    A new cache's database has ``_config.CACHE_PAGE_SIZE`` pages (4 KiB); one made with other
    pages keeps them. SQLite maps at most 2 GiB of a database into memory (its build's cap);
    beyond that, each page a lookup needs is read whole into SQLite's page cache. At ten
    million entries nearly every key of a batch lands on another index page and another
    table page, so a lookup reads two pages per key, and a write of a few random keys copies
    a whole page per key to the write-ahead log: 64 KiB pages made both about twice as slow
    as 4 KiB pages, for 17% fewer bytes per 384-d entry (``benchmarks/bench_cache.py
    --study``); at ten million 384-d entries, 4 KiB pages serve about 70,000 to 80,000 warm
    lookups a second where 64 KiB pages served about 31,000 to 35,000.

Faults of the machine
    A full disk, a file-size limit or a read-only file raise
    :class:`~embedcache.errors.CacheError` naming the directory, with SQLite's error chained;
    the failed transaction is rolled back, so what was committed before is still served.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import diskcache

from embedcache import _config
from embedcache.cache._space import check_free_space
from embedcache.errors import CacheError, InvalidInputTypeError

#: the diskcache versions this adapter is tested with (as pinned in pyproject.toml)
TESTED = ">=5.6,<5.7"

#: (name, declared type) of each column of diskcache's ``Cache`` table, in order
COLUMNS = (
    ("rowid", "INTEGER"),
    ("key", "BLOB"),
    ("raw", "INTEGER"),
    ("store_time", "REAL"),
    ("expire_time", "REAL"),
    ("access_time", "REAL"),
    ("access_count", "INTEGER"),
    ("tag", "BLOB"),
    ("size", "INTEGER"),
    ("mode", "INTEGER"),
    ("filename", "TEXT"),
    ("value", "BLOB"),
)

_MODE_RAW = diskcache.core.MODE_RAW

#: what diskcache is told when there is no limit (it never evicts on its own: Table does)
_NO_LIMIT = 2**62

#: the side tables and the triggers that keep their counts (see the module docstring)
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS Embedcache_sources ("
    " id INTEGER PRIMARY KEY, namespace TEXT NOT NULL, model TEXT NOT NULL,"
    " dimensions INTEGER NOT NULL, entries INTEGER NOT NULL DEFAULT 0, value_bytes INTEGER,"
    " UNIQUE (namespace, model, dimensions))",
    "CREATE TABLE IF NOT EXISTS Embedcache_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO Embedcache_counters VALUES ('evicted', 0)",
    "CREATE TRIGGER IF NOT EXISTS Embedcache_sources_insert AFTER INSERT ON Cache"
    " FOR EACH ROW WHEN NEW.tag IS NOT NULL BEGIN"
    " UPDATE Embedcache_sources SET entries = entries + 1, value_bytes = length(NEW.value)"
    " WHERE id = NEW.tag; END",
    "CREATE TRIGGER IF NOT EXISTS Embedcache_sources_delete AFTER DELETE ON Cache"
    " FOR EACH ROW WHEN OLD.tag IS NOT NULL BEGIN"
    " UPDATE Embedcache_sources SET entries = entries - 1 WHERE id = OLD.tag; END",
    "CREATE TRIGGER IF NOT EXISTS Embedcache_sources_update AFTER UPDATE OF tag ON Cache"
    " FOR EACH ROW WHEN OLD.tag IS NOT NEW.tag BEGIN"
    " UPDATE Embedcache_sources SET entries = entries - 1 WHERE id = OLD.tag;"
    " UPDATE Embedcache_sources SET entries = entries + 1 WHERE id = NEW.tag; END",
    # Deletions of the row with the highest rowid: only after one can SQLite give a new row a
    # rowid at or below one seen before (see KeyReader).
    "INSERT OR IGNORE INTO Embedcache_counters VALUES ('tail_deletes', 0)",
    "CREATE TRIGGER IF NOT EXISTS Embedcache_tail_delete AFTER DELETE ON Cache"
    " FOR EACH ROW WHEN NOT EXISTS (SELECT 1 FROM Cache WHERE rowid > OLD.rowid) BEGIN"
    " UPDATE Embedcache_counters SET value = value + 1 WHERE name = 'tail_deletes'; END",
)

# SQLite's primary result codes (the low byte of an extended code)
_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 8, 10, 13, 14
_SQLITE_BUSY = 5


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
        return 0, _MODE_RAW, None, value

    def fetch(self, mode: int, filename: str | None, value: object, read: bool) -> bytes:
        if mode != _MODE_RAW or filename is not None or type(value) is not bytes:
            raise _RefusedValue(f"refusing a cache row stored in mode {mode}, not raw bytes")
        return value

    def remove(self, file_path: str) -> None:
        # Values are never files here, so a row naming one was written by someone else:
        # delete it (on eviction, replacement or clear) only if it lies inside the cache.
        root = os.path.realpath(self._directory)
        target = os.path.realpath(os.path.join(root, file_path))
        if os.path.commonpath([root, target]) == root and target != root:
            super().remove(file_path)


def _code(exc: BaseException) -> int | None:
    """SQLite's primary result code of ``exc`` (Python >= 3.11), else None."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _describe(exc: BaseException) -> str:
    """``exc`` with SQLite's error name, and a hint when the machine is at fault."""
    name = getattr(exc, "sqlite_errorname", None)
    text = f"{exc} ({name})" if name else str(exc)
    if isinstance(exc, OSError) or _code(exc) in (_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN):
        text += "; is the disk full, a file-size limit reached or the directory read-only?"
    return text


def _refuse_foreign(directory: str) -> None:
    """Raise CacheError for a directory that is not an embedding cache to be: a vector store,
    or one whose ``cache.db`` another program's diskcache made and filled (entries whose
    keys are not this cache's 32-byte digests), so that no command adds tables to it or
    clears it."""
    if os.path.exists(os.path.join(directory, "store.sqlite")):
        raise CacheError(f"{directory} is a vector store, not an embedding cache; give another cache directory")
    path = os.path.join(directory, "cache.db")
    if not os.path.exists(path):
        return
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return  # opening it for real says what is wrong
    try:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "Cache" not in tables or any(t.startswith("Embedcache_") for t in tables):
            return
        first = con.execute("SELECT typeof(key), length(key) FROM Cache LIMIT 1").fetchone()
    except sqlite3.Error:
        return
    finally:
        con.close()
    if first is not None and tuple(first) != ("blob", 32):
        raise CacheError(f"{directory} holds another program's diskcache ({path} has entries that are not "
                         "embedding vectors); embedcache neither reads nor changes it: give another cache directory")


def _create(directory: str) -> None:
    """Create the database of a new cache with ``_config.CACHE_PAGE_SIZE`` pages (the page
    size of a database is fixed once it holds anything; an existing cache keeps its own)."""
    _refuse_foreign(directory)
    path = os.path.join(directory, "cache.db")
    if os.path.exists(path):
        return
    os.makedirs(directory, exist_ok=True)
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute(f"PRAGMA page_size = {int(_config.CACHE_PAGE_SIZE)}")
        con.execute("PRAGMA auto_vacuum = FULL")  # diskcache's setting, fixed at creation too
        con.execute("PRAGMA journal_mode = wal")  # writes the header: the page size is set
    finally:
        con.close()


class Table:
    """diskcache's ``Cache`` table of one directory, read and written in batches.

    Values are stored inline, as raw bytes, with diskcache's accounting (entry count, size)
    kept by its own triggers, so diskcache's ``len``, ``volume``, ``clear`` and eviction keep
    working on the same directory.
    """

    def __init__(self, directory: str, *, size_limit: int | None, timeout: float) -> None:
        self.directory = directory
        self.size_limit = size_limit  # None: never evict
        self.timeout = timeout
        self._sources: dict[tuple[str, str, int], int] = {}
        try:
            _create(directory)
            self._dc = diskcache.Cache(
                directory,
                timeout=timeout,
                disk=BytesOnlyDisk,
                size_limit=_NO_LIMIT if size_limit is None else size_limit,
                eviction_policy="least-recently-stored",
                statistics=0,
                tag_index=0,
                sqlite_mmap_size=_config.CACHE_MMAP_BYTES,  # reads through memory, not read()
                sqlite_cache_size=-(_config.CACHE_PAGE_CACHE_BYTES // 1024),
            )
            columns = tuple((row[1], row[2]) for row in self._dc._con.execute("PRAGMA table_info(Cache)"))
            #: the page size of this cache's database (that of the day it was made)
            self.page_size = int(self._dc._con.execute("PRAGMA page_size").fetchone()[0])
            if columns == COLUMNS:
                self._transaction(lambda con: [con.execute(q) for q in _SCHEMA])
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            raise CacheError(f"cannot open the embedding cache at {directory!r}: {_describe(exc)}") from exc
        if columns != COLUMNS:
            self._dc.close()
            raise CacheError(
                f"cannot open the embedding cache at {directory!r}: expected diskcache's Cache "
                f"table with columns {[c for c, _ in COLUMNS]}, got {[c for c, _ in columns]} "
                f"(diskcache {diskcache.__version__}; embedcache is tested with diskcache{TESTED})"
            )

    # ------------------------------------------------------------------ reads

    def select(self, keys: list[bytes], size: int | None = None) -> Iterator[tuple[int, list[bytes | None]]]:
        """``(start, values)``: the stored value of each key of ``keys[start:start + len(values)]``.

        One SELECT per chunk of keys, a ``VALUES`` list LEFT JOINed to the key index: one
        row per key, ``None`` where absent, in the list's order in practice (not by contract:
        every value carries its key, and the decoder checks it). Only the value column comes
        back, and a read never writes. Only raw rows stored inline qualify: a pickled or
        file-backed row is never read. ``size``: only values of exactly this many bytes.
        """
        now = time.time()
        size_filter = "" if size is None else f" AND length(c.value) = {int(size)}"
        step = _config.CACHE_SQL_CHUNK
        try:
            sql = self._dc._con.execute
            for start in range(0, len(keys), step):
                chunk = keys[start : start + step]
                rows = sql(
                    f"SELECT c.value FROM (VALUES {','.join(['(?)'] * len(chunk))}) AS q"
                    " LEFT JOIN Cache AS c ON c.key = q.column1 AND c.raw = 1"
                    f" AND c.mode = {_MODE_RAW} AND c.filename IS NULL"
                    f" AND typeof(c.value) = 'blob'{size_filter}"
                    " AND (c.expire_time IS NULL OR c.expire_time > ?)",
                    (*chunk, now),
                ).fetchall()
                if len(rows) != len(chunk):
                    raise CacheError(f"expected {len(chunk)} rows from the cache, got {len(rows)}")
                yield start, [r[0] for r in rows]
        except (sqlite3.Error, OSError) as exc:
            raise CacheError(
                f"cannot read the embedding cache at {self.directory!r}: {_describe(exc)}"
            ) from exc

    def __len__(self) -> int:
        try:
            return int(len(self._dc))
        except sqlite3.Error as exc:
            raise CacheError(
                f"cannot read the embedding cache at {self.directory!r}: {_describe(exc)}"
            ) from exc

    def volume(self) -> int:
        """Bytes on disk (diskcache's estimate)."""
        try:
            return int(self._dc.volume())
        except sqlite3.Error as exc:
            raise CacheError(
                f"cannot read the embedding cache at {self.directory!r}: {_describe(exc)}"
            ) from exc

    # ------------------------------------------------------------------ writes

    def replace(self, values: dict[bytes, bytes], source: tuple[str, str, int] | None = None) -> int:
        """Insert or replace ``values`` in one transaction, then evict the oldest writes if the
        cache is over its size limit; returns how many rows were evicted. On any failure
        nothing of it is kept.

        source: (namespace, model, dimensions or 0) the rows are labelled with (see the
            module docstring); ``None``: unlabelled.

        A write that would leave the disk with less than ``_config.CACHE_MIN_FREE_BYTES`` free
        is refused before it starts.
        """
        if not values:
            return 0
        check_free_space(self.directory, len(values), sum(map(len, values.values())), self.page_size)
        tag = None if source is None else self._source_id(source)
        files, evicted = self._transaction(lambda con: self._write(con, values, time.time(), tag))
        for filename in files:  # files of replaced or evicted rows, removed after COMMIT
            self._dc._disk.remove(filename)
        return evicted

    def _transaction(self, body: Any) -> Any:
        """``body(con)`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error;
        a machine fault or a lock held too long by another writer is a CacheError."""
        try:
            con = self._dc._con
            try:
                con.execute("BEGIN IMMEDIATE")  # waits up to `timeout` for another writer
            except sqlite3.OperationalError as exc:
                if _code(exc) == _SQLITE_BUSY or "locked" in str(exc):
                    raise CacheError(
                        f"the embedding cache at {self.directory!r} stayed locked by another "
                        f"writer for more than {self.timeout:g} s"
                    ) from exc
                raise
            try:
                result = body(con)
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
            return result
        except (sqlite3.Error, OSError) as exc:
            raise CacheError(
                f"cannot write the embedding cache at {self.directory!r}: {_describe(exc)}"
            ) from exc

    def _source_id(self, source: tuple[str, str, int]) -> int:
        """The id of ``source`` in ``Embedcache_sources``, added if new."""
        found = self._sources.get(source)
        if found is None:
            sql = "SELECT id FROM Embedcache_sources WHERE namespace = ? AND model = ? AND dimensions = ?"

            def add(con: sqlite3.Connection) -> int:
                con.execute("INSERT OR IGNORE INTO Embedcache_sources (namespace, model, dimensions)"
                            " VALUES (?, ?, ?)", source)
                return int(con.execute(sql, source).fetchone()[0])

            found = self._sources[source] = self._transaction(add)
        return found

    def _write(
        self, con: sqlite3.Connection, values: dict[bytes, bytes], now: float, tag: int | None
    ) -> tuple[list[str], int]:
        """The statements of :meth:`replace`; returns the files rows named, and how many rows
        were evicted."""
        keys = list(values)
        existing: dict[bytes, tuple[int, str | None]] = {}
        step = _config.CACHE_SQL_CHUNK
        for start in range(0, len(keys), step):
            chunk = keys[start : start + step]
            rows = con.execute(
                f"SELECT key, rowid, filename FROM Cache WHERE raw = 1 AND key IN ({','.join('?' * len(chunk))})",
                chunk,
            ).fetchall()
            existing.update((k, (rowid, fn)) for k, rowid, fn in rows)
        con.executemany(
            "UPDATE Cache SET store_time = ?, expire_time = NULL, access_time = ?,"
            " access_count = 0, tag = ?, size = 0, mode = ?, filename = NULL,"
            " value = ? WHERE rowid = ?",
            [(now, now, tag, _MODE_RAW, values[k], rowid) for k, (rowid, _) in existing.items()],
        )
        # One INSERT per chunk, not one per row: a row statement fires the count triggers in
        # a statement transaction of its own, which copies every page it touches to a
        # statement journal first; per chunk, each page is copied once.
        new = [x for k, v in values.items() if k not in existing for x in (k, v)]
        rows = 2 * step
        for start in range(0, len(new), rows):
            chunk = new[start : start + rows]
            con.execute(
                "INSERT INTO Cache(key, raw, store_time, expire_time, access_time,"
                " access_count, tag, size, mode, filename, value)"
                " SELECT column1, 1, ?, NULL, ?, 0, ?, 0, ?, NULL, column2"
                f" FROM (VALUES {','.join(['(?,?)'] * (len(chunk) // 2))})",
                (now, now, tag, _MODE_RAW, *chunk),
            )
        files = [fn for _, fn in existing.values() if fn is not None]
        evicted_files, evicted = self._evict(con, now)
        return files + evicted_files, evicted

    def _evict(self, con: sqlite3.Connection, now: float) -> tuple[list[str], int]:
        """Least-recently-stored eviction, inside the writing transaction.

        diskcache culls up to ``cull_limit`` rows per ``set`` while over the limit; a batch
        removes about as many of the oldest rows as bring the cache back under the limit
        (estimated from the mean row size: freed pages are returned at COMMIT), and never the
        rows it has just written. Returns the files the removed rows named, and how many rows
        were removed (added to the lifetime count). Without a size limit nothing is evicted.
        """
        if self.size_limit is None:
            return [], 0
        volume = self._dc.volume()
        if volume < self.size_limit:
            return [], 0
        count = max(len(self._dc), 1)
        excess = int((volume - self.size_limit) * count / volume) + self._dc.cull_limit
        rows = con.execute(
            "SELECT rowid, filename FROM Cache WHERE store_time < ? ORDER BY store_time LIMIT ?",
            (now, excess),
        ).fetchall()
        step = _config.CACHE_SQL_CHUNK
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            con.execute(f"DELETE FROM Cache WHERE rowid IN ({','.join('?' * len(chunk))})", [r[0] for r in chunk])
        con.execute("UPDATE Embedcache_counters SET value = value + ? WHERE name = 'evicted'", (len(rows),))
        return [fn for _, fn in rows if fn is not None], len(rows)

    # ------------------------------------------------------------------ what it holds

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            return self._dc._con.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise CacheError(
                f"cannot read the embedding cache at {self.directory!r}: {_describe(exc)}"
            ) from exc

    def evicted(self) -> int:
        """Rows evicted over the cache's lifetime."""
        return int(self._read("SELECT value FROM Embedcache_counters WHERE name = 'evicted'")[0][0])

    def sources(self) -> list[tuple[str, str, int, int, int]]:
        """(namespace, model, dimensions or 0, entries, bytes of its last value written) of each
        source that has entries."""
        return self._read(
            "SELECT namespace, model, dimensions, entries, value_bytes FROM Embedcache_sources"
            " WHERE entries > 0 ORDER BY namespace, model, dimensions"
        )

    def prune(self, namespace: str) -> int:
        """Delete every row labelled with ``namespace`` (whatever its model and dimensions),
        ``_config.CACHE_DELETE_CHUNK`` rows per transaction; returns how many were deleted."""
        ids = [r[0] for r in self._read("SELECT id FROM Embedcache_sources WHERE namespace = ?", (namespace,))]
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))

        def chunk(con: sqlite3.Connection, after: int) -> tuple[int, list[str], int]:
            rows = con.execute(
                f"SELECT rowid, filename FROM Cache WHERE rowid > ? AND tag IN ({marks}) ORDER BY rowid LIMIT ?",
                (after, *ids, _config.CACHE_DELETE_CHUNK),
            ).fetchall()
            step = _config.CACHE_SQL_CHUNK
            for start in range(0, len(rows), step):
                part = [r[0] for r in rows[start : start + step]]
                con.execute(f"DELETE FROM Cache WHERE rowid IN ({','.join('?' * len(part))})", part)
            return len(rows), [fn for _, fn in rows if fn is not None], rows[-1][0] if rows else after

        removed, after = 0, -1
        while True:
            n, files, after = self._transaction(lambda con: chunk(con, after))
            for filename in files:
                self._dc._disk.remove(filename)
            removed += n
            if n < _config.CACHE_DELETE_CHUNK:
                return removed

    def clear(self) -> int:
        """Remove every entry; returns how many were removed."""
        try:
            return int(self._dc.clear(retry=True))
        except (sqlite3.Error, OSError) as exc:
            raise CacheError(
                f"cannot clear the embedding cache at {self.directory!r}: {_describe(exc)}"
            ) from exc

    def close(self) -> None:
        """Close this thread's database connection (it reopens on next use)."""
        self._dc.close()


#: the 8-byte prefix of every raw key (32-byte blob) of the table, ``rowid`` placeholder for where
_PREFIXES = ("SELECT substr(key, 1, 8) FROM Cache WHERE typeof(key) = 'blob' AND length(key) = 32{}")


class KeyReader:
    """The keys of a cache's table, read in full once and then as rows are added, for a
    filter of absent keys (:class:`~embedcache.cache._keyfilter.KeyFilter`), on a connection
    of its own that never writes.

    New rows are found by rowid: ``Cache.rowid`` is diskcache's ``INTEGER PRIMARY KEY``, and a
    new row gets one more than the highest rowid in the table when it is inserted. So every
    row committed after a read whose highest rowid was ``M`` has a rowid above ``M``, unless
    the row ``M`` itself was deleted first (a deletion lowers the highest rowid only when it
    removes the row holding it). The trigger ``Embedcache_tail_delete`` counts exactly those
    deletions (``tail_deletes``), whoever makes them (eviction, ``clear``, ``prune``, another
    version of the library): while the count is unchanged, ``rowid > M`` is everything new.
    The count and the rows are read in one transaction, so from one snapshot of the database.
    ``PRAGMA data_version`` tells, in a microsecond or two, whether any other connection
    committed since the last look.

    Use from one thread at a time.
    """

    def __init__(self, table: Table) -> None:
        self.directory = table.directory
        self.timeout = table.timeout
        self._con: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._con is None:
            con = sqlite3.connect(os.path.join(self.directory, "cache.db"), timeout=self.timeout,
                                  isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA query_only = 1")
            self._con = con
        return self._con

    def data_version(self) -> int:
        """A number that changes when another connection commits to the database."""
        try:
            return int(self._connection().execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as exc:
            raise CacheError(f"cannot read the embedding cache at {self.directory!r}: {_describe(exc)}") from exc

    def read(self, after: int | None, chunk: int) -> Iterator[tuple[int, int, bytes]]:
        """``(tail_deletes, highest rowid, prefixes)``: the 8-byte key prefixes (big-endian,
        concatenated) of the rows, all of them (``after=None``, in key order) or those whose rowid is
        above ``after``, ``chunk`` rows at a time, all from one snapshot. The first two are the
        same in every chunk; at least one chunk comes (its prefixes may be empty). A consumer
        that stops early must close the iterator (it ends the read transaction)."""
        try:
            con = self._connection()
            con.execute("BEGIN")
            try:
                # a read transaction starts at its first SELECT: the counter's
                tail = int(con.execute("SELECT value FROM Embedcache_counters WHERE name = 'tail_deletes'").fetchone()[0])
                top = int(con.execute("SELECT coalesce(max(rowid), 0) FROM Cache").fetchone()[0])
                if after is None:
                    cursor = con.execute(_PREFIXES.format(""))
                else:
                    cursor = con.execute(_PREFIXES.format(" AND rowid > ?"), (after,))
                first = True
                while True:
                    rows = cursor.fetchmany(chunk)
                    if rows or first:
                        yield tail, top, b"".join([r[0] for r in rows])
                    first = False
                    if len(rows) < chunk:
                        break
            finally:
                if con.in_transaction:
                    con.execute("COMMIT")
        except (sqlite3.Error, TypeError) as exc:
            raise CacheError(f"cannot read the embedding cache at {self.directory!r}: {_describe(exc)}") from exc

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
