"""Benchmark the similarity kernels against their peers, side by side, in one run.

    python benchmarks/bench_kernels.py topk  [--full] [--queries 1,100,1000]
                                             [--sizes 50000,200000,1000000] [--k 10]
    python benchmarks/bench_kernels.py pairs [--full] [--st]

Quick mode (default, about a minute): 50,000 x 384 corpus for top-k (the slow peers,
usearch and semantic_search, only up to 100 queries), 10,000 x 384 for pairs. ``--full``: the sizes of the performance targets (1,000,000 x 384, k=10; pairs on
100,000 x 384 with 1,000 planted near-duplicates, threshold 0.95). ``--sizes`` runs top-k
on several corpus sizes in one run (the target holds from 50,000 to 1,000,000 rows).

Every case runs in a fresh subprocess that builds the same data from a seed, warms up
(compiles), then times one call; "extra" is the growth of the peak resident set
(VmHWM) during the timed call, which also sees BLAS and numba allocations.
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
        return lambda: q @ x.T
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
    rows = {}
    for name in names:
        if name == "embedcache-f16-dot" and nq > 1:
            continue
        if not a.full and nq > 100 and name in ("usearch", "semantic_search"):
            continue  # slow peers: only with --full
        spec = {"kind": "topk", "name": name, "n": n, "d": d, "nq": nq, "k": a.k,
                "repeat": 3 if nq == 1 else 1}
        rows[name] = _run(spec, a.timeout)
    ref = rows.get("faiss", {}).get("seconds")
    gemm = rows.get("gemm", {}).get("seconds")
    print(f"{nq} queries")
    for name, r in rows.items():
        if "error" in r:
            print(f"  {name:<20} {r['error']}")
            continue
        ratio = f"{r['seconds'] / ref:5.2f}x faiss" if ref else ""
        gf = 2 * nq * n * d / r["seconds"] / 1e9
        frac = f"{gemm / r['seconds']:4.0%} of GEMM rate" if gemm else ""
        print(f"  {name:<20} {r['seconds'] * 1e3:9.1f} ms  {ratio:>13}  "
              f"+{r['extra_mib']:7.1f} MiB  {gf:6.1f} GFLOP/s {frac}  "
              f"(first call {r['first_call']:.2f} s)")


def main() -> None:
    if any(v in os.environ for v in _STRIP):
        env = {k: v for k, v in os.environ.items() if k not in _STRIP}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
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
