"""VectorStore: search, metadata filters, snapshots and pairs against in-memory references."""

from __future__ import annotations

import numpy as np
import pytest
from support.stores import SMALL, ids_of, vecs

import embedcache as ec
from embedcache import _config
from embedcache.errors import (
    ConfigurationError,
    DimensionMismatchError,
    InvalidInputTypeError,
    NamespaceMismatchError,
)
from embedcache.store import VectorStore
from embedcache.store import _write as store_write


@pytest.fixture
def path(tmp_path):
    return tmp_path / "store"


def reference_search(live_ids, live_x, queries, k, metric="cosine", mask=None):
    """The same search as top_k over the live rows held in memory, ids mapped."""
    scores, idx = ec.top_k(np.asarray(queries, np.float32), np.asarray(live_x), k, metric=metric, mask=mask)
    names = np.array(live_ids, dtype=object)[np.maximum(idx, 0)]
    names[idx < 0] = None
    return scores, names


def exact_scores(queries, x, metric):
    q = np.asarray(queries, np.float64)
    x = np.asarray(x, np.float64)
    if metric == "cosine":
        qn, xn = np.linalg.norm(q, axis=1), np.linalg.norm(x, axis=1)
        q = np.divide(q, qn[:, None], out=np.zeros_like(q), where=qn[:, None] > 0)
        x = np.divide(x, xn[:, None], out=np.zeros_like(x), where=xn[:, None] > 0)
    return q @ x.T


def assert_valid_top_k(scores, ids, live_ids, live_x, queries, k, metric="cosine", tol=1e-5):
    """A correct exact top-k up to float32 rounding: right scores, nothing better left out."""
    ref = exact_scores(queries, live_x, metric)
    kk = min(k, len(live_ids))
    assert scores.shape == ids.shape == (len(ref), kk)
    pos = {name: i for i, name in enumerate(live_ids)}
    for r in range(len(ref)):
        got = [pos[name] for name in ids[r]]
        assert len(set(got)) == kk
        np.testing.assert_allclose(scores[r], ref[r, got], rtol=0, atol=tol)
        assert np.all(np.diff(scores[r]) <= tol)
        if kk < len(live_ids):
            rest = np.delete(ref[r], got)
            assert rest.max() <= ref[r, got].min() + tol


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_search_equals_top_k_in_memory(path, metric, dtype):
    x = vecs(60)
    x[5] = 0.0  # a zero row
    x[11] = x[3]  # equal rows
    q = vecs(9, seed=1)
    q[0] = x[3]
    with _config.override(MAX_SEGMENT_BYTES=SMALL * (2 if dtype == "float32" else 1)), VectorStore(path, metric=metric, dtype=dtype) as s:
        for a, b in [(0, 13), (13, 14), (14, 60)]:
            s.add(ids_of(60)[a:b], x[a:b])
        stored = x.astype(dtype)
        for k in (1, 4, 60, 100):
            scores, ids = s.search(q, k=k)
            assert scores.dtype == np.float32 and ids.dtype == object
            assert_valid_top_k(scores, ids, ids_of(60), stored, q, k, metric)
            # the kernels score a pair the same wherever it sits in a block: equal bit for bit
            ref_s, ref_ids = reference_search(ids_of(60), stored, q, k, metric)
            np.testing.assert_array_equal(ids, ref_ids)
            np.testing.assert_array_equal(scores, ref_s)
        # one query as a 1-D array; equal rows tie and the earlier one comes first
        s1, i1 = s.search(q[0], k=3)
        assert i1.shape == (1, 3) and list(i1[0, :2]) == ["r3", "r11"]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_search_breaks_exact_ties_by_insertion_order(path, dtype):
    """Small integers make every dot product exact: the result must equal top_k bit for bit."""
    rng = np.random.default_rng(4)
    x = rng.integers(-2, 3, size=(80, 6)).astype(np.float32)
    q = rng.integers(-2, 3, size=(12, 6)).astype(np.float32)
    with _config.override(MAX_SEGMENT_BYTES=9 * 6 * 4), VectorStore(path, metric="dot", dtype=dtype) as s:
        for a in range(0, 80, 11):
            s.add(ids_of(80)[a : a + 11], x[a : a + 11])
        s.delete(["r3", "r40"])
        s.add(["r7"], x[[7]], upsert=True)
        live = [i for i in range(80) if i not in (3, 40, 7)] + [7]
        names = [f"r{i}" for i in live]
        for k in (1, 5, 77, 90):
            scores, ids = s.search(q, k=k)
            ref_s, ref_ids = reference_search(names, x[live], q, k, "dot")
            np.testing.assert_array_equal(ids, ref_ids)
            np.testing.assert_array_equal(scores, ref_s)
        s.compact()
        scores, ids = s.search(q, k=20)
        ref_s, ref_ids = reference_search(names, x[live], q, 20, "dot")
        np.testing.assert_array_equal(ids, ref_ids)


def test_search_skips_deleted_and_upserted_rows(path):
    x = vecs(30)
    with _config.override(MAX_SEGMENT_BYTES=SMALL), VectorStore(path) as s:
        s.add(ids_of(30), x)
        s.delete(["r2", "r3", "r4", "r5", "r6", "r7", "r8"])  # a whole segment and more
        s.add(["r10"], x[[2]], upsert=True)
        live = {f"r{i}": x[i] for i in range(30) if i not in range(2, 9) and i != 10}
        live["r10"] = x[2]
        assert s.ids() == list(live)
        q = np.concatenate([x[:10], vecs(3, seed=5)])
        for k in (1, 5, 30):
            scores, ids = s.search(q, k=k)
            assert_valid_top_k(scores, ids, list(live), np.array(list(live.values())), q, k)
            ref_s, ref_ids = reference_search(list(live), np.array(list(live.values())), q, k)
            np.testing.assert_array_equal(ids, ref_ids)
            np.testing.assert_array_equal(scores, ref_s)


def test_search_where_filters_on_metadata(path):
    x = vecs(40)
    md = []
    for i in range(40):
        m = {"lang": ["en", "de"][i % 2], "n": i % 5, "flag": i % 3 == 0, "w": 0.5 if i < 20 else 1.5}
        if i % 7 == 0:
            m["opt"] = None
        if i % 10 == 1:
            m = {"lang": "en", "n": True}  # bool is not the number 1
        md.append(m)
    with _config.override(MAX_SEGMENT_BYTES=SMALL), VectorStore(path) as s:
        s.add(ids_of(40), x, metadata=md)
        s.delete(["r2"])
        q = vecs(4, seed=3)
        filters = [
            {"lang": "de"},
            {"lang": "en", "n": 1},
            {"n": 1.0},
            {"flag": True},
            {"flag": False, "lang": "de"},
            {"opt": None},
            {"w": 1.5},
            {"n": True},
            {"missing": "x"},
            {},
        ]
        for where in filters:
            keep = [i for i in range(40) if i != 2 and all(k in md[i] and _same(md[i][k], v) for k, v in where.items())]
            scores, ids = s.search(q, k=6, where=where)
            assert scores.shape == (4, 6)
            w = min(6, len(keep))
            assert_valid_top_k(scores[:, :w], ids[:, :w], [f"r{i}" for i in keep], x[keep], q, 6)
            assert (ids[:, w:] == None).all() and np.isneginf(scores[:, w:]).all()  # noqa: E711
            live = [i for i in range(40) if i != 2]
            mask = np.array([i in keep for i in live])
            ref_s, ref_ids = reference_search([f"r{i}" for i in live], x[live], q, 6, mask=mask)
            np.testing.assert_array_equal(ids, ref_ids, err_msg=str(where))
            np.testing.assert_array_equal(scores, ref_s)


def _same(a, b):
    """JSON equality: a bool matches only a bool, None only None, a number any equal number."""
    if isinstance(a, (bool, str)) or isinstance(b, (bool, str)) or a is None or b is None:
        return type(a) is type(b) and a == b
    return a == b


def test_search_memory_is_bounded_by_the_output(path):
    import tracemalloc

    n_seg = 40
    with _config.override(MAX_SEGMENT_BYTES=SMALL), VectorStore(path) as s:
        s.add(ids_of(7 * n_seg), vecs(7 * n_seg))
        assert s.info()["segments"] >= n_seg - 1
        q = vecs(4000, seed=3)
        s.search(q, k=7)  # compile and cache
        tracemalloc.start()
        try:
            scores, got = s.search(q, k=7)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        out = scores.nbytes + got.nbytes  # 0.3 MiB; one (q, k) result per segment would be 40 times that
        assert peak < 16 * out, f"peak {peak / 2**20:.1f} MiB for {out / 2**20:.1f} MiB of results"
        ref_s, ref_i = reference_search(s.ids(), s.vectors(), q, 7)
        np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-6)


def test_reader_refreshes_and_sees_only_committed_rows(path, monkeypatch):
    x = vecs(20)
    monkeypatch.setattr(_config, "MAX_SEGMENT_BYTES", SMALL)
    writer = VectorStore(path)
    reader = VectorStore(path)
    writer.add(ids_of(10), x[:10])
    assert len(reader) == 10
    seen = []

    def spy(p):  # runs after the segments are in place, before the commit
        seen.append((len(reader), reader.ids(), reader.search(x[:2], k=20)[1].shape))
        real_fsync_dir(p)

    real_fsync_dir = store_write.fsync_dir
    monkeypatch.setattr(store_write, "fsync_dir", spy)
    writer.add(ids_of(10, "q"), x[10:])
    assert seen == [(10, ids_of(10), (2, 10))]
    assert len(reader) == 20 and reader.ids()[-1] == "q9"
    writer.compact()
    np.testing.assert_array_equal(reader.vectors(), x)
    writer.close()
    reader.close()


def test_snapshot_is_ids_vectors_and_metadata_of_one_state(path):
    with _config.override(MAX_SEGMENT_BYTES=SMALL), VectorStore(path) as s:
        x = vecs(20)
        s.add(ids_of(20), x, metadata=[{"k": i} if i % 3 else None for i in range(20)])
        s.delete(["r2", "r11"])
        s.add(["r5"], vecs(1, seed=9), metadata=[{"k": "new"}], upsert=True)
        ids, y, meta = s.snapshot()
        assert ids == s.ids()
        np.testing.assert_array_equal(y, s.vectors())
        assert meta == s.metadata(ids)
        assert not y.flags.writeable


def brute_pairs(ids_a, xa, ids_b=None, xb=None, threshold=0.5, metric="cosine"):
    same = xb is None
    xb = xa if same else xb
    ids_b = ids_a if same else ids_b
    out = []
    for i in range(len(xa)):
        for j in range(i + 1 if same else 0, len(xb)):
            a, b = xa[i].astype(np.float64), xb[j].astype(np.float64)
            if metric == "cosine":
                na, nb = np.linalg.norm(a), np.linalg.norm(b)
                sc = 0.0 if na == 0 or nb == 0 else a @ b / (na * nb)
            else:
                sc = a @ b
            if sc >= threshold:
                out.append((ids_a[i], ids_b[j], sc))
    return out


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_similar_pairs_within_and_across_stores(tmp_path, metric):
    base = vecs(12, 16, seed=7)
    x = np.concatenate([base, base + 0.1 * vecs(12, 16, seed=8), base[:6] * 2])
    ids = ids_of(len(x))
    thr = 0.9 if metric == "cosine" else 20.0
    with _config.override(MAX_SEGMENT_BYTES=SMALL), VectorStore(tmp_path / "a", metric=metric) as s, VectorStore(
        tmp_path / "b", metric=metric
    ) as t:
        s.add(ids, x)
        s.delete(["r1", "r13"])
        live = [i for i in range(len(x)) if i not in (1, 13)]
        left, right, scores = s.similar_pairs(thr)
        ref = brute_pairs([ids[i] for i in live], x[live], threshold=thr, metric=metric)
        assert left.dtype == object and scores.dtype == np.float32
        got = {(a, b): sc for a, b, sc in zip(left, right, scores)}
        near = {(a, b) for a, b, sc in ref if abs(sc - thr) > 1e-4}
        assert near <= set(got) and set(got) <= {(a, b) for a, b, _ in ref} | _borderline(ref, thr)
        for a, b, sc in ref:
            if (a, b) in got:
                assert got[(a, b)] == pytest.approx(sc, abs=1e-4)
        assert list(scores) == sorted(scores, reverse=True)
        assert all(ids.index(a) < ids.index(b) for a, b in zip(left, right))

        t.add(["t0", "t1"], np.stack([x[3], -x[3]]))
        left, right, scores = s.similar_pairs(thr, y=t)
        ref = brute_pairs([ids[i] for i in live], x[live], ["t0", "t1"], t.vectors(), threshold=thr, metric=metric)
        assert sorted(zip(left, right)) == sorted((a, b) for a, b, _ in ref)
        assert set(right) <= {"t0"}


def _borderline(ref, thr):
    return {(a, b) for a, b, sc in ref if abs(sc - thr) <= 1e-4}


@pytest.mark.parametrize("across", [False, True])
def test_pairs_come_by_score_then_left_row_then_right_row(tmp_path, across):
    """Small integers make scores exact, so many pairs tie: the order is score descending,
    then the left row, then the right row (rows in the order of ids()), across segments."""
    rng = np.random.default_rng(11)
    x = rng.integers(-1, 2, size=(40, 3)).astype(np.float32)
    y = rng.integers(-1, 2, size=(9, 3)).astype(np.float32)
    with _config.override(MAX_SEGMENT_BYTES=5 * 3 * 4), VectorStore(tmp_path / "a", metric="dot") as s, VectorStore(
        tmp_path / "b", metric="dot"
    ) as t:
        for a in range(0, 40, 6):
            s.add(ids_of(40)[a : a + 6], x[a : a + 6])
        s.delete(["r4", "r17"])
        s.add(["r9"], x[[9]], upsert=True)  # r9 moves to the end
        t.add(ids_of(9, "t"), y)
        live = [i for i in range(40) if i not in (4, 17, 9)] + [9]
        xs = x[live]
        if across:
            left, right, scores = s.similar_pairs(1.0, y=t)
            ref = [(-float(xs[i] @ y[j]), i, j) for i in range(len(xs)) for j in range(len(y)) if xs[i] @ y[j] >= 1]
            names_right = ids_of(9, "t")
        else:
            left, right, scores = s.similar_pairs(1.0)
            ref = [(-float(xs[i] @ xs[j]), i, j) for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[i] @ xs[j] >= 1]
            names_right = [f"r{i}" for i in live]
        ref.sort()
        assert len(set(sc for sc, _, _ in ref)) < len(ref)  # there are ties to break
        assert list(scores) == [-sc for sc, _, _ in ref]
        assert list(left) == [f"r{live[i]}" for _, i, _ in ref]
        assert list(right) == [names_right[j] for _, _, j in ref]


def test_similar_pairs_checks_the_other_store(tmp_path):
    with VectorStore(tmp_path / "a", namespace="n1") as a, VectorStore(tmp_path / "b", namespace="n2") as b:
        a.add(["x"], vecs(1))
        b.add(["y"], vecs(1))
        with pytest.raises(NamespaceMismatchError, match="n1.*n2"):
            a.similar_pairs(0.5, y=b)
        with pytest.raises(InvalidInputTypeError):
            a.similar_pairs(0.5, y="b")
        with pytest.raises(InvalidInputTypeError):
            a.similar_pairs("high")
        left, right, _ = a.similar_pairs(0.5, y=a)
        assert list(left) == ["x"] and list(right) == ["x"]
    with VectorStore(tmp_path / "c", metric="dot") as c, VectorStore(tmp_path / "d") as d:
        c.add(["x"], vecs(1))
        d.add(["y"], vecs(1))
        with pytest.raises(ConfigurationError, match="metric"):
            c.similar_pairs(0.5, y=d)
    with VectorStore(tmp_path / "e") as e, VectorStore(tmp_path / "f") as f:
        e.add(["x"], vecs(1, 4))
        f.add(["y"], vecs(1, 5))
        with pytest.raises(DimensionMismatchError):
            e.similar_pairs(0.5, y=f)


def test_pairs_across_two_stores_from_two_threads_do_not_deadlock(tmp_path):
    import threading
    from contextlib import contextmanager

    a = VectorStore(tmp_path / "a")
    b = VectorStore(tmp_path / "b")
    a.add(ids_of(5), vecs(5))
    b.add(ids_of(5), vecs(5, seed=1))
    barrier = threading.Barrier(2)
    depth = threading.local()

    def wrap(store):
        real = store._txn.reading

        @contextmanager
        def reading():
            if getattr(depth, "n", 0):  # about to take the second store's lock: let the other thread in
                try:
                    barrier.wait(1)
                except threading.BrokenBarrierError:
                    pass
            depth.n = getattr(depth, "n", 0) + 1
            try:
                with real() as v:
                    yield v
            finally:
                depth.n -= 1

        store._txn.reading = reading

    wrap(a)
    wrap(b)
    results = []
    threads = [
        threading.Thread(target=lambda x=x, y=y: results.append(len(x.similar_pairs(-1.0, y=y)[0])), daemon=True)
        for x, y in ((a, b), (b, a))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert results == [25, 25], "similar_pairs(y=) deadlocked"
    a.close()
    b.close()
