"""Reading the replies of an OpenAI-compatible API: pure functions, bytes in, arrays out.

:func:`parse_embeddings` checks an ``/embeddings`` reply against the contract before anyone
sees it: one vector per input, placed by ``data[i].index`` (a permutation of the batch
positions; servers may reorder), base64 (little-endian float32) or plain float lists alike,
equal dimensions, the requested ``dimensions``, finite values. Anything else raises
:class:`~embedcache.errors.InvalidResponseError`.

>>> parse_embeddings(b'{"data": [{"index": 1, "embedding": [0, 1]}, {"index": 0, "embedding": "AACAPwAAAAA="}],'
...                  b' "usage": {"total_tokens": 3}}', 2)
Embeddings(vectors=array([[1., 0.],
       [0., 1.]], dtype=float32), tokens=3)
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, NamedTuple

import numpy as np

from embedcache.errors import InvalidResponseError

__all__ = ["Embeddings", "decode_vector", "parse_embeddings", "parse_models"]


class Embeddings(NamedTuple):
    """A checked ``/embeddings`` reply."""

    #: (n, d) float32, row ``i`` the vector of input ``i``
    vectors: np.ndarray
    #: tokens the server counted (``usage.total_tokens``, else ``prompt_tokens``; 0 if neither)
    tokens: int


try:  # about 3x faster on a reply of vectors (the server extra brings it)
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - the stdlib's alone
    _fast_loads = json.loads


def _loads(content: bytes) -> Any:
    try:
        return _fast_loads(content)
    except ValueError:  # the stdlib's reads what orjson refuses (NaN...), or says why not
        return json.loads(content)


def _json(content: bytes, what: str, status_code: int) -> Any:
    try:
        return _loads(content)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidResponseError(
            f"{what} -> {status_code}: reply is not valid JSON ({exc})", status_code=status_code
        ) from None


try:  # SIMD base64 (the server extra brings it): a 384-d vector in 0.3 us, not 5
    from pybase64 import b64decode as _b64decode
except ImportError:  # pragma: no cover - the stdlib's, as exact
    _b64decode = base64.b64decode


def decode_vector(embedding: object, where: str) -> np.ndarray:
    """One ``embedding`` field, a base64 string of little-endian float32 or a list of numbers,
    as a float32 vector; ``where`` starts the message of the error a bad one raises."""
    if isinstance(embedding, str):
        try:
            raw = _b64decode(embedding, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidResponseError(f"{where}: embedding is not valid base64") from None
        if len(raw) % 4:
            raise InvalidResponseError(
                f"{where}: base64 embedding has {len(raw)} bytes, expected a multiple of 4 (float32)"
            )
        return np.frombuffer(raw, dtype="<f4")
    if isinstance(embedding, list):
        try:
            arr = np.array(embedding)
        except (ValueError, TypeError, OverflowError):  # ragged nesting, e.g. [0.1, [0.2, 0.3]]
            raise InvalidResponseError(
                f"{where}: embedding must be a flat list of numbers, got a ragged nested list"
            ) from None
        if arr.ndim != 1 or arr.dtype.kind not in "fiu":
            raise InvalidResponseError(
                f"{where}: embedding must be a flat list of numbers, got array of dtype "
                f"{arr.dtype} and shape {arr.shape}"
            )
        with np.errstate(over="ignore"):
            return arr.astype(np.float32)
    raise InvalidResponseError(
        f"{where}: embedding must be a base64 string or a list of numbers, "
        f"got {type(embedding).__name__}"
    )


def _tokens(usage: object) -> int:
    if isinstance(usage, dict):
        t = usage.get("total_tokens", usage.get("prompt_tokens"))
        if isinstance(t, int) and not isinstance(t, bool) and t >= 0:
            return t
    return 0


def parse_embeddings(
    content: bytes, n: int, *, dimensions: int | None = None, status_code: int = 200
) -> Embeddings:
    """Check the body of an ``/embeddings`` reply to a batch of ``n`` texts; its vectors in
    input order and the tokens it counted. ``dimensions``: the length every vector must have
    (``None``: any, as long as all are equal and non-zero)."""
    what = "POST /embeddings"
    body = _json(content, what, status_code)
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise InvalidResponseError(f"{what}: reply has no 'data' list")
    if len(data) != n:
        raise InvalidResponseError(f"{what}: expected {n} embeddings, got {len(data)}")
    out = _base64_in_order(data, n)
    if out is None:
        out = _rows(data, n, what)
    dim = out.shape[1]
    if dim == 0:
        raise InvalidResponseError(f"{what}: embeddings are empty")
    if dimensions is not None and dim != dimensions:
        raise InvalidResponseError(f"{what}: requested dimensions={dimensions}, got {dim}-d embeddings")
    if not np.isfinite(out).all():
        bad = int(np.nonzero(~np.isfinite(out).all(axis=1))[0][0])
        raise InvalidResponseError(f"{what}: embedding {bad} has NaN or infinite values")
    return Embeddings(out, _tokens(body.get("usage")))


def _base64_in_order(data: list[Any], n: int) -> np.ndarray | None:
    """The common reply read at once: objects in index order whose embeddings are base64
    strings of one length without padding (whole float32 triples: d a multiple of 3, as
    384, 768, 1024, 1536 and 3072 are), decoded in one call; ``None`` for anything else, which
    :func:`_rows` reads item by item (and explains when it is wrong)."""
    try:
        strings = [item["embedding"] for item in data]
        indexes = [item["index"] for item in data]
    except (TypeError, KeyError):
        return None
    if n == 0 or not isinstance(strings[0], str):
        return None
    width = len(strings[0])
    if width == 0 or width % 4 or indexes != list(range(n)) or any(type(i) is not int for i in indexes):
        return None
    if any(type(s) is not str or len(s) != width for s in strings):
        return None
    text = "".join(strings)
    if "=" in text:
        return None
    try:
        raw = _b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) % (4 * n):
        return None
    return np.frombuffer(raw, dtype="<f4").reshape(n, -1).astype(np.float32)


def _rows(data: list[Any], n: int, what: str) -> np.ndarray:
    """The vectors of ``data``, item by item: placed by ``index``, base64 or float lists."""
    rows: list[np.ndarray | None] = [None] * n
    for k, item in enumerate(data):
        if not isinstance(item, dict):
            raise InvalidResponseError(f"{what}: data[{k}] must be an object, got {type(item).__name__}")
        idx = item.get("index")
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < n:
            raise InvalidResponseError(f"{what}: data[{k}].index must be an int in [0, {n}), got {idx!r}")
        if rows[idx] is not None:
            raise InvalidResponseError(f"{what}: index {idx} appears twice; indexes must be a permutation")
        rows[idx] = decode_vector(item.get("embedding"), f"{what}: data[{k}]")
    dims = {r.shape[0] for r in rows}  # type: ignore[union-attr]
    if len(dims) != 1:
        raise InvalidResponseError(f"{what}: embeddings of unequal dimensions {sorted(dims)}")
    return np.stack(rows).astype(np.float32, copy=False)  # type: ignore[arg-type]


def parse_models(content: bytes, status_code: int = 200) -> list[str]:
    """The model ids of a ``/models`` reply (``{"data": [{"id": ...}, ...]}``)."""
    body = _json(content, "GET /models", status_code)
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(
        isinstance(m, dict) and isinstance(m.get("id"), str) for m in data
    ):
        raise InvalidResponseError("GET /models: expected {'data': [{'id': str}, ...]}")
    return [m["id"] for m in data]
