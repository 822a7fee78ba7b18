"""What a report shows, computed from a result: nearest-neighbour scores, the removal curve,
sample pairs in score bands, the largest groups.

Everything here is bounded whatever the number of items: the nearest-neighbour scores come
from a sample of at most ``sample`` items, the pairs shown are a few per band, the groups a few
of the largest, and each text is clipped. The costs:

* nearest-neighbour scores: one exact top-1 pass (:func:`embedcache.kernels.top_k`) of the
  sampled items against every distinct vector, ``sample x u x d`` multiply-adds (u distinct
  vectors). A run with ``against=`` keeps each item's best reference score, so it costs nothing.
* the removal curve, when the vectors are known and there are at most ``exact_rows`` distinct
  ones: every pair at or above the lowest threshold of the curve
  (:func:`embedcache.kernels.similar_pairs`, as much work as the run itself at that threshold),
  then connected components at each threshold of the curve. Above ``exact_rows`` the curve is
  estimated from the sampled nearest-neighbour scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedcache import kernels

#: items whose nearest neighbour is looked up, at most
DEFAULT_SAMPLE = 4000
#: distinct vectors up to which the removal curve is exact
DEFAULT_EXACT_ROWS = 20_000
#: the curve spans the threshold +- this
CURVE_SPAN = 0.10
CURVE_STEP = 0.01
#: pairs shown per score band, groups shown, members shown per group, characters per text
PAIRS_PER_BAND = 6
GROUPS_SHOWN = 8
MEMBERS_SHOWN = 6
TEXT_CHARS = 400


@dataclass
class Pair:
    i: int
    j: int
    score: float
    reference: bool = False  # j indexes the reference set


@dataclass
class Band:
    lo: float
    hi: float
    above: bool  # at or above the threshold: removed by the run
    pairs: list[Pair] = field(default_factory=list)
    total: int = 0  # sampled pairs that fell in the band


@dataclass
class Group:
    members: list[tuple[int, float | None, bool]]  # (item, score to the kept one, kept)
    size: int


@dataclass
class Summary:
    """What a report shows; texts are looked up by :class:`Lookup` when rendered."""

    kind: str  # "dedup" or "pairs"
    n: int
    threshold: float
    removed: int | None
    nn_scores: np.ndarray  # sampled per-item nearest-neighbour scores (or pair scores)
    nn_sampled: int  # items whose scores were looked up
    nn_complete: bool  # scores below the threshold are known
    curve: list[tuple[float, int]]  # (threshold, removed or pairs at it)
    curve_note: str
    bands: list[Band]
    groups: list[Group]
    n_groups: int
    settings: list[tuple[str, str]]


def curve_grid(threshold: float, lo: float | None = None) -> np.ndarray:
    """Thresholds of the curve: the run's threshold +- CURVE_SPAN in CURVE_STEP steps, in
    [-1, 1], the run's threshold itself included."""
    start = threshold - CURVE_SPAN if lo is None else lo
    ticks = np.round(np.arange(np.floor(start * 100), np.ceil((threshold + CURVE_SPAN) * 100) + 1) / 100, 2)
    ticks = np.unique(np.clip(np.append(ticks, round(threshold, 6)), -1.0, 1.0))
    return ticks[ticks >= max(start, -1.0) - 1e-9]


def _sample(n: int, size: int) -> np.ndarray:
    if n <= size:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(0).choice(n, size, replace=False)).astype(np.int64)


def nearest_rows(x: np.ndarray, inverse: np.ndarray, items: np.ndarray):
    """For each item, the best score with another item and the distinct row of that item.

    x: (u, d) distinct vectors; inverse: (n,) item -> row. An item whose row has copies
    scores its row's self score with them (returned row == its own row).
    Returns ``(scores, rows)``; -inf and -1 where there is no other item.
    """
    rows = inverse[items]
    if not len(items):
        return np.empty(0, np.float32), np.empty(0, np.int64)
    k = min(2, len(x))
    s, idx = kernels.top_k(x[rows], x, k)
    first_is_self = idx[:, 0] == rows
    if k > 1:
        best_s = np.where(first_is_self, s[:, 1], s[:, 0]).astype(np.float32)
        best_r = np.where(first_is_self, idx[:, 1], idx[:, 0]).astype(np.int64)
    else:
        best_s = np.full(len(rows), -np.inf, np.float32)
        best_r = np.full(len(rows), -1, np.int64)
    counts = np.bincount(inverse, minlength=len(x))
    copies = counts[rows] > 1
    if copies.any():
        own = kernels.pair_scores(x, rows[copies], rows[copies])
        better = own >= best_s[copies]
        where = np.flatnonzero(copies)[better]
        best_s[where], best_r[where] = own[better], rows[where]
    return best_s, best_r


def removal_curve(x: np.ndarray, inverse: np.ndarray, grid: np.ndarray) -> list[tuple[float, int]]:
    """Items removed (connected grouping: all but one of each group) at each threshold of
    ``grid``, exactly: every pair of distinct rows at or above ``grid[0]``, then connected
    components at each threshold."""
    u = len(x)
    if u > 1:
        pi, pj, ps = kernels.similar_pairs(x, float(grid[0]))
    else:
        pi = pj = np.empty(0, np.int64)
        ps = np.empty(0, np.float32)
    counts = np.bincount(inverse, minlength=u)
    rows = np.flatnonzero(counts > 1)
    own = kernels.pair_scores(x, rows, rows)
    return edges_curve(len(inverse), u, pi, pj, ps, grid, copies=(counts[rows] - 1, own))


def edges_curve(n: int, u: int, pi: np.ndarray, pj: np.ndarray, ps: np.ndarray, grid: np.ndarray,
                copies: tuple[np.ndarray, np.ndarray] | None = None) -> list[tuple[float, int]]:
    """Items removed at each threshold of ``grid`` by connected grouping of the edges
    ``(pi, pj, ps)`` over ``u`` nodes standing for ``n`` items. copies: (extra items of a
    node, their score with each other) for nodes standing for several items."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    out = []
    for t in grid:
        keep = kernels.meets_threshold(ps, t)
        graph = coo_matrix((np.ones(int(keep.sum()), bool), (pi[keep], pj[keep])), shape=(u, u))
        comps = connected_components(graph.tocsr(), directed=False)[0] if u else 0
        apart = 0  # copies of a node are one item when they score >= t with each other
        if copies is not None:
            extra, own = copies
            apart = int(extra[~kernels.meets_threshold(own, t)].sum())
        out.append((float(t), int(n - comps - apart)))
    return out


def pick_bands(threshold: float, scores: np.ndarray, pairs: list[Pair], *, width: float = 0.025,
               below: int = 2, above: int = 2) -> list[Band]:
    """Bands of ``width`` just below and just above the threshold (``below`` and ``above`` of
    them), each with up to PAIRS_PER_BAND of ``pairs`` (``scores`` their scores), spread
    over the band; the top band reaches 1."""
    bands = []
    for k in range(below, 0, -1):
        bands.append(Band(threshold - k * width, threshold - (k - 1) * width, above=False))
    for k in range(above):
        bands.append(Band(threshold + k * width, threshold + (k + 1) * width, above=True))
    bands[-1].hi = max(bands[-1].hi, 1.0)
    for k, band in enumerate(bands):
        inside = kernels.meets_threshold(scores, band.lo)
        if k < len(bands) - 1:  # the top band takes the rest
            inside &= ~kernels.meets_threshold(scores, band.hi)
        inside = np.flatnonzero(inside)
        band.total = len(inside)
        if len(inside):
            order = inside[np.argsort(scores[inside], kind="stable")]
            chosen = order[np.unique(np.linspace(0, len(order) - 1, PAIRS_PER_BAND).round().astype(int))]
            band.pairs = [pairs[c] for c in chosen[::-1]]
    return bands


def largest_groups(groups: list[np.ndarray], removed: np.ndarray, duplicate_of: np.ndarray,
                   scores: np.ndarray) -> list[Group]:
    """The GROUPS_SHOWN largest groups (ties: the first), the kept member first."""
    if not groups:
        return []
    sizes = np.fromiter((len(g) for g in groups), dtype=np.int64, count=len(groups))
    order = np.argsort(-sizes, kind="stable")[:GROUPS_SHOWN]
    score_of = dict(zip(removed.tolist(), scores.tolist()))
    out = []
    for g in order:
        members = groups[int(g)].tolist()
        kept = [m for m in members if m not in score_of]
        rest = sorted((m for m in members if m in score_of), key=lambda m: (-score_of[m], m))
        shown = [(m, None, True) for m in kept] + [(m, float(score_of[m]), False) for m in rest]
        out.append(Group(shown[:MEMBERS_SHOWN], len(members)))
    return out


def describe_settings(result: Any, extra: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(name, value) lines of the run's settings: what the caller says, then what the result
    holds (method and recall when the result has them)."""
    out: list[tuple[str, str]] = [(str(k), str(v)) for k, v in (extra or {}).items() if v is not None]
    known = {k for k, _ in out}
    for name in ("namespace", "model"):
        value = getattr(result, name, None)
        if value is not None and name not in known:
            out.append((name, str(value)))
    threshold = getattr(result, "threshold", None)
    if threshold is not None and "threshold" not in known:
        out.append(("threshold", f"{threshold:g}"))
    for name in ("mode", "method"):
        value = getattr(result, name, None)
        if value is not None and name not in known:
            out.append((name, str(value)))
    if getattr(result, "reference", False):
        out.append(("compared with", "a reference set (against=)"))
    recall = getattr(result, "recall", None)
    if recall is not None and "recall" not in known:
        out.append(("recall", _recall_text(recall)))
    return out


def _recall_text(recall: Any) -> str:
    try:
        est, low, high = recall
        return f"{float(est):.4f} (95% interval {float(low):.4f} to {float(high):.4f})"
    except (TypeError, ValueError):
        return str(recall)


def summarize_dedup(result: Any, *, vectors: np.ndarray | None = None, settings: dict[str, Any] | None = None,
                    sample: int = DEFAULT_SAMPLE, exact_rows: int = DEFAULT_EXACT_ROWS) -> Summary:
    """What the report of a :class:`~embedcache.DedupResult` shows (see the module docstring
    for what it costs)."""
    n, t = result.n, float(result.threshold)
    grid = curve_grid(t)
    nearest = getattr(result, "_nearest", None)
    x, inverse = (vectors, np.arange(n, dtype=np.int64)) if vectors is not None else (
        getattr(result, "_vectors", None) or (None, None))
    items = _sample(n, sample)
    greedy = " Greedy runs remove at most this many." if result.mode == "greedy" else ""
    if result.reference and nearest is not None:
        best_s, best_j = nearest  # every item's best reference score: exact, no sampling
        scores, sampled, complete = best_s, n, True
        curve = [(float(g), int(kernels.meets_threshold(best_s, g).sum())) for g in grid]
        note = "Items removed at each threshold: those scoring at or above it with a reference item (exact)."
        pairs = [Pair(int(i), int(best_j[i]), float(best_s[i]), reference=True) for i in items if best_j[i] >= 0]
        pair_scores = np.float32([p.score for p in pairs])
    elif x is not None and not result.reference:
        best_s, best_r = nearest_rows(x, inverse, items)
        found = best_r >= 0
        scores, sampled, complete = best_s[found], len(items), True
        j = _item_of_rows(inverse, items[found], best_r[found])
        pairs = [Pair(int(min(a, b)), int(max(a, b)), float(s)) for a, b, s in zip(items[found], j, scores)]
        pairs = list({(p.i, p.j): p for p in pairs}.values())
        pair_scores = np.float32([p.score for p in pairs])
        if len(x) <= exact_rows:
            curve = removal_curve(x, inverse, grid)
            note = ("Items removed at each threshold, exactly (connected grouping: all but one "
                    f"item of each group).{greedy}")
        else:
            curve = [(float(g), int(round(n * kernels.meets_threshold(scores, g).mean()))) for g in grid]
            note = (f"Estimated from {len(items):,} sampled items: items with a near-duplicate at or "
                    "above each threshold. Fewer are removed: one item of each group stays.")
    else:  # only the pairs at or above the threshold are known
        weakest = getattr(result, "_weakest", None)  # a spanning forest in _pairs: list them all
        pi, pj, ps = result._pairs if weakest is None else weakest(None)
        best = np.full(n, -np.inf, np.float32)
        np.maximum.at(best, pi, ps)
        if not result.reference:
            np.maximum.at(best, pj, ps)
        scores, sampled, complete = best[best > -np.inf], n, False
        grid = grid[grid >= t - 1e-9]
        if result.reference:
            curve = [(float(g), int(kernels.meets_threshold(scores, g).sum())) for g in grid]
        else:
            curve = edges_curve(n, n, pi, pj, ps, grid)
        note = ("Only thresholds at or above the run's: the result does not hold the vectors, so "
                f"scores below {t:g} are unknown.{greedy}")
        chosen = _sample(len(pi), sample)
        pairs = [Pair(int(pi[k]), int(pj[k]), float(ps[k]), reference=result.reference) for k in chosen]
        pair_scores = ps[chosen]
    return Summary(
        kind="dedup", n=n, threshold=t, removed=len(result.removed), nn_scores=np.asarray(scores, np.float32),
        nn_sampled=sampled, nn_complete=complete, curve=curve, curve_note=note,
        bands=pick_bands(t, pair_scores, pairs, below=2 if complete else 0, above=2 if complete else 4),
        groups=largest_groups(result.groups, result.removed, result.duplicate_of, result.scores),
        n_groups=len(result.groups), settings=describe_settings(result, settings),
    )


def summarize_pairs(table: Any, *, threshold: float | None = None, n: int | None = None,
                    settings: dict[str, Any] | None = None, sample: int = DEFAULT_SAMPLE) -> Summary:
    """What the report of a :class:`~embedcache.PairTable` shows: the pairs are all there is,
    so only thresholds at or above the run's are shown (exact)."""
    score = np.asarray(table.score, np.float32)
    if threshold is None:
        threshold = getattr(table, "threshold", None)
    if threshold is None:
        threshold = float(score.min()) if len(score) else 1.0
    t = float(threshold)
    grid = curve_grid(t)
    grid = grid[grid >= t - 1e-9]
    chosen = _sample(len(score), sample)
    pairs = [Pair(int(table.i[k]), int(table.j[k]), float(score[k])) for k in chosen]
    extra = dict(settings or {})
    extra.setdefault("threshold", f"{t:g}")
    return Summary(
        kind="pairs", n=n if n is not None else 0, threshold=t, removed=None, nn_scores=score[chosen],
        nn_sampled=len(chosen), nn_complete=False,
        curve=[(float(g), int(kernels.meets_threshold(score, g).sum())) for g in grid],
        curve_note="Pairs at or above each threshold (exact).",
        bands=pick_bands(t, score[chosen], pairs, below=0, above=4),
        groups=[], n_groups=0, settings=describe_settings(table, extra),
    )


def _item_of_rows(inverse: np.ndarray, items: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """An item of each of ``rows`` other than the matching one of ``items``: the row's first
    item, or its second when the first is that item."""
    n = len(inverse)
    k = np.arange(n, dtype=np.int64)
    first = np.full(int(inverse.max()) + 1 if n else 0, -1, np.int64)
    first[inverse[::-1]] = k[::-1]
    second = np.full(len(first), -1, np.int64)
    later = k[first[inverse] != k]
    second[inverse[later][::-1]] = later[::-1]
    out = first[rows]
    same = out == items
    out[same] = second[rows[same]]
    return out
