"""Reading a committed view: rows by id, ids by row, metadata filters, top-k and pairs.

Every function takes the connection and :class:`View` of one read transaction, so an operation
sees one committed state. Scores always come from :mod:`embedcache.kernels`, one segment (or
pair of segments) at a time, so a store larger than memory works.
"""

from __future__ import annotations

import json
import math
import sqlite3
from typing import Any

import numpy as np

from embedcache import kernels
from embedcache.errors import InvalidInputError, InvalidInputTypeError
from embedcache.store._format import SQL_CHUNK, Segment, View

#: above this many distinct rows, ids are looked up by reading the whole id column once
_BULK_IDS = 50_000
#: up to this many, as bound parameters of one statement (SQLite allows 999 at least)
_FEW_IDS = 500


def where_clause(where: object) -> tuple[str, list[Any]]:
    """SQL conditions (joined by AND) and parameters for metadata equality filters."""
    if not isinstance(where, dict):
        raise InvalidInputTypeError(f"where must be a dict of metadata key -> value, got {type(where).__name__}")
    conds: list[str] = []
    params: list[Any] = []
    for key, value in where.items():
        if not isinstance(key, str) or not key or '"' in key:
            raise InvalidInputError(f"where keys must be non-empty strings without '\"', got {key!r}")
        path = f'$."{key}"'
        if value is None:
            conds.append("json_type(metadata, ?) = 'null'")
            params.append(path)
        elif isinstance(value, bool):
            conds.append("json_type(metadata, ?) = ?")
            params += [path, "true" if value else "false"]
        elif isinstance(value, (int, float, np.integer, np.floating)):
            if not math.isfinite(float(value)):
                raise InvalidInputError(f"where[{key!r}] must be finite, got {value!r}")
            conds.append("json_type(metadata, ?) IN ('integer', 'real') AND json_extract(metadata, ?) = ?")
            params += [path, path, value.item() if isinstance(value, np.generic) else value]
        elif isinstance(value, str):
            conds.append("json_type(metadata, ?) = 'text' AND json_extract(metadata, ?) = ?")
            params += [path, path, value]
        else:
            raise InvalidInputTypeError(
                f"where[{key!r}] must be a str, int, float, bool or None, got {type(value).__name__}"
            )
    return " AND ".join(conds), params


def where_rows(conn: sqlite3.Connection, where: dict[str, Any]) -> np.ndarray:
    """Sorted live row numbers whose metadata matches ``where``."""
    sql, params = where_clause(where)
    return np.array(
        [r for (r,) in conn.execute(f"SELECT row FROM rows WHERE deleted = 0 AND {sql} ORDER BY row", params)],
        dtype=np.int64,
    )


def rows_of(conn: sqlite3.Connection, ids: list[str]) -> dict[str, int]:
    """Live row number of each id that is in the store."""
    found: dict[str, int] = {}
    for a in range(0, len(ids), SQL_CHUNK):
        found.update(
            conn.execute(
                "SELECT id, row FROM rows WHERE deleted = 0 AND id IN (SELECT value FROM json_each(?))",
                (json.dumps(ids[a : a + SQL_CHUNK]),),
            )
        )
    return found


def rows_or_raise(conn: sqlite3.Connection, ids: list[str]) -> np.ndarray:
    """Live row number of each of ``ids``, in order; raise for an id not in the store."""
    found = rows_of(conn, list(dict.fromkeys(ids)))
    for i in ids:
        if i not in found:
            raise InvalidInputError(f"id {i!r} is not in the store")
    return np.array([found[i] for i in ids], dtype=np.int64)


def ids_of_rows(conn: sqlite3.Connection, rows: np.ndarray) -> np.ndarray:
    """Object array shaped like ``rows`` with the id of each row (None where row < 0)."""
    out = np.full(rows.shape, None, dtype=object)
    valid = rows >= 0
    uniq = np.unique(rows[valid])
    if not len(uniq):
        return out
    names = np.empty(len(uniq), dtype=object)
    if len(uniq) > _BULK_IDS:
        table = conn.execute("SELECT row, id FROM rows ORDER BY row").fetchall()
        r = np.fromiter((t[0] for t in table), dtype=np.int64, count=len(table))
        ids = np.array([t[1] for t in table], dtype=object)
        names[:] = ids[np.searchsorted(r, uniq)]
    elif len(uniq) <= _FEW_IDS:  # bound parameters: no JSON to write and parse
        ul = uniq.tolist()
        few = dict(conn.execute(f"SELECT row, id FROM rows WHERE row IN ({','.join('?' * len(ul))})", ul))
        names[:] = [few[r] for r in ul]
    else:
        found: dict[int, str] = {}
        ul = uniq.tolist()
        for a in range(0, len(ul), SQL_CHUNK):
            found.update(
                conn.execute(
                    "SELECT row, id FROM rows WHERE row IN (SELECT value FROM json_each(?))",
                    (json.dumps(ul[a : a + SQL_CHUNK]),),
                )
            )
        names[:] = [found[r] for r in ul]
    out[valid] = names[np.searchsorted(uniq, rows[valid])]
    return out


def metadata_of(conn: sqlite3.Connection, rows: np.ndarray) -> list[dict[str, Any]]:
    """The metadata dict of each row (``{}`` where none was given), in order."""
    text: dict[int, str | None] = {}
    uniq = sorted(set(rows.tolist()))
    for a in range(0, len(uniq), SQL_CHUNK):
        text.update(
            conn.execute(
                "SELECT row, metadata FROM rows WHERE row IN (SELECT value FROM json_each(?))",
                (json.dumps(uniq[a : a + SQL_CHUNK]),),
            )
        )
    return [json.loads(text[r]) if text[r] else {} for r in rows.tolist()]


def live_rows(conn: sqlite3.Connection) -> list[tuple[str, dict[str, Any]]]:
    """``(id, metadata)`` of every live row, in row order."""
    rows = conn.execute("SELECT id, metadata FROM rows WHERE deleted = 0 ORDER BY row").fetchall()
    return [(i, json.loads(m) if m else {}) for i, m in rows]


def gather(view: View, rows: np.ndarray) -> np.ndarray:
    """The vectors of ``rows`` (row numbers), in the store's dtype."""
    out = np.empty((len(rows), view.dim or 0), dtype=view.dtype)
    if not len(rows):
        return out
    starts = np.array([s.first_row for s in view.segments], dtype=np.int64)
    which = np.searchsorted(starts, rows, side="right") - 1
    for k in np.unique(which):
        s = view.segments[k]
        pos = np.flatnonzero(which == k)
        assert s.array is not None
        out[pos] = s.array[rows[pos] - s.first_row]
    return out


def live_vectors(view: View) -> np.ndarray:
    """Read-only (live rows, d): the segment's map itself when it is the only one and whole."""
    if len(view.segments) == 1 and view.live_mask(view.segments[0]) is None:
        a = view.segments[0].array
        assert a is not None
        return a
    out = np.empty((view.live, view.dim or 0), dtype=view.dtype)
    pos = 0
    for s in view.segments:
        assert s.array is not None
        mask = view.live_mask(s)
        block = s.array if mask is None else s.array[mask]
        out[pos : pos + len(block)] = block
        pos += len(block)
    out.flags.writeable = False
    return out


def top_k(view: View, queries: np.ndarray, k: int, eligible: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` scores and row numbers (-1 where none) for float32 ``queries`` over the live
    rows, or over the sorted rows ``eligible`` when given; ties go to the earlier row.

    A running (q, k) result is merged with each segment's, so memory is bounded by the output.
    """
    nq = queries.shape[0]
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    rows = np.full((nq, k), -1, dtype=np.int64)
    got_s = got_r = None
    for s in view.segments:
        if eligible is not None:
            lo, hi = np.searchsorted(eligible, [s.first_row, s.first_row + s.rows])
            if lo == hi:
                continue
            mask = np.zeros(s.rows, dtype=bool)
            mask[eligible[lo:hi] - s.first_row] = True
        else:
            mask = view.live_mask(s)
            if mask is not None and not mask.any():
                continue
        ss, ii = kernels.top_k(queries, s.array, min(k, s.rows), metric=view.metric, mask=mask)
        rr = np.where(ii >= 0, ii + s.first_row, -1)
        if got_s is None:
            got_s, got_r = ss, rr
            continue
        # earlier segments hold earlier rows: a stable sort keeps ties in row order
        cat_s = np.concatenate((got_s, ss), axis=1)
        order = np.argsort(-cat_s, axis=1, kind="stable")[:, :k]
        got_s = np.take_along_axis(cat_s, order, axis=1)
        got_r = np.take_along_axis(np.concatenate((got_r, rr), axis=1), order, axis=1)
    if got_s is not None:
        w = min(k, got_s.shape[1])
        scores[:, :w] = got_s[:, :w]
        rows[:, :w] = got_r[:, :w]
    return scores, rows


def _live_block(view: View, s: Segment) -> tuple[np.ndarray, np.ndarray | None]:
    """Live rows of ``s`` (the memmap itself when all are live) and their offsets."""
    assert s.array is not None
    mask = view.live_mask(s)
    if mask is None:
        return s.array, None
    offsets = np.flatnonzero(mask)
    return s.array[offsets], offsets


def pairs(view: View, other: View, threshold: float, *, same: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row numbers (in ``view``, in ``other``) and scores of every pair of live rows with score
    >= ``threshold``; with ``same`` (``other`` is ``view``) each pair once, left the earlier row.

    Sorted by score descending, then left row, then right row. Segments go through
    :func:`embedcache.similar_pairs` two at a time: memory holds two segments and the output.
    """
    metric = view.metric
    lefts: list[np.ndarray] = []
    rights: list[np.ndarray] = []
    scores: list[np.ndarray] = []

    def rows_at(s: Segment, offsets: np.ndarray | None, idx: np.ndarray) -> np.ndarray:
        return (idx if offsets is None else offsets[idx]) + s.first_row

    for a, sa in enumerate(view.segments):
        xa, oa = _live_block(view, sa)
        if not len(xa):
            continue
        if same:
            i, j, s = kernels.similar_pairs(xa, threshold, metric=metric)
            lefts.append(rows_at(sa, oa, i))
            rights.append(rows_at(sa, oa, j))
            scores.append(s)
        for sb in other.segments[a + 1 :] if same else other.segments:
            xb, ob = _live_block(other, sb)
            if not len(xb):
                continue
            i, j, s = kernels.similar_pairs(xa, threshold, y=xb, metric=metric)
            lefts.append(rows_at(sa, oa, i))
            rights.append(rows_at(sb, ob, j))
            scores.append(s)
    if not scores:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    li = np.concatenate(lefts).astype(np.int64, copy=False)
    lj = np.concatenate(rights).astype(np.int64, copy=False)
    sc = np.concatenate(scores).astype(np.float32, copy=False)
    order = np.lexsort((lj, li, -sc))
    return li[order], lj[order], sc[order]
