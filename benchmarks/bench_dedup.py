"""Deduplicating text vectors: embedcache.deduplicate against semhash and
sentence-transformers' community_detection, and against exact brute force.

The vectors are the built-in HashingEmbeddings (384-d) of synthetic review-like texts, with
planted near-duplicates (a word dropped or swapped, a typo, punctuation) and exact copies.
Every contestant gets the same float32 vectors and the same cosine threshold, and runs in a
fresh process of its own, so that its peak memory (max RSS above the process's baseline after
loading the vectors) is its own:

- ``embedcache connected``: ``deduplicate(X, threshold)``, groups = connected components;
- ``embedcache greedy``: ``deduplicate(X, threshold, mode="greedy")``, semhash's rule;
- ``semhash``: ``SemHash.from_embeddings(X, records)`` + ``self_deduplicate(threshold)``
  (its default usearch index; index build included);
- ``st community_detection``: ``util.community_detection(X, threshold, min_community_size=2)``,
  keeping the first member of each community;
- ``exact brute force``: numpy upper-triangle blocks + ``scipy`` connected components (the
  reference for the groups).

Agreement: Jaccard index of each kept set with the reference's kept set (connected groups for
the connected rule, our greedy run for semhash's rule), and whether the groups are identical.

    python benchmarks/bench_dedup.py            # quick: 20,000 texts
    python benchmarks/bench_dedup.py --full     # 100,000 texts
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    """Review-like texts; about 15% near-duplicates of an earlier text and 5% exact copies."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 8))) for _ in range(5000)]
    texts: list[str] = []
    for k in range(n):
        roll = rng.random()
        if k > 10 and roll < 0.05:
            texts.append(texts[rng.randrange(k)])
        elif k > 10 and roll < 0.20:
            words = texts[rng.randrange(k)].rstrip(".!").split()
            a, edit = rng.randrange(len(words) - 1), rng.randrange(4)
            if edit == 0 and len(words) > 6:
                del words[a]
            elif edit == 1:
                words[a], words[a + 1] = words[a + 1], words[a]
            elif edit == 2:
                w = words[a]
                c = rng.randrange(len(w))
                words[a] = w[:c] + rng.choice(letters) + w[c + 1:]
            texts.append(" ".join(words) + rng.choice((".", "!", "", "...")))
        else:
            texts.append(" ".join(rng.choices(vocab, k=rng.randint(8, 19))).capitalize() + ".")
    return texts


# ---------------------------------------------------------------------------------------
# contestants (each runs in a fresh process)
# ---------------------------------------------------------------------------------------


def _rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakSampler:
    """Samples the RSS every few milliseconds in a thread; ``peak`` is the most seen above
    the RSS at start (the contestant's own memory, whatever allocated it)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.base, self.peak = interval, _rss_mib(), 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mib() - self.base)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib() - self.base)


def _run_embedcache(x: np.ndarray, threshold: float, mode: str) -> tuple[np.ndarray, np.ndarray]:
    import embedcache as ec

    res = ec.deduplicate(x, threshold=threshold, mode=mode, progress=False)
    labels = np.arange(len(x))
    for g in res.groups:
        labels[g] = g[0]
    return res.kept, labels


def _warm_embedcache() -> None:
    import embedcache as ec

    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    ec.deduplicate(x, threshold=0.5, progress=False)  # compiles (or loads) the kernels
    ec.deduplicate(x, threshold=0.5, mode="greedy", progress=False)


def _run_semhash(x: np.ndarray, threshold: float) -> np.ndarray:
    from semhash import SemHash

    records = [str(i) for i in range(len(x))]
    sh = SemHash.from_embeddings(embeddings=x, records=records, model=None)
    res = sh.self_deduplicate(threshold=threshold)
    return np.sort(np.array([int(r) for r in res.selected], dtype=np.int64))


def _run_community(x: np.ndarray, threshold: float) -> np.ndarray:
    from sentence_transformers import util

    communities = util.community_detection(x, threshold=threshold, min_community_size=2, batch_size=1024)
    removed = {i for c in communities for i in c[1:]}
    return np.array([i for i in range(len(x)) if i not in removed], dtype=np.int64)


def brute_force_labels(x: np.ndarray, threshold: float, block: int = 2048) -> np.ndarray:
    """Connected components of the thresholded cosine matrix, by numpy blocks."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    norms = np.linalg.norm(x, axis=1, keepdims=True)
    xn = np.where(norms > 0, x / np.where(norms > 0, norms, 1), 0).astype(np.float32)
    rows, cols = [], []
    for a in range(0, len(xn), block):
        s = xn[a:a + block] @ xn[a:].T
        i, j = np.nonzero(s >= threshold)
        keep = j > i  # column offset a: j is relative to a, i is relative to a
        rows.append(i[keep] + a)
        cols.append(j[keep] + a)
    i, j = np.concatenate(rows), np.concatenate(cols)
    n = len(xn)
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n)).tocsr()
    return connected_components(graph, directed=False)[1]


def _run_brute(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    labels = brute_force_labels(x, threshold)
    _, first = np.unique(labels, return_index=True)
    return np.sort(first).astype(np.int64), labels


def _worker(name: str, path: str, threshold: float, out: str) -> None:
    x = np.load(path)
    if name.startswith("embedcache"):
        _warm_embedcache()
    if name == "semhash":
        import semhash  # noqa: F401  (imports out of the timing and the baseline)
    if name == "community":
        import sentence_transformers  # noqa: F401
    labels = np.empty(0, dtype=np.int64)
    with PeakSampler() as mem:
        t0 = time.perf_counter()
        if name == "embedcache connected":
            kept, labels = _run_embedcache(x, threshold, "connected")
        elif name == "embedcache greedy":
            kept, labels = _run_embedcache(x, threshold, "greedy")
        elif name == "semhash":
            kept = _run_semhash(x, threshold)
        elif name == "community":
            kept = _run_community(x, threshold)
        else:
            kept, labels = _run_brute(x, threshold)
        seconds = time.perf_counter() - t0
    np.savez(out, kept=kept, labels=labels, seconds=seconds, peak_mib=mem.peak)


def run_in_process(name: str, path: str, threshold: float, tmp: str) -> dict:
    out = os.path.join(tmp, name.replace(" ", "_") + ".npz")
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_worker, args=(name, path, threshold, out))
    p.start()
    p.join()
    if p.exitcode != 0:
        return {"name": name, "error": f"exit code {p.exitcode}"}
    data = np.load(out)
    return {"name": name, "kept": data["kept"], "labels": data["labels"], "seconds": float(data["seconds"]),
            "peak_mib": float(data["peak_mib"])}


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / max(1, len(sa | sb))


def groups_of(labels: np.ndarray) -> set[tuple[int, ...]]:
    order = np.argsort(labels, kind="stable")
    out, sl = set(), labels[order]
    starts = np.flatnonzero(np.r_[True, sl[1:] != sl[:-1]])
    for a, b in zip(starts, np.r_[starts[1:], len(sl)]):
        if b - a > 1:
            out.add(tuple(sorted(order[a:b].tolist())))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="100,000 texts instead of 20,000")
    parser.add_argument("-n", type=int, default=None)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--skip", nargs="*", default=[], help="contestants to leave out: semhash community brute")
    args = parser.parse_args(argv)
    n = args.n or (100_000 if args.full else 20_000)

    import embedcache as ec

    t0 = time.perf_counter()
    texts = synthetic_texts(n)
    x = ec.HashingEmbeddings(dimensions=384).embed(texts)
    print(f"{n} texts -> {x.shape} float32 hashing vectors in {time.perf_counter() - t0:.1f} s; "
          f"threshold {args.threshold}; {os.cpu_count()} cores")

    names = ["embedcache connected", "embedcache greedy", "semhash", "community", "brute"]
    names = [m for m in names if m.split()[0] not in args.skip]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.npy")
        np.save(path, x)
        results = {m: run_in_process(m, path, args.threshold, tmp) for m in names}

    ours = results["embedcache connected"]
    greedy = results["embedcache greedy"]
    ref = results.get("brute")
    print(f"\n{'contestant':24} {'seconds':>8} {'vs ours':>8} {'peak MiB':>9} {'kept':>7} "
          f"{'J(exact)':>9} {'J(greedy)':>9}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:24} failed: {r['error']}")
            continue
        ratio = r["seconds"] / ours["seconds"]
        je = f"{jaccard(r['kept'], ref['kept']):.4f}" if ref and "kept" in ref else "-"
        jg = f"{jaccard(r['kept'], greedy['kept']):.4f}"
        print(f"{name:24} {r['seconds']:8.2f} {ratio:7.2f}x {r['peak_mib']:9.1f} {len(r['kept']):7d} "
              f"{je:>9} {jg:>9}")

    if ref is not None and "kept" in ref:
        exact, mine = groups_of(ref["labels"]), groups_of(ours["labels"])
        differ = mine ^ exact
        xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
        borderline = 0
        for g in differ:
            s = xn[list(g)].astype(np.float64) @ xn[list(g)].astype(np.float64).T
            borderline += bool(np.any(np.abs(s - args.threshold) < 1e-6))
        print(f"\ngroups: embedcache {len(mine)}, exact brute force {len(exact)}; identical: {mine == exact}"
              f" ({len(differ)} differ, {borderline} of them with a pair within 1e-6 of the threshold,"
              f" where float32 rounding decides); kept sets equal: {np.array_equal(ours['kept'], ref['kept'])}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
