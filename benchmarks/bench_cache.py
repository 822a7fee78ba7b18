"""Warm-cache throughput: vectors served per second from an EmbeddingCache.

Peers, measured in the same run over the same cached entries:

- ``CachedEmbedder.embed(texts)``: keys hashed from the texts, every vector a hit;
- ``EmbeddingCache.get_many(keys)``: the batch lookup alone;
- a plain ``diskcache.Cache.get`` loop over the same keys, the vectors stored in it as numpy
  arrays (diskcache's default: pickled).

Target: >= 100,000 vectors/s through ``CachedEmbedder.embed`` and >= 3x the loop.

    python benchmarks/bench_cache.py            # quick: 20,000 vectors of 1024-d
    python benchmarks/bench_cache.py --full     # 100,000 vectors of 1024-d
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence

import diskcache
import numpy as np

from embedcache import CachedEmbedder, EmbeddingCache


class _MustNotBeCalled:
    """An embedder for a warm cache: any request is a bug in the benchmark."""

    cache_namespace = "bench|none|bench-model|1024"
    model = "bench-model"
    dimensions = 1024

    def embed(self, texts: Sequence[str], *, on_batch=None) -> np.ndarray:
        raise AssertionError(f"warm cache expected, but {len(texts)} texts were requested")


def _best_of(repeats: int, fn: Callable[[], object]) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="100,000 vectors instead of 20,000")
    parser.add_argument("-n", type=int, default=None, help="number of cached vectors")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = parser.parse_args(argv)
    n = args.n or (100_000 if args.full else 20_000)
    dim = args.dim
    emb = _MustNotBeCalled()
    emb.dimensions = dim
    emb.cache_namespace = f"bench|none|bench-model|{dim}"

    rng = np.random.default_rng(0)
    texts = [f"document number {i}: {rng.integers(1 << 62)}" for i in range(n)]
    vectors = rng.standard_normal((n, dim), dtype=np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(f"{tmp}/embedcache", size_limit=2**40)
        keys = [EmbeddingCache.make_key(emb.cache_namespace, emb.model, dim, t) for t in texts]
        t0 = time.perf_counter()
        for start in range(0, n, 10_000):
            cache.set_many(keys[start : start + 10_000], vectors[start : start + 10_000])
        fill_ours = time.perf_counter() - t0

        plain = diskcache.Cache(f"{tmp}/plain", size_limit=2**40)
        t0 = time.perf_counter()
        with plain.transact():
            for k, v in zip(keys, vectors):
                plain.set(k, v)
        fill_plain = time.perf_counter() - t0

        cached = CachedEmbedder(emb, cache=cache)
        t_embed, got = _best_of(args.repeats, lambda: cached.embed(texts, progress=False))
        assert np.array_equal(got, vectors), "CachedEmbedder.embed returned other vectors"
        assert cached.stats.misses == 0
        t_many, got_many = _best_of(args.repeats, lambda: cache.get_many(keys))
        assert all(np.array_equal(a, b) for a, b in zip(got_many, vectors))
        t_loop, got_loop = _best_of(args.repeats, lambda: [plain.get(k) for k in keys])
        assert all(np.array_equal(a, b) for a, b in zip(got_loop, vectors))
        plain.close()
        cache.close()

    def rate(seconds: float) -> float:
        return n / seconds

    print(f"warm cache, {n:,} cached vectors of {dim}-d float32 (best of {args.repeats})")
    print(f"  fill: EmbeddingCache.set_many {rate(fill_ours):>12,.0f} vectors/s; "
          f"diskcache.set in one transaction {rate(fill_plain):>10,.0f} vectors/s")
    print(f"  CachedEmbedder.embed     {rate(t_embed):>12,.0f} vectors/s  ({t_embed:.3f} s)")
    print(f"  EmbeddingCache.get_many  {rate(t_many):>12,.0f} vectors/s  ({t_many:.3f} s)")
    print(f"  diskcache.Cache.get loop {rate(t_loop):>12,.0f} vectors/s  ({t_loop:.3f} s)")
    print(f"  ratio embed / loop:    {t_loop / t_embed:6.2f}x   (target >= 3x, >= 100,000 vectors/s)")
    print(f"  ratio get_many / loop: {t_loop / t_many:6.2f}x")


if __name__ == "__main__":
    main()
