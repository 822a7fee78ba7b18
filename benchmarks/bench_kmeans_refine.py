"""Two-level k-means with and without flat refinement rounds, side by side, in one run.

    python benchmarks/bench_kmeans_refine.py [--data X.npy | --rows 1000000] [--queries 1000]
                                             [--rounds 0,1,2,4] [--two-level-cells 500]
                                             [--pair-rows 2000] [--threshold 0.9]

The rows come from ``--data`` (an (n, d) float32 ``.npy``, memory-mapped) or from
``bench_index.generate(--rows)``. The last ``--queries`` rows (the generator permutes its
rows: a uniform sample) are held out as queries, with exact top-10 truth from
:func:`embedcache.top_k`; the index is built on the others with ``INDEX_TWO_LEVEL_CELLS``
lowered to ``--two-level-cells`` (below the default cell count, so training, assignment and
probing all take their two-level paths, as from about 2M rows up by default) and
``INDEX_REFINE_ITERS`` set to each of ``--rounds``. One more line, "flat", is the index with
the default settings (one level throughout), the reference the refinement moves towards.

Printed per line: build time (training + assignment + splits), the k-means objective (mean
cosine of the training-size sample of rows to their nearest centroid, all centroids looked
at), recall@10 of the held-out queries at 1 / 10 / 20 probes in the order a search probes
(``probe_cells``: through coarse groups when two-level) and in the exact nearest-cell order
(``nearest_cells``), and the recall of pairs (cosine >= ``--threshold``) of ``--pair-rows``
sampled rows at 1 / 2 / 3 probes (a pair is found when its rows share a cell or either
probes the other's cell, as :func:`embedcache.near_duplicates` searches).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None, help="an (n, d) float32 .npy file (memory-mapped)")
    ap.add_argument("--rows", type=int, default=200_000, help="rows generated when no --data")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--rounds", default="0,1,2,4")
    ap.add_argument("--two-level-cells", type=int, default=None,
                    help="INDEX_TWO_LEVEL_CELLS for the two-level lines (default: half the cells)")
    ap.add_argument("--pair-rows", type=int, default=2000)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import embedcache as ec
    from embedcache import _config
    from embedcache.index import PartitionIndex
    from embedcache.index._cells import default_cells, nearest

    if a.data:
        x = np.load(a.data, mmap_mode="r")
    else:
        from bench_index import generate

        x = generate(a.rows)
    n = len(x) - a.queries
    base, q = x[:n], np.ascontiguousarray(x[n:])
    cells = default_cells(n)
    two = a.two_level_cells if a.two_level_cells is not None else cells // 2
    print(f"rows {n:,} x {x.shape[1]}, cells {cells}, two-level above {two}, queries {a.queries}", flush=True)

    t = time.perf_counter()
    _, truth = ec.top_k(q, base, 10)
    rng = np.random.default_rng(a.seed)
    prow = np.sort(rng.choice(n, min(a.pair_rows, n), replace=False))
    pq = np.ascontiguousarray(base[prow])
    pi, pj, _ = ec.similar_pairs(pq, a.threshold, y=base)
    ok = pj != prow[pi]
    pi, pj = pi[ok], pj[ok]
    partners, ppos = np.unique(pj, return_inverse=True)
    pv = np.ascontiguousarray(base[partners])
    sample = np.sort(rng.choice(n, min(n, _config.INDEX_SAMPLE_PER_CELL * cells), replace=False))
    us = ec.normalize(np.ascontiguousarray(base[sample]))
    print(f"truth: {time.perf_counter() - t:.1f} s; {len(pi):,} true pairs of {len(prow)} rows", flush=True)

    def measure(label: str, **knobs) -> None:
        with _config.override(**knobs):
            t0 = time.perf_counter()
            index = PartitionIndex.build(base, seed=a.seed)
            t_build = time.perf_counter() - t0
            c = index.centroids
            objective = float(np.einsum("ij,ij->i", us, c[nearest(us, c, 1)[:, 0]]).mean())
            own = index.own[truth]  # (queries, 10): the cell of every true neighbour
            rec = []
            for order in (index.probe_cells, index.nearest_cells):
                near = order(q, 20)
                rec.append([(own[:, :, None] == near[:, None, :p]).any(axis=2).mean() for p in (1, 10, 20)])
            need = np.minimum(index.probes_needed(pq, pi, index.own[pj]),
                              index.probes_needed(pv, ppos.reshape(-1), index.own[prow[pi]]))
            need[index.own[prow[pi]] == index.own[pj]] = 0
            pairs = [(need <= p).mean() if len(need) else float("nan") for p in (1, 2, 3)]
        fmt = " / ".join
        print(f"{label:<10} build {t_build:6.1f} s  cells {index.cells}  objective {objective:.4f}  "
              f"recall@10 probe {fmt(f'{v:.3f}' for v in rec[0])}  nearest {fmt(f'{v:.3f}' for v in rec[1])}  "
              f"pairs {fmt(f'{v:.4f}' for v in pairs)}", flush=True)

    measure("flat")
    for r in (int(s) for s in a.rounds.split(",")):
        measure(f"refine {r}", INDEX_TWO_LEVEL_CELLS=two, INDEX_REFINE_ITERS=r)


if __name__ == "__main__":
    main()
