"""Recall: how many probes reach the recall asked for, and the recall measured, with a 95% interval.

What is estimated: the share of all true pairs (or true neighbour slots) of the collection the
search finds. Every row's true pairs are counted from that row, so this is
``sum_i found_i / sum_i true_i`` over all rows, estimated on a uniform sample of rows by the
same ratio over the sampled rows (a ratio estimator).

Query rows are drawn in independent samples (:class:`Design`). For pairs, a few rows
(near-identical blocks) may hold most of the true pairs: a uniform sample of 1000 rows of
3M holds about three of them, and the choice rested on that luck (1 probe chosen for 0.99,
0.88 reached). So half the rows are drawn uniformly and half by the density of their cell
(:func:`cell_density`: the share of pairs at the threshold between a few rows of each cell
and of its nearest cells; 1M rows: 120 stray rows of a block, in small cells beside its two
big ones, held most of the misses, and a density of a cell's own rows never drew them),
each weighted by the inverse of its probability (the ratio is then a weighted ratio, and
the residuals below weighted too). kNN rows all have ``k`` true neighbours: uniform samples.
With ``INDEX_RECALL_COLUMNS`` set, the
true pairs of a sampled row are searched among a uniform sample of that many rows (two-stage
sampling: the same ratio, and the row-residual variance below covers both stages), so the
exact search of the pair calibration costs the same at any size, at the price of evidence. On the first (calibration) the exact answer
of every sampled row is computed with the exact kernels, and for each of its true pairs (or
true neighbours) the number of probes that would find it (rows with more than
``INDEX_RECALL_PAIRS_PER_ROW`` pairs: a uniform subsample of them, weighted back). The
smallest number of probes whose one-sided lower bound at ``INDEX_RECALL_CHOOSE_LEVEL``
(default 0.9: the low end of an 80% interval) reaches the target is chosen: the point
estimate alone reaches the target on a lucky sample and then misses it about half the
time. On a second (check) sample the recall of that choice is measured the same way; where
the check's lower bound at the same level misses the target, the probes are chosen again on
all the evidence (one step more at least) and checked on a fresh sample
(``INDEX_RECALL_ROUNDS``). The reported figure is measured on a third sample that took no
part in any choice or check: a figure reported from the check that passed would be
conditioned on passing, and biased upward.

What is chosen: a number of probes, or for pairs a score gap (:class:`ScoreGap`; a row probes
the cells of its first ``INDEX_GAP_PROBES`` whose centroid scores within the gap of its best,
:func:`._partition.within_gap`). A pair's need is then a gap: the smaller of the two rows'
gaps to the other's cell (inf when neither lists it), and the choice is the smallest gap at
which the lower bound reaches the target, by the same design and rounds; when no gap within
those cells reaches it, a number of probes is chosen instead.

The interval: the pairs of one row are not independent, and in real collections a few rows
(near-identical blocks, one giant cluster) carry most of the pairs, so a sample of rows holds
few effective units. The variance of the ratio is the linearized (row residual) estimate;
the design effect it implies against a binomial turns it into an effective number of pairs for
a Wilson score interval, and the quantile is Student's t with the Welch-Satterthwaite
effective degrees of freedom of that variance, ``(sum e_i^2)^2 / sum e_i^4`` over the
residuals ``e_i``: when the misses come from a handful of rows the variance itself is
uncertain and the interval widens. When every sampled pair was found (or none), the design
effect cannot be estimated from misses; the effective number of rows is then Kish's
``(sum t_i)^2 / sum t_i^2`` over the rows' true pairs ``t_i``: a sample whose pairs sit in a
few rows (near-identical blocks) counts as a few units, not as every row that had a pair
(which let a sample without a split block choose one probe where 0.88 was reached).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from embedcache import _config, kernels
from embedcache.index import _truth
from embedcache.index._source import source_of

_Z = 1.959963984540054  # two-sided 95%


@dataclass(frozen=True)
class Recall:
    """A recall measured on sampled queries against the exact answer.

    estimate: the share of true pairs (or true neighbours) found, on the measurement sample
    (NaN when the sample held none). low, high: its 95% confidence interval. probes: cells
    probed per row (with ``gap``: at most). sample: query rows in the measurement sample.
    gap: when cells are probed by score gap (:func:`embedcache.index._partition.within_gap`),
    the gap chosen: a row probes, besides its own cell, each of its first ``probes`` cells
    whose centroid scores at least its best centroid's score less ``gap`` (None: a fixed
    number of probes). mean_probes: cells searched per row on average, its own included
    (None until the search ran, and for a fixed number).
    """

    estimate: float
    low: float
    high: float
    probes: int
    sample: int
    gap: float | None = None
    mean_probes: float | None = None

    def __str__(self) -> str:
        if self.gap is None:
            how = f"{self.probes} probes"
        else:
            mean = "" if self.mean_probes is None else f"{self.mean_probes:.2f} probes per row, "
            how = f"score gap {self.gap:.4f}: {mean}at most {self.probes}"
        return (f"recall {self.estimate:.4f} (95% CI {self.low:.4f}-{self.high:.4f}; "
                f"{how}, {self.sample} sampled rows)")


def wilson(found: float, total: float, z: float = _Z) -> tuple[float, float]:
    """Wilson score interval of a proportion ``found / total`` (``total`` may be fractional);
    ``z``: the quantile (default: two-sided 95%)."""
    if total <= 0:
        return 0.0, 1.0
    p = min(1.0, max(0.0, found / total))
    z2 = z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def _quantile(level: float, df: float | None) -> float:
    """Upper ``level`` quantile of Student's t with ``df`` degrees of freedom (normal: None)."""
    from scipy import special

    if df is None:
        return float(special.ndtri(level))
    return float(special.stdtrit(max(1.0, df), level))


def interval(found: np.ndarray, true: np.ndarray, level: float = 0.95,
             weight: np.ndarray | None = None) -> tuple[float, float, float]:
    """(estimate, low, high) of ``sum(w found) / sum(w true)`` over sampled rows; ``level``:
    the two-sided confidence; ``weight``: each sampled row's inverse probability of being
    drawn (default: all equal, a uniform sample). See the module's docstring for the method."""
    found = np.asarray(found, np.float64)
    true = np.asarray(true, np.float64)
    w = np.ones(len(true)) if weight is None else np.asarray(weight, np.float64)
    live = true > 0
    rows = int(live.sum())
    total = float(true.sum())
    if total <= 0:
        return math.nan, 0.0, 1.0
    wt = w[live] * true[live]
    r = float((w[live] * found[live]).sum()) / float(wt.sum())
    q = 1.0 - (1.0 - level) / 2
    if 0.0 < r < 1.0 and rows > 1:
        resid2 = (w[live] * (found[live] - r * true[live])) ** 2
        var_ratio = rows / (rows - 1) * float(resid2.sum()) / float(wt.sum()) ** 2
        n_eff = min(total, r * (1 - r) / var_ratio) if var_ratio > 0 else total
        quad = float((resid2**2).sum())
        z = _quantile(q, float(resid2.sum()) ** 2 / quad if quad > 0 else None)
    else:  # no miss (or nothing found): the rows' pairs as Kish's effective count of units
        n_eff = float(wt.sum()) ** 2 / float((wt**2).sum()) if rows else 0.0
        z = _quantile(q, None)
    low, high = wilson(r * n_eff, n_eff, z)
    return r, min(low, r), max(high, r)


@dataclass
class Evidence:
    """For sampled rows: how many true pairs each has, and at how many probes each sampled
    true pair is found (``need[k]`` probes for pair k of row ``row[k]``, weighted ``weight[k]``).
    ``row_weight``: each sampled row's inverse probability of being drawn (None: all equal)."""

    true: np.ndarray  # (rows,) float64
    row: np.ndarray  # (pairs,) int64 position in the sample
    need: np.ndarray  # (pairs,) int64: found with >= need probes (0: always)
    weight: np.ndarray  # (pairs,) float64
    partner: np.ndarray | None = None  # (pairs,) int64: the other row of each pair
    row_weight: np.ndarray | None = None  # (rows,) float64

    def _rw(self) -> np.ndarray:
        return np.ones(len(self.true)) if self.row_weight is None else self.row_weight

    def found(self, probes: int) -> np.ndarray:
        hit = (self.need <= probes) & np.isfinite(self.need)  # inf: never found
        return np.bincount(self.row[hit], weights=self.weight[hit], minlength=len(self.true))

    def recall(self, probes: int) -> float:
        total = (self._rw() * self.true).sum()
        return float((self._rw() * self.found(probes)).sum() / total) if total > 0 else math.nan

    def interval(self, probes: int, level: float = 0.95) -> tuple[float, float, float]:
        """(estimate, low, high) at ``probes`` (:func:`interval`)."""
        return interval(self.found(probes), self.true, level, self.row_weight)

    def smallest(self, target: float, cells: int, level: float = 0.5) -> int:
        """The fewest probes (``cells`` at most) whose recall reaches ``target``: the point
        estimate for ``level`` 0.5, else the one-sided lower bound at ``level``."""
        rw = self._rw()
        total = (rw * self.true).sum()
        if total <= 0:
            return cells
        order = np.argsort(self.need, kind="stable")
        need = self.need[order]
        cum = np.cumsum(self.weight[order] * rw[self.row[order]]) / total
        reach = np.flatnonzero(cum >= target - 1e-12)
        if not len(reach):
            return cells
        first = int(min(cells, max(1, need[reach[0]])))
        if level <= 0.5:
            return first
        # the lower bound grows with the probes (more found): step through the probe counts
        # at which something more is found, from the point estimate's choice on
        steps = np.unique(need[need > first])
        for p in np.concatenate([[first], steps[steps < cells]]):
            if self.interval(int(p), 2 * level - 1)[1] >= target - 1e-12:
                return int(p)
        return cells

    def smallest_gap(self, target: float, level: float = 0.5) -> float:
        """The smallest score gap (``need`` holding gaps, inf: not found at any gap) whose
        recall reaches ``target``: the point estimate for ``level`` 0.5, else the one-sided
        lower bound at ``level`` (inf when no gap reaches it). The bound grows with the gap
        (more found): the first gap at which it reaches the target is found by bisection
        over the gaps at which something more is found."""
        rw = self._rw()
        total = (rw * self.true).sum()
        if total <= 0:
            return math.inf
        order = np.argsort(self.need, kind="stable")
        need = self.need[order]
        cum = np.cumsum(self.weight[order] * rw[self.row[order]]) / total
        reach = np.flatnonzero((cum >= target - 1e-12) & np.isfinite(need))
        if not len(reach):
            return math.inf
        first = max(0.0, float(need[reach[0]]))
        if level <= 0.5:
            return first
        steps = np.unique(need[(need > first) & np.isfinite(need)])
        steps = np.concatenate([[first], steps])

        def ok(t: int) -> bool:
            return self.interval(float(steps[t]), 2 * level - 1)[1] >= target - 1e-12

        if not ok(len(steps) - 1):
            return math.inf
        lo, hi = -1, len(steps) - 1  # ok(hi), not ok(lo)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        return float(steps[hi])

    def next_gap(self, gap: float) -> float:
        """The next gap above ``gap`` at which something more is found (inf when none)."""
        more = self.need[(self.need > gap) & np.isfinite(self.need)]
        return float(more.min()) if len(more) else math.inf

    def next_step(self, probes: int, cells: int) -> int:
        """The next probe count above ``probes`` at which something more is found (``cells``
        when none)."""
        more = self.need[(self.need > probes) & (self.need < cells)]
        return int(more.min()) if len(more) else cells

    @staticmethod
    def concat(parts: list[Evidence]) -> Evidence:
        """The evidence of several samples as one (rows of each part after the previous)."""
        shift = np.cumsum([0] + [len(e.true) for e in parts[:-1]])
        return Evidence(
            np.concatenate([e.true for e in parts]),
            np.concatenate([e.row + s for e, s in zip(parts, shift)]),
            np.concatenate([e.need for e in parts]),
            np.concatenate([e.weight for e in parts]),
            None,
            np.concatenate([e._rw() for e in parts]),
        )


def _rank(scores: np.ndarray, rows: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Position of ``cells[k]`` in the ordering of row ``rows[k]`` of ``scores`` (score
    descending, ties to the lower cell): the probes needed to reach it is this + 1."""
    out = np.empty(len(rows), np.int64)
    step = max(1, (1 << 22) // max(1, scores.shape[1]))
    idx = np.arange(scores.shape[1])
    for a in range(0, len(rows), step):
        r, c = rows[a : a + step], cells[a : a + step]
        s = scores[r]
        v = s[np.arange(len(r)), c][:, None]
        out[a : a + step] = ((s > v) | ((s == v) & (idx[None, :] < c[:, None]))).sum(axis=1)
    return out


def _subsample(qi: np.ndarray, rows: int, cap: int, rng: np.random.Generator):
    """Keep at most ``cap`` entries per sampled row; (kept positions, weight of each, true counts)."""
    true = np.bincount(qi, minlength=rows).astype(np.float64)
    order = rng.permutation(len(qi))
    order = order[np.argsort(qi[order], kind="stable")]
    start = np.concatenate([[0], np.cumsum(true.astype(np.int64))[:-1]])
    rank = np.arange(len(order)) - start[qi[order]]
    kept = order[rank < cap]
    weight = true[qi[kept]] / np.minimum(true[qi[kept]], cap)
    return kept, weight, true


class SampledPairs:
    """The exact pairs (score >= ``threshold``) of sampled rows of ``x`` with all its rows,
    kept by row: the rows of several samples (a calibration's and its first measurement's)
    are searched in one pass over ``x`` (:meth:`prefetch`), and a row drawn twice once.
    With ``index`` (a :class:`PartitionIndex` of ``x``), only the bands of its cells that can
    hold a pair of a sampled row are read (:mod:`._truth`: the same pairs, bit for bit)."""

    def __init__(self, x, threshold: float, index=None) -> None:
        self.x = source_of(x)
        self.threshold = threshold
        self.index = index
        self.keys = np.empty(0, np.int64)  # rows searched, sorted
        self.starts = np.zeros(1, np.int64)  # partners of keys[k]: part[starts[k]:starts[k + 1]]
        self.part = np.empty(0, np.int64)

    def prefetch(self, rows: np.ndarray) -> None:
        """Search the rows not searched yet, in one pass."""
        new = np.setdiff1d(np.asarray(rows, np.int64), self.keys)
        if not len(new):
            return
        if _truth.prunes(self.x, self.index, self.threshold):
            qi, jj, _ = _truth.sampled_pairs(self.x, self.index, self.x[new], self.threshold)
        else:
            qi, jj, _ = self.x.pairs_with(self.x[new], self.threshold)
        ok = jj != new[qi]
        qi, jj = qi[ok], jj[ok]
        rows_all = np.concatenate([np.repeat(self.keys, np.diff(self.starts)), new[qi]])
        part_all = np.concatenate([self.part, jj.astype(np.int64)])
        order = np.lexsort((part_all, rows_all))
        self.keys = np.union1d(self.keys, new)
        counts = np.bincount(np.searchsorted(self.keys, rows_all[order]), minlength=len(self.keys))
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.part = part_all[order]

    def __call__(self, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in ``sample``, partner row) of every true pair of the sampled rows (the
        row itself left out), by position then partner."""
        self.prefetch(sample)
        k = np.searchsorted(self.keys, sample)
        counts = self.starts[k + 1] - self.starts[k]
        qi = np.repeat(np.arange(len(sample)), counts)
        first = np.repeat(self.starts[k] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return qi, self.part[first + np.arange(len(qi))]


def pair_evidence(x, index, sample: np.ndarray, threshold: float, rng: np.random.Generator,
                  nearest: bool = False, gap_probes: int | None = None,
                  truth: SampledPairs | None = None) -> Evidence:
    """Evidence for :func:`embedcache.index._partition.pairs`: a true pair (i, j) is found
    when i and j share a cell, or when either probes the other's cell. ``x``: an array or a
    source of rows (:mod:`._source`).

    ``nearest``: use each sampled row's nearest other row as its one "true pair" instead (a
    stand-in when the threshold leaves too few pairs to calibrate on). ``gap_probes``: the
    needs are score gaps (float, :meth:`PartitionIndex.gaps_needed`: the pair is found at
    any gap at least ``min(gap of j's cell for i, gap of i's cell for j)``, -1 in one cell,
    inf when neither lists the other's cell in its first ``gap_probes``) instead of counts
    of probes. ``truth``: where the sampled rows' exact pairs are kept (:class:`SampledPairs`,
    with the same ``x`` and ``threshold``; default: searched here).
    """
    x = source_of(x)
    q = x[sample]
    if nearest:
        s, j = x.top_k(q, min(2, len(x)))
        pick = np.where(j[:, 0] == sample, 1, 0) if j.shape[1] > 1 else np.zeros(len(q), np.int64)
        qi = np.arange(len(q))
        jj = j[qi, pick]
        ok = (jj >= 0) & (jj != sample)
        qi, jj = qi[ok], jj[ok]
    else:
        cols = partner_sample(x, rng)
        if cols is None and truth is not None:
            qi, jj = truth(sample)
        else:
            qi, jj, _ = x.pairs_with(q, threshold) if cols is None else x.pairs_with(q, threshold, cols)
            ok = jj != sample[qi]
            qi, jj = qi[ok], jj[ok]
    kept, weight, true = _subsample(qi, len(sample), _config.INDEX_RECALL_PAIRS_PER_ROW, rng)
    qi, jj = qi[kept], jj[kept]
    i = sample[qi]
    if gap_probes is None:
        need = _needed_both_ways(x, index, q, sample, qi, jj)
    else:
        partners, pos = np.unique(jj, return_inverse=True)
        need = np.minimum(index.gaps_needed(q, qi, index.own[jj], gap_probes, index.own[sample]),
                          index.gaps_needed(x[partners], pos.reshape(-1), index.own[i], gap_probes,
                                            index.own[partners]))
        need[index.own[i] == index.own[jj]] = -1.0
    return Evidence(true, qi.astype(np.int64), need, weight, jj.astype(np.int64))


def _needed_both_ways(x, index, q: np.ndarray, sample: np.ndarray, qi: np.ndarray, jj: np.ndarray) -> np.ndarray:
    """For each (sampled row ``sample[qi[k]]``, row ``jj[k]``): the fewest probes with which
    either probes the other's cell (:meth:`PartitionIndex.probes_needed`; 0 when they share
    a cell). ``q``: the sampled rows' vectors."""
    i = sample[qi]
    partners, pos = np.unique(jj, return_inverse=True)
    need = np.minimum(index.probes_needed(q, qi, index.own[jj]),
                      index.probes_needed(x[partners], pos.reshape(-1), index.own[i]))
    need[index.own[i] == index.own[jj]] = 0
    return need


def partner_sample(x, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted rows among which the sampled rows' true pairs are searched: all (None) unless
    ``INDEX_RECALL_COLUMNS`` is set and exceeded, else a uniform sample of that many (sources that can
    search a subset of rows only, as an array). Each row's pairs are then a uniform sample
    of its true pairs: the ratio found / true and its row-residual interval (which takes in
    the variance of this second stage of sampling) stay what they estimate."""
    m = int(_config.INDEX_RECALL_COLUMNS)
    if m <= 0 or len(x) <= m or not _takes_cols(x):
        return None
    return np.sort(rng.choice(len(x), m, replace=False))


def _takes_cols(x) -> bool:
    import inspect

    return "cols" in inspect.signature(x.pairs_with).parameters


class SampledNeighbours:
    """The exact top ``k + 1`` rows of sampled rows of ``x`` (:func:`embedcache.top_k`: the
    same lists however the rows are batched), kept by row: the rows of several samples (a
    calibration's, its first check's and the report's) are searched in one pass over ``x``
    (:meth:`prefetch`), and a row drawn twice once."""

    def __init__(self, x, k: int) -> None:
        self.x = source_of(x)
        self.k = min(k + 1, len(self.x))
        self.keys = np.empty(0, np.int64)
        self.lists = np.empty((0, self.k), np.int64)

    def prefetch(self, rows: np.ndarray) -> None:
        """Search the rows not searched yet, in one pass."""
        new = np.setdiff1d(np.asarray(rows, np.int64), self.keys)
        if not len(new):
            return
        _, nb = self.x.top_k(self.x[new], self.k)
        keys = np.concatenate([self.keys, new])
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.lists = np.concatenate([self.lists, np.asarray(nb, np.int64)])[order]

    def __call__(self, sample: np.ndarray) -> np.ndarray:
        """(len(sample), k + 1) the top lists of the sampled rows."""
        self.prefetch(sample)
        return self.lists[np.searchsorted(self.keys, sample)]


def knn_evidence(x, index, sample: np.ndarray, k: int, rng: np.random.Generator,
                 truth: SampledNeighbours | None = None) -> Evidence:
    """Evidence for a k-nearest-neighbour search of the sampled rows (own cell always probed,
    each product serving both rows, :func:`._knn.rows_knn`): a true neighbour j of i is found
    when it shares i's cell, when i probes j's cell, or when j probes i's cell. ``truth``:
    where the sampled rows' exact top lists are kept (:class:`SampledNeighbours` of the same
    ``x`` and ``k``; default: searched here)."""
    x = source_of(x)
    q = x[sample]
    nb = truth(sample) if truth is not None else x.top_k(q, min(k + 1, len(x)))[1]
    qi, jj = other_neighbours(nb, sample, k)
    true = np.bincount(qi, minlength=len(q)).astype(np.float64)
    need = _needed_both_ways(x, index, q, sample, qi, jj)
    return Evidence(true, qi.astype(np.int64), need, np.ones(len(qi)), jj.astype(np.int64))


def other_neighbours(nb: np.ndarray, self_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From the top-(k + 1) lists ``nb`` (q, k + 1) of queries that are rows ``self_ids``:
    (query position, neighbour) of the first ``k`` neighbours other than the row itself (the
    last one dropped where the row was not listed); empty slots (-1) left out."""
    own_hit = nb == self_ids[:, None]
    drop = np.where(own_hit.any(axis=1), own_hit.argmax(axis=1), nb.shape[1] - 1)
    keep = np.ones(nb.shape, bool)
    keep[np.arange(len(nb)), drop] = False
    nb = nb[keep].reshape(len(nb), -1)[:, :k]
    qi = np.repeat(np.arange(len(nb)), nb.shape[1])
    jj = nb.ravel()
    ok = jj >= 0
    return qi[ok], jj[ok]


def cell_density(x, index, threshold: float, rng: np.random.Generator) -> np.ndarray:
    """(cells,) float64: about how many true pairs (score >= ``threshold``) a row of each cell
    has in its own cell and its ``INDEX_RECALL_CELL_NEIGHBOURS`` - 1 nearest cells (by
    centroid), from ``INDEX_RECALL_CELL_ROWS`` rows drawn per cell: the share of pairs at or
    above the threshold between the drawn rows of the two cells, times the other cell's
    rows. Near-identical blocks stand out, and so do the small cells beside a block's big
    ones (a few of its rows that went elsewhere: each has thousands of pairs, most of them
    missed, and a density of its own cell alone calls them empty). The rows read are a few
    per cell, in row order."""
    x = source_of(x)
    r = max(2, int(_config.INDEX_RECALL_CELL_ROWS))
    cells = index.cells
    sizes = index.sizes
    take = np.minimum(sizes, r)
    # r distinct rows of each cell: the first r of a random order of the cell's rows
    key = rng.random(len(index.order))
    pos = np.lexsort((key, np.repeat(np.arange(cells), sizes)))
    rank = np.arange(len(pos)) - np.repeat(index.offsets[:-1], sizes)
    rows = index.order[pos[rank < np.repeat(take, sizes)]]
    del key, pos, rank
    srt = np.argsort(rows, kind="stable")
    v = np.empty((len(rows), x.shape[1]), np.float32)
    v[srt] = np.asarray(x[rows[srt]], np.float32)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-30)
    # padded (cells, r, d) with a mask of the rows drawn
    slot = np.arange(r)
    have = slot[None, :] < take[:, None]
    pad = np.zeros((cells, r, x.shape[1]), np.float32)
    pad[have] = v
    del v
    nb = min(cells, max(1, int(_config.INDEX_RECALL_CELL_NEIGHBOURS)))
    near = kernels.top_k(index.centroids, index.centroids, nb)[1]
    near = np.where(near < 0, np.arange(cells)[:, None], near)
    out = np.zeros(cells)
    eye = np.eye(r, dtype=bool)
    for a in range(0, cells, 256):
        c = np.arange(a, min(cells, a + 256))
        nc = near[c]  # (b, nb)
        g = np.einsum("brd,bksd->brks", pad[c], pad[nc]) >= threshold  # (b, r, nb, r)
        valid = have[c][:, :, None, None] & have[nc][:, None, :, :]
        same = nc == c[:, None]  # a cell against itself: its pairs of distinct rows
        valid &= ~(same[:, None, :, None] & eye[None, :, None, :])
        hits = (g & valid).sum(axis=(1, 3))
        tried = valid.sum(axis=(1, 3))
        share = np.divide(hits, tried, out=np.zeros(hits.shape), where=tried > 0)
        others = sizes[nc] - same  # rows of the other cell a row can pair with
        out[c] = (share * np.maximum(others, 0)).sum(axis=1)
    return out


class Design:
    """How the calibration's query rows are drawn.

    Without a density or border rows (kNN: every row has ``k`` true neighbours): uniform
    samples without replacement, disjoint from each other. With ``density`` (per cell,
    :func:`cell_density`) for pairs, where a few rows (near-identical blocks) may hold most of
    a collection's true pairs, and ``border`` ((n,) bool, :func:`border_rows`: rows near a
    cell border, where a search by score gap misses the near-duplicates that straddle two
    cells): each row is drawn with replacement from a mixture, ``INDEX_RECALL_UNIFORM`` of
    the draws uniform over the rows, ``INDEX_RECALL_BORDER`` uniform over the border rows,
    the rest over cells in proportion to their rows' density then uniform within the cell
    (a missing component's share goes to the density, then to the uniform draws), and
    weighted by the inverse of its probability per draw (the deterministic-mixture
    estimator: unbiased, and no row weighs more than 1 / the uniform share times what it
    would in a uniform sample). A uniform sample of 1000 rows of 3M holds about 3 rows of
    blocks that hold half the pairs: the probes were chosen on them, or without them. The
    border stratum (off unless ``INDEX_RECALL_BORDER`` is set) is for collections whose
    misses sit near cell borders; ``bench_index.py --miss-rows`` shows where they sit."""

    def __init__(self, n: int, index=None, density: np.ndarray | None = None,
                 border: np.ndarray | None = None) -> None:
        self.n = n
        self.size = min(_config.INDEX_RECALL_SAMPLE, n // 3)  # a choice, a check, a report
        self.index = index
        self.mass = None
        self.density = None
        if density is not None and index is not None and n > 0:
            mass = np.asarray(density, np.float64) * index.sizes
            if mass.sum() > 0:
                self.mass = mass / mass.sum()
                self.density = np.asarray(density, np.float64) / float(mass.sum())
        self.border = None
        if border is not None and np.any(border):
            self.border = np.flatnonzero(border)
        self.mixture = self.mass is not None or self.border is not None
        self._perm = None
        self._used = 0

    def counts(self) -> tuple[int, int, int]:
        """(uniform, density, border) draws of a mixture sample of ``INDEX_RECALL_SAMPLE``
        rows: the shares asked for, rounded to whole draws."""
        m = max(1, int(_config.INDEX_RECALL_SAMPLE))
        u = min(1.0, max(0.0, float(_config.INDEX_RECALL_UNIFORM)))
        b = min(1.0 - u, max(0.0, float(_config.INDEX_RECALL_BORDER))) if self.border is not None else 0.0
        d = 1.0 - u - b if self.mass is not None else 0.0
        mb = int(round(b * m))
        md = int(round(d * m)) if d > 0 else 0
        return m - mb - md, md, mb

    def probability(self, rows: np.ndarray) -> np.ndarray:
        """The probability of each of ``rows`` at one draw of the mixture, from the draws'
        actual shares (:meth:`counts`: the deterministic-mixture weights need those)."""
        m = max(1, int(_config.INDEX_RECALL_SAMPLE))
        u, d, b = (c / m for c in self.counts())
        q = np.full(len(rows), u / self.n)
        if d > 0:
            q += d * self.density[self.index.own[rows]]
        if b > 0:
            inside = np.isin(rows, self.border)
            q += b * inside / len(self.border)
        return q

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None] | None:
        """(sorted rows, their weights or None when equal); None when no fresh rows remain."""
        if not self.mixture:
            if self._perm is None:
                self._perm = rng.permutation(self.n)
            if self.size <= 0 or self._used + self.size > self.n:
                return None
            rows = np.sort(self._perm[self._used : self._used + self.size])
            self._used += self.size
            return rows, None
        mu, md, mb = self.counts()
        parts = [rng.integers(0, self.n, mu)]
        if md:
            idx = self.index
            c = rng.choice(len(self.mass), md, p=self.mass)
            parts.append(idx.order[idx.offsets[c] + (rng.random(md) * idx.sizes[c]).astype(np.int64)])
        if mb:
            parts.append(self.border[rng.integers(0, len(self.border), mb)])
        rows = np.sort(np.concatenate(parts))
        return rows, 1.0 / (self.probability(rows) * self.n)


def border_rows(scores: np.ndarray) -> np.ndarray | None:
    """(n,) bool: the ``INDEX_RECALL_BORDER_ROWS`` share of the rows with the smallest gap
    between their best and second-best centroid scores (``scores``: (n, p) each row's probe
    cells' scores, -inf where none), ties at the cut included; None with fewer than two
    scores per row, or no share."""
    share = float(_config.INDEX_RECALL_BORDER_ROWS)
    if scores.ndim != 2 or scores.shape[1] < 2 or not len(scores) or share <= 0:
        return None
    gap = np.empty(len(scores))
    step = 1 << 20
    for a in range(0, len(scores), step):  # in chunks: no float64 copy of all the scores
        top2 = -np.partition(-np.asarray(scores[a : a + step], np.float64), 1, axis=1)[:, :2]
        gap[a : a + step] = top2[:, 0] - top2[:, 1]
    gap[~np.isfinite(gap)] = np.inf
    k = min(len(gap) - 1, max(0, int(share * len(gap)) - 1))  # the k + 1 smallest
    cut = np.partition(gap, k)[k]
    return gap <= cut


def samples(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint sorted samples of rows (calibration, measurement), each of at most
    ``INDEX_RECALL_SAMPLE`` rows (half the rows each when there are fewer)."""
    size = min(_config.INDEX_RECALL_SAMPLE, n // 2)
    perm = rng.permutation(n)
    return np.sort(perm[:size]), np.sort(perm[size : 2 * size])


class ProbeCount:
    """What a calibration chooses: a number of probes per row, up to ``cells`` (every cell:
    the exact answer)."""

    def __init__(self, cells: int) -> None:
        self.cells = cells
        self.most = cells

    def choose(self, ev: Evidence, target: float, level: float) -> int:
        return ev.smallest(target, self.cells, level)

    def step(self, ev: Evidence, value: int) -> int:
        return ev.next_step(value, self.cells)

    def recall(self, est: float, low: float, high: float, value: int, sample: int) -> Recall:
        return Recall(est, low, high, value, sample)


class ScoreGap:
    """What a calibration chooses: a score gap (:func:`embedcache.index._partition.within_gap`)
    for rows probing at most ``probes`` cells; inf (the most) when no gap reaches the target
    within them."""

    def __init__(self, probes: int) -> None:
        self.probes = probes
        self.most = math.inf

    def choose(self, ev: Evidence, target: float, level: float) -> float:
        return ev.smallest_gap(target, level)

    def step(self, ev: Evidence, value: float) -> float:
        return ev.next_gap(value)

    def recall(self, est: float, low: float, high: float, value: float, sample: int) -> Recall:
        return Recall(est, low, high, self.probes, sample, gap=float(value))


def calibrate(evidence_of, n: int, cells: int, target: float, seed: int,
              fallback=None, design: Design | None = None, choice=None,
              largest_exact: int | None = None) -> Recall | None:
    """Choose the probes for ``target`` on one sample, check them on another, and report the
    recall they reach measured on a third.

    ``evidence_of(sample, rng) -> Evidence``; ``fallback`` (same form) is used to choose when
    the calibration sample holds fewer than 20 true pairs. ``design``: how rows are drawn
    (default: uniformly). ``choice``: what is chosen, :class:`ProbeCount` (default, of
    ``cells``) or :class:`ScoreGap`. The probes (or gap) are the fewest (smallest) whose
    lower bound at ``INDEX_RECALL_CHOOSE_LEVEL`` reaches ``target``; while a check's lower
    bound at that level is below ``target`` (up to ``INDEX_RECALL_ROUNDS`` checks), they are
    chosen again on all the evidence so far (at least one step more) and checked on a fresh
    sample. The reported recall (95% interval) is measured on a sample drawn at the start
    that takes no part in any choice or check: the check stops on a measurement that
    passes, so reporting that one would report a figure picked for being high (the truth
    fell below its low end more often than the stated 2.5%). The rows of the calibration,
    of the first check and of the report are drawn together and, when ``evidence_of`` has a
    ``prefetch(rows)``, handed to it at once (one exact pass over the rows for all three).
    When the design has rows for two samples only (a few rows), the last check is reported.
    When the choice reaches the most there is (every cell: exact, recall 1; a gap: None,
    the target is out of the gap rule's reach). Every cell of a collection of more than
    ``largest_exact`` rows raises :class:`~embedcache.errors.RecallUnreachableError`
    instead: that is an exact, quadratic search (days at ten million rows), not a fair
    substitute for the one asked for.
    """
    rng = np.random.default_rng([seed, 7])
    design = design if design is not None else Design(n)
    choice = choice if choice is not None else ProbeCount(cells)
    level = _config.INDEX_RECALL_CHOOSE_LEVEL
    got = design.draw(rng)
    if got is None:
        return Recall(1.0, 1.0, 1.0, cells, 0) if isinstance(choice, ProbeCount) else None
    cal, w = got
    ahead = design.draw(rng)  # the first check's rows, and the report's
    report = design.draw(rng) if ahead is not None else None
    prefetch = getattr(evidence_of, "prefetch", None)
    if prefetch is not None:
        prefetch(np.concatenate([cal] + [g[0] for g in (ahead, report) if g is not None]))
    ev = evidence_of(cal, rng)
    if ev.true.sum() < 20 and fallback is not None:
        ev = fallback(cal, rng)
    ev.row_weight = w
    value = choice.choose(ev, target, level)
    pool = [ev]
    rec = None  # the last check, reported when there is no report sample
    rounds = max(1, int(_config.INDEX_RECALL_ROUNDS))
    for r in range(rounds):
        if value >= choice.most:
            break
        got, ahead = (ahead, None) if r == 0 else (design.draw(rng), None)
        if got is None:
            break
        mea, w = got
        m = evidence_of(mea, rng)
        m.row_weight = w
        est, low, high = m.interval(value)
        rec = choice.recall(est, low, high, value, len(mea))
        if m.true.sum() <= 0 or r == rounds - 1 or m.interval(value, 2 * level - 1)[1] >= target - 1e-12:
            break
        pool.append(m)
        every = Evidence.concat(pool)
        value = max(choice.choose(every, target, level), choice.step(every, value))
    if value >= choice.most:
        if not isinstance(choice, ProbeCount):
            return None
        if largest_exact is not None and n > largest_exact and cells > 1:
            _unreachable(Evidence.concat(pool), target, cells, n)
        return Recall(1.0, 1.0, 1.0, cells, 0 if rec is None else rec.sample)
    if report is not None:
        rows, w = report
        m = evidence_of(rows, rng)
        m.row_weight = w
        return choice.recall(*m.interval(value), value, len(rows))
    if rec is None:  # never checked: no rows for it (a gap: None; probes: every cell, exact)
        return None if isinstance(choice, ScoreGap) else Recall(1.0, 1.0, 1.0, cells, 0)
    return rec


def _unreachable(ev: Evidence, target: float, cells: int, n: int) -> None:
    """Raise :class:`~embedcache.errors.RecallUnreachableError` with the recall ``ev`` gives
    at the most probes it looked at (below every cell)."""
    from embedcache.errors import RecallUnreachableError

    seen = ev.need[ev.need < cells]
    deepest = int(seen.max()) if len(seen) else 1
    reach, low, high = ev.interval(deepest)
    got = ("no true pair in the sample" if math.isnan(reach)
           else f"recall {reach:.4f} (95% CI {low:.4f}-{high:.4f}) on the sampled rows")
    raise RecallUnreachableError(
        f"recall {target} is out of reach of a partitioned search of these {n:,} rows: "
        f"{deepest} of {cells:,} cells per row give {got}, and only probing every cell (an "
        f"exact, quadratic search) reaches it with confidence; ask for a lower recall "
        f"(--recall), choose method='exact' (--method exact) to run the exact search on "
        f"purpose, or fix the cells each row probes with probes= in embedcache.index",
        recall=target, reachable=reach, probes=deepest, rows=n)
