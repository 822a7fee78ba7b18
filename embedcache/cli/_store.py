"""``embedcache store``: create, fill, inspect, index and search an on-disk vector store, and
the embedder that goes with a store's vectors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from embedcache.cli._options import (
    _EMBEDDER_OPTIONS,
    _check_space,
    _clip,
    _client,
    _long_note,
    _opened,
    _printable,
    _progress,
    _read,
    _say,
    _with_cache,
    cache_size_option,
    common_options,
    input_options,
    make_embedder,
    scheduler_option,
    store_provider_options,
)
from embedcache.cli._search import input_store
from embedcache.errors import ConfigurationError, DuplicateIdError, InvalidInputError, NamespaceMismatchError
from embedcache.tables import Dataset, jsonable


@click.group()
def store() -> None:
    """Create, fill, inspect and search an on-disk vector store."""


def _open_store(path: str, *, must_exist: bool = True):
    """The store at ``path``; unless it may be made here (``store add``), a path without one
    (missing, or a directory holding none) is refused, never made into a store."""
    from embedcache.store import VectorStore
    from embedcache.store._format import DB_NAME

    if must_exist and not (Path(path) / DB_NAME).is_file():
        raise FileNotFoundError(f"no vector store at {path}" + (f" (a directory without {DB_NAME})"
                                                              if Path(path).is_dir() else ""))
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
    from embedcache.store._format import DB_NAME

    directory = Path(store_path).exists()
    made = not (Path(store_path) / DB_NAME).exists()
    try:
        _add_rows(store_path, input_path, data, ids, hashed, metadata, upsert, embedder_opts, cache_dir, quiet)
    except BaseException:
        if made:  # a store this command made and left empty is not left behind
            _remove_if_empty(store_path, directory)
        raise


def _remove_if_empty(store_path: str, keep_directory: bool) -> None:
    """Remove the store at ``store_path`` if it holds no row: its files, and its directory
    unless ``keep_directory`` (it was there before)."""
    import shutil

    from embedcache.store import VectorStore
    from embedcache.store._format import DB_NAME, LOCK_NAME, SEGMENT_DIR
    from embedcache.store._index import INDEX_DIR

    try:
        with VectorStore(store_path) as vs:
            info = vs.info()
    except Exception:  # noqa: BLE001 - unreadable: left for the user to see
        return
    if info["rows"] or info["deleted"]:
        return
    parts = (SEGMENT_DIR, INDEX_DIR, DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", LOCK_NAME)  # a new store's
    if not keep_directory and {p.name for p in Path(store_path).iterdir()} <= set(parts):
        shutil.rmtree(store_path, ignore_errors=True)
        return
    for name in parts:
        part = Path(store_path) / name
        if part.is_dir():
            shutil.rmtree(part, ignore_errors=True)
        elif part.exists():
            part.unlink()


def _add_rows(store_path, input_path, data, ids, hashed, metadata, upsert, embedder_opts, cache_dir, quiet) -> None:
    """The body of ``store add``: the rows of ``data`` embedded and added to the store."""
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


@store.command("compact")
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
def store_compact(store_path):
    """Rewrite STORE without deleted rows."""
    with _open_store(store_path) as vs:
        vs.compact()
        click.echo(f"{store_path}: compacted, {len(vs)} rows")


@store.command("index")
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False, exists=True))
@click.option("--cells", type=click.IntRange(min=1), default=None,
              help="Cells of the partition (default: chosen from the number of rows).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the k-means sample and start.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or notes on stderr.")
@click.option("--drop", is_flag=True, help="Remove STORE's index instead (searches then scan every row).")
@scheduler_option
def store_index(store_path, cells, seed, quiet, drop, scheduler):
    """Build STORE's partition index, which store search and the workflows on STORE use; it
    replaces the old one only when complete (a crash keeps the old one, or none).

    With --scheduler, the assignment of every row to its cell and the recall measurement run
    as tasks on the Dask cluster, whose workers read STORE's files; the same index."""
    vs = input_store(store_path, "STORE")
    _opened.append(vs)
    if drop:
        if cells is not None:
            raise ConfigurationError("--drop removes the index; --cells is for building one")
        click.echo(f"{store_path}: " + ("index removed" if vs.drop_index() else "had no index"))
        return
    if not callable(getattr(vs, "create_index", None)):
        raise ConfigurationError("store index needs an embedcache whose VectorStore has create_index(); "
                                 "this one searches exactly only")
    client = _client(scheduler, quiet)
    if client is None:
        vs.create_index(cells=cells, seed=seed)
    else:
        vs.create_index(cells=cells, seed=seed, client=client, progress=_progress(quiet))
    info = vs.index_info() if callable(getattr(vs, "index_info", None)) else None
    about = ", ".join(f"{key} {value}" for key, value in (info or {}).items()
                      if isinstance(value, (int, float, str)))
    click.echo(f"{store_path}: indexed {len(vs)} rows" + (f" ({about})" if about else ""))
