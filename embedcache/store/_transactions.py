"""Connections, the write lock and transactions of one open store.

Readers share one SQLite connection, writers another, so that a write (waiting for the lock,
embedding, writing segments) never holds up readers. A read runs inside one SQLite read
transaction and sees one committed state (a :class:`View`); a write holds ``write.lock``,
runs one ``BEGIN IMMEDIATE`` transaction on the latest state and commits it, or rolls back and
removes the files it made. Faults of the machine (a full disk, a file-size limit, a read-only
directory) surface as :class:`~embedcache.StoreWriteError` naming the file.
"""

from __future__ import annotations

import errno as errnos
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import numpy as np

from embedcache.errors import EmbedCacheError, StoreCorruptedError, StoreError, StoreLockedError, StoreWriteError
from embedcache.store._format import (
    DB_NAME,
    LOCK_NAME,
    SEGMENT_DIR,
    SEGMENT_NAME,
    SegmentMissing,
    View,
    connect,
    create_tables,
    generation,
    open_segments,
    read_view,
)

#: SQLite result codes (the low byte of an extended code) that mean the machine refused
#: I/O, not that the database is damaged: PERM, READONLY, IOERR, FULL, CANTOPEN
_SQLITE_FAULTS = {3, 8, 10, 13, 14}
#: errnos of the same: no space or quota left, a file-size limit, a read-only file system or
#: directory, an I/O error
_OS_FAULTS = {errnos.ENOSPC, errnos.EDQUOT, errnos.EFBIG, errnos.EROFS, errnos.EACCES, errnos.EPERM, errnos.EIO}


@dataclass
class Write:
    """One write: the state it starts from and the files it obsoletes (removed after commit).

    Files it makes need no list: after a failure, every segment file that the committed state
    does not name is removed."""

    view: View
    obsolete: list[Path] = field(default_factory=list)


def is_machine_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is the machine refusing I/O (an OSError, or SQLite's word for one)."""
    if isinstance(exc, EmbedCacheError):
        return False
    if isinstance(exc, OSError):
        return exc.errno in _OS_FAULTS
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.OperationalError) and code is not None and code & 0xFF in _SQLITE_FAULTS


def fault(exc: BaseException, path: object, doing: str) -> StoreWriteError:
    """A StoreWriteError naming ``path`` for ``exc`` (raise it ``from exc``)."""
    err = getattr(exc, "errno", None)
    reason = getattr(exc, "strerror", None) or (os.strerror(err) if isinstance(err, int) else None) or str(exc)
    out = StoreWriteError(f"{path}: {reason} while {doing}; nothing was committed, the store is at its last commit")
    if isinstance(err, int):
        out.errno = err
    return out


def remove_orphans(seg_dir: Path, committed: set[str]) -> None:
    """Remove segment files (and temporary ones) that are not in ``committed``; holds the lock."""
    for entry in os.scandir(seg_dir):
        if SEGMENT_NAME.match(entry.name) and entry.name not in committed:
            os.unlink(entry.path)


class Transactions:
    """The SQLite connections, the write lock and the cached committed view of one store."""

    def __init__(self, path: Path, lock_timeout: float) -> None:
        self.path = path
        self.db_path = path / DB_NAME
        self.seg_dir = path / SEGMENT_DIR
        self.lock_timeout = lock_timeout
        self.mutex = threading.RLock()  # the read connection and the cached view
        self.wmutex = threading.RLock()  # the write connection
        self._tls = threading.local()  # .conn: the connection of the operation under way in this thread
        self.view: View | None = None
        self._arrays: dict[int, np.ndarray] = {}
        self.conn: sqlite3.Connection | None = None
        self.wconn: sqlite3.Connection | None = None
        self._flock = filelock.FileLock(path / LOCK_NAME, thread_local=False)

    def open(self) -> bool:
        """Connect; return whether the database already holds a store."""
        try:
            self.conn = connect(self.db_path)
            self.wconn = connect(self.db_path)
            exists = self.conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'settings'"
            ).fetchone()
        except sqlite3.DatabaseError as exc:
            self.close()
            if is_machine_fault(exc):
                raise fault(exc, self.db_path, "opening the store database") from exc
            raise StoreCorruptedError(f"{self.db_path}: not a readable store database ({exc})") from None
        return exists is not None

    def create(self, settings: dict[str, Any]) -> None:
        """Create the tables in an empty database (unless another process just did)."""
        with self.wmutex, self.locked():
            conn = self.wconn
            assert conn is not None
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("BEGIN IMMEDIATE")
                if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'settings'").fetchone():
                    create_tables(conn, settings)
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if is_machine_fault(exc):
                    raise fault(exc, self.db_path, "creating the store database") from exc
                raise

    def current(self) -> sqlite3.Connection:
        """The connection of the read or write under way in this thread (else the read one)."""
        conn = getattr(self._tls, "conn", None) or self.conn
        if conn is None:
            raise StoreError(f"the store at {self.path} is closed")
        return conn

    def _load(self, conn: sqlite3.Connection, *, cache: bool) -> View:
        """The committed state of ``conn``'s transaction with its segments mapped; with
        ``cache`` (readers, under ``mutex``) reloaded only when it changed and kept."""
        if cache and self.view is not None:
            try:
                if generation(conn) == self.view.generation:
                    return self.view
            except sqlite3.DatabaseError:
                pass  # read_view says what is wrong
        view = read_view(conn, self.path, self.db_path)
        arrays = open_segments(view, self._arrays)
        if cache:
            self._arrays = arrays
            self.view = view
        return view

    @contextmanager
    def reading(self) -> Iterator[View]:
        """One read transaction: a consistent committed state for the whole operation."""
        with self.mutex:
            conn = self.conn
            if conn is None:
                raise StoreError(f"the store at {self.path} is closed")
            prev = getattr(self._tls, "conn", None)
            self._tls.conn = conn
            try:
                for attempt in range(100):
                    conn.execute("BEGIN")
                    try:
                        view = self._load(conn, cache=True)
                    except SegmentMissing as exc:
                        conn.execute("COMMIT")
                        # a writer removed it after committing a newer state: read that one
                        if attempt < 99 and generation(conn) != exc.args[1]:
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
    def locked(self) -> Iterator[None]:
        """Hold ``write.lock`` (StoreLockedError after ``lock_timeout`` seconds; < 0 waits)."""
        try:
            self._flock.acquire(timeout=self.lock_timeout)
        except filelock.Timeout:
            waited = "" if self.lock_timeout == 0 else f" within {self.lock_timeout:g} s"
            raise StoreLockedError(
                f"another process is writing to {self.path} (lock {self.path / LOCK_NAME} not acquired{waited})"
            ) from None
        except OSError as exc:
            raise fault(exc, self.path / LOCK_NAME, "taking the write lock") from exc
        try:
            yield
        finally:
            self._flock.release()

    @contextmanager
    def writing(self) -> Iterator[Write]:
        """Lock, open a write transaction on the latest state, commit (or undo) at the end.

        Runs on the write connection: readers in other threads go on meanwhile. On failure
        nothing is unlinked by name: the files that the committed state does not list (read
        afresh after the rollback) are removed, so a failure after COMMIT keeps what it
        committed. An OSError, or SQLite failing to write, becomes StoreWriteError.
        """
        with self.wmutex:
            conn = self.wconn
            if conn is None:
                raise StoreError(f"the store at {self.path} is closed")
            with self.locked():
                prev = getattr(self._tls, "conn", None)
                self._tls.conn = conn
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        view = self._load(conn, cache=False)
                    except SegmentMissing as exc:
                        raise StoreCorruptedError(f"{exc.args[0]}: committed segment file is missing") from None
                    w = Write(view)
                    remove_orphans(self.seg_dir, {s.path.name for s in view.segments})
                    yield w
                    conn.execute("UPDATE settings SET value = ? WHERE key = 'generation'", (view.generation + 1,))
                    conn.execute("COMMIT")
                except BaseException as exc:
                    try:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        committed = {Path(f).name for (f,) in conn.execute("SELECT file FROM segments")}
                        remove_orphans(self.seg_dir, committed)
                    except Exception:  # the next writer removes what is left
                        pass
                    if is_machine_fault(exc):
                        where = getattr(exc, "filename", None) or (
                            self.path if isinstance(exc, OSError) else self.db_path
                        )
                        raise fault(exc, where, "writing the store") from exc
                    raise
                finally:
                    self._tls.conn = prev
                for p in w.obsolete:  # committed: a file left here is removed by the next writer
                    try:
                        p.unlink(missing_ok=True)
                    except OSError:
                        pass

    def checkpoint(self) -> None:
        """Copy what the write-ahead log holds into the database, never waiting for readers."""
        with self.wmutex:
            if self.wconn is not None:
                try:
                    self.wconn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.OperationalError:
                    pass

    def close(self) -> None:
        """Close both connections and unmap the segments (waits for a write under way)."""
        with self.mutex:  # one lock at a time: a writer may read through this store
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            self.view = None
            self._arrays = {}
        with self.wmutex:
            if self.wconn is not None:
                self.wconn.close()
                self.wconn = None

