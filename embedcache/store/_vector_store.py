"""VectorStore: the public face of a store directory; the work is done in the modules beside it."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedcache._validation import (
    as_matrix,
    check_choice,
    check_finite,
    check_int,
    check_k,
    check_metric,
    check_number,
    check_threshold,
)
from embedcache.errors import (
    ConfigurationError,
    DimensionMismatchError,
    InvalidInputError,
    InvalidInputTypeError,
    NamespaceMismatchError,
    StoreError,
)
from embedcache.index import check_recall
from embedcache.providers.base import validate_texts
from embedcache.store import _format, _index, _query, _write
from embedcache.store._transactions import Transactions


class VectorStore:
    """A directory of vectors with string ids and JSON metadata; exact search through the kernels.

    Opens the store at ``path`` or creates it. For a new store ``dtype`` defaults to
    ``"float32"`` (``"float16"`` halves disk and memory traffic) and ``metric`` to ``"cosine"``
    (or ``"dot"``); ``dimensions``, ``namespace`` and ``model`` are recorded when given, else
    taken from the first add. When opening an existing store, every argument given must agree
    with what the store recorded.

    One writer at a time across processes: each write holds ``write.lock`` in the directory.
    ``lock_timeout=None`` waits for it, ``0`` fails at once, else seconds to wait before
    :class:`~embedcache.StoreLockedError`. Any number of readers; each operation sees the
    latest committed state. A write the machine refuses (a full disk, a file-size limit, a
    read-only directory) raises :class:`~embedcache.StoreWriteError` naming the file, and the
    store stays at its last commit.

    Vectors are stored as given (not normalized); ``get`` and ``vectors`` return them in the
    store's dtype. Vectors must be finite (a float16 store holds values up to 65504).

    Each add writes new segments; a small last segment is merged into the new one (like a
    binary counter), so many small adds leave O(log n) segments at the cost of rewriting
    O(log n) times. Segments hold at most 256 MiB; :meth:`compact` packs them full.

    Pairs (:meth:`similar_pairs`) come in one order, as everywhere in embedcache: by score
    descending, ties by the left row then the right row, rows in the order of :meth:`ids`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        dimensions: int | None = None,
        dtype: str | None = None,
        metric: str | None = None,
        namespace: str | None = None,
        model: str | None = None,
        lock_timeout: float | None = None,
    ) -> None:
        if dimensions is not None:
            dimensions = check_int("dimensions", dimensions, 1)
        if dtype is not None:
            try:
                dtype = np.dtype(dtype).name
            except TypeError:
                pass  # refused just below, as given
            dtype = check_choice("dtype", dtype, tuple(_format.DTYPES))
        if metric is not None:
            metric = check_metric(metric)
        if lock_timeout is not None and check_number("lock_timeout", lock_timeout) < 0:
            raise InvalidInputError(f"lock_timeout must be None or a number >= 0, got {lock_timeout!r}")
        for name, value in (("namespace", namespace), ("model", model)):
            if value is not None and not isinstance(value, str):
                raise InvalidInputTypeError(f"{name} must be a str or None, got {type(value).__name__}")
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is not a directory; a vector store is a directory")
        self._txn = Transactions(self.path, -1.0 if lock_timeout is None else float(lock_timeout))
        self._index_maps: dict[int, _index.Loaded] = {}
        made = _write.make_dirs(self._txn.seg_dir)
        _format.refuse_lost_database(self._txn.db_path, self._txn.seg_dir)
        exists = self._txn.open()
        try:
            if not exists:
                self._txn.create(_format.initial_settings(dimensions, dtype or "float32", metric or "cosine", namespace, model))
            if made or not exists:
                _write.fsync_dir(self.path)  # the new directory entries (segments/, store.sqlite)
            with self._txn.reading() as view:  # checks the format and every segment's length
                pass
            self._adopt_settings(view, dimensions=dimensions, dtype=dtype, metric=metric, namespace=namespace, model=model)
        except BaseException:
            self._txn.close()
            raise

    def _adopt_settings(self, view: _format.View, **given: Any) -> None:
        """Check constructor arguments against the store; record dimensions/namespace/model not yet set."""
        s = view.settings
        if given["dtype"] is not None and given["dtype"] != s["dtype"]:
            raise ConfigurationError(f"{self.path} holds {s['dtype']} vectors, got dtype={given['dtype']!r}")
        if given["metric"] is not None and given["metric"] != s["metric"]:
            raise ConfigurationError(f"{self.path} uses metric {s['metric']!r}, got metric={given['metric']!r}")
        args = (given["dimensions"], given["namespace"], given["model"])
        if _write.settings_updates(view, self.path, *args):
            with self._txn.writing() as w:
                _write.set_settings(self._txn.current(), _write.settings_updates(w.view, self.path, *args))

    # ------------------------------------------------------------------ properties

    @property
    def dimensions(self) -> int | None:
        """Dimension of the vectors, or None before the first add."""
        with self._txn.reading() as v:
            return v.dim

    @property
    def dtype(self) -> str:
        """``"float32"`` or ``"float16"``: how vectors are stored."""
        with self._txn.reading() as v:
            return str(v.settings["dtype"])

    @property
    def metric(self) -> str:
        """``"cosine"`` or ``"dot"``: the score used by :meth:`search` and :meth:`similar_pairs`."""
        with self._txn.reading() as v:
            return v.metric

    @property
    def namespace(self) -> str | None:
        """``cache_namespace`` of the embedder that made the vectors, when known."""
        with self._txn.reading() as v:
            return v.settings["namespace"]

    @property
    def model(self) -> str | None:
        """Model that made the vectors, when known."""
        with self._txn.reading() as v:
            return v.settings["model"]

    @property
    def text_key(self) -> str:
        """Metadata key under which :meth:`add_texts` keeps each row's text (``"text"`` unless
        chosen otherwise)."""
        with self._txn.reading() as v:
            return v.text_key

    def __len__(self) -> int:
        with self._txn.reading() as v:
            return v.live

    def __contains__(self, id: object) -> bool:
        if not isinstance(id, str):
            return False
        with self._txn.reading():
            return bool(_query.rows_of(self._txn.current(), [id]))

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def __repr__(self) -> str:
        if self._txn.conn is None:
            return f"VectorStore({str(self.path)!r}, closed)"
        with self._txn.reading() as v:
            return (
                f"VectorStore({str(self.path)!r}, rows={v.live}, dimensions={v.dim}, "
                f"dtype={v.settings['dtype']!r}, metric={v.metric!r})"
            )

    def ids(self) -> list[str]:
        """Live ids in insertion order (an upserted id moves to the end)."""
        with self._txn.reading():
            conn = self._txn.current()
            return [i for (i,) in conn.execute("SELECT id FROM rows WHERE deleted = 0 ORDER BY row")]

    # ------------------------------------------------------------------ writing

    def add(
        self,
        ids: Sequence[str],
        vectors: Any,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        *,
        upsert: bool = False,
    ) -> None:
        """Add ``vectors`` (array of shape (n, d)) under ``ids`` (n distinct strings), atomically.

        ``metadata``: one JSON-serializable dict (or None) per row. An id already in the store
        raises :class:`~embedcache.DuplicateIdError` unless ``upsert=True``, which replaces it
        (the new row goes to the end of the order). Large arrays (memmaps too) are converted and
        written in pieces of bounded size; either all rows are committed or none.
        """
        ids = _write.check_ids(ids)
        _write.check_unique(ids)
        x = as_matrix(vectors, "vectors")
        if x.shape[0] != len(ids):
            raise InvalidInputError(f"got {len(ids)} ids for {x.shape[0]} vectors; expected one id per row")
        md = _write.metadata_json(metadata, len(ids))
        if not ids:
            return
        d = x.shape[1]
        with self._txn.writing() as w:
            conn = self._txn.current()
            _write.set_settings(conn, _write.settings_updates(w.view, self.path, d, None, None))
            _write.ingest(conn, w, self._txn.seg_dir, ids, md, d, _write.slices(x, w.view.dtype), upsert)

    def add_texts(
        self,
        texts: Sequence[str],
        embedder: Any,
        ids: Sequence[str] | None = None,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        *,
        upsert: bool = False,
        text_key: str | None = None,
    ) -> list[str]:
        """Embed ``texts`` with ``embedder`` (any Embedder, usually a CachedEmbedder) and add them.

        Each text is kept in its row's metadata under :attr:`text_key` (``"text"`` unless the
        first ``add_texts`` on an empty store chose another with ``text_key=``); a metadata dict
        that holds another value under that key is refused, never overwritten. ``ids`` default
        to :func:`text_ids` (a hash of each text), so adding a text again is a
        :class:`~embedcache.DuplicateIdError` (raised before anything is embedded), or a
        refresh with ``upsert=True``. The store records the embedder's ``cache_namespace`` and
        ``model`` and refuses an embedder of another namespace. Texts are embedded in chunks
        while the write lock is held, and all rows commit together. Returns the ids.
        """
        texts = validate_texts(texts)
        ids = _write.check_ids(_write.text_ids(texts) if ids is None else ids)
        if len(ids) != len(texts):
            raise InvalidInputError(f"got {len(ids)} ids for {len(texts)} texts; expected one id per text")
        _write.check_unique(ids)
        if text_key is not None and (not isinstance(text_key, str) or not text_key):
            raise InvalidInputError(f"text_key must be a non-empty str or None, got {text_key!r}")
        if metadata is None:
            metadata = [None] * len(texts)
        _write.metadata_json(metadata, len(texts))  # validates the caller's part
        namespace = getattr(embedder, "cache_namespace", None)
        model = getattr(embedder, "model", None)
        model = model if isinstance(model, str) else None
        if not isinstance(namespace, str) or not callable(getattr(embedder, "embed", None)):
            raise InvalidInputTypeError(
                f"embedder must provide embed() and a str cache_namespace, got {type(embedder).__name__}"
            )
        with self._txn.reading() as v:
            _write.settings_updates(v, self.path, None, namespace, None)  # fail before waiting for the lock
        with self._txn.writing() as w:  # and, under it, before embedding anything
            conn = self._txn.current()
            updates = _write.settings_updates(w.view, self.path, None, namespace, model)
            key = _write.text_key_for(w.view, self.path, text_key)
            md = _write.metadata_json(_write.with_texts(metadata, texts, key), len(texts))
            if not upsert and _query.rows_of(conn, ids):
                raise _write.duplicate_error(conn, ids)
            if key != w.view.text_key:
                conn.execute("INSERT OR REPLACE INTO settings(key, value) VALUES ('text_key', ?)", (key,))
            d, chunks = _write.embedded(texts, embedder, self.path, w.view)
            updates.update(_write.settings_updates(w.view, self.path, d, None, None))
            _write.set_settings(conn, updates)
            _write.record_embedder(conn, embedder)
            _write.ingest(conn, w, self._txn.seg_dir, ids, md, d, _write.converted(chunks, w.view.dtype), upsert)
        return ids

    def delete(self, ids: Sequence[str]) -> None:
        """Remove ``ids`` (all must be in the store, else nothing is removed)."""
        ids = list(dict.fromkeys(_write.check_ids(ids)))
        if not ids:
            return
        with self._txn.writing():
            _write.delete(self._txn.current(), ids)

    def compact(self) -> None:
        """Rewrite the live rows into full segments and drop deleted rows, in one commit.

        Old segment files are removed only after the commit, so a crash leaves either the old or
        the new state. Row order (and so tie-breaking in :meth:`search`) is kept. Rows after a
        deleted one move up, so an index is dropped with them; without deleted rows (only
        segments joined) the rows keep their numbers and the index stays.
        """
        with self._txn.writing() as w:
            conn = self._txn.current()
            _index.remove_orphans(self.path / _index.INDEX_DIR, _index.description(w.view))
            renumbered = len(w.view.deleted) > 0
            _write.compact(conn, w, self._txn.seg_dir)
            dropped = bool(w.obsolete) and renumbered and _index.drop(conn, w, self.path)
        self._txn.checkpoint()
        if dropped:
            warnings.warn(f"compact renumbered the rows of {self.path} and dropped its index; "
                          "run create_index() again", UserWarning, stacklevel=2)

    def create_index(self, *, cells: int | None = None, seed: int = 0, client: Any = None,
                     progress: bool | None = None) -> dict[str, Any]:
        """Build the partition index over the live rows and commit it; returns :meth:`index_info`.

        Cells come from spherical k-means on a sample of rows (``cells``: how many, default
        about the square root of the row count; big cells are split again); every row is then
        assigned to its nearest centroid, segment by segment, so the store is never loaded
        whole. The index keeps a copy of the vectors in cell order (as much disk again as the
        live rows) so a search reads each probed cell in one piece, 1-bit and 8-bit codes of
        the rows (their offsets from their centroids in the leading principal directions of
        those offsets) that a search below every cell reads instead, narrowing each query's
        rows to a shortlist by each in turn and scoring that exactly, and a recall-vs-probes
        curve measured on sampled rows against the exact answer, from which :meth:`search`
        chooses how many cells to probe; the recall reported for each level is measured
        through that search. ``seed``: the sample and the k-means start.

        Written like any commit (files fsynced and renamed, then registered in one
        transaction), it replaces the previous index; a crash leaves the old one or none.
        Rows added later are scanned exactly and deleted ones masked until the changes exceed
        a fifth of the indexed rows; then searches warn that the index is stale and scan
        exactly until it is built again. :meth:`compact` drops it. The write lock is held while
        it builds: other writers wait, readers go on (with the old index).

        ``client``: a ``distributed.Client``; the assignment of every row to its cell (block by
        block) and the exact searches of the recall curve run as tasks on its Dask cluster,
        whose workers read the segment files (see :mod:`embedcache.engine`); k-means on the
        sample and the writing of the index stay here. The same index as without it.
        ``progress``: with ``client``, a bar on stderr of the cluster's finished tasks (None:
        when stderr is a terminal).
        """
        if cells is not None:
            cells = check_int("cells", cells, 1)
        seed = check_int("seed", seed, 0)
        engine = None
        bar: Any = contextlib.nullcontext()
        if client is not None:
            from embedcache._progress import progress_bar
            from embedcache.engine import Counted, engine_for

            bar = progress_bar(progress, 0, "index", unit="tasks")
            engine = Counted(engine_for(client), bar)
        with bar, self._txn.writing() as w:
            _index.build(self._txn.current(), w, self.path, cells, seed, engine)
        info = self.index_info()
        assert info is not None
        return info

    def drop_index(self) -> bool:
        """Remove the index in one commit (its files after it); searches then scan exactly.
        Returns whether there was one."""
        with self._txn.writing() as w:
            dropped = _index.drop(self._txn.current(), w, self.path)
        self._index_maps.clear()
        return dropped

    def index_info(self) -> dict[str, Any] | None:
        """The committed index, or None: ``format`` (its layout's version) and ``readable``
        (False for an index written by a newer version, in a later format: searches then scan
        exactly, and only ``bytes`` is given besides), ``cells``, ``rows`` (indexed), ``covered_rows`` (row
        count of the store when built), ``generation`` (the commit that made it), ``seed``,
        ``k``; ``probes`` and ``recall`` (estimate, low, high: a 95% interval measured on
        sampled rows at recall@k) for the recall levels 0.8, 0.9, 0.95, 0.99;
        ``added_rows`` and ``deleted_rows`` since the build, ``stale`` (searches then scan
        exactly), ``bytes``, ``code_dims`` (the dimensions the codes keep; None for an index
        written without codes), ``shortlist_losses`` (for each level, the share of sampled
        rows' true neighbours that the probed cells held and the codes' shortlists lost;
        searches near that level probe for that much more recall) and ``shortlist_loss``
        (the most of them)."""
        with self._txn.reading() as v:
            return _index.info(v)

    # ------------------------------------------------------------------ reading

    def get(self, ids: Sequence[str]) -> np.ndarray:
        """Vectors of ``ids`` (array of shape (n, d), the store's dtype), in the order asked."""
        ids = _write.check_ids(ids)
        with self._txn.reading() as v:
            return _query.gather(v, _query.rows_or_raise(self._txn.current(), ids))

    def metadata(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Metadata dict of each of ``ids``, in the order asked (``{}`` where none was given)."""
        ids = _write.check_ids(ids)
        with self._txn.reading():
            conn = self._txn.current()
            return _query.metadata_of(conn, _query.rows_or_raise(conn, ids))

    def vectors(self) -> np.ndarray:
        """Read-only array (live rows, d) of the live vectors, in the order of :meth:`ids`.

        A memory-mapped view when the live rows are one segment without deletions (a store up
        to 256 MiB after :meth:`compact`); otherwise a read-only copy in memory. For stores
        larger than memory use :meth:`search` or :meth:`similar_pairs`, which stream.
        """
        with self._txn.reading() as v:
            return _query.live_vectors(v)

    def snapshot(self) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
        """``(ids, vectors, metadata)`` of every live row, read in one transaction.

        The same as :meth:`ids`, :meth:`vectors` and :meth:`metadata` of those ids, but from
        one committed state: a write by another process between separate calls could
        otherwise pair ids with the vectors of other rows.
        """
        with self._txn.reading() as v:
            rows = _query.live_rows(self._txn.current())
            x = _query.live_vectors(v)
        return [i for i, _ in rows], x, [m for _, m in rows]

    def search(
        self,
        queries: Any,
        k: int = 10,
        *,
        exact: bool = False,
        recall: float = 0.95,
        where: dict[str, Any] | None = None,
        client: Any = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` live rows for each query, best first (ties: earlier row first).

        Through the index when the store has one (:meth:`create_index`) and it is not stale:
        the cells nearest each query are scored exactly, as many as the recall-vs-probes curve
        measured at build time calls for to reach ``recall`` (recall@k of the index's ``k``;
        ``recall=1`` probes every cell and gives the exact answer). Rows added since the build
        are scanned exactly, deleted ones never returned. ``exact=True``, a ``where`` filter
        or a ``client`` scan every row instead.

        queries: array of shape (q, d) or (d,) (one query). ``where``: metadata equality filter,
        ``{"lang": "en", "year": 2024}`` keeps rows whose metadata has all these values.
        Returns ``scores`` float32 (q, kk) and ``ids`` object (q, kk), kk = min(k, live rows);
        slots with no eligible row (because of ``where``) hold score ``-inf`` and id ``None``.
        Segments are streamed one at a time through :func:`embedcache.top_k`, so a store larger
        than memory works. ``client``: a ``distributed.Client``; blocks of rows become tasks on
        its Dask cluster (the queries are sent to each worker once), worth it for large query
        batches; the same result (see :mod:`embedcache.engine`).
        """
        k = check_k(k)
        recall = check_recall(recall)
        q = np.asarray(queries) if not isinstance(queries, np.ndarray) else queries
        q = as_matrix(q.reshape(1, -1) if q.ndim == 1 else q, "queries")
        if where is not None:
            _query.where_clause(where)  # validate before reading
        with self._txn.reading() as v:
            if v.dim is not None and q.shape[1] != v.dim:
                raise DimensionMismatchError(f"queries must have dimension {v.dim} (the store's), got shape {q.shape}")
            check_finite(q, "queries")
            kk = min(k, v.live)
            if kk == 0:
                return np.full((q.shape[0], 0), -np.inf, np.float32), np.full((q.shape[0], 0), None, dtype=object)
            conn = self._txn.current()
            eligible = _query.where_rows(conn, where) if where else None
            q32 = np.ascontiguousarray(q, dtype=np.float32)
            use = None if exact or where or client is not None else _index.usable(self.path, v, self._index_maps)
            if use is not None:
                desc, loaded = use
                scores, rows = _index.search(v, desc, loaded, q32, kk, _index.probes_for(desc, recall))
            elif client is None:
                scores, rows = _query.top_k(v, q32, kk, eligible)
            else:
                from embedcache.engine import engine_for
                from embedcache.engine._jobs import search_job

                scores, rows = search_job(self, v, q32, kk, eligible, engine_for(client))
            return scores, _query.ids_of_rows(conn, rows)

    def similar_pairs(
        self, threshold: float, *, y: VectorStore | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pair of live rows with score >= ``threshold``, best first.

        Within this store each pair appears once, left the earlier row; with ``y`` (a store of
        the same dimension, metric and namespace) every pair (row here, row in ``y``). Returns
        ``(left_ids, right_ids, scores)``: object arrays of str and float32, sorted by score
        descending, then by the left row, then by the right row (rows in the order of
        :meth:`ids`). Segments go through :func:`embedcache.similar_pairs` two at a time, so
        memory holds two segments plus the output.
        """
        with self._txn.reading() as v:
            threshold = check_threshold(threshold, v.metric)
        if y is not None and not isinstance(y, VectorStore):
            raise InvalidInputTypeError(f"y must be a VectorStore or None, got {type(y).__name__}")
        if y is None or y is self:
            with self._txn.reading() as v:
                li, lj, sc = _query.pairs(v, v, threshold, same=y is None)
                conn = self._txn.current()
                return _query.ids_of_rows(conn, li), _query.ids_of_rows(conn, lj), sc
        # both stores' locks, always in one order: a.similar_pairs(y=b) and
        # b.similar_pairs(y=a) on two threads would otherwise wait for each other
        first, second = (self, y) if id(self) < id(y) else (y, self)
        with first._txn.reading() as fv, second._txn.reading() as sv:
            v, yv = (fv, sv) if first is self else (sv, fv)
            _check_comparable(v, yv)
            li, lj, sc = _query.pairs(v, yv, threshold, same=False)
            right = _query.ids_of_rows(y._txn.current(), lj)
            left = _query.ids_of_rows(self._txn.current(), li)
        return left, right, sc

    # ------------------------------------------------------------------ integrity, info

    def verify(self) -> dict[str, int]:
        """Check the whole store; raise :class:`~embedcache.StoreCorruptedError` naming the bad file.

        Checks the format version and settings, that segments tile the rows, that every
        committed segment file exists with the recorded length and crc32, that rows and
        segments agree, that metadata is valid JSON, and SQLite's own integrity check. Returns
        counts: ``segments``, ``rows`` (including deleted), ``live``, ``bytes``; with an index
        its files are checked too (length, crc32, offsets, row numbers) and ``index_bytes``
        added.
        """
        with self._txn.reading() as v:
            out = _format.verify(self._txn.current(), v, self._txn.db_path)
            index_bytes = _index.verify(self.path, v)
        if index_bytes:
            out["index_bytes"] = index_bytes
        return out

    def info(self) -> dict[str, Any]:
        """Settings and sizes: path, format_version, dimensions, dtype, metric, namespace, model,
        embedder_base_url and embedder_dimensions (what the embedder that made the vectors was
        given, when known), text_key, rows (live), deleted, segments, size_bytes (segments and
        database), generation, index (:meth:`index_info`, None without one)."""
        with self._txn.reading() as v:
            s = v.settings
            db = sum(p.stat().st_size for p in self.path.glob(_format.DB_NAME + "*") if p.is_file())
            return {
                "path": str(self.path),
                "format_version": s["format_version"],
                "dimensions": v.dim,
                "dtype": s["dtype"],
                "metric": s["metric"],
                "namespace": s["namespace"],
                "model": s["model"],
                "embedder_base_url": s.get("base_url"),
                "embedder_dimensions": s.get("dimensions"),
                "text_key": v.text_key,
                "rows": v.live,
                "deleted": len(v.deleted),
                "segments": len(v.segments),
                "size_bytes": sum(x.nbytes for x in v.segments) + db,
                "generation": v.generation,
                "index": _index.info(v),
            }

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Close the database and unmap the segments and the index (idempotent; waits for a
        write under way)."""
        self._txn.close()
        self._index_maps.clear()

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_comparable(v: _format.View, yv: _format.View) -> None:
    """Raise unless the vectors of two stores can be scored against each other."""
    if yv.metric != v.metric:
        raise ConfigurationError(f"both stores must use one metric: {v.metric!r} here, {yv.metric!r} in y")
    if v.dim is not None and yv.dim is not None and v.dim != yv.dim:
        raise DimensionMismatchError(f"y must have dimension {v.dim} (this store's), got {yv.dim}")
    ns, yns = v.settings["namespace"], yv.settings["namespace"]
    if ns is not None and yns is not None and ns != yns:
        raise NamespaceMismatchError(f"y must hold vectors of namespace {ns!r} (this store's), got {yns!r}")
