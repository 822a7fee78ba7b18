"""A :class:`~embedcache.report._data.Summary` as one self-contained HTML page.

The page skeleton and its stylesheet live in ``htmlfiles/``; this module fills them with
escaped text and inline SVG charts. Every text from the data goes through :func:`_e`.
"""

from __future__ import annotations

import difflib
import html
import re
from importlib import resources
from string import Template
from typing import Any

import numpy as np

from embedcache.report._data import TEXT_CHARS, Summary

# chart geometry (SVG user units; the SVG scales to the page width)
_W, _H = 960, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 20, 20, 46


def _e(value: Any) -> str:
    """Text for HTML: escaped, lone surrogates written as escapes (UTF-8 cannot hold them)."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return html.escape(text, quote=True)


def _htmlfile(name: str) -> str:
    return resources.files("embedcache.report").joinpath("htmlfiles", name).read_text(encoding="utf-8")


class Lookup:
    """Texts and ids of the items (and of a reference set), any of them possibly unknown."""

    def __init__(self, texts=None, ids=None, ref_texts=None, ref_ids=None):
        self.texts, self.ids, self.ref_texts, self.ref_ids = texts, ids, ref_texts, ref_ids

    def text(self, i: int, ref: bool = False) -> str | None:
        texts = self.ref_texts if ref else self.texts
        return None if texts is None else str(texts[i])

    def name(self, i: int, ref: bool = False) -> str:
        ids = self.ref_ids if ref else self.ids
        base = f"reference #{i}" if ref else f"#{i}"
        return base if ids is None else f"{base} · id {ids[i]}"


def _clip(text: str, limit: int = TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_TOKEN = re.compile(r"\s+|\w+|[^\w\s]", re.UNICODE)


def diff_html(a: str, b: str) -> tuple[str, str]:
    """``a`` and ``b`` as escaped HTML, the words only one of them has marked (``del`` in
    ``a``, ``ins`` in ``b``)."""
    ta, tb = _TOKEN.findall(_clip(a)), _TOKEN.findall(_clip(b))
    out_a, out_b = [], []
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(None, ta, tb, autojunk=False).get_opcodes():
        left, right = _e("".join(ta[a0:a1])), _e("".join(tb[b0:b1]))
        if op == "equal":
            out_a.append(left), out_b.append(right)
            continue
        if left:
            out_a.append(f"<del>{left}</del>")
        if right:
            out_b.append(f"<ins>{right}</ins>")
    return "".join(out_a), "".join(out_b)


def _fmt(t: float) -> str:
    return f"{t:.3f}".rstrip("0").rstrip(".") if abs(t - round(t, 2)) > 1e-9 else f"{t:.2f}"


def _nice_scale(v: float) -> tuple[float, float]:
    """(top, step) of an axis from 0 that holds ``v`` in four round steps (whole numbers:
    the axis counts items)."""
    raw = max(v, 1.0) / 4
    mag = 10 ** np.floor(np.log10(raw))
    for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        step = m * mag
        if step >= raw and (step >= 1 and float(step).is_integer()):
            return float(4 * step), float(step)
    return float(4 * np.ceil(raw)), float(np.ceil(raw))


def _y_axis(ymax: float, y_of, label: str) -> list[str]:
    parts = []
    for k in range(5):
        v = ymax * k / 4
        y = y_of(v)
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{_LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{v:,.0f}</text>')
    parts.append(f'<text class="label" x="14" y="{_TOP + (_H - _TOP - _BOTTOM) / 2:.0f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {_TOP + (_H - _TOP - _BOTTOM) / 2:.0f})">{_e(label)}</text>')
    return parts


def _x_ticks(lo: float, hi: float, x_of, step: float) -> list[str]:
    parts = []
    for v in np.arange(np.ceil(lo / step - 1e-9) * step, hi + 1e-9, step):
        x = x_of(v)
        parts.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{_H - _BOTTOM}" y2="{_H - _BOTTOM + 5}"/>')
        parts.append(f'<text class="tick" x="{x:.1f}" y="{_H - _BOTTOM + 18}" text-anchor="middle">{v:.2f}</text>')
    return parts


def _frame(lo: float, hi: float, top: float, what: str, label: str):
    """(x_of, y_of, parts): the scales of a chart of [lo, hi] by [0, top], and its opening
    SVG with the y axis."""
    ymax = _nice_scale(top)[0]
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x_of(v):
        return _LEFT + (v - lo) / (hi - lo) * pw

    def y_of(c):
        return _TOP + ph - c / ymax * ph

    parts = [f'<svg viewBox="0 0 {_W} {_H}" role="img" aria-label="{_e(label)}" xmlns="http://www.w3.org/2000/svg">']
    return x_of, y_of, parts + _y_axis(ymax, y_of, what)


def _threshold_line(x: float, t: float) -> str:
    return (f'<line class="threshold" x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP - 6}" y2="{_H - _BOTTOM}"/>'
            f'<text class="label" x="{x + 6:.1f}" y="{_TOP + 6}">threshold {_e(_fmt(t))}</text>')


def histogram_svg(scores: np.ndarray, threshold: float, what: str) -> str:
    """Bars of the scores in bins of 0.01 (0.02 or 0.05 for wide ranges); bars at or above the
    threshold in the removed colour, the threshold a dashed line."""
    scores = np.asarray(scores, np.float64)
    scores = scores[np.isfinite(scores)]
    if not len(scores):
        return '<p class="empty">No scores to show.</p>'
    lo = min(float(np.quantile(scores, 0.005)), threshold - 0.1)
    lo = max(-1.0, np.floor(lo * 20) / 20)
    hi = 1.0
    width = 0.01 if hi - lo <= 0.6 else 0.02 if hi - lo <= 1.2 else 0.05
    edges = np.round(np.arange(lo, hi + width / 2, width), 6)
    if edges[-1] < hi:
        edges = np.append(edges, hi)
    counts, _ = np.histogram(np.clip(scores, lo, hi), bins=edges)
    x_of, y_of, parts = _frame(lo, hi, float(counts.max()), what, f"{what} histogram")
    ph = _H - _TOP - _BOTTOM
    for c, a, b in zip(counts.tolist(), edges[:-1], edges[1:]):
        if not c:
            continue
        cls = "bar-removed" if a >= threshold - 1e-9 else "bar-kept"
        x0, x1 = x_of(a) + 0.5, x_of(b) - 0.5
        parts.append(f'<rect class="{cls}" x="{x0:.1f}" y="{y_of(c):.1f}" width="{max(x1 - x0, 0.8):.1f}" '
                     f'height="{ph - (y_of(c) - _TOP):.1f}"><title>{a:.2f} to {b:.2f}: {c:,}</title></rect>')
    parts.append(f'<line class="axis" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{_H - _BOTTOM}" y2="{_H - _BOTTOM}"/>')
    parts += _x_ticks(lo, hi, x_of, 0.05 if hi - lo <= 0.6 else 0.1 if hi - lo <= 1.2 else 0.25)
    parts.append(_threshold_line(x_of(threshold), threshold))
    parts.append(f'<text class="tick" x="{_W - _RIGHT}" y="{_H - 6}" text-anchor="end">cosine similarity</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def curve_svg(curve: list[tuple[float, int]], threshold: float, what: str) -> str:
    """The count at each threshold of the curve as a line with a dot per threshold."""
    if not curve:
        return '<p class="empty">No thresholds to show.</p>'
    ts = np.array([t for t, _ in curve])
    cs = np.array([c for _, c in curve], dtype=np.float64)
    lo, hi = float(ts.min()), float(ts.max())
    if hi - lo < 0.02:
        lo, hi = lo - 0.01, hi + 0.01
    x_of, y_of, parts = _frame(lo, hi, float(cs.max()), what, f"{what} at each threshold")
    points = " ".join(f"{x_of(t):.1f},{y_of(c):.1f}" for t, c in zip(ts, cs))
    parts.append(f'<polygon class="area" points="{x_of(ts[0]):.1f},{_H - _BOTTOM} {points} '
                 f'{x_of(ts[-1]):.1f},{_H - _BOTTOM}"/>')
    parts.append(f'<polyline class="curve" points="{points}"/>')
    parts.append(f'<line class="axis" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{_H - _BOTTOM}" y2="{_H - _BOTTOM}"/>')
    parts += _x_ticks(lo, hi, x_of, 0.05 if hi - lo > 0.12 else 0.01)
    parts.append(_threshold_line(x_of(threshold), threshold))
    for t, c in zip(ts, cs):
        cls = "dot current" if abs(t - threshold) < 1e-9 else "dot"
        parts.append(f'<circle class="{cls}" cx="{x_of(t):.1f}" cy="{y_of(c):.1f}" r="3.5">'
                     f'<title>threshold {_fmt(float(t))}: {int(c):,} {_e(what)}</title></circle>')
    parts.append(f'<text class="tick" x="{_W - _RIGHT}" y="{_H - 6}" text-anchor="end">threshold</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def glance_table(curve: list[tuple[float, int]], threshold: float, n: int, what: str) -> str:
    """The curve at round thresholds (every 0.05) and the run's own, as a small table."""
    rows = [(t, c) for t, c in curve if abs(t * 20 - round(t * 20)) < 1e-6 or abs(t - threshold) < 1e-9]
    if not rows:
        return ""
    head = "".join(f'<th class="{"current" if abs(t - threshold) < 1e-9 else ""}">{_e(_fmt(t))}</th>'
                   for t, _ in rows)
    cells = "".join(f'<td class="{"current" if abs(t - threshold) < 1e-9 else ""}">{c:,}</td>' for t, c in rows)
    share = ""
    if n and what != "pairs":
        share = "<tr><td>share of items</td>" + "".join(
            f'<td class="{"current" if abs(t - threshold) < 1e-9 else ""}">{c / n:.1%}</td>' for t, c in rows) + "</tr>"
    return (f'<table class="glance"><tr><th>threshold</th>{head}</tr>'
            f"<tr><td>{_e(what)}</td>{cells}</tr>{share}</table>")


def _card(value: str, label: str, cls: str = "") -> str:
    return f'<div class="card {cls}"><div class="value">{_e(value)}</div><div class="label">{_e(label)}</div></div>'


def _bands_html(summary: Summary, lookup: Lookup) -> str:
    out = []
    for band in summary.bands:
        hi = "1" if band.hi >= 1.0 else _fmt(band.hi)
        rng = f"{_fmt(band.lo)} to {hi}"
        if summary.kind == "dedup":
            tag = ('<span class="tag removed">above the threshold: removed</span>' if band.above
                   else '<span class="tag kept">below the threshold: kept</span>')
        else:
            tag = '<span class="tag removed">listed</span>'
        count = f"{band.total:,} sampled pair{'s' if band.total != 1 else ''}"
        out.append(f'<div class="band"><h3>{_e(rng)} {tag}<span class="count">{_e(count)}</span></h3>')
        if not band.pairs:
            out.append('<p class="empty">No pairs in this band.</p>')
        for p in band.pairs:
            ta, tb = lookup.text(p.i), lookup.text(p.j, p.reference)
            if ta is not None and tb is not None:
                a, b = diff_html(ta, tb)
            else:
                a = b = '<span class="empty">text not known</span>'
            out.append(
                f'<div class="pair"><div class="score">{p.score:.3f}</div>'
                f'<div class="text"><span class="who">{_e(lookup.name(p.i))}</span>{a}</div>'
                f'<div class="text"><span class="who">{_e(lookup.name(p.j, p.reference))}</span>{b}</div></div>')
        out.append("</div>")
    return "\n".join(out) if out else '<p class="empty">No pairs to show.</p>'


def _groups_html(summary: Summary, lookup: Lookup) -> str:
    if summary.kind != "dedup" or not summary.groups:
        return ""
    out = ['<section id="groups">', "<h2>Largest groups</h2>",
           f'<p class="note">{summary.n_groups:,} groups in all; the {len(summary.groups)} largest, '
           "the kept item first, then the others by their score with it.</p>"]
    for g in summary.groups:
        rows = []
        for item, score, kept in g.members:
            text = lookup.text(item)
            cell = _e(_clip(text, 200)) if text is not None else '<span class="empty">text not known</span>'
            mark = '<td class="kept">kept</td>' if kept else f'<td class="num">{score:.3f}</td>'
            rows.append(f"<tr>{mark}<td class=\"num\">{_e(lookup.name(item))}</td><td>{cell}</td></tr>")
        more = g.size - len(g.members)
        tail = f'<tr><td></td><td colspan="2" class="empty">and {more:,} more</td></tr>' if more > 0 else ""
        out.append(f'<table class="group"><colgroup><col class="c-score"><col class="c-name"><col></colgroup>'
                   f'<tr><th colspan="3">group of {g.size:,}</th></tr>{"".join(rows)}{tail}</table>')
    out.append("</section>")
    return "\n".join(out)


def render(summary: Summary, lookup: Lookup, *, title: str | None = None) -> str:
    """The page, as a str."""
    from embedcache import __version__

    t = summary.threshold
    if summary.kind == "dedup":
        title = title or "Deduplication report"
        removed = summary.removed or 0
        lede = (f"{summary.n:,} items at threshold {_fmt(t)}: {removed:,} removed as near-duplicates, "
                f"{summary.n - removed:,} kept.")
        cards = [_card(f"{summary.n:,}", "items"),
                 _card(f"{summary.n - removed:,}", "kept", "kept"),
                 _card(f"{removed:,}", f"removed ({removed / summary.n:.1%})" if summary.n else "removed", "removed"),
                 _card(f"{summary.n_groups:,}", "groups"),
                 _card(_fmt(t), "threshold")]
        what_curve = "items removed"
        what_hist = "items"
        dist_heading = "Each item's nearest-neighbour score"
        sample = ("every item" if summary.nn_sampled >= summary.n
                  else f"a sample of {summary.nn_sampled:,} items")
        if summary.nn_complete:
            dist_note = (f"The best cosine similarity of each item with any other item ({sample}). "
                         "Items right of the dashed line have a near-duplicate at this threshold.")
        else:
            dist_note = ("Items that have a near-duplicate at or above the threshold, by their best score; "
                         "the result does not hold the vectors, so scores below the threshold are unknown.")
        pairs_note = ("Each sampled item with its nearest neighbour, in bands of score just below and just "
                      "above the threshold: read them to choose where the line should be. Words only one "
                      "side has are highlighted.")
    else:
        title = title or "Near-duplicate pairs report"
        total = summary.curve[0][1] if summary.curve else 0
        cards = [_card(f"{total:,}", "pairs"),
                 _card(_fmt(t), "threshold")]
        if summary.n:
            cards.insert(0, _card(f"{summary.n:,}", "items"))
        lede = f"{total:,} pairs at or above {_fmt(t)}."
        what_curve, what_hist = "pairs", "pairs"
        dist_heading = "Scores of the pairs"
        which = "every pair" if summary.nn_sampled >= total else f"a sample of {summary.nn_sampled:,} pairs"
        dist_note = f"Cosine similarity of {which}; only pairs at or above the threshold were listed."
        pairs_note = "Sample pairs in bands of score above the threshold. Words only one side has are highlighted."
    settings = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in summary.settings)
    page = Template(_htmlfile("report.html")).substitute(
        version=_e(__version__),
        title=_e(title),
        css=_htmlfile("style.css"),
        lede=_e(lede),
        cards="\n".join(cards),
        thresholds_heading=_e("What other thresholds would do"),
        curve_note=_e(summary.curve_note),
        glance=glance_table(summary.curve, t, summary.n, what_curve),
        curve_svg=curve_svg(summary.curve, t, what_curve),
        distribution_heading=_e(dist_heading),
        distribution_note=_e(dist_note),
        histogram_svg=histogram_svg(summary.nn_scores, t, what_hist),
        pairs_note=_e(pairs_note),
        bands=_bands_html(summary, lookup),
        groups=_groups_html(summary, lookup),
        settings=f"<table>{settings}</table>" if settings else '<p class="empty">Not recorded.</p>',
    )
    return page
