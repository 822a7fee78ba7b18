"""Deduplication: :func:`deduplicate` and its two grouping rules.

Two ways to turn near-duplicate pairs into groups (``deduplicate(..., mode=...)``):

``mode="connected"`` (default)
    A group is a connected component of the graph whose edges are the pairs scored at or
    above ``threshold``. The result does not depend on input order, and it is what an
    exact all-pairs search followed by union-find gives; one representative per group is
    kept. Chains can join items that are not similar to each other (a ~ b ~ c with a and c
    below the threshold); the score reported for a removed item is its similarity to the
    representative, which may then be below the threshold (``explain(i)`` lists the items
    it is directly similar to).
``mode="greedy"``
    The first-seen rule of semhash: items are visited in ``keep`` order (input order, or
    longest text first) and an item is removed when it is at or above the threshold with an
    item already kept, as a duplicate of the most similar of them (ties: the lower index).
    Every removed item is directly similar to the item it is a duplicate of, and no two kept
    items are near-duplicates of each other, but the result depends on the visiting order, it
    can keep more items than ``"connected"``, and a kept item may be a near-duplicate of an
    item removed as a duplicate of another one.

With ``against=`` there are no groups: an item is removed when it is at or above the
threshold with some item of the reference set (``DedupResult.reference`` is true).

Neither rule lists every pair first (a cluster of 20,000 near-identical rows holds 2e8 of
them): ``"connected"`` joins pairs into a spanning forest inside the pair search
(:func:`embedcache.kernels.pairs.threshold_forest`, exact or through the partition index),
``"greedy"`` with the exact method visits items a block at a time against the rows kept
before them (:mod:`._greedy`); the result is the one every pair would give, bit for bit.
``explain`` and ``least_similar_pairs`` compute the pairs they show when asked. A greedy
partitioned run and a run on a cluster (``client=``) still list the pairs they find.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from embedcache import _config, kernels
from embedcache._validation import check_choice, check_int, check_same_columns, check_threshold
from embedcache.errors import InvalidInputError, InvalidInputTypeError, NamespaceMismatchError
from embedcache.store import VectorStore
from embedcache.workflows._cluster import cluster_against, cluster_pairs, store_items
from embedcache.index import check_recall
from embedcache.workflows._prepare import (
    METHODS,
    _Embedding,
    _method,
    _namespace,
    _ordered,
    _prepare,
    _Prepared,
    _progress_bar,
)
from embedcache.workflows.pairs import _copy_scores, _find_forest, _find_pairs, _Pairs
from embedcache.workflows.results import DedupResult

__all__ = ["deduplicate"]

#: how deduplicate groups pairs (see the module docstring)
_MODES = ("connected", "greedy")


def deduplicate(
    items: Any,
    *,
    threshold: float = 0.9,
    embedder: Any = None,
    against: Any = None,
    keep: str | Callable[[np.ndarray, Any], int] = "first",
    mode: str = "connected",
    progress: bool | None = None,
    client: Any = None,
    method: str = "auto",
    recall: float = 0.99,
    seed: int = 0,
    long_texts: str | None = None,
) -> DedupResult:
    """Find near-duplicates by cosine similarity and choose which items to keep.

    items: texts, a list or another ordered iterable of str (embedded with ``embedder``: by
    default the built-in :class:`~embedcache.HashingEmbeddings`, used directly and cached
    nowhere; a bare embedder is wrapped in a :class:`~embedcache.CachedEmbedder` on the
    default cache directory, closed again at the end), an array of shape (n, d), or a
    :class:`~embedcache.VectorStore`. A ``set`` is refused: results index the items, and a
    set has no stable order. Exact duplicates (equal texts, or equal vectors) are collapsed
    before anything is embedded or compared.
    threshold: cosine similarity in [-1, 1]; pairs at or above it are duplicates.
    against: a reference set (texts, array or store). Then only items at or above the
    threshold with some reference item are removed (e.g. test rows leaking from train);
    the items are not deduplicated among themselves, call again without ``against``. When
    both sides name the embedder of their vectors (texts: ``embedder``; a store: its
    ``namespace``) and they differ, :class:`~embedcache.NamespaceMismatchError` is raised
    before anything is embedded.
    keep: which member of a group stays: ``"first"`` (lowest index), ``"longest"`` (longest
    text, the first of equals), or ``keep(group_indices, items) -> index``.
    mode: how pairs become groups, ``"connected"`` or ``"greedy"``; see the module
    docstring. With ``against`` there are no groups and it is only recorded.
    progress: ``None`` shows progress bars when stderr is a terminal, ``False`` never.
    client: a ``distributed.Client`` (items a VectorStore): the pairs are found by tasks on
    its Dask cluster, whose workers read the store's files (see :mod:`embedcache.engine`);
    grouping runs here. With ``against``, each block of items is compared with the reference
    as a task (a reference store read by the workers, other references embedded here and
    sent to them once). The same result as without it.
    method, recall, seed: how pairs are searched, as in :func:`near_duplicates`
    (``"auto"``: exact up to ``_config.INDEX_AUTO_ROWS`` distinct rows, else a partition index
    probed for ``recall`` of the true pairs; ``DedupResult.method`` and ``.recall`` say what
    ran and the recall measured). With ``against`` the reference search is exact.
    long_texts: texts longer than the embedder's input window are embedded in chunks
    (``"chunk"``, the default), cut to the window (``"truncate"``, what the server would do:
    texts that share their first window come out equal) or refused (``"error"``); see
    :class:`~embedcache.CachedEmbedder`. ``None``: a CachedEmbedder's own policy.
    """
    threshold = check_threshold(threshold)
    recall = check_recall(recall)
    check_choice("method", method, METHODS)
    check_int("seed", seed, 0)
    mode = check_choice("mode", mode, _MODES)
    items = _ordered(items, "items")
    if against is not None:
        against = _ordered(against, "against")
    with _Embedding(embedder, long_texts) as emb:
        if against is None:  # check what can be checked before anything is embedded
            _check_keep(keep, None, mode)
        else:
            ns, ref_ns = _namespace(items, emb), _namespace(against, emb)
            if ns is not None and ref_ns is not None and ns != ref_ns:
                raise NamespaceMismatchError(
                    f"items and the reference set must come from one embedder: items are of "
                    f"namespace {ns!r}, the reference set of {ref_ns!r}"
                )
        p = _prepare(items, emb=emb, progress=progress) if client is None else store_items(items)
        if against is not None:
            if client is not None and isinstance(against, VectorStore):
                ref = store_items(against)  # its rows are read by the workers
            else:
                ref = _prepare(against, emb=emb, progress=progress, name="against")
            return _deduplicate_against(p, ref, threshold, mode, progress, client)
    _check_keep(keep, p.texts, mode, texts_known=True)
    n = p.n
    weakest = None
    if client is None and mode == "connected" and _config.DEDUP_FOREST:
        # components only: a spanning forest, never the list of every pair
        roots, forest, copy_score, used, rec = _find_forest(p, threshold, progress, method=method,
                                                            recall=recall, seed=seed)
        labels, (pi, pj, ps) = _forest_labels(p, roots, forest, copy_score)
        links = _Links(p.x, p.inverse, copy_score, threshold, labels if used != "exact" else None)
        weakest = _Weakest(p, labels, copy_score, threshold)
    elif (client is None and mode == "greedy" and _config.DEDUP_FOREST
          and _method(method, len(p.x)) == "exact"):
        # the first-seen rule needs only each block's pairs with the rows kept before it
        from embedcache.workflows._greedy import greedy_owner

        copy_score = _copy_scores(p, threshold)
        owner = greedy_owner(p.x, p.inverse, copy_score, _priority(keep, n, p.texts), threshold)
        group_of, groups, removed_l, dup_l = _greedy_groups(owner)
        links, used, rec = _Links(p.x, p.inverse, copy_score, threshold), "exact", None
        weakest = _Weakest(p, None, copy_score, threshold)
        pi, pj = dup_l[0], removed_l[0]
        pi, pj, ps = np.minimum(pi, pj), np.maximum(pi, pj), p.scores(pi, pj)
    else:
        if client is None:
            pairs = _find_pairs(p, threshold, progress, method=method, recall=recall, seed=seed)
        else:
            pairs = cluster_pairs(p, threshold, client, progress, method=method, recall=recall, seed=seed)
        pi, pj, ps = pairs.edges()
        links, used, rec = pairs.links, pairs.method, pairs.recall
        if mode == "connected":
            labels = _connected_labels(n, pi, pj)
    if mode == "connected":
        groups = _groups_from_labels(labels)
        group_of = _group_index(groups, n)
        removed_l, dup_l = [], []
        for members in groups:
            rep = _pick(keep, members, items, p.texts)
            others = members[members != rep]
            removed_l.append(others)
            dup_l.append(np.full(len(others), rep, dtype=np.int64))
    elif weakest is None:
        group_of, groups, removed_l, dup_l = _greedy(pairs, _priority(keep, n, p.texts))
    removed = np.concatenate(removed_l) if removed_l else np.empty(0, dtype=np.int64)
    dup = np.concatenate(dup_l) if dup_l else np.empty(0, dtype=np.int64)
    order = np.argsort(removed, kind="stable")
    removed, dup = removed[order].astype(np.int64), dup[order].astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[removed] = False
    return DedupResult(
        kept=np.flatnonzero(mask).astype(np.int64),
        removed=removed,
        duplicate_of=dup,
        scores=p.scores(removed, dup),
        groups=groups,
        threshold=threshold,
        mode=mode,
        texts=p.texts,
        ids=p.ids,
        _pairs=(pi, pj, ps),
        _group_of=group_of,
        _links=links,
        _vectors=(p.x, p.inverse) if client is None else None,
        _weakest=weakest,
        method=used,
        recall=rec,
    )


def _forest_labels(p: _Prepared, roots: np.ndarray, forest, copy_score: np.ndarray):
    """Item labels whose classes are the components of the items' pair graph, and the item
    pairs that connect them (as :meth:`_Pairs.edges` gives them, a spanning forest only).

    The first item of each distinct row carries the row's pairs; another item of the row
    joins it when the row's copies meet the threshold (``copy_score``), else stays alone.
    """
    n, u = p.n, len(p.x)
    k = np.arange(n, dtype=np.int64)
    firsts = p.first[p.inverse]
    alone = (firsts != k) & np.isnan(copy_score[p.inverse])
    labels = np.where(alone, u + k, roots[p.inverse])
    fi, fj, fs = forest
    a, b = p.first[fi], p.first[fj]
    dup = (firsts != k) & ~alone
    pi = np.concatenate([np.minimum(a, b), firsts[dup]]).astype(np.int64)
    pj = np.concatenate([np.maximum(a, b), k[dup]]).astype(np.int64)
    ps = np.concatenate([fs, copy_score[p.inverse[dup]]]).astype(np.float32)
    return labels, (pi, pj, ps)


class _Links:
    """``links(i)``: the items scoring >= the threshold with item ``i`` and their scores, in
    index order (what :meth:`_Pairs.links` gives), computed when asked: one row against the
    distinct rows. ``labels``: for a partitioned search, only items of ``i``'s own group
    (the pairs the search found are among them; pairs it missed are not shown)."""

    def __init__(self, x, inverse, copy_score, threshold, labels=None) -> None:
        self.x, self.inverse, self.copy_score, self.threshold, self.labels = x, inverse, copy_score, threshold, labels

    def __call__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        r = int(self.inverse[i])
        _, rows, s = kernels.similar_pairs(self.x[r:r + 1], self.threshold, y=self.x)
        row_score = np.full(len(self.x), np.nan, dtype=np.float32)
        row_score[rows] = s
        row_score[r] = self.copy_score[r]
        items = np.flatnonzero(~np.isnan(row_score[self.inverse]))
        items = items[items != i]
        if self.labels is not None:
            items = items[self.labels[items] == self.labels[i]]
        return items, row_score[self.inverse[items]]


class _Weakest:
    """``weakest(m)``: the ``m`` weakest pairs at or above the threshold among those the
    all-pairs listing would hold (:meth:`_Pairs.edges`: pairs of distinct rows between their
    first items, and each copy with its row's first item), lowest score first, ties by i then
    j; computed when asked, group by group, a few rows at a time, keeping only ``m``."""

    #: pairs scored per call of the kernel, at most (rows x group rows)
    TILE = 1 << 22

    def __init__(self, p: _Prepared, labels: np.ndarray | None, copy_score: np.ndarray, threshold: float) -> None:
        """labels: the connected rule's item labels; None (a greedy run): found when asked."""
        self.p, self.labels, self.copy_score, self.threshold = p, labels, copy_score, threshold

    def __call__(self, m: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``m`` None: every such pair (as many as the groups hold: quadratic in their sizes)."""
        p = self.p
        if self.labels is None:
            roots, forest, _, _, _ = _find_forest(p, self.threshold, False, method="exact")
            self.labels = _forest_labels(p, roots, forest, self.copy_score)[0]
        best = [np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)]

        def fold(i, j, s):
            i, j, s = np.concatenate([best[0], i]), np.concatenate([best[1], j]), np.concatenate([best[2], s])
            order = np.lexsort((j, i, s.astype(np.float64)))[:m]
            best[:] = [i[order], j[order], s[order]]

        k = np.arange(p.n, dtype=np.int64)
        firsts = p.first[p.inverse]
        dup = (firsts != k) & ~np.isnan(self.copy_score[p.inverse])
        fold(firsts[dup], k[dup], self.copy_score[p.inverse[dup]])
        for g in _groups_from_labels(self.labels[p.first]):  # rows sharing a component
            rows = np.sort(g)  # distinct rows, numbered in the order of their first item
            step = max(1, self.TILE // len(rows))
            for a in range(0, len(rows), step):
                q = rows[a:a + step]
                i, j, s = kernels.similar_pairs(p.x[q], self.threshold, y=p.x[rows])
                later = j > a + i  # each pair of rows once
                i, j, s = p.first[q[i[later]]], p.first[rows[j[later]]], s[later]
                fold(np.minimum(i, j), np.maximum(i, j), s)
        return best[0], best[1], best[2]


def _connected_labels(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), dtype=bool), (i, j)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


def _greedy(pairs: _Pairs, order: np.ndarray):
    """semhash's first-seen rule, visiting items in ``order``: an item is removed as a
    duplicate of the most similar item already kept that it pairs with (ties: the lower index).

    Works on distinct rows: an exact copy has the pairs of the row it copies, and at most one
    item per row is ever kept (its copies pair with it).
    """
    from scipy.sparse import csr_matrix

    u, n = len(pairs.first), len(pairs.inverse)
    ui, uj, us = pairs.ui, pairs.uj, pairs.us
    adj = csr_matrix((np.concatenate([us, us]), (np.concatenate([ui, uj]), np.concatenate([uj, ui]))),
                     shape=(u, u))
    adj.sum_duplicates()
    indptr, indices, data = adj.indptr, adj.indices, adj.data
    kept_of_row = np.full(u, -1, dtype=np.int64)
    owner = np.full(n, -1, dtype=np.int64)
    copies = ~np.isnan(pairs.copy_score)
    rows = pairs.inverse[order]
    active = (indptr[rows + 1] > indptr[rows]) | copies[rows]
    for v, r in zip(order[active].tolist(), rows[active].tolist()):
        cand = np.append(kept_of_row[indices[indptr[r]:indptr[r + 1]]], kept_of_row[r])
        sc = np.append(data[indptr[r]:indptr[r + 1]], pairs.copy_score[r])
        hit = (cand >= 0) & ~np.isnan(sc)
        if hit.any():
            cand, sc = cand[hit], sc[hit]
            owner[v] = cand[np.lexsort((cand, -sc.astype(np.float64)))[0]]
        else:
            kept_of_row[r] = v
    return _greedy_groups(owner)


def _greedy_groups(owner: np.ndarray):
    """(group_of, groups, [removed], [duplicate_of]) of the greedy rule's ``owner`` (-1: kept)."""
    n = len(owner)
    removed = np.flatnonzero(owner >= 0)
    labels = np.full(n, -1, dtype=np.int64)
    labels[removed] = owner[removed]
    labels[np.unique(owner[removed])] = np.unique(owner[removed])
    groups = _groups_from_labels(labels)
    return _group_index(groups, n), groups, [removed], [owner[removed]]


def _deduplicate_against(p: _Prepared, ref: _Prepared, threshold: float, mode: str,
                         progress: bool | None, client: Any = None) -> DedupResult:
    chunk = _config.CHUNK_ROWS
    n = p.n
    if n and ref.n:
        check_same_columns(p.x, "items", ref.x, "against")
    best_s = np.full(len(p.first), -np.inf, dtype=np.float32)
    best_r = np.full(len(p.first), -1, dtype=np.int64)
    if client is not None:
        if n and ref.n:
            best_s, best_r = cluster_against(p, ref, client, progress)
    elif len(p.x) and len(ref.x):
        with _progress_bar(progress if len(p.x) > chunk else False, len(p.x), "against") as bar:
            for a in range(0, len(p.x), chunk):
                s, r = kernels.top_k(p.x[a:a + chunk], ref.x, 1)
                best_s[a:a + chunk], best_r[a:a + chunk] = s[:, 0], r[:, 0]
                bar.update(min(chunk, len(p.x) - a))
    item_hit = kernels.meets_threshold(best_s, threshold)[p.inverse]
    removed = np.flatnonzero(item_hit).astype(np.int64)
    dup = ref.first[best_r[p.inverse[removed]]]
    scores = best_s[p.inverse[removed]]
    return DedupResult(
        kept=np.flatnonzero(~item_hit).astype(np.int64),
        removed=removed,
        duplicate_of=dup,
        scores=scores,
        groups=[],
        threshold=threshold,
        mode=mode,
        reference=True,
        texts=p.texts,
        ids=p.ids,
        reference_texts=ref.texts,
        reference_ids=ref.ids,
        _pairs=(removed, dup, scores),
        _group_of=np.full(n, -1, dtype=np.int64),
        _nearest=(best_s[p.inverse], ref.first[best_r[p.inverse]] if ref.n else best_r[p.inverse]),
    )


def _priority(keep: Any, n: int, texts: list[str] | None) -> np.ndarray:
    if keep == "first":
        return np.arange(n, dtype=np.int64)
    if keep == "longest":
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=n)  # type: ignore[union-attr]
        return np.argsort(-lengths, kind="stable").astype(np.int64)
    raise AssertionError(f"unchecked keep {keep!r}")  # _check_keep refuses the rest


def _check_keep(keep: Any, texts: list[str] | None, mode: str, *, texts_known: bool = False) -> None:
    if callable(keep):
        if mode == "greedy":
            raise InvalidInputError(
                "mode='greedy' takes keep='first' or keep='longest', got a callable; "
                "use mode='connected' for a custom choice"
            )
        return
    if keep not in ("first", "longest"):
        raise InvalidInputError(f"keep must be 'first', 'longest' or a callable, got {keep!r}")
    if keep == "longest" and texts is None and texts_known:
        raise InvalidInputError(
            "keep='longest' needs texts (a list of str, or a store whose metadata has 'text'); "
            "got vectors only"
        )


def _groups_from_labels(labels: np.ndarray) -> list[np.ndarray]:
    """Index arrays of the labels that occur more than once, ordered by first member."""
    if not len(labels):
        return []
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    ends = np.r_[starts[1:], len(labels)]
    groups = [order[a:b] for a, b in zip(starts, ends) if b - a > 1 and sorted_labels[a] >= 0]
    groups.sort(key=lambda g: int(g[0]))
    return groups


def _group_index(groups: list[np.ndarray], n: int) -> np.ndarray:
    """For each of ``n`` items, the position of its group in ``groups``, or -1."""
    group_of = np.full(n, -1, dtype=np.int64)
    for g, members in enumerate(groups):
        group_of[members] = g
    return group_of


def _pick(keep: Any, group: np.ndarray, items: Any, texts: list[str] | None) -> int:
    if keep == "first":
        return int(group[0])
    if keep == "longest":
        lengths = [len(texts[k]) for k in group]  # type: ignore[index]
        return int(group[int(np.argmax(lengths))])
    choice = keep(group.copy(), items)
    try:
        choice = int(choice)
    except (TypeError, ValueError):
        raise InvalidInputTypeError(
            f"keep callable must return an item index, got {type(choice).__name__}"
        ) from None
    if choice not in set(group.tolist()):
        raise InvalidInputError(
            f"keep callable must return one of the group's indices {group.tolist()[:10]}, got {choice}"
        )
    return choice

