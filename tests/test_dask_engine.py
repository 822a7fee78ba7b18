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


def assert_same_dedup(a, b):
    for name in ("kept", "removed", "duplicate_of"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert np.array_equal(a.scores.view(np.uint32), b.scores.view(np.uint32))
    assert len(a.groups) == len(b.groups) and all(np.array_equal(g, h) for g, h in zip(a.groups, b.groups))
    la, lb = a.least_similar_pairs(50), b.least_similar_pairs(50)
    assert np.array_equal(la.i, lb.i) and np.array_equal(la.j, lb.j) and np.array_equal(la.score, lb.score)
    for k in range(0, a.n, max(1, a.n // 7)):
        assert a.explain(k) == b.explain(k)


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


def test_client_takes_a_store_and_a_dask_client(tmp_path):
    x = near_dup_vectors(20)
    store = make_store(tmp_path / "s", x)
    with pytest.raises(ec.InvalidInputTypeError, match="client= runs jobs over a VectorStore.*ndarray"):
        ec.near_duplicates(x, threshold=0.9, client=InProcess())
    with pytest.raises(ec.InvalidInputTypeError, match="client= runs jobs over a VectorStore.*ndarray"):
        ec.knn_graph(x, 3, client=InProcess())
    with pytest.raises(ec.InvalidInputTypeError, match="client must be a distributed.Client.*got str"):
        ec.deduplicate(store, threshold=0.9, client="tcp://127.0.0.1:8786")
    with pytest.raises(ec.InvalidInputError, match="client= does not take against="):
        ec.deduplicate(store, threshold=0.9, against=store, client=InProcess())
    for job in (lambda: ec.near_duplicates(store, threshold=0.9, client=InProcess(), method="partitioned"),
                lambda: ec.deduplicate(store, threshold=0.9, client=InProcess(), method="partitioned"),
                lambda: ec.knn_graph(store, 3, client=InProcess(), method="partitioned")):
        with pytest.raises(ec.InvalidInputError, match="method='partitioned' does not run on a cluster yet"):
            job()
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
