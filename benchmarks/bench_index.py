"""Partitioned search against exact search and faiss IVFFlat, side by side, in one run.

    python benchmarks/bench_index.py [--sizes 50000,100000] [--threshold 0.9] [--k 10]
                                     [--recall 0.99] [--exact-up-to 100000] [--queries 2000]

Data (:func:`generate`, documented so that others can rebuild it): d=384, anisotropic (a
random rotation of coordinates with variances decaying as 1/i), clusters with power-law
(Zipf 1.5) sizes around centres drawn in the same anisotropic space, one giant cluster of
5% of the rows, a block of min(2000, n/20) near-identical rows (as scraped corpora have),
and 8% planted near-duplicates: copies of random rows
with noise set for cosine about 0.99, 0.95, 0.92 and 0.88 (a quarter each). Uniform random
vectors would not test a partition method.

For every size: exact pairs (``similar_pairs``) up to ``--exact-up-to`` rows; partitioned
pairs at ``--recall`` (embedcache's own calibration); faiss ``IndexIVFFlat`` (inner product
on normalized rows, nlist = sqrt(n), trained on a sample) with ``range_search``, nprobe raised
one at a time until its recall reaches ours (both recalls printed side by side; faiss's time
is also interpolated linearly in recall between the two nprobe values around ours); kNN (k)
the same way with faiss ``search``. True recall of pairs is the same quantity the library
estimates: the share of ALL true pairs found, computed from the exact pair set when exact
ran (``n <= --exact-up-to``), else from every pair of ``--queries`` sampled rows (then itself
a sample estimate with its own error). Times are wall seconds of the search (index build
timed apart).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def generate(n: int, d: int = 384, seed: int = 0, block: int | None = None) -> np.ndarray:
    """The data described above; ``block``: rows of the near-identical block (default
    min(2000, n/20))."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    scale = (1.0 / np.arange(1, d + 1)) ** 0.5

    def aniso(m):
        return (rng.normal(size=(m, d)) * scale) @ basis

    n_dup = int(0.08 * n)
    n_giant = int(0.05 * n)
    n_block = min(2000, n // 20) if block is None else block
    n_rest = n - n_dup - n_giant - n_block
    clusters = max(10, n_rest // 300)
    sizes = rng.zipf(1.5, clusters).astype(np.float64)
    sizes = np.minimum(sizes, 50 * np.median(sizes))
    lab = rng.choice(clusters, n_rest, p=sizes / sizes.sum())
    centres = aniso(clusters) * 1.2
    spread = rng.uniform(0.6, 1.4, clusters)[lab, None]
    rest = centres[lab] + spread * aniso(n_rest)
    giant = aniso(1) * 1.5 + 0.5 * aniso(n_giant)
    block = aniso(1) + 0.02 * aniso(n_block)  # near-identical rows: all pairs are true
    x = np.vstack([rest, giant, block])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.integers(0, len(x), n_dup)
    cos = np.repeat([0.99, 0.95, 0.92, 0.88], -(-n_dup // 4))[:n_dup]
    eps = np.sqrt(1.0 / cos**2 - 1.0)
    noise = rng.normal(size=(n_dup, d))
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    dups = x[src] + eps[:, None] * noise
    out = np.vstack([x, dups])
    out /= np.linalg.norm(out, axis=1, keepdims=True)  # unit rows: inner product is cosine for faiss
    return out[rng.permutation(len(out))].astype(np.float32)


def true_pairs(x, sample, t):
    import embedcache as ec

    qi, j, _ = ec.similar_pairs(x[sample], t, y=x)
    keep = j != sample[qi]
    return set(zip(sample[qi[keep]].tolist(), j[keep].tolist()))


def pair_recall(found: set, truth: set) -> float:
    return len(found & truth) / max(1, len(truth))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="50000")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--recall", type=float, default=0.99)
    ap.add_argument("--exact-up-to", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--no-knn", action="store_true")
    a = ap.parse_args()
    import faiss

    import embedcache as ec
    from embedcache.index import PartitionIndex, partitioned_knn, partitioned_pairs

    ec.similar_pairs(generate(2000, seed=1), 0.9)  # compile
    partitioned_pairs(generate(4000, seed=1), 0.9)
    partitioned_knn(generate(4000, seed=1), 5)
    for n in [int(s) for s in a.sizes.split(",")]:
        x = generate(n)
        rng = np.random.default_rng(1)
        sample = np.sort(rng.choice(n, min(a.queries, n), replace=False))
        truth = true_pairs(x, sample, a.threshold)
        print(f"\n== n={n} d={x.shape[1]} threshold={a.threshold}: {len(truth)} true pairs of "
              f"{len(sample)} sampled rows")
        t_exact = exact_keys = None
        if n <= a.exact_up_to:
            t0 = time.perf_counter()
            ei, ej, es = ec.similar_pairs(x, a.threshold)
            t_exact = time.perf_counter() - t0
            exact_keys = ei * n + ej
            print(f"exact pairs          {t_exact:8.2f} s  {len(ei)} pairs")
        t0 = time.perf_counter()
        index = PartitionIndex.build(x, seed=0)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        i, j, s, rec = partitioned_pairs(x, a.threshold, recall=a.recall, index=index)
        t_part = time.perf_counter() - t0
        ins = np.isin(i, sample) | np.isin(j, sample)
        found = set(zip(i[ins].tolist(), j[ins].tolist())) | set(zip(j[ins].tolist(), i[ins].tolist()))
        r_sample = pair_recall(found, truth)
        # the quantity the library estimates: the share of all true pairs found
        r_true = len(i) / max(1, len(exact_keys)) if exact_keys is not None else r_sample
        if exact_keys is not None:
            assert np.isin(i * n + j, exact_keys).all()  # nothing invented
            print(f"  asked recall {a.recall}; true recall (all pairs) {r_true:.4f}; "
                  f"on the {len(sample)} sampled rows {r_sample:.4f}")
        speed = f"  ({t_exact / (t_build + t_part):.1f}x faster than exact)" if t_exact else ""
        print(f"partitioned pairs    {t_part:8.2f} s + build {t_build:.2f} s  cells={index.cells} "
              f"{rec}; true recall {r_true:.4f}{speed}")
        # faiss IVFFlat at equal recall
        nlist = int(np.sqrt(n))
        t0 = time.perf_counter()
        quant = faiss.IndexFlatIP(x.shape[1])
        ivf = faiss.IndexIVFFlat(quant, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(x[rng.choice(n, min(n, 40 * nlist), replace=False)])
        ivf.add(x)
        f_build = time.perf_counter() - t0

        def faiss_pairs(nprobe):
            ivf.nprobe = nprobe
            t0 = time.perf_counter()
            lims, _, ids = ivf.range_search(x, a.threshold)
            t = time.perf_counter() - t0
            fi = np.repeat(np.arange(n), np.diff(lims).astype(np.int64))
            keep = fi < ids
            if exact_keys is not None:
                return t, int(keep.sum()) / max(1, len(exact_keys))
            ins = np.isin(fi, sample) & (fi != ids)
            return t, pair_recall(set(zip(fi[ins].tolist(), ids[ins].tolist())), truth)

        prev = (0.0, 0.0, 0)
        for nprobe in range(1, nlist + 1):
            t_faiss, f_rec = faiss_pairs(nprobe)
            if f_rec >= r_true or nprobe == nlist:
                break
            prev = (t_faiss, f_rec, nprobe)
        t_eq = t_faiss
        if prev[2] and f_rec > prev[1]:  # faiss's time at exactly our recall, linear in recall
            t_eq = prev[0] + (t_faiss - prev[0]) * (r_true - prev[1]) / (f_rec - prev[1])
        print(f"faiss IVFFlat range  {t_faiss:8.2f} s + build {f_build:.2f} s  nprobe={nprobe} "
              f"recall {f_rec:.4f} (nprobe={prev[2]}: {prev[1]:.4f} in {prev[0]:.2f} s); "
              f"at embedcache's recall {r_true:.4f}: {t_eq:.2f} s; embedcache/faiss = "
              f"{t_part / t_eq:.2f}x (search), {(t_part + t_build) / (t_eq + f_build):.2f}x (with build)")
        if a.no_knn:
            continue
        es_, ei_ = ec.top_k(x[sample], x, a.k + 1)
        truth_k = [set(r[r != q][: a.k].tolist()) for q, r in zip(sample, ei_)]
        t0 = time.perf_counter()
        ks, ki, krec = partitioned_knn(x, a.k, recall=0.95, index=index)
        t_knn = time.perf_counter() - t0
        kr = np.mean([len(set(ki[q].tolist()) & t) / a.k for q, t in zip(sample, truth_k)])
        print(f"partitioned kNN k={a.k} {t_knn:7.2f} s  {krec}; true recall@{a.k} {kr:.4f}")
        for nprobe in range(1, nlist + 1):
            ivf.nprobe = nprobe
            _, fi = ivf.search(x[sample], a.k + 1)
            fr = np.mean([len(set(r[r != q][: a.k].tolist()) & t) / a.k for q, r, t in zip(sample, fi, truth_k)])
            if fr >= kr or nprobe == nlist:
                break
        t0 = time.perf_counter()
        ivf.search(x, a.k + 1)
        t_fk = time.perf_counter() - t0
        print(f"faiss IVFFlat search {t_fk:8.2f} s  nprobe={nprobe} recall@{a.k} {fr:.4f} (ours {kr:.4f}); "
              f"embedcache/faiss = {t_knn / t_fk:.2f}x")


if __name__ == "__main__":
    main()
