"""The commands on files of rows (and stores as their input): ``models``, ``embed``,
``dedup``, ``pairs`` and ``graph``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click
import numpy as np

from embedcache.cli._options import (
    _EMBEDDER_OPTIONS,
    _cached,
    _check_space,
    _client,
    _clip,
    _long_note,
    _opened,
    _progress,
    _read,
    _say,
    _threshold,
    _without_text,
    cache_size_option,
    common_options,
    dedup_options,
    input_options,
    input_or_store_options,
    make_embedder,
    provider_options,
    scheduler_option,
    skip_empty_option,
)
from embedcache.cli._search import Inputs, method_options, search_kwargs, search_note
from embedcache.cli._store import _store_embedder
from embedcache.errors import ConfigurationError, InvalidInputError
from embedcache.tables import (
    Dataset,
    atomic_output,
    check_outputs,
    format_of,
    staged_outputs,
    table_format,
    write_records,
    write_rows,
)


@click.command()
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


@click.command()
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


def _job_options(f):
    """The options dedup and pairs share after their own: --skip-empty, --method and --recall,
    the embedder's, the cache's, --scheduler."""
    for option in (scheduler_option, common_options, cache_size_option, provider_options, method_options,
                   skip_empty_option):
        f = option(f)
    return f


def _store_client(scheduler: str | None, quiet: bool, input_path: str):
    """The client of --scheduler for a job over the store INPUT (None without --scheduler);
    refuses, before anything is read, what a cluster does not run."""
    if not scheduler:
        return None
    if not Path(input_path).is_dir():
        raise ConfigurationError(f"--scheduler runs jobs over a vector store, whose files the workers read; "
                                 f"INPUT {input_path} is a file (add its rows to a store first, or leave out --scheduler)")
    return _client(scheduler, quiet)


@click.command()
@input_or_store_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Kept rows, unchanged (format from the extension, else the input's; plain text "
                   "holds one row a line, so a text's line breaks become spaces there); from a "
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
@_job_options
def dedup(input_path, field, fmt, no_header, output, report, html_report, threshold, keep, mode, against_path,
          id_field, show, skip_empty, search, embedder_opts, cache_dir, quiet, scheduler):
    """Remove near-duplicate rows of INPUT (a file of rows, or a store's vectors as stored);
    write the rows kept, and print the groups found."""
    from embedcache.workflows import deduplicate

    check_outputs({"INPUT": input_path, "--against": against_path},
                  {"-o": output, "--duplicates": report, "--report": html_report})
    report_fmt = table_format(report, "--duplicates") if report else None
    client = _store_client(scheduler, quiet, input_path)
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


@click.command()
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
@_job_options
def pairs(input_path, field, fmt, no_header, threshold, output, id_field, html_report, skip_empty, search,
          embedder_opts, cache_dir, quiet, scheduler):
    """List every pair of rows of INPUT (a file of rows, or a store's vectors as stored) at or
    above the threshold."""
    from embedcache.workflows import PairTable, near_duplicates

    check_outputs({"INPUT": input_path}, {"-o": output, "--report": html_report})
    out_fmt = table_format(output, "-o")
    client = _store_client(scheduler, quiet, input_path)
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


@click.command()
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
@scheduler_option
def graph(input_path, field, fmt, no_header, k, output, weights, symmetric, ids_path, id_field, search,
          embedder_opts, cache_dir, quiet, scheduler):
    """Write the k-nearest-neighbour graph of INPUT's rows (embedded) or of STORE's vectors
    (as stored), for clustering: row i holds its k most similar other rows."""
    from scipy.sparse import save_npz

    from embedcache.workflows import knn_graph

    if Path(output).suffix.lower() != ".npz":
        raise InvalidInputError(f"-o {output}: graph writes a scipy sparse matrix in .npz format; name a .npz file")
    check_outputs({"INPUT": input_path}, {"-o": output, "--ids": ids_path})
    ids_fmt = table_format(ids_path, "--ids") if ids_path else None
    client = _store_client(scheduler, quiet, input_path)
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
                          return_recall=True, client=client, **search_kwargs(search))
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
