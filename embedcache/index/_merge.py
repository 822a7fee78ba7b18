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
