"""Similarity kernels: normalize, similarity matrices, exact top-k and threshold pairs."""

from embedcache.kernels._core import (
    FASTMATH,
    cosine_similarity,
    dot_similarity,
    meets_threshold,
    normalize,
    pair_scores,
    similar_pairs,
    top_k,
)

__all__ = [
    "FASTMATH",
    "cosine_similarity",
    "dot_similarity",
    "meets_threshold",
    "normalize",
    "pair_scores",
    "similar_pairs",
    "top_k",
]
