"""The on-disk format of a vector store, and reading one committed state of it.

Format (version 1)
------------------
A store is a directory::

    store.sqlite          SQLite database (WAL journal): settings, ids, metadata, segment list
    segments/000001.vec   vector segments: raw little-endian float32 (or float16) values,
    segments/000002.vec   row-major, ``rows * dim`` values, no header
    write.lock            lock file held by the one writer (``filelock``)
    index/000007.cent     the partition index, when one was built (see ``_index``):
    index/000007.rows     centroids, cell offsets and row numbers, and the vectors
    index/000007.vec      in cell order; listed by the ``index`` setting

Tables of ``store.sqlite``:

``settings(key TEXT PRIMARY KEY, value)``
    ``format_version`` (``1``), ``dim`` (the dimension of the vectors, NULL until the first
    add), ``dtype`` (``float32`` or ``float16``), ``metric`` (``cosine`` or ``dot``),
    ``namespace`` and ``model`` (of the embedder that made the vectors, or NULL),
    ``generation`` (incremented by every commit) and ``next_segment`` (the number the next
    segment file will get; numbers are never reused). Optional: ``base_url`` and
    ``dimensions`` of that embedder (what it was asked for, NULL for its default), recorded by
    ``add_texts``, and ``text_key``, the metadata key under which ``add_texts`` keeps each
    row's text (``"text"`` when absent), and ``index``, the JSON description of the committed
    partition index (its files with lengths and crc32, the rows it covers; see ``_index``).
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
    ``delete`` or replaced by an upsert; a unique index over ``id`` among rows with
    ``deleted = 0`` keeps live ids unique. ``compact`` drops deleted rows and renumbers the
    live ones ``0 .. L - 1`` in the same order.

Write protocol (``_transactions`` and ``_write``): every write holds ``write.lock``, writes new
segment files under a temporary name, fsyncs them, renames them into place, fsyncs the
directory, and only then commits one SQLite transaction (``synchronous=FULL``) that registers
the segments and rows. Files made obsolete by a commit (merged or compacted segments) are
removed after it. A crash at any point therefore leaves the last committed state, and nothing
half-written is ever listed. Readers take no lock: each operation reads inside one SQLite read
transaction, so it sees one committed state.
"""

from __future__ import annotations

import os
import re
import sqlite3
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedcache import _config
from embedcache._validation import METRICS
from embedcache.errors import StoreCorruptedError

FORMAT_VERSION = 1
DB_NAME = "store.sqlite"
SEGMENT_DIR = "segments"
LOCK_NAME = "write.lock"
#: ids sent to SQLite per statement (as one JSON array, unpacked by json_each)
SQL_CHUNK = 1 << 20
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
SEGMENT_NAME = re.compile(r"^\d+\.vec(\.tmp)?$")

ROWS_TABLE = (
    "CREATE TABLE {name}(row INTEGER PRIMARY KEY, id TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0, metadata TEXT)"
)
SCHEMA = f"""
CREATE TABLE settings(key TEXT PRIMARY KEY, value);
CREATE TABLE segments(
    seg INTEGER PRIMARY KEY,
    file TEXT NOT NULL,
    first_row INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    crc32 INTEGER NOT NULL
);
{ROWS_TABLE.format(name="rows")};
"""
ROW_INDEXES = """
CREATE UNIQUE INDEX rows_live_id ON rows(id) WHERE deleted = 0;
CREATE INDEX rows_deleted ON rows(row) WHERE deleted = 1;
"""
INSERT_SEGMENT = "INSERT INTO segments(seg, file, first_row, rows, nbytes, crc32) VALUES (?, ?, ?, ?, ?, ?)"


@dataclass
class Segment:
    seg: int
    path: Path
    first_row: int
    rows: int
    nbytes: int
    crc32: int
    array: np.ndarray | None = None


@dataclass
class View:
    """One committed state: settings, segments (by first row) and the deleted rows."""

    generation: int
    settings: dict[str, Any]
    segments: list[Segment]
    next_row: int
    deleted: np.ndarray  # sorted int64 row numbers
    _masks: dict[int, np.ndarray | None] = field(default_factory=dict)

    @property
    def dim(self) -> int | None:
        """The dimension of the vectors (the ``dim`` setting), None before the first add."""
        d = self.settings.get("dim")
        return None if d is None else int(d)

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.settings["dtype"]]

    @property
    def metric(self) -> str:
        return str(self.settings["metric"])

    @property
    def text_key(self) -> str:
        """The metadata key under which add_texts keeps each row's text."""
        return self.settings.get("text_key") or "text"

    @property
    def live(self) -> int:
        return self.next_row - len(self.deleted)

    def live_mask(self, s: Segment) -> np.ndarray | None:
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


class SegmentMissing(Exception):
    """Internal: a committed segment file is gone (a newer commit removed it, or damage)."""


def segment_file(seg: int) -> str:
    """The path of segment number ``seg``, relative to the store directory."""
    return f"{SEGMENT_DIR}/{seg:06d}.vec"


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 60000")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA cache_size = -65536")  # 64 MiB: keeps the id index in memory
    return conn


def execute_script(conn: sqlite3.Connection, script: str) -> None:
    """Run ``;``-separated statements inside the current transaction (executescript would commit)."""
    for stmt in script.split(";"):
        if stmt.strip():
            conn.execute(stmt)


def generation(conn: sqlite3.Connection) -> int | None:
    row = conn.execute("SELECT value FROM settings WHERE key = 'generation'").fetchone()
    return None if row is None else row[0]


def next_segment(view: View) -> int:
    """The number of the next segment file: above every committed one even if the setting is damaged."""
    n = view.settings["next_segment"]
    return max(n if isinstance(n, int) else 0, max((s.seg for s in view.segments), default=0) + 1)


def initial_settings(
    dim: int | None, dtype: str, metric: str, namespace: str | None, model: str | None
) -> dict[str, Any]:
    """The settings of a new, empty store."""
    return {
        "format_version": FORMAT_VERSION,
        "dim": dim,
        "dtype": dtype,
        "metric": metric,
        "namespace": namespace,
        "model": model,
        "generation": 0,
        "next_segment": 1,
    }


def create_tables(conn: sqlite3.Connection, settings: dict[str, Any]) -> None:
    """Create the tables and write ``settings`` (inside the caller's transaction)."""
    execute_script(conn, SCHEMA + ROW_INDEXES)
    conn.executemany("INSERT INTO settings(key, value) VALUES (?, ?)", settings.items())


def refuse_lost_database(db_path: Path, seg_dir: Path) -> None:
    """Raise when ``store.sqlite`` is missing or empty but the store held data: creating a
    new database there would make the next write remove every segment as an orphan."""
    try:
        size = db_path.stat().st_size
    except FileNotFoundError:
        size = None
    if size:
        return
    wal = db_path.with_name(DB_NAME + "-wal")
    segs = sorted(e.name for e in os.scandir(seg_dir) if SEGMENT_NAME.match(e.name))
    has_wal = wal.exists() and wal.stat().st_size > 0
    if segs or has_wal:
        state = "missing" if size is None else "empty (0 bytes)"
        held = f"{len(segs)} segment file(s) in {seg_dir}, e.g. {segs[0]}" if segs else f"a write-ahead log {wal}"
        raise StoreCorruptedError(
            f"{db_path} is {state} but the store holds {held}; refusing to create a new store "
            "over them (restore the database from a backup, or remove the directory to start afresh)"
        )


def read_view(conn: sqlite3.Connection, root: Path, db_path: Path) -> View:
    """The committed state as of ``conn``'s transaction, checked (format, settings, segment
    tiling and recorded lengths); segment files are not opened (see :func:`open_segments`)."""
    try:
        gen = generation(conn)
        if gen is None:
            raise StoreCorruptedError(f"{db_path}: settings lack 'generation'")
        settings = dict(conn.execute("SELECT key, value FROM settings").fetchall())
        version = settings.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreCorruptedError(
                f"{db_path}: unknown format version {version!r}; "
                f"this version of embedcache reads format {FORMAT_VERSION}"
            )
        for key in ("dim", "dtype", "metric", "namespace", "model", "next_segment"):
            if key not in settings:
                raise StoreCorruptedError(f"{db_path}: settings lack {key!r}")
        if settings["dtype"] not in DTYPES or settings["metric"] not in METRICS:
            raise StoreCorruptedError(
                f"{db_path}: unknown dtype {settings['dtype']!r} or metric {settings['metric']!r}"
            )
        segs = conn.execute(
            "SELECT seg, file, first_row, rows, nbytes, crc32 FROM segments ORDER BY first_row"
        ).fetchall()
        deleted = np.array(
            [r for (r,) in conn.execute("SELECT row FROM rows WHERE deleted = 1 ORDER BY row")],
            dtype=np.int64,
        )
    except sqlite3.DatabaseError as exc:
        raise StoreCorruptedError(f"{db_path}: cannot read the store database ({exc})") from None
    view = View(
        generation=gen,
        settings=settings,
        segments=[Segment(s, root / f, r0, n, nb, crc) for s, f, r0, n, nb, crc in segs],
        next_row=0,
        deleted=deleted,
    )
    expected_row = 0
    for s in view.segments:
        if s.first_row != expected_row or s.rows < 1:
            raise StoreCorruptedError(
                f"{db_path}: segment {s.path.name} covers rows {s.first_row}..{s.first_row + s.rows - 1}, "
                f"expected it to start at row {expected_row}"
            )
        expected_row += s.rows
        if view.dim is None or s.nbytes != s.rows * view.dim * view.dtype.itemsize:
            raise StoreCorruptedError(
                f"{db_path}: segment {s.path.name} records {s.nbytes} bytes for {s.rows} rows "
                f"of dimension {view.dim} ({settings['dtype']})"
            )
    view.next_row = expected_row
    return view


def open_segments(view: View, cached: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Memory-map every segment of ``view`` (reusing ``cached`` maps by segment number) and
    attach each map to its segment; raise SegmentMissing for a file that is gone."""
    arrays: dict[int, np.ndarray] = {}
    for s in view.segments:
        a = cached.get(s.seg)
        if a is None:
            # open once and check and map that one file: a writer may unlink the name
            # between a stat and a second open
            try:
                f = open(s.path, "rb")
            except FileNotFoundError:
                raise SegmentMissing(s.path, view.generation) from None
            with f:
                size = os.fstat(f.fileno()).st_size
                if size != s.nbytes:
                    raise StoreCorruptedError(
                        f"{s.path}: segment file is {size} bytes, the database records {s.nbytes} "
                        f"({'truncated' if size < s.nbytes else 'longer than committed'})"
                    )
                a = np.memmap(f, dtype=view.dtype, mode="r", shape=(s.rows, view.dim))
        arrays[s.seg] = a
        s.array = a
    return arrays


def verify(conn: sqlite3.Connection, view: View, db_path: Path) -> dict[str, int]:
    """Check the database and every committed segment file of ``view`` (see VectorStore.verify)."""
    try:
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise StoreCorruptedError(f"{db_path}: SQLite integrity check failed: {check}")
        count, lo, hi = conn.execute("SELECT count(*), min(row), max(row) FROM rows").fetchone()
        if count != view.next_row or (count and (lo != 0 or hi != view.next_row - 1)):
            raise StoreCorruptedError(
                f"{db_path}: rows table holds {count} rows numbered {lo}..{hi}, "
                f"segments hold rows 0..{view.next_row - 1}"
            )
        bad = conn.execute(
            "SELECT row FROM rows WHERE metadata IS NOT NULL AND json_valid(metadata) = 0 LIMIT 1"
        ).fetchone()
        if bad:
            raise StoreCorruptedError(f"{db_path}: metadata of row {bad[0]} is not valid JSON")
        top = max((s.seg for s in view.segments), default=0)
        nxt = view.settings["next_segment"]
        if not isinstance(nxt, int) or nxt <= top:
            raise StoreCorruptedError(
                f"{db_path}: setting next_segment is {nxt!r}, expected an int above the "
                f"highest committed segment {top}"
            )
    except sqlite3.DatabaseError as exc:
        raise StoreCorruptedError(f"{db_path}: cannot read the store database ({exc})") from None
    total = 0
    for s in view.segments:
        crc = 0
        size = 0
        try:
            with open(s.path, "rb") as f:
                while block := f.read(_config.STORE_CHUNK_BYTES):
                    crc = zlib.crc32(block, crc)
                    size += len(block)
        except FileNotFoundError:
            raise StoreCorruptedError(f"{s.path}: committed segment file is missing") from None
        if size != s.nbytes:
            raise StoreCorruptedError(f"{s.path}: segment file is {size} bytes, the database records {s.nbytes}")
        if crc != s.crc32:
            raise StoreCorruptedError(f"{s.path}: checksum {crc:#010x} differs from the recorded {s.crc32:#010x}")
        total += size
    return {"segments": len(view.segments), "rows": view.next_row, "live": view.live, "bytes": total}
