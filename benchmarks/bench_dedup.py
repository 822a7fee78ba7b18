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
    python benchmarks/bench_dedup.py -n 1000000 --data clusters --block 20000 --method partitioned \
        --recall 0.99 --skip community brute greedy --sample 2000   # 1M, checked on a sample

A contestant whose memory grows past ``BENCH_MAX_RSS_GIB`` (default 12) is stopped.
``embedcache all-pairs`` is the connected rule listing every pair before grouping (what
``deduplicate`` did before it joined pairs into a spanning forest inside the search). With
``--sample`` the kept sets are checked against exact neighbours of sampled rows
(:func:`sampled_check`), for sizes where brute force is too slow.
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


def _run_embedcache(x: np.ndarray, threshold: float, mode: str, method: str = "auto", recall: float = 0.99,
                    forest: bool = True) -> tuple[np.ndarray, np.ndarray]:
    import embedcache as ec
    from embedcache import _config

    with _config.override(DEDUP_FOREST=forest):
        res = ec.deduplicate(x, threshold=threshold, mode=mode, progress=False, method=method, recall=recall)
    if res.recall is not None:
        print(f"  {mode}: {res.method}, {res.recall}", flush=True)
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


def _worker(name: str, path: str, threshold: float, out: str, method: str = "auto", recall: float = 0.99) -> None:
    x = np.load(path)
    if name.startswith("embedcache"):
        _warm_embedcache()
    if name == "semhash":
        import semhash  # noqa: F401  (imports out of the timing and the baseline)
    if name == "community":
        import sentence_transformers  # noqa: F401
    labels = np.empty(0, dtype=np.int64)
    limit = float(os.environ.get("BENCH_MAX_RSS_GIB", "12")) * 1024
    base = _rss_mib()

    def guard() -> None:  # stop a contestant that grows past the limit (listing every pair can)
        while True:
            if _rss_mib() - base > limit:
                os._exit(3)
            time.sleep(0.02)

    threading.Thread(target=guard, daemon=True).start()
    with PeakSampler() as mem:
        t0 = time.perf_counter()
        if name == "embedcache connected":
            kept, labels = _run_embedcache(x, threshold, "connected", method, recall)
        elif name == "embedcache all-pairs":  # the connected rule listing every pair first
            kept, labels = _run_embedcache(x, threshold, "connected", method, recall, forest=False)
        elif name == "embedcache greedy":
            kept, labels = _run_embedcache(x, threshold, "greedy", method, recall)
        elif name == "semhash":
            kept = _run_semhash(x, threshold)
        elif name == "community":
            kept = _run_community(x, threshold)
        else:
            kept, labels = _run_brute(x, threshold)
        seconds = time.perf_counter() - t0
    np.savez(out, kept=kept, labels=labels, seconds=seconds, peak_mib=mem.peak)


def run_in_process(name: str, path: str, threshold: float, tmp: str, method: str = "auto",
                   recall: float = 0.99) -> dict:
    out = os.path.join(tmp, name.replace(" ", "_") + ".npz")
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_worker, args=(name, path, threshold, out, method, recall))
    p.start()
    p.join()
    if p.exitcode == 3:
        return {"name": name, "error": f"stopped above BENCH_MAX_RSS_GIB={os.environ.get('BENCH_MAX_RSS_GIB', '12')} GiB"}
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


def sampled_check(x: np.ndarray, threshold: float, results: dict, sample: int, seed: int = 0) -> None:
    """Exact neighbours of ``sample`` random rows (``similar_pairs(x[S], t, y=x)``) against each
    contestant: *pair recall* = share of those true pairs the contestant resolved (at most one
    of the two rows kept; a pair with both rows kept is a near-duplicate it missed), and for
    the connected rule the share of sampled rows whose "has a near-duplicate" status (in a
    group or not) is the exact one. Used when brute force is too slow; estimates from a sample."""
    import embedcache as ec

    rows = np.sort(np.random.default_rng(seed).choice(len(x), min(sample, len(x)), replace=False))
    qi, j, _ = ec.similar_pairs(x[rows], threshold, y=x)
    i = rows[qi]
    keep = j != i
    i, j = i[keep], j[keep]
    has = np.zeros(len(rows), bool)
    has[qi[keep]] = True
    print(f"\nsampled check: {len(rows)} rows, {len(i)} true pairs from them ({has.sum()} rows have one)")
    print(f"{'contestant':24} {'pair recall':>11} {'status agree':>12}")
    for name, r in results.items():
        if "kept" not in r:
            continue
        kept = np.zeros(len(x), bool)
        kept[r["kept"]] = True
        resolved = ~(kept[i] & kept[j])
        rec = resolved.mean() if len(i) else float("nan")
        agree = "-"
        if len(r["labels"]) and "greedy" not in name:
            labels = r["labels"]
            size = np.bincount(labels, minlength=len(x))
            agree = f"{np.mean((size[labels[rows]] > 1) == has):.4f}"
        print(f"{name:24} {rec:11.4f} {agree:>12}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="100,000 texts instead of 20,000")
    parser.add_argument("-n", type=int, default=None)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--method", default="auto", help="embedcache's method: auto, exact, partitioned")
    parser.add_argument("--recall", type=float, default=0.99, help="embedcache's recall for partitioned")
    parser.add_argument("--data", default="texts", choices=["texts", "clusters"],
                        help="texts: hashing vectors of synthetic texts; clusters: bench_index.generate")
    parser.add_argument("--block", type=int, default=None, help="clusters: rows of the near-identical block")
    parser.add_argument("--sample", type=int, default=0, help="rows for the sampled exact check (0: none)")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="contestants to leave out: semhash community brute greedy all-pairs")
    args = parser.parse_args(argv)
    n = args.n or (100_000 if args.full else 20_000)

    import embedcache as ec

    t0 = time.perf_counter()
    if args.data == "texts":
        texts = synthetic_texts(n)
        x = ec.HashingEmbeddings(dimensions=384).embed(texts)
        what = "hashing vectors of synthetic texts"
    else:
        from bench_index import generate

        x = generate(n, block=args.block)
        what = f"bench_index.generate clusters, near-identical block {args.block or min(2000, n // 20)}"
    print(f"{n} rows -> {x.shape} float32 {what} in {time.perf_counter() - t0:.1f} s; "
          f"threshold {args.threshold}; embedcache method {args.method}, recall {args.recall}; "
          f"{os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}", flush=True)

    names = ["embedcache connected", "embedcache all-pairs", "embedcache greedy", "semhash", "community", "brute"]
    names = [m for m in names if m.split()[-1] not in args.skip and m.split()[0] not in args.skip]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.npy")
        np.save(path, x)
        results = {}
        for m in names:
            results[m] = run_in_process(m, path, args.threshold, tmp, args.method, args.recall)
            r = results[m]
            print(f"  {m}: " + (r["error"] if "error" in r else f"{r['seconds']:.1f} s, {r['peak_mib']:.0f} MiB"),
                  flush=True)

    ours = results["embedcache connected"]
    greedy = results.get("embedcache greedy")
    ref = results.get("brute")
    print(f"\n{'contestant':24} {'seconds':>8} {'vs ours':>8} {'peak MiB':>9} {'kept':>7} "
          f"{'J(exact)':>9} {'J(greedy)':>9} {'J(semhash)':>10}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:24} failed: {r['error']}")
            continue
        ratio = r["seconds"] / ours["seconds"]
        je = f"{jaccard(r['kept'], ref['kept']):.4f}" if ref and "kept" in ref else "-"
        jg = f"{jaccard(r['kept'], greedy['kept']):.4f}" if greedy and "kept" in greedy else "-"
        sh = results.get("semhash")
        js = f"{jaccard(r['kept'], sh['kept']):.4f}" if sh and "kept" in sh else "-"
        print(f"{name:24} {r['seconds']:8.2f} {ratio:7.2f}x {r['peak_mib']:9.1f} {len(r['kept']):7d} "
              f"{je:>9} {jg:>9} {js:>10}")

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
    old = results.get("embedcache all-pairs")
    if old and "kept" in old and "kept" in ours:
        same = np.array_equal(old["kept"], ours["kept"]) and groups_of(old["labels"]) == groups_of(ours["labels"])
        print(f"\nembedcache connected vs all-pairs: identical kept sets and groups: {same}; "
              f"time {old['seconds'] / ours['seconds']:.2f}x, peak RSS {old['peak_mib'] / max(1.0, ours['peak_mib']):.1f}x")
    if args.sample:
        sampled_check(x, args.threshold, {k: r for k, r in results.items() if "error" not in r}, args.sample)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
