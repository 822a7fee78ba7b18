"""Compiled merge of per-cell top-k lists into one running list per query row."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

NO_INDEX = np.iinfo(np.int64).max  # empty slot: sorts after every real index


@njit(parallel=True, cache=True)
def merge_topk(heap_s, heap_i, rows, cand_s, cand_i, self_ids, use_self):
    """Fold the candidates ``(cand_s[t], cand_i[t])`` into the sorted lists of ``rows[t]``.

    Lists are ordered by score descending, ties by the lower index; ``rows`` are distinct, so
    each thread writes its own rows. Candidates with index < 0 (none) or equal to
    ``self_ids[t]`` (when ``use_self``) are skipped.
    """
    k = heap_s.shape[1]
    for t in prange(rows.shape[0]):
        r = rows[t]
        for u in range(cand_s.shape[1]):
            ci = cand_i[t, u]
            if ci < 0 or (use_self and ci == self_ids[t]):
                continue
            cs = cand_s[t, u]
            ls = heap_s[r, k - 1]
            if cs < ls or (cs == ls and ci >= heap_i[r, k - 1]):
                continue
            pos = k - 1
            while pos > 0 and (heap_s[r, pos - 1] < cs or (heap_s[r, pos - 1] == cs and heap_i[r, pos - 1] > ci)):
                heap_s[r, pos] = heap_s[r, pos - 1]
                heap_i[r, pos] = heap_i[r, pos - 1]
                pos -= 1
            heap_s[r, pos] = cs
            heap_i[r, pos] = ci


@njit(cache=True)
def _cell_counts(near, own, ncells, mode):
    """Entries per cell of the (n, p) lists ``near`` (-1: none); ``mode`` 1 leaves out each
    row's own cell ``own[r]``, 2 adds it where missing, 0 takes ``near`` as it is."""
    starts = np.zeros(ncells + 1, np.int64)
    for r in range(near.shape[0]):
        has = False
        for t in range(near.shape[1]):
            c = near[r, t]
            if c < 0:
                continue
            if mode != 0 and c == own[r]:
                has = True
                if mode == 1:
                    continue
            starts[c + 1] += 1
        if mode == 2 and not has:
            starts[own[r] + 1] += 1
    for c in range(ncells):
        starts[c + 1] += starts[c]
    return starts


@njit(cache=True)
def _cell_fill(near, own, mode, starts, rows):
    fill = starts[:-1].copy()
    for r in range(near.shape[0]):
        has = False
        for t in range(near.shape[1]):
            c = near[r, t]
            if c < 0:
                continue
            if mode != 0 and c == own[r]:
                has = True
                if mode == 1:
                    continue
            rows[fill[c]] = r
            fill[c] += 1
        if mode == 2 and not has:
            c = own[r]
            rows[fill[c]] = r
            fill[c] += 1


def by_cell(near: np.ndarray, ncells: int, own: np.ndarray | None = None, mode: int = 0):
    """(rows, starts): the rows whose list ``near`` ((n, p) ints, -1: none) holds cell c are
    ``rows[starts[c]:starts[c + 1]]``, in increasing order; a counting sort, in memory of one
    int32 (int64 past 2**31 rows) per entry. ``own`` (n,): each row's own cell, left out
    (``mode`` 1) or added where missing (``mode`` 2)."""
    near = np.ascontiguousarray(near)
    if own is None:
        own, mode = np.zeros(1, np.int64), 0
    starts = _cell_counts(near, own, ncells, mode)
    rows = np.empty(int(starts[-1]), np.int32 if len(near) < 2**31 else np.int64)
    _cell_fill(near, own, mode, starts, rows)
    return rows, starts
