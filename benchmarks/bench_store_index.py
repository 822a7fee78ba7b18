"""Search of a VectorStore through its index against the exact scan, in one run.

    python benchmarks/bench_store_index.py [-n 200000] [--dim 384] [--queries 200] [--dir DIR]
        [--from-npy PATH] [--dtype float32|float16] [--steps add,index,search]
        [--recalls 0.9,0.95,0.99] [--exact-single 20]

Data: :func:`bench_index.generate` (anisotropic clusters of power-law sizes, a giant cluster,
near-identical blocks, planted near-duplicates), made here for ``n + queries`` rows, or read
from ``--from-npy`` (a ``.npy`` file of that generator, e.g. the 10M one ``bench_index.py
--data-dir`` writes, opened as a memory map: nothing is generated again). ``--queries`` rows
drawn at random (seed 1) from the first ``n + queries`` rows are held out of the store and
used as queries: other points of the same clusters, not rows of the collection. The store
gets the others in file order, written ``--add-rows`` at a time (memory stays bounded), with
ids ``"<position in the file>"``.

Steps (``--steps``; with ``--dir`` each reuses what an earlier run left there, so the store
write, the index build and the search measurement can be separate runs):

``add``     the store write: seconds and peak memory beyond the map;
``index``   ``create_index``: seconds, cells, probes, peak memory beyond the map;
``search``  the exact answer of every query (one batched ``exact=True`` scan, kept in the
            directory for the next run), then through the index at each ``--recalls`` target:
            p50 / p99 of one query's wall time (each query alone; a first pass over the
            queries, whose rows may still be on disk, then a second, warm one), recall@10
            against the exact answer with its 95% interval (the library's ratio estimator
            over queries), and a batched call of all queries (seconds per query, recall);
            last, the one-query latency of the exact scan on ``--exact-single`` queries and
            its ratio to each level's warm p50 (last: its reading of the whole store would
            push the index's pages out of the page cache before they are measured).

Memory "beyond the map" is the peak RssAnon of the process during the step (resident memory
less file-backed pages such as the store's memory maps, sampled every 0.1 s), what the
4 GiB target is about; peak RSS (maps included) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import embedcache as ec
from embedcache.index._recall import interval

from bench_index import PeakAnon  # noqa: E402 (the benchmarks folder is the script's path)


class Peak(PeakAnon):
    """Peak RssAnon of this process since the last :meth:`reset` (bench_index's sampler)."""

    def reset(self) -> None:
        self.start()

    def text(self) -> str:
        import resource

        anon = self.step_gib()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return f"peak memory beyond the map {anon:.2f} GiB (process peak RSS with maps {rss:.2f} GiB)"


def _data(args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(collection rows in file order: an array or memmap, positions of the kept rows, queries)."""
    if args.from_npy:
        x = np.load(args.from_npy, mmap_mode="r")
        total = min(len(x), args.n + args.queries)
    else:
        from bench_index import generate

        x = generate(args.n + args.queries, args.dim, seed=0)
        total = len(x)
    held = np.sort(np.random.default_rng(1).choice(total, args.queries, replace=False))
    keep = np.ones(total, bool)
    keep[held] = False
    return x, keep, np.ascontiguousarray(x[held], dtype=np.float32)


def _add(store, x, keep, rows_per_add: int) -> None:
    total = len(keep)
    for a in range(0, total, rows_per_add):
        pos = a + np.flatnonzero(keep[a : a + rows_per_add])
        store.add([str(p) for p in pos], np.ascontiguousarray(x[a : a + rows_per_add][keep[a : a + rows_per_add]]))


def _single(fn, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(seconds per query, ids (q, k)) with each query searched alone."""
    times, out = [], []
    for v in queries:
        t = time.perf_counter()
        out.append(fn(v)[1][0])
        times.append(time.perf_counter() - t)
    return np.array(times), np.array(out, dtype=object)


def _recall(got: np.ndarray, exact: np.ndarray, k: int) -> str:
    found = np.array([len(set(a) & set(b)) for a, b in zip(got, exact)], np.float64)
    est, low, high = interval(found, np.full(len(found), float(k)))
    return f"recall@{k} {est:.4f} (95% CI {low:.4f}-{high:.4f})"


def _ms(t: np.ndarray) -> str:
    return f"p50 {1e3 * np.median(t):7.2f} ms, p99 {1e3 * np.quantile(t, 0.99):7.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--from-npy", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--steps", default="add,index,search")
    ap.add_argument("--recalls", default="0.9,0.95,0.99")
    ap.add_argument("--exact-single", type=int, default=20)
    ap.add_argument("--add-rows", type=int, default=1 << 20)
    ap.add_argument("-k", type=int, default=10)
    args = ap.parse_args()
    steps = set(args.steps.split(","))
    peak = Peak()
    work = Path(args.dir or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    x, keep, q = _data(args)
    store = ec.VectorStore(work / "store", dtype=args.dtype)
    print(f"rows {int(keep.sum())} x {x.shape[1]} {args.dtype}, {len(q)} held-out queries, "
          f"{'file ' + args.from_npy if args.from_npy else 'generated'}", flush=True)
    if "add" in steps:
        if len(store):
            raise SystemExit(f"{work / 'store'} holds rows already; leave 'add' out of --steps to reuse it")
        peak.reset()
        t = time.perf_counter()
        _add(store, x, keep, args.add_rows)
        print(f"add {time.perf_counter() - t:.1f} s ({len(store)} rows); {peak.text()}", flush=True)
    if len(store) != int(keep.sum()):
        raise SystemExit(f"{work / 'store'} holds {len(store)} rows, expected {int(keep.sum())}")
    if "index" in steps:
        peak.reset()
        t = time.perf_counter()
        info = store.create_index(seed=0)
        built = ", ".join(f"{k}: {v['estimate']:.3f}" for k, v in info["recall"].items())
        print(f"create_index {time.perf_counter() - t:.1f} s: {info['cells']} cells, probes {info['probes']}, "
              f"recall at build {{{built}}}; {peak.text()}", flush=True)
    if "search" not in steps:
        store.close()
        return
    info = store.index_info()
    k = args.k
    truth = work / f"exact_{len(q)}_{k}.json"
    peak.reset()
    if truth.exists():
        exact = np.array(json.loads(truth.read_text()), dtype=object)
    else:
        t = time.perf_counter()
        exact = store.search(q, k, exact=True)[1]
        print(f"exact batched {len(q)} queries {time.perf_counter() - t:.1f} s; {peak.text()}", flush=True)
        truth.write_text(json.dumps(exact.tolist()))
    store.search(q[0], k)  # warm-up: compiled kernels, the index's maps
    warm = {}
    for target in (float(r) for r in args.recalls.split(",")):
        probes = None
        if info is not None:
            from embedcache.store._index import probes_for

            probes = probes_for(_description(store), target)
        for name in ("first pass", "warm"):
            peak.reset()
            ts, got = _single(lambda v, r=target: store.search(v, k, recall=r), q)
            print(f"index r={target:<5} {probes} probes, one query, {name:10}: {_ms(ts)}, {_recall(got, exact, k)}; "
                  f"{peak.text()}", flush=True)
        warm[target] = np.median(ts)
        peak.reset()
        t = time.perf_counter()
        _, got = store.search(q, k, recall=target)
        dt = time.perf_counter() - t
        print(f"index r={target:<5} batched {len(q)} queries: {1e3 * dt / len(q):7.3f} ms per query, "
              f"{_recall(got, exact, k)}; {peak.text()}", flush=True)
    ex_t, _ = _single(lambda v: store.search(v, k, exact=True), q[: args.exact_single])
    ratios = ", ".join(f"r={r}: {np.median(ex_t) / t:.1f}x" for r, t in warm.items())
    print(f"exact scan one query ({len(ex_t)}): {_ms(ex_t)}; scan/index (p50, warm) {ratios}", flush=True)
    store.close()


def _description(store) -> dict:
    from embedcache.store import _index

    with store._txn.reading() as v:
        return _index.description(v)


if __name__ == "__main__":
    main()
