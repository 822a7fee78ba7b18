"""The write path: checking what is added, writing segments durably, ingest and compaction.

Every function here runs inside :meth:`Transactions.writing` (the write lock held, one SQLite
transaction open) except the input checks, which run before it. The fsync protocol: a segment
is written under a temporary name, fsynced, renamed into place; the segment directory is
fsynced; only then does the transaction commit (see ``_format``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from embedcache import _config
from embedcache._validation import as_matrix
from embedcache.errors import (
    ConfigurationError,
    DimensionMismatchError,
    DuplicateIdError,
    InvalidInputError,
    InvalidInputTypeError,
    NamespaceMismatchError,
    StoreError,
)
from embedcache.providers.base import validate_texts
from embedcache.store._format import (
    INSERT_SEGMENT,
    ROW_INDEXES,
    ROWS_TABLE,
    SQL_CHUNK,
    Segment,
    View,
    execute_script,
    next_segment,
    segment_file,
)
from embedcache.store._query import rows_of
from embedcache.store._transactions import Write, fault, is_machine_fault

# ----------------------------------------------------------------------------- checking input


def _is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (it does unless it holds a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_ids(ids: object, what: str = "ids") -> list[str]:
    out = validate_texts(ids, allow_empty_list=True, what=what)
    if not _is_utf8("".join(out)):  # SQLite would keep bytes that are not UTF-8, unreadable later
        k = next(k for k, i in enumerate(out) if not _is_utf8(i))
        raise InvalidInputError(f"{what}[{k}] must be Unicode text without lone surrogates, got {out[k]!r}")
    return out


def check_unique(ids: list[str]) -> None:
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        for x in ids:
            if x in seen:
                raise DuplicateIdError(f"id {x!r} appears more than once in one call; ids must be unique")
            seen.add(x)


def text_ids(texts: Sequence[str]) -> list[str]:
    """The ids :meth:`VectorStore.add_texts` gives rows by default: the first 32 hex digits of
    the SHA-256 of each text's UTF-8 bytes (lone surrogates passed through, as the cache keys
    them), and for a text repeated in ``texts`` ``-2``, ``-3`` ... after the hash of its later
    occurrences. The same texts get the same ids in every call, so adding them again is caught.

    >>> text_ids(["a", "b", "a"])[2] == text_ids(["a"])[0] + "-2"
    True
    """
    seen: dict[str, int] = {}
    out = []
    for t in texts:
        h = hashlib.sha256(t.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        n = seen[h] = seen.get(h, 0) + 1
        out.append(h if n == 1 else f"{h}-{n}")
    return out


def metadata_json(metadata: object, n: int) -> list[str | None]:
    """One JSON text (or None for no metadata) per row; raise on anything JSON would change."""
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


def with_texts(metadata: Sequence[dict[str, Any] | None], texts: list[str], key: str) -> list[dict[str, Any]]:
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


# ----------------------------------------------------------------------------- settings


def settings_updates(view: View, path: Path, dim: int | None, namespace: str | None, model: str | None) -> dict[str, Any]:
    """Settings to record (those not yet set), or raise if they contradict the store's."""
    s = view.settings
    updates: dict[str, Any] = {}
    if dim is not None:
        if s["dim"] is None:
            updates["dim"] = int(dim)
        elif int(s["dim"]) != int(dim):
            raise DimensionMismatchError(f"{path} holds vectors of dimension {s['dim']}, got dimension {dim}")
    for key, value in (("namespace", namespace), ("model", model)):
        if value is None:
            continue
        if s[key] is None:
            updates[key] = value
        elif s[key] != value:
            raise NamespaceMismatchError(f"{path} holds vectors of {key} {s[key]!r}, got {key} {value!r}")
    return updates


def set_settings(conn: sqlite3.Connection, updates: dict[str, Any]) -> None:
    conn.executemany("UPDATE settings SET value = ? WHERE key = ?", [(v, k) for k, v in updates.items()])


def record_embedder(conn: sqlite3.Connection, embedder: Any) -> None:
    """Record the ``base_url`` and ``dimensions`` the embedder was made with, once (through a
    wrapper's ``.embedder``), so that the same embedder can be rebuilt."""
    inner = getattr(embedder, "embedder", None)
    for key in ("base_url", "dimensions"):
        value = getattr(embedder, key, None)
        if value is None and inner is not None:
            value = getattr(inner, key, None)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            conn.execute("INSERT OR IGNORE INTO settings(key, value) VALUES (?, ?)", (key, value))


def text_key_for(view: View, path: Path, text_key: str | None) -> str:
    """The key add_texts keeps texts under: ``text_key`` if given (refused when the store has
    live rows kept under another), else the store's."""
    key = view.text_key
    if text_key is None or text_key == key:
        return key
    if view.live:
        raise ConfigurationError(
            f"{path} keeps each row's text under the metadata key {key!r}, got text_key={text_key!r}"
        )
    return text_key


# ----------------------------------------------------------------------------- vectors in pieces


def slices(x: np.ndarray, dt: np.dtype) -> Iterator[np.ndarray]:
    """``x`` in pieces of bounded size, converted to ``dt`` and checked finite."""
    step = max(1, _config.STORE_CHUNK_BYTES // max(1, x.shape[1] * x.dtype.itemsize))
    return converted((x[a : a + step] for a in range(0, x.shape[0], step)), dt)


def converted(chunks: Iterable[np.ndarray], dt: np.dtype) -> Iterator[np.ndarray]:
    """Chunks in dtype ``dt``, C-contiguous and checked finite."""
    done = 0
    for c in chunks:
        step = max(1, _config.STORE_CHUNK_BYTES // max(1, c.shape[1] * dt.itemsize))
        for a in range(0, c.shape[0], step):
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
                y = np.ascontiguousarray(c[a : a + step], dtype=dt)
            if not np.isfinite(y).all():
                row = int(np.flatnonzero(~np.isfinite(y).all(axis=1))[0])
                # finite as given: too large for the store's dtype
                extra = f" ({dt.name} holds values up to {float(np.finfo(dt).max):.5g})" \
                    if np.isfinite(c[a + row]).all() or dt.itemsize == 2 else ""
                raise InvalidInputError(f"vectors must be finite, row {row + done + a} is not{extra}")
            yield y
        done += c.shape[0]


def embedded(texts: list[str], embedder: Any, path: Path, view: View) -> tuple[int, Iterator[np.ndarray]]:
    """Embed ``texts`` in chunks of ``_config.STORE_EMBED_CHUNK``: the width of the vectors
    (from the first chunk, embedded now) and every chunk (the later ones checked to be as wide).
    Into a store that has a width, the first text goes alone: an embedder of another width is
    found at the price of one text, not of a chunk."""

    def calls() -> Iterator[np.ndarray]:
        step = _config.STORE_EMBED_CHUNK
        starts = list(range(0, len(texts), step))
        if view.dim is not None and len(texts) > 1:
            starts.insert(1, 1)
        for a, b in zip(starts, starts[1:] + [len(texts)]):
            part = texts[a:b]
            y = as_matrix(embedder.embed(part), "embedder output")
            if y.shape[0] != len(part):
                raise InvalidInputError(f"embedder returned {y.shape[0]} vectors for {len(part)} texts")
            yield y

    chunks = calls()
    first = next(chunks)
    d = first.shape[1]

    def all_chunks() -> Iterator[np.ndarray]:
        yield first
        for y in chunks:
            if y.shape[1] != d:
                raise DimensionMismatchError(
                    f"{path} holds vectors of dimension {view.dim or d}, got dimension {y.shape[1]} "
                    "from a later call to the embedder"
                )
            yield y

    return d, all_chunks()


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


def _chain(*iters: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    for it in iters:
        yield from it


# ----------------------------------------------------------------------------- files


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if is_machine_fault(exc):
            raise fault(exc, path, "syncing the directory") from exc
        raise


def make_dirs(seg_dir: Path) -> bool:
    """Create the store directory and ``segments/`` as needed, each new entry made durable;
    return whether anything was created."""
    missing: list[Path] = []
    p = seg_dir
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    try:
        seg_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if is_machine_fault(exc):
            raise fault(exc, exc.filename or seg_dir, "creating the store directory") from exc
        raise
    for d in reversed(missing):
        fsync_dir(d.parent)
    return bool(missing)


def write_segment(
    seg_dir: Path, seg: int, chunks: Iterable[np.ndarray], stop: threading.Event, suffix: str = ".vec"
) -> tuple[int, int]:
    """Write, fsync and rename one segment file (or index file, named by ``suffix``); return
    its length and crc32."""
    final = seg_dir / f"{seg:06d}{suffix}"
    tmp = seg_dir / f"{seg:06d}{suffix}.tmp"
    crc = 0
    nbytes = 0
    try:
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
    except OSError as exc:
        if is_machine_fault(exc):
            raise fault(exc, tmp, "writing a segment") from exc
        raise
    return nbytes, crc


def _check_length(seg: int, rows: int, d: int, dt: np.dtype, nbytes: int) -> None:
    if nbytes != rows * d * dt.itemsize:
        raise StoreError(
            f"segment {seg:06d}.vec got {nbytes} bytes, expected {rows * d * dt.itemsize} "
            f"for {rows} rows of dimension {d}; nothing was committed"
        )


def _write_segments(
    seg_dir: Path, plan: list[tuple[int, int, int]], source: _RowStream, d: int, dt: np.dtype, stop: threading.Event
) -> list[tuple[int, str, int, int, int, int]]:
    """Write the segments of ``plan`` (number, first row, rows) from ``source``; their table rows."""
    out = []
    for seg, r0, rows in plan:
        nbytes, crc = write_segment(seg_dir, seg, source.take(rows), stop)
        _check_length(seg, rows, d, dt, nbytes)
        out.append((seg, segment_file(seg), r0, rows, nbytes, crc))
    return out


def duplicate_error(conn: sqlite3.Connection, ids: list[str]) -> DuplicateIdError:
    found = rows_of(conn, ids)
    first = next((i for i in ids if i in found), None)
    return DuplicateIdError(f"id {first!r} is already in the store; pass upsert=True to replace it")


def _insert_rows(conn: sqlite3.Connection, ids: list[str], md: list[str | None], first_row: int, upsert: bool) -> None:
    for a in range(0, len(ids), SQL_CHUNK):
        part = ids[a : a + SQL_CHUNK]
        if upsert:
            conn.execute(
                "UPDATE rows SET deleted = 1 WHERE deleted = 0 AND id IN (SELECT value FROM json_each(?))",
                (json.dumps(part),),
            )
        try:
            if md[a : a + SQL_CHUNK].count(None) != len(part):
                pairs = ",".join(f"[{json.dumps(i)},{m or 'null'}]" for i, m in zip(part, md[a : a + SQL_CHUNK]))
                conn.execute(
                    "INSERT INTO rows(row, id, metadata) SELECT ? + key, json_extract(value, '$[0]'), "
                    "json_extract(value, '$[1]') FROM json_each(?)",
                    (first_row + a, f"[{pairs}]"),
                )
            else:
                conn.execute(
                    "INSERT INTO rows(row, id) SELECT ? + key, value FROM json_each(?)",
                    (first_row + a, json.dumps(part)),
                )
        except sqlite3.IntegrityError:
            raise duplicate_error(conn, ids) from None


def ingest(
    conn: sqlite3.Connection,
    w: Write,
    seg_dir: Path,
    ids: list[str],
    md: list[str | None],
    d: int,
    chunks: Iterator[np.ndarray],
    upsert: bool,
) -> None:
    """Write rows ``ids`` (vectors from ``chunks``) as new segments and register them in ``w``.

    A small last segment is merged into the new one (like a binary counter), so many small
    adds leave O(log n) segments. Segments are written by a second thread while this one
    inserts the rows."""
    view = w.view
    if view.dim is not None and view.dim != d:
        raise DimensionMismatchError(f"{seg_dir.parent} holds vectors of dimension {view.dim}, got dimension {d}")
    dt = view.dtype
    n = len(ids)
    rows_per_seg = max(1, _config.MAX_SEGMENT_BYTES // (d * dt.itemsize))
    merged: list[Segment] = []
    m = n
    tail = list(view.segments)
    while tail and tail[-1].rows <= m and tail[-1].rows + m <= rows_per_seg:
        s = tail.pop()
        merged.insert(0, s)
        m += s.rows
    first_row = merged[0].first_row if merged else view.next_row

    def old_rows() -> Iterator[np.ndarray]:
        step = max(1, _config.STORE_CHUNK_BYTES // (d * dt.itemsize))
        for s in merged:
            assert s.array is not None
            for a in range(0, s.rows, step):
                yield np.ascontiguousarray(s.array[a : a + step])

    source = _RowStream(_chain(old_rows(), chunks))
    stop = threading.Event()
    first_seg = next_segment(view)
    plan = [(first_seg + i, first_row + a, min(rows_per_seg, m - a)) for i, a in enumerate(range(0, m, rows_per_seg))]
    with ThreadPoolExecutor(1, thread_name_prefix="embedcache-store-write") as pool:
        fut = pool.submit(_write_segments, seg_dir, plan, source, d, dt, stop)
        try:
            _insert_rows(conn, ids, md, view.next_row, upsert)
            segments = fut.result()
        except BaseException:
            stop.set()
            raise
    fsync_dir(seg_dir)
    conn.execute(f"DELETE FROM segments WHERE seg IN ({','.join(str(s.seg) for s in merged)})")
    conn.executemany(INSERT_SEGMENT, segments)
    set_settings(conn, {"next_segment": first_seg + len(plan)})
    w.obsolete += [s.path for s in merged]


def delete(conn: sqlite3.Connection, ids: list[str]) -> None:
    """Mark ``ids`` deleted; all must be live, else nothing is."""
    found = rows_of(conn, ids)
    missing = [i for i in ids if i not in found]
    if missing:
        raise InvalidInputError(f"{len(missing)} id(s) are not in the store, e.g. {missing[0]!r}; nothing was deleted")
    conn.executemany("UPDATE rows SET deleted = 1 WHERE row = ?", ((r,) for r in found.values()))


def compact(conn: sqlite3.Connection, w: Write, seg_dir: Path) -> None:
    """Rewrite the live rows of ``w.view`` into full segments, renumbered ``0 .. L - 1`` in
    order; nothing to do when no row is deleted and every segment but the last is full."""
    view = w.view
    d = view.dim
    if d is None or not view.segments:
        return
    dt = view.dtype
    rows_per_seg = max(1, _config.MAX_SEGMENT_BYTES // (d * dt.itemsize))
    if len(view.deleted) == 0 and all(s.rows == rows_per_seg for s in view.segments[:-1]):
        return
    live = view.live
    step = max(1, _config.STORE_CHUNK_BYTES // (d * dt.itemsize))

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

    first_seg = next_segment(view)
    plan = [(first_seg + i, a, min(rows_per_seg, live - a)) for i, a in enumerate(range(0, live, rows_per_seg))]
    segments = _write_segments(seg_dir, plan, _RowStream(live_rows()), d, dt, threading.Event())
    fsync_dir(seg_dir)
    conn.execute(ROWS_TABLE.format(name="rows_new"))
    conn.execute(
        "INSERT INTO rows_new(row, id, deleted, metadata) "
        "SELECT row_number() OVER (ORDER BY row) - 1, id, 0, metadata FROM rows WHERE deleted = 0"
    )
    conn.execute("DROP TABLE rows")
    conn.execute("ALTER TABLE rows_new RENAME TO rows")
    execute_script(conn, ROW_INDEXES)
    conn.execute("DELETE FROM segments")
    conn.executemany(INSERT_SEGMENT, segments)
    set_settings(conn, {"next_segment": first_seg + len(segments)})
    w.obsolete += [s.path for s in view.segments]
