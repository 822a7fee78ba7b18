"""Cold-path throughput: texts embedded per second through a loopback OpenAI-compatible server.

Peers, measured in the same run against the same server (``embedcache.testing``, in a
process of its own), with the same batches, the same concurrency and base64 on both sides,
rate limiting off on both sides:

- ``OpenAIEmbeddings.embed(texts)``: batching, threads, retries and full reply validation;
- the official ``openai`` SDK: ``client.embeddings.create(input=batch, model=...,
  encoding_format="base64")`` for each batch in a thread pool, base64 decoded into the
  output array by ``index`` (no validation).

Target: OpenAIEmbeddings within 10% of the SDK or faster (ratio >= 0.9).

    python benchmarks/bench_cold.py            # quick: 2,000 texts of 1024-d
    python benchmarks/bench_cold.py --full     # 20,000 texts
"""

from __future__ import annotations

import argparse
import base64
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from embedcache import OpenAIEmbeddings
from embedcache.testing import expected_vector

MODEL = "test-embed-small"
API_KEY = "bench-key"


def _start_server(dim: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedcache.testing", "--dimensions", str(dim), "--api-key", API_KEY],
        stdout=subprocess.PIPE,
        text=True,
    )
    base_url = proc.stdout.readline().strip()
    if not base_url.startswith("http://"):
        proc.kill()
        raise RuntimeError(f"fake server did not start (said {base_url!r})")
    return proc, base_url


def _make_texts(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "embedding", "cache", "vector", "server",
             "latency", "throughput", "request", "batch", "token", "model", "search", "index"]
    return [
        f"{i}: " + " ".join(rng.choice(words, size=int(rng.integers(8, 30))))
        for i in range(n)
    ]


def _sdk_embedder(base_url: str, plan: Callable, concurrency: int) -> Callable:
    """``embed(texts)`` through the SDK, over the batches ``plan(texts)`` gives."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=60.0)
    pool = ThreadPoolExecutor(concurrency)

    def embed(texts: list[str]) -> np.ndarray:
        def one(bounds: tuple[int, int]) -> tuple[int, list]:
            start, stop = bounds
            resp = client.embeddings.create(
                input=texts[start:stop], model=MODEL, encoding_format="base64"
            )
            return start, resp.data

        out = None
        for start, data in pool.map(one, plan(texts)):
            for item in data:
                vec = np.frombuffer(base64.b64decode(item.embedding), dtype="<f4")
                if out is None:
                    out = np.empty((len(texts), vec.shape[0]), dtype=np.float32)
                out[start + item.index] = vec
        return out

    embed.close = lambda: (pool.shutdown(), client.close())  # type: ignore[attr-defined]
    return embed


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="20,000 texts instead of 2,000")
    parser.add_argument("-n", type=int, default=None, help="number of texts")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="alternating runs of each peer")
    args = parser.parse_args(argv)
    n = args.n or (20_000 if args.full else 2_000)
    repeats = args.repeats or (3 if args.full else 5)
    texts = _make_texts(n)

    proc, base_url = _start_server(args.dim)
    try:
        ours = OpenAIEmbeddings(
            MODEL, base_url=base_url, api_key=API_KEY, batch_size=args.batch_size,
            max_batch_chars=10**9, max_concurrency=args.concurrency, requests_per_second=None,
        )
        batches = ours.plan(texts)  # the SDK sends exactly these batches
        sdk = _sdk_embedder(base_url, ours._plan, args.concurrency)
        peers = {"embedcache": ours.embed, "openai SDK": sdk}

        # warm-up: connections, imports, first-call costs; and both must agree exactly
        want = np.stack([expected_vector(t, args.dim) for t in texts[:300]])
        for name, fn in peers.items():
            got = fn(texts[:300])
            if not np.array_equal(got, want):
                raise AssertionError(f"{name} returned wrong vectors")

        times: dict[str, list[float]] = {name: [] for name in peers}
        for _ in range(repeats):
            for name, fn in peers.items():
                t0 = time.perf_counter()
                X = fn(texts)
                times[name].append(time.perf_counter() - t0)
                assert X.shape == (n, args.dim)
        ours.close()
        sdk.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    print(f"cold path: {n:,} texts, {args.dim}-d, {len(batches)} batches of <= {args.batch_size}, "
          f"concurrency {args.concurrency}, base64, loopback server in its own process")
    rates = {}
    for name, ts in times.items():
        rates[name] = n / min(ts)
        print(f"  {name:<12} {rates[name]:>10,.0f} texts/s   (best of {len(ts)}; "
              f"median {n / statistics.median(ts):,.0f})")
    ratio = rates["embedcache"] / rates["openai SDK"]
    verdict = "meets" if ratio >= 0.9 else "MISSES"
    print(f"  ratio embedcache / SDK: {ratio:.2f}x  ({verdict} the target >= 0.90)")


if __name__ == "__main__":
    main()
