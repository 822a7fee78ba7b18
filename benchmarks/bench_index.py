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
until its recall reaches ours; kNN (k) the same way with faiss ``search``. True recall is
measured against the exact kernels on ``--queries`` sampled rows (all their pairs / their k
neighbours). Times are wall seconds of the search (index build timed apart).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def generate(n: int, d: int = 384, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    scale = (1.0 / np.arange(1, d + 1)) ** 0.5

    def aniso(m):
        return (rng.normal(size=(m, d)) * scale) @ basis

    n_dup = int(0.08 * n)
    n_giant = int(0.05 * n)
    n_block = min(2000, n // 20)
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
        t_exact = None
        if n <= a.exact_up_to:
            t0 = time.perf_counter()
            ei, ej, es = ec.similar_pairs(x, a.threshold)
            t_exact = time.perf_counter() - t0
            print(f"exact pairs          {t_exact:8.2f} s  {len(ei)} pairs")
        t0 = time.perf_counter()
        index = PartitionIndex.build(x, seed=0)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        i, j, s, rec = partitioned_pairs(x, a.threshold, recall=a.recall, index=index)
        t_part = time.perf_counter() - t0
        ins = np.isin(i, sample) | np.isin(j, sample)
        found = set(zip(i[ins].tolist(), j[ins].tolist())) | set(zip(j[ins].tolist(), i[ins].tolist()))
        r_true = pair_recall(found, truth)
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
        for nprobe in (1, 2, 4, 8, 16, 32, 64, 128):
            ivf.nprobe = nprobe
            lims, _, ids = ivf.range_search(x[sample], a.threshold)
            fq = np.repeat(sample, np.diff(lims).astype(np.int64))
            fs = set(zip(fq.tolist(), ids.tolist())) - {(q, q) for q in sample.tolist()}
            if pair_recall(fs, truth) >= r_true or nprobe == 128:
                break
        f_rec = pair_recall(fs, truth)
        t0 = time.perf_counter()
        ivf.range_search(x, a.threshold)
        t_faiss = time.perf_counter() - t0
        print(f"faiss IVFFlat range  {t_faiss:8.2f} s + build {f_build:.2f} s  nprobe={nprobe} "
              f"recall {f_rec:.4f}; embedcache/faiss = {t_part / t_faiss:.2f}x (search), "
              f"{(t_part + t_build) / (t_faiss + f_build):.2f}x (with build)")
        if a.no_knn:
            continue
        es_, ei_ = ec.top_k(x[sample], x, a.k + 1)
        truth_k = [set(r[r != q][: a.k].tolist()) for q, r in zip(sample, ei_)]
        t0 = time.perf_counter()
        ks, ki, krec = partitioned_knn(x, a.k, recall=0.95, index=index)
        t_knn = time.perf_counter() - t0
        kr = np.mean([len(set(ki[q].tolist()) & t) / a.k for q, t in zip(sample, truth_k)])
        print(f"partitioned kNN k={a.k} {t_knn:7.2f} s  {krec}; true recall@{a.k} {kr:.4f}")
        for nprobe in (1, 2, 4, 8, 16, 32, 64, 128):
            ivf.nprobe = nprobe
            _, fi = ivf.search(x[sample], a.k + 1)
            fr = np.mean([len(set(r[r != q][: a.k].tolist()) & t) / a.k for q, r, t in zip(sample, fi, truth_k)])
            if fr >= kr or nprobe == 128:
                break
        t0 = time.perf_counter()
        ivf.search(x, a.k + 1)
        t_fk = time.perf_counter() - t0
        print(f"faiss IVFFlat search {t_fk:8.2f} s  nprobe={nprobe} recall@{a.k} {fr:.4f}; "
              f"embedcache/faiss = {t_knn / t_fk:.2f}x")


if __name__ == "__main__":
    main()
