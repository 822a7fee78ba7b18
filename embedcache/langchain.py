"""LangChain's ``Embeddings`` interface, backed by any embedcache embedder and its cache.

:class:`EmbedcacheEmbeddings` can stand wherever LangChain takes an ``Embeddings`` (vector
stores, retrievers, ``CacheBackedEmbeddings``'s place). Behind it, a
:class:`~embedcache.CachedEmbedder`:

* keys are SHA-256 over the embedder's namespace (provider, host, model, dimensions) and the
  text, so two models never share a vector (``CacheBackedEmbeddings`` keys by SHA-1 of the
  text alone unless a namespace is given);
* values are raw float32, checked on read (not JSON floats);
* each distinct text of a batch is embedded once, and queries are cached like documents;
* ``aembed_documents``/``aembed_query`` run natively on the embedder's async path.

Needs langchain-core (``pip install "embedcache-sim[langchain]"``); importing this module
without it raises :class:`~embedcache.errors.MissingDependencyError` saying so.

>>> import tempfile
>>> from embedcache import HashingEmbeddings
>>> emb = EmbedcacheEmbeddings(HashingEmbeddings(dimensions=64), cache=tempfile.mkdtemp())
>>> vectors = emb.embed_documents(["a red fox", "a red fox", "stock markets fell"])
>>> len(vectors), len(vectors[0]), emb.stats.misses
(3, 64, 2)
>>> emb.embed_query("a red fox") == vectors[0], emb.stats.misses
(True, 2)
>>> emb.close()
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedcache.cache import CachedEmbedder, EmbeddingCache, EmbedStats
from embedcache.errors import ConfigurationError, InvalidInputError, InvalidInputTypeError, MissingDependencyError

try:
    from langchain_core.embeddings import Embeddings
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise MissingDependencyError(
        'embedcache.langchain needs langchain-core; install it with: pip install "embedcache-sim[langchain]"'
    ) from exc

__all__ = ["EmbedcacheEmbeddings"]


class _LangChainEmbedder:
    """A LangChain ``Embeddings`` as an embedcache embedder, under the namespace its user names."""

    def __init__(self, embeddings: Embeddings, namespace: str) -> None:
        self.embeddings = embeddings
        self.model = namespace
        self.cache_namespace = f"langchain|{type(embeddings).__name__}|{namespace}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.embeddings.embed_documents(list(texts)), dtype=np.float32)

    async def aembed(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(await self.embeddings.aembed_documents(list(texts)), dtype=np.float32)

    def __repr__(self) -> str:
        return f"{type(self.embeddings).__name__}(namespace={self.model!r})"


def _cache_of(cache: EmbeddingCache | str | os.PathLike[str] | None) -> EmbeddingCache | None:
    if cache is None or isinstance(cache, EmbeddingCache):
        return cache
    if isinstance(cache, (str, os.PathLike)):
        return EmbeddingCache(cache)
    raise InvalidInputTypeError(
        f"cache must be an EmbeddingCache, a directory or None, got {type(cache).__name__}"
    )


class EmbedcacheEmbeddings(Embeddings):
    """LangChain ``Embeddings`` whose vectors come from an embedcache embedder, through the
    content-hash cache.

    embedder: any embedcache embedder (``OpenAIEmbeddings``, ``HashingEmbeddings``,
        ``LocalEmbeddings``, your own), a :class:`~embedcache.CachedEmbedder` (used as it
        is, with its cache), or a LangChain ``Embeddings`` (then ``namespace`` must say which
        model it is, since its vectors are cached under that name).
    model: instead of ``embedder``, the id of a model on an OpenAI-compatible server (the
        IONOS AI Model Hub unless ``base_url`` says otherwise); ``**options`` go to
        :class:`~embedcache.OpenAIEmbeddings` (``base_url``, ``api_key``, ``dimensions``...).
    cache: an :class:`~embedcache.EmbeddingCache` or its directory; default: the default
        cache directory (``$EMBEDCACHE_DIR``, else the user cache directory).
    namespace: the model behind a LangChain ``embedder``; refused for embedcache embedders,
        whose namespace says already whose vectors they are.

    :attr:`stats` counts hits, misses, requests and tokens; :meth:`close` closes what this
    object opened (the cache it made, the HTTP connections of the embedder it made).
    """

    def __init__(
        self,
        embedder: Any = None,
        *,
        model: str | None = None,
        cache: EmbeddingCache | str | os.PathLike[str] | None = None,
        namespace: str | None = None,
        **options: Any,
    ) -> None:
        if (embedder is None) == (model is None):
            raise ConfigurationError(
                "pass either an embedder or model=... (a model on an OpenAI-compatible server), "
                f"got {'both' if model is not None else 'neither'}"
            )
        if options and model is None:
            raise ConfigurationError(
                f"{', '.join(sorted(options))}: options of model=...; an embedder is configured when it is made"
            )
        self._owned: list[Any] = []
        if model is not None:
            from embedcache.providers import OpenAIEmbeddings

            embedder = OpenAIEmbeddings(model, **options)
            self._owned.append(embedder)
        if isinstance(embedder, Embeddings):
            if not isinstance(namespace, str) or not namespace.strip():
                raise ConfigurationError(
                    f"a LangChain {type(embedder).__name__} has no name for its vectors: pass "
                    "namespace=... naming its model (e.g. namespace=\"text-embedding-3-small\"), "
                    "so that two models never share cached vectors"
                )
            embedder = _LangChainEmbedder(embedder, namespace)
        elif namespace is not None:
            raise ConfigurationError(
                f"namespace applies to a LangChain embedder only; {type(embedder).__name__} names "
                f"its vectors itself ({getattr(embedder, 'cache_namespace', None)!r})"
            )
        if isinstance(embedder, CachedEmbedder):
            if cache is not None:
                raise ConfigurationError("cache applies to an embedder without one; this CachedEmbedder has its cache")
            self.cached = embedder
        else:
            self.cached = CachedEmbedder(embedder, cache=_cache_of(cache))
            if not isinstance(cache, EmbeddingCache):  # made here: a directory or the default
                self._owned.append(self.cached)

    @property
    def model(self) -> str:
        """The model id of the embedder (``""`` when it has none)."""
        return self.cached.model

    @property
    def key_source(self) -> str | None:
        """Where an OpenAI-compatible embedder's key came from (argument or variable name),
        never the key; None for other embedders."""
        return getattr(self.cached.embedder, "key_source", None)

    @property
    def stats(self) -> EmbedStats:
        return self.cached.stats

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """One vector (a list of floats) per text, in order; ``[]`` for no texts."""
        if _no_texts(texts):
            return []
        return self.cached.embed(texts, progress=False).tolist()

    def embed_query(self, text: str) -> list[float]:
        """The vector of one text, cached like a document's."""
        return self.cached.embed([_one_text(text)], progress=False)[0].tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        if _no_texts(texts):
            return []
        return (await self.cached.aembed(texts, progress=False)).tolist()

    async def aembed_query(self, text: str) -> list[float]:
        return (await self.cached.aembed([_one_text(text)], progress=False))[0].tolist()

    def close(self) -> None:
        """Close the cache and embedder this object made (not those it was given)."""
        for item in reversed(self._owned):
            item.close()

    def __enter__(self) -> EmbedcacheEmbeddings:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbedcacheEmbeddings({self.cached.embedder!r}, cache={self.cached.cache!r})"


def _no_texts(texts: object) -> bool:
    """Whether ``texts`` is an empty list (LangChain's callers expect ``[]`` back); a single
    string is refused, since it would be embedded as one vector per character."""
    if isinstance(texts, str):
        raise InvalidInputTypeError("texts must be a list of strings, got a single str; use embed_query")
    return isinstance(texts, Sequence) and len(texts) == 0


def _one_text(text: object) -> str:
    if not isinstance(text, str):
        raise InvalidInputTypeError(f"text must be a str, got {type(text).__name__}")
    if not text:
        raise InvalidInputError("text is an empty string; a query must have some text")
    return text
