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


#: values are counted in this many buckets of their range (:func:`_buckets`)
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
    """The bucket of value ``x`` in a range from ``lo``, in 0 .. ``_BUCKETS``: the same for
    the same value, and never lower for a higher one (NaN: some bucket in that range)."""
    return max(min(np.int64((x - lo) * scale), _BUCKETS), 0)


@njit(inline="always")
def _buckets(s, n, rank):
    """``s[:n]`` counted in ``_BUCKETS`` buckets of their range: (lo, scale, count, b,
    above), ``b`` the bucket of the value at position ``rank`` (from 0) of them sorted high
    to low and ``above`` how many lie in higher buckets; ``scale`` 0 where the range has no
    finite scale (one value, or infinities: the caller then selects over them all)."""
    lo = hi = s[0]
    for u in range(1, n):
        lo = min(lo, s[u])
        hi = max(hi, s[u])
    span = np.float64(hi) - np.float64(lo)
    count = np.zeros(_BUCKETS + 1, np.int64)
    if not (span > 0 and span < np.inf and _BUCKETS / span < np.inf):
        return lo, 0.0, count, -1, 0
    scale = _BUCKETS / span
    for u in range(n):
        count[_bucket(s[u], lo, scale)] += 1
    b, above = _BUCKETS, 0
    while above + count[b] <= rank:
        above += count[b]
        b -= 1
    return lo, scale, count, b, above


@njit(cache=True, nogil=True)
def _keep_best(s, i, n, keep):
    """Move the best ``keep`` of ``s[:n], i[:n]`` (score descending, then index ascending; n
    >= 1) to the front, in no order; return how many were kept (``keep``, or ``n`` when no
    more) and the score and index of the worst of them. One pass over the scores' buckets
    (:func:`_buckets`) keeps those above the bucket where the best ``keep`` end and sets
    that bucket's entries aside (writing every entry, advancing by those that stay: no
    branch to mispredict); the best of those few are chosen by :func:`_keep_best_of`."""
    if n <= keep:  # all of them
        th, tj = s[0], i[0]
        for u in range(1, n):
            if s[u] < th or (s[u] == th and i[u] > tj):
                th, tj = s[u], i[u]
        return n, th, tj
    lo, scale, count, b, _ = _buckets(s, n, keep - 1)
    if scale == 0:
        return _keep_best_of(s, i, n, keep)
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
    selected among the values of the bucket that holds it (:func:`_buckets`)."""
    lo, scale, count, b, above = _buckets(a, a.shape[0], kth)
    if scale == 0:
        return _kth_highest(a.copy(), kth)
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


