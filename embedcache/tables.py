"""Rows of plain text, JSON Lines, CSV, TSV and Parquet files: read, written back, and
written safely.

:func:`read_table` reads a file into a :class:`Dataset`, the rows as read and the text of each;
:func:`write_rows` writes some of those rows back, unchanged in the same format and converted
across formats; :func:`write_records` writes dict rows. Outputs are checked before any work
(:func:`check_outputs`) and written to temporary files in their target directories, renamed into
place only when every output of a :func:`staged_outputs` block is complete.

>>> import os, tempfile
>>> tmp = tempfile.TemporaryDirectory()
>>> d = tmp.name
>>> path = os.path.join(d, "posts.csv")
>>> with atomic_output(path) as f:
...     _ = f.write('id,body\\r\\n1,"a, b"\\r\\n2,c\\r\\n')
>>> data = read_table(path, field="body")
>>> data.texts, data.ids(None)
(['a, b', 'c'], ['1', '2'])
>>> write_rows(os.path.join(d, "kept.jsonl"), data, [1])
>>> open(os.path.join(d, "kept.jsonl"), encoding="utf-8").read()
'{"id": "2", "body": "c"}\\n'
>>> tmp.cleanup()

Inputs and outputs may be compressed, as their names say: ``.gz`` (gzip) or ``.zst``
(zstandard, the ``zstd`` extra) after the format's extension (``posts.jsonl.gz``). A CSV/TSV
file without a header row is read with ``header=False``, its text column chosen by 1-based
position (``field="6"``); rows whose text is empty, missing or null are errors, or with
``skip_empty`` kept as rows that have no text (:attr:`Dataset.skipped`).

Messages name the command-line options that choose a field (``--field``, ``--column``,
``--id-field``); every error is :class:`~embedcache.errors.InvalidInputError`, or ``OSError`` for
an output that cannot be written.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import datetime
import functools
import gzip
import io
import itertools
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedcache.errors import InvalidInputError, MissingDependencyError

__all__ = [
    "FORMATS",
    "Dataset",
    "Outputs",
    "atomic_output",
    "check_output",
    "compression_of",
    "check_outputs",
    "format_of",
    "jsonable",
    "read_table",
    "staged_outputs",
    "table_format",
    "write_records",
    "write_rows",
]

#: the formats :func:`read_table` reads and :func:`write_rows` writes
FORMATS = ("text", "jsonl", "csv", "tsv", "parquet")
_EXTENSIONS = {
    ".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
}


_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


def compression_of(path: str) -> str | None:
    """``"gzip"`` or ``"zstd"`` when ``path``'s name ends in ``.gz`` or ``.zst``, else None."""
    return _COMPRESSIONS.get(Path(path).suffix.lower())


def format_of(path: str) -> str | None:
    """The format ``path``'s extension names (``"jsonl"`` for ``.ndjson``, and for
    ``.jsonl.gz``...), or None."""
    name = Path(path)
    if name.suffix.lower() in _COMPRESSIONS:
        name = Path(name.stem)
    return _EXTENSIONS.get(name.suffix.lower())


def _zstandard() -> Any:
    try:
        import zstandard
    except ImportError as exc:
        raise MissingDependencyError(
            '.zst files need zstandard; install it with: pip install "embedcache-sim[zstd]"'
        ) from exc
    return zstandard


def _open_text(path: str, newline: str | None) -> Any:
    """``path`` opened for reading as UTF-8 text (a byte order mark dropped), decompressed
    as its name says."""
    kind = compression_of(path)
    if kind == "gzip":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline=newline)
    if kind == "zstd":
        reader = _zstandard().ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True)
        return io.TextIOWrapper(io.BufferedReader(reader), encoding="utf-8-sig", newline=newline)
    return open(path, encoding="utf-8-sig", newline=newline)


def _damaged_errors() -> tuple[type[BaseException], ...]:
    """What a damaged compressed file raises while it is read."""
    errors: list[type[BaseException]] = [gzip.BadGzipFile, EOFError, zlib.error]
    with contextlib.suppress(ImportError):
        import zstandard

        errors.append(zstandard.ZstdError)
    return tuple(errors)


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Rows of an input file and the text of each row, kept as read so that output rows are
    the input rows: JSON objects for JSON Lines and plain text, the cells of each line
    (alongside the header) for CSV and TSV, the Arrow table for Parquet.

    A file read with ``skip_empty`` may hold rows without text: their positions are in
    :attr:`skipped` (their entry in :attr:`texts` is ``""``); :meth:`with_text` gives the
    rows that have text. A CSV/TSV file read without a header row names its columns
    ``"1"``, ``"2"``... (as many as its longest row has cells) and is written back without
    one (:attr:`header` False). :attr:`notes` say how the file was read where its name did
    not say it (a ``.csv`` file of tab-separated lines)."""

    path: str
    fmt: str
    field: str
    texts: list[str]
    fieldnames: list[str]  # the header as read: may hold blank or repeated names (CSV, TSV, Parquet)
    records: list[dict[str, Any]] | None = None  # JSON Lines, plain text
    cells: list[list[str]] | None = None  # CSV, TSV
    table: Any = None  # Parquet
    header: bool = True  # CSV/TSV: the first line names the columns
    skipped: list[int] = dataclasses.field(default_factory=list)  # rows without text (skip_empty)
    notes: list[str] = dataclasses.field(default_factory=list)

    def with_text(self) -> tuple[Dataset, list[int]]:
        """The rows that have text, as a Dataset of their own, and their positions in this
        one (this Dataset itself, and every position, when no row was skipped)."""
        if not self.skipped:
            return self, list(range(len(self.texts)))
        skip = set(self.skipped)
        keep = [k for k in range(len(self.texts)) if k not in skip]
        part = dataclasses.replace(
            self,
            texts=[self.texts[k] for k in keep],
            records=None if self.records is None else [self.records[k] for k in keep],
            cells=None if self.cells is None else [self.cells[k] for k in keep],
            table=None if self.table is None else self.table.take(keep),
            skipped=[],
        )
        return part, keep

    @functools.cached_property
    def rows(self) -> list[dict[str, Any]]:
        """Each row as a dict of field to value; a CSV/TSV cell missing from a short row is left
        out. Refused when the header does not name each column once, since the dicts would lose
        a column."""
        if self.records is not None:
            return self.records
        problem = _unnamed_columns(self.fieldnames)
        if problem is None and self.cells is not None:
            width = len(self.fieldnames)
            k = next((k for k, row in enumerate(self.cells) if len(row) > width), None)
            if k is not None:
                problem = f"row {k + 1} has {len(self.cells[k])} cells, the header names {width}"
        if problem is not None:
            raise InvalidInputError(
                f"{self.path}: {problem}; such rows can only be written back as CSV or TSV "
                "(give every column its own name)"
            )
        if self.table is not None:
            return self.table.to_pylist()
        return [dict(zip(self.fieldnames, row)) for row in self.cells or []]

    def column(self, name: str, option: str) -> list[Any]:
        """The values of the field ``name`` (None where a row lacks it); ``option`` is the
        command-line option that named it, for the error message."""
        if self.records is not None:
            if name not in self.fieldnames:
                raise InvalidInputError(
                    f"{self.path}: no field {name!r} (fields: {', '.join(self.fieldnames) or 'none'}); "
                    f"choose one with {option}"
                )
            return [row.get(name) for row in self.records]
        c = _column_index(self.path, self.fieldnames, name, option)
        if self.table is not None:
            return self.table.column(c).to_pylist()
        return [row[c] if c < len(row) else None for row in self.cells or []]

    def ids(self, id_field: str | None) -> list[str] | None:
        """Values of ``id_field`` as strings (``"id"`` when present and none was named)."""
        name = id_field or ("id" if "id" in self.fieldnames else None)
        if name is None:
            return None
        return [str(value) for value in self.column(name, "--id-field")]


def _unnamed_columns(names: Sequence[str]) -> str | None:
    """What keeps ``names`` from naming each column once, or None."""
    for c, name in enumerate(names):
        if not name.strip():
            return f"column {c + 1} has no name in the header"
        if name in names[:c]:
            return f"columns {names.index(name) + 1} and {c + 1} are both named {name!r}"
    return None


def _column_index(path: str, names: list[str], name: str, option: str) -> int:
    count = names.count(name)
    if count != 1:
        what = f"no column {name!r}" if count == 0 else f"{count} columns are named {name!r}"
        raise InvalidInputError(
            f"{path}: {what} (columns: {', '.join(names) or 'none'}); "
            f"{option} must name exactly one"
        )
    return names.index(name)


def _infer_format(path: str, fmt: str | None) -> str:
    return fmt or format_of(path) or "text"


_SKIP_HINT = " (--skip-empty keeps such rows as they are, uncompared)"


def _text_of(value: Any, where: str, field: str, skip_empty: bool = False, *, what: str = "") -> str | None:
    """The text of one row, or None for a row without one when ``skip_empty``; ``what``
    names the column in messages (default: ``field 'NAME'``)."""
    what = what or f"field {field!r}"
    if value is not None and not isinstance(value, str):
        raise InvalidInputError(f"{where}: {what} must be a string, got {type(value).__name__}")
    if value is None or not value.strip():
        if skip_empty:
            return None
        problem = f"no value for {what}" if value is None else f"{what} is empty"
        raise InvalidInputError(f"{where}: {problem}{_SKIP_HINT}")
    return value


def _texts(values: Any, skipped: list[int]) -> list[str]:
    """Texts as :func:`_text_of` gave them: None becomes ``""`` and its row is recorded."""
    texts = []
    for k, text in enumerate(values):
        if text is None:
            skipped.append(k)
            text = ""
        texts.append(text)
    return texts


def _none_has_text(path: str, data: Dataset, what: str) -> Dataset:
    """``data``, unless every one of its rows was skipped: then the column was not the
    right one, and that is an error rather than nothing compared."""
    if data.texts and len(data.skipped) == len(data.texts):
        raise InvalidInputError(f"{path}: no row has text in {what}; choose the text with --field/--column")
    return data


def _tab_separated(path: str) -> bool:
    """Whether each of the first lines of ``path`` holds a tab: a ``.csv`` file of
    tab-separated lines (as many data sets are published), not commas."""
    with _open_text(path, "\n") as f:
        lines = [line for line in itertools.islice(f, 20) if line.strip()]
    return bool(lines) and all("\t" in line for line in lines)


#: how each text format splits lines: plain text at any line break, CSV as the csv module
#: needs, TSV and JSON Lines at "\n" only (a "\r" before it is dropped)
_NEWLINE = {"text": None, "csv": "", "tsv": "\n", "jsonl": "\n"}


def read_table(path: str, *, fmt: str | None = None, field: str | None = None, header: bool = True,
               skip_empty: bool = False) -> Dataset:
    """Read ``path`` into a :class:`Dataset`; ``fmt`` (one of :data:`FORMATS`) defaults to the
    one the extension names, else plain text; ``field``, the field or column that holds the
    text, defaults to ``"text"``.

    Text formats are UTF-8, with or without a byte order mark (as spreadsheet programs write),
    compressed or not (``.gz``, ``.zst`` after the extension). TSV is tab-separated lines
    without quoting; CSV is quoted as RFC 4180 says, strictly. A ``.csv`` file each of whose
    first lines holds a tab is read as TSV (``fmt="csv"`` reads it as CSV).

    header: False for CSV/TSV without a header row; ``field`` is then the 1-based number of
        the text column, and rows may have any number of cells.
    skip_empty: rows whose text is empty, missing or null are kept as rows without text
        (:attr:`Dataset.skipped`) instead of being an error.
    """
    named = fmt
    fmt = _infer_format(path, fmt)
    if not header and fmt not in ("csv", "tsv"):
        raise InvalidInputError(f"{path}: --no-header applies to CSV and TSV input, not {fmt}")
    if fmt == "parquet":
        if compression_of(path):
            raise InvalidInputError(
                f"{path}: Parquet compresses its own columns; name the file .parquet, not .parquet{Path(path).suffix}"
            )
        return _read_parquet(path, field or "text", skip_empty)
    notes = []
    try:
        if fmt == "csv" and named is None and _tab_separated(path):
            fmt = "tsv"
            notes.append(f"read {path} as tab-separated (its lines hold tabs); --format csv reads it as CSV")
        with _open_text(path, _NEWLINE[fmt]) as f:
            if fmt == "text":
                if (field or "text") != "text":
                    raise InvalidInputError(
                        f"{path}: plain text input has one field, 'text'; got --field {field!r}"
                    )
                texts = [line.rstrip("\n") for line in f if line.strip()]
                return Dataset(path, fmt, "text", texts, ["text"], records=[{"text": t} for t in texts])
            if fmt == "jsonl":
                return _read_jsonl(path, f, field or "text", skip_empty)
            data = _read_delimited(path, f, field, fmt, header, skip_empty)
            data.notes = notes
            return data
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except _damaged_errors() as exc:
        kind = compression_of(path) or "compressed"
        raise InvalidInputError(f"{path}: not a readable {kind} file ({exc or type(exc).__name__})") from None


def _lines(f: Any) -> Iterator[tuple[int, str]]:
    """Numbered lines of a file opened with ``newline="\\n"``, without their line break."""
    for lineno, line in enumerate(f, 1):
        yield lineno, line[:-1].removesuffix("\r") if line.endswith("\n") else line


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise InvalidInputError(f"key {key!r} appears twice in one object")
    return obj


def _read_jsonl(path: str, f: Any, field: str, skip_empty: bool) -> Dataset:
    rows, texts, names = [], [], {}
    for lineno, line in _lines(f):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_object_without_repeats)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        except InvalidInputError as exc:
            raise InvalidInputError(f"{path}:{lineno}: {exc}") from None
        if not isinstance(row, dict):
            raise InvalidInputError(
                f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}"
            )
        if field not in row and not skip_empty:
            raise InvalidInputError(
                f"{path}:{lineno}: no field {field!r} (fields: {', '.join(map(str, row)) or 'none'}); "
                f"choose one with --field{_SKIP_HINT}"
            )
        names.update(dict.fromkeys(row))
        texts.append(_text_of(row.get(field), f"{path}:{lineno}", field, skip_empty))
        rows.append(row)
    skipped: list[int] = []
    data = Dataset(path, "jsonl", field, _texts(texts, skipped), list(names), records=rows, skipped=skipped)
    return _none_has_text(path, data, f"field {field!r}")


def _position(path: str, field: str | None) -> int:
    """The 0-based index of the text column of a file without a header row."""
    if field is None:
        raise InvalidInputError(
            f"{path}: without a header row, choose the text column by its number, e.g. --column 2"
        )
    if not field.isdigit() or int(field) < 1:
        raise InvalidInputError(
            f"{path}: without a header row, --column is a column number (1 for the first), got {field!r}"
        )
    return int(field) - 1


def _read_delimited(path: str, f: Any, field: str | None, fmt: str, header: bool, skip_empty: bool) -> Dataset:
    """CSV (quoted, strictly: a quote left open is an error, not the rest of the file in one
    cell) or TSV (each line split at tabs; quotes are ordinary characters)."""
    if fmt == "csv":
        reader = csv.reader(f, strict=True)
        lines = ((reader.line_num, row) for row in reader if row)
    else:
        lines = ((lineno, line.split("\t")) for lineno, line in _lines(f) if line)
    if header:
        field = field or "text"
        what = f"field {field!r}"
    else:
        c = _position(path, field)
        what = f"column {c + 1}"
    try:
        if header:
            _, names = next(lines, (0, []))
            c = _column_index(path, names, field, "--column")
        cells, texts = [], []
        for lineno, row in lines:
            value = row[c] if c < len(row) else None
            where = f"{path}:{lineno}" if header or c < len(row) else f"{path}:{lineno} ({len(row)} cells)"
            texts.append(_text_of(value, where, str(field), skip_empty, what=what))
            cells.append(row)
    except csv.Error as exc:
        raise InvalidInputError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
    if not header:
        names = [str(k) for k in range(1, max(map(len, cells), default=0) + 1)]
    skipped: list[int] = []
    data = Dataset(path, fmt, str(field), _texts(texts, skipped), names, cells=cells, header=header,
                   skipped=skipped)
    return _none_has_text(path, data, what)


def _import_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise MissingDependencyError(
            'Parquet needs pyarrow; install it with: pip install "embedcache-sim[parquet]"'
        ) from exc
    return pyarrow


def _read_parquet(path: str, field: str, skip_empty: bool) -> Dataset:
    pa = _import_pyarrow()
    try:
        table = pa.parquet.read_table(path)
    except pa.ArrowException as exc:
        raise InvalidInputError(f"{path}: not a readable Parquet file ({exc})") from None
    names = list(table.column_names)
    values = table.column(_column_index(path, names, field, "--column")).to_pylist()
    texts = [_text_of(v, f"{path}: row {k + 1}", field, skip_empty) for k, v in enumerate(values)]
    skipped: list[int] = []
    data = Dataset(path, "parquet", field, _texts(texts, skipped), names, table=table, skipped=skipped)
    return _none_has_text(path, data, f"column {field!r}")


# --------------------------------------------------------------------------------------
# output paths, staged outputs
# --------------------------------------------------------------------------------------


def check_output(path: str) -> None:
    """Raise ``OSError`` now if ``path`` cannot be written later (before any work is done):
    the directory of the file it names (through a symbolic link) must take a new file, or a
    FIFO or device it names must be writable."""
    target = Path(path)
    real = Path(os.path.realpath(path))
    directory = (target.parent if str(target.parent) else Path(".")) if real == target.absolute() else real.parent
    if _special(path):  # written into, not replaced
        if not os.access(path, os.W_OK):
            raise PermissionError(f"output is not writable: {path}")
        return
    if not directory.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {directory}")
    if real.is_dir():
        raise IsADirectoryError(f"output is a directory: {path}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory is not writable: {directory}")
    store = _store_around(directory)
    if store is not None:
        raise InvalidInputError(f"output {path} is inside the vector store {store}, whose files it would "
                                "replace; write it elsewhere")


def _special(path: str) -> bool:
    """Whether ``path`` names (through any links) what is written into rather than replaced:
    a FIFO, a device, a terminal, a pipe (``/dev/stdout``)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode)


def _store_around(directory: Path) -> Path | None:
    """The vector store directory that holds ``directory`` (or is it), if any."""
    here = Path(os.path.realpath(directory))
    for d in (here, *here.parents):
        if (d / "store.sqlite").is_file() and (d / "segments").is_dir():
            return d
    return None


def _same_file_key(path: str) -> Any:
    """Equal for two names of one file: symlinks, hard links, ``./`` and ``..`` included."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.normcase(os.path.realpath(path))
    return (st.st_dev, st.st_ino)


def check_outputs(inputs: dict[str, str | None], outputs: dict[str, str | None]) -> None:
    """Before any work: each output can be written, is none of the inputs and no other
    output, and pyarrow is there for a Parquet output. Keys name the paths in messages
    (``"INPUT"``, ``"-o"``...); a None path is left out."""
    named: dict[Any, str] = {}
    for what, path in inputs.items():
        if path:
            named.setdefault(_same_file_key(path), f"{what} {path}")
    for option, path in outputs.items():
        if not path:
            continue
        check_output(path)
        key = _same_file_key(path)
        if key in named:
            raise InvalidInputError(
                f"{option} {path} is the same file as {named[key]}; an output must not replace "
                "an input or another output"
            )
        named[key] = f"{option} {path}"
        if format_of(path) == "parquet":
            if compression_of(path):
                raise InvalidInputError(f"{option} {path}: Parquet compresses its own columns; name a .parquet file")
            _import_pyarrow()
        if compression_of(path) == "zstd":
            _zstandard()


def table_format(path: str, option: str) -> str:
    """The format of a table output (pairs, report): from the extension, CSV by default;
    plain text is refused (``option`` names ``path`` in the message)."""
    fmt = format_of(path) or "csv"
    if fmt == "text":
        raise InvalidInputError(
            f"{option} {path}: plain text holds one text per line, not a table; "
            "name a .csv, .tsv, .jsonl or .parquet file"
        )
    return fmt


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _compressed(raw: Any, kind: str | None) -> Iterator[Any]:
    """A binary stream that writes to ``raw``, compressed as ``kind`` says (gzip, zstd or
    None); the compressed data is complete when the block ends (``raw`` stays open)."""
    if kind is None:
        yield raw
    elif kind == "gzip":
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as z:  # mtime 0: same rows, same bytes
            yield z
    else:
        with _zstandard().ZstdCompressor().stream_writer(raw, closefd=False) as z:
            yield z


class Outputs:
    """Temporary files next to their targets, renamed into place together by :meth:`commit`
    (made by :func:`staged_outputs`)."""

    def __init__(self) -> None:
        self._written: list[tuple[str, Path]] = []
        self._open: set[str] = set()

    @contextlib.contextmanager
    def open(self, path: str, mode: str = "w") -> Iterator[Any]:
        """A temporary file for ``path``: complete and flushed to disk when the block ends.
        A symbolic link is written through (the file it names is replaced, the link stays);
        a FIFO, a device or a terminal (``/dev/stdout``) is written into at the commit."""
        check_output(path)
        special = _special(path)
        target = Path(path) if special else Path(os.path.realpath(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part",
                                   dir=None if special else target.parent)
        self._open.add(tmp)
        with os.fdopen(fd, "wb") as raw:
            with _compressed(raw, compression_of(path)) as stream:
                f = stream if "b" in mode else io.TextIOWrapper(stream, encoding="utf-8", newline="")
                yield f
                f.flush()
                if f is not stream:
                    f.detach()
            raw.flush()
            os.fsync(raw.fileno())
        self._written.append((tmp, target))

    def commit(self) -> None:
        """Give each file the mode (and owner) of the file it replaces, or the mode a new file
        gets (mkstemp makes them 0600), then rename each into place; copy those for a FIFO or
        a device into it."""
        new_mode = 0o666 & ~_umask()
        for tmp, target in self._written:
            try:
                st = os.stat(target)
            except FileNotFoundError:
                os.chmod(tmp, new_mode)
                continue
            if stat.S_ISREG(st.st_mode):
                os.chmod(tmp, stat.S_IMODE(st.st_mode))
                with contextlib.suppress(OSError):  # only where this process may give it
                    os.chown(tmp, st.st_uid, st.st_gid)
        while self._written:
            tmp, target = self._written.pop(0)
            if _special(str(target)):
                with open(tmp, "rb") as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.unlink(tmp)
            else:
                os.replace(tmp, target)
            self._open.discard(tmp)

    def discard(self) -> None:
        for tmp in self._open:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._open.clear()
        self._written.clear()


@contextlib.contextmanager
def staged_outputs() -> Iterator[Outputs]:
    """Outputs written in the block are renamed into place only if the whole block succeeds."""
    outputs = Outputs()
    try:
        yield outputs
        outputs.commit()
    finally:
        outputs.discard()


@contextlib.contextmanager
def atomic_output(path: str, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file next to ``path``; rename it to ``path`` only on success."""
    with staged_outputs() as outputs, outputs.open(path, mode) as f:
        yield f


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------


_SURROGATE = re.compile("[\ud800-\udfff]")
_LINE_BREAK = re.compile("\r\n|\r|\n")


def _as_text(value: Any) -> str:
    """A Parquet value JSON has no type for, as text: bytes in base64, dates and times in
    ISO 8601, anything else (decimals, durations) as ``str`` gives it."""
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return str(value)


def _json(value: Any) -> str:
    """JSON text of ``value``, UTF-8 as written; a lone surrogate (JSON input may hold one)
    is kept as its ``\\uXXXX`` escape."""
    text = json.dumps(value, ensure_ascii=False, default=_as_text)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _cell(value: Any) -> str:
    """A value as a CSV/TSV cell: a string as it is, null as an empty cell, numbers, booleans,
    lists and objects as JSON, other values as :func:`_as_text` writes them."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float, list, tuple, dict)):
        return _json(value)
    return _as_text(value)


Labelled = Iterator[tuple[str, Any]]  # (where, row): where names the row in error messages


def _write_cells(f: Any, path: str, fmt: str, header: list[str], rows: Labelled, *,
                 header_row: bool = True) -> None:
    """CSV (quoted where needed) or TSV (tab-separated lines, nothing quoted: a cell holding a
    tab or line break is refused, as is a lone surrogate, which UTF-8 cannot encode);
    ``header`` first unless not ``header_row``."""

    def checked(where: str, cells: list[str]) -> list[str]:
        for c, cell in enumerate(cells):
            bad = _SURROGATE.search(cell) or (fmt == "tsv" and re.search("[\t\r\n]", cell))
            if bad:
                column = repr(header[c]) if c < len(header) else f"{c + 1}"
                surrogate = bool(_SURROGATE.match(bad.group()))
                what = "a lone surrogate" if surrogate else "a tab or line break"
                instead = ".jsonl" if surrogate else ".csv or .jsonl"
                raise InvalidInputError(
                    f"{path}: {where}, column {column}: {what} ({bad.group()!r}) cannot be written "
                    f"to {fmt.upper()}; write {instead} instead"
                )
        return cells

    if fmt == "csv":
        writer = csv.writer(f)
        if header_row:
            writer.writerow(checked("header", header))
        for where, cells in rows:
            writer.writerow(checked(where, cells))
    else:
        if header_row:
            f.write("\t".join(checked("header", header)) + "\n")
        for where, cells in rows:
            f.write("\t".join(checked(where, cells)) + "\n")


def _arrow_column(pa: Any, path: str, name: str, values: list[Any], labels: list[str], type_: Any) -> Any:
    try:
        return pa.array(values, type_)
    except (OverflowError, UnicodeEncodeError) as exc:
        big = isinstance(exc, OverflowError)
        k = next((k for k, v in enumerate(values) if _holds(v, big)), None)
        where = f"{labels[k]}, " if k is not None else ""
        what = "an integer outside 64 bits" if big else "a lone surrogate, which UTF-8 cannot encode"
        raise InvalidInputError(
            f"{path}: {where}field {name!r} holds {what}; Parquet cannot store it: write .jsonl instead"
        ) from None


def _holds(value: Any, big: bool) -> bool:
    """Whether ``value`` is or contains an integer outside 64 bits (``big``) or a lone surrogate."""
    if isinstance(value, dict):
        return any(_holds(v, big) or (not big and _holds(k, big)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_holds(v, big) for v in value)
    if big:
        return isinstance(value, int) and not -(2**63) <= value < 2**64
    return isinstance(value, str) and bool(_SURROGATE.search(value))


def write_records(path: str, fmt: str, fieldnames: list[str], rows: list[tuple[str, dict[str, Any]]],
                  opener: Any = atomic_output, *, strings: bool = False) -> None:
    """Write dict rows as ``fmt`` (jsonl, csv, tsv or parquet), the columns ``fieldnames``;
    each row comes with the words that name it in error messages (``("row 3", {...})``).
    ``strings``: every Parquet column is a string column (rows read from CSV/TSV)."""
    if fmt == "parquet":
        pa = _import_pyarrow()
        labels, records = [w for w, _ in rows], [r for _, r in rows]
        type_ = pa.string() if strings or not records else None
        try:
            table = pa.table({name: _arrow_column(pa, path, name, [r.get(name) for r in records],
                                                  labels, type_) for name in fieldnames})
            with opener(path, "wb") as f:
                pa.parquet.write_table(table, f)
        except pa.ArrowException as exc:
            reason = " ".join(str(exc).split())
            raise InvalidInputError(
                f"{path}: these rows cannot be written as Parquet ({reason}); "
                "write .jsonl or .csv instead, or give each field one type"
            ) from None
        return
    with opener(path) as f:
        if fmt == "jsonl":
            for _, row in rows:
                f.write(_json(row) + "\n")
        else:
            cells = ((where, [_cell(row.get(name)) for name in fieldnames]) for where, row in rows)
            _write_cells(f, path, fmt, fieldnames, cells)


def write_rows(path: str, data: Dataset, indices: Sequence[int], *, fmt: str | None = None,
               opener: Any = atomic_output) -> None:
    """Write the rows at ``indices`` in the format of ``path``'s extension (else the input's):
    the same format as the input gives the same rows back; across formats values are
    converted as README.md says. ``opener(path, mode)`` opens the file (e.g. ``Outputs.open``)."""
    fmt = format_of(path) or fmt or data.fmt
    idx = [int(k) for k in indices]
    where = [f"row {k + 1}" for k in idx]
    if fmt == "text":  # one line per row: a line break inside a text becomes a space
        joined = 0
        with opener(path) as f:
            for w, k in zip(where, idx):
                text, breaks = _LINE_BREAK.subn(" ", data.texts[k])
                joined += breaks > 0
                if _SURROGATE.search(text):
                    raise InvalidInputError(
                        f"{path}: {w} holds a lone surrogate, which UTF-8 cannot encode; write .jsonl instead"
                    )
                f.write(text + "\n")
        if joined:
            warnings.warn(f"{path}: {joined} of the texts written held line breaks, written as spaces (plain "
                          "text holds one row a line; .jsonl keeps them)", UserWarning, stacklevel=2)
    elif fmt in ("csv", "tsv") and data.cells is not None:
        with opener(path) as f:
            _write_cells(f, path, fmt, data.fieldnames, zip(where, (data.cells[k] for k in idx)),
                         header_row=data.header)
    elif fmt == "parquet" and data.table is not None:
        pa = _import_pyarrow()
        with opener(path, "wb") as f:
            pa.parquet.write_table(data.table.take(idx), f)
    else:
        rows = data.rows
        write_records(path, fmt, data.fieldnames, list(zip(where, (rows[k] for k in idx))), opener,
                       strings=data.cells is not None)


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """The row as JSON holds it: every field, values JSON has no type for (dates, bytes) as text."""
    return json.loads(json.dumps(row, ensure_ascii=False, default=str))
