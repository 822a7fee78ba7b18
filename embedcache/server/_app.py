"""The proxy's ASGI app: routes, request checks, OpenAI-shaped replies and errors."""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator, Iterable
from typing import Any

import numpy as np
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from embedcache._validation import check_int, check_positive
from embedcache.cache import EmbeddingCache
from embedcache.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    EmbedCacheError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
)
from embedcache.providers.base import validate_texts
from embedcache.providers.openai import DEFAULT_BASE_URL
from embedcache.server._keys import ANONYMOUS, ClientKeys, RequestRate
from embedcache.server._metrics import Metrics
from embedcache.server._upstream import Upstream

__all__ = ["create_app"]

logger = logging.getLogger("embedcache.server")

#: the OpenAI API's own limit of inputs per request
MAX_ITEMS = 2048
#: largest request body read, in bytes
MAX_BODY = 32 * 2**20

_TOKEN_ARRAYS = (
    "input must be a string or a list of strings; token-id arrays are not accepted, because the "
    "cache is keyed by text and the upstream's tokenizer is not the client's (LangChain: "
    "OpenAIEmbeddings(..., check_embedding_ctx_length=False))"
)


def _error(status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None,
           param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


async def _bounded_body(request: Request) -> bytes | None:
    """The request's body, or None as soon as it passes ``MAX_BODY`` bytes (the rest is not
    read into memory)."""
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        parts.append(chunk)
    return b"".join(parts)


async def _http_error(request: Request, exc: Exception) -> Response:
    """A path or method the proxy does not serve, answered in the OpenAI error shape."""
    status = getattr(exc, "status_code", 404)
    what = "no such route" if status == 404 else "method not allowed"
    headers = getattr(exc, "headers", None)  # a 405 names the methods allowed
    return _error(status, f"{what}: {request.method} {request.url.path}", code="not_found" if status == 404
                  else "method_not_allowed", headers=dict(headers) if headers else None)


def _retry_headers(seconds: float | None) -> dict[str, str] | None:
    if seconds is None:
        return None
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(int(seconds * 1000))}


def _upstream_error(exc: APIError) -> Response:
    """An OpenAI-shaped reply for a failure of the upstream (its message has no key in it)."""
    message = f"upstream: {exc}"
    if isinstance(exc, QuotaExceededError):
        return _error(429, message, kind="insufficient_quota", code="insufficient_quota")
    if isinstance(exc, RateLimitError):
        return _error(429, message, kind="rate_limit_error", code="rate_limit_exceeded",
                      headers=_retry_headers(getattr(exc, "retry_after", None)))
    if isinstance(exc, BadRequestError):
        return _error(400, message)
    if isinstance(exc, NotFoundError):
        return _error(404, message, code="model_not_found", param="model")
    if isinstance(exc, (AuthenticationError, PermissionDeniedError)):
        return _error(502, f"the upstream refused the proxy's own key: {exc}", kind="upstream_error")
    if isinstance(exc, APITimeoutError):
        return _error(504, message, kind="upstream_error")
    if isinstance(exc, (APIStatusError, APIConnectionError)):
        return _error(502, message, kind="upstream_error")
    return _error(502, message, kind="upstream_error")  # InvalidResponseError


try:  # SIMD base64, some thirty times the stdlib's speed (a 64 x 384 reply: 4 us, not 120)
    from pybase64 import b64encode_as_string as _b64
except ImportError:  # pragma: no cover - pybase64 comes with the server extra
    def _b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")


def _encode(vectors: np.ndarray, encoding_format: str) -> list[Any]:
    """Each row as the reply's ``embedding`` field: a float32 array (orjson writes the shortest
    digits that read back as the same float32) or base64 of its little-endian bytes."""
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    if encoding_format == "float":
        return list(vectors)
    n, d = vectors.shape
    if (4 * d) % 3 == 0:  # rows end on whole base64 quanta: encode once, cut
        text = _b64(vectors.tobytes())
        width = 4 * d // 3 * 4
        return [text[i * width : (i + 1) * width] for i in range(n)]
    return [_b64(row.tobytes()) for row in vectors]


def _texts(raw: object) -> list[str]:
    if isinstance(raw, str):
        raw = [raw]
    elif isinstance(raw, list) and raw and (
        isinstance(raw[0], int) or (isinstance(raw[0], list) and raw[0] and isinstance(raw[0][0], int))
    ):
        raise InvalidInputError(_TOKEN_ARRAYS)
    elif not isinstance(raw, list):
        raise InvalidInputError(
            f"input must be a string or a list of strings, got {type(raw).__name__ if raw is not None else 'nothing'}"
        )
    texts = validate_texts(raw, what="input")
    if len(texts) > MAX_ITEMS:
        raise InvalidInputError(f"input must have at most {MAX_ITEMS} items, got {len(texts)}")
    return texts


class _Proxy:
    """The routes, around one :class:`Upstream`."""

    def __init__(self, upstream: Upstream, metrics: Metrics, keys: ClientKeys | None,
                 client_rate: RequestRate | None, owned_cache: EmbeddingCache | None) -> None:
        self.upstream = upstream
        self.metrics = metrics
        self.keys = keys
        self.client_rate = client_rate
        self.owned_cache = owned_cache

    def _client(self, request: Request) -> tuple[str, Response | None]:
        if self.keys is None:
            client = ANONYMOUS
        else:
            name = self.keys.name_of(request.headers.get("authorization"))
            if name is None:
                missing = "authorization" not in request.headers
                message = ("missing API key: send 'Authorization: Bearer KEY' with a key of this proxy"
                           if missing else "incorrect API key: not a key of this proxy")
                return "unauthorized", _error(401, message, code="invalid_api_key")
            client = name
        if self.client_rate is not None:
            wait = self.client_rate.admit(client)
            if wait > 0:
                return client, _error(
                    429, f"too many requests: this key may send {self.client_rate.rate:g} per second",
                    kind="rate_limit_error", code="rate_limit_exceeded", headers=_retry_headers(wait))
        return client, None

    def _count(self, client: str, route: str, response: Response) -> Response:
        self.metrics.requests.labels(client, route, str(response.status_code)).inc()
        return response

    async def embeddings(self, request: Request) -> Response:
        client, refused = self._client(request)
        if refused is not None:
            return self._count(client, "embeddings", refused)
        return self._count(client, "embeddings", await self._embeddings(request, client))

    async def _embeddings(self, request: Request, client: str) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            return _error(413, f"request body must be at most {MAX_BODY} bytes, got {length}")
        body = await _bounded_body(request)
        if body is None:  # sent in chunks, with no length announced: counted as it comes
            return _error(413, f"request body must be at most {MAX_BODY} bytes, got more")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return _error(400, f"request body must be JSON: {exc}")
        if not isinstance(payload, dict):
            return _error(400, f"request body must be a JSON object, got {type(payload).__name__}")
        try:
            model = payload.get("model")
            if not isinstance(model, str) or not model.strip():
                raise InvalidInputError(f"model must be a non-empty string, got {model!r:.80}")
            texts = _texts(payload.get("input"))
            encoding_format = payload.get("encoding_format") or "float"
            if encoding_format not in ("float", "base64"):
                raise InvalidInputError(f"encoding_format must be 'float' or 'base64', got {encoding_format!r:.40}")
            dimensions = payload.get("dimensions")
            if dimensions is not None:
                dimensions = check_int("dimensions", dimensions, 1)
            outcome = await self.upstream.embed(model, dimensions, texts)
        except InvalidInputError as exc:
            param = next((p for p in ("input", "model", "encoding_format", "dimensions")
                          if str(exc).startswith(p)), None)
            return _error(400, str(exc), param=param)
        except APIError as exc:
            return _upstream_error(exc)
        except EmbedCacheError as exc:
            logger.error("embeddings request failed: %s", exc)
            return _error(500, str(exc), kind="server_error")
        m = self.metrics
        for result, n in (("hit", outcome.hits), ("shared", outcome.shared),
                          ("miss", outcome.misses), ("repeat", outcome.repeats)):
            if n:
                m.items.labels(client, result).inc(n)
        if outcome.saved_tokens:
            m.tokens_saved.labels(client).inc(outcome.saved_tokens)
        tokens = round(outcome.tokens)
        body = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": e}
                     for i, e in enumerate(_encode(outcome.vectors, encoding_format))],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        headers = {"x-embedcache-hits": str(outcome.hits + outcome.shared),
                   "x-embedcache-misses": str(outcome.misses)}
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), headers=headers,
                        media_type="application/json")

    async def models(self, request: Request) -> Response:
        client, refused = self._client(request)
        if refused is not None:
            return self._count(client, "models", refused)
        try:
            ids = await self.upstream.models()
        except APIError as exc:
            return self._count(client, "models", _upstream_error(exc))
        body = {"object": "list",
                "data": [{"id": i, "object": "model", "created": 0, "owned_by": "upstream"} for i in ids]}
        return self._count(client, "models", Response(orjson.dumps(body), media_type="application/json"))

    async def health(self, request: Request) -> Response:
        return Response(orjson.dumps({"status": "ok"}), media_type="application/json")

    async def metrics_page(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.upstream.aclose()
            if self.owned_cache is not None:
                self.owned_cache.close()


def create_app(
    upstream: str = DEFAULT_BASE_URL,
    *,
    cache: EmbeddingCache | str | os.PathLike[str] | None = None,
    keys: ClientKeys | str | os.PathLike[str] | Iterable[str] | None = None,
    api_key: str | None = None,
    requests_per_second: float | str | None = "auto",
    burst: int = 10,
    max_concurrency: int = 8,
    batch_size: int = 128,
    max_batch_chars: int = 200_000,
    max_retries: int = 6,
    timeout: float = 60.0,
    client_rate: float | None = None,
    client_burst: int | None = None,
    models_ttl: float = 60.0,
    registry: CollectorRegistry | None = None,
) -> Starlette:
    """The proxy as a Starlette app; see :mod:`embedcache.server`."""
    owned = None
    if not isinstance(cache, EmbeddingCache):
        cache = owned = EmbeddingCache(cache)
    if keys is not None and not isinstance(keys, ClientKeys):
        if isinstance(keys, (str, os.PathLike)):
            keys = ClientKeys.from_file(keys)
        else:
            keys = ClientKeys((f"key-{i + 1}", k) for i, k in enumerate(keys))
    metrics = Metrics(registry)
    try:
        core = Upstream(
            upstream, cache=cache, metrics=metrics, api_key=api_key,
            requests_per_second=requests_per_second, burst=burst, max_concurrency=check_int(
                "max_concurrency", max_concurrency, 1), batch_size=batch_size,
            max_batch_chars=max_batch_chars, max_retries=max_retries, timeout=timeout,
            models_ttl=models_ttl,
        )
    except BaseException:
        if owned is not None:
            owned.close()
        raise
    rate = None if client_rate is None else RequestRate(
        check_positive("client_rate", client_rate),
        None if client_burst is None else check_int("client_burst", client_burst, 1))
    proxy = _Proxy(core, metrics, keys, rate, owned)
    routes = []
    for prefix in ("/v1", ""):
        routes += [Route(f"{prefix}/embeddings", proxy.embeddings, methods=["POST"]),
                   Route(f"{prefix}/models", proxy.models, methods=["GET"])]
    routes += [Route("/health", proxy.health, methods=["GET"]),
               Route("/metrics", proxy.metrics_page, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=proxy.lifespan,
                    exception_handlers={404: _http_error, 405: _http_error})
    app.state.upstream = core
    app.state.metrics = metrics
    return app
