"""The greedy (first-seen) rule without the list of every pair.

Items are visited in keep order, a block of rows at a time. An item is removed when it scores
at or above the threshold with an item already kept, so a block only needs its pairs with the
rows kept before it (one :func:`~embedcache.similar_pairs` call against the kept rows) and the
pairs within itself; the block is then resolved item by item in a compiled loop. Pairs with
rows already removed are never listed, so a cluster of thousands of near-identical rows costs
one pair per row (each with the one item kept for the cluster), not one per pair of rows.
The answer is the one :func:`embedcache.workflows.dedup._greedy` gives from every pair.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from embedcache import _config, kernels


@njit(cache=True)
def _resolve(items, rows, pos, indptr, cand_rows, cand_s, copy_score, kept_of_row, owner):
    """Visit ``items`` in order (item t of distinct row ``rows[t]``, block row ``pos[t]``);
    its candidates are the rows ``cand_rows[indptr[p]:indptr[p + 1]]`` (scores ``cand_s``)
    and its own row (``copy_score``). An item scoring with some kept item is removed as a
    duplicate of the best (highest score, then lowest item); else it is its row's kept item."""
    for t in range(items.shape[0]):
        v, r, p = items[t], rows[t], pos[t]
        best, best_s = -1, -np.inf
        for k in range(indptr[p], indptr[p + 1]):
            kv = kept_of_row[cand_rows[k]]
            if kv >= 0:
                s = cand_s[k]
                if s > best_s or (s == best_s and kv < best):
                    best, best_s = kv, s
        kv = kept_of_row[r]
        if kv >= 0 and not np.isnan(copy_score[r]):
            s = copy_score[r]
            if s > best_s or (s == best_s and kv < best):
                best, best_s = kv, s
        if best >= 0:
            owner[v] = best
        else:
            kept_of_row[r] = v


def greedy_owner(x: np.ndarray, inverse: np.ndarray, copy_score: np.ndarray, order: np.ndarray,
                 threshold: float) -> np.ndarray:
    """For every item (``order``: the visiting order), the item it is a duplicate of, or -1
    when kept. x: (u, d) distinct rows; inverse: (n,) item -> row."""
    n, (u, d) = len(inverse), x.shape
    owner = np.full(n, -1, np.int64)
    kept_of_row = np.full(u, -1, np.int64)
    kept_x = np.empty((u, d), np.float32)  # the rows kept so far, in the order they were kept
    kept_rows = np.empty(u, np.int64)
    nk = 0
    step = _config.CHUNK_ROWS
    for a in range(0, n, step):
        items = order[a:a + step]
        rows = inverse[items]
        urows, pos = np.unique(rows, return_inverse=True)
        xb = x[urows]
        # pairs with the rows kept before the block, and within the block (both ways)
        qi, kj, ks = kernels.similar_pairs(xb, threshold, y=kept_x[:nk])
        kj = kept_rows[kj]
        other = kj != urows[qi]
        bi, bj, bs = kernels.similar_pairs(xb, threshold)
        src = np.concatenate([qi[other], bi, bj])
        dst = np.concatenate([kj[other], urows[bj], urows[bi]])
        sc = np.concatenate([ks[other], bs, bs])
        by = np.argsort(src, kind="stable")
        indptr = np.zeros(len(urows) + 1, np.int64)
        np.cumsum(np.bincount(src, minlength=len(urows)), out=indptr[1:])
        before = kept_of_row[urows] >= 0
        _resolve(items.astype(np.int64), rows.astype(np.int64), pos.astype(np.int64), indptr,
                 dst[by].astype(np.int64), sc[by].astype(np.float32), copy_score, kept_of_row, owner)
        new = urows[(kept_of_row[urows] >= 0) & ~before]
        kept_x[nk:nk + len(new)] = x[new]
        kept_rows[nk:nk + len(new)] = new
        nk += len(new)
    return owner
