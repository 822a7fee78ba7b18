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


class _Timer:
    """Best wall-clock and best CPU time over several runs of one peer."""

    def __init__(self) -> None:
        self.wall = self.cpu = float("inf")

    def run(self, fn: Callable[[], object]) -> object:
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        self.wall = min(self.wall, time.perf_counter() - t0)
        self.cpu = min(self.cpu, time.process_time() - c0)
        return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="100,000 vectors instead of 20,000")
    parser.add_argument("-n", type=int, default=None, help="number of cached vectors")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs")
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
        peers = {
            "CachedEmbedder.embed": (_Timer(), lambda: cached.embed(texts, progress=False)),
            "EmbeddingCache.get_many": (_Timer(), lambda: cache.get_many(keys)),
            "diskcache.Cache.get loop": (_Timer(), lambda: [plain.get(k) for k in keys]),
        }
        # interleaved, so that a burst of load on the machine hits every peer alike
        for _ in range(args.repeats):
            for name, (timer, fn) in peers.items():
                got = timer.run(fn)
                if name == "CachedEmbedder.embed":
                    assert np.array_equal(got, vectors), "embed returned other vectors"
                else:
                    assert all(np.array_equal(a, b) for a, b in zip(got, vectors)), name
                del got
        assert cached.stats.misses == 0
        plain.close()
        cache.close()

    print(f"warm cache, {n:,} cached vectors of {dim}-d float32 (best of {args.repeats})")
    print(f"  fill: EmbeddingCache.set_many {n / fill_ours:>10,.0f} vectors/s; "
          f"diskcache.set in one transaction {n / fill_plain:>10,.0f} vectors/s")
    print(f"  {'peer':<26}{'vectors/s':>12}{'wall s':>9}{'CPU s':>8}{'vectors/CPU-s':>15}")
    for name, (timer, _) in peers.items():
        print(f"  {name:<26}{n / timer.wall:>12,.0f}{timer.wall:>9.3f}{timer.cpu:>8.3f}"
              f"{n / timer.cpu:>15,.0f}")
    loop = peers["diskcache.Cache.get loop"][0]
    for name in ("CachedEmbedder.embed", "EmbeddingCache.get_many"):
        timer = peers[name][0]
        print(f"  ratio {name} / loop: {loop.wall / timer.wall:5.2f}x wall, "
              f"{loop.cpu / timer.cpu:5.2f}x CPU")
    print("  target: CachedEmbedder.embed >= 100,000 vectors/s and >= 3x the loop")


if __name__ == "__main__":
    main()
