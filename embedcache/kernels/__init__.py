"""Similarity kernels: normalize, similarity matrices, exact top-k and threshold pairs.

Arrays in, arrays out. Every public function is a thin validating wrapper
(:mod:`.similarity`, :mod:`.topk`, :mod:`.pairs`) over private ``@njit`` cores
(:mod:`._core`) that take only arrays and scalars. For many rows, dot products go through
BLAS (numpy's ``matmul``) on blocks sized for the caches; selection, heap merges and pair
collection run in numba ``prange`` loops where each thread writes its own buffer, merged at
the end. For a few queries, top_k streams the corpus once through all threads instead. The
number of threads follows numba's (``NUMBA_NUM_THREADS`` / :func:`numba.set_num_threads`);
results do not depend on it, nor on the block sizes (``embedcache._config``).

Scores
    ``metric="dot"``: the dot product of the float32 rows, accumulated in float32 in one
    fixed (vectorized) order; in float64 (then rounded) when ``|a| |b| > 2**120``, where
    float32 partial sums could overflow to infinity or NaN.
    ``metric="cosine"``: ``dot(a, b) * (1/|a| * 1/|b|)`` scaled in float64 (float64
    accumulation too for rows tiny or huge enough to underflow or overflow float32),
    clipped to [-1, 1] and rounded to float32. A zero vector has similarity 0 with everything,
    itself included. The same pair gets the same score bit for bit from every function.

Ties are broken by the lower index; pairs come highest score first, ties by i then j.
The first call of each kernel compiles it (a few seconds); compiled code is cached on disk
(``cache=True``), so later processes start fast.

>>> import numpy as np
>>> x = np.array([[1, 0], [1, 1], [0, 0], [-1, 0]], dtype=np.float32)
>>> cosine_similarity(x).round(3)
array([[ 1.   ,  0.707,  0.   , -1.   ],
       [ 0.707,  1.   ,  0.   , -0.707],
       [ 0.   ,  0.   ,  0.   ,  0.   ],
       [-1.   , -0.707,  0.   ,  1.   ]], dtype=float32)
>>> scores, idx = top_k(x[:1], x, k=2)
>>> idx
array([[0, 1]])
>>> i, j, s = similar_pairs(x, 0.5)
>>> i, j, s.round(3)
(array([0]), array([1]), array([0.707], dtype=float32))
"""

from __future__ import annotations

import os

# numba's OpenMP threads spin for milliseconds after each parallel loop, and so do BLAS's
# threads after each gemm; on few cores, alternating between the two pools then costs
# ~20 ms per hand-over. Passive waiting removes that. Set OMP_WAIT_POLICY yourself (before
# importing embedcache) to choose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


from embedcache.kernels._core import FASTMATH  # noqa: E402
from embedcache.kernels.pairs import meets_threshold, similar_pairs  # noqa: E402
from embedcache.kernels.similarity import (  # noqa: E402
    cosine_similarity,
    dot_similarity,
    normalize,
    pair_scores,
)
from embedcache.kernels.topk import top_k  # noqa: E402

__all__ = [
    "FASTMATH",
    "cosine_similarity",
    "dot_similarity",
    "meets_threshold",
    "normalize",
    "pair_scores",
    "similar_pairs",
    "top_k",
]
