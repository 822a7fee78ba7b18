"""The caching proxy under load on loopback: throughput and added latency against the upstream.

A fake OpenAI-compatible upstream (``benchmarks/fast_upstream.py``, or ``--upstream testing``)
(``embedcache serve``) run as processes of their own; the load generator is an asyncio pool of
keep-alive HTTP/1.1 connections with pre-encoded requests (cheap, so that the machine's cores go
to the servers). For 1, 8 and 64 concurrent clients it measures requests of 64 items:

* all-hit: every item is in the cache (warmed first); vectors/s and p50/p99 latency;
* all-miss: every item is new; p50/p99 latency through the proxy against the upstream directly
  (the difference is what the proxy adds).

    python benchmarks/bench_serve.py --seconds 3 --dim 384
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

import httpx
import numpy as np

MODEL = "test-embed-small"


def _request(port: int, texts: list[str], encoding_format: str) -> bytes:
    body = json.dumps({"model": MODEL, "input": texts, "encoding_format": encoding_format}).encode()
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer test-key\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> None:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    status = head[9:12]
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    if status != b"200":
        raise RuntimeError(f"status {status.decode()}")


async def _load(port: int, requests: list[bytes], clients: int, seconds: float, max_requests: int | None):
    """Each client sends requests one after another on its own connection; latencies in s."""
    latencies: list[float] = []
    next_i = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal next_i
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline and (max_requests is None or next_i < max_requests):
                req = requests[next_i % len(requests)]
                next_i += 1
                t = time.perf_counter()
                await _one(reader, writer, req)
                latencies.append(time.perf_counter() - t)
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return np.array(latencies), time.perf_counter() - start


def _spawn(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def _prefill(directory: str, rows: int, dim: int) -> None:
    """``rows`` random vectors under random keys, as a cache in use holds other texts."""
    from embedcache.cache import EmbeddingCache

    rng = np.random.default_rng(1)
    with EmbeddingCache(directory) as cache:
        for start in range(0, rows, 10_000):
            n = min(10_000, rows - start)
            keys = [bytes(k) for k in rng.integers(0, 256, (n, 32), dtype=np.uint8)]
            cache.put(keys, rng.standard_normal((n, dim)).astype(np.float32), source=("prefill", MODEL, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--miss-requests", type=int, default=500,
                        help="all-miss requests per run, each of fresh items (more: steadier percentiles)")
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--prefill", type=int, default=0,
                        help="rows written to the cache before the proxy starts (other texts' vectors): "
                             "a lookup's cost grows with the cache")
    parser.add_argument("--encoding-format", default="base64", choices=["base64", "float"])
    parser.add_argument("--upstream", default="fast", choices=["fast", "testing"],
                        help="the fake upstream: benchmarks/fast_upstream.py (default), or the tests' "
                             "FakeEmbeddingServer, whose ~2.5 ms of CPU per request competes with the proxy")
    args = parser.parse_args()
    env = dict(os.environ, OPENAI_API_KEY="test-key")
    upstream = "benchmarks.fast_upstream" if args.upstream == "fast" else "embedcache.testing"
    fake = _spawn(["-m", upstream, "--dimensions", str(args.dim)], env)
    upstream_url = fake.stdout.readline().decode().strip()
    up_port = int(upstream_url.rsplit(":", 1)[1].split("/")[0])
    cache_dir = tempfile.mkdtemp(prefix="bench-serve-")
    if args.prefill:
        _prefill(cache_dir, args.prefill, args.dim)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        px_port = s.getsockname()[1]
    proxy = _spawn(["-m", "embedcache.cli", "serve", "--upstream", upstream_url, "--port", str(px_port),
                    "--cache-dir", cache_dir, "--log-level", "warning"], env)
    try:
        for _ in range(600):
            try:
                httpx.get(f"http://127.0.0.1:{px_port}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        fmt, n = args.encoding_format, args.items
        print(f"dim={args.dim} items/request={n} encoding={fmt} seconds/run={args.seconds} upstream={args.upstream} "
              f"cache rows before={args.prefill}; "
              f"{os.cpu_count()} cores shared by the load generator, the fake upstream and the proxy; "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"{'mode':8} {'clients':>7} {'target':>8} {'vectors/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'added p50':>9} {'added p99':>9}")
        hot = [[f"hot {r} {j}" for j in range(n)] for r in range(64)]
        for port in (px_port,):  # warm the cache
            for texts in hot:
                httpx.post(f"http://127.0.0.1:{port}/v1/embeddings",
                           json={"model": MODEL, "input": texts}, timeout=60).raise_for_status()
        for clients in [int(c) for c in args.clients.split(",")]:
            for mode in ("all-hit", "all-miss"):
                rows = {}
                for target, port in (("upstream", up_port), ("proxy", px_port)):
                    if mode == "all-hit":
                        reqs = [_request(port, t, fmt) for t in hot]
                        cap = None
                    else:
                        salt = uuid.uuid4().hex
                        cap = max(args.miss_requests, clients * 6)  # fresh items: each request a miss
                        reqs = [_request(port, [f"{salt} {r} {j}" for j in range(n)], fmt) for r in range(cap)]
                    lat, wall = asyncio.run(_load(port, reqs, clients, args.seconds, cap))
                    rows[target] = (len(lat) * n / wall, np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3)
                for target in ("upstream", "proxy"):
                    vps, p50, p99 = rows[target]
                    added = ("" if target == "upstream" else
                             f"{p50 - rows['upstream'][1]:9.2f} {p99 - rows['upstream'][2]:9.2f}")
                    print(f"{mode:8} {clients:7d} {target:>8} {vps:10.0f} {p50:8.2f} {p99:8.2f} {added}", flush=True)
        print("targets: all-hit >= 50,000 vectors/s; all-miss added p50 <= 2 ms")
        metrics = httpx.get(f"http://127.0.0.1:{px_port}/metrics").text
        items = [ln for ln in metrics.splitlines() if ln.startswith("embedcache_proxy_items_total")]
        ups = [ln for ln in metrics.splitlines() if ln.startswith("embedcache_proxy_upstream_requests_total")]
        print("\n".join(items + ups))
    finally:
        proxy.terminate()
        fake.terminate()
        proxy.wait(10)
        fake.wait(10)


if __name__ == "__main__":
    main()
