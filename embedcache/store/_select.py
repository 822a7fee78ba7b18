"""Selections of the best entries for the store index's searches: a buffer's best ``keep``
by (score descending, index ascending), the k-th highest of an array, each compiled.

Both count the values in ``_BUCKETS`` buckets of their range and select exactly within
the one bucket where the wanted rank falls (a selection over thousands of values is a
branch mispredicted for each; a pass that counts or moves every value is not).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from embedcache.kernels._core import _NO_INDEX


#: a full buffer's scores are counted in this many buckets of their range (:func:`_keep_best`)
_BUCKETS = 1024


@njit(cache=True, nogil=True)
def _kth_highest(a, kth):
    """The value at position ``kth`` (from 0) of ``a`` sorted high to low; ``a`` is reordered
    (Hoare's selection: a compiled ``np.partition`` costs seconds to compile, this does not)."""
    lo, hi = 0, len(a) - 1
    while lo < hi:
        pivot = a[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while a[i] > pivot:
                i += 1
            while a[j] < pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if kth <= j:
            hi = j
        elif kth >= i:
            lo = i
        else:
            break
    return a[kth]


@njit(cache=True, nogil=True)
def _keep_best_of(s, i, n, keep):
    """Move the best ``keep`` of ``s[:n], i[:n]`` (score descending, then index ascending; n >
    keep) to the front, in no order; return ``keep`` and the score and index of the worst
    of them. By selection over all ``n``: :func:`_keep_best` for many."""
    th = _kth_highest(s[:n].copy(), keep - 1)
    w = 0
    for u in range(n):  # the higher scores first
        if s[u] > th:
            s[w], s[u] = s[u], s[w]
            i[w], i[u] = i[u], i[w]
            w += 1
    t = w
    for u in range(w, n):  # then the ties, of which the lowest indices are kept
        if s[u] == th:
            s[t], s[u] = s[u], s[t]
            i[t], i[u] = i[u], i[t]
            t += 1
    tie = np.sort(i[w:t])
    need = keep - w
    for u in range(need):  # loops, not slice assignments: their shape checks compile slowly
        i[w + u] = tie[u]
        s[w + u] = th
    return keep, th, tie[need - 1]


@njit(inline="always")
def _bucket(x, lo, scale):
    """The bucket of score ``x`` in a range from ``lo`` (never past ``_BUCKETS``): the same
    for the same score, and never lower for a higher one."""
    return min(np.int64((x - lo) * scale), _BUCKETS)


@njit(cache=True, nogil=True)
def _keep_best(s, i, n, keep):
    """Move the best ``keep`` of ``s[:n], i[:n]`` (score descending, then index ascending; n >
    keep) to the front, in no order; return ``keep`` and the score and index of the worst
    of them. The scores are counted in ``_BUCKETS`` buckets of their range: one pass keeps
    the buckets above the one where the best ``keep`` end and sets that bucket's entries
    aside (writing every entry, advancing by those that stay: no branch to mispredict), and
    the best of those few are chosen by :func:`_keep_best_of`."""
    lo = hi = s[0]
    for u in range(1, n):
        lo = min(lo, s[u])
        hi = max(hi, s[u])
    span = hi - lo
    if not (span > 0 and span < np.inf) or not np.float32(_BUCKETS) / span < np.inf:
        return _keep_best_of(s, i, n, keep)  # one score, or a range with no finite scale
    scale = np.float32(_BUCKETS) / span
    count = np.zeros(_BUCKETS + 1, np.int64)
    for u in range(n):
        count[_bucket(s[u], lo, scale)] += 1
    b, above = _BUCKETS, 0
    while above + count[b] < keep:
        above += count[b]
        b -= 1
    edge = count[b]
    side_s = np.empty(edge + 1, s.dtype)  # one more: where the entries that stay out are written
    side_i = np.empty(edge + 1, i.dtype)
    w = t = 0
    for u in range(n):
        v, j = s[u], i[u]
        x = _bucket(v, lo, scale)
        s[w], i[w] = v, j
        w += x > b
        side_s[t], side_i[t] = v, j
        t += x == b
    need = keep - w
    if edge > need:
        _, th, tj = _keep_best_of(side_s, side_i, edge, need)
    else:  # the whole bucket is kept: its worst is the worst kept
        th, tj = side_s[0], side_i[0]
        for u in range(1, edge):
            if side_s[u] < th or (side_s[u] == th and side_i[u] > tj):
                th, tj = side_s[u], side_i[u]
    for u in range(need):
        s[w + u], i[w + u] = side_s[u], side_i[u]
    return keep, th, tj


@njit(cache=True, nogil=True)
def _kth_of(a, kth):
    """The value at position ``kth`` (from 0) of ``a`` sorted high to low (``a`` unchanged):
    the values counted in ``_BUCKETS`` buckets of their range, then selected among those of
    the bucket that holds it."""
    lo = hi = a[0]
    for u in range(1, a.shape[0]):
        lo = min(lo, a[u])
        hi = max(hi, a[u])
    span = hi - lo
    if not (span > 0 and span < np.inf) or not _BUCKETS / span < np.inf:
        return _kth_highest(a.copy(), kth)
    scale = _BUCKETS / span
    count = np.zeros(_BUCKETS + 1, np.int64)
    for u in range(a.shape[0]):
        count[_bucket(a[u], lo, scale)] += 1
    b, above = _BUCKETS, 0
    while above + count[b] <= kth:
        above += count[b]
        b -= 1
    part = np.empty(count[b], a.dtype)
    t = 0
    for u in range(a.shape[0]):
        if _bucket(a[u], lo, scale) == b:
            part[t] = a[u]
            t += 1
    return _kth_highest(part, kth - above)


@njit(cache=True)
def _buffered_best(bs, bi, fill, keep, out):
    """Each query's best ``keep`` entries over the buffers of every share ((shares, q, width),
    ``fill`` (shares, q) entries each) into ``out`` (q, keep), in index order, then
    ``_NO_INDEX``: the same set whatever the shares (the order is total)."""
    shares, nq, width = bs.shape
    s = np.empty(shares * width, np.float32)
    ix = np.empty(shares * width, np.int64)
    for q in range(nq):
        n = 0
        for t in range(shares):
            for u in range(fill[t, q]):
                s[n] = bs[t, q, u]
                ix[n] = bi[t, q, u]
                n += 1
        if n > keep:
            n, _, _ = _keep_best(s, ix, n, keep)
        kept = np.sort(ix[:n])
        for u in range(out.shape[1]):
            out[q, u] = kept[u] if u < n else _NO_INDEX


