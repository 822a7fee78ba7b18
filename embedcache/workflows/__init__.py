"""The jobs users run: deduplicate a set, list its near-duplicate pairs, build a kNN graph.

Every workflow has an array form and a text form. Texts are embedded (exact duplicate texts
are collapsed first, so each distinct text is embedded once) and then handed to the array
form; a :class:`embedcache.VectorStore` is read as its live ids, vectors and texts, all from
one committed state, in the order of ``store.ids()``.

``deduplicate`` (:mod:`.dedup`) groups near-duplicates and chooses what to keep,
``near_duplicates`` (:mod:`.pairs`) lists the pairs, ``knn_graph`` (:mod:`.graph`) builds
the exact k-nearest-neighbour graph; their results (:mod:`.results`) are
:class:`DedupResult` and :class:`PairTable`. Pairs are listed highest score first, ties by
``i`` then ``j``, as :func:`embedcache.similar_pairs` lists them.

Every score is the kernels' (:func:`embedcache.similar_pairs`): float32 cosine of the vectors
as given, clipped to [-1, 1], a vector with its copy exactly 1; a pair is at or above the
threshold when :func:`embedcache.kernels.meets_threshold` says so. Texts, arrays, stores and
``VectorStore.similar_pairs`` therefore agree on every pair and score.

>>> import numpy as np, embedcache as ec
>>> x = np.array([[1, 0], [0.99, 0.1], [0, 1], [0.1, 0.99], [1, 1]], dtype=np.float32)
>>> res = ec.deduplicate(x, threshold=0.98, progress=False)
>>> res.kept.tolist(), res.removed.tolist(), res.duplicate_of.tolist()
([0, 2, 4], [1, 3], [0, 2])
>>> [g.tolist() for g in res.groups]
[[0, 1], [2, 3]]
"""

from embedcache.workflows.dedup import deduplicate
from embedcache.workflows.graph import knn_graph
from embedcache.workflows.pairs import near_duplicates
from embedcache.workflows.results import DedupResult, PairTable

__all__ = ["DedupResult", "PairTable", "deduplicate", "knn_graph", "near_duplicates"]
