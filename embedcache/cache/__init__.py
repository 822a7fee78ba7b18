"""A content-hash cache of embedding vectors, and an embedder that uses it.

:class:`EmbeddingCache` keeps float32 vectors in a `diskcache`_ directory (one SQLite file,
safe for several threads and processes at once). :class:`CachedEmbedder` wraps any
:class:`~embedcache.providers.base.Embedder` so that a text is never embedded twice.

The pieces, from the bottom up:

- ``_codec``: how a text becomes a key (SHA-256 over length-prefixed fields) and a vector a
  value (a checked header, then raw float32); the one decode and realignment path.
- ``_diskcache``: the only module that touches diskcache; batch SQL on its table, a
  :class:`~diskcache.Disk` that never pickles, faults mapped to ``CacheError``.
- ``_space``: sizes for people (``"40GB"``), what an entry costs on disk, the free-space rule.
- ``_cache``: :class:`EmbeddingCache`, whose ``lookup`` (found mask and vectors) and ``put``
  every read and write goes through.
- ``_embedder``: :class:`CachedEmbedder` and :class:`EmbedStats`.

.. _diskcache: https://grantjenks.com/docs/diskcache/
"""

from embedcache.cache._cache import CacheEvictionWarning, EmbeddingCache
from embedcache.cache._embedder import CachedEmbedder, EmbedStats

__all__ = ["CacheEvictionWarning", "CachedEmbedder", "EmbedStats", "EmbeddingCache"]
