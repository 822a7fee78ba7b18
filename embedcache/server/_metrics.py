"""The proxy's Prometheus metrics: one registry per app, so that apps (and tests) never mix.

Labels never hold a key: a client is named by its line in the keys file, or by a fingerprint.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Counters, gauges and histograms of one proxy app, in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "embedcache_proxy_requests", "Client requests, by client, route and status.",
            ["client", "route", "status"], registry=r)
        self.items = Counter(
            "embedcache_proxy_items",
            "Items of embeddings requests: hit (from the cache), shared (another request was "
            "fetching it), miss (sent upstream), repeat (again within one request).",
            ["client", "result"], registry=r)
        self.tokens_used = Counter(
            "embedcache_proxy_upstream_tokens", "Tokens the upstream counted for the misses.",
            registry=r)
        self.tokens_saved = Counter(
            "embedcache_proxy_tokens_saved",
            "Estimated tokens not paid for: hits, shared and repeated items, at the upstream's "
            "mean tokens per character.", ["client"], registry=r)
        self.upstream_requests = Counter(
            "embedcache_proxy_upstream_requests",
            "Upstream HTTP attempts (retries included), by status ('error': no reply).",
            ["status"], registry=r)
        self.upstream_429 = Counter(
            "embedcache_proxy_upstream_rate_limited", "Upstream replies with status 429.", registry=r)
        self.upstream_latency = Histogram(
            "embedcache_proxy_upstream_latency_seconds",
            "Seconds from sending an upstream request to its reply headers (after the rate limit).",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "embedcache_proxy_queue_depth", "Missed items waiting for an upstream request.",
            registry=r)
        self.in_flight = Gauge(
            "embedcache_proxy_upstream_in_flight", "Upstream batches under way (waits included).",
            registry=r)
        self.pending_writes = Gauge(
            "embedcache_proxy_pending_writes",
            "Vectors answered to clients and not yet committed to the cache.", registry=r)
        self.lookups_skipped = Counter(
            "embedcache_proxy_cache_lookups_skipped",
            "Items not looked up in the cache because its filter of absent keys ruled them out.",
            registry=r)
        self.cache_errors = Counter(
            "embedcache_proxy_cache_errors", "Cache reads or writes that failed.", registry=r)
