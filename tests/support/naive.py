"""Slow, obviously correct reference implementations of the kernels (plain loops)."""

from __future__ import annotations

import math

import numpy as np


def norm(row) -> float:
    return math.sqrt(sum(float(v) * float(v) for v in row))


def normalize(x):
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros(x.shape, np.float64)
    for i in range(x.shape[0]):
        n = norm(x[i])
        if n > 0:
            out[i] = x[i] / n
    return out


def score(a, b, metric: str) -> float:
    dot = sum(float(u) * float(v) for u, v in zip(a, b))
    if metric == "dot":
        return dot
    na, nb = norm(a), norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return min(1.0, max(-1.0, dot / (na * nb)))


def similarity(a, b, metric: str):
    b = a if b is None else b
    out = np.zeros((len(a), len(b)), np.float64)
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = score(a[i], b[j], metric)
    return out


def top_k(queries, corpus, k, metric="cosine", exclude_self=False, mask=None, scores=None):
    """Reference top-k. With ``scores`` given (a (q, N) matrix), rank those instead."""
    n = len(corpus)
    kk = min(k, n)
    out_s = np.full((len(queries), kk), -np.inf)
    out_i = np.full((len(queries), kk), -1, np.int64)
    for qi in range(len(queries)):
        cand = []
        for j in range(n):
            if mask is not None and not mask[j]:
                continue
            if exclude_self and j == qi:
                continue
            s = scores[qi, j] if scores is not None else score(queries[qi], corpus[j], metric)
            cand.append((-s, j))
        cand.sort()
        for t, (neg, j) in enumerate(cand[:kk]):
            out_s[qi, t] = -neg
            out_i[qi, t] = j
    return out_s, out_i


def similar_pairs(x, threshold, y=None, metric="cosine", scores=None):
    """Reference pairs (i, j, score) as a list, sorted by (i, j)."""
    same = y is None
    y = x if same else y
    pairs = []
    for i in range(len(x)):
        for j in range(i + 1 if same else 0, len(y)):
            s = scores[i, j] if scores is not None else score(x[i], y[j], metric)
            if s >= threshold:
                pairs.append((i, j, s))
    return pairs
