import importlib
import pkgutil

import embedcache
from embedcache import errors


def test_all_is_sorted_and_exact():
    assert embedcache.__all__ == sorted(embedcache.__all__)
    public = {name for name in dir(embedcache) if not name.startswith("_")}
    # submodules appear as attributes once imported; they are not public names
    modules = {m.name for m in pkgutil.iter_modules(embedcache.__path__)}
    assert public - modules == set(embedcache.__all__)


# Where each public name is documented and implemented: the subpackage named here (or a
# private module inside it) defines it and lists it in its own ``__all__``.
HOMES = {
    "embedcache.errors": list(errors.__all__),
    "embedcache.cache": ["CachedEmbedder", "EmbedStats", "EmbeddingCache"],
    "embedcache.providers": ["Embedder", "HashingEmbeddings", "LocalEmbeddings", "OpenAIEmbeddings"],
    "embedcache.kernels": ["cosine_similarity", "dot_similarity", "normalize", "similar_pairs", "top_k"],
    "embedcache.store": ["VectorStore"],
    "embedcache.workflows": ["DedupResult", "PairTable", "deduplicate", "knn_graph", "near_duplicates"],
}

EXPECTED = [
    "APIConnectionError", "APIError", "APIStatusError", "APITimeoutError", "AuthenticationError",
    "BadRequestError", "CacheError", "CachedEmbedder", "ClusterError", "ConfigurationError", "DedupResult",
    "DimensionMismatchError", "DuplicateIdError", "EmbedCacheError", "EmbedStats", "Embedder",
    "EmbeddingCache", "HashingEmbeddings", "InvalidInputError", "InvalidInputTypeError",
    "InvalidResponseError", "LocalEmbeddings", "MissingDependencyError", "NamespaceMismatchError",
    "NotFoundError", "OpenAIEmbeddings", "PairTable", "PermissionDeniedError", "QuotaExceededError",
    "RateLimitError", "RecallUnreachableError", "ServerError", "StoreCorruptedError", "StoreError", "StoreLockedError",
    "StoreWriteError", "TextTooLongError",
    "VectorStore", "cosine_similarity", "deduplicate", "dot_similarity", "knn_graph",
    "near_duplicates", "normalize", "similar_pairs", "top_k",
]


def test_all_is_the_intended_list():
    assert embedcache.__all__ == EXPECTED
    assert sorted(name for names in HOMES.values() for name in names) == sorted(EXPECTED)


def test_every_exported_name_comes_from_its_home_and_has_a_docstring():
    for home, names in HOMES.items():
        module = importlib.import_module(home)
        for name in names:
            obj = getattr(embedcache, name)
            assert obj is getattr(module, name), (name, home)
            assert name in module.__all__, (name, home)
            assert obj.__module__ == home or obj.__module__.startswith(home + "."), (name, obj.__module__)
            doc = obj.__doc__ or ""  # its own: a dataclass without one gets "Name(fields...)"
            assert doc.strip() and not doc.startswith(f"{name}("), f"{name} has no docstring"


def test_every_error_is_in_the_tree():
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.EmbedCacheError), name
        assert getattr(embedcache, name) is cls


def test_errors_keep_builtin_bases():
    assert issubclass(errors.InvalidInputError, ValueError)
    assert issubclass(errors.InvalidInputTypeError, TypeError)
    assert issubclass(errors.MissingDependencyError, ImportError)
    assert issubclass(errors.AuthenticationError, errors.APIStatusError)
    assert issubclass(errors.APITimeoutError, errors.APIConnectionError)
    err = errors.RateLimitError("slow down", status_code=429)
    assert err.status_code == 429 and err.message == "slow down"
