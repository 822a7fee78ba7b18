"""One-query search latency of a VectorStore through its index against the exact scan, in one run.

    python benchmarks/bench_store_index.py [-n 200000] [--dim 384] [--queries 200] [--dir DIR]

Data: :func:`bench_index.generate` (anisotropic clusters of power-law sizes, a giant cluster,
near-identical rows, planted near-duplicates); ``--queries`` rows drawn from the same
generator are held out of the store and used as queries. Prints the time of ``add`` and of
``create_index``, then for the exact scan (``exact=True``) and for the index at a few recall
targets: the median and 95th percentile wall time of one query (each query alone, after one
warm-up), and recall@10 against the exact answer over all held-out queries.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_index import generate

import embedcache as ec


def _latencies(fn, queries: np.ndarray) -> tuple[np.ndarray, list]:
    fn(queries[:1])  # warm-up: compiled kernels, mapped files
    times, out = [], []
    for q in queries:
        t = time.perf_counter()
        out.append(fn(q[None, :])[1][0])
        times.append(time.perf_counter() - t)
    return np.array(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    x = generate(args.n + args.queries, args.dim, seed=0)
    perm = np.random.default_rng(1).permutation(len(x))
    q, x = x[perm[: args.queries]], x[perm[args.queries :]]
    work = Path(args.dir or tempfile.mkdtemp())
    store = ec.VectorStore(work / "store")
    t = time.perf_counter()
    store.add([str(i) for i in range(len(x))], x)
    print(f"n={len(x)} d={args.dim}: add {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    info = store.create_index(seed=0)
    built = ", ".join(f"{k}: {v['estimate']:.3f}" for k, v in info["recall"].items())
    print(f"create_index {time.perf_counter() - t:.1f} s: {info['cells']} cells, probes {info['probes']}, "
          f"recall at build {{{built}}}")
    ex_t, exact = _latencies(lambda v: store.search(v, 10, exact=True), q[: min(len(q), 40)])
    _, exact = store.search(q, 10, exact=True)
    print(f"exact scan    one query: median {1e3 * np.median(ex_t):7.2f} ms, p95 {1e3 * np.quantile(ex_t, 0.95):7.2f} ms")
    for target in (0.9, 0.95, 0.99):
        ts, got = _latencies(lambda v, r=target: store.search(v, 10, recall=r), q)
        rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)])
        print(f"index r={target:<4} one query: median {1e3 * np.median(ts):7.2f} ms, "
              f"p95 {1e3 * np.quantile(ts, 0.95):7.2f} ms, recall@10 {rec:.3f}, "
              f"{np.median(ex_t) / np.median(ts):5.1f}x faster than the scan")
    store.close()


if __name__ == "__main__":
    main()
