"""Shared hypothesis strategies: awkward embedding matrices a person would not think of."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

#: Small integers make every float32 dot product exact, so results can be compared with a
#: reference bit for bit, ties included.
small_ints = st.integers(min_value=-3, max_value=3).map(float)
#: Finite float32 values of moderate size (no overflow of squared norms).
moderate_floats = st.floats(
    min_value=-100.0, max_value=100.0, allow_nan=False, allow_infinity=False, width=32
)


@st.composite
def matrices(draw, *, max_rows=12, min_rows=0, dim=None, max_dim=6, elements=None):
    """float32 (n, d) matrices with zero rows and duplicated rows mixed in."""
    d = dim if dim is not None else draw(st.integers(1, max_dim))
    n = draw(st.integers(min_rows, max_rows))
    elements = elements if elements is not None else st.one_of(small_ints, moderate_floats)
    x = draw(hnp.arrays(np.float32, (n, d), elements=elements))
    if n >= 2 and draw(st.booleans()):
        x[draw(st.integers(0, n - 1))] = 0.0
    if n >= 2 and draw(st.booleans()):
        x[draw(st.integers(0, n - 1))] = x[draw(st.integers(0, n - 1))]
    return x


@st.composite
def matrix_pairs(draw, *, max_rows=12, min_rows=0, max_dim=6, elements=None):
    """Two matrices with the same number of columns."""
    d = draw(st.integers(1, max_dim))
    a = draw(matrices(max_rows=max_rows, min_rows=min_rows, dim=d, elements=elements))
    b = draw(matrices(max_rows=max_rows, min_rows=min_rows, dim=d, elements=elements))
    return a, b
