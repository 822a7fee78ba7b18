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

from embedcache.cache import CachedEmbedder, EmbeddingCache, EmbedStats
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
from embedcache.kernels import (
    cosine_similarity,
    dot_similarity,
    normalize,
    similar_pairs,
    top_k,
)
from embedcache.providers import (
    Embedder,
    HashingEmbeddings,
    LocalEmbeddings,
    OpenAIEmbeddings,
)
from embedcache.store import VectorStore
from embedcache.workflows import (
    DedupResult,
    PairTable,
    deduplicate,
    knn_graph,
    near_duplicates,
)

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
