"""The self-contained HTML report of a deduplication or of near-duplicate pairs.

One file, no network: inline CSS and SVG, every text escaped, no scripts (a Content Security
Policy forbids them). It shows each item's nearest-neighbour score with the threshold marked,
how many items nearby thresholds would remove, sample pairs just above and just below the
threshold with their differences highlighted, the largest groups, and the settings of the run.
Its size is bounded whatever the number of items (sampled; a few pairs per band; texts
clipped): a few hundred kilobytes at most. What it costs to compute is in
:mod:`embedcache.report._data`.

Use :meth:`embedcache.DedupResult.to_html` and :meth:`embedcache.PairTable.to_html`, or
``embedcache dedup ... --report report.html``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from embedcache._validation import as_matrix, check_int, check_threshold
from embedcache.errors import InvalidInputError
from embedcache.report._data import DEFAULT_EXACT_ROWS, DEFAULT_SAMPLE, summarize_dedup, summarize_pairs
from embedcache.report._render import Lookup, render

__all__ = ["dedup_report", "pairs_report", "write_html"]


def dedup_report(result: Any, *, vectors: np.ndarray | None = None, settings: dict[str, Any] | None = None,
                 title: str | None = None, sample: int = DEFAULT_SAMPLE,
                 exact_rows: int = DEFAULT_EXACT_ROWS) -> str:
    """The HTML page of a :class:`~embedcache.DedupResult`, as a str.

    vectors: (n, d) vectors of the items, for a result that does not hold them (a result
    returned by :func:`~embedcache.deduplicate` does). Without either, only thresholds at or
    above the run's are shown.
    settings: name -> value lines shown with the run's settings (embedder, model, input...).
    sample: items whose nearest neighbour is looked up (one exact top-1 pass of them against
    every distinct vector). exact_rows: up to this many distinct vectors the removal curve is
    exact (every pair at or above its lowest threshold is found); above it, estimated from
    the sample.
    """
    sample, exact_rows = check_int("sample", sample, 1), check_int("exact_rows", exact_rows, 0)
    if vectors is not None:
        vectors = as_matrix(vectors, "vectors")
        if len(vectors) != result.n:
            raise InvalidInputError(f"vectors must have one row per item ({result.n}), got {len(vectors)}")
    summary = summarize_dedup(result, vectors=vectors, settings=settings, sample=sample, exact_rows=exact_rows)
    lookup = Lookup(result.texts, result.ids, result.reference_texts, result.reference_ids)
    return render(summary, lookup, title=title)


def pairs_report(table: Any, *, threshold: float | None = None, n: int | None = None,
                 settings: dict[str, Any] | None = None, title: str | None = None,
                 sample: int = DEFAULT_SAMPLE) -> str:
    """The HTML page of a :class:`~embedcache.PairTable`, as a str.

    threshold: the threshold the pairs were listed at (default: the table's, else its lowest
    score). n: the number of items the pairs were found among, when known.
    """
    sample = check_int("sample", sample, 1)
    if threshold is not None:
        threshold = check_threshold(threshold)
    summary = summarize_pairs(table, threshold=threshold, n=n, settings=settings, sample=sample)
    lookup = Lookup(table._texts_i, table._ids_i, table._texts_j, table._ids_j)
    return render(summary, lookup, title=title)


def write_html(page: str, path: str | os.PathLike, *, opener: Any = None) -> None:
    """Write ``page`` to ``path`` (UTF-8), renamed into place only once complete."""
    from embedcache.tables import atomic_output

    with (opener or atomic_output)(os.fspath(path), "w") as f:
        f.write(page)
