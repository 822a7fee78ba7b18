import pkgutil

import embedcache
from embedcache import errors


def test_all_is_sorted_and_exact():
    assert embedcache.__all__ == sorted(embedcache.__all__)
    public = {name for name in dir(embedcache) if not name.startswith("_")}
    # submodules appear as attributes once imported; they are not public names
    modules = {m.name for m in pkgutil.iter_modules(embedcache.__path__)}
    assert public - modules == set(embedcache.__all__)


def test_every_exported_name_resolves():
    for name in embedcache.__all__:
        assert getattr(embedcache, name) is not None


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
