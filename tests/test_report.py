"""The HTML report: its numbers against deduplicate itself and a naive reference, escaping,
bounded size, and the CLI options. The page in a real browser: test_report_browser.py."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embedcache as ec
from embedcache import report
from embedcache.errors import InvalidInputError
from embedcache.report import _data
from embedcache.report._render import diff_html
from tests.support import naive


def clustered(n: int, d: int = 16, *, seed: int = 0, copies: int = 5) -> np.ndarray:
    """Vectors around n // 4 centres at several spreads (pairs at many scores), with exact copies."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(n // 4, 1), d))
    x = centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, d)) * rng.choice([0.05, 0.2, 0.4], size=(n, 1))
    x[rng.integers(0, n, copies)] = x[rng.integers(0, n, copies)]
    return x.astype(np.float32)


def naive_nearest(x: np.ndarray) -> np.ndarray:
    s = naive.similarity(x, x, "cosine").astype(np.float32)
    np.fill_diagonal(s, -np.inf)
    return s.max(axis=1)


def test_removal_curve_is_what_deduplicate_removes_at_each_threshold():
    x = clustered(300)
    res = ec.deduplicate(x, threshold=0.9, progress=False)
    summary = _data.summarize_dedup(res)
    assert [round(t, 2) for t, _ in summary.curve] == [round(v, 2) for v in np.arange(0.80, 1.001, 0.01)]
    for t, count in summary.curve:
        assert count == len(ec.deduplicate(x, threshold=t, progress=False).removed), t
    assert dict(summary.curve)[0.9] == len(res.removed)


def test_nearest_neighbour_scores_match_a_naive_search():
    x = clustered(120, copies=8)
    res = ec.deduplicate(x, threshold=0.9, progress=False)
    summary = _data.summarize_dedup(res)
    np.testing.assert_allclose(np.sort(summary.nn_scores), np.sort(naive_nearest(x)), atol=1e-5)
    assert summary.nn_sampled == 120 and summary.nn_complete


def test_sampled_estimate_when_too_many_rows_for_the_exact_curve():
    x = clustered(400)
    res = ec.deduplicate(x, threshold=0.9, progress=False)
    nn = naive_nearest(x)
    full = _data.summarize_dedup(res, sample=400, exact_rows=0)  # every item sampled: exact counts
    for t, count in full.curve:
        assert count == int((nn >= np.float32(t) - 1e-6).sum()), t
    part = _data.summarize_dedup(res, sample=100, exact_rows=0)
    assert part.nn_sampled == 100 and len(part.nn_scores) == 100
    assert "Estimated from 100 sampled items" in part.curve_note
    for (t, a), (_, b) in zip(full.curve, part.curve):  # a sample of a quarter: near the full count
        assert abs(a - b) <= 0.25 * 400, t


def test_reference_run_uses_every_items_best_reference_score():
    x = clustered(200, seed=1)
    items, ref = x[:120], x[120:]
    res = ec.deduplicate(items, against=ref, threshold=0.9, progress=False)
    summary = _data.summarize_dedup(res)
    best = naive.similarity(items, ref, "cosine").astype(np.float32).max(axis=1)
    np.testing.assert_allclose(summary.nn_scores, best, atol=1e-5)
    for t, count in summary.curve:
        assert count == len(ec.deduplicate(items, against=ref, threshold=t, progress=False).removed), t
    assert all(p.reference for band in summary.bands for p in band.pairs)


def test_without_vectors_only_thresholds_at_or_above_the_runs():
    x = clustered(200, seed=2)
    res = ec.deduplicate(x, threshold=0.85, progress=False)
    res._vectors = None
    summary = _data.summarize_dedup(res)
    assert not summary.nn_complete
    assert min(t for t, _ in summary.curve) == pytest.approx(0.85)
    for t, count in summary.curve:
        assert count == len(ec.deduplicate(x, threshold=t, progress=False).removed), t
    # vectors given by the caller bring back the thresholds below
    page = report.dedup_report(res, vectors=x)
    assert ">0.75</th>" in page
    with pytest.raises(InvalidInputError, match="one row per item"):
        report.dedup_report(res, vectors=x[:10])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.integers(-2, 2), min_size=3, max_size=3), min_size=1, max_size=14),
       st.sampled_from([0.5, 0.7, 0.9, 1.0]))
def test_removal_curve_property(rows, threshold):
    """Small integer vectors (ties, zero rows, copies): the curve is what deduplicate removes."""
    x = np.array(rows, dtype=np.float32)
    res = ec.deduplicate(x, threshold=threshold, progress=False)
    curve = _data.summarize_dedup(res).curve
    counts = [c for _, c in curve]
    assert counts == sorted(counts, reverse=True)  # fewer removed as the threshold rises
    for t, count in curve:
        assert count == len(ec.deduplicate(x, threshold=t, progress=False).removed), t


def test_bands_hold_pairs_of_their_scores_and_are_spread():
    x = clustered(600, seed=3)
    summary = _data.summarize_dedup(ec.deduplicate(x, threshold=0.9, progress=False))
    assert [b.above for b in summary.bands] == [False, False, True, True]
    assert sum(len(b.pairs) for b in summary.bands) > 6
    for band in summary.bands:
        assert len(band.pairs) <= _data.PAIRS_PER_BAND
        for p in band.pairs:
            assert np.float32(band.lo) <= np.float32(p.score) <= np.float32(max(band.hi, 1.0))
            assert p.score == pytest.approx(float(naive.score(x[p.i], x[p.j], "cosine")), abs=1e-5)


def test_texts_are_escaped_and_the_page_has_no_script():
    texts = ["<script>alert(1)</script> hello there", "<script>alert(1)</script> hello there!",
             'a "quoted" & <b>bold</b> row', 'a "quoted" & <b>bold</b> row.', "lone \ud800 surrogate",
             "lone \ud800 surrogate!"] + [f"unrelated row number {k} about topic {k * 7}" for k in range(20)]
    res = ec.deduplicate(texts, threshold=0.8, progress=False)
    assert len(res.removed) >= 3
    page = report.dedup_report(res, settings={"input": "<img src=x onerror=alert(1)>"})
    assert "<script" not in page.lower()
    assert "<b>" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "\\ud800" in page  # written as an escape, the page stays valid UTF-8
    page.encode("utf-8")
    assert "script-src" not in page and "default-src 'none'" in page  # CSP: no script may run
    assert not re.search(r"(src|href)=\"https?:", page)  # nothing fetched from the network


def test_diff_marks_only_the_words_that_differ():
    a, b = diff_html("The cat sat on <the> mat.", "A cat sat on <the> mat!")
    assert a == "<del>The</del> cat sat on &lt;the&gt; mat<del>.</del>"
    assert b == "<ins>A</ins> cat sat on &lt;the&gt; mat<ins>!</ins>"
    assert diff_html("same", "same") == ("same", "same")


def test_size_stays_bounded_for_a_large_result(tmp_path):
    n = 50_000  # above the exact curve's 20,000 rows: the sampled path
    rng = np.random.default_rng(4)
    x = rng.normal(size=(n, 32)).astype(np.float32)
    src, dst = rng.choice(n, 3000, replace=False).reshape(2, -1)
    x[dst] = x[src] + rng.normal(size=(len(src), 32)).astype(np.float32) * rng.uniform(0.05, 0.3, (len(src), 1))
    long = "word " * 2000
    texts = [f"{k} {long}" for k in range(n)]
    res = ec.deduplicate(x, threshold=0.95, progress=False)
    res.texts = texts
    assert len(res.groups) > 100
    path = tmp_path / "big.html"
    res.to_html(path)
    size = path.stat().st_size
    assert size <= 2 * 1024 * 1024, size
    page = path.read_text(encoding="utf-8")
    assert "Estimated from 4,000 sampled items" in page
    assert "group of" in page and page.count('class="pair"') >= 6


def test_pair_table_report_counts_pairs_at_each_threshold(tmp_path):
    x = clustered(300, seed=5)
    table = ec.near_duplicates(x, threshold=0.85, progress=False)
    summary = _data.summarize_pairs(table, threshold=0.85)
    for t, count in summary.curve:
        assert count == len(ec.near_duplicates(x, threshold=t, progress=False)), t
    assert all(b.above for b in summary.bands)
    table.to_html(tmp_path / "p.html", threshold=0.85, n=300)
    page = (tmp_path / "p.html").read_text(encoding="utf-8")
    assert f"{len(table):,} pairs at or above 0.85" in page


def test_settings_show_method_and_recall_when_the_result_has_them():
    res = ec.deduplicate(clustered(50), threshold=0.9, progress=False)
    res.method, res.recall = "partitioned", (0.995, 0.99, 0.998)
    lines = dict(_data.describe_settings(res, {"model": "m1", "embedder": None}))
    assert lines["model"] == "m1" and "embedder" not in lines
    assert lines["method"] == "partitioned"
    assert lines["recall"].startswith("0.9950 (95% interval 0.9900 to 0.9980)")
    assert lines["threshold"] == "0.9" and lines["mode"] == "connected"


# ---------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------


def test_cli_dedup_and_pairs_write_the_report(run, tmp_path):
    from tests.test_cli import EXAMPLE

    proc = run("dedup", EXAMPLE, "-o", "kept.jsonl", "--report", "r.html", "--duplicates", "d.csv", "-q")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    kept = len((tmp_path / "kept.jsonl").read_text().splitlines())
    assert f"{kept:,} kept" in page
    assert "hashing|" in page and "reviews.jsonl" in page  # the namespace and the input
    assert "id r01" in page  # ids from the input's id field
    assert "kept" in proc.stdout
    run("pairs", EXAMPLE, "-t", "0.8", "-o", "p.csv", "--report", "p.html", "-q")
    pairs = len((tmp_path / "p.csv").read_text().splitlines()) - 1
    assert f"{pairs:,} pairs at or above 0.80" in (tmp_path / "p.html").read_text(encoding="utf-8")


def test_cli_report_path_clash_is_one_line_and_writes_nothing(run, tmp_path):
    from tests.test_cli import EXAMPLE, assert_one_line_error

    proc = run("dedup", EXAMPLE, "-o", "same.html", "--report", "same.html", ok=False)
    assert_one_line_error(proc, "--report")
    assert not (tmp_path / "same.html").exists()


from tests.test_cli import run  # noqa: E402,F401  (the fixture)
