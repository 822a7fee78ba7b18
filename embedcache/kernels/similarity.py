"""Normalization, dense similarity matrices and the scores of listed pairs."""

from __future__ import annotations

import numpy as np

from embedcache._validation import as_float32, as_matrix, check_finite, check_metric, check_same_columns
from embedcache.errors import InvalidInputError, InvalidInputTypeError
from embedcache.kernels._core import _dense, _listed_pairs, _normalize_rows, _stats

__all__ = ["cosine_similarity", "dot_similarity", "normalize", "pair_scores"]


def normalize(x, *, out=None):
    """Scale every row to unit L2 norm (float64 accumulation); zero rows stay zero.

    x: array of shape (n, d), float16/float32/float64. out: optional float32 C-contiguous
    array of shape (n, d) to write into (may be ``x`` itself when x is float32).
    Returns a float32 array of shape (n, d).

    >>> normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    array([[0.6, 0.8],
           [0. , 0. ]], dtype=float32)
    """
    x = as_matrix(x, "x")
    check_finite(x, "x")
    if out is None:
        out = np.empty(x.shape, np.float32)
    elif not isinstance(out, np.ndarray) or out.dtype != np.float32:
        raise InvalidInputTypeError(
            f"out must be a float32 ndarray, got {getattr(out, 'dtype', type(out).__name__)}"
        )
    elif out.shape != x.shape:
        raise InvalidInputError(f"out must have shape {x.shape}, got {out.shape}")
    elif not out.flags.c_contiguous or not out.flags.writeable:
        raise InvalidInputError("out must be a writeable C-contiguous array")
    if x.shape[0]:
        src = x if x.dtype == np.float64 else x.astype(np.float32, copy=False)
        _normalize_rows(np.ascontiguousarray(src), out)
    return out


def _similarity(x, y, cosine: bool) -> np.ndarray:
    x32 = as_float32(x, "x")
    y32 = x32 if y is None else as_float32(y, "y")
    check_same_columns(x32, "x", y32, "y")
    inv_x, _ = _stats(x32, "x")
    inv_y = inv_x if y is None else _stats(y32, "y")[0]
    out = np.empty((x32.shape[0], y32.shape[0]), np.float32)
    if out.size:
        _dense(x32, y32, inv_x, inv_y, cosine, y is None, out)
    return out


def cosine_similarity(x, y=None):
    """Dense cosine similarity matrix, float32, clipped to [-1, 1].

    x: (n, d); y: (m, d) or None. Returns (n, m), or with ``y=None`` the (n, n)
    self-similarity matrix, exactly symmetric (one triangle computed, then mirrored).
    ``cosine_similarity(x, y) == cosine_similarity(y, x).T`` exactly, and every entry is
    the score top_k and similar_pairs give the same pair. A zero row has similarity 0
    with everything. Memory: the (n, m) result; for large inputs use :func:`top_k` or
    :func:`similar_pairs`, which use BLAS and never build the whole matrix.
    """
    return _similarity(x, y, cosine=True)


def dot_similarity(x, y=None):
    """Dense dot-product matrix, float32: ``x @ y.T`` (or ``x @ x.T``, exactly symmetric).

    >>> dot_similarity(np.array([[1.0, 2.0]]), np.array([[3.0, 4.0], [1.0, 0.0]]))
    array([[11.,  1.]], dtype=float32)
    """
    return _similarity(x, y, cosine=False)


def _check_index(name: str, idx: object, n: int, rows_of: str) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.size == 0:
        return np.empty(0, np.int64)
    if idx.dtype.kind not in "iu":
        raise InvalidInputTypeError(f"{name} must hold integers, got {idx.dtype}")
    if idx.ndim != 1:
        raise InvalidInputError(f"{name} must be a 1-D array, got shape {idx.shape}")
    bad = (idx < 0) | (idx >= n)
    if bad.any():
        raise InvalidInputError(f"{name} must index the {n} rows of {rows_of}, got {idx[bad][0]}")
    return idx.astype(np.int64, copy=False)


def pair_scores(x, i, j, *, y=None, metric="cosine"):
    """The score of each listed pair of rows: ``score(x[i[k]], y[j[k]])`` for every k.

    x: (n, d) float array; y: (m, d) float array, or None for pairs within x. i, j: integer
    arrays of one length. Returns float32 scores of that length, each the one
    :func:`cosine_similarity` / :func:`dot_similarity`, :func:`top_k` and
    :func:`similar_pairs` give the same pair, bit for bit. Only the rows named are read.

    >>> x = np.array([[1, 0], [1, 1], [3, 0]], dtype=np.float32)
    >>> pair_scores(x, [0, 0], [1, 2]).round(3)
    array([0.707, 1.   ], dtype=float32)
    """
    metric = check_metric(metric)
    x = as_matrix(x, "x")
    other = x if y is None else as_matrix(y, "y")
    check_same_columns(x, "x", other, "y")
    i = _check_index("i", i, x.shape[0], "x")
    j = _check_index("j", j, other.shape[0], "x" if y is None else "y")
    if len(i) != len(j):
        raise InvalidInputError(f"i and j must have the same length, got {len(i)} and {len(j)}")
    out = np.empty(len(i), np.float32)
    if not len(i):
        return out
    rows_a, ia = np.unique(i, return_inverse=True)
    rows_b, jb = np.unique(j, return_inverse=True)
    a = as_float32(x[rows_a], "x")
    b = as_float32(other[rows_b], "x" if y is None else "y")
    inv_a, inv_b = _stats(a, "x")[0], _stats(b, "y")[0]
    _listed_pairs(a, b, inv_a, inv_b, ia.reshape(-1), jb.reshape(-1), metric == "cosine", out)
    return out
