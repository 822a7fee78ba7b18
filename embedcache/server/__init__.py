"""``embedcache serve``: the library's cache behind an OpenAI-compatible HTTP API, for a team.

Any OpenAI-compatible client gets the cache by changing its base URL to the proxy's::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="a key of the proxy")
    client.embeddings.create(model="BAAI/bge-m3", input=["hello", "world"])

Routes: ``POST /v1/embeddings`` (``input`` a string or a list of strings, ``model``,
``encoding_format`` ``float`` or ``base64``, ``dimensions``; ``user`` is accepted and is no
part of the key; token-id arrays are refused with a 400), ``GET /v1/models`` (the
upstream's, kept for ``models_ttl`` seconds), ``GET /health`` and ``GET /metrics``
(Prometheus). The same routes answer without the ``/v1`` prefix.

Each item of a request is looked up in the library's own :class:`~embedcache.EmbeddingCache`
under the key :class:`~embedcache.CachedEmbedder` gives it, so the library and the proxy
share one cache directory: what either embedded is a hit for both. Only misses go upstream;
an item repeated in a request, or asked for by several requests at once, goes once. The
misses of concurrent requests go together, in batches within the upstream's limits, under
one rate limit (the IONOS contract's 5 requests/s, burst 10, for the IONOS host) and
``max_concurrency`` requests at once, with the library's retries. Each vector is placed at
its client's ``index``.

A client is answered as soon as the upstream answers; in the same step the vectors are handed
to a writer process (:mod:`embedcache.server._writer`), which writes them to the cache in
batches, and they are served from memory until their write commits. The app's shutdown
(uvicorn's, on SIGINT or SIGTERM) writes every vector answered. A crash of the proxy alone
loses nothing it answered (the writer writes what it was handed when its input ends, then
exits); a writer that dies is logged, counted in ``cache_errors`` and started again with
every vector not yet committed; a crash of both loses the vectors answered but not yet
committed (about the last tenth of a second's worth), which are fetched again when next asked
for (see :mod:`embedcache.server._memory`). Recently served vectors are kept in memory in front of the cache
(``_config.SERVER_MEMORY_BYTES``, 256 MiB), and so are the first 8 bytes of every key of the
cache (8 bytes per entry: 80 MB for ten million), so that a miss costs no disk read
(:mod:`embedcache.cache._keyfilter`).

The upstream key comes from ``api_key`` or from the environment exactly as for
:class:`~embedcache.OpenAIEmbeddings` (``IONOS_API_TOKEN`` for the IONOS host only, else
``OPENAI_API_KEY``); it is sent only to the upstream and never appears in a reply, a log line
or a metric.

Needs the ``server`` extra: ``pip install 'embedcache-sim[server]'``.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
from typing import TYPE_CHECKING, Any

from embedcache.errors import ConfigurationError, MissingDependencyError

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["create_app", "is_loopback", "serve"]

_REQUIRED = ("starlette", "uvicorn", "prometheus_client", "orjson", "aiohttp")


def _require() -> None:
    for name in _REQUIRED:
        try:
            importlib.import_module(name)
        except ImportError:
            raise MissingDependencyError(
                f"the proxy needs {name}, which is not installed: pip install 'embedcache-sim[server]'"
            ) from None


def create_app(upstream: str | None = None, **options: Any) -> Starlette:
    """The proxy as an ASGI app (Starlette), for mounting or serving yourself, e.g.
    ``uvicorn.run(create_app("https://api.openai.com/v1", keys="keys.txt"))``.

    upstream: the OpenAI-compatible API root, ending before ``/embeddings`` (default: the
        IONOS AI Model Hub).
    cache: an :class:`~embedcache.EmbeddingCache` or its directory (default: the library's
        default directory, shared with :class:`~embedcache.CachedEmbedder`).
    keys: client keys: a keys file (one key per line, ``NAME KEY`` names it, ``#`` comments),
        an iterable of keys, or ``None`` to accept any client.
    api_key: the upstream's key (default: from the environment, scoped to its host).
    requests_per_second, burst, max_concurrency, batch_size, max_batch_chars, max_retries,
        timeout: the upstream's limits, as for :class:`~embedcache.OpenAIEmbeddings`, shared
        by every client and model (``"auto"``: the IONOS limit for the IONOS host).
    client_rate, client_burst: requests per second each client key may send (``None``: no
        limit); a client over it gets a 429 with ``Retry-After``.
    models_ttl: seconds a ``GET /models`` answer is kept.
    registry: a ``prometheus_client.CollectorRegistry`` for the metrics (default: one of its own).
    """
    _require()
    from embedcache.server._app import create_app as make

    return make(upstream, **options) if upstream is not None else make(**options)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost``, 127.0.0.0/8, ``::1``).

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, False)
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(
    upstream: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    keys: str | os.PathLike[str] | None = None,
    allow_public: bool = False,
    log_level: str = "info",
    **options: Any,
) -> None:
    """Run the proxy under uvicorn until interrupted.

    Without ``keys`` it serves loopback addresses only: anyone who reaches it spends the
    upstream key. ``allow_public=True`` lifts that.
    """
    if keys is None and not allow_public and not is_loopback(host):
        raise ConfigurationError(
            f"refusing to serve on {host} without client keys: anyone who can reach it would "
            "spend the upstream key; pass --keys FILE, or --allow-public if that is intended"
        )
    app = create_app(upstream, keys=keys, **options)
    import gc

    import uvicorn

    # What is alive now (modules, the app) lives as long as the process: out of the collector's
    # sight, so that its full collections skip it (this process is the proxy's own).
    gc.collect()
    gc.freeze()
    uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                       lifespan="on", timeout_graceful_shutdown=10)
    ).run()
