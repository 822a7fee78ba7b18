"""What the ``embedcache`` commands that search share: a vector store directory as their
input (its rows written back as ``{"id": id, **metadata}``), and the ``--method`` and
``--recall`` options with the line that says which method ran and the recall it measured.

Argument handling and printing only; the work is the library's.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import click

from embedcache.errors import ConfigurationError, InvalidInputError, StoreError
from embedcache.tables import Dataset


#: how the pairs or neighbours are found (the workflows' ``method=``)
METHODS = ("exact", "partitioned", "auto")


def method_options(f):
    """--method and --recall, handed to the command as ``search={"method": ..., "recall": ...}``
    (None where not given: the library's default then applies)."""

    @click.option("--method", type=click.Choice(METHODS), default=None,
                  help="exact: compare every row with every row; partitioned: only rows in nearby "
                       "cells of a partition index, at the recall of --recall; auto (default): exact "
                       "below the size where exact search is fast. The summary says which ran.")
    @click.option("--recall", type=click.FloatRange(0, 1, min_open=True), default=None, callback=_finite,
                  help="Share of the true pairs (or neighbours) a partitioned search must find; it is "
                       "measured on sampled rows against exact search and reported with a 95% "
                       "interval. Default: the library's.")
    @functools.wraps(f)
    def wrapper(*args, method, recall, **kwargs):
        return f(*args, search={"method": method, "recall": recall}, **kwargs)

    return wrapper


def _finite(ctx: Any, param: Any, value: float | None) -> float | None:
    """A NaN passes FloatRange's bounds (every comparison with it is false): refused here."""
    if value is not None and value != value:
        raise click.BadParameter(f"{value} is not a number in the range 0<x<=1.", ctx, param)
    return value


def search_kwargs(search: dict[str, Any]) -> dict[str, Any]:
    """``method=``/``recall=`` for a workflow, those given (the library's defaults apply to
    the others)."""
    given = {name: value for name, value in search.items() if value is not None}
    if given.get("method") == "exact" and "recall" in given:
        raise ConfigurationError("--recall applies to a partitioned search; --method exact finds every pair")
    return given


def search_note(result: Any, search: dict[str, Any], *, method: str | None = None, recall: Any = None) -> str:
    """``"; method: ..."`` for a summary line: the method that ran (``result.method``, else
    ``method``), "(auto)" when auto chose it, and the recall measured with its 95% interval
    (``result.recall``, else ``recall``); "" when the library does not say.

    >>> from types import SimpleNamespace as NS
    >>> search_note(NS(method="exact", recall=None), {"method": None})
    '; method: exact (auto)'
    >>> rec = NS(estimate=0.995, low=0.99, high=0.998, sample=400)
    >>> search_note(NS(method="partitioned", recall=rec), {"method": "partitioned"})
    '; method: partitioned, recall 0.9950 (95% CI 0.9900-0.9980, 400 sampled rows)'
    >>> every = NS(estimate=1.0, low=1.0, high=1.0, sample=0)
    >>> search_note(NS(method="partitioned", recall=every), {"method": "partitioned"})
    '; method: partitioned, recall 1 (every cell searched: the exact answer)'
    """
    method = getattr(result, "method", method)
    recall = getattr(result, "recall", recall)
    if method is None:
        return ""
    note = f"; method: {method}" + (" (auto)" if search.get("method") in (None, "auto") else "")
    if recall is not None:
        est = float(recall.estimate)
        if est != est:  # NaN: the sampled rows had nothing to find
            note += ", recall not measured (no true match among the sampled rows)"
        elif not recall.sample and est == 1.0:  # nothing sampled: every cell was searched
            note += ", recall 1 (every cell searched: the exact answer)"
        else:
            note += (f", recall {est:.4f} (95% CI {float(recall.low):.4f}-{float(recall.high):.4f}, "
                     f"{recall.sample} sampled rows)")
    return note


def input_store(path: str, option: str):
    """The vector store in the directory ``path`` (named ``option`` in messages); a directory
    that holds none is refused, never made into a store. The caller closes it."""
    from embedcache.store import VectorStore
    from embedcache.store._format import DB_NAME

    if not (Path(path) / DB_NAME).is_file():
        raise InvalidInputError(
            f"{option} {path} is a directory without a vector store ({DB_NAME}); give a file of rows, "
            "or a store made by 'embedcache store add'"
        )
    return VectorStore(path)


#: ids whose metadata one query reads
_METADATA_BATCH = 10_000


def store_dataset(vs: Any, path: str, *, text_output: bool = False) -> Dataset:
    """STORE's live rows as rows of a file, in the order of its ids: each row ``{"id": id,
    **metadata}`` (a metadata field ``id`` stays as it is), its text the one under the store's
    text_key ("" where a row has none; refused when the output is plain text). Rows are
    written as JSON Lines unless the output's extension names another format."""
    key, ids = vs.text_key, vs.ids()
    records, texts, names = [], [], {"id": None}
    for a in range(0, len(ids), _METADATA_BATCH):
        part = ids[a:a + _METADATA_BATCH]
        for i, meta in zip(part, vs.metadata(part)):
            row = {"id": i, **meta}
            text = row.get(key)
            if text_output and not isinstance(text, str):
                raise InvalidInputError(
                    f"{path}: row {i!r} has no text (metadata field {key!r}), so the rows cannot be "
                    "written as plain text; name a .jsonl, .csv or .parquet output"
                )
            names.update(dict.fromkeys(row))
            records.append(row)
            texts.append(text if isinstance(text, str) else "")
    return Dataset(path, "jsonl", key, texts, list(names), records=records)


class Inputs:
    """INPUT and --against: files of rows (to embed) or vector stores (their vectors as
    stored, nothing embedded). After :meth:`read`, ``full`` is INPUT's rows, ``data`` the rows
    compared (those with text) and ``rows`` their positions in ``full``; ``ref`` and
    ``ref_rows`` the same for --against; ``items``/``against`` what a workflow takes (texts,
    or the store). A store is a full table: no row skipped, positions ``range(n)``.
    ``reader(path)`` reads a file of rows (with the command's input options)."""

    def __init__(self, reader: Any, *, fmt: str | None, field: str | None, no_header: bool = False) -> None:
        self.reader = reader
        self.fmt, self.field, self.no_header = fmt, field, no_header
        self.stores: list[tuple[Any, str, int]] = []  # (store, path, generation when read)
        self.files = 0
        self.full: Dataset | None = None
        self.data: Dataset | None = None
        self.rows: list[int] = []
        self.ref: Dataset | None = None
        self.ref_rows: list[int] | None = None
        self.items: Any = None
        self.against: Any = None

    def read(self, input_path: str, against_path: str | None, *, text_output: bool = False) -> None:
        self.full, vs = self._read("INPUT", input_path, text_output)
        self.data, self.rows = self.full.with_text()  # rows[k]: row k's position in INPUT
        self.items = self.data.texts if vs is None else vs
        if against_path:
            ref, vs = self._read("--against", against_path, False)
            self.ref, self.ref_rows = ref.with_text()
            self.against = self.ref.texts if vs is None else vs
        if not self.files:
            given = [name for name, value in (("--field", self.field), ("--format", self.fmt),
                                              ("--no-header", self.no_header or None)) if value is not None]
            if given:
                raise ConfigurationError(
                    f"{given[0]} does not apply to a vector store: its text is the metadata field "
                    f"{self.stores[0][0].text_key!r}"
                )

    def texts(self) -> list[str]:
        """The texts that will be embedded: those of the inputs that are files."""
        return [t for items in (self.items, self.against) if isinstance(items, list) for t in items]

    def _read(self, option: str, path: str, text_output: bool) -> tuple[Dataset, Any]:
        """The rows at ``path``, and its store (None for a file)."""
        if not Path(path).is_dir():
            self.files += 1
            return self.reader(path), None
        vs = input_store(path, option)
        self.stores.append((vs, path, vs.info()["generation"]))  # before its rows are read
        return store_dataset(vs, path, text_output=text_output), vs

    def check_unchanged(self) -> None:
        """Refuse a result for which a store was read in two states (a write between reads)."""
        for vs, path, generation in self.stores:
            if vs.info()["generation"] != generation:
                raise StoreError(f"{path} changed while it was read (another process wrote to it); "
                                 "nothing was written: run the command again")

    def close(self) -> None:
        for vs, _, _ in self.stores:
            vs.close()
