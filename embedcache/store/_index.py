"""The store's persisted partition index: building it, its files, searching through it.

Files (in ``index/`` of the store directory, ``N`` a number taken from ``next_segment``)::

    index/N.cent   the cell centroids: (cells, dim) float32 unit rows, row-major
    index/N.rows   int64: ``offsets`` (cells + 1 values), then the row numbers in cell order
    index/N.vec    the vectors of those rows in cell order, in the store's dtype
    index/N.rot    float32 (dim, m): the directions the codes keep (``code_dims`` m)
    index/N.code   int8 (rows, m): each row's offset from its cell's centroid in 8 bits
    index/N.fac    float32 (rows, 2): each row's code scale and gain (:mod:`._codes`)
    index/N.srot   float32 (dim, m): those directions turned by a random rotation
    index/N.sign   uint64 (blocks of 64 rows, words, 64): each row's offset in 1 bit a
                   direction of those, the words of a block's rows together
    index/N.sblk   float32 (blocks of 64 rows, 3, 64): each row's factors for those, the
                   factors of a block's rows together (:class:`._codes.Signs`; an index
                   written before them has ``N.sfac``, float32 (rows, 4) a row each)

The setting ``index`` holds a JSON description: ``number``, ``cells``, ``rows`` (rows held),
``covered`` (the store's row count when it was built: rows numbered from there on are not in
it), ``deleted_at_build`` (rows below ``covered`` deleted then), ``generation`` (the commit
that made it), ``seed``, the recall-vs-probes curve measured at build time (``curve``:
``[probes, recall]`` steps at ``k``), the probes and the measured recall (95% interval) for
a few recall levels, ``code_dims`` (the dimensions the codes keep), ``shortlist_losses``
(for each level, at its probes, the sampled rows' true neighbours that the probed cells held
and the codes' shortlists lost, as a share of all their true neighbours: a search near that
level asks the curve for that much more recall) and ``shortlist_loss`` (the most of them),
and the ``files`` with their lengths and crc32. It is written like a segment: files under
temporary names, fsynced, renamed, the directory fsynced, then the setting is changed in the
commit that makes the index visible. A kill at any point leaves the old index (or none);
leftover files are removed by the next ``create_index`` or ``compact``.

A search through it probes the cells nearest each query and scores their rows with the
kernels' own per-pair score (:mod:`._probe`: each probed cell read once, in one piece, for all
the queries that probe it, in one compiled pass), through the codes when fewer than every
cell is probed (a shortlist by the codes' estimate, then scored exactly); rows deleted since
the build are masked, rows added since are scanned exactly and merged; with the 1-bit codes,
a first, wider shortlist by their estimate comes before the 8-bit codes' one. When those
changes exceed ``_config.INDEX_STALE_FRACTION`` of the indexed rows the index is stale: a
warning says so and the search scans exactly. The recall recorded for each level is measured through
that same search, codes and shortlists included; an index written before codes existed (three
files) is searched without them, one written before 1-bit codes (six files) with the 8-bit
codes alone. ``compact`` renumbers rows, so it drops the index (with a warning).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sqlite3
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedcache import _config, kernels
from embedcache.errors import InvalidInputError, StoreCorruptedError
from embedcache.index._cells import build_cells
from embedcache.index._merge import NO_INDEX, merge_topk
from embedcache.index._partition import PartitionIndex
from embedcache.index._recall import Evidence, _rank, interval, other_neighbours, samples
from embedcache.store import _query
from embedcache.store._format import View, next_segment
from embedcache.store._codes import (
    SIGN_BLOCK,
    Coarse,
    Codes,
    Signs,
    _inverse_norms,
    block_factors,
    code_basis,
    coarse,
    encode,
    encode_signs,
    residuals,
    spin,
    words_for,
)
from embedcache.store._probe import probe
from embedcache.store._transactions import Write

INDEX_DIR = "index"
SETTING = "index"
INDEX_NAME = re.compile(r"^\d+\.(cent|rows|vec|rot|code|fac|srot|sign|sblk|sfac)(\.tmp)?$")
#: recall levels whose probes (and measured recall) the description records
LEVELS = (0.8, 0.9, 0.95, 0.99)
_KINDS = ("cent", "rows", "vec", "rot", "code", "fac", "srot", "sign", "sblk")
#: the index layout this version writes, and the latest it reads (1: the 1-bit codes' factors
#: a row at a time, ``sfac``, or none; 2: in blocks of 64 rows, ``sblk``). An index written in
#: a later format is left unused (searches scan exactly, with a warning), never misread.
INDEX_FORMAT = 2


def index_format(desc: dict[str, Any]) -> int:
    """The format ``desc`` was written in (1 when it does not say: written before formats)."""
    return int(desc.get("format", 1))


def _later(desc: dict[str, Any]) -> bool:
    """Whether ``desc`` was written in a format later than this version reads."""
    return index_format(desc) > INDEX_FORMAT


def description(view: View) -> dict[str, Any] | None:
    """The committed index of ``view`` (its JSON description), or None."""
    text = view.settings.get(SETTING)
    if not text:
        return None
    try:
        return _parse(text)
    except ValueError:
        raise StoreCorruptedError(f"setting {SETTING!r} is not valid JSON") from None


@functools.lru_cache(maxsize=8)
def _parse(text: str) -> dict[str, Any]:
    """The parsed description (shared between calls: never modified)."""
    return json.loads(text)


def live_rows(view: View) -> np.ndarray:
    """Sorted live row numbers of ``view`` (int64)."""
    keep = np.ones(view.next_row, bool)
    keep[view.deleted] = False
    return np.flatnonzero(keep).astype(np.int64)


class _Rows:
    """The live rows of a view as an array-like (shape, len, slices and index arrays), read
    from the memory-mapped segments on demand, so k-means and assignment never load them all."""

    def __init__(self, view: View, rows: np.ndarray) -> None:
        self.view = view
        self.rows = rows
        self.shape = (len(rows), view.dim or 0)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        return _query.gather(self.view, self.rows[key])


# ----------------------------------------------------------------------------- building


def build(conn: sqlite3.Connection, w: Write, root: Path, cells: int | None, seed: int,
          engine: Any = None) -> dict[str, Any]:
    """Train, assign, write the files and register the index in ``w``'s transaction.

    ``engine`` (:mod:`embedcache.engine`): the assignment of every row to its cell and the
    exact side of the recall curve run as its tasks (the same cells and curve); k-means on
    the sample and the writing of the files stay here."""
    from embedcache.store._write import fsync_dir, set_settings, write_segment

    view = w.view
    d = view.dim
    live = live_rows(view)
    if d is None or not len(live):
        raise InvalidInputError(f"{root} holds no live rows; add rows before create_index()")
    idx_dir = root / INDEX_DIR
    old = description(view)
    remove_orphans(idx_dir, old)
    if not idx_dir.exists():
        idx_dir.mkdir()
        fsync_dir(root)
    if engine is None:
        source: Any = _Rows(view, live)
    else:
        from embedcache.engine._source import StoreSource

        source = StoreSource(view, engine)  # the live rows, in the order of ``live``
    cent, own = build_cells(source, cells, seed)  # type: ignore[arg-type]
    index = PartitionIndex.from_assignment(cent, own)
    rows = live[index.order]
    cent = np.ascontiguousarray(index.centroids, "<f4")
    number = next_segment(view)
    step = max(1, _config.STORE_CHUNK_BYTES // (d * view.dtype.itemsize))
    cell = np.repeat(np.arange(index.cells, dtype=np.int64), np.diff(index.offsets))  # of each index row
    factors: list[np.ndarray] = []
    basis: list[np.ndarray] = []

    def written() -> np.ndarray:
        return np.memmap(idx_dir / f"{number:06d}.vec", view.dtype, mode="r", shape=(len(rows), d))

    def directions():  # from the offsets of rows spread over the vectors just written
        spread = np.linspace(0, len(rows) - 1, min(len(rows), _config.STORE_INDEX_CODE_SAMPLE))
        pick = np.unique(spread.astype(np.int64))
        vec, gram = written(), np.zeros((d, d), np.float64)
        for a in range(0, len(pick), step):  # in pieces: memory stays bounded at any dimension
            r = residuals(vec[pick[a : a + step]], cent, cell[pick[a : a + step]])[0].astype(np.float64)
            gram += r.T @ r
        basis.append(code_basis(gram, _config.STORE_INDEX_CODE_ENERGY))
        basis.append(spin(basis[0], seed))
        yield basis[0]

    def codes():  # from the vectors just written, in order, in pieces
        vec = written()
        for a in range(0, len(rows), step):
            c, f = encode(vec[a : a + step], cent, cell[a : a + step], view.metric == "cosine", basis[0])
            factors.append(f)
            yield c

    def turned():  # the rotated directions, made by the directions' pass (written after it)
        yield basis[1]

    sign_factors: list[np.ndarray] = []

    def signs():  # a second pass over the vectors, in blocks of whole 64 rows
        vec, block = written(), max(SIGN_BLOCK, step // SIGN_BLOCK * SIGN_BLOCK)
        for a in range(0, len(rows), block):
            bits, f = encode_signs(vec[a : a + block], cent, cell[a : a + block], view.metric == "cosine", basis[1])
            sign_factors.append(f)
            yield bits

    chunks = {
        "cent": iter([cent]),
        "rows": iter([np.ascontiguousarray(index.offsets, "<i8"), np.ascontiguousarray(rows, "<i8")]),
        "vec": (np.ascontiguousarray(_query.gather(view, rows[a : a + step]))
                for a in range(0, len(rows), step)),
        "rot": directions(),
        "code": codes(),
        "fac": (f for f in factors),  # filled by the codes' pass, written after it
        "srot": turned(),
        "sign": signs(),
        "sblk": (f for f in sign_factors),  # filled by the signs' pass, written after it
    }
    files = []
    try:
        for kind in _KINDS:
            nbytes, crc = write_segment(idx_dir, number, chunks[kind], threading.Event(), "." + kind)
            files.append({"file": f"{INDEX_DIR}/{number:06d}.{kind}", "nbytes": nbytes, "crc32": crc})
        fsync_dir(idx_dir)
        loaded = _map(root, view, number, index.cells, len(rows), basis[0].shape[1], files)
        assert loaded is not None, "the index files just written are gone"
        curve, levels, losses = _measure(view, source, index, live, seed, loaded)
    except BaseException:
        remove_orphans(idx_dir, old)
        raise
    desc = {
        "format": INDEX_FORMAT,
        "number": number,
        "cells": index.cells,
        "rows": len(rows),
        "covered": view.next_row,
        "deleted_at_build": len(view.deleted),
        "generation": view.generation + 1,
        "seed": seed,
        "k": _config.INDEX_CURVE_K,
        "curve": curve,
        "levels": levels,
        "code_dims": basis[0].shape[1],
        "shortlist_loss": max(losses.values(), default=0.0),
        "shortlist_losses": losses,
        "files": files,
    }
    conn.execute("INSERT OR REPLACE INTO settings(key, value) VALUES (?, ?)", (SETTING, json.dumps(desc)))
    set_settings(conn, {"next_segment": number + 1})
    if old:
        w.obsolete += [root / f["file"] for f in old["files"]]
    return desc


def _measure(view: View, source: Any, index: PartitionIndex, live: np.ndarray, seed: int, loaded: Loaded):
    """The recall-vs-probes curve at k (one sample of stored rows as queries, their exact
    neighbours other than themselves), and per level the probes it calls for with the recall
    measured on a second sample (estimate, 95% interval) through the search itself
    (``loaded``: the index's files), codes and shortlist included."""
    rng = np.random.default_rng([seed, 11])
    cal, mea = samples(len(live), rng)
    if not len(cal):
        return [[index.cells, 1.0]], {str(lv): [index.cells, 1.0, 1.0, 1.0] for lv in LEVELS}, {}
    cal_ev, mea_ev = (_evidence(view, source, index, live, s) for s in (cal, mea))
    total = cal_ev.true.sum()
    order = np.argsort(cal_ev.need, kind="stable")
    need = np.maximum(1, cal_ev.need[order])
    cum = np.cumsum(cal_ev.weight[order]) / max(total, 1.0)
    last = np.flatnonzero(np.diff(need, append=need[-1] + 1))  # the last entry of each step
    curve = [[int(need[t]), round(float(cum[t]), 6)] for t in last] if total > 0 else [[index.cells, 1.0]]
    queries = np.ascontiguousarray(source[mea], dtype=np.float32)
    k = min(_config.INDEX_CURVE_K, len(live) - 1)

    @functools.lru_cache(maxsize=None)  # a level's probes are often a probe count searched already
    def found(p: int) -> np.ndarray:
        return _found(mea_ev, _search_loaded(view, loaded, queries, k + 1, p, None)[1], live[mea], k)

    # what the codes' shortlists lose of what the probed cells hold, at the probes of each
    # level: that level (and a search near it) then asks the curve for that much more
    true = max(float(mea_ev.true.sum()), 1.0)
    losses = {}
    for lv in LEVELS:
        p = cal_ev.smallest(lv, index.cells)
        losses[str(lv)] = round(max(0.0, float(mea_ev.found(p).sum() - found(p).sum()) / true), 6)
    levels = {}
    for lv in LEVELS:
        p = probes_for({"cells": index.cells, "curve": curve, "shortlist_losses": losses}, lv)
        est, low, high = interval(found(p), mea_ev.true)
        levels[str(lv)] = [p, round(est, 6), round(low, 6), round(high, 6)]
    return curve, levels, losses


def _evidence(view: View, source: Any, index: PartitionIndex, live: np.ndarray, sample: np.ndarray) -> Evidence:
    """For stored rows ``sample`` (positions in ``live``) searched as queries: their true
    neighbours (itself left out) and the probes each needs (rank of its cell + 1)."""
    k = min(_config.INDEX_CURVE_K, len(live) - 1)
    q = np.ascontiguousarray(source[sample], dtype=np.float32)
    if k < 1:
        return Evidence(np.zeros(len(q)), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    if isinstance(source, _Rows):
        _, nb = _query.top_k(view, q, k + 1, None)
    else:  # tasks of an engine: rows of the source are positions in ``live``
        _, pos = source.top_k(q, k + 1)
        nb = np.where(pos >= 0, live[np.maximum(pos, 0)], -1)
    qi, jj = other_neighbours(nb, live[sample], k)
    cell = index.own[np.searchsorted(live, jj)]
    need = _rank(kernels.cosine_similarity(q, index.centroids), qi, cell) + 1
    true = np.bincount(qi, minlength=len(q)).astype(np.float64)
    return Evidence(true, qi.astype(np.int64), need, np.ones(len(qi)), partner=jj.astype(np.int64))


def _found(ev: Evidence, got: np.ndarray, self_rows: np.ndarray, k: int) -> np.ndarray:
    """(queries,) float64: how many of each sampled row's true neighbours (``ev``) are among
    the first ``k`` rows other than itself of its search result ``got`` (q, k + 1)."""
    qi, jj = other_neighbours(got, self_rows, k)
    width = int(max(got.max(initial=0), ev.partner.max(initial=0))) + 1 if len(ev.partner) else 1
    hit = np.isin(ev.row * width + ev.partner, qi * width + jj)
    return np.bincount(ev.row[hit], minlength=len(ev.true)).astype(np.float64)


def remove_orphans(idx_dir: Path, desc: dict[str, Any] | None) -> None:
    """Remove index files that ``desc`` (the committed index) does not list; holds the lock."""
    if not idx_dir.is_dir():
        return
    keep = {Path(f["file"]).name for f in desc["files"]} if desc else set()
    for entry in os.scandir(idx_dir):
        if INDEX_NAME.match(entry.name) and entry.name not in keep:
            os.unlink(entry.path)


def drop(conn: sqlite3.Connection, w: Write, root: Path) -> bool:
    """Unregister the index in ``w``'s transaction (its files removed after the commit)."""
    desc = description(w.view)
    if desc is None:
        return False
    conn.execute("DELETE FROM settings WHERE key = ?", (SETTING,))
    w.obsolete += [root / f["file"] for f in desc["files"]]
    return True


# ----------------------------------------------------------------------------- reading


@dataclass
class Loaded:
    """The memory-mapped files of one index."""

    number: int
    centroids: np.ndarray
    offsets: np.ndarray
    rows: np.ndarray
    vectors: np.ndarray
    codes: Codes | None  # None: an index written before codes existed
    inv_c: np.ndarray  # the centroids' inverse norms
    small: Coarse  # the centroids in 8 bits (ranking them against a few queries)


def load(root: Path, view: View, desc: dict[str, Any], cache: dict[int, Loaded]) -> Loaded | None:
    """Map the files of ``desc`` (reusing ``cache``); None when a file is gone (a newer commit
    replaced the index, or damage: :meth:`VectorStore.verify` says which)."""
    number = desc["number"]
    if number in cache:
        return cache[number]
    loaded = _map(root, view, number, desc["cells"], desc["rows"], desc.get("code_dims", 0), desc["files"])
    if loaded is not None:
        cache.clear()  # one index at a time
        cache[number] = loaded
    return loaded


def _map(root: Path, view: View, number: int, c: int, n: int, m: int, listed: list[dict[str, Any]]) -> Loaded | None:
    """Map the index files ``listed`` (None when one is gone); ``m``: the codes' dimensions."""
    d = view.dim
    assert d is not None
    expect = {"cent": c * d * 4, "rows": (c + 1 + n) * 8, "vec": n * d * view.dtype.itemsize, "rot": d * m * 4,
              "code": n * m, "fac": n * 8, "srot": d * m * 4,
              "sign": -(-n // SIGN_BLOCK) * SIGN_BLOCK * words_for(m) * 8,
              "sblk": -(-n // SIGN_BLOCK) * SIGN_BLOCK * 12, "sfac": n * 16}
    maps = {}
    with contextlib.ExitStack() as files:
        for f in listed:
            path = root / f["file"]
            kind = path.suffix[1:]
            try:  # open once, then check and map that file: a writer may unlink the name
                fh = files.enter_context(open(path, "rb"))
            except FileNotFoundError:
                return None
            size = os.fstat(fh.fileno()).st_size
            if size != f["nbytes"] or size != expect[kind]:
                raise StoreCorruptedError(f"{path}: index file is {size} bytes, expected {expect[kind]}")
            maps[kind] = fh
        cent = np.fromfile(maps["cent"], "<f4").reshape(c, d)
        ro = np.memmap(maps["rows"], "<i8", mode="r")
        vec = np.memmap(maps["vec"], view.dtype, mode="r", shape=(n, d))
        codes = None
        ones = {"srot", "sign", "sblk", "sfac"} & set(maps)
        if ones and (len(ones) != 3 or "sign" not in ones or "srot" not in ones):
            raise StoreCorruptedError(f"{root / INDEX_DIR}: index {number} lists {sorted(ones)} of its 1-bit codes' "
                                      "three files")
        if "code" in maps and n:
            signs = None
            if "sign" in maps:
                blocks = -(-n // SIGN_BLOCK)
                if "sblk" in maps:
                    sfac = np.memmap(maps["sblk"], "<f4", mode="r", shape=(blocks, 3, SIGN_BLOCK))
                else:  # written a row at a time: put in blocks here, once
                    sfac = block_factors(np.memmap(maps["sfac"], "<f4", mode="r", shape=(n, 4)))
                signs = Signs(np.memmap(maps["sign"], "<u8", mode="r", shape=(blocks, words_for(m), SIGN_BLOCK)),
                              sfac, np.ascontiguousarray(np.fromfile(maps["srot"], "<f4").reshape(d, m).T))
            codes = Codes(np.memmap(maps["code"], np.int8, mode="r", shape=(n, m)),
                          np.memmap(maps["fac"], "<f4", mode="r", shape=(n, 2)),
                          np.ascontiguousarray(np.fromfile(maps["rot"], "<f4").reshape(d, m).T), signs)
    return Loaded(number, cent, np.asarray(ro[: c + 1]), ro[c + 1 :], vec, codes, _inverse_norms(cent), coarse(cent))


def stale_rows(view: View, desc: dict[str, Any]) -> tuple[int, int]:
    """(live rows added since the build, indexed rows deleted since)."""
    covered = desc["covered"]
    dead = np.searchsorted(view.deleted, covered)
    added = (view.next_row - covered) - (len(view.deleted) - dead)
    return int(added), int(dead - desc["deleted_at_build"])


def probes_for(desc: dict[str, Any], recall: float) -> int:
    """The fewest probes whose recall on the build-time curve reaches ``recall`` plus what
    the codes' shortlists were measured to lose near it (:func:`shortlist_loss`); every
    cell for recall 1."""
    if recall >= 1.0:
        return int(desc["cells"])
    target = recall + shortlist_loss(desc, recall)
    for p, r in desc["curve"]:
        if r >= target - 1e-12:
            return int(p)
    return int(desc["cells"])


def shortlist_loss(desc: dict[str, Any], recall: float) -> float:
    """What the codes' shortlists lose at ``recall``: the larger of the losses measured at
    the levels on either side of it (the nearest one outside them), or the one loss of an
    index that recorded no loss per level (0 without codes)."""
    per = sorted((float(lv), v) for lv, v in (desc.get("shortlist_losses") or {}).items())
    if not per:
        return float(desc.get("shortlist_loss", 0.0))
    below = [v for lv, v in per if lv <= recall]
    above = [v for lv, v in per if lv >= recall]
    return float(max(below[-1:] + above[:1]))


def info(view: View) -> dict[str, Any] | None:
    """What :meth:`VectorStore.index_info` returns."""
    desc = description(view)
    if desc is None:
        return None
    if _later(desc):  # what it records may have changed: only the format
        return {"format": index_format(desc), "readable": False,
                "bytes": sum(f.get("nbytes", 0) for f in desc.get("files", []))}
    added, deleted = stale_rows(view, desc)
    return {
        "format": index_format(desc),
        "readable": True,
        "cells": desc["cells"],
        "rows": desc["rows"],
        "covered_rows": desc["covered"],
        "generation": desc["generation"],
        "seed": desc["seed"],
        "k": desc["k"],
        "probes": {float(lv): v[0] for lv, v in desc["levels"].items()},
        "recall": {float(lv): {"estimate": v[1], "low": v[2], "high": v[3]} for lv, v in desc["levels"].items()},
        "added_rows": added,
        "deleted_rows": deleted,
        "stale": added + deleted > _config.INDEX_STALE_FRACTION * max(1, desc["rows"]),
        "bytes": sum(f["nbytes"] for f in desc["files"]),
        "code_dims": desc.get("code_dims"),  # None: an index without codes
        "shortlist_loss": desc.get("shortlist_loss", 0.0),
        "shortlist_losses": {float(lv): v for lv, v in (desc.get("shortlist_losses") or {}).items()},
    }


def usable(root: Path, view: View, cache: dict[int, Loaded]) -> tuple[dict[str, Any], Loaded] | None:
    """The committed index and its maps when a search should use it, else None (warning
    when an index exists but is stale or its files are gone)."""
    desc = description(view)
    if desc is None:
        return None
    if _later(desc):
        warnings.warn(
            f"the index of {root} was written by a newer version of embedcache (index format "
            f"{index_format(desc)}; this version reads formats up to {INDEX_FORMAT}); searching exactly "
            "(upgrade embedcache, or run create_index() again to write one this version reads)",
            UserWarning,
            stacklevel=4,
        )
        return None
    added, deleted = stale_rows(view, desc)
    if added + deleted > _config.INDEX_STALE_FRACTION * max(1, desc["rows"]):
        warnings.warn(
            f"the index of {root} is stale: {added} rows added and {deleted} deleted since it was built "
            f"over {desc['rows']} rows; searching exactly (run create_index() again)",
            UserWarning,
            stacklevel=4,
        )
        return None
    loaded = load(root, view, desc, cache)
    if loaded is None:
        warnings.warn(f"the index files of {root} are gone (a newer commit replaced them, or they were "
                      "removed: verify() says which); searching exactly", UserWarning, stacklevel=4)
        return None
    return desc, loaded


def search(view: View, desc: dict[str, Any], loaded: Loaded, queries: np.ndarray, k: int,
           probes: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, row numbers) of float32 ``queries`` through the index: ``probes``
    cells per query, rows deleted since the build masked, rows added since scanned exactly.
    Ties go to the lower row, as in the exact scan. ``k`` is at most the live rows: a query
    whose cells held fewer live rows (most of them deleted since the build, or ``k`` near
    the rows there are), or a zero query (every row ties at 0: the lowest rows are the
    answer), is searched again with four times the probes, up to every cell: the exact
    answer."""
    scores, found = _search_probed(view, desc, loaded, queries, k, probes)
    cells = int(desc["cells"])
    zero = ~np.any(queries != 0, axis=1)
    while probes < cells:
        again = np.flatnonzero((found[:, k - 1] < 0) | zero)
        if not len(again):
            break
        probes = cells if zero[again].any() else min(cells, 4 * probes)
        scores[again], found[again] = _search_probed(view, desc, loaded, queries[again], k, probes)
    return scores, found


def _search_probed(view: View, desc: dict[str, Any], loaded: Loaded, queries: np.ndarray, k: int,
                   probes: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`search` at ``probes`` cells, as they come."""
    nq = len(queries)
    deleted = view.deleted[: np.searchsorted(view.deleted, desc["covered"])]
    check_dead = len(deleted) > desc["deleted_at_build"]
    scores, found = _search_loaded(view, loaded, queries, k, probes, deleted if check_dead else None)
    if view.next_row > desc["covered"]:  # rows added since the build: an exact scan of them
        added = np.arange(desc["covered"], view.next_row, dtype=np.int64)
        added = added[~np.isin(added, view.deleted, assume_unique=True)]
        if len(added):
            s2, r2 = _query.top_k(view, queries, k, added)
            found[found < 0] = NO_INDEX
            merge_topk(scores, found, np.arange(nq, dtype=np.int64), s2, r2, np.zeros(nq, np.int64), False)
            found[found == NO_INDEX] = -1
    return scores, found


def _search_loaded(view: View, loaded: Loaded, queries: np.ndarray, k: int, probes: int,
                   deleted: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, row numbers) of the indexed rows alone (:func:`._probe.probe`)."""
    return probe(queries, loaded.centroids, probes, loaded.offsets, loaded.vectors, loaded.rows, k,
                 view.metric, deleted, codes=loaded.codes, inv_c=loaded.inv_c, small=loaded.small)


# ----------------------------------------------------------------------------- checking


def verify(root: Path, view: View) -> int:
    """Check the files of the committed index (length, crc32, offsets, row numbers); return
    their total bytes (0 without an index)."""
    desc = description(view)
    if desc is None:
        return 0
    total = 0
    for f in desc["files"]:
        path = root / f["file"]
        crc, size = 0, 0
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(_config.STORE_CHUNK_BYTES):
                    crc = zlib.crc32(chunk, crc)
                    size += len(chunk)
        except FileNotFoundError:
            raise StoreCorruptedError(f"{path}: index file is missing") from None
        if size != f["nbytes"]:
            raise StoreCorruptedError(f"{path}: index file is {size} bytes, the store records {f['nbytes']}")
        if crc != f["crc32"]:
            raise StoreCorruptedError(f"{path}: checksum {crc:#010x} differs from the recorded {f['crc32']:#010x}")
        total += size
    if _later(desc):  # its files are whole; their layout is not this version's to check
        return total
    loaded = load(root, view, desc, {})
    assert loaded is not None
    off, rows = loaded.offsets, loaded.rows
    if off[0] != 0 or off[-1] != desc["rows"] or np.any(np.diff(off) < 0):
        raise StoreCorruptedError(f"{root / desc['files'][1]['file']}: cell offsets do not tile {desc['rows']} rows")
    if len(rows) and (rows.min() < 0 or rows.max() >= desc["covered"]):
        raise StoreCorruptedError(f"{root / desc['files'][1]['file']}: row numbers outside 0..{desc['covered'] - 1}")
    return total
