"""The progress bars of long jobs: tqdm on stderr, shown by default only on a terminal."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(progress: bool | None, total: float, desc: str, unit: str = "rows") -> Any:
    """A tqdm bar of ``total`` ``unit`` on stderr; ``progress`` None: shown when stderr is a
    terminal. Counts of comparisons (billions) are shown scaled (``1.2G``), others whole."""
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(total=total, desc=desc, unit=unit, disable=not show, file=sys.stderr, leave=False,
                unit_scale=unit == "comparisons")
