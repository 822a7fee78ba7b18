"""VectorStore: format, persistence, validation, search and pairs against in-memory references."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import embedcache as ec
from embedcache import store as store_mod
from embedcache.errors import (
    ConfigurationError,
    DimensionMismatchError,
    DuplicateIdError,
    InvalidInputError,
    InvalidInputTypeError,
    NamespaceMismatchError,
    StoreCorruptedError,
    StoreError,
    StoreLockedError,
)
from embedcache.store import VectorStore

# 16-d float32 rows are 64 bytes: segments of at most 7 rows make every test multi-segment
SMALL = 7 * 16 * 4


def ids_of(n, prefix="r"):
    return [f"{prefix}{i}" for i in range(n)]


def vecs(n, d=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


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


# ----------------------------------------------------------------------------- basics


def test_add_get_reopen_keeps_everything(path):
    x = vecs(30)
    md = [{"n": i, "even": i % 2 == 0} for i in range(30)]
    with VectorStore(path, _max_segment_bytes=SMALL) as s:
        s.add(ids_of(20), x[:20], metadata=md[:20])
        s.add(ids_of(10, "q"), x[20:])
        assert len(s) == 30 and s.dim == 16 and s.dtype == "float32" and s.metric == "cosine"
    with VectorStore(path) as s:
        assert s.ids() == ids_of(20) + ids_of(10, "q")
        assert list(s) == s.ids()
        assert "r3" in s and "q9" in s and "zz" not in s and 3 not in s
        np.testing.assert_array_equal(s.get(["q1", "r19", "r0"]), x[[21, 19, 0]])
        assert s.metadata(["r5", "q0"]) == [md[5], {}]
        np.testing.assert_array_equal(s.vectors(), x)
        info = s.info()
        assert info["rows"] == 30 and info["deleted"] == 0 and info["segments"] > 1
        assert info["format_version"] == store_mod.FORMAT_VERSION
        assert s.verify()["live"] == 30


def test_format_is_readable_without_embedcache(path):
    """The documented format: segments of raw little-endian rows, located through SQLite."""
    x = vecs(20)
    with VectorStore(path, _max_segment_bytes=SMALL) as s:
        s.add(ids_of(20), x, metadata=[{"i": i} for i in range(20)])
        s.delete(["r4"])
    db = sqlite3.connect(path / "store.sqlite")
    settings = dict(db.execute("SELECT key, value FROM settings"))
    assert settings["format_version"] == 1 and settings["dim"] == 16 and settings["dtype"] == "float32"
    segs = db.execute("SELECT file, first_row, rows FROM segments ORDER BY first_row").fetchall()
    got = {}
    for row, id_, deleted, meta in db.execute("SELECT row, id, deleted, metadata FROM rows"):
        file, first, _ = [s for s in segs if s[1] <= row < s[1] + s[2]][0]
        data = np.fromfile(path / file, dtype="<f4").reshape(-1, 16)
        if not deleted:
            got[id_] = (data[row - first], json.loads(meta))
    db.close()
    assert sorted(got) == sorted(set(ids_of(20)) - {"r4"})
    for i in range(20):
        if i != 4:
            np.testing.assert_array_equal(got[f"r{i}"][0], x[i])
            assert got[f"r{i}"][1] == {"i": i}


def test_settings_are_recorded_and_checked(path):
    VectorStore(path, dim=16, dtype="float16", metric="dot", namespace="ns", model="m").close()
    with VectorStore(path) as s:
        assert (s.dim, s.dtype, s.metric, s.namespace, s.model) == (16, "float16", "dot", "ns", "m")
    with pytest.raises(DimensionMismatchError, match="dimension 16.*got dimension 8"):
        VectorStore(path, dim=8)
    with pytest.raises(ConfigurationError, match="float16"):
        VectorStore(path, dtype="float32")
    with pytest.raises(ConfigurationError, match="metric"):
        VectorStore(path, metric="cosine")
    with pytest.raises(NamespaceMismatchError, match="'ns'.*'other'"):
        VectorStore(path, namespace="other")
    with pytest.raises(ConfigurationError):
        VectorStore(path / "x", metric="l2")
    with pytest.raises(ConfigurationError):
        VectorStore(path / "y", dtype="int8")


def test_dimension_is_taken_from_first_add_and_enforced(path):
    with VectorStore(path) as s:
        assert s.dim is None and len(s) == 0
        scores, ids = s.search(np.ones((2, 5)), k=3)
        assert scores.shape == (2, 0) and ids.shape == (2, 0)
        s.add(["a"], np.ones((1, 5)))
        assert s.dim == 5
        with pytest.raises(DimensionMismatchError, match="dimension 5, got dimension 6"):
            s.add(["b"], np.ones((1, 6)))
        with pytest.raises(DimensionMismatchError, match="dimension 5"):
            s.search(np.ones((1, 6)))
        assert s.ids() == ["a"]


def test_bad_input_is_refused_and_nothing_changes(path):
    with VectorStore(path) as s:
        s.add(["a", "b"], vecs(2))
        before = s.info()["generation"]
        with pytest.raises(DuplicateIdError, match="'a' is already in the store"):
            s.add(["c", "a"], vecs(2, seed=1))
        with pytest.raises(DuplicateIdError, match="more than once"):
            s.add(["c", "c"], vecs(2, seed=1))
        with pytest.raises(InvalidInputError, match="finite"):
            s.add(["c", "d"], np.array([[0.0] * 16, [np.nan] * 16]))
        with pytest.raises(InvalidInputError, match="one id per row"):
            s.add(["c"], vecs(2))
        with pytest.raises(InvalidInputTypeError, match="single str"):
            s.add("c", vecs(1))
        with pytest.raises(InvalidInputTypeError, match="must be a str"):
            s.add([3], vecs(1))
        with pytest.raises(InvalidInputError, match="empty string"):
            s.add([""], vecs(1))
        with pytest.raises(InvalidInputTypeError, match="JSON"):
            s.add(["c"], vecs(1), metadata=[{"x": object()}])
        with pytest.raises(InvalidInputTypeError, match="dict"):
            s.add(["c"], vecs(1), metadata=["text"])
        with pytest.raises(InvalidInputError, match="one dict per row"):
            s.add(["c"], vecs(1), metadata=[{}, {}])
        with pytest.raises(InvalidInputTypeError, match="numeric"):
            s.add(["c"], np.array([["a"] * 16]))
        with pytest.raises(InvalidInputError, match="2D"):
            s.add(["c"], np.ones(16))
        with pytest.raises(InvalidInputError, match="not in the store"):
            s.get(["a", "nope"])
        with pytest.raises(InvalidInputError, match="nothing was deleted"):
            s.delete(["a", "nope"])
        with pytest.raises(InvalidInputError, match="k must be"):
            s.search(vecs(1), k=0)
        with pytest.raises(InvalidInputError, match="finite"):
            s.search(np.full((1, 16), np.inf))
        with pytest.raises(InvalidInputTypeError, match="where"):
            s.search(vecs(1), where=[("a", 1)])
        with pytest.raises(InvalidInputTypeError, match="str, int"):
            s.search(vecs(1), where={"a": [1]})
        assert s.ids() == ["a", "b"] and s.info()["generation"] == before
        assert s.verify()["rows"] == 2
        assert not [p for p in (path / "segments").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(InvalidInputError, match="dim"):
        VectorStore(path, dim=0)
    with pytest.raises(InvalidInputError, match="lock_timeout"):
        VectorStore(path, lock_timeout=-1)


def test_float16_rejects_values_it_cannot_hold(path):
    with VectorStore(path, dtype="float16") as s:
        with pytest.raises(InvalidInputError, match="65504"):
            s.add(["a"], np.full((1, 4), 1e6))
        x = vecs(5, 4)
        s.add(ids_of(5), x)
        got = s.get(ids_of(5))
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, x.astype(np.float16))


def test_upsert_replaces_and_moves_to_end(path):
    x = vecs(4)
    with VectorStore(path) as s:
        s.add(ids_of(3), x[:3], metadata=[{"v": 1}] * 3)
        s.add(["r1", "new"], x[[3, 0]], metadata=[{"v": 2}, None], upsert=True)
        assert s.ids() == ["r0", "r2", "r1", "new"]
        np.testing.assert_array_equal(s.get(["r1"]), x[[3]])
        assert s.metadata(["r1", "r0", "new"]) == [{"v": 2}, {"v": 1}, {}]
        assert len(s) == 4 and s.info()["deleted"] == 1


def test_delete_and_compact_keep_order_and_reclaim_files(path):
    x = vecs(40)
    with VectorStore(path, _max_segment_bytes=SMALL) as s:
        for a in range(0, 40, 5):
            s.add(ids_of(40)[a : a + 5], x[a : a + 5], metadata=[{"i": i} for i in range(a, a + 5)])
        s.delete(["r0", "r7", "r8", "r39", "r7"])
        keep = [i for i in range(40) if i not in (0, 7, 8, 39)]
        before = s.search(x[:5], k=6)
        old_files = set((path / "segments").iterdir())
        s.compact()
        assert not old_files & set((path / "segments").iterdir())
        assert s.ids() == [f"r{i}" for i in keep]
        np.testing.assert_array_equal(s.vectors(), x[keep])
        assert s.metadata(["r9"]) == [{"i": 9}]
        after = s.search(x[:5], k=6)
        np.testing.assert_array_equal(before[1], after[1])
        np.testing.assert_allclose(before[0], after[0], rtol=0, atol=1e-6)
        info = s.info()
        assert info["deleted"] == 0 and info["segments"] == -(-len(keep) // 7)
        s.verify()
        s.delete(s.ids())
        s.compact()
        assert len(s) == 0 and s.info()["segments"] == 0
        assert s.search(x[:2], k=3)[0].shape == (2, 0)
        s.add(["again"], x[:1])
        assert s.ids() == ["again"]


def test_many_small_adds_keep_few_segments(path):
    x = vecs(100, 4)
    with VectorStore(path) as s:
        for i in range(100):
            s.add([f"r{i}"], x[i : i + 1])
        # trailing segments merge like a binary counter: 100 = 0b1100100
        assert s.info()["segments"] == 3
        np.testing.assert_array_equal(s.vectors(), x)
        assert len(list((path / "segments").iterdir())) == s.info()["segments"]


def test_large_add_streams_in_chunks_into_many_segments(path, monkeypatch):
    monkeypatch.setattr(store_mod, "_CHUNK_BYTES", 3 * 16 * 4)
    x = vecs(100).astype(np.float64)  # converted chunk by chunk
    with VectorStore(path, _max_segment_bytes=SMALL) as s:
        s.add(ids_of(100), x)
        assert s.info()["segments"] == 15
        np.testing.assert_array_equal(s.vectors(), x.astype(np.float32))
        s.verify()


def test_memmap_input_and_vectors_view(path, tmp_path):
    x = vecs(50)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mm[:] = x
    with VectorStore(path) as s:
        s.add(ids_of(50), mm)
        v = s.vectors()
        assert isinstance(v, np.memmap) and not v.flags.writeable
        np.testing.assert_array_equal(v, x)
        s.delete(["r1"])
        v = s.vectors()
        assert not v.flags.writeable and v.shape == (49, 16)


def test_closed_store_refuses_work(path):
    s = VectorStore(path)
    s.close()
    s.close()
    assert "closed" in repr(s)
    with pytest.raises(StoreError, match="closed"):
        len(s)
    with pytest.raises(StoreError, match="closed"):
        s.add(["a"], vecs(1))


def test_path_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        VectorStore(f)


# ----------------------------------------------------------------------------- search


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_search_equals_top_k_in_memory(path, metric, dtype):
    x = vecs(60)
    x[5] = 0.0  # a zero row
    x[11] = x[3]  # equal rows
    q = vecs(9, seed=1)
    q[0] = x[3]
    with VectorStore(path, metric=metric, dtype=dtype, _max_segment_bytes=SMALL * (2 if dtype == "float32" else 1)) as s:
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
    with VectorStore(path, metric="dot", dtype=dtype, _max_segment_bytes=9 * 6 * 4) as s:
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
    with VectorStore(path, _max_segment_bytes=SMALL) as s:
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
    with VectorStore(path, _max_segment_bytes=SMALL) as s:
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


def test_reader_refreshes_and_sees_only_committed_rows(path, monkeypatch):
    x = vecs(20)
    writer = VectorStore(path, _max_segment_bytes=SMALL)
    reader = VectorStore(path)
    writer.add(ids_of(10), x[:10])
    assert len(reader) == 10
    seen = []

    def spy(p):  # runs after the segments are in place, before the commit
        seen.append((len(reader), reader.ids(), reader.search(x[:2], k=20)[1].shape))
        real_fsync_dir(p)

    real_fsync_dir = store_mod._fsync_dir
    monkeypatch.setattr(store_mod, "_fsync_dir", spy)
    writer.add(ids_of(10, "q"), x[10:])
    assert seen == [(10, ids_of(10), (2, 10))]
    assert len(reader) == 20 and reader.ids()[-1] == "q9"
    writer.compact()
    np.testing.assert_array_equal(reader.vectors(), x)
    writer.close()
    reader.close()


# ----------------------------------------------------------------------------- pairs


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
    with VectorStore(tmp_path / "a", metric=metric, _max_segment_bytes=SMALL) as s, VectorStore(
        tmp_path / "b", metric=metric, _max_segment_bytes=SMALL
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
        left, right, scores = s.similar_pairs(thr, other=t)
        ref = brute_pairs([ids[i] for i in live], x[live], ["t0", "t1"], t.vectors(), threshold=thr, metric=metric)
        assert sorted(zip(left, right)) == sorted((a, b) for a, b, _ in ref)
        assert set(right) <= {"t0"}


def _borderline(ref, thr):
    return {(a, b) for a, b, sc in ref if abs(sc - thr) <= 1e-4}


def test_similar_pairs_checks_the_other_store(tmp_path):
    with VectorStore(tmp_path / "a", namespace="n1") as a, VectorStore(tmp_path / "b", namespace="n2") as b:
        a.add(["x"], vecs(1))
        b.add(["y"], vecs(1))
        with pytest.raises(NamespaceMismatchError, match="n1.*n2"):
            a.similar_pairs(0.5, other=b)
        with pytest.raises(InvalidInputTypeError):
            a.similar_pairs(0.5, other="b")
        with pytest.raises(InvalidInputTypeError):
            a.similar_pairs("high")
        left, right, _ = a.similar_pairs(0.5, other=a)
        assert list(left) == ["x"] and list(right) == ["x"]
    with VectorStore(tmp_path / "c", metric="dot") as c, VectorStore(tmp_path / "d") as d:
        c.add(["x"], vecs(1))
        d.add(["y"], vecs(1))
        with pytest.raises(ConfigurationError, match="metric"):
            c.similar_pairs(0.5, other=d)
    with VectorStore(tmp_path / "e") as e, VectorStore(tmp_path / "f") as f:
        e.add(["x"], vecs(1, 4))
        f.add(["y"], vecs(1, 5))
        with pytest.raises(DimensionMismatchError):
            e.similar_pairs(0.5, other=f)


# ----------------------------------------------------------------------------- texts


def test_add_texts_records_namespace_and_keeps_text(path, tmp_path):
    emb = ec.CachedEmbedder(ec.HashingEmbeddings(dimensions=32), cache=ec.EmbeddingCache(tmp_path / "cache"))
    texts = ["a red fox", "a red fox!", "stock markets fell"]
    with VectorStore(path) as s:
        with pytest.raises(InvalidInputError, match=r"metadata\[2\] holds another value .* under 'text'"):
            s.add_texts(texts, emb, metadata=[{"src": "x"}, None, {"text": "not the text"}])
        assert len(s) == 0
        ids = s.add_texts(texts, emb, metadata=[{"src": "x"}, None, {"text": texts[2]}])
        assert ids == [hashlib.sha256(t.encode()).hexdigest()[:32] for t in texts]
        assert s.namespace == emb.cache_namespace and s.model == emb.model and s.dim == 32
        assert s.metadata(ids) == [{"src": "x", "text": texts[0]}, {"text": texts[1]}, {"text": texts[2]}]
        np.testing.assert_allclose(s.get(ids), ec.HashingEmbeddings(dimensions=32).embed(texts))
        with pytest.raises(DuplicateIdError):
            s.add_texts(texts[:1], emb)
        s.add_texts(texts[:1], emb, upsert=True)
        s.add_texts(["more"], emb, ids=["mine"])
        assert len(s) == 4 and s.ids()[-2:] == [ids[0], "mine"]
        _, found = s.search(emb.embed(["a red fox"]), k=1)
        assert found[0, 0] == ids[0]
        with pytest.raises(NamespaceMismatchError, match="namespace"):
            s.add_texts(["x"], ec.HashingEmbeddings(dimensions=32, lowercase=False))
        with pytest.raises(DuplicateIdError):
            s.add_texts(["same", "same"], emb, ids=["twice", "twice"])
        with pytest.raises(InvalidInputTypeError, match="embedder"):
            s.add_texts(["x"], object())
        assert len(s) == 4


def test_add_texts_refuses_another_dimension(path):
    class Fake:
        cache_namespace = "fake|1"
        model = "fake"
        dimensions = None

        def embed(self, texts, *, on_batch=None):
            return np.ones((len(texts), 8), np.float32)

    with VectorStore(path, dim=4) as s:
        with pytest.raises(DimensionMismatchError, match="dimension 4, got dimension 8"):
            s.add_texts(["x"], Fake())
        assert len(s) == 0


# ----------------------------------------------------------------------------- damage


def _make(path, n=20):
    with VectorStore(path, _max_segment_bytes=SMALL) as s:
        s.add(ids_of(n), vecs(n))
    return sorted((path / "segments").iterdir())


def test_truncated_segment_is_named(path):
    seg = _make(path)[1]
    with open(seg, "r+b") as f:
        f.truncate(seg.stat().st_size - 4)
    with pytest.raises(StoreCorruptedError, match=f"{seg.name}.*truncated"):
        VectorStore(path)


def test_longer_segment_is_named(path):
    seg = _make(path)[0]
    with open(seg, "ab") as f:
        f.write(b"\0" * 64)
    with pytest.raises(StoreCorruptedError, match=seg.name):
        VectorStore(path)


def test_missing_segment_is_named(path):
    seg = _make(path)[2]
    seg.unlink()
    with pytest.raises(StoreCorruptedError, match=f"{seg.name}.*missing"):
        VectorStore(path)


def test_length_disagreeing_with_database_is_named(path):
    seg = _make(path)[0]
    db = sqlite3.connect(path / "store.sqlite")
    db.execute("UPDATE segments SET nbytes = nbytes + 64 WHERE file LIKE ?", (f"%{seg.name}",))
    db.commit()
    db.close()
    with pytest.raises(StoreCorruptedError, match=seg.name):
        VectorStore(path)


def test_unknown_format_version(path):
    _make(path)
    db = sqlite3.connect(path / "store.sqlite")
    db.execute("UPDATE settings SET value = 99 WHERE key = 'format_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreCorruptedError, match="store.sqlite.*unknown format version 99"):
        VectorStore(path)


def test_garbage_database(path):
    path.mkdir()
    (path / "store.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(StoreCorruptedError, match="store.sqlite"):
        VectorStore(path)


def test_verify_catches_flipped_bytes(path):
    seg = _make(path)[1]
    with VectorStore(path) as s:
        s.verify()
        data = bytearray(seg.read_bytes())
        data[10] ^= 0xFF
        seg.write_bytes(bytes(data))
        with pytest.raises(StoreCorruptedError, match=f"{seg.name}.*checksum"):
            s.verify()


def test_orphan_files_are_ignored_then_removed(path):
    _make(path)
    orphan = path / "segments" / "000999.vec"
    orphan.write_bytes(b"\1" * 64)
    tmp = path / "segments" / "001000.vec.tmp"
    tmp.write_bytes(b"\1" * 10)
    other = path / "segments" / "notes.txt"
    other.write_text("kept")
    with VectorStore(path) as s:
        assert len(s) == 20 and s.verify()["segments"] == 3
        assert orphan.exists()
        s.add(["new"], vecs(1))
        assert not orphan.exists() and not tmp.exists() and other.exists()


# ----------------------------------------------------------------------------- locking

HOLDER = textwrap.dedent(
    """
    import sys, time
    from embedcache.store import VectorStore
    s = VectorStore(sys.argv[1])
    with s._locked():
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def _hold_lock(path, seconds):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_fails_or_waits_as_asked(path):
    VectorStore(path).close()
    holder = _hold_lock(path, 1.5)
    try:
        t0 = time.monotonic()
        with VectorStore(path, lock_timeout=0) as s:
            with pytest.raises(StoreLockedError, match="write.lock"):
                s.add(["a"], vecs(1))
            assert time.monotonic() - t0 < 1.2
            assert len(s) == 0  # readers need no lock
        with VectorStore(path, lock_timeout=0.2) as s:
            with pytest.raises(StoreLockedError, match="0.2 s"):
                s.delete(["x"])
        with VectorStore(path) as s:  # waits for the lock
            s.add(["a"], vecs(1))
            assert time.monotonic() - t0 >= 1.0
            assert s.ids() == ["a"]
    finally:
        holder.wait(10)


def test_large_add_has_bounded_memory(path, tmp_path, monkeypatch):
    import tracemalloc

    monkeypatch.setattr(store_mod, "_CHUNK_BYTES", 1 << 20)
    n, d = 5000, 512  # 20 MB of float64 on disk, 10 MB once converted to float32
    src = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float64, shape=(n, d))
    src[:] = np.random.default_rng(0).standard_normal((n, d))
    src.flush()
    ids = ids_of(n)
    with VectorStore(path, _max_segment_bytes=4 << 20) as s:
        tracemalloc.start()
        try:
            s.add(ids, src)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 6 << 20, f"peak {peak / 2**20:.1f} MiB while adding 10 MiB of vectors"
        assert s.info()["segments"] == 3
        np.testing.assert_array_equal(s.get(["r0", "r4999"]), src[[0, -1]].astype(np.float32))


def test_add_texts_embeds_in_chunks_and_commits_once(path, monkeypatch):
    monkeypatch.setattr(store_mod, "_EMBED_CHUNK", 3)
    calls = []

    class Counting:
        cache_namespace = "count|1"
        model = "count"
        dimensions = 4

        def embed(self, texts, *, on_batch=None):
            calls.append(len(texts))
            if len(calls) == 3 and fail:
                raise RuntimeError("service down")
            return np.ones((len(texts), 4), np.float32) * len(calls)

    texts = [f"t{i}" for i in range(8)]
    with VectorStore(path) as s:
        fail = True
        with pytest.raises(RuntimeError, match="service down"):
            s.add_texts(texts, Counting())
        assert len(s) == 0 and s.namespace is None  # nothing of the failed call was kept
        fail = False
        calls.clear()
        generation = s.info()["generation"]
        s.add_texts(texts, Counting())
        assert calls == [3, 3, 2] and len(s) == 8
        assert s.info()["generation"] == generation + 1
        assert s.namespace == "count|1"


def test_ids_may_be_a_numpy_array_of_strings(path):
    with VectorStore(path) as s:
        s.add(np.array(["a", "b"]), vecs(2))
        s.delete(np.array(["a"]))
        assert s.ids() == ["b"] and type(s.ids()[0]) is str
        with pytest.raises(InvalidInputTypeError, match=r"ids\[1\] must be a str"):
            s.add(["c", 5], vecs(2))


def test_snapshot_is_ids_vectors_and_metadata_of_one_state(path):
    with VectorStore(path, _max_segment_bytes=SMALL) as s:
        x = vecs(20)
        s.add(ids_of(20), x, metadata=[{"k": i} if i % 3 else None for i in range(20)])
        s.delete(["r2", "r11"])
        s.add(["r5"], vecs(1, seed=9), metadata=[{"k": "new"}], upsert=True)
        ids, y, meta = s.snapshot()
        assert ids == s.ids()
        np.testing.assert_array_equal(y, s.vectors())
        assert meta == s.metadata(ids)
        assert not y.flags.writeable


def test_add_texts_records_base_url_and_dimensions(path):
    emb = ec.OpenAIEmbeddings("m", base_url="http://localhost:9/v1", api_key="k", dimensions=8)
    with VectorStore(path) as s:
        assert s.info()["base_url"] is None and s.info()["dimensions"] is None
        s.add_texts(["a"], _FixedEmbedder(emb))
        assert s.info()["base_url"] == "http://localhost:9/v1" and s.info()["dimensions"] == 8
    with VectorStore(path) as s:
        assert s.info()["base_url"] == "http://localhost:9/v1"


class _FixedEmbedder:
    """Takes the settings of ``inner`` (an embedder never asked for vectors) and returns ones."""

    def __init__(self, inner):
        self.embedder = inner
        self.cache_namespace = inner.cache_namespace
        self.model = inner.model
        self.dimensions = inner.dimensions

    def embed(self, texts, *, on_batch=None):
        return np.ones((len(texts), 8), dtype=np.float32)


# ----------------------------------------------------------------------------- durability, failure paths


class _Widths:
    """An embedder whose n-th call returns vectors of width ``widths[n]`` (the last one repeats)."""

    cache_namespace = "widths|1"
    model = "widths"
    dimensions = None

    def __init__(self, *widths, nan_at=None):
        self.widths = widths
        self.calls = 0
        self.nan_at = nan_at

    def embed(self, texts, *, on_batch=None):
        d = self.widths[min(self.calls, len(self.widths) - 1)]
        self.calls += 1
        y = np.ones((len(texts), d), np.float32)
        if self.nan_at is not None and self.calls == self.nan_at[0]:
            y[self.nan_at[1], 0] = np.nan
        return y


def test_add_texts_checks_the_width_of_every_chunk(path, monkeypatch):
    monkeypatch.setattr(store_mod, "_EMBED_CHUNK", 3)
    with VectorStore(path, dim=4) as s:
        with pytest.raises(DimensionMismatchError, match="dimension 4, got dimension 8"):
            s.add_texts([f"t{i}" for i in range(8)], _Widths(4, 8))
        assert len(s) == 0
    with VectorStore(path) as s:  # still readable
        s.add_texts(["a", "b"], _Widths(4))
        assert len(s) == 2 and s.verify()["live"] == 2


def test_segment_length_is_checked_before_it_is_registered(path, monkeypatch):
    with VectorStore(path) as s:
        s.add(["a"], vecs(1))
        real = s._write_segment

        def short(w, seg, chunks, stop):
            nbytes, crc = real(w, seg, chunks, stop)
            return nbytes - 4, crc

        monkeypatch.setattr(s, "_write_segment", short)
        with pytest.raises(StoreError, match="bytes"):
            s.add(["b"], vecs(1))
    with VectorStore(path) as s:
        assert s.ids() == ["a"] and s.verify()["segments"] == 1


def test_non_finite_row_number_counts_earlier_chunks(path, monkeypatch):
    monkeypatch.setattr(store_mod, "_EMBED_CHUNK", 3)
    with VectorStore(path) as s:
        with pytest.raises(InvalidInputError, match="row 4 is not"):
            s.add_texts([f"t{i}" for i in range(8)], _Widths(4, nan_at=(2, 1)))
    monkeypatch.setattr(store_mod, "_CHUNK_BYTES", 3 * 16 * 8)  # three float64 rows per slice
    x = vecs(10).astype(np.float64)
    x[7, 3] = np.inf
    with VectorStore(path) as s:
        with pytest.raises(InvalidInputError, match="row 7 is not"):
            s.add(ids_of(10), x)


@pytest.mark.parametrize("damage", ["missing", "empty"])
def test_lost_database_is_not_replaced_by_an_empty_store(path, damage):
    segs = _make(path)
    db = path / "store.sqlite"
    if damage == "missing":
        db.unlink()
    else:
        db.write_bytes(b"")
    with pytest.raises(StoreCorruptedError, match="store.sqlite"):
        VectorStore(path)
    assert all(p.exists() for p in segs)


def test_database_without_segments_but_with_a_log_is_refused(path):
    path.mkdir()
    (path / "store.sqlite-wal").write_bytes(b"\1" * 32)
    with pytest.raises(StoreCorruptedError, match="store.sqlite"):
        VectorStore(path)


class _InterruptAfterCommit:
    """Connection wrapper raising KeyboardInterrupt right after a write transaction commits."""

    def __init__(self, conn):
        self._c = conn
        self._writing = False

    def __getattr__(self, name):
        return getattr(self._c, name)

    def execute(self, sql, *args):
        out = self._c.execute(sql, *args)
        if sql == "BEGIN IMMEDIATE":
            self._writing = True
        elif sql == "COMMIT" and self._writing:
            self._writing = False
            raise KeyboardInterrupt
        return out


def test_interrupt_after_commit_keeps_the_committed_segments(path):
    with VectorStore(path, _max_segment_bytes=SMALL) as s:
        s.add(ids_of(3), vecs(3))
        real = s._wconn
        s._wconn = _InterruptAfterCommit(real)
        with pytest.raises(KeyboardInterrupt):
            s.add(ids_of(12, "n"), vecs(12, seed=1))
        s._wconn = real
    with VectorStore(path) as s:
        assert len(s) == 15 and s.verify()["live"] == 15
        np.testing.assert_array_equal(s.get(["n11"]), vecs(12, seed=1)[11:])


def test_compact_does_not_wait_for_readers(path):
    with VectorStore(path, _max_segment_bytes=SMALL) as s:
        s.add(ids_of(20), vecs(20))
        s.delete(["r3"])
        reader = sqlite3.connect(path / "store.sqlite")
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM rows").fetchone()  # holds a read snapshot
        statements = []
        s._wconn.set_trace_callback(statements.append)
        s._conn.set_trace_callback(statements.append)
        s.compact()
        reader.rollback()
        reader.close()
        assert any("wal_checkpoint(PASSIVE)" in x for x in statements)
        assert not any("TRUNCATE" in x for x in statements)
        assert len(s) == 19 and s.verify()["rows"] == 19


def test_search_memory_is_bounded_by_the_output(path):
    import tracemalloc

    n_seg = 40
    with VectorStore(path, _max_segment_bytes=SMALL) as s:
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


def test_readers_are_not_blocked_by_a_write_in_another_thread(path):
    import threading

    inside, release = threading.Event(), threading.Event()

    class Slow:
        cache_namespace = "slow|1"
        model = "slow"
        dimensions = 16

        def embed(self, texts, *, on_batch=None):
            inside.set()
            release.wait(30)
            return vecs(len(texts))

    with VectorStore(path) as s:
        s.add(["a"], vecs(1), metadata=[{"x": 1}])
        writer = threading.Thread(target=s.add_texts, args=(["t"], Slow()))
        writer.start()
        try:
            assert inside.wait(10)
            got = []
            reader = threading.Thread(
                target=lambda: got.append((len(s), s.ids(), s.search(vecs(1), k=1)[1].tolist())), daemon=True
            )
            reader.start()
            reader.join(10)
            assert got == [(1, ["a"], [["a"]])], "a reader waited for the writer"
        finally:
            release.set()
            writer.join(30)
        assert len(s) == 2


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
        real = store._reading

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

        store._reading = reading

    wrap(a)
    wrap(b)
    results = []
    threads = [
        threading.Thread(target=lambda x=x, y=y: results.append(len(x.similar_pairs(-1.0, other=y)[0])), daemon=True)
        for x, y in ((a, b), (b, a))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert results == [25, 25], "similar_pairs(other=) deadlocked"
    a.close()
    b.close()


def test_fsync_order_file_rename_directory_commit(path, monkeypatch):
    import os as _os

    events = []
    real_fsync, real_replace = _os.fsync, _os.replace

    def fsync_dir(p):
        events.append(("dir", p))
        fd = _os.open(p, _os.O_RDONLY)
        try:
            real_fsync(fd)  # not through the recording os.fsync below
        finally:
            _os.close(fd)

    monkeypatch.setattr(store_mod, "_fsync_dir", fsync_dir)
    parent = path.parent / "new"
    with VectorStore(parent / "store") as s:
        assert ("dir", parent.parent) in events and ("dir", parent) in events and ("dir", parent / "store") in events
        events.clear()
        monkeypatch.setattr(_os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
        monkeypatch.setattr(_os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
        s._wconn.set_trace_callback(lambda sql: events.append("commit") if sql == "COMMIT" else None)
        s.add(ids_of(3), vecs(3))
        s._wconn.set_trace_callback(None)
    assert events == ["fsync", "replace", ("dir", parent / "store" / "segments"), "commit"], events


def test_damaged_next_segment_never_overwrites_a_committed_file(path):
    _make(path)
    db = sqlite3.connect(path / "store.sqlite")
    db.execute("UPDATE settings SET value = 1 WHERE key = 'next_segment'")
    db.commit()
    db.close()
    with VectorStore(path, _max_segment_bytes=SMALL) as s:
        with pytest.raises(StoreCorruptedError, match="next_segment"):
            s.verify()
        s.add(["new"], vecs(1, seed=5))
        assert s.verify()["live"] == 21
        np.testing.assert_array_equal(s.get(["r0", "r19", "new"]), np.vstack([vecs(20)[[0, 19]], vecs(1, seed=5)]))


def test_metadata_keys_must_be_strings(path):
    with VectorStore(path) as s:
        with pytest.raises(InvalidInputError, match=r"metadata\[1\].*key.*1"):
            s.add(ids_of(2), vecs(2), metadata=[{"a": 1}, {1: "x"}])
        with pytest.raises(InvalidInputError, match=r"metadata\[0\].*key"):
            s.add(ids_of(1), vecs(1), metadata=[{"a": {2: "x"}}])
        assert len(s) == 0


class _CountingEmbedder:
    """Hashing vectors; counts the texts it was asked to embed."""

    def __init__(self, dim=16):
        self.inner = ec.HashingEmbeddings(dimensions=dim)
        self.cache_namespace = self.inner.cache_namespace
        self.model = self.inner.model
        self.seen = 0

    def embed(self, texts, *, on_batch=None):
        self.seen += len(texts)
        return self.inner.embed(texts)


def test_default_ids_hash_the_text_and_number_its_repeats(path):
    texts = ["one", "two", "one", "one"]
    ids = store_mod.text_ids(texts)
    first = hashlib.sha256(b"one").hexdigest()[:32]
    assert ids == [first, hashlib.sha256(b"two").hexdigest()[:32], first + "-2", first + "-3"]
    emb = _CountingEmbedder()
    with VectorStore(path) as s:
        assert s.add_texts(texts, emb) == ids
        assert [m["text"] for m in s.metadata(ids)] == texts
        emb.seen = 0
        with pytest.raises(DuplicateIdError, match=repr(first)):
            s.add_texts(["three", "one"], emb)  # the same text again: caught, before any embedding
        assert emb.seen == 0 and len(s) == 4
        s.add_texts(["one"], emb, upsert=True)
        assert len(s) == 4 and s.ids()[-1] == first


def test_lone_surrogates_in_texts_and_metadata_round_trip(path):
    text = "truncated tweet \ud83d"
    meta = {"note": "x \udc00 y", "nested": ["\ud800", {"k": "é"}]}
    with VectorStore(path) as s:
        ids = s.add_texts([text, "plain é"], _CountingEmbedder(), metadata=[meta, None])
        # one rule with the cache: UTF-8 with lone surrogates passed through
        assert ids[0] == hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        s.add(["v"], vecs(1), metadata=[meta])
    with VectorStore(path) as s:
        assert s.metadata(ids) == [{**meta, "text": text}, {"text": "plain é"}]
        assert s.snapshot()[2][2] == meta
        assert s.verify()["live"] == 3
        # an id is a key SQLite keeps as UTF-8: one with a lone surrogate is refused
        with pytest.raises(InvalidInputError, match=r"ids\[1\] must be Unicode text without lone surrogates"):
            s.add(["w", "w\ud83d"], vecs(2))
        assert len(s) == 3 and s.ids() == [*ids, "v"]


def test_text_key_keeps_every_metadata_field(path):
    rows = [{"id": "a", "text": "a summary", "body": "the body of a"}, {"id": "b", "body": "the body of b"}]
    bodies = [r["body"] for r in rows]
    emb = _CountingEmbedder()
    with VectorStore(path) as s:
        assert s.text_key == "text"
        s.add_texts(bodies, emb, ids=["a", "b"], metadata=rows, text_key="body")
        assert s.metadata(["a", "b"]) == rows  # nothing overwritten, nothing added
        with pytest.raises(ConfigurationError, match="'body'.*text_key='text'"):
            s.add_texts(["c"], emb, ids=["c"], text_key="text")
        s.add_texts(["the body of c"], emb, ids=["c"], metadata=[{"text": "own"}])
        assert s.metadata(["c"]) == [{"text": "own", "body": "the body of c"}]
        res = ec.deduplicate(s, threshold=0.99)
        assert res.texts == [*bodies, "the body of c"]
    with VectorStore(path) as s:
        assert s.text_key == "body" and s.info()["text_key"] == "body"
        s.delete(["a", "b", "c"])
        s.add_texts(["fresh"], emb, ids=["d"], text_key="content")  # an empty store takes another key
        assert s.text_key == "content" and s.metadata(["d"]) == [{"content": "fresh"}]
