"""Items to vectors: texts, arrays and stores reduced to their distinct vectors.

Texts are embedded (exact duplicate texts collapsed first, so each distinct text is
embedded once); a :class:`~embedcache.VectorStore` is read as its live ids, vectors and
texts, all from one committed state, in the order of ``store.ids()``; rows with equal
vectors are collapsed too.
"""

from __future__ import annotations

from collections.abc import KeysView, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedcache import kernels
from embedcache._progress import progress_bar as _progress_bar
from embedcache._validation import as_matrix, check_finite
from embedcache.cache import CachedEmbedder
from embedcache.index._copies import classes, row_digests
from embedcache.errors import InvalidInputTypeError
from embedcache.providers._window import DEFAULT_LONG_TEXTS, check_long_texts
from embedcache.providers.base import normalize_text, validate_texts
from embedcache.store import VectorStore


#: how a workflow searches: exactly, through a partition index, or chosen by size
METHODS = ("auto", "exact", "partitioned")


def _method(method: object, rows: int) -> str:
    """``"exact"`` or ``"partitioned"``: what ``method`` means for ``rows`` distinct rows
    (``"auto"``: exact up to ``_config.INDEX_AUTO_ROWS`` rows, where exact is fast)."""
    from embedcache import _config
    from embedcache._validation import check_choice

    method = check_choice("method", method, METHODS)
    if method == "auto":
        return "partitioned" if rows > _config.INDEX_AUTO_ROWS else "exact"
    return method



@dataclass
class _Prepared:
    """Items reduced to their distinct vectors."""

    x: np.ndarray  # (u, d) float32, one row per distinct item (as given, not normalized)
    inverse: np.ndarray  # (n,) item -> row of x
    first: np.ndarray  # (u,) first item of each row
    texts: list[str] | None
    ids: list[str] | None

    @property
    def n(self) -> int:
        return len(self.inverse)

    def scores(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """The kernels' score of each pair of items ``(i[k], j[k])``."""
        return kernels.pair_scores(self.x, self.inverse[i], self.inverse[j])


def _collapse(keys: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(inverse, first) of equal keys, in first-seen order."""
    seen: dict[Any, int] = {}
    inverse = np.empty(len(keys), dtype=np.int64)
    first: list[int] = []
    for k, key in enumerate(keys):
        u = seen.setdefault(key, len(first))
        if u == len(first):
            first.append(k)
        inverse[k] = u
    return inverse, np.asarray(first, dtype=np.int64)


_ACCEPTED = "texts (a list of str), an array of shape (n, d) or a VectorStore"


def _describe(items: Any, name: str) -> str:
    """What came, for an error message: its type, and its size and first item or its shape."""
    if isinstance(items, (list, tuple)):
        if not items:
            return f"an empty {type(items).__name__}"
        return f"a {type(items).__name__} of {len(items)} items, {name}[0] being {type(items[0]).__name__}"
    shape = getattr(items, "shape", None)
    if shape is not None:
        return f"{type(items).__name__} of shape {shape} and dtype {getattr(items, 'dtype', '?')}"
    return type(items).__name__


def _vectors(x: Any, name: str) -> np.ndarray:
    """``x`` as finite (n, d) float32 vectors (float16 ones stay float16), checked by
    :mod:`embedcache._validation`; what is neither an array nor numbers is named, with the
    kinds of items accepted."""
    if not isinstance(x, np.ndarray):
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError):  # ragged nested lists
            arr = None
        if arr is None or arr.dtype.kind not in "fiu":
            raise InvalidInputTypeError(f"{name} must be {_ACCEPTED}; got {_describe(x, name)}")
        x = arr
    x = as_matrix(x, name)
    check_finite(x, name)
    return x if x.dtype in (np.float32, np.float16) else x.astype(np.float32)


def _ordered(items: Any, name: str) -> Any:
    """``items`` as given when it is a store, an array, a list or a tuple; another ordered
    iterable (a generator, ``dict.keys()``) read into a list. Results index the items, so
    unordered collections are refused."""
    if isinstance(items, (VectorStore, list, tuple, str, bytes)) or hasattr(items, "dtype"):
        return items
    if isinstance(items, Mapping):
        raise InvalidInputTypeError(
            f"{name} must be {_ACCEPTED}; got a {type(items).__name__}: pass list({name}.values()) "
            f"for its values or list({name}) for its keys"
        )
    if isinstance(items, AbstractSet) and not isinstance(items, KeysView):
        raise InvalidInputTypeError(
            f"{name} must be ordered, since results index the items; got a {type(items).__name__}, "
            f"which has no stable order: pass a list, e.g. sorted({name})"
        )
    if hasattr(items, "__array__"):  # a table (a pandas DataFrame): its values, never its column names
        table = np.asarray(items)
        if table.ndim == 2 and table.dtype.kind not in "fiub":
            raise InvalidInputTypeError(
                f"{name} must be {_ACCEPTED}; got a {type(items).__name__} of shape {table.shape} holding "
                f"{table.dtype} values: pass one column of it (e.g. df['text']) for texts, or numbers for vectors"
            )
        return table
    try:
        return list(items)
    except TypeError:
        raise InvalidInputTypeError(f"{name} must be {_ACCEPTED}; got {_describe(items, name)}") from None


def _is_texts(items: Any) -> bool:
    if isinstance(items, (str, bytes)):
        return True  # refused by validate_texts with a clear message
    kind = getattr(getattr(items, "dtype", None), "kind", None)
    if isinstance(kind, str):  # numpy arrays, pandas Series
        return kind in "USO"
    if isinstance(items, (list, tuple)):  # texts when any item is one: the others are named
        return len(items) == 0 or any(isinstance(t, str) for t in items)
    return False


class _Embedding:
    """The embedder for texts, made on first use and closed by ``close()`` if made here.

    No embedder: the built-in hashing embedder, used directly (it is cheap and offline, so
    nothing is cached on disk). A bare embedder is wrapped in a :class:`CachedEmbedder` on the
    default cache directory; a ``CachedEmbedder`` is used as it is. ``long_texts`` (``None``:
    the CachedEmbedder's own, else the default) is the policy for texts over the embedder's
    input window; a CachedEmbedder with another one is used through a copy with this one.
    """

    def __init__(self, embedder: Any, long_texts: str | None = None) -> None:
        if embedder is not None and not callable(getattr(embedder, "embed", None)):
            raise InvalidInputTypeError(
                f"embedder must be an Embedder (with .embed(texts)), got {type(embedder).__name__}"
            )
        self._given = embedder
        self._long_texts = None if long_texts is None else check_long_texts(long_texts)
        self._made: Any = None

    def _get(self) -> Any:
        if self._made is None:
            if self._given is None:
                from embedcache.providers.hashing import HashingEmbeddings

                self._made = HashingEmbeddings()
            elif isinstance(self._given, CachedEmbedder):
                given = self._given
                policy = self._long_texts
                self._made = given if policy in (None, given.long_texts) else CachedEmbedder(
                    given.embedder, given.cache, long_texts=policy)
            else:
                self._made = CachedEmbedder(self._given, long_texts=self._long_texts or DEFAULT_LONG_TEXTS)
        return self._made

    @property
    def namespace(self) -> str | None:
        if self._given is None:
            return self._get().cache_namespace
        ns = getattr(self._given, "cache_namespace", None)
        return ns if isinstance(ns, str) else None

    def embed(self, texts: list[str], progress: bool | None) -> np.ndarray:
        emb = self._get()
        if isinstance(emb, CachedEmbedder):
            return emb.embed(texts, progress=progress)
        return emb.embed(texts)

    def close(self) -> None:
        made, self._made = self._made, None
        if made is not None and isinstance(made, CachedEmbedder) and not (
                made is self._given or isinstance(self._given, CachedEmbedder)):
            made.close()  # closes the cache it opened, never the caller's embedder

    def __enter__(self) -> _Embedding:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _namespace(items: Any, emb: _Embedding) -> str | None:
    """``cache_namespace`` of the embedder that made (or will make) the vectors of ``items``."""
    if isinstance(items, VectorStore):
        return items.namespace
    if _is_texts(items):
        return emb.namespace
    return None  # vectors given as an array: unknown


def _prepare(items: Any, *, emb: _Embedding, progress: bool | None, name: str = "items") -> _Prepared:
    """Texts, an (n, d) array or a VectorStore -> their distinct vectors."""
    if isinstance(items, VectorStore):
        ids, x, meta = items.snapshot()  # one read: ids, vectors and texts of one state
        x = _vectors(x, name)
        key = items.text_key
        texts = [m.get(key) if isinstance(m, dict) else None for m in meta]
        texts_ok = bool(texts) and all(isinstance(t, str) for t in texts)
        return _from_matrix(x, texts=texts if texts_ok else None, ids=ids)
    if _is_texts(items):
        texts = validate_texts(items, allow_empty_list=True, what=name)
        # canonically equivalent spellings (NFC and NFD "café") are the same text
        inverse, first = _collapse([normalize_text(t) for t in texts])
        if not len(first):
            return _Prepared(np.zeros((0, 1), dtype=np.float32), inverse, first, texts, None)
        x = _vectors(emb.embed([texts[k] for k in first], progress), "embeddings")
        # then as an array: distinct texts with equal vectors are exact copies too
        rows = _from_matrix(x, texts=None, ids=None)
        return _Prepared(rows.x, rows.inverse[inverse], first[rows.first], texts, None)
    return _from_matrix(_vectors(items, name), texts=None, ids=None)


def _from_matrix(x: np.ndarray, *, texts: list[str] | None, ids: list[str] | None) -> _Prepared:
    # zero rows are similar to nothing, not even to each other: never collapse them
    inverse, first = classes(*row_digests(x))
    xu = x[first] if len(first) < len(x) else x
    return _Prepared(np.ascontiguousarray(xu, dtype=np.float32), inverse, first, texts, ids)
