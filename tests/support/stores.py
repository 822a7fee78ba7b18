"""Small helpers shared by the vector store tests."""

from __future__ import annotations

import numpy as np

# 16-d float32 rows are 64 bytes: segments of at most 7 rows make every test multi-segment
SMALL = 7 * 16 * 4


def ids_of(n, prefix="r"):
    return [f"{prefix}{i}" for i in range(n)]


def vecs(n, d=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
