"""Warm-cache throughput: vectors served per second from an EmbeddingCache.

Peers, measured in the same run over the same cached entries:

- ``CachedEmbedder.embed(texts)``: keys hashed from the texts, every vector a hit;
- ``EmbeddingCache.get_many(keys)``: the batch lookup alone;
- a plain ``diskcache.Cache.get`` loop over the same keys, the vectors stored in it as numpy
  arrays (diskcache's default: pickled).

Target: >= 100,000 vectors/s through ``CachedEmbedder.embed`` and >= 3x the loop.

    python benchmarks/bench_cache.py            # quick: 20,000 vectors of 1024-d
    python benchmarks/bench_cache.py --full     # 100,000 vectors of 1024-d

At scale (``--scale``): caches of 100,000 and 1,000,000 entries of 384-d (``--sizes``), each
filled in batches of 10,000 as CachedEmbedder writes them; then, for EmbeddingCache.lookup
against the plain diskcache loop on the same keys: warm batch lookups per second over a
sample of 100,000 keys, in the order they were written and in random order; bytes on disk
per entry; the time to open the cache and to call ``info()``.

    python benchmarks/bench_cache.py --scale --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import diskcache
import numpy as np

from embedcache import CachedEmbedder, EmbeddingCache
from embedcache.cache._space import entry_bytes


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


def _disk_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


def scale(sizes: Sequence[int], dim: int, sample: int, repeats: int) -> None:
    """Lookups, bytes on disk, open and info() at each size in ``sizes``."""
    rng = np.random.default_rng(0)
    print(f"cache at scale: {dim}-d float32, lookups of {sample:,} keys in batches of 10,000 "
          f"(best of {repeats}); peer: a plain diskcache.Cache.get loop (pickled arrays)")
    print(f"  {'entries':>10} {'peer':<24}{'fill/s':>10}{'B/entry':>9}{'open ms':>9}{'info ms':>9}"
          f"{'written order/s':>17}{'random order/s':>16}")
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            keys = EmbeddingCache.raw_keys("bench", "m", dim, [f"doc {i}" for i in range(n)])
            hexkeys = [k.hex() for k in keys]
            cache = EmbeddingCache(f"{tmp}/ours")
            plain = diskcache.Cache(f"{tmp}/plain", size_limit=2**62)
            fill = {}
            t0 = time.perf_counter()
            for start in range(0, n, 10_000):
                cache.put(keys[start : start + 10_000], rng.standard_normal((min(10_000, n - start), dim), dtype=np.float32),
                          source=("bench", "m", dim))
            fill["ours"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            for start in range(0, n, 10_000):
                block = rng.standard_normal((min(10_000, n - start), dim), dtype=np.float32)
                with plain.transact():
                    for k, v in zip(hexkeys[start : start + 10_000], block):
                        plain.set(k, v)
            fill["plain"] = time.perf_counter() - t0
            cache.close()
            plain.close()
            pick = np.random.default_rng(1).choice(n, size=min(sample, n), replace=False)
            written = np.sort(pick)
            rows = {}
            for name in ("ours", "plain"):
                t0 = time.perf_counter()
                if name == "ours":
                    handle = EmbeddingCache(f"{tmp}/ours")
                else:
                    handle = diskcache.Cache(f"{tmp}/plain")
                opened = time.perf_counter() - t0
                t0 = time.perf_counter()
                if name == "ours":
                    info = handle.info()
                    assert info["entries"] == n and info["namespaces"][0]["entries"] == n
                else:
                    assert len(handle) == n and handle.volume() > 0
                info_s = time.perf_counter() - t0
                rates = []
                for order in (written, pick):
                    timer = _Timer()
                    if name == "ours":
                        ks = [keys[i] for i in order]

                        def run(ks=ks):
                            for s in range(0, len(ks), 10_000):
                                assert handle.lookup(ks[s : s + 10_000], dim)[0].all()
                    else:
                        ks = [hexkeys[i] for i in order]

                        def run(ks=ks):
                            for k in ks:
                                assert handle.get(k) is not None
                    for _ in range(repeats):
                        timer.run(run)
                    rates.append(len(order) / timer.wall)
                handle.close()
                rows[name] = rates
                label = "EmbeddingCache.lookup" if name == "ours" else "diskcache.Cache.get loop"
                print(f"  {n:>10,} {label:<24}{n / fill[name]:>10,.0f}{_disk_bytes(f'{tmp}/{name}') / n:>9,.0f}"
                      f"{opened * 1e3:>9.1f}{info_s * 1e3:>9.2f}{rates[0]:>17,.0f}{rates[1]:>16,.0f}")
            print(f"  {n:>10,} ratio lookup / loop: {rows['ours'][0] / rows['plain'][0]:.2f}x written order, "
                  f"{rows['ours'][1] / rows['plain'][1]:.2f}x random order "
                  f"(vector: {4 * dim} B, estimate per entry: {entry_bytes(dim)} B)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", action="store_true", help="lookups, size, open and info() at --sizes")
    parser.add_argument("--sizes", default="100000,1000000", help="entries of each cache at --scale")
    parser.add_argument("--sample", type=int, default=100_000, help="keys looked up at --scale")
    parser.add_argument("--full", action="store_true", help="100,000 vectors instead of 20,000")
    parser.add_argument("-n", type=int, default=None, help="number of cached vectors")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs")
    args = parser.parse_args(argv)
    if args.scale:
        dim = 384 if args.dim == 1024 and "--dim" not in (argv or sys.argv) else args.dim
        scale([int(x) for x in args.sizes.split(",")], dim, args.sample, min(args.repeats, 3))
        return
    n = args.n or (100_000 if args.full else 20_000)
    dim = args.dim
    emb = _MustNotBeCalled()
    emb.dimensions = dim
    emb.cache_namespace = f"bench|none|bench-model|{dim}"

    rng = np.random.default_rng(0)
    texts = [f"document number {i}: {rng.integers(1 << 62)}" for i in range(n)]
    vectors = rng.standard_normal((n, dim), dtype=np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(f"{tmp}/embedcache")
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
