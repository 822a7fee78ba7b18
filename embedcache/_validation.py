"""Every argument check of the package, written once.

Each kind of bad input has one message and one exception class, whichever public function
receives it: a ``k`` of ``0`` says ``k must be >= 1, got 0`` from :func:`~embedcache.top_k`,
:meth:`~embedcache.VectorStore.search` and :func:`~embedcache.knn_graph` alike. Messages say
what was expected and what came (``name must be ..., got ...``).

>>> check_k(3)
3
>>> check_threshold(1.5)
Traceback (most recent call last):
...
embedcache.errors.InvalidInputError: threshold must be in [-1, 1] for cosine, got 1.5
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np

from embedcache.errors import DimensionMismatchError, InvalidInputError, InvalidInputTypeError

__all__ = [
    "METRICS",
    "as_float32",
    "as_matrix",
    "check_choice",
    "check_finite",
    "check_int",
    "check_k",
    "check_metric",
    "check_number",
    "check_same_columns",
    "check_threshold",
]

#: the similarity measures every function that scores vectors understands
METRICS = ("cosine", "dot")

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int, refusing bools, non-integers and values below ``minimum``.

    >>> check_int("batch_size", 2.0, 1)
    Traceback (most recent call last):
    ...
    embedcache.errors.InvalidInputTypeError: batch_size must be an int, got float
    """
    if not _is_int(value):
        raise InvalidInputTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:  # type: ignore[operator]
        raise InvalidInputError(f"{name} must be >= {minimum}, got {value}")
    return int(value)  # type: ignore[arg-type]


def check_k(k: object, name: str = "k") -> int:
    """A number of neighbours: an int >= 1."""
    return check_int(name, k, 1)


def check_number(name: str, value: object) -> float:
    """A finite real number (bools refused) as a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidInputTypeError(f"{name} must be a number, got {type(value).__name__}")
    x = float(value)
    if not math.isfinite(x):
        raise InvalidInputError(f"{name} must be finite, got {value}")
    return x


def check_gap(gap: object) -> float:
    """A score gap: a number >= 0 (inf allowed: every listed cell), as a float."""
    if isinstance(gap, (bool, np.bool_)) or not isinstance(gap, (int, float, np.integer, np.floating)):
        raise InvalidInputTypeError(f"gap must be a number, got {type(gap).__name__}")
    x = float(gap)
    if not x >= 0:
        raise InvalidInputError(f"gap must be >= 0, got {gap}")
    return x


def check_threshold(threshold: object, metric: str = "cosine") -> float:
    """A similarity threshold: a finite number, within [-1, 1] for cosine."""
    t = check_number("threshold", threshold)
    if metric == "cosine" and not -1.0 <= t <= 1.0:
        raise InvalidInputError(f"threshold must be in [-1, 1] for cosine, got {threshold}")
    return t


def check_choice(name: str, value: object, choices: Collection[str]) -> str:
    """One of ``choices`` (strings), else InvalidInputError listing them."""
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise InvalidInputError(f"{name} must be one of {listed}, got {value!r}")
    return value


def check_metric(metric: object) -> str:
    """``"cosine"`` or ``"dot"``."""
    return check_choice("metric", metric, METRICS)


def as_matrix(x: object, name: str) -> np.ndarray:
    """``x`` as a 2-D array of real numbers with at least one column.

    float16, float32 and float64 arrays (memmaps included) come back as they are, without a
    copy; integer arrays are converted to float32. Anything else raises
    InvalidInputTypeError (wrong kind) or InvalidInputError (wrong shape).
    """
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise InvalidInputTypeError(
                f"{name} must be a 2-D array of real numbers (n, d), got {type(x).__name__}"
            ) from exc
    if x.dtype.kind in "iu":
        x = x.astype(np.float32)
    elif x.dtype not in _FLOATS:
        raise InvalidInputTypeError(
            f"{name} must be a 2-D array of real numbers (n, d), got dtype {x.dtype}"
        )
    if x.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2-D array (n, d), got shape {x.shape}")
    if x.shape[1] == 0:
        raise InvalidInputError(f"{name} must have at least one column, got shape {x.shape}")
    return x


_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).smallest_subnormal)


def check_finite(x: np.ndarray, name: str, block: int = 8192) -> None:
    """Raise InvalidInputError naming ``name`` and the first row holding NaN or infinity, or
    (in a wider float type) a value beyond float32's range, which the computations use.
    Reads ``x`` block by block, so a memmap is never loaded whole."""
    wide = x.dtype.kind == "f" and x.dtype.itemsize > 4
    for start in range(0, x.shape[0], block):
        part = x[start : start + block]
        ok = np.isfinite(part).all(axis=1)
        if not ok.all():
            bad = start + int(np.flatnonzero(~ok)[0])
            raise InvalidInputError(f"{name} must be finite, got NaN or infinity in row {bad}")
        if wide:
            big = (np.abs(part) > _F32_MAX).any(axis=1)
            if big.any():
                bad = int(np.flatnonzero(big)[0])
                value = part[bad][np.abs(part[bad]) > _F32_MAX][0]
                raise InvalidInputError(f"{name} must fit float32 (magnitudes up to {_F32_MAX:.4g}), got "
                                        f"{value:.4g} in row {start + bad}")
            lost = (part != 0).any(axis=1) & ~(np.asarray(part, np.float32) != 0).any(axis=1)
            if lost.any():  # every value below float32's least: the row would become a zero vector
                bad = int(np.flatnonzero(lost)[0])
                value = part[bad][part[bad] != 0][0]
                raise InvalidInputError(f"{name} must fit float32: row {start + bad} holds only values below its "
                                        f"least magnitude ({_F32_TINY:.4g}), such as {value:.4g}, and would "
                                        "become a zero vector; scale it up")


def as_float32(x: object, name: str) -> np.ndarray:
    """Validated, finite, C-contiguous float32 (``x`` itself when it already is one)."""
    x = as_matrix(x, name)
    check_finite(x, name)
    return np.ascontiguousarray(x, dtype=np.float32)


def check_same_columns(x: np.ndarray, x_name: str, y: np.ndarray, y_name: str) -> None:
    """Raise DimensionMismatchError unless the 2-D arrays ``x`` and ``y`` have as many columns.

    >>> check_same_columns(np.ones((2, 3)), "queries", np.ones((4, 2)), "corpus")
    Traceback (most recent call last):
    ...
    embedcache.errors.DimensionMismatchError: queries and corpus must have the same number of columns, got 3 and 2
    """
    if x.shape[1] != y.shape[1]:
        raise DimensionMismatchError(
            f"{x_name} and {y_name} must have the same number of columns, "
            f"got {x.shape[1]} and {y.shape[1]}"
        )


def check_positive(name: str, value: object) -> float:
    """A number > 0 (bools refused) as a float; infinity is allowed and means no limit.

    >>> check_positive("timeout", 0)
    Traceback (most recent call last):
    ...
    embedcache.errors.InvalidInputError: timeout must be > 0, got 0
    """
    if isinstance(value, (float, np.floating)) and value == math.inf:
        return math.inf
    x = check_number(name, value)
    if not x > 0:
        raise InvalidInputError(f"{name} must be > 0, got {value}")
    return x
