"""The jobs users run: deduplicate a set, list its near-duplicate pairs, build a kNN graph."""

from embedcache.workflows.dedup import DedupResult, PairTable, deduplicate, knn_graph, near_duplicates

__all__ = ["DedupResult", "PairTable", "deduplicate", "knn_graph", "near_duplicates"]
