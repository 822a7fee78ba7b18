"""The codes of a store index's rows, and of its centroids.

The 8-bit codes (:class:`Codes`): each holds a row's offset from its cell's centroid (the row
scaled to unit length first) in the leading ``m`` directions of those offsets' principal
axes (as many as hold ``STORE_INDEX_CODE_ENERGY`` of their energy, measured at build time),
8 bits each with one scale per row, so ``gain * (query . centroid + scale * (query . basis)
. code)`` approximates the row's score (times ``|query|`` for cosine, the same for every row
of a query), closest where a cell's rows are closest together (near-duplicates,
near-identical blocks). A row reads ``m + 8`` bytes instead of ``4 d`` (``2 d`` for a
float16 store).

The 1-bit codes (:class:`Signs`): the signs of the same offsets in a random rotation of
those ``m`` directions, with one factor per row, estimated against the query in 4 bits
(popcounts of the row's bits with each of the query's 4 bit planes, the estimator of RaBitQ,
Gao and Long, SIGMOD 2024): ``m / 8 + 16`` bytes a row, the bits of 64 rows stored word by
word so that one vector instruction counts the bits of several rows.

The centroids have an 8-bit copy too (:class:`Coarse`), from which a query's nearest cells
are bounded before the few near the boundary are scored exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from embedcache.kernels._core import FASTMATH, _row_stats_chunk

#: largest code magnitude: codes are symmetric, -127 .. 127
CODE_MAX = 127
#: a query's estimate against the 1-bit codes uses this many bit planes (0 .. 15 levels;
#: :func:`._probe._fold_signs` reads four)
QUERY_BITS = 4


#: rows whose bits are stored together, word by word (:class:`Signs`)
SIGN_BLOCK = 64


@njit(inline="always", fastmath=FASTMATH)
def _dot_i8(qq, code):
    """``qq . code`` for an int8 ``code`` (a row's or a centroid's), summed in float32."""
    acc = np.float32(0.0)
    for t in range(code.shape[0]):
        acc += qq[t] * np.float32(code[t])
    return acc


@dataclass
class Signs:
    """The 1-bit codes of an index's rows, in cell order: ``bits`` (ceil(n / 64), w, 64)
    uint64, word t of row j at ``bits[j // 64, t, j % 64]`` (``w = ceil(m / 64)`` words a row;
    bit i of the row, set where the row's offset is >= 0 in direction i of ``axes``, is bit
    ``i % 64`` of word ``i // 64``; the higher bits of the last word and the rows past n are
    clear); ``fac`` (ceil(n / 64), 3, 64) float32: each row's gain, its factor and ``2 *
    (bits set) - m``, at ``fac[j // 64, :, j % 64]`` (a block's rows together, 0 past n):
    the row's estimate is ``gain * (query . centroid + factor * (signs . query in 4 bits))``.
    ``axes`` (m, d) float32: the rotated directions (orthonormal rows)."""

    bits: np.ndarray
    fac: np.ndarray
    axes: np.ndarray

    @property
    def words(self) -> int:
        return self.bits.shape[1]


@dataclass
class Codes:
    """The 8-bit codes of an index's rows, in cell order: ``codes`` (n, m) int8, ``fac``
    (n, 2) float32 (each row's scale and gain) and ``axes`` (m, d) float32 (orthonormal
    rows: the basis of :func:`code_basis`, transposed once for the searches): row i is about
    ``gain * (centroid + scale * axes.T @ codes[i])`` (gain 1 for cosine, the row's norm for
    dot)."""

    codes: np.ndarray
    fac: np.ndarray
    axes: np.ndarray
    signs: Signs | None = None  # None: an index written before 1-bit codes existed


def residuals(x: np.ndarray, centroids: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each row scaled to unit length minus its cell's centroid (rows, d) float32, the rows'
    inverse norms); a zero row's offset is minus its centroid."""
    x = np.asarray(x, dtype=np.float32)
    inv = _inverse_norms(x)
    resid = (x * inv[:, None]).astype(np.float32)  # float64 first: no overflow
    resid -= centroids[cell]
    return resid, inv


def code_basis(gram: np.ndarray, energy: float) -> np.ndarray:
    """(d, m) float32: the leading principal axes of offsets whose (uncentred) Gram matrix
    ``resid.T @ resid`` is ``gram`` (d, d), as many as hold ``energy`` of their sum of
    squares, ``m`` rounded up to a multiple of 16."""
    d = gram.shape[0]
    w, v = np.linalg.eigh(gram)
    order = np.argsort(-w, kind="stable")
    w, v = np.maximum(w[order], 0.0), v[:, order]
    total = w.sum()
    m = d if total <= 0 else int(np.searchsorted(np.cumsum(w) / total, min(energy, 1.0) - 1e-12)) + 1
    m = min(d, -(-m // 16) * 16)
    return np.ascontiguousarray(v[:, :m], dtype=np.float32)


def spin(basis: np.ndarray, seed: int) -> np.ndarray:
    """(d, m) float32: ``basis`` (d, m) turned by a random rotation of its ``m`` directions
    (the same directions' span, its energy spread evenly over them, as 1-bit codes need)."""
    m = basis.shape[1]
    g = np.random.default_rng([seed, 13]).standard_normal((m, m))
    r, upper = np.linalg.qr(g)
    r *= np.where(np.diag(upper) < 0, -1.0, 1.0)[None, :]  # the uniform (Haar) rotation
    return np.ascontiguousarray(basis.astype(np.float64) @ r, dtype=np.float32)


def words_for(m: int) -> int:
    """uint64 words holding ``m`` bits."""
    return -(-m // 64)


def pack_bits(on: np.ndarray) -> np.ndarray:
    """(rows, words_for(m)) uint64 of a (rows, m) bool array: bit t in bit ``t % 64`` of
    word ``t // 64``."""
    rows, m = on.shape
    out = np.zeros((rows, words_for(m) * 8), np.uint8)
    out[:, : -(-m // 8)] = np.packbits(on, axis=1, bitorder="little")
    return out.view("<u8")


def encode_signs(x: np.ndarray, centroids: np.ndarray, cell: np.ndarray, cosine: bool,
                 axes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bits (ceil(rows / 64), words, 64) uint64, factors (ceil(rows / 64), 3, 64) float32):
    the :class:`Signs` of rows ``x`` of cells ``cell`` in the rotated directions ``axes`` (d, m),
    for rows starting at a multiple of 64. A row's factor ``|r|^2 / sum |r_t|`` (r: its
    offset in those directions) turns the dot product of the query with the row's signs
    into an estimate of the query's product with the offset (0 for a zero offset)."""
    unit, inv = residuals(x, centroids, cell)
    r = (unit @ axes).astype(np.float64)
    rows, m = r.shape
    bits = _in_blocks(pack_bits(r >= 0))  # (rows, words) -> (blocks, words, 64)
    l1 = np.abs(r).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(l1 > 0, (r * r).sum(axis=1) / l1, 0.0)
    fac = np.zeros((rows, 3), np.float32)
    fac[:, 0] = _gains(inv, cosine)
    fac[:, 1] = f
    fac[:, 2] = 2 * (r >= 0).sum(axis=1) - m
    return bits, block_factors(fac)


def block_factors(fac: np.ndarray) -> np.ndarray:
    """Rows' 1-bit factors (n, 3 or more) float32 -> (ceil(n / 64), 3, 64), the layout of
    :class:`Signs` (the first three of each row; 0 past n)."""
    return _in_blocks(np.asarray(fac[:, :3], np.float32))


def _in_blocks(per_row: np.ndarray) -> np.ndarray:
    """(rows, c) -> (ceil(rows / 64), c, 64): the values of each 64 rows together, column by
    column (rows past the last: 0)."""
    rows, c = per_row.shape
    padded = np.zeros((-(-rows // SIGN_BLOCK) * SIGN_BLOCK, c), per_row.dtype)
    padded[:rows] = per_row
    return np.ascontiguousarray(padded.reshape(-1, SIGN_BLOCK, c).transpose(0, 2, 1))


def query_planes(projected: np.ndarray, words: int) -> tuple[np.ndarray, np.ndarray]:
    """The queries' rotated products ``projected`` (q, m) in ``QUERY_BITS`` bits: (planes (q,
    QUERY_BITS, words) uint64: bit t of plane p set where level ``u_t`` has bit p; terms (q,
    3) float32: ``2 * step``, ``low``, ``step * sum u``), for levels ``u_t = round((x_t - low)
    / step)`` in 0 .. 15 between the query's smallest and largest product."""
    nq = projected.shape[0]
    planes = np.zeros((nq, QUERY_BITS, words), np.uint64)
    terms = np.empty((nq, 3), np.float32)
    _quantize(np.ascontiguousarray(projected, np.float32), planes, terms)
    return planes, terms


@njit(cache=True)
def _quantize(projected, planes, terms):
    """:func:`query_planes` into ``planes`` (clear) and ``terms``."""
    nq, m = projected.shape
    top = (1 << QUERY_BITS) - 1
    for q in range(nq):
        low = high = projected[q, 0] if m else np.float32(0.0)
        for t in range(m):
            low = min(low, projected[q, t])
            high = max(high, projected[q, t])
        step = (high - low) / np.float32(top)
        if not step > 0:
            step = np.float32(1.0)
        total = 0
        for t in range(m):
            level = np.int64(min(max(np.rint((projected[q, t] - low) / step), np.float32(0.0)), np.float32(top)))
            total += level
            for b in range(QUERY_BITS):
                if (level >> b) & 1:
                    planes[q, b, t // 64] |= np.uint64(1) << np.uint64(t % 64)
        terms[q, 0] = 2 * step
        terms[q, 1] = low
        terms[q, 2] = step * np.float64(total)


def encode(x: np.ndarray, centroids: np.ndarray, cell: np.ndarray, cosine: bool,
           basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes (rows, m) int8, factors (rows, 2) float32: scale, gain) of rows ``x`` of cells
    ``cell`` in the ``basis`` (d, m)."""
    unit, inv = residuals(x, centroids, cell)
    resid = unit @ basis
    codes, scale = _in_8_bits(resid)
    fac = np.empty((len(resid), 2), np.float32)
    fac[:, 0] = scale
    fac[:, 1] = _gains(inv, cosine)
    return codes, fac


def _in_8_bits(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes (rows, c) int8, scale (rows,) float32): each row of ``x`` (computed in its own
    dtype) about ``scale * codes``, its largest magnitude at ``CODE_MAX``."""
    top = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(len(x), x.dtype)
    scale = (top / CODE_MAX).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0)).astype(x.dtype)
    return np.clip(np.rint(x / safe[:, None]), -CODE_MAX, CODE_MAX).astype(np.int8), scale


def _gains(inv: np.ndarray, cosine: bool) -> np.ndarray:
    """Each row's gain: 1 for cosine, else its norm within float32 (a larger one would make
    every estimate inf or NaN); ``inv``: the rows' inverse norms."""
    if cosine:
        return np.ones(len(inv), np.float32)
    with np.errstate(divide="ignore"):
        return np.minimum(np.where(inv > 0, 1.0 / inv, 0.0), np.finfo(np.float32).max).astype(np.float32)


def _inverse_norms(x: np.ndarray) -> np.ndarray:
    """1/|x_i| (0 for a zero row) by the kernels' own function (rows already checked finite)."""
    inv = np.empty(x.shape[0], np.float64)
    _row_stats_chunk(x, inv, np.empty(x.shape[0], np.float64))
    return inv


@dataclass
class Coarse:
    """The centroids in 8 bits, for ranking them against a few queries: ``codes`` (cells, d)
    int8, ``scale`` (cells,) float32 (centroid c is about ``scale[c] * codes[c]``) and
    ``err`` (cells,) float64, each one's distance from that, ``|c - scale[c] * codes[c]|``,
    rounded up."""

    codes: np.ndarray
    scale: np.ndarray
    err: np.ndarray


def coarse(centroids: np.ndarray) -> Coarse:
    """The :class:`Coarse` copy of float32 ``centroids`` (cells, d)."""
    c = np.asarray(centroids, np.float64)
    codes, scale = _in_8_bits(c)
    err = np.linalg.norm(c - scale[:, None].astype(np.float64) * codes, axis=1) * (1 + 2.0**-20)
    return Coarse(codes, scale, err)
