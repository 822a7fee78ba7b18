"""The engine seam without a cluster: the task plan of a store and the in-process engine give
the answers of one machine bit for bit, whatever the block size; wrong arguments are refused.

The same jobs on a real Dask cluster are in test_dask.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.stores import SMALL, ids_of

import embedcache as ec
from embedcache import _config
from embedcache.engine import InProcess, plan, read
from embedcache.engine._jobs import pair_tiles, store_state
from embedcache.engine._source import StoreSource
from embedcache.index import PartitionIndex
from embedcache.index._copies import classes, row_digests


def make_store(path, x, *, dtype="float32", delete=(), texts=True):
    """A store of ``x`` in segments of a few rows, with rows ``delete`` deleted."""
    with _config.override(MAX_SEGMENT_BYTES=SMALL):
        store = ec.VectorStore(path, dtype=dtype)
        meta = [{"text": f"text {k}"} for k in range(len(x))] if texts else None
        half = len(x) // 2
        store.add(ids_of(half), x[:half], metadata=meta[:half] if meta else None)
        store.add(ids_of(len(x))[half:], x[half:], metadata=meta[half:] if meta else None)
    if delete:
        store.delete([f"r{k}" for k in delete])
    return store


def near_dup_vectors(n, d=16, seed=0):
    """Rows with near-duplicates, exact copies (several of one row) and zero rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    half = n // 3
    x[half : 2 * half] = x[:half] + 0.1 * rng.standard_normal((half, d)).astype(np.float32)
    x[n - 3] = x[n - 4] = x[1]  # three copies of row 1
    x[n - 5] = x[2]
    x[n - 6] = x[n - 7] = 0.0  # zero rows are similar to nothing, not even to each other
    return x


def assert_same_pairs(a, b):
    assert np.array_equal(a.i, b.i) and np.array_equal(a.j, b.j)
    assert np.array_equal(a.score.view(np.uint32), b.score.view(np.uint32))  # bit for bit
    assert a.columns == b.columns and list(a)[:20] == list(b)[:20]


def assert_same_dedup(a, b, *, diagnostics=True):
    """The same groups, kept and removed items and scores; with ``diagnostics`` also the same
    ``least_similar_pairs`` and ``explain``. After a partitioned search those two differ by
    design: one machine scores each group's rows exactly when asked (it holds the vectors and
    never listed every pair), a cluster reports from the pairs its search found."""
    for name in ("kept", "removed", "duplicate_of"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert np.array_equal(a.scores.view(np.uint32), b.scores.view(np.uint32))
    assert len(a.groups) == len(b.groups) and all(np.array_equal(g, h) for g, h in zip(a.groups, b.groups))
    if not diagnostics:
        return
    la, lb = a.least_similar_pairs(50), b.least_similar_pairs(50)
    assert np.array_equal(la.i, lb.i) and np.array_equal(la.j, lb.j) and np.array_equal(la.score, lb.score)
    for k in range(0, a.n, max(1, a.n // 7)):
        assert a.explain(k) == b.explain(k)


def assert_same_against(a, b):
    """The same result of ``deduplicate(items, against=ref)``: removed items, the reference row
    each duplicates and the score, bit for bit, and every item's nearest reference row."""
    assert a.reference and b.reference and not a.groups and not b.groups
    for name in ("kept", "removed", "duplicate_of"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert np.array_equal(a.scores.view(np.uint32), b.scores.view(np.uint32))
    assert np.array_equal(a._nearest[0].view(np.uint32), b._nearest[0].view(np.uint32))
    assert np.array_equal(a._nearest[1], b._nearest[1])
    assert (a.ids, a.texts, a.reference_ids, a.reference_texts) == (b.ids, b.texts, b.reference_ids, b.reference_texts)


def test_blocks_cover_the_live_rows_once_in_order(tmp_path):
    x = near_dup_vectors(61)
    store = make_store(tmp_path / "s", x, delete=(0, 5, 6, 7, 30, 60))
    view, rows = store_state(store, ids=True)
    live = np.array([k for k in range(61) if k not in (0, 5, 6, 7, 30, 60)])
    for size in (1, 4, 7, 9, 100):
        blocks = plan(view, size)
        assert [b.first for b in blocks] == list(range(0, len(live), size))
        assert all(b.count == min(size, len(live) - b.first) for b in blocks)
        got = np.concatenate([read(b) for b in blocks])
        assert np.array_equal(got, x[live])  # the live rows, in the order of ids()
        assert np.array_equal(np.concatenate([b.rows() for b in blocks]), live)  # store rows (no compact yet)
        # tiles: every block with itself and with every later block, once
        tiles = pair_tiles(blocks)
        assert len(tiles) == len(blocks) * (len(blocks) + 1) // 2
    assert [i for i, _ in rows] == store.ids()
    store.close()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("block", [5, 13, 1000])
def test_in_process_engine_gives_the_answers_of_one_machine(tmp_path, dtype, block):
    x = near_dup_vectors(90)
    store = make_store(tmp_path / "s", x, dtype=dtype, delete=(3, 40, 41, 89))
    engine = InProcess()
    q = np.random.default_rng(5).standard_normal((9, 16)).astype(np.float32)
    with _config.override(ENGINE_BLOCK_ROWS=block):
        for t in (0.8, 0.95):
            assert_same_pairs(ec.near_duplicates(store, threshold=t, progress=False),
                              ec.near_duplicates(store, threshold=t, progress=False, client=engine))
        for mode in ("connected", "greedy"):
            for keep in ("first", "longest"):
                assert_same_dedup(ec.deduplicate(store, threshold=0.8, mode=mode, keep=keep, progress=False),
                                  ec.deduplicate(store, threshold=0.8, mode=mode, keep=keep, progress=False,
                                                 client=engine))
        for k, weights in ((1, "similarity"), (6, "distance")):
            ga = ec.knn_graph(store, k, weights=weights, progress=False)
            gb = ec.knn_graph(store, k, weights=weights, progress=False, client=engine)
            assert np.array_equal(ga.indptr, gb.indptr) and np.array_equal(ga.indices, gb.indices)
            assert np.array_equal(ga.data.view(np.uint32), gb.data.view(np.uint32))
        for where in (None, {"text": "text 7"}):
            sa, ia = store.search(q, 8, where=where)
            sb, ib = store.search(q, 8, where=where, client=engine)
            assert np.array_equal(sa.view(np.uint32), sb.view(np.uint32)) and np.array_equal(ia, ib)
    store.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 40),
    block=st.integers(1, 17),
    copies=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 39)), max_size=6),
    deleted=st.sets(st.integers(0, 39), max_size=8),
    threshold=st.sampled_from([-1.0, 0.0, 0.5, 0.9, 1.0]),
    seed=st.integers(0, 3),
)
def test_pairs_and_groups_match_one_machine_for_any_store(tmp_path_factory, n, block, copies, deleted,
                                                          threshold, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(n, 3)).astype(np.float32)  # few distinct rows: many ties and copies
    for a, b in copies:
        if a < n and b < n:
            x[b] = x[a]
    store = make_store(tmp_path_factory.mktemp("s"), x, delete=sorted(d for d in deleted if d < n), texts=False)
    with _config.override(ENGINE_BLOCK_ROWS=block):
        assert_same_pairs(ec.near_duplicates(store, threshold=threshold, progress=False),
                          ec.near_duplicates(store, threshold=threshold, progress=False, client=InProcess()))
        assert_same_dedup(ec.deduplicate(store, threshold=threshold, progress=False),
                          ec.deduplicate(store, threshold=threshold, progress=False, client=InProcess()))
    store.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 30),
    m=st.integers(1, 30),
    block=st.integers(1, 11),
    deleted=st.sets(st.integers(0, 29), max_size=6),
    ref_deleted=st.sets(st.integers(0, 29), max_size=6),
    threshold=st.sampled_from([-1.0, 0.0, 0.7, 1.0]),
    seed=st.integers(0, 3),
)
def test_against_a_reference_matches_one_machine_for_any_stores(tmp_path_factory, n, m, block, deleted,
                                                                ref_deleted, threshold, seed):
    rng = np.random.default_rng(seed)
    # few distinct rows: copies within and across the two sides, ties, zero rows
    x = rng.integers(-1, 2, size=(n, 3)).astype(np.float32)
    y = rng.integers(-1, 2, size=(m, 3)).astype(np.float32)
    store = make_store(tmp_path_factory.mktemp("s"), x, delete=sorted(d for d in deleted if d < n))
    ref = make_store(tmp_path_factory.mktemp("r"), y, delete=sorted(d for d in ref_deleted if d < m), texts=False)
    kw = {"threshold": threshold, "progress": False}
    with _config.override(ENGINE_BLOCK_ROWS=block):
        for against in (ref, y):
            assert_same_against(ec.deduplicate(store, against=against, **kw),
                                ec.deduplicate(store, against=against, client=InProcess(), **kw))
    store.close()
    ref.close()


def test_against_with_a_client_checks_the_dimensions(tmp_path):
    store = make_store(tmp_path / "s", near_dup_vectors(20))
    ref = make_store(tmp_path / "r", near_dup_vectors(10, d=8))
    for against in (ref, np.ones((3, 8), np.float32)):
        with pytest.raises(ec.DimensionMismatchError, match="items and against .* got 16 and 8"):
            ec.deduplicate(store, against=against, client=InProcess(), progress=False)
    store.close()
    ref.close()


def test_client_takes_a_store_and_a_dask_client(tmp_path):
    x = near_dup_vectors(20)
    store = make_store(tmp_path / "s", x)
    with pytest.raises(ec.InvalidInputTypeError, match="client= runs jobs over a VectorStore.*ndarray"):
        ec.near_duplicates(x, threshold=0.9, client=InProcess())
    with pytest.raises(ec.InvalidInputTypeError, match="client= runs jobs over a VectorStore.*ndarray"):
        ec.knn_graph(x, 3, client=InProcess())
    with pytest.raises(ec.InvalidInputTypeError, match="client must be a distributed.Client.*got str"):
        ec.deduplicate(store, threshold=0.9, client="tcp://127.0.0.1:8786")
    table = ec.near_duplicates(store, threshold=0.9, client=InProcess(), progress=False)  # auto: exact
    assert table.method == "exact" and table.recall is None
    graph, recall = ec.knn_graph(store, 3, client=InProcess(), return_recall=True)  # auto: exact there
    assert recall is None and (graph != ec.knn_graph(store, 3)).nnz == 0
    store.close()


def test_without_dask_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_distributed(name, *args, **kwargs):
        if name == "distributed" or name.startswith("distributed."):
            raise ImportError("No module named 'distributed'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_distributed)
    store = make_store(tmp_path / "s", near_dup_vectors(20))
    with pytest.raises(ec.MissingDependencyError, match=r'pip install "embedcache-sim\[dask\]"'):
        ec.near_duplicates(store, threshold=0.9, client=object())
    from embedcache.engine import connect

    with pytest.raises(ec.MissingDependencyError, match=r"embedcache-sim\[dask\]"):
        connect("tcp://127.0.0.1:8786")
    store.close()


# ----------------------------------------------------------------------------- partitioned


def clustered_vectors(n, d=16, seed=0):
    """Clusters of several sizes, one giant cluster of near-identical rows (a third of the
    rows: its cell is split), near-duplicates, exact copies and zero rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, d)).astype(np.float32)
    which = rng.integers(0, 12, n)
    x = centres[which] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    giant = rng.choice(n, n // 3, replace=False)
    x[giant] = centres[0] * 3 + 0.05 * rng.standard_normal((len(giant), d)).astype(np.float32)
    x[n - 3] = x[n - 4] = x[1]
    x[n - 5] = x[2]
    x[n - 6] = x[n - 7] = 0.0
    return x.astype(np.float32)


#: small cells and samples, so that a few hundred rows make several cells, a split and a calibration
SMALL_INDEX = {"INDEX_MIN_CELL": 8, "INDEX_RECALL_SAMPLE": 80, "INDEX_SAMPLE_PER_CELL": 16}


def assert_same_graph(a, b):
    assert np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
    assert np.array_equal(a.data.view(np.uint32), b.data.view(np.uint32))


def assert_partitioned_like_one_machine(store, client, *, threshold=0.8, recall=0.9, seed=0, knn=True):
    """near_duplicates, deduplicate and knn_graph, method="partitioned": the pairs, groups,
    graph and recall of one machine, bit for bit."""
    kw = {"method": "partitioned", "recall": recall, "seed": seed, "progress": False}
    a = ec.near_duplicates(store, threshold=threshold, **kw)
    b = ec.near_duplicates(store, threshold=threshold, client=client, **kw)
    assert a.method == b.method == "partitioned"
    assert_same_pairs(a, b)
    assert a.recall == b.recall
    da = ec.deduplicate(store, threshold=threshold, **kw)
    db = ec.deduplicate(store, threshold=threshold, client=client, **kw)
    assert_same_dedup(da, db, diagnostics=False)
    assert da.recall == db.recall and db.method == "partitioned"
    if knn:
        ga, ra = ec.knn_graph(store, 4, return_recall=True, **kw)
        gb, rb = ec.knn_graph(store, 4, return_recall=True, client=client, **kw)
        assert_same_graph(ga, gb)
        assert ra == rb
    return a


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("block", [7, 64, 1000])
def test_partitioned_on_the_engine_gives_the_answers_of_one_machine(tmp_path, dtype, block):
    x = clustered_vectors(400)
    store = make_store(tmp_path / "s", x, dtype=dtype, delete=(4, 77, 399))
    with _config.override(ENGINE_BLOCK_ROWS=block, **SMALL_INDEX):
        # the distinct rows make several cells, and the giant cluster's cell is split
        distinct = np.unique(store.vectors().astype(np.float32), axis=0)
        index = PartitionIndex.build(distinct)
        assert index.cells > 8 and index.sizes.max() < len(distinct) / 3
        table = assert_partitioned_like_one_machine(store, InProcess())
        exact = ec.near_duplicates(store, threshold=0.8, progress=False)
        assert 0 < len(table) <= len(exact) and table.recall.probes < index.cells
        # every cell probed: the exact answer
        assert_same_pairs(exact, ec.near_duplicates(store, threshold=0.8, method="partitioned", recall=1.0,
                                                    client=InProcess(), progress=False))
    store.close()


def test_auto_on_the_engine_chooses_as_one_machine(tmp_path):
    store = make_store(tmp_path / "s", clustered_vectors(300), delete=(5,))
    kw = {"threshold": 0.8, "progress": False}
    with _config.override(**SMALL_INDEX):
        with _config.override(INDEX_AUTO_ROWS=295):  # 299 live rows, 296 distinct: partitioned
            a, b = ec.near_duplicates(store, **kw), ec.near_duplicates(store, client=InProcess(), **kw)
            assert a.method == b.method == "partitioned" and a.recall == b.recall
            assert_same_pairs(a, b)
            g, rec = ec.knn_graph(store, 3, client=InProcess(), return_recall=True, progress=False)
            assert rec is not None and rec == ec.knn_graph(store, 3, return_recall=True, progress=False)[1]
        with _config.override(INDEX_AUTO_ROWS=296):  # more live rows, as many distinct ones: exact
            a, b = ec.near_duplicates(store, **kw), ec.near_duplicates(store, client=InProcess(), **kw)
            assert a.method == b.method == "exact" and b.recall is None
            assert_same_pairs(a, b)
    store.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 120),
    block=st.integers(1, 50),
    copies=st.lists(st.tuples(st.integers(0, 119), st.integers(0, 119)), max_size=10),
    deleted=st.sets(st.integers(0, 119), max_size=10),
    threshold=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    recall=st.sampled_from([0.5, 0.9, 1.0]),
    seed=st.integers(0, 3),
)
def test_partitioned_pairs_match_one_machine_for_any_store(tmp_path_factory, n, block, copies, deleted,
                                                           threshold, recall, seed):
    x = clustered_vectors(max(n, 8), d=6, seed=seed)[:n]
    for a, b in copies:
        if a < n and b < n:
            x[b] = x[a]
    store = make_store(tmp_path_factory.mktemp("s"), x, delete=sorted(d for d in deleted if d < n), texts=False)
    with _config.override(ENGINE_BLOCK_ROWS=block, INDEX_MIN_CELL=4, INDEX_RECALL_SAMPLE=30,
                          INDEX_SAMPLE_PER_CELL=8):
        kw = {"threshold": threshold, "method": "partitioned", "recall": recall, "seed": seed, "progress": False}
        a = ec.near_duplicates(store, **kw)
        b = ec.near_duplicates(store, client=InProcess(), **kw)
        assert_same_pairs(a, b)
        assert a.recall == b.recall or (a.recall.estimate != a.recall.estimate and b.recall.estimate
                                        != b.recall.estimate and a.recall.probes == b.recall.probes)
    store.close()


def test_a_store_source_scans_as_the_kernels_scan_the_array(tmp_path):
    x = clustered_vectors(200)
    store = make_store(tmp_path / "s", x, dtype="float16", delete=(0, 50, 51, 199))
    view, _ = store_state(store)
    live = store.vectors().astype(np.float32)
    rng = np.random.default_rng(1)
    cent = ec.normalize(rng.standard_normal((9, 16)).astype(np.float32))
    q = live[rng.choice(len(live), 20, replace=False)]
    with _config.override(ENGINE_BLOCK_ROWS=13):
        src = StoreSource(view, InProcess())
        assert len(src) == len(live) and src.shape == live.shape
        assert np.array_equal(src[np.array([5, 3, 190])], live[[5, 3, 190]])
        assert np.array_equal(src.nearest(cent, 3), ec.top_k(live, cent, 3)[1])
        members = np.sort(rng.choice(len(live), 57, replace=False))
        assert np.array_equal(src.assign(cent, members), ec.top_k(live[members], cent, 1)[1][:, 0])
        for got, want in zip(src.pairs_with(q, 0.7), ec.similar_pairs(q, 0.7, y=live)):
            assert np.array_equal(got, want)
        for got, want in zip(src.top_k(q, 6), ec.top_k(q, live, 6)):
            assert np.array_equal(got, want)
    store.close()


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.sampled_from([(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 2.0), (-0.0, 0.0)]),
                     max_size=30))
def test_copy_classes_are_the_first_seen_classes_of_equal_bytes(rows):
    x = np.array(rows, np.float32).reshape(-1, 2)
    inverse, first = classes(*row_digests(x))
    seen: dict = {}
    want = []
    for k, row in enumerate(x):
        key = row.tobytes() if row.any() else k  # zero rows: each alone
        want.append(seen.setdefault(key, len(seen)))
    assert inverse.tolist() == want
    assert first.tolist() == [want.index(c) for c in range(len(seen))]


def built_index(store, **kw):
    """``create_index(**kw)``, then what the index holds: its description (less the commit's
    numbers) and the bytes of its files."""
    import json

    store.create_index(**kw)
    with store._txn.reading() as view:
        desc = json.loads(view.settings["index"])
    files = [(store.path / f["file"]).read_bytes() for f in desc["files"]]
    for key in ("number", "generation", "files"):
        desc.pop(key)
    return desc, files


def test_create_index_on_the_engine_builds_the_index_of_one_machine(tmp_path):
    store = make_store(tmp_path / "s", clustered_vectors(300), dtype="float16", delete=(3, 150))
    with _config.override(ENGINE_BLOCK_ROWS=11, **SMALL_INDEX):
        here, here_files = built_index(store, seed=2)
        there, there_files = built_index(store, seed=2, client=InProcess())
    assert here == there and here_files == there_files
    assert here["cells"] > 8 and len(here["curve"]) > 1
    store.close()


@pytest.mark.parametrize("n, deleted, same", [(1, (), False), (2, (), False), (3, (0, 1, 2), False), (5, (1,), True)])
def test_partitioned_on_the_engine_with_tiny_stores(tmp_path, n, deleted, same):
    x = np.random.default_rng(n).standard_normal((n, 4)).astype(np.float32)
    if same:
        x[:] = x[0]  # one distinct row
    store = make_store(tmp_path / "s", x, delete=deleted)
    table = assert_partitioned_like_one_machine(store, InProcess(), threshold=0.5)
    assert table.recall.estimate == 1.0  # one cell: the search is exact
    assert_same_pairs(table, ec.near_duplicates(store, threshold=0.5, progress=False, method="exact"))
    if same:
        assert len(table) == 6  # four copies of one row: six pairs
    store.close()
