"""The pairs of a partitioned search, gathered in memory bounded by the output.

A search yields its pairs cell by cell, in no useful order. :class:`PairRuns` keeps each run
as a pair key ``min(i, j) * n + max(i, j)`` (int64) and its score (float32); past
``INDEX_SPILL_PAIRS`` pairs held, the runs go to a temporary file (file pages, which the
system may write out and drop, not the process's own memory). At the end the pairs are put
in their final order (score descending, then i, then j) by a bucket sort on the score: the
score range is cut into bands of about ``INDEX_SORT_BAND`` pairs each (a histogram of the
scores' bits, which order as the scores do), every pair is placed in the output at its
band's place, and each band is sorted on its own. The peak is the output (20 bytes a pair:
i, j and the score) plus one band, however many pairs the search finds.
"""

from __future__ import annotations

import tempfile

import numpy as np
from numba import njit

from embedcache import _config
from embedcache.kernels.pairs import descending_bits, key_order

#: finest histogram of the scores: at most this many bins (the bits of a score are shifted
#: right until their range fits), fewer for fewer pairs
_BINS = 1 << 20


@njit(cache=True)
def _scatter(band, key, s, fill, out_key, out_s):
    """Place pair t at ``fill[band[t]]`` of the output (and move that band's fill on)."""
    for t in range(band.shape[0]):
        b = band[t]
        p = fill[b]
        out_key[p] = key[t]
        out_s[p] = s[t]
        fill[b] = p + 1


class PairRuns:
    """Runs of pairs ``(i, j, s)`` of a collection of ``n`` rows, sorted at the end."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self._keys: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._held = 0
        self._files = None  # (keys, scores) temporary files once spilled
        self._lo = np.uint32(0xFFFFFFFF)  # range of the order bits seen
        self._hi = np.uint32(0)

    def __enter__(self) -> PairRuns:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._files is not None:
            for f in self._files:
                f.close()
            self._files = None
        self._keys, self._scores = [], []

    def add(self, i: np.ndarray, j: np.ndarray, s: np.ndarray) -> None:
        if not len(i):
            return
        i = np.asarray(i, np.int64)
        j = np.asarray(j, np.int64)
        key = np.minimum(i, j) * self.n + np.maximum(i, j)
        s = np.asarray(s, np.float32)
        o = descending_bits(s)
        self._lo, self._hi = min(self._lo, o.min()), max(self._hi, o.max())
        self._keys.append(key)
        self._scores.append(s)
        self._held += len(key)
        self.count += len(key)
        if self._held >= _config.INDEX_SPILL_PAIRS:
            self._spill()

    def _spill(self) -> None:
        if self._files is None:
            self._files = (tempfile.TemporaryFile(), tempfile.TemporaryFile())
        for k, s in zip(self._keys, self._scores):
            k.tofile(self._files[0])
            s.tofile(self._files[1])
        self._keys, self._scores, self._held = [], [], 0

    def _chunks(self):
        """The runs again, in the order added, as (keys, scores) chunks of bounded size."""
        if self._files is None:
            yield from zip(self._keys, self._scores)
            return
        self._spill()
        fk, fs = self._files
        for f in self._files:
            f.flush()
        step = max(1, int(_config.INDEX_SORT_BAND))
        for a in range(0, self.count, step):
            m = min(step, self.count - a)
            fk.seek(8 * a)
            fs.seek(4 * a)
            yield np.fromfile(fk, np.int64, m), np.fromfile(fs, np.float32, m)

    def sorted(self, unique: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(i, j, s)``: every pair, sorted by score descending, then i, then j. ``unique``:
        the runs hold each pair once; else a pair found several times (always with the same
        score) is listed once."""
        total = self.count
        if not total:
            e = np.empty(0, np.int64)
            return e, e.copy(), np.empty(0, np.float32)
        step = max(1, int(_config.INDEX_SORT_BAND))
        lo, shift = int(self._lo), 0
        if total <= step:  # one band: no histogram
            band_of_bin = np.zeros(1, np.int64)
        else:
            bins = min(_BINS, max(1 << 16, 256 * (total // step)))
            while (int(self._hi) - lo) >> shift >= bins:
                shift += 1
            nbins = ((int(self._hi) - lo) >> shift) + 1
            hist = np.zeros(nbins, np.int64)
            for _, s in self._chunks():
                hist += np.bincount((descending_bits(s) - np.uint32(lo)) >> np.uint32(shift), minlength=nbins)
            # bands: consecutive bins of about INDEX_SORT_BAND pairs (a bin is never split)
            first = (np.cumsum(hist) - hist) // step
            band_of_bin = np.zeros(nbins, np.int64)
            np.cumsum(first[1:] != first[:-1], out=band_of_bin[1:])
            hist_of = hist
        nb = int(band_of_bin[-1]) + 1
        if nb == 1:
            sizes = np.array([total], np.int64)
        else:
            sizes = np.bincount(band_of_bin, weights=hist_of, minlength=nb).astype(np.int64)
        starts = np.zeros(nb + 1, np.int64)
        np.cumsum(sizes, out=starts[1:])
        out_key = np.empty(total, np.int64)
        out_s = np.empty(total, np.float32)
        fill = starts[:-1].copy()
        for key, s in self._chunks():
            if nb == 1:
                a = int(fill[0])
                out_key[a : a + len(key)] = key
                out_s[a : a + len(key)] = s
                fill[0] += len(key)
                continue
            band = band_of_bin[(descending_bits(s) - np.uint32(lo)) >> np.uint32(shift)]
            _scatter(band, key, s, fill, out_key, out_s)
        self.close()
        kept = 0
        for b in range(nb):
            a, e = starts[b], starts[b + 1]
            k, s = out_key[a:e], out_s[a:e]
            order = key_order(k, s)
            k, s = k[order], s[order]
            del order
            if not unique and len(k) > 1:
                head = np.ones(len(k), bool)
                head[1:] = k[1:] != k[:-1]
                k, s = k[head], s[head]
            out_key[kept : kept + len(k)] = k
            out_s[kept : kept + len(k)] = s
            kept += len(k)
        if kept < total:
            out_key.resize(kept, refcheck=False)
            out_s.resize(kept, refcheck=False)
        # the keys become i in place; j beside them
        j = np.empty(kept, np.int64)
        for a in range(0, kept, step):
            part = out_key[a : a + step]
            np.remainder(part, self.n, out=j[a : a + step])
            np.floor_divide(part, self.n, out=part)
        return out_key, j, out_s
