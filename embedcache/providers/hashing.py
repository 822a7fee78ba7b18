"""The built-in offline embedder: signed feature hashing of character n-grams.

No model, no network, no randomness: the same text gives the same vector in every process
and on every machine, because n-grams are hashed with our own 64-bit FNV-1a over their UTF-8
bytes (never Python's salted ``hash()``).

Text is brought to Unicode normalization form NFKC first, so canonically equivalent
spellings (``"caf\\u00e9"`` and ``"cafe\\u0301"``) and compatibility forms (full-width letters,
ligatures) give the same vector. Each n-gram adds its weight to ``_PROBES`` buckets (with
their own signs): a text of one or two characters has a single n-gram or a few, and with one
bucket each there would be only ``2 * dimensions`` different vectors for all of them.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import numba
import numpy as np

from embedcache.errors import InvalidInputError, InvalidInputTypeError
from embedcache._validation import check_int
from embedcache.providers.base import BatchCallback, Usage, validate_texts

__all__ = ["HashingEmbeddings"]

# Bumped whenever a change to this module changes the vectors it returns.
# 2: NFKC normalization; each n-gram in _PROBES buckets
_ALGORITHM_VERSION = 2
#: buckets (each with its own sign) that every n-gram adds its weight to
_PROBES = 4

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_MIX1 = np.uint64(0xFF51AFD7ED558CCD)
_MIX2 = np.uint64(0xC4CEB9FE1A85EC53)
# splitmix64 constants: the probes of one n-gram hash
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SPLIT1 = np.uint64(0xBF58476D1CE4E5B9)
_SPLIT2 = np.uint64(0x94D049BB133111EB)


@numba.njit(cache=True, inline="always")
def _fnv_byte(h, b):
    return (h ^ np.uint64(b)) * _FNV_PRIME


@numba.njit(cache=True)
def _hash_ngram(cps, start, n):
    """FNV-1a over the UTF-8 bytes of code points ``cps[start:start+n]``, then a
    murmur3 finalizer so that the low bits are as well mixed as the high ones."""
    h = _FNV_OFFSET
    for k in range(start, start + n):
        c = np.uint32(cps[k])
        if c < 0x80:
            h = _fnv_byte(h, c)
        elif c < 0x800:
            h = _fnv_byte(h, 0xC0 | (c >> 6))
            h = _fnv_byte(h, 0x80 | (c & 0x3F))
        elif c < 0x10000:
            h = _fnv_byte(h, 0xE0 | (c >> 12))
            h = _fnv_byte(h, 0x80 | ((c >> 6) & 0x3F))
            h = _fnv_byte(h, 0x80 | (c & 0x3F))
        else:
            h = _fnv_byte(h, 0xF0 | (c >> 18))
            h = _fnv_byte(h, 0x80 | ((c >> 12) & 0x3F))
            h = _fnv_byte(h, 0x80 | ((c >> 6) & 0x3F))
            h = _fnv_byte(h, 0x80 | (c & 0x3F))
    h ^= h >> np.uint64(33)
    h *= _MIX1
    h ^= h >> np.uint64(33)
    h *= _MIX2
    h ^= h >> np.uint64(33)
    return h


@numba.njit(cache=True, inline="always")
def _probe(h, p):
    """The ``p``-th probe of n-gram hash ``h``: a splitmix64 step from ``h + (p + 1) * golden``;
    bit 0 is the sign, the rest picks the bucket."""
    z = h + np.uint64(p + 1) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _SPLIT1
    z = (z ^ (z >> np.uint64(27))) * _SPLIT2
    return z ^ (z >> np.uint64(31))


@numba.njit(parallel=True, cache=True)
def _embed_codepoints(cps, offsets, dim, lo, hi, probes, out):
    """Fill ``out[i]`` with the L2-normalized signed hashed n-gram vector of text ``i``.

    cps: uint32 code points of all texts, concatenated; offsets: int64 (n + 1,) bounds.
    Each distinct n-gram of a text adds sign * (1 + log(count)) to each of its ``probes``
    buckets; the sum runs over the text's n-grams in sorted hash order, so the result does
    not depend on the thread count.
    """
    n_texts = offsets.shape[0] - 1
    udim = np.uint64(dim)
    for i in numba.prange(n_texts):
        a = offsets[i]
        length = offsets[i + 1] - a
        total = 0
        for n in range(lo, hi + 1):
            if length >= n:
                total += length - n + 1
        if total == 0:  # shorter than the shortest n-gram: the whole text is one gram
            hashes = np.empty(1, dtype=np.uint64)
            hashes[0] = _hash_ngram(cps, a, length)
        else:
            hashes = np.empty(total, dtype=np.uint64)
            m = 0
            for n in range(lo, hi + 1):
                for s in range(a, a + length - n + 1):
                    hashes[m] = _hash_ngram(cps, s, n)
                    m += 1
        hashes.sort()
        row = out[i]
        row[:] = 0.0
        acc = np.zeros(dim, dtype=np.float64)
        k = 0
        while k < hashes.shape[0]:
            h = hashes[k]
            run = 1
            while k + run < hashes.shape[0] and hashes[k + run] == h:
                run += 1
            weight = 1.0 + np.log(run)
            for p in range(probes):
                z = _probe(h, p)
                bucket = (z >> np.uint64(1)) % udim
                if z & np.uint64(1):
                    acc[bucket] -= weight
                else:
                    acc[bucket] += weight
            k += run
        norm = 0.0
        for j in range(dim):
            norm += acc[j] * acc[j]
        if norm > 0.0:
            inv = 1.0 / np.sqrt(norm)
            for j in range(dim):
                row[j] = acc[j] * inv


def _prepare(text: str, lowercase: bool) -> str:
    text = unicodedata.normalize("NFKC", text)
    if lowercase:  # lowercasing can leave text that is not NFKC: normalize again
        text = unicodedata.normalize("NFKC", text.lower())
    return " " + " ".join(text.split()) + " "


class HashingEmbeddings:
    """Offline embedder: signed feature hashing of character n-grams, numba-accelerated.

    It finds **lexical** near-duplicates — texts that share most of their character
    n-grams (typos, re-punctuation, small edits, boilerplate) — **not semantic** ones:
    "a car" and "an automobile" are far apart. Use a real model
    (:class:`OpenAIEmbeddings`, :class:`LocalEmbeddings`) for meaning.

    Each text is brought to Unicode form NFKC, (optionally) lowercased, its whitespace runs
    collapsed to one space and padded with a space on both sides; every character n-gram
    with ``ngram_range[0] <= n <= ngram_range[1]`` is hashed (64-bit FNV-1a over UTF-8
    bytes) to 4 buckets, each with a sign; a distinct n-gram seen ``c`` times adds
    ``±(1 + log c)`` to each of its buckets; rows are L2-normalized. A text shorter than
    the shortest n-gram is one n-gram. Deterministic across processes, machines and thread
    counts.

    dimensions: output dimension. Larger lowers hash collisions (more memory per vector).
    ngram_range: (min, max) n-gram lengths in characters.
    lowercase: fold case before hashing.
    batch_size: texts per ``on_batch`` call.

    >>> emb = HashingEmbeddings(dimensions=64)
    >>> X = emb.embed(["kitten", "kitten!", "quantum chromodynamics"])
    >>> X.shape, X.dtype.name
    ((3, 64), 'float32')
    >>> bool(X[0] @ X[1] > X[0] @ X[2])
    True
    """

    def __init__(
        self,
        dimensions: int = 512,
        *,
        ngram_range: tuple[int, int] = (3, 5),
        lowercase: bool = True,
        batch_size: int = 4096,
    ) -> None:
        dimensions = check_int("dimensions", dimensions, 1)
        batch_size = check_int("batch_size", batch_size, 1)
        try:
            lo, hi = (int(v) for v in ngram_range)
        except (TypeError, ValueError):
            raise InvalidInputTypeError(
                f"ngram_range must be a pair of ints, got {ngram_range!r}"
            ) from None
        if not 1 <= lo <= hi:
            raise InvalidInputError(f"ngram_range must satisfy 1 <= min <= max, got {ngram_range!r}")
        self.dimensions: int = dimensions
        self.ngram_range = (lo, hi)
        self.lowercase = bool(lowercase)
        self.batch_size = int(batch_size)
        self.model = f"hashing-char-{lo}-{hi}"
        self.cache_namespace = (
            f"hashing|v{_ALGORITHM_VERSION}|dim={self.dimensions}|ngram={lo}-{hi}"
            f"|lowercase={int(self.lowercase)}"
        )
        self.usage = Usage()

    def __repr__(self) -> str:
        return (
            f"HashingEmbeddings(dimensions={self.dimensions}, ngram_range={self.ngram_range}, "
            f"lowercase={self.lowercase})"
        )

    def embed(self, texts: Sequence[str], *, on_batch: BatchCallback | None = None) -> np.ndarray:
        """Embed ``texts``: array of shape (n, dimensions), float32, unit rows, in input order.

        ``on_batch(positions, vectors)`` is called after each ``batch_size`` texts.
        """
        items = validate_texts(texts)
        out = np.empty((len(items), self.dimensions), dtype=np.float32)
        lo, hi = self.ngram_range
        for start in range(0, len(items), self.batch_size):
            chunk = [_prepare(t, self.lowercase) for t in items[start : start + self.batch_size]]
            lengths = np.fromiter((len(t) for t in chunk), dtype=np.int64, count=len(chunk))
            offsets = np.zeros(len(chunk) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            cps = np.frombuffer("".join(chunk).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            block = out[start : start + len(chunk)]
            _embed_codepoints(cps, offsets, self.dimensions, lo, hi, _PROBES, block)
            self.usage.add(requests=1)
            if on_batch is not None:
                on_batch(np.arange(start, start + len(chunk), dtype=np.int64), block)
        return out
