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

The page-size study (``--study``): one cache of ``--sizes`` entries (1,000,000 by default) per
page size in ``--page-sizes``, each filled as at ``--scale``; bytes on disk per entry; warm
batch lookups in written order, in random order, and in random order with each batch's keys
sorted first, under each (memory map, page cache) setting of ``--reads``; and the wall and CPU
time of one write of 64 new keys at random into the full cache (the proxy's write).

    python benchmarks/bench_cache.py --study --sizes 1000000 --page-sizes 4096,16384,65536
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

from embedcache import CachedEmbedder, EmbeddingCache, _config
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


_DROP_CACHES = "/proc/sys/vm/drop_caches"


def _drop_page_cache() -> bool:
    """Write dirty pages and drop the page cache (needs root); False where not allowed."""
    os.sync()
    try:
        with open(_DROP_CACHES, "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def _fill_plain_by_sql(plain: diskcache.Cache, keys: list[str], block: np.ndarray) -> None:
    """The rows ``plain.set(k, v)`` writes (diskcache's own ``Disk.put``/``Disk.store``: pickled
    arrays, inline), inserted 900 at a time in one transaction: what a ``set`` loop leaves in
    the table, many times faster to write at ten million entries."""
    now = time.time()
    rows = []
    for k, v in zip(keys, block):
        db_key, raw = plain._disk.put(k)
        size, mode, filename, db_value = plain._disk.store(v, False, key=k)
        rows += (db_key, raw, now, now, size, mode, filename, db_value)
    con = plain._con
    con.execute("BEGIN IMMEDIATE")
    for s in range(0, len(rows), 8 * 900):
        part = rows[s : s + 8 * 900]
        con.execute(
            "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count,"
            " tag, size, mode, filename, value) SELECT column1, column2, column3, NULL, column4,"
            " 0, NULL, column5, column6, column7, column8"
            f" FROM (VALUES {','.join(['(?,?,?,?,?,?,?,?)'] * (len(part) // 8))})",
            part,
        )
    con.execute("COMMIT")


def scale(sizes: Sequence[int], dim: int, sample: int, repeats: int, *, peers: Sequence[str],
          parent: str | None, batch: int, bulk: int, set_rows: int, cold: bool) -> None:
    """Fill, lookups, bytes on disk, open and info() at each size in ``sizes``."""
    fill = f"writes of {batch:,}" if not bulk else f"writes of {bulk:,}, its last tenth in writes of {batch:,}"
    print(f"cache at scale: {dim}-d float32, filled in {fill}; lookups of {sample:,} keys "
          f"in batches of 10,000 (warm: best of {repeats}); peer: a plain diskcache.Cache.get loop "
          f"(pickled arrays)" + (f", filled by set() for its first {set_rows:,} rows and by SQL "
                                 f"writing the same rows after" if set_rows else ""))
    print(f"  {'entries':>10} {'peer':<24}{'fill/s':>9}{'end/s':>9}{'fill s':>8}{'B/entry':>8}"
          f"{'open ms':>9}{'info ms':>9}{'written/s':>11}{'random/s':>10}{'cold/s':>9}")
    dropped = None
    for n in sizes:
        rows = {}
        keys = EmbeddingCache.raw_keys("bench", "m", dim, [f"doc {i}" for i in range(n)])
        hexkeys = [k.hex() for k in keys] if "plain" in peers else []
        pick = np.random.default_rng(1).choice(n, size=min(2 * sample, n), replace=False)
        warm, cold_pick = pick[:sample], pick[sample:]
        orders = {"written": np.sort(warm), "random": warm}
        for name in peers:
            rng = np.random.default_rng(0)
            with tempfile.TemporaryDirectory(dir=parent) as tmp:
                path = f"{tmp}/{name}"
                handle = EmbeddingCache(path) if name == "ours" else diskcache.Cache(path, size_limit=2**62)
                t0 = time.perf_counter()
                tail = t0
                tail_start = n - max(n // 10, min(n, batch))
                start = 0
                while start < n:
                    if start >= tail_start and tail == t0:
                        tail = time.perf_counter()
                    step = batch if start >= tail_start or not bulk else min(bulk, tail_start - start)
                    if name == "plain" and start < set_rows:
                        step = min(step, set_rows - start)
                    block = rng.standard_normal((min(step, n - start), dim), dtype=np.float32)
                    if name == "ours":
                        handle.put(keys[start : start + step], block, source=("bench", "m", dim))
                    elif start < set_rows or not set_rows:
                        with handle.transact():
                            for k, v in zip(hexkeys[start : start + step], block):
                                handle.set(k, v)
                        if start + step >= set_rows:
                            set_rate = min(n, set_rows or n) / (time.perf_counter() - t0)
                    else:
                        _fill_plain_by_sql(handle, hexkeys[start : start + step], block)
                    start += step
                fill = time.perf_counter() - t0
                end_rate = (n - tail_start) / (time.perf_counter() - tail)
                handle.close()
                size = _disk_bytes(path)
                if cold:
                    dropped = _drop_page_cache()
                t0 = time.perf_counter()
                handle = EmbeddingCache(path) if name == "ours" else diskcache.Cache(path)
                opened = time.perf_counter() - t0
                t0 = time.perf_counter()
                if name == "ours":
                    info = handle.info()
                    assert info["entries"] == n and info["namespaces"][0]["entries"] == n
                else:
                    assert len(handle) == n and handle.volume() > 0
                info_s = time.perf_counter() - t0

                def runner(order: np.ndarray) -> Callable[[], None]:
                    if name == "ours":
                        ks = [keys[i] for i in order]

                        def run() -> None:
                            for s in range(0, len(ks), 10_000):
                                assert handle.lookup(ks[s : s + 10_000], dim)[0].all()
                    else:
                        hs = [hexkeys[i] for i in order]

                        def run() -> None:
                            for k in hs:
                                assert handle.get(k) is not None
                    return run

                rates = {}
                if cold and len(cold_pick):  # one pass, keys not read before, page cache dropped
                    t0 = time.perf_counter()
                    runner(cold_pick)()
                    rates["cold"] = len(cold_pick) / (time.perf_counter() - t0)
                for label, order in orders.items():
                    timer = _Timer()
                    run = runner(order)
                    for _ in range(repeats):
                        timer.run(run)
                    rates[label] = len(order) / timer.wall
                handle.close()
                del handle
            rows[name] = rates
            label = "EmbeddingCache.lookup" if name == "ours" else "diskcache.Cache.get loop"
            cold_rate = f"{rates['cold']:>9,.0f}" if "cold" in rates else f"{'-':>9}"
            print(f"  {n:>10,} {label:<24}{n / fill:>9,.0f}{end_rate:>9,.0f}{fill:>8,.1f}{size / n:>8,.0f}"
                  f"{opened * 1e3:>9.1f}{info_s * 1e3:>9.2f}{rates['written']:>11,.0f}{rates['random']:>10,.0f}"
                  f"{cold_rate}", flush=True)
            if name == "plain" and set_rows and set_rows < n:
                print(f"  {'':>10} (diskcache set() loop over its first {min(set_rows, n):,} rows: "
                      f"{set_rate:,.0f} rows/s)", flush=True)
        if len(rows) == 2:
            ours, plain = rows["ours"], rows["plain"]
            print(f"  {n:>10,} ratio lookup / loop: "
                  + ", ".join(f"{ours[k] / plain[k]:.2f}x {k}" for k in ours if k in plain)
                  + f" (vector: {4 * dim} B, estimate per entry: {entry_bytes(dim)} B)", flush=True)
    if cold:
        print("  cold: one pass over keys not read before, the page cache dropped after the fill"
              if dropped else "  cold: not measured (dropping the page cache needs root)")


def _fill(cache: EmbeddingCache, keys: list[bytes], dim: int, *, batch: int, bulk: int) -> tuple[float, float]:
    """Write ``keys`` with random vectors, ``bulk`` rows per write and the last tenth ``batch``
    per write; returns (rows/s over the fill, rows/s over its last tenth)."""
    n = len(keys)
    rng = np.random.default_rng(0)
    tail_start = n - max(n // 10, min(n, batch))
    t0 = time.perf_counter()
    tail = t0
    start = 0
    while start < n:
        if start >= tail_start and tail == t0:
            tail = time.perf_counter()
        step = batch if start >= tail_start or not bulk else min(bulk, tail_start - start)
        block = rng.standard_normal((min(step, n - start), dim), dtype=np.float32)
        cache.put(keys[start : start + step], block, source=("bench", "m", dim))
        start += step
    end = time.perf_counter()
    return n / (end - t0), (n - tail_start) / (end - tail)


def study(n: int, dim: int, sample: int, repeats: int, *, page_sizes: Sequence[int],
          reads: Sequence[tuple[int, int]], parent: str | None, batch: int, bulk: int, writes: int) -> None:
    """One cache of ``n`` entries per page size: bytes and fill, then lookups under each read
    setting and the cost of a write of 64 new random keys, the caches taking turns (so that a
    burst of load on the machine hits every page size alike)."""
    print(f"page-size study: {n:,} entries of {dim}-d, filled in writes of {bulk or batch:,} "
          f"(last tenth {batch:,}); lookups of {sample:,} keys in batches of 10,000 (best of {repeats}, "
          f"the caches taking turns); write: {writes} writes of 64 new random keys (median)")
    keys = EmbeddingCache.raw_keys("bench", "m", dim, [f"doc {i}" for i in range(n)])
    new = EmbeddingCache.raw_keys("bench", "m", dim, [f"new {i}" for i in range(64 * writes * repeats)])
    warm = np.random.default_rng(1).choice(n, size=min(sample, n), replace=False)
    orders = {"written": [keys[i] for i in np.sort(warm)], "random": [keys[i] for i in warm]}
    orders["sorted"] = [k for s in range(0, len(warm), 10_000) for k in sorted(orders["random"][s : s + 10_000])]
    block = np.random.default_rng(2).standard_normal((64, dim), dtype=np.float32)
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        filled = {}
        for page in page_sizes:
            with _config.override(CACHE_PAGE_SIZE=page):
                cache = EmbeddingCache(f"{tmp}/{page}")
                filled[page] = _fill(cache, keys, dim, batch=batch, bulk=bulk)
                cache.close()
                filled[page] += (_disk_bytes(f"{tmp}/{page}") / n,)
        print(f"  {'page':>6}{'B/entry':>8}{'fill/s':>9}{'end/s':>8}{'mmap MiB':>9}{'cache MiB':>10}"
              f"{'written/s':>11}{'random/s':>10}{'sorted/s':>10}{'write ms':>10}{'CPU ms':>8}")
        for i, (mmap, pcache) in enumerate(reads):
            best = {(p, o): float("inf") for p in page_sizes for o in orders}
            wall: dict[int, list[float]] = {p: [] for p in page_sizes}
            cpu: dict[int, list[float]] = {p: [] for p in page_sizes}
            with _config.override(CACHE_MMAP_BYTES=mmap * 2**20, CACHE_PAGE_CACHE_BYTES=pcache * 2**20):
                caches = {p: EmbeddingCache(f"{tmp}/{p}") for p in page_sizes}
                for r in range(repeats):
                    for p, cache in caches.items():
                        for label, ks in orders.items():
                            t0 = time.perf_counter()
                            for s in range(0, len(ks), 10_000):
                                assert cache.lookup(ks[s : s + 10_000], dim)[0].all()
                            best[p, label] = min(best[p, label], time.perf_counter() - t0)
                        if i == 0:  # the proxy's write: 64 new keys at random, one transaction each
                            for w in range(r * writes, (r + 1) * writes):
                                t0, c0 = time.perf_counter(), time.process_time()
                                cache.put(new[64 * w : 64 * (w + 1)], block, source=("bench", "m", dim))
                                wall[p].append(time.perf_counter() - t0)
                                cpu[p].append(time.process_time() - c0)
                for cache in caches.values():
                    cache.close()
            for p in page_sizes:
                fill, end, size = filled[p]
                rates = {o: len(orders[o]) / best[p, o] for o in orders}
                write = f"{np.median(wall[p]) * 1e3:>10.2f}{np.median(cpu[p]) * 1e3:>8.2f}" if i == 0 else ""
                print(f"  {p // 1024:>4}Ki{size:>8,.0f}{fill:>9,.0f}{end:>8,.0f}{mmap:>9,}{pcache:>10,}"
                      f"{rates['written']:>11,.0f}{rates['random']:>10,.0f}{rates['sorted']:>10,.0f}{write}",
                      flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", action="store_true", help="lookups, size, open and info() at --sizes")
    parser.add_argument("--sizes", default="100000,1000000", help="entries of each cache at --scale")
    parser.add_argument("--sample", type=int, default=100_000, help="keys looked up at --scale")
    parser.add_argument("--peers", default="ours,plain", help="at --scale: ours, plain or both")
    parser.add_argument("--dir", default=None, help="at --scale: where the caches are made")
    parser.add_argument("--batch", type=int, default=10_000, help="at --scale: rows per write")
    parser.add_argument("--bulk", type=int, default=0,
                        help="at --scale: rows per write before the last tenth of the fill (0: --batch)")
    parser.add_argument("--set-rows", type=int, default=0,
                        help="at --scale: fill the peer by set() for this many rows, by SQL after (0: all by set())")
    parser.add_argument("--cold", action="store_true",
                        help="at --scale: also a pass from a dropped page cache (needs root)")
    parser.add_argument("--study", action="store_true", help="the page-size study at the first of --sizes")
    parser.add_argument("--page-sizes", default="4096,8192,16384,32768,65536", help="at --study")
    parser.add_argument("--reads", default="1024:32,2047:32,2047:512,0:32",
                        help="at --study: memory map MiB:page cache MiB settings, the first also for the write")
    parser.add_argument("--writes", type=int, default=40, help="at --study: writes of 64 new keys")
    parser.add_argument("--full", action="store_true", help="100,000 vectors instead of 20,000")
    parser.add_argument("-n", type=int, default=None, help="number of cached vectors")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs")
    args = parser.parse_args(argv)
    if args.study:
        dim = 384 if args.dim == 1024 and "--dim" not in (argv or sys.argv) else args.dim
        study(int(args.sizes.split(",")[-1]), dim, min(args.sample, 50_000), min(args.repeats, 3),
              page_sizes=[int(x) for x in args.page_sizes.split(",")],
              reads=[tuple(int(v) for v in r.split(":")) for r in args.reads.split(",")],
              parent=args.dir, batch=args.batch, bulk=args.bulk, writes=args.writes)
        return
    if args.scale:
        dim = 384 if args.dim == 1024 and "--dim" not in (argv or sys.argv) else args.dim
        scale([int(x) for x in args.sizes.split(",")], dim, args.sample, min(args.repeats, 3),
              peers=args.peers.split(","), parent=args.dir, batch=args.batch, bulk=args.bulk, set_rows=args.set_rows,
              cold=args.cold)
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
