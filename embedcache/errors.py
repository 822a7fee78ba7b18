"""The one exception tree of embedcache.

Every error the package raises on purpose is an :class:`EmbedCacheError`. Where a
built-in exception describes the same situation, the class also derives from it, so
``except ValueError`` or ``except TypeError`` keeps working for callers who do not know
this package::

    EmbedCacheError
    ├── InvalidInputError (ValueError)           bad argument values: texts, arrays, k, thresholds
    │   ├── InvalidInputTypeError (TypeError)    wrong type or dtype
    │   ├── DimensionMismatchError               vectors of another dimension than expected
    │   └── TextTooLongError                     a text over the model's window (long_texts="error")
    ├── ConfigurationError (ValueError)          missing API key, unknown option, bad setting
    ├── MissingDependencyError (ImportError)     an optional extra is not installed
    ├── APIError                                 the embeddings service failed us
    │   ├── APIConnectionError                   could not reach the server / connection dropped
    │   │   └── APITimeoutError                  no reply within the timeout
    │   ├── APIStatusError                       the server answered with an error status
    │   │   ├── BadRequestError                  400, 422
    │   │   ├── AuthenticationError              401
    │   │   ├── PermissionDeniedError            403
    │   │   ├── NotFoundError                    404 (unknown model or path)
    │   │   ├── RateLimitError                   429 (after retries)
    │   │   │   └── QuotaExceededError           429 insufficient_quota: out of credit, not retried
    │   │   └── ServerError                      5xx (after retries)
    │   └── InvalidResponseError                 a 2xx reply that breaks the contract
    ├── CacheError                               the embedding cache cannot be used
    ├── ClusterError                             a Dask cluster cannot run a job: scheduler out
    │                                            of reach, a worker that cannot read the store
    ├── RecallUnreachableError                   only an exact search of a large collection reaches
    │                                            the recall asked of a partitioned one
    └── StoreError                               the vector store cannot be used
        ├── StoreCorruptedError                  damaged or unknown files (names the file)
        ├── StoreLockedError                     another process holds the write lock
        ├── StoreWriteError (OSError)            the machine refused a write: disk full, file
        │                                        size limit, read-only directory (names the file)
        ├── DuplicateIdError (ValueError)        adding an id that exists, without upsert
        └── NamespaceMismatchError (ValueError)  vectors from another embedder or dimension

Messages say what was expected and what was received, and never contain an API key.
"""

from __future__ import annotations

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "CacheError",
    "ClusterError",
    "ConfigurationError",
    "DimensionMismatchError",
    "DuplicateIdError",
    "EmbedCacheError",
    "InvalidInputError",
    "InvalidInputTypeError",
    "InvalidResponseError",
    "MissingDependencyError",
    "NamespaceMismatchError",
    "NotFoundError",
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
]


class EmbedCacheError(Exception):
    """Base class of every error raised on purpose by embedcache."""


class InvalidInputError(EmbedCacheError, ValueError):
    """An argument has the right type but a value outside what is accepted."""


class InvalidInputTypeError(InvalidInputError, TypeError):
    """An argument has the wrong type or dtype."""


class DimensionMismatchError(InvalidInputError):
    """Vectors have another dimension than the one expected."""


class TextTooLongError(InvalidInputError):
    """A text is longer than the model's input window and the policy is ``long_texts="error"``;
    the message names the row."""


class ConfigurationError(EmbedCacheError, ValueError):
    """A setting is missing or invalid (for example no API key)."""


class MissingDependencyError(EmbedCacheError, ImportError):
    """An optional dependency is not installed; the message says how to install it."""


class APIError(EmbedCacheError):
    """The embeddings service could not give us vectors.

    ``status_code`` is the HTTP status when the server answered, else ``None``;
    ``message`` is the server's own explanation when it gave one.
    """

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class APIConnectionError(APIError):
    """The server could not be reached, or the connection dropped mid-reply."""


class APITimeoutError(APIConnectionError):
    """The server did not answer within the timeout."""


class APIStatusError(APIError):
    """The server answered with an error status (4xx or 5xx)."""


class BadRequestError(APIStatusError):
    """400 or 422: the server rejected the request (input too long, bad parameter...)."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing, wrong or expired."""


class PermissionDeniedError(APIStatusError):
    """403: the key is valid but may not use this model or endpoint."""


class NotFoundError(APIStatusError):
    """404: unknown model or wrong base URL."""


class RateLimitError(APIStatusError):
    """429: still rate limited after every retry."""


class QuotaExceededError(RateLimitError):
    """429 ``insufficient_quota``: the account has no credit left (billing, not a rate limit).

    Raised at once: waiting does not help.
    """


class ServerError(APIStatusError):
    """5xx: the server failed, still after every retry."""


class InvalidResponseError(APIError):
    """A successful reply that breaks the contract (missing vectors, NaN, wrong dimension...).

    Such a reply is never cached.
    """


class CacheError(EmbedCacheError):
    """The embedding cache cannot be opened or used."""


class ClusterError(EmbedCacheError):
    """A job could not run on the Dask cluster it was given: the scheduler cannot be reached,
    a worker cannot read the store's files (the message names the worker and the path), or
    a task kept killing its workers."""


class RecallUnreachableError(EmbedCacheError):
    """The recall asked of a partitioned search is out of its reach on this collection.

    The calibration found that only probing every cell (an exact, quadratic search) reaches
    the recall asked for, on a collection too large for that to be a fair substitute.
    ``recall``: what was asked; ``reachable``: the recall estimated at ``probes`` cells, the
    most the calibration looks at (NaN when its sample held no true pair); ``rows``: the
    collection's size.
    """

    def __init__(self, message: str, *, recall: float, reachable: float, probes: int, rows: int) -> None:
        super().__init__(message)
        self.recall = recall
        self.reachable = reachable
        self.probes = probes
        self.rows = rows


class StoreError(EmbedCacheError):
    """The vector store cannot be opened or used."""


class StoreCorruptedError(StoreError):
    """A store file is damaged, truncated, or of an unknown format version."""


class StoreLockedError(StoreError):
    """Another writer holds the store's lock."""


class StoreWriteError(StoreError, OSError):
    """The machine refused a store write: a full disk, a file-size limit, a read-only directory.

    The message names the file; the ``OSError`` (or SQLite's error) is chained as
    ``__cause__`` and ``errno`` is its errno when it had one. Nothing of the failed write was
    committed: the store is at its last commit and stays readable.
    """


class DuplicateIdError(StoreError, ValueError):
    """An id that already exists was added without ``upsert=True``."""


class NamespaceMismatchError(StoreError, ValueError):
    """Vectors or an embedder from another namespace or dimension than the store's."""
