"""Benchmark the similarity kernels against their peers, side by side, in one run.

    python benchmarks/bench_kernels.py topk  [--full] [--queries 1,100,1000]
                                             [--sizes 50000,200000,1000000] [--k 10]
                                             [--peers embedcache-cosine,faiss,gemm] [--repeat 5]
    python benchmarks/bench_kernels.py pairs [--full] [--st]

Quick mode (default, about a minute): 50,000 x 384 corpus for top-k (the slow peers,
usearch and semantic_search, only up to 100 queries), 10,000 x 384 for pairs. ``--full``: the sizes of the performance targets (1,000,000 x 384, k=10; pairs on
100,000 x 384 with 1,000 planted near-duplicates, threshold 0.95). ``--sizes`` runs top-k
on several corpus sizes in one run (the target holds from 50,000 to 1,000,000 rows).

Every case runs in a subprocess of its own that builds the same data from a seed and warms
up (compiles). For top-k all cases of one corpus size and query count are alive at once and
are timed in turns (ours, faiss, gemm, ours, faiss, gemm, ...; ``--repeat`` rounds), so a
burst of load from elsewhere on the machine hits every case alike; the table gives each
case's median, its spread (lowest and highest), and its ratio to faiss as the median of the
per-round ratios. "extra" is the growth of the peak resident set (VmHWM) over the timed
calls, which also sees BLAS and numba allocations. "gemm" is the ceiling: the matrix product
alone (numpy's BLAS on all threads, corpus blocks into one reused 32 MiB buffer), no top-k.
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are removed from the environment (the script re-execs
itself) because they can slow numpy's BLAS; threadpoolctl's view of the BLAS is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_STRIP = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def _vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _corpus(n: int, d: int, seed: int = 0, planted: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    if planted:
        src = rng.choice(n, planted, replace=False)
        dst = rng.choice(np.setdiff1d(np.arange(n), src), planted, replace=False)
        x[dst] = x[src] + 0.25 * rng.standard_normal((planted, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# ---------------------------------------------------------------------------------------
# cases (run inside the child process)
# ---------------------------------------------------------------------------------------


def _topk_case(name: str, n: int, d: int, nq: int, k: int):
    import numpy as np

    x = _corpus(n, d)
    q = _corpus(nq, d, seed=1)
    if name.startswith("embedcache"):
        from embedcache import top_k

        metric = "cosine" if "cosine" in name else "dot"
        corpus = x.astype(np.float16) if "f16" in name else x
        return lambda: top_k(q, corpus, k, metric=metric)
    if name == "faiss":
        import faiss

        index = faiss.IndexFlatIP(d)
        index.add(x)
        return lambda: index.search(q, k)
    if name == "numpy":

        def run():
            s = q @ x.T
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            return np.take_along_axis(s, part, axis=1)

        return run
    if name == "semantic_search":
        import torch
        from sentence_transformers import util

        qt, xt = torch.from_numpy(q), torch.from_numpy(x)
        return lambda: util.semantic_search(qt, xt, top_k=k, score_function=util.dot_score)
    if name == "usearch":
        from usearch.index import search
        from usearch.index import MetricKind

        return lambda: search(x, q, k, MetricKind.IP, exact=True)
    if name == "gemm":
        # the matrix product alone, all BLAS threads, blocks of corpus rows into one buffer
        rows = max(1, min(n, (32 << 20) // (4 * nq)))
        out = np.empty((nq, rows), np.float32)

        def run():
            for c0 in range(0, n, rows):
                part = x[c0 : c0 + rows]
                np.matmul(q, part.T, out=out[:, : part.shape[0]])

        return run
    raise ValueError(name)


def _pairs_case(name: str, n: int, d: int, threshold: float):
    import numpy as np

    x = _corpus(n, d, planted=max(1, n // 100))
    if name == "embedcache":
        from embedcache import similar_pairs

        return lambda: len(similar_pairs(x, threshold)[0])
    if name == "numpy-triangle":

        def run():
            found = 0
            for i in range(0, n, 1024):
                s = x[i : i + 1024] @ x[i:].T
                r, c = np.nonzero(s >= threshold)
                found += int((c > r).sum())
            return found

        return run
    if name == "faiss-range":
        import faiss

        index = faiss.IndexFlatIP(d)
        index.add(x)
        return lambda: (int(index.range_search(x, threshold)[0][-1]) - n) // 2
    if name == "st-paraphrase":
        import torch
        from sentence_transformers import util

        xt = torch.from_numpy(x)
        return lambda: len(
            util.paraphrase_mining_embeddings(xt, top_k=100, max_pairs=10**7)
        )
    if name == "gemm-triangle":

        def run():
            for i in range(0, n, 2048):
                x[i : i + 2048] @ x[i:].T

        return run
    raise ValueError(name)


def _server(spec: dict) -> None:
    """Build one case, warm it up, then time one call per "run" line read from stdin."""
    fn = _topk_case(spec["name"], spec["n"], spec["d"], spec["nq"], spec["k"])
    t0 = time.perf_counter()
    fn()  # warm-up: compiles, faults pages in
    warm = time.perf_counter() - t0
    _reset_hwm()
    before = _vm_hwm_kib()
    print(json.dumps({"ready": True, "first_call": warm}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t0 = time.perf_counter()
        fn()
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
    print(json.dumps({"extra_mib": max(0, _vm_hwm_kib() - before) / 1024}), flush=True)


def _child(spec: dict) -> None:
    if spec["kind"] == "topk":
        fn = _topk_case(spec["name"], spec["n"], spec["d"], spec["nq"], spec["k"])
    else:
        fn = _pairs_case(spec["name"], spec["n"], spec["d"], spec["threshold"])
    t0 = time.perf_counter()
    fn()  # warm-up: compiles, faults pages in
    warm = time.perf_counter() - t0
    _reset_hwm()
    before = _vm_hwm_kib()
    best = float("inf")
    result = None
    for _ in range(spec["repeat"]):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    extra = max(0, _vm_hwm_kib() - before) / 1024
    found = result if isinstance(result, int) else None
    print(json.dumps({"seconds": best, "extra_mib": extra, "first_call": warm, "found": found}))


def _run(spec: dict, timeout: float) -> dict | None:
    cmd = [sys.executable, __file__, "_child", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": last[:100]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print_env() -> None:
    import numba
    import numpy as np

    print(f"numpy {np.__version__}, numba {numba.__version__}, "
          f"numba threads {numba.get_num_threads()}, cpus {os.cpu_count()}")
    try:
        from threadpoolctl import threadpool_info

        for info in threadpool_info():
            print(f"  {info.get('internal_api')} {info.get('version')} "
                  f"threads={info.get('num_threads')} arch={info.get('architecture')}")
    except ImportError:
        print("  (threadpoolctl not installed)")


def _topk_rows(a, names, n: int, d: int, nq: int) -> None:
    import statistics
    import tempfile

    procs, errs = {}, {}
    for name in names:
        if name == "embedcache-f16-dot" and nq > 1:
            continue
        if not a.full and nq > 100 and name in ("usearch", "semantic_search"):
            continue  # slow peers: only with --full
        spec = {"kind": "topk", "name": name, "n": n, "d": d, "nq": nq, "k": a.k}
        errs[name] = tempfile.TemporaryFile("w+")
        procs[name] = subprocess.Popen(
            [sys.executable, __file__, "_server", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errs[name], text=True,
        )
    info = {}
    times = {name: [] for name in procs}

    def ask(name, line=None):
        proc = procs[name]
        if line is not None:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
        out = proc.stdout.readline()
        if not out:
            proc.wait()
            errs[name].seek(0)
            last = (errs[name].read().strip().splitlines() or ["?"])[-1]
            info[name] = {"error": last[:100]}
            return None
        return json.loads(out)

    for name in list(procs):  # children build their data in parallel; wait for each
        r = ask(name)
        if r is not None:
            info[name] = r
    live = [name for name in procs if "error" not in info.get(name, {})]
    repeat = a.repeat if nq > 1 else 3 * a.repeat
    for _ in range(repeat):
        for name in list(live):
            time.sleep(0.3)  # BLAS and OpenMP threads of the case before stop spinning
            r = ask(name, "run")
            if r is None:
                live.remove(name)
                continue
            times[name].append(r["seconds"])
    for name, proc in procs.items():
        if name in live:
            r = ask(name, "quit")
            if r is not None:
                info[name].update(r)
        proc.stdin.close()
        proc.wait()
        errs[name].close()
    print(f"{nq} queries ({repeat} rounds, interleaved)")
    ref = times.get("faiss") or None
    gemm = times.get("gemm") or None
    for name in procs:
        r = info.get(name, {})
        if "error" in r or not times[name]:
            print(f"  {name:<20} {r.get('error', 'no timing')}")
            continue
        t = times[name]
        med = statistics.median(t)
        ratio = ""
        if ref and len(ref) == len(t):
            ratio = f"{statistics.median(x / y for x, y in zip(t, ref)):5.2f}x faiss"
        frac = ""
        if gemm and len(gemm) == len(t):
            frac = f"{statistics.median(y / x for x, y in zip(t, gemm)):4.0%} of GEMM rate"
        gf = 2 * nq * n * d / med / 1e9
        print(f"  {name:<20} {med * 1e3:9.1f} ms [{min(t) * 1e3:.1f}-{max(t) * 1e3:.1f}]"
              f"  {ratio:>13}  +{r.get('extra_mib', 0):7.1f} MiB  {gf:6.1f} GFLOP/s {frac}"
              f"  (first call {r['first_call']:.2f} s)")


def main() -> None:
    if any(v in os.environ for v in _STRIP):
        env = {k: v for k, v in os.environ.items() if k not in _STRIP}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if len(sys.argv) > 2 and sys.argv[1] == "_server":
        _server(json.loads(sys.argv[2]))
        return
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        _child(json.loads(sys.argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["topk", "pairs"])
    p.add_argument("--full", action="store_true", help="the target sizes (slow)")
    p.add_argument("--queries", default=None, help="comma-separated query counts")
    p.add_argument("--sizes", default=None, help="comma-separated top-k corpus sizes")
    p.add_argument("--k", type=int, default=10, help="neighbours per query in top-k")
    p.add_argument("--peers", default=None, help="comma-separated subset of cases")
    p.add_argument("--st", action="store_true", help="include paraphrase_mining (slow)")
    p.add_argument("--repeat", type=int, default=5,
                   help="interleaved timed rounds per top-k case (x3 for one query)")
    p.add_argument("--timeout", type=float, default=300.0)
    a = p.parse_args()
    _print_env()
    d = 384
    if a.what == "topk":
        if a.sizes:
            sizes = [int(c) for c in a.sizes.split(",")]
        else:
            sizes = [1_000_000 if a.full else 50_000]
        counts = [int(c) for c in (a.queries or "1,100,1000").split(",")]
        names = ["embedcache-dot", "embedcache-cosine", "embedcache-f16-dot", "faiss",
                 "numpy", "semantic_search", "usearch", "gemm"]
        if a.peers:
            names = [x for x in names if x in a.peers.split(",")]
        for n in sizes:
            print(f"\ntop-k, k={a.k}, corpus {n:,} x {d} normalized float32")
            for nq in counts:
                _topk_rows(a, names, n, d, nq)
    else:
        n = 100_000 if a.full else 10_000
        names = ["embedcache", "numpy-triangle", "faiss-range", "gemm-triangle"]
        if a.st:
            names.append("st-paraphrase")
        if a.peers:
            names = [x for x in names if x in a.peers.split(",")]
        print(f"pairs >= 0.95, {n:,} x {d} normalized float32, {max(1, n // 100)} planted")
        rows = {name: _run({"kind": "pairs", "name": name, "n": n, "d": d,
                            "threshold": 0.95, "repeat": 1}, a.timeout) for name in names}
        ceiling = rows.get("gemm-triangle", {}).get("seconds")
        flop = n * n * d  # the triangle: n^2/2 dot products of 2d flops
        for name, r in rows.items():
            if "error" in r:
                print(f"  {name:<16} {r['error']}")
                continue
            frac = f"{ceiling / r['seconds']:4.0%} of GEMM ceiling" if ceiling else ""
            print(f"  {name:<16} {r['seconds']:8.2f} s  +{r['extra_mib']:7.1f} MiB  "
                  f"{flop / r['seconds'] / 1e9:6.1f} GFLOP/s  {frac}  pairs={r['found']}")


if __name__ == "__main__":
    main()
