"""Partitioned search against exact search and faiss IVFFlat, side by side, in one run.

    python benchmarks/bench_index.py [--sizes 50000,100000] [--threshold 0.9] [--k 10]
                                     [--recall 0.99] [--knn-recall 0.95] [--exact-up-to 100000]
                                     [--queries 2000] [--no-knn] [--no-faiss] [--no-faiss-knn] [--faiss-knn-rows N]
                                     [--data-dir DIR] [--truth-dir DIR [--truth-part I/M]] [--no-pairs]
                                     [--miss-rows]

Data (:func:`generate`, documented so that others can rebuild it; the same for a given n and
seed whatever the memory, written chunk by chunk into a memmap with ``--data-dir``): d=384,
unit rows, anisotropic (a random rotation of coordinates with variances decaying as 1/i).

- topical clusters (the rest of the rows): power-law (Zipf 1.5) sizes capped at 50x the
  median, about 300 rows each on average, centres drawn in the anisotropic space (x 1.2),
  members at spread 0.6-1.4 around them: pairs inside a cluster sit mostly at cosine 0.4-0.8,
  a few above 0.9;
- one giant topical cluster of 5% of the rows (spread 1.0 around a centre x 1.5): median
  cosine about 0.73 and almost no pairs >= 0.9 (it stresses cell balance, not the output);
- near-identical blocks (cosine about 0.9996, every pair is a true pair, as scraped corpora
  repeat boilerplate): one of min(2000, n/20) rows plus one more of 1000-5000 rows per
  million rows (1M: ~2-4M pairs, 10M: ~50M pairs);
- 8% planted near-duplicates: copies of random rows of the kinds above with noise set for
  cosine about 0.99, 0.95, 0.92 and 0.88 (a quarter each).

Uniform random vectors would not test a partition method.

The sampled rows' true pairs and true neighbours come from one pass over the rows
(:func:`sample_truth`: one GEMM per tile serves both), which at 10M is the largest cost of
the benchmark: ``--truth-dir`` keeps it (computed in M parts, one per run, with
``--truth-part``) for the next runs, the pairs and the kNN graph then timed in runs of their
own (``--no-knn``, ``--no-pairs``). Peak RSS is the process's, memory map included; "beyond the map" is the peak
anonymous memory (sampled every 0.1 s), what the 4 GiB target is about: over the whole run (the
benchmark's own recall counting included) and during the pair search alone.

For every size: exact pairs (``similar_pairs``) up to ``--exact-up-to`` rows, above it the
exact time extrapolated from the sampled rows' exact search (q rows against n cost q / (n/2)
of the triangle); partitioned pairs at ``--recall`` (embedcache's own calibration);
partitioned kNN at ``--knn-recall`` (0.95); faiss ``IndexIVFFlat`` (inner product on unit
rows, nlist = sqrt(n), trained on 40 rows per list) with ``range_search`` over all rows, at the nprobe
that reaches our recall (predicted on the sampled pairs from faiss's own assignment, a pair
being found when either row probes the other's list, then measured one nprobe at a time
around it; faiss's time is interpolated linearly in recall between the two nprobe values
around ours); kNN (k) with faiss ``search`` at the smallest nprobe whose recall@k on the
sampled rows reaches ours (with ``--no-pairs``: faiss kNN alone). True recall of pairs is the
quantity the library estimates: the share of ALL true pairs found, from the exact pair set when exact ran, else over every true
pair of ``--queries`` sampled rows (either side of a found pair), itself a sample estimate.
True recall@k of the kNN graph is counted on the same sampled rows and printed with its 95%
interval; the library's figure comes from a sample of its own (``INDEX_RECALL_SAMPLE`` rows), so the two differ by
both samples' errors.
Times are wall seconds (index builds timed apart); peak RSS is the process's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

#: rows per generated chunk: the data depend on n and seed only, not on memory
GEN_CHUNK = 1 << 16


def _layout(n: int, seed: int, block: int | None = None):
    """(kind of every row in its final order, number of topical clusters, number of blocks)."""
    rng = np.random.default_rng([seed, 0])
    n_dup = int(0.08 * n)
    n_giant = int(0.05 * n)
    blocks = [min(2000, n // 20) if block is None else block] + list(rng.integers(1000, 5001, n // 1_000_000))
    n_block = int(sum(blocks))
    n_rest = n - n_dup - n_giant - n_block
    clusters = max(10, n_rest // 300)
    sizes = rng.zipf(1.5, clusters).astype(np.float64)
    sizes = np.minimum(sizes, 50 * np.median(sizes))
    # kind of each row: >= 0 a topical cluster, -1 the giant cluster, -2 - b block b, -1000 a
    # planted near-duplicate (filled in a second pass from a row of another kind)
    kind = np.concatenate([
        rng.choice(clusters, n_rest, p=sizes / sizes.sum()),
        np.full(n_giant, -1),
        np.repeat(-2 - np.arange(len(blocks)), blocks),
        np.full(n_dup, -1000),
    ]).astype(np.int64)
    kind = kind[rng.permutation(n)]
    return kind, clusters, len(blocks)


def generate(n: int, d: int = 384, seed: int = 0, path: str | None = None,
             block: int | None = None) -> np.ndarray:
    """``n`` unit rows (n, d) float32; in a file-backed memmap at ``path`` when given, written
    chunk by chunk (memory stays bounded at 10M x 384 = 15 GB)."""
    rng = np.random.default_rng([seed, 1])
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    scale = (1.0 / np.arange(1, d + 1)) ** 0.5
    kind, clusters, nblocks = _layout(n, seed, block)
    basis32, scale32 = basis.astype(np.float32), scale.astype(np.float32)

    def aniso(r, m):
        return (r.standard_normal((m, d), dtype=np.float32) * scale32) @ basis32

    centres = aniso(rng, clusters) * 1.2
    spread = rng.uniform(0.6, 1.4, clusters).astype(np.float32)
    giant = aniso(rng, 1) * 1.5
    block_c = aniso(rng, nblocks)
    if path is None:
        out = np.empty((n, d), np.float32)
    else:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for c, a in enumerate(range(0, n, GEN_CHUNK)):
        r = np.random.default_rng([seed, 2, c])
        k = kind[a : a + GEN_CHUNK]
        noise = aniso(r, len(k))
        rows = np.zeros_like(noise)
        top = k >= 0
        rows[top] = centres[k[top]] + spread[k[top], None] * noise[top]
        g = k == -1
        rows[g] = giant + 1.0 * noise[g]
        b = (k <= -2) & (k > -1000)
        rows[b] = block_c[-2 - k[b]] + 0.02 * noise[b]
        rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)
        out[a : a + len(k)] = rows
    # planted near-duplicates: copies of random rows of the other kinds, with noise set for
    # cosine about 0.99, 0.95, 0.92 and 0.88 (a quarter each)
    dup = np.flatnonzero(kind == -1000)
    base = np.flatnonzero(kind != -1000)
    r = np.random.default_rng([seed, 3])
    src = np.sort(base[r.integers(0, len(base), len(dup))])  # sorted: a memmap reads forward
    cos = np.repeat([0.99, 0.95, 0.92, 0.88], -(-len(dup) // 4))[: len(dup)]
    cos = cos[r.permutation(len(dup))]
    for a in range(0, len(dup), GEN_CHUNK):
        m = len(dup[a : a + GEN_CHUNK])
        eps = np.sqrt(1.0 / cos[a : a + m] ** 2 - 1.0).astype(np.float32)
        noise = r.normal(size=(m, d)).astype(np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        rows = out[src[a : a + m]] + eps[:, None] * noise
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        out[dup[a : a + m]] = rows
    if path is not None:
        out.flush()
    return out


def true_pairs(x, sample, t):
    """Keys ``q * n + j`` of the true pairs (score >= t, j != q) of the sampled rows, and the
    seconds that took (sampled rows against all rows: exact)."""
    import embedcache as ec

    t0 = time.perf_counter()
    qi, j, _ = ec.similar_pairs(x[sample], t, y=x)
    seconds = time.perf_counter() - t0
    keep = j != sample[qi]
    return np.unique(sample[qi[keep]] * len(x) + j[keep]), seconds


def sample_truth(x, sample, t, k):
    """Both ground truths of the sampled rows from one pass over x (one GEMM per tile, the
    cost that dominates at 10M): the keys of their true pairs (as :func:`true_pairs`) and
    their ``k + 1`` best rows (ties to the lower row, the row itself included), and the
    seconds that took. Scores are numpy's float32 products of the unit rows, which may differ
    from the kernels' exact scores in the last bits (a pair within ~1e-6 of ``t`` may be
    counted on the other side)."""
    t0 = time.perf_counter()
    n, kk = len(x), k + 1
    q = np.ascontiguousarray(x[sample], dtype=np.float32)
    top_s = np.full((len(q), kk), -np.inf, np.float32)
    top_i = np.full((len(q), kk), n, np.int64)
    keys = []
    qb, cb = 2048, 16384
    for c0 in range(0, n, cb):
        c = np.ascontiguousarray(x[c0 : c0 + cb], dtype=np.float32)
        for r0 in range(0, len(q), qb):
            s = q[r0 : r0 + qb] @ c.T
            kth = top_s[r0 : r0 + qb, -1]
            if c0 == 0:  # the first tile seeds the lists: its best kk of each row
                j = np.argpartition(-s, min(kk, s.shape[1]) - 1, axis=1)[:, :kk]
                r = np.repeat(np.arange(len(s)), j.shape[1])
                j = j.ravel()
                v = s[r, j]
                tk = np.ones(len(r), bool)
                pr = np.nonzero(s >= t)
                keys.append(sample[r0 + pr[0]] * n + pr[1])
            else:
                r, j = np.nonzero(s >= np.minimum(kth, np.float32(t))[:, None])
                v = s[r, j]
                pr = v >= t
                keys.append(sample[r0 + r[pr]] * n + c0 + j[pr])
                tk = v > kth[r]
            if tk.any():  # merge the candidates with the current lists: by row, score desc, index
                rr = np.concatenate([np.repeat(np.arange(len(kth)), kk), r[tk]])
                ss = np.concatenate([top_s[r0 : r0 + qb].ravel(), v[tk]])
                ii = np.concatenate([top_i[r0 : r0 + qb].ravel(), c0 + j[tk]])
                o = np.lexsort((ii, -ss, rr))
                rr, ss, ii = rr[o], ss[o], ii[o]
                first = np.searchsorted(rr, np.arange(len(kth)))
                pos = first[:, None] + np.arange(kk)
                top_s[r0 : r0 + qb], top_i[r0 : r0 + qb] = ss[pos], ii[pos]
    key = np.concatenate(keys)
    key = np.unique(key[key // n != key % n])
    return key, top_i, time.perf_counter() - t0


def block_groups(x, t, seed=0):
    """The generated data's near-identical blocks with the planted copies of their rows:
    (group of every row, -1 outside; true pairs inside the groups, counted exactly). A
    uniform sample of rows holds a few rows of them (3M rows, 10k sampled: Kish's effective
    count of the sample's pairs is 58), so the true recall is counted exactly there and
    estimated from the sampled rows elsewhere."""
    n = len(x)
    kind, _, nb = _layout(n, seed)
    dup = np.flatnonzero(kind == -1000)
    base = np.flatnonzero(kind != -1000)
    r = np.random.default_rng([seed, 3])
    src = np.sort(base[r.integers(0, len(base), len(dup))])  # as generate() draws them
    group = np.full(n, -1, np.int64)
    pairs = 0
    for b in range(nb):
        rows = np.flatnonzero(kind == -2 - b)
        rows = np.union1d(rows, dup[np.isin(src, rows)])
        group[rows] = b
        v = np.asarray(x[rows], np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        pairs += int(np.triu(v @ v.T >= t, 1).sum())
    return group, pairs


def stratified_recall(i, j, sample, truth, n, group, group_pairs):
    """The share of all true pairs found: inside the block groups counted exactly, elsewhere
    estimated on the sampled rows outside them (ratio with its 95% interval, by the
    library's row-residual method); (recall, rest recall, rest low, rest high, rest pairs)."""
    from embedcache.index._recall import interval

    gi, gj = group[i], group[j]
    found_b = int(((gi == gj) & (gi >= 0)).sum())
    rest = sample[group[sample] < 0]
    keys = sample_keys(i, j, rest, n)
    tq = truth[np.isin(truth // n, rest)]
    pos_t = np.searchsorted(rest, tq // n)
    pos_f = np.searchsorted(rest, keys // n)
    t = np.bincount(pos_t, minlength=len(rest)).astype(np.float64)
    f = np.bincount(pos_f[np.isin(keys, tq)], minlength=len(rest)).astype(np.float64)
    est, low, high = interval(f, t)
    rest_pairs = t.sum() * (group < 0).sum() / max(1, len(rest)) / 2
    total = group_pairs + rest_pairs
    return (found_b + est * rest_pairs) / total, est, low, high, rest_pairs, found_b


class PeakAnon:
    """Peak anonymous resident memory of this process (RSS less file-backed pages such as a
    memory map), sampled every 0.1 s from /proc/self/status on a thread; 0 where unavailable."""

    def __init__(self) -> None:
        import threading

        self.peak = 0
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now() -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while True:
            now = self.now()
            self.peak = max(self.peak, now)
            self.span = max(self.span, now)
            time.sleep(0.1)

    span = 0

    def start(self) -> None:
        """Start measuring the peak of one step (:meth:`step_gib`) apart from the whole run's."""
        self.span = self.now()

    def step_gib(self) -> float:
        return max(self.span, self.now()) / 2**30

    def gib(self) -> float:
        return max(self.peak, self.now()) / 2**30


def sample_keys(i, j, sample, n):
    """Keys ``q * n + other`` of the found pairs (i, j) that hold a sampled row q, either side."""
    a = np.concatenate([i, j])
    b = np.concatenate([j, i])
    ins = np.isin(a, sample) & (a != b)
    return np.unique(a[ins] * n + b[ins])


def recall_of(keys, truth) -> float:
    return float(np.isin(truth, keys).mean()) if len(truth) else 1.0


def rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def faiss_union_need(quant, x, truth, n, depth):
    """Probes faiss IVF needs to find each true pair from one side or the other (its own
    nearest-centroid assignment; ``depth + 1``: not within ``depth`` probes)."""
    q, j = truth // n, truth % n
    rows, pos = np.unique(np.concatenate([q, j]), return_inverse=True)
    _, near = quant.search(x[rows], depth)
    cell = near[:, 0]
    pq, pj = pos[: len(q)], pos[len(q) :]

    def rank(of, target):
        hit = near[of] == cell[target][:, None]
        return np.where(hit.any(axis=1), hit.argmax(axis=1), depth)

    return np.minimum(rank(pq, pj), rank(pj, pq)) + 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="50000")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--recall", type=float, default=0.99)
    ap.add_argument("--knn-recall", type=float, default=0.95, help="the recall asked of the kNN graph")
    ap.add_argument("--exact-up-to", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--no-knn", action="store_true")
    ap.add_argument("--no-faiss", action="store_true")
    ap.add_argument("--no-faiss-knn", action="store_true", help="faiss for pairs only")
    ap.add_argument("--faiss-knn-rows", type=int, default=0,
                    help="time faiss's kNN search on the first N rows only, scaled to all (0: all)")
    ap.add_argument("--data-dir", default=None,
                    help="generate into a memmap file here (for sizes that do not fit in memory)")
    ap.add_argument("--truth-dir", default=None,
                    help="keep the sampled truth here, and use it when there (10M: the largest cost)")
    ap.add_argument("--truth-part", default=None, metavar="I/M",
                    help="only compute and keep part I (0-based) of M of the sampled truth, then stop")
    ap.add_argument("--no-pairs", action="store_true", help="kNN only (its truth from --truth-dir)")
    ap.add_argument("--miss-rows", action="store_true",
                    help="print where the sampled rows that missed pairs lie: the gap between their two best "
                         "centroid scores, against all rows' (the calibration's border stratum)")
    a = ap.parse_args()
    import faiss

    import embedcache as ec
    from embedcache.index import PartitionIndex, partitioned_knn, partitioned_pairs

    anon = PeakAnon()
    ec.similar_pairs(generate(2000, seed=1), 0.9)  # compile
    partitioned_pairs(generate(4000, seed=1), 0.9)
    partitioned_knn(generate(4000, seed=1), 5)
    for n in [int(s) for s in a.sizes.split(",")]:
        t0 = time.perf_counter()
        if a.data_dir:
            import os

            path = os.path.join(a.data_dir, f"bench_index_{n}.npy")
            if not os.path.exists(path):
                generate(n, path=path + ".part")
                os.replace(path + ".part", path)
            x = np.load(path, mmap_mode="r")
        else:
            x = generate(n)
        t_gen = time.perf_counter() - t0
        rng = np.random.default_rng(1)
        sample = np.sort(rng.choice(n, min(a.queries, n), replace=False))
        if a.truth_dir or a.truth_part:
            truth, top_true, t_truth = cached_truth(a, x, sample)
            if truth is None:
                continue
        elif a.no_knn:
            truth, t_truth = true_pairs(x, sample, a.threshold)
        else:  # one pass for both truths
            truth, top_true, t_truth = sample_truth(x, sample, a.threshold, a.k)
        print(f"\n== n={n} d={x.shape[1]} threshold={a.threshold}: {len(truth)} true pairs of "
              f"{len(sample)} sampled rows (generated in {t_gen:.1f} s; sampled truth {t_truth:.1f} s)",
              flush=True)
        exact_keys = None
        if n <= a.exact_up_to:
            t0 = time.perf_counter()
            ei, ej, es = ec.similar_pairs(x, a.threshold)
            t_exact = time.perf_counter() - t0
            exact_keys = ei * n + ej
            print(f"exact pairs          {t_exact:8.2f} s  {len(ei)} pairs")
        else:  # sampled rows against all rows cost q / (n / 2) of the triangle
            t_exact = t_truth * n / (2 * len(sample))
            print(f"exact pairs          {t_exact:8.2f} s  (extrapolated from the sampled rows)")
        t0 = time.perf_counter()
        index = PartitionIndex.build(x, seed=0)
        t_build = time.perf_counter() - t0
        sz = index.sizes.astype(np.float64)
        a.t_build = t_build
        print(f"index build          {t_build:8.2f} s  cells={index.cells} (largest {int(sz.max())}); "
              f"peak RSS {rss_gib():.2f} GiB (anonymous, beyond the map: {anon.gib():.2f} GiB)", flush=True)
        r_true = None
        if not a.no_pairs:
            r_true = pairs_run(a, x, index, sample, truth, exact_keys, t_exact, t_build, anon)
        if not a.no_knn:
            knn_run(a, x, index, sample, top_true, anon)
        if a.no_faiss:
            continue
        faiss_run(a, x, rng, sample, truth, top_true, exact_keys, r_true)


def cached_truth(a, x, sample):
    """The sampled truth from ``--truth-dir`` when kept there, else computed (in parts with
    ``--truth-part``: then (None, None, seconds) until every part is there)."""
    import os

    n = len(x)
    base = os.path.join(a.truth_dir or ".", f"truth_{n}_{len(sample)}_{a.threshold}_{a.k}")
    if os.path.exists(base + ".npz"):
        z = np.load(base + ".npz")
        return z["keys"], z["top"], float(z["seconds"])
    m = int(a.truth_part.split("/")[1]) if a.truth_part else 1
    parts = np.array_split(np.arange(len(sample)), m)
    todo = [int(a.truth_part.split("/")[0])] if a.truth_part else range(m)
    for p in todo:
        if not os.path.exists(f"{base}.part{p}of{m}.npz"):
            keys, top, sec = sample_truth(x, sample[parts[p]], a.threshold, a.k)
            np.savez(f"{base}.part{p}of{m}.npz", keys=keys, top=top, seconds=sec)
            print(f"truth part {p}/{m}: {len(parts[p])} rows in {sec:.1f} s", flush=True)
    if not all(os.path.exists(f"{base}.part{p}of{m}.npz") for p in range(m)):
        return None, None, 0.0
    zs = [np.load(f"{base}.part{p}of{m}.npz") for p in range(m)]
    keys = np.unique(np.concatenate([z["keys"] for z in zs]))
    top = np.concatenate([z["top"] for z in zs])
    sec = sum(float(z["seconds"]) for z in zs)
    np.savez(base + ".npz", keys=keys, top=top, seconds=sec)
    return keys, top, sec


class Timed:
    """Wall seconds spent in some functions of the library (patched for one run, restored
    after): where the calibration's time goes."""

    def __init__(self, targets: dict) -> None:
        self.targets = targets  # name -> (owner, attribute)
        self.seconds = dict.fromkeys(targets, 0.0)
        self.saved: list = []

    def __enter__(self) -> Timed:
        for name, (owner, attr) in self.targets.items():
            fn = getattr(owner, attr)
            self.saved.append((owner, attr, fn))

            def timed(*args, _fn=fn, _name=name, **kw):
                t0 = time.perf_counter()
                try:
                    return _fn(*args, **kw)
                finally:
                    self.seconds[_name] += time.perf_counter() - t0

            setattr(owner, attr, timed)
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, fn in reversed(self.saved):
            setattr(owner, attr, fn)


def calibration_timer() -> Timed:
    import embedcache.index as eix
    from embedcache.index import _recall, _truth

    return Timed({"calibration": (_recall, "calibrate"), "exact truth": (_recall.SampledPairs, "prefetch"),
                  "bands": (_truth, "bands_of"), "density": (_recall, "cell_density"),
                  "probe lists": (eix, "_scored_lists")})


def pairs_run(a, x, index, sample, truth, exact_keys, t_exact, t_build, anon):
    from embedcache.index import partitioned_pairs

    n = len(x)
    sz = index.sizes.astype(np.float64)
    t0 = time.perf_counter()
    anon.start()
    with calibration_timer() as timer:
        i, j, s, rec = partitioned_pairs(x, a.threshold, recall=a.recall, index=index)
    t_part = time.perf_counter() - t0
    sec = timer.seconds
    print(f"  calibration {sec['calibration']:.1f} s: exact truth {sec['exact truth']:.1f} s (of which "
          f"bands {sec['bands']:.1f} s), evidence {sec['calibration'] - sec['exact truth']:.1f} s; before it: "
          f"cell density {sec['density']:.1f} s, probe lists {sec['probe lists']:.1f} s (the search's own)", flush=True)
    step_peak = anon.step_gib()
    r_sample = recall_of(sample_keys(i, j, sample, n), truth)
    # the quantity the library estimates: the share of all true pairs found
    r_true = len(i) / max(1, len(exact_keys)) if exact_keys is not None else r_sample
    if exact_keys is not None:
        assert np.isin(i * n + j, exact_keys).all()  # nothing invented
        print(f"  asked recall {a.recall}; true recall (all pairs) {r_true:.4f}; "
              f"on the {len(sample)} sampled rows {r_sample:.4f}")
    else:
        group, gp = block_groups(x, a.threshold)
        r_true, re, rl, rh, rp, fb = stratified_recall(i, j, sample, truth, n, group, gp)
        print(f"  true recall {r_true:.4f}: block groups {fb / max(1, gp):.4f} of {gp} pairs (exact), "
              f"elsewhere {re:.4f} (95% CI {rl:.4f}-{rh:.4f}) of about {rp:.0f} pairs "
              f"(sampled rows outside the groups); all {len(sample)} sampled rows: {r_sample:.4f}", flush=True)
    print(f"partitioned pairs    {t_part:8.2f} s + build {t_build:.2f} s  cells={index.cells} "
          f"(largest {int(sz.max())}, sum of squares {sz @ sz / n:.0f} n) {len(i)} pairs; {rec}; "
          f"true recall {r_true:.4f} ({t_exact / (t_build + t_part):.1f}x faster than exact); "
          f"peak RSS {rss_gib():.2f} GiB (anonymous, beyond the map: {anon.gib():.2f} GiB; during the "
          f"search: {step_peak:.2f} GiB, its output {len(i) * 20 / 2**30:.2f} GiB)", flush=True)
    a.t_part, a.t_build = t_part, t_build
    if a.miss_rows:
        miss_rows(x, index, sample, truth, sample_keys(i, j, sample, n))
    return r_true


def miss_rows(x, index, sample, truth, found_keys):
    """Where the missed pairs of the sampled rows lie: each sampled row's gap between its two
    best centroid scores, as a percentile of a uniform sample of 200k rows' gaps; the share
    of the misses (and of the true pairs) held by rows in the lowest 1%, 5% and 20%."""
    n = len(x)
    rng = np.random.default_rng(5)
    ref = np.sort(rng.choice(n, min(n, 200_000), replace=False))

    def g1(rows):
        sc = np.sort(index.probe_cells_scored(np.asarray(x[rows], np.float32), 2)[1].astype(np.float64), axis=1)
        return sc[:, -1] - sc[:, -2]

    ref_gaps = np.sort(g1(ref))
    pct = np.searchsorted(ref_gaps, g1(sample)) / len(ref_gaps)
    missed = truth[~np.isin(truth, found_keys)]
    m = np.bincount(np.searchsorted(sample, missed // n), minlength=len(sample))
    t = np.bincount(np.searchsorted(sample, truth // n), minlength=len(sample))
    rows = m > 0
    print(f"  missed pairs of the sampled rows: {m.sum()} in {rows.sum()} rows; their gap percentiles "
          f"(10/25/50/75/90%): {np.quantile(pct[rows], [0.1, 0.25, 0.5, 0.75, 0.9]).round(3) if rows.any() else '-'}")
    for share in (0.01, 0.05, 0.2):
        inb = pct <= share
        print(f"    rows in the lowest {share:.0%} of gaps: {m[inb].sum() / max(1, m.sum()):.3f} of the misses, "
              f"{t[inb].sum() / max(1, t.sum()):.3f} of the true pairs, {inb.mean():.3f} of the sampled rows",
              flush=True)


def knn_true_recall(ki, sample, truth_k):
    """(recall, low, high): the share of the sampled rows' true neighbours ``truth_k`` (a set
    per row) found in the returned lists ``ki``, with its 95% interval (the library's row
    residual method: the truth is itself a sample of rows, so it carries an error of its own,
    and the library's figure, from another sample, may differ from it by both)."""
    from embedcache.index._recall import interval

    found = np.array([len(set(ki[q].tolist()) & t) for q, t in zip(sample, truth_k)], np.float64)
    true = np.array([len(t) for t in truth_k], np.float64)
    return interval(found, true)


def knn_run(a, x, index, sample, top_true, anon):
    from embedcache.index import partitioned_knn

    truth_k = [set(r[r != q][: a.k].tolist()) for q, r in zip(sample, top_true)]
    t0 = time.perf_counter()
    ks, ki, krec = partitioned_knn(x, a.k, recall=a.knn_recall, index=index)
    t_knn = time.perf_counter() - t0
    kr, klo, khi = knn_true_recall(ki, sample, truth_k)
    print(f"partitioned kNN k={a.k} {t_knn:7.2f} s  asked {a.knn_recall}: {krec}; true recall@{a.k} {kr:.4f} "
          f"(95% CI {klo:.4f}-{khi:.4f} on the {len(sample)} sampled rows); "
          f"peak RSS {rss_gib():.2f} GiB (anonymous, beyond the map: {anon.gib():.2f} GiB)", flush=True)
    a.kr, a.t_knn = kr, t_knn


def faiss_run(a, x, rng, sample, truth, top_true, exact_keys, r_true):
    import faiss

    n = len(x)
    # faiss IVFFlat at equal recall
    nlist = int(np.sqrt(n))
    t0 = time.perf_counter()
    quant = faiss.IndexFlatIP(x.shape[1])
    ivf = faiss.IndexIVFFlat(quant, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(np.ascontiguousarray(x[np.sort(rng.choice(n, min(n, 40 * nlist), replace=False))]))
    for c0 in range(0, n, 1 << 18):
        ivf.add(np.ascontiguousarray(x[c0 : c0 + (1 << 18)]))
    f_build = time.perf_counter() - t0
    if not a.no_pairs:
        faiss_range(a, x, ivf, quant, f_build, sample, truth, exact_keys, r_true)
    if a.no_knn or a.no_faiss_knn:
        return
    kr, t_knn = a.kr, a.t_knn
    truth_k = [set(r[r != q][: a.k].tolist()) for q, r in zip(sample, top_true)]
    for nprobe in range(1, nlist + 1):
        ivf.nprobe = nprobe
        _, fi = ivf.search(np.ascontiguousarray(x[sample]), a.k + 1)
        fr = np.mean([len(set(r[r != q][: a.k].tolist()) & t) / a.k for q, r, t in zip(sample, fi, truth_k)])
        if fr >= kr or nprobe == nlist:
            break
    m = n if a.faiss_knn_rows <= 0 else min(n, a.faiss_knn_rows)
    t0 = time.perf_counter()
    ivf.search(np.ascontiguousarray(x[:m]), a.k + 1)
    t_fk = (time.perf_counter() - t0) * n / m  # its time per query is the same for every row
    how = "" if m == n else f" (searched {m} rows, x {n / m:.1f})"
    print(f"faiss IVFFlat search {t_fk:8.2f} s{how} + build {f_build:.2f} s  nprobe={nprobe} recall@{a.k} "
          f"{fr:.4f} (ours {kr:.4f}); embedcache/faiss = {t_knn / t_fk:.2f}x (search), "
          f"{(t_knn + a.t_build) / (t_fk + f_build):.2f}x (with build)", flush=True)


def faiss_range(a, x, ivf, quant, f_build, sample, truth, exact_keys, r_true):
    """faiss ``range_search`` over all rows at the nprobe that reaches the pairs' recall."""
    n = len(x)
    nlist = ivf.nlist
    t_part, t_build = a.t_part, a.t_build
    groups = block_groups(x, a.threshold) if exact_keys is None else None

    def faiss_pairs(nprobe):
        ivf.nprobe = nprobe
        t0 = time.perf_counter()
        lims, _, ids = ivf.range_search(np.ascontiguousarray(x), a.threshold)
        t = time.perf_counter() - t0
        fi = np.repeat(np.arange(n), np.diff(lims).astype(np.int64))
        keep = fi < ids
        if exact_keys is not None:
            return t, int(np.isin(fi[keep] * n + ids[keep], exact_keys).sum()) / max(1, len(exact_keys))
        key = np.unique(np.minimum(fi, ids) * n + np.maximum(fi, ids))
        key = key[key // n != key % n]
        return t, stratified_recall(key // n, key % n, sample, truth, n, *groups)[0]

    # the nprobe that reaches our recall, predicted on the sampled pairs (found when either
    # row probes the other's cell), then measured around it
    need = faiss_union_need(quant, x, truth, n, min(nlist, 256))
    pred = [np.mean(need <= p) for p in range(1, min(nlist, 256) + 1)]
    start = next((p + 1 for p, v in enumerate(pred) if v >= r_true), min(nlist, 256))
    runs = {}
    p = start
    while True:
        runs[p] = faiss_pairs(p)
        if runs[p][1] >= r_true and p > 1 and p - 1 not in runs:
            p -= 1
        elif runs[p][1] < r_true and p + 1 not in runs and p < nlist:
            p += 1
        else:
            break
    above = min((q for q in runs if runs[q][1] >= r_true), default=max(runs))
    below = max((q for q in runs if runs[q][1] < r_true), default=None)
    t_f, f_rec = runs[above]
    t_eq = t_f
    if below is not None and f_rec > runs[below][1]:  # faiss's time at our recall, linear in recall
        t_eq = runs[below][0] + (t_f - runs[below][0]) * (r_true - runs[below][1]) / (f_rec - runs[below][1])
    low_txt = f"nprobe={below}: {runs[below][1]:.4f} in {runs[below][0]:.2f} s" if below else "none below"
    print(f"faiss IVFFlat range  {t_f:8.2f} s + build {f_build:.2f} s  nprobe={above} "
          f"recall {f_rec:.4f} ({low_txt}); at embedcache's recall {r_true:.4f}: {t_eq:.2f} s; "
          f"embedcache/faiss = {t_part / t_eq:.2f}x (search), "
          f"{(t_part + t_build) / (t_eq + f_build):.2f}x (with build); peak RSS {rss_gib():.2f} GiB",
          flush=True)


if __name__ == "__main__":
    main()
