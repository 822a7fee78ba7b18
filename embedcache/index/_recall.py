"""Recall: how many probes reach the recall asked for, and the recall measured, with a 95% interval.

What is estimated: the share of all true pairs (or true neighbour slots) of the collection the
search finds. Every row's true pairs are counted from that row, so this is
``sum_i found_i / sum_i true_i`` over all rows, estimated on a uniform sample of rows by the
same ratio over the sampled rows (a ratio estimator).

Two independent samples of query rows are drawn. With ``INDEX_RECALL_COLUMNS`` set, the
true pairs of a sampled row are searched among a uniform sample of that many rows (two-stage
sampling: the same ratio, and the row-residual variance below covers both stages), so the
exact search of the pair calibration costs the same at any size, at the price of evidence. On the first (calibration) the exact answer
of every sampled row is computed with the exact kernels, and for each of its true pairs (or
true neighbours) the number of probes that would find it (rows with more than
``INDEX_RECALL_PAIRS_PER_ROW`` pairs: a uniform subsample of them, weighted back). The
smallest number of probes whose one-sided lower bound at ``INDEX_RECALL_CHOOSE_LEVEL``
(default 0.84: the estimate less about one standard error) reaches the target is chosen: the
point estimate alone reaches the target on a lucky sample and then misses it about half the
time. On the second (measurement) sample the recall of that choice is measured the same way,
so the reported figure is not biased by the choice.

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
from embedcache.index._source import source_of

_Z = 1.959963984540054  # two-sided 95%


@dataclass(frozen=True)
class Recall:
    """A recall measured on sampled queries against the exact answer.

    estimate: the share of true pairs (or true neighbours) found, on the measurement sample
    (NaN when the sample held none). low, high: its 95% confidence interval. probes: cells
    probed per row. sample: query rows in the measurement sample.
    """

    estimate: float
    low: float
    high: float
    probes: int
    sample: int

    def __str__(self) -> str:
        return (f"recall {self.estimate:.4f} (95% CI {self.low:.4f}-{self.high:.4f}; "
                f"{self.probes} probes, {self.sample} sampled rows)")


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


def interval(found: np.ndarray, true: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(estimate, low, high) of ``sum(found) / sum(true)`` over sampled rows; ``level``: the
    two-sided confidence (see the module's docstring for the method)."""
    found = np.asarray(found, np.float64)
    true = np.asarray(true, np.float64)
    rows = int((true > 0).sum())
    total = float(true.sum())
    if total <= 0:
        return math.nan, 0.0, 1.0
    r = float(found.sum()) / total
    q = 1.0 - (1.0 - level) / 2
    if 0.0 < r < 1.0 and rows > 1:
        mean = total / rows
        live = true > 0
        resid2 = (found[live] - r * true[live]) ** 2
        var_ratio = float(resid2.sum()) / (rows * (rows - 1) * mean * mean)
        deff = max(1.0, var_ratio / (r * (1 - r) / total))
        n_eff = total / deff
        quad = float((resid2**2).sum())
        z = _quantile(q, float(resid2.sum()) ** 2 / quad if quad > 0 else None)
    else:  # no miss (or nothing found): the rows' pairs as Kish's effective count of units
        live = true[true > 0]
        n_eff = float(live.sum()) ** 2 / float((live**2).sum()) if rows else 0.0
        z = _quantile(q, None)
    low, high = wilson(r * n_eff, n_eff, z)
    return r, min(low, r), max(high, r)


@dataclass
class Evidence:
    """For sampled rows: how many true pairs each has, and at how many probes each sampled
    true pair is found (``need[k]`` probes for pair k of row ``row[k]``, weighted ``weight[k]``)."""

    true: np.ndarray  # (rows,) float64
    row: np.ndarray  # (pairs,) int64 position in the sample
    need: np.ndarray  # (pairs,) int64: found with >= need probes (0: always)
    weight: np.ndarray  # (pairs,) float64
    partner: np.ndarray | None = None  # (pairs,) int64: the other row of each pair

    def found(self, probes: int) -> np.ndarray:
        hit = self.need <= probes
        return np.bincount(self.row[hit], weights=self.weight[hit], minlength=len(self.true))

    def recall(self, probes: int) -> float:
        total = self.true.sum()
        return float(self.found(probes).sum() / total) if total > 0 else math.nan

    def smallest(self, target: float, cells: int, level: float = 0.5) -> int:
        """The fewest probes (``cells`` at most) whose recall reaches ``target``: the point
        estimate for ``level`` 0.5, else the one-sided lower bound at ``level``."""
        total = self.true.sum()
        if total <= 0:
            return cells
        order = np.argsort(self.need, kind="stable")
        need = self.need[order]
        cum = np.cumsum(self.weight[order]) / total
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
            low = interval(self.found(int(p)), self.true, 2 * level - 1)[1]
            if low >= target - 1e-12:
                return int(p)
        return cells


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


def pair_evidence(x, index, sample: np.ndarray, threshold: float, rng: np.random.Generator,
                  nearest: bool = False) -> Evidence:
    """Evidence for :func:`embedcache.index._partition.pairs`: a true pair (i, j) is found
    when i and j share a cell, or when either probes the other's cell. ``x``: an array or a
    source of rows (:mod:`._source`).

    ``nearest``: use each sampled row's nearest other row as its one "true pair" instead (a
    stand-in when the threshold leaves too few pairs to calibrate on).
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
        qi, jj, _ = x.pairs_with(q, threshold) if cols is None else x.pairs_with(q, threshold, cols)
        ok = jj != sample[qi]
        qi, jj = qi[ok], jj[ok]
    kept, weight, true = _subsample(qi, len(sample), _config.INDEX_RECALL_PAIRS_PER_ROW, rng)
    qi, jj = qi[kept], jj[kept]
    i = sample[qi]
    partners, pos = np.unique(jj, return_inverse=True)
    need = np.minimum(index.probes_needed(q, qi, index.own[jj]),
                      index.probes_needed(x[partners], pos.reshape(-1), index.own[i]))
    need[index.own[i] == index.own[jj]] = 0
    return Evidence(true, qi.astype(np.int64), need, weight, jj.astype(np.int64))


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


def knn_evidence(x, index, sample: np.ndarray, k: int, rng: np.random.Generator) -> Evidence:
    """Evidence for a k-nearest-neighbour search of the sampled rows (own cell always probed):
    a true neighbour j of i is found when it shares i's cell or i probes j's cell."""
    x = source_of(x)
    q = x[sample]
    _, nb = x.top_k(q, min(k + 1, len(x)))
    qi, jj = other_neighbours(nb, sample, k)
    true = np.bincount(qi, minlength=len(q)).astype(np.float64)
    need = index.probes_needed(q, qi, index.own[jj])
    need[index.own[sample[qi]] == index.own[jj]] = 0
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


def samples(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint sorted samples of rows (calibration, measurement), each of at most
    ``INDEX_RECALL_SAMPLE`` rows (half the rows each when there are fewer)."""
    size = min(_config.INDEX_RECALL_SAMPLE, n // 2)
    perm = rng.permutation(n)
    return np.sort(perm[:size]), np.sort(perm[size : 2 * size])


def calibrate(evidence_of, n: int, cells: int, target: float, seed: int,
              fallback=None) -> Recall:
    """Choose the probes for ``target`` on one sample and measure them on another.

    ``evidence_of(sample, rng) -> Evidence``; ``fallback`` (same form) is used to choose when
    the calibration sample holds fewer than 20 true pairs.
    """
    rng = np.random.default_rng([seed, 7])
    cal, mea = samples(n, rng)
    ev = evidence_of(cal, rng)
    if ev.true.sum() < 20 and fallback is not None:
        ev = fallback(cal, rng)
    probes = ev.smallest(target, cells, _config.INDEX_RECALL_CHOOSE_LEVEL)
    if probes >= cells:
        return Recall(1.0, 1.0, 1.0, cells, len(mea))  # every cell: exact
    m = evidence_of(mea, rng)
    est, low, high = interval(m.found(probes), m.true)
    return Recall(est, low, high, probes, len(mea))
