"""Keys and values of the embedding cache: how a text becomes a key, and a vector bytes.

Keys
    SHA-256 over a length-prefixed encoding of (format version, namespace, model,
    dimensions, text). Every field carries a tag and its byte length, so no two different
    tuples encode to the same bytes (model ``"a"`` + text ``"bc"`` is not model ``"ab"`` +
    text ``"c"``), and nothing is truncated. The database stores the 32 raw bytes; the public
    API speaks 64 hex digits.

Values
    A 48-byte header (magic ``b"ECv1"``, dtype code, dimension, a checksum: the sum of the
    payload's 32-bit words modulo 2**32, and the entry's own 32-byte key) followed by the raw
    little-endian float32 components. A value whose header, length, checksum or key does not
    match is a miss, never an error. Values are checked a block at a time with numpy.

Nothing here knows where values are kept; :func:`decode` is the one place that turns stored
values back into vectors.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedcache._validation import as_matrix, check_finite
from embedcache.errors import InvalidInputError, InvalidInputTypeError

#: Bumped whenever the key encoding or the value layout changes: old entries become misses.
FORMAT_VERSION = 1

_MAGIC = b"ECv1"
_DTYPE_FLOAT32 = 1
# magic, dtype code, 3 pad bytes, dimension, checksum of the payload, the entry's own key
_HEADER = struct.Struct("<4sB3xII32s")
HEADER_SIZE = _HEADER.size  # 48: keeps the payload 16-byte aligned within the value
_KEY_AT = 16
#: the largest dimension a value may have
MAX_DIM = 2**24
_FLOAT32_LE = np.dtype("<f4")
_LENGTH = struct.Struct(">Q")


# --------------------------------------------------------------------------- keys


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _LENGTH.pack(len(payload)) + payload


def utf8(s: str) -> bytes:
    """UTF-8 that also encodes lone surrogates, so that the encoding stays injective."""
    return s.encode("utf-8", "surrogatepass")


def _key_prefix(namespace: str, model: str, dimensions: int | None) -> Any:
    """A SHA-256 object fed with every field but the text, to be ``copy()``-ed per text."""
    for name, value in (("namespace", namespace), ("model", model)):
        if not isinstance(value, str):
            raise InvalidInputTypeError(f"{name} must be a str, got {type(value).__name__}")
    if dimensions is None:
        dims = _field(b"D", b"")
    elif isinstance(dimensions, (int, np.integer)) and not isinstance(dimensions, bool):
        dims = _field(b"I", str(int(dimensions)).encode("ascii"))
    else:
        raise InvalidInputTypeError(
            f"dimensions must be an int or None, got {type(dimensions).__name__}"
        )
    h = hashlib.sha256()
    h.update(_field(b"V", str(FORMAT_VERSION).encode("ascii")))
    h.update(_field(b"N", utf8(namespace)))
    h.update(_field(b"M", utf8(model)))
    h.update(dims)
    return h


def digests(namespace: str, model: str, dimensions: int | None, texts: Sequence[str]) -> list[bytes]:
    """The 32-byte key of each text (the text's field is inlined: this loop is on the hot path)."""
    prefix = _key_prefix(namespace, model, dimensions)
    copy, pack, out = prefix.copy, _LENGTH.pack, []
    for t in texts:
        b = utf8(t)
        h = copy()
        h.update(b"T" + pack(len(b)) + b)
        out.append(h.digest())
    return out


def parse_keys(keys: Sequence[str]) -> list[bytes]:
    """Public hex keys to the 32-byte form stored in the database."""
    if isinstance(keys, (str, bytes)):
        raise InvalidInputTypeError("keys must be a sequence of str keys, got a single key")
    out = []
    for i, k in enumerate(keys):
        if type(k) is not str:
            raise InvalidInputTypeError(f"keys[{i}] must be a str, got {type(k).__name__}")
        try:
            b = bytes.fromhex(k)
        except ValueError:
            b = b""
        if len(b) != 32:
            raise InvalidInputError(
                f"keys[{i}] must be a key from EmbeddingCache.make_key (64 hex digits), got {k!r:.80}"
            )
        out.append(b)
    return out


# --------------------------------------------------------------------------- vectors in


def float32_rows(x: object, name: str) -> np.ndarray:
    """``x`` as a finite, C-contiguous float32 (n, d) array with 1..MAX_DIM columns.

    Integer arrays are refused (an embedding is floating point); a float64 value beyond the
    float32 range counts as infinite.
    """
    if isinstance(x, np.ndarray) and x.dtype.kind in "iub":
        raise InvalidInputTypeError(f"{name} must be floating point, got dtype {x.dtype}")
    x = as_matrix(x, name)
    if x.shape[1] > MAX_DIM:
        raise InvalidInputError(f"{name} must have at most {MAX_DIM} columns, got shape {x.shape}")
    check_finite(x, name)
    return np.ascontiguousarray(x, dtype=np.float32)


# --------------------------------------------------------------------------- values


def _checksum(words: np.ndarray) -> np.ndarray:
    """Sum of the payload's little-endian uint32 words modulo 2**32, per row of ``words``."""
    return words.sum(axis=-1, dtype=np.uint32)


def _expected_header(dim: int) -> np.ndarray:
    """The first 12 header bytes of every valid value of dimension ``dim``."""
    return np.frombuffer(_HEADER.pack(_MAGIC, _DTYPE_FLOAT32, dim, 0, b"")[:12], dtype=np.uint8)


def _key_rows(keys: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)


def value_size(dim: int) -> int:
    """The length in bytes of every value of dimension ``dim``."""
    return HEADER_SIZE + 4 * dim


def encode(keys: list[bytes], vectors: np.ndarray) -> list[bytes]:
    """The value of each (key, row) of a finite float32 (n, d) array."""
    n, dim = vectors.shape
    buf = np.empty((n, value_size(dim)), dtype=np.uint8)
    buf[:, :12] = _expected_header(dim)
    buf[:, _KEY_AT : _KEY_AT + 32] = _key_rows(keys)
    payload = buf[:, HEADER_SIZE:].view(_FLOAT32_LE)
    payload[:] = vectors
    buf[:, 12:16].view("<u4")[:, 0] = _checksum(payload.view("<u4"))
    raw = buf.tobytes()
    size = buf.shape[1]
    return [raw[i * size : (i + 1) * size] for i in range(n)]


def _check_block(
    blobs: list[bytes], keys: list[bytes] | None, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """``ok`` (m,) bool: header, checksum and (unless ``keys`` is None) the embedded key
    match; and a float32 (m, dim) view of the payloads (rows where ``ok`` is False hold
    garbage). Every blob has the length of dimension ``dim``."""
    buf = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), value_size(dim))
    words = buf[:, HEADER_SIZE:].view("<u4")
    ok = (buf[:, :12] == _expected_header(dim)).all(axis=1)
    ok &= buf[:, 12:16].view("<u4")[:, 0] == _checksum(words)
    if keys is not None:
        ok &= (buf[:, _KEY_AT : _KEY_AT + 32] == _key_rows(keys)).all(axis=1)
    return ok, words.view(_FLOAT32_LE)


def first_dim(values: list[bytes | None]) -> int | None:
    """The dimension of the first valid value among ``values`` (its own key is not checked)."""
    for v in values:
        if v is None or len(v) <= HEADER_SIZE or (len(v) - HEADER_SIZE) % 4:
            continue
        dim = (len(v) - HEADER_SIZE) // 4
        if _check_block([v], None, dim)[0][0]:
            return dim
    return None


def _aligned(keys: list[bytes], values: list[bytes | None]) -> list[bytes | None]:
    """``values`` in the order of ``keys``, going by the key each value carries."""
    carried = {v[_KEY_AT : _KEY_AT + 32]: v for v in values if v is not None}
    return [carried.get(k) for k in keys]


def decode(keys: list[bytes], values: list[bytes | None], out: np.ndarray) -> np.ndarray:
    """Copy the valid values of dimension ``out.shape[1]`` into the rows of ``out``.

    keys, values: the keys asked for and the value the database gave for each (``None``:
        absent). The database is expected to give them in order, but SQL does not promise
        it: when a value turns up under another key's position, every value is placed by
        the key it carries instead.
    out: float32 (len(keys), dim); rows of keys not found are left as they are.

    Returns ``found``, (len(keys),) bool. A value of another length, a damaged value or a
    value that carries another key is not found.
    """
    n, dim = out.shape
    size = value_size(dim)
    found = np.zeros(n, dtype=bool)
    for attempt in range(2):
        if None not in values and set(map(len, values)) == {size}:  # type: ignore[arg-type]
            picked = None  # every value has the right length (the common case)
            ok, vecs = _check_block(values, keys, dim)  # type: ignore[arg-type]
        else:
            usable = [j for j, v in enumerate(values) if v is not None and len(v) == size]
            if not usable:
                return found
            picked = np.asarray(usable, dtype=np.int64)
            ok, vecs = _check_block([values[j] for j in usable], [keys[j] for j in usable], dim)  # type: ignore[misc]
        if ok.all() or attempt:
            break
        realigned = _aligned(keys, values)
        if realigned == values:
            break  # not out of order: damaged values, which are misses
        values = realigned
    if picked is None and ok.all():
        out[:] = vecs
        found[:] = True
    else:
        rows = np.flatnonzero(ok) if picked is None else picked[ok]
        out[rows] = vecs[ok]
        found[rows] = True
    return found
