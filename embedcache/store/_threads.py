"""How many of the numba threads a step of the indexed search shares its work between."""

from __future__ import annotations

import numba

from embedcache import _config


def shares_for(work: int) -> int:
    """Threads for ``work`` rows times queries: one for each ``STORE_INDEX_SHARE_ROWS``, at
    most the numba threads (a small search stays on one: starting threads costs more)."""
    share = max(1, _config.STORE_INDEX_SHARE_ROWS)
    return max(1, min(numba.get_num_threads(), work // share))
