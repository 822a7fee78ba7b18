"""embedcache: embeddings that are never paid for twice, similarity at the speed of the hardware.

>>> import tempfile, embedcache as ec
>>> cache = ec.EmbeddingCache(tempfile.mkdtemp())
>>> emb = ec.CachedEmbedder(ec.HashingEmbeddings(dimensions=256), cache=cache)
>>> X = emb.embed(["a red fox", "a red fox!", "stock markets fell"])
>>> X.shape, X.dtype.name
((3, 256), 'float32')
>>> S = ec.cosine_similarity(X)
>>> bool(S[0, 1] > S[0, 2])
True
"""

from embedcache.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    CacheError,
    ClusterError,
    ConfigurationError,
    DimensionMismatchError,
    DuplicateIdError,
    EmbedCacheError,
    InvalidInputError,
    InvalidInputTypeError,
    InvalidResponseError,
    MissingDependencyError,
    NamespaceMismatchError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    RecallUnreachableError,
    ServerError,
    StoreCorruptedError,
    StoreError,
    StoreLockedError,
    StoreWriteError,
    TextTooLongError,
)

#: the public names of the submodules, imported at their first use (numpy, numba and the
#: kernels load then, not when the command line starts or only an exception is needed)
_LAZY = {
    "CachedEmbedder": "embedcache.cache",
    "EmbeddingCache": "embedcache.cache",
    "EmbedStats": "embedcache.cache",
    "cosine_similarity": "embedcache.kernels",
    "dot_similarity": "embedcache.kernels",
    "normalize": "embedcache.kernels",
    "similar_pairs": "embedcache.kernels",
    "top_k": "embedcache.kernels",
    "Embedder": "embedcache.providers",
    "HashingEmbeddings": "embedcache.providers",
    "LocalEmbeddings": "embedcache.providers",
    "OpenAIEmbeddings": "embedcache.providers",
    "VectorStore": "embedcache.store",
    "DedupResult": "embedcache.workflows",
    "PairTable": "embedcache.workflows",
    "deduplicate": "embedcache.workflows",
    "knn_graph": "embedcache.workflows",
    "near_duplicates": "embedcache.workflows",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'embedcache' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "CacheError",
    "CachedEmbedder",
    "ClusterError",
    "ConfigurationError",
    "DedupResult",
    "DimensionMismatchError",
    "DuplicateIdError",
    "EmbedCacheError",
    "EmbedStats",
    "Embedder",
    "EmbeddingCache",
    "HashingEmbeddings",
    "InvalidInputError",
    "InvalidInputTypeError",
    "InvalidResponseError",
    "LocalEmbeddings",
    "MissingDependencyError",
    "NamespaceMismatchError",
    "NotFoundError",
    "OpenAIEmbeddings",
    "PairTable",
    "PermissionDeniedError",
    "QuotaExceededError",
    "RateLimitError",
    "RecallUnreachableError",
    "ServerError",
    "StoreCorruptedError",
    "StoreError",
    "StoreLockedError",
    "StoreWriteError",
    "TextTooLongError",
    "VectorStore",
    "cosine_similarity",
    "deduplicate",
    "dot_similarity",
    "knn_graph",
    "near_duplicates",
    "normalize",
    "similar_pairs",
    "top_k",
]
