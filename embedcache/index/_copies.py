"""Exact copies: rows with the same bytes collapse to one distinct row before any search.

A row's key is a 16-byte BLAKE2b digest of its bytes; zero rows (similar to nothing, not
even to each other) are never collapsed. The digests of a store's rows can be computed
block by block anywhere (on the workers of a cluster) and collapsed on the client: the same
classes as from the whole array at once.
"""

from __future__ import annotations

import hashlib

import numpy as np


def row_digests(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(digests, nonzero)``: the 16-byte digest of each row's bytes (``S16``), and whether
    the row has a nonzero value (the digest of a zero row is not used)."""
    x = np.ascontiguousarray(x)
    nonzero = x.any(axis=1) if x.shape[1] else np.zeros(len(x), bool)
    digests = np.zeros(len(x), "S16")
    for r in np.flatnonzero(nonzero):
        digests[r] = hashlib.blake2b(x[r].tobytes(), digest_size=16).digest()
    return digests, nonzero


def classes(digests: np.ndarray, nonzero: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(inverse, first)`` of rows with equal digests (zero rows each alone), classes
    numbered in the order of their first row: ``inverse`` (n,) the class of each row,
    ``first`` the first row of each class."""
    n = len(digests)
    rep = np.arange(n, dtype=np.int64)
    nz = np.flatnonzero(nonzero)
    if len(nz):
        _, first_pos, inv = np.unique(digests[nz], return_index=True, return_inverse=True)
        rep[nz] = nz[first_pos[inv.reshape(-1)]]
    first = np.unique(rep)
    return np.searchsorted(first, rep).astype(np.int64), first.astype(np.int64)
