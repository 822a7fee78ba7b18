"""The store's persisted partition index: exact when every cell is probed, the recall it
promises, changes after the build, float16, damage, and kills during the build."""

from __future__ import annotations

import signal
import tempfile
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import store_crash_worker as cw
from support.stores import ids_of
from support.strategies import matrices

import embedcache as ec
from embedcache import _config
from embedcache.errors import InvalidInputError, StoreCorruptedError
from tests.test_index import clustered


def _exact_and_full(store, q, k):
    es, ei = store.search(q, k, exact=True)
    fs, fi = store.search(q, k, recall=1.0)
    return (es, ei), (fs, fi)


def _assert_same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=matrices(max_rows=40, min_rows=1, max_dim=5), cells=st.integers(1, 9), k=st.integers(1, 12),
       dtype=st.sampled_from(["float32", "float16"]), metric=st.sampled_from(["cosine", "dot"]),
       changes=st.integers(0, 3), seed=st.integers(0, 3))
def test_every_cell_probed_equals_exact_bit_for_bit(x, cells, k, dtype, metric, changes, seed):
    x = np.clip(x, -1000, 1000)
    n = len(x)
    with tempfile.TemporaryDirectory() as d, _config.override(
        INDEX_MIN_CELL=1, MAX_SEGMENT_BYTES=7 * x.shape[1] * 4, INDEX_STALE_FRACTION=100
    ):
        store = ec.VectorStore(d, dtype=dtype, metric=metric)
        store.add(ids_of(n), x)
        store.create_index(cells=cells, seed=seed)
        if changes:  # a few rows deleted and added after the build (the stale limit raised)
            store.delete([f"r{i}" for i in range(0, n, 9)][:changes])
            m = min(changes, n)
            store.add(ids_of(m, "new"), x[:m][::-1] * 2)
        q = np.concatenate([x[: min(n, 6)], np.zeros((1, x.shape[1]), np.float32)])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # not stale: the index is used
            exact, full = _exact_and_full(store, q, k)
        _assert_same(exact, full)
        store.close()


def test_default_recall_on_a_clustered_set_reaches_the_target(tmp_path):
    x = clustered(12_000, d=24, clusters=80, noise=0.6, seed=3)
    q = clustered(12_400, d=24, clusters=80, noise=0.6, seed=3)[12_000:]  # other points, same centres
    with ec.VectorStore(tmp_path / "s") as store:
        store.add(ids_of(len(x)), x)
        info = store.create_index(seed=0)
        assert info["rows"] == len(x) and info["cells"] > 50 and not info["stale"]
        probes = info["probes"][0.95]
        assert 1 <= probes < info["cells"] // 2  # the index prunes
        rec = info["recall"][0.95]
        assert rec["low"] <= rec["estimate"] <= rec["high"] and rec["low"] > 0.9
        _, exact = store.search(q, 10, exact=True)
        _, got = store.search(q, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)])
        assert recall >= 0.95, recall
        low_s, lower = store.search(q, 10, recall=0.8)
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(lower, exact)]) <= recall
        # an approximate answer may miss a neighbour, never invent one or misreport its score
        for t in range(0, len(q), 37):
            np.testing.assert_array_equal(low_s[t], ec.cosine_similarity(q[t : t + 1], store.get(list(lower[t])))[0])


def test_adds_and_deletes_after_the_build(tmp_path):
    x = clustered(3000, d=16, clusters=30, seed=1)
    with ec.VectorStore(tmp_path / "s") as store:
        store.add(ids_of(len(x)), x)
        store.create_index(seed=0)
        gone = [f"r{i}" for i in range(0, 3000, 20)]
        store.delete(gone)
        store.add(["r5", "r6"], -x[5:7], upsert=True)  # the old rows are deleted, new ones at the end
        fresh = clustered(100, d=16, clusters=30, seed=9) * 3
        store.add(ids_of(100, "new"), fresh)
        info = store.index_info()
        assert info["added_rows"] == 102 and info["deleted_rows"] == len(gone) + 2 and not info["stale"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            s, ids = store.search(np.concatenate([x[:300], fresh]), 5)
            _, found = store.search(-x[5:7], 1)
        flat = set(ids.ravel().tolist())
        assert not flat & set(gone)  # never a deleted id
        assert ids[300:, 0].tolist() == [f"new{i}" for i in range(100)]  # a new row is findable
        assert found[:, 0].tolist() == ["r5", "r6"]
        exact, full = _exact_and_full(store, x[:300], 7)
        _assert_same(exact, full)


def test_a_stale_index_is_reported_and_not_used(tmp_path):
    x = clustered(2000, d=16, clusters=20, seed=2)
    with ec.VectorStore(tmp_path / "s") as store:
        store.add(ids_of(1000), x[:1000])
        store.create_index(seed=0)
        store.add(ids_of(1000, "more"), x[1000:])
        assert store.index_info()["stale"] and store.info()["index"]["added_rows"] == 1000
        with pytest.warns(UserWarning, match="stale: 1000 rows added"):
            s, ids = store.search(x[:50], 10)
        es, ei = store.search(x[:50], 10, exact=True)
        np.testing.assert_array_equal(s, es)
        np.testing.assert_array_equal(ids, ei)
        store.create_index(seed=0)  # rebuilt: used again, the old files removed
        assert not store.index_info()["stale"] and store.index_info()["rows"] == 2000
        assert len(list((tmp_path / "s" / "index").iterdir())) == 9


def test_float16_store(tmp_path):
    x = clustered(2500, d=16, clusters=25, seed=4, dtype=np.float16)
    with ec.VectorStore(tmp_path / "s", dtype="float16") as store:
        store.add(ids_of(len(x)), x)
        info = store.create_index(seed=0)
        assert info["bytes"] > len(x) * 16 * 2  # the vectors are kept as float16
        exact, full = _exact_and_full(store, x[:200].astype(np.float32), 10)
        _assert_same(exact, full)
        _, got = store.search(x[:200], 10)
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact[1])]) >= 0.9


def test_where_and_info_verify_compact(tmp_path):
    x = clustered(1500, d=16, clusters=15, seed=5)
    with ec.VectorStore(tmp_path / "s") as store:
        assert store.index_info() is None and store.info()["index"] is None
        with pytest.raises(InvalidInputError, match="no live rows"):
            store.create_index()
        store.add(ids_of(len(x)), x, metadata=[{"odd": i % 2} for i in range(len(x))])
        store.create_index(cells=5000, seed=0)  # more cells than rows: as many as there can be
        assert store.index_info()["cells"] <= len(x)
        s, ids = store.search(x[:20], 5, where={"odd": 1})
        assert all(int(i[1:]) % 2 == 1 for i in ids.ravel())
        v = store.verify()
        assert v["index_bytes"] == store.index_info()["bytes"]
    with _config.override(MAX_SEGMENT_BYTES=16 * 4 * 400), ec.VectorStore(tmp_path / "s") as store:
        store.add(["late"], x[:1])  # a second segment: compact rewrites them, renumbering no row
        want = store.search(x[:20], 5)
        assert store.info()["segments"] == 2
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            store.compact()
        assert store.info()["segments"] == 4  # 1501 rows in segments of 400
        assert store.index_info() is not None and not store.index_info()["stale"]
        _assert_same(store.search(x[:20], 5), want)
        store.delete(["r1"])
        with pytest.warns(UserWarning, match="dropped its index"):
            store.compact()
        assert store.index_info() is None and "index_bytes" not in store.verify()
        assert list((tmp_path / "s" / "index").iterdir()) == []
        store.create_index(seed=0)


def test_verify_names_a_damaged_index_file(tmp_path):
    x = clustered(800, d=8, clusters=10, seed=6)
    with ec.VectorStore(tmp_path / "s") as store:
        store.add(ids_of(len(x)), x)
        store.create_index()
        vec = next((tmp_path / "s" / "index").glob("*.vec"))
        data = bytearray(vec.read_bytes())
        data[100] ^= 0xFF
        vec.write_bytes(bytes(data))
        with pytest.raises(StoreCorruptedError, match=r"\.vec: checksum"):
            store.verify()
        vec.unlink()
        with pytest.raises(StoreCorruptedError, match="index file is missing"):
            store.verify()


def _seeded(path):
    x = clustered(600, d=8, clusters=12, seed=7)
    with ec.VectorStore(path, metric="dot") as s:  # the crash worker opens stores with metric="dot"
        s.add(ids_of(300), x[:300], [{"v": 0}] * 300)
        s.create_index(seed=0)  # the old index the kill must leave intact
        s.add(ids_of(300, "b"), x[300:], [{"v": 0}] * 300)
        return s.index_info(), x


@pytest.mark.parametrize("stage", cw.STAGES)
def test_sigkill_during_the_build_leaves_the_old_index_or_the_new(tmp_path, stage):
    path = tmp_path / "s"
    old, x = _seeded(path)
    assert cw.kill_at_stage(str(path), stage, ("index",)) == -signal.SIGKILL
    with ec.VectorStore(path) as s:
        s.verify()
        info = s.index_info()
        if stage == "committed":
            assert info["rows"] == 600 and info["generation"] > old["generation"]
        else:
            assert info["rows"] == old["rows"] == 300 and info["generation"] == old["generation"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the old index is stale now: 300 rows added
            exact, full = _exact_and_full(s, x[:40], 5)
        _assert_same(exact, full)
        s.create_index(seed=0)  # the next build removes what the dead one left
        listed = {f.split("/")[-1] for f in [p.name for p in (path / "index").iterdir()]}
        assert len(listed) == 9 and s.verify()["index_bytes"] > 0


def test_another_handle_follows_a_rebuilt_index(tmp_path):
    x = clustered(1200, d=8, clusters=10, seed=8)
    with ec.VectorStore(tmp_path / "s") as a, ec.VectorStore(tmp_path / "s") as b:
        a.add(ids_of(len(x)), x)
        a.create_index(seed=0)
        first = b.search(x[:30], 5)  # b maps the first index
        a.add(ids_of(600, "more"), clustered(600, d=8, clusters=10, seed=9))
        a.create_index(seed=1)  # the first index's files are removed
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            exact, full = _exact_and_full(b, x[:30], 5)
        _assert_same(exact, full)
        assert b.index_info()["rows"] == 1800 and b.index_info()["seed"] == 1
        assert first[1].shape == (30, 5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=matrices(max_rows=60, min_rows=2, max_dim=6), cells=st.integers(1, 9), k=st.integers(1, 12),
       probes_recall=st.sampled_from([0.5, 0.9, 1.0]), dtype=st.sampled_from(["float32", "float16"]),
       metric=st.sampled_from(["cosine", "dot"]), dead=st.integers(0, 5), seed=st.integers(0, 3))
def test_one_query_at_a_time_equals_the_batch_bit_for_bit(x, cells, k, probes_recall, dtype, metric, dead, seed):
    # a few queries rank their cells in a compiled pass, a batch through top_k; one thread's
    # scan or several threads' shares: the same answer
    x = np.clip(x, -1000, 1000)
    n = len(x)
    with tempfile.TemporaryDirectory() as d, _config.override(
        INDEX_MIN_CELL=1, INDEX_STALE_FRACTION=100, STORE_INDEX_FEW_QUERIES=4
    ):
        store = ec.VectorStore(d, dtype=dtype, metric=metric)
        store.add(ids_of(n), x)
        store.create_index(cells=cells, seed=seed)
        store.delete([f"r{i}" for i in range(1, n, 5)][:dead])  # masked, never returned
        q = np.concatenate([x[::-1], np.zeros((1, x.shape[1]), np.float32)])[:12]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with _config.override(STORE_INDEX_SHARE_ROWS=1):  # cut in shares, one per thread
                batch = store.search(q, k, recall=probes_recall)
            alone = [store.search(v, k, recall=probes_recall) for v in q]  # one share each
        np.testing.assert_array_equal(batch[0], np.concatenate([a[0] for a in alone]))
        np.testing.assert_array_equal(batch[1], np.concatenate([a[1] for a in alone]))
        store.close()


def _probe_both(store, q, k, recall):
    """(through the codes, over the same cells scored exactly) of ``store``'s index."""
    from embedcache.store import _index
    from embedcache.store._probe import probe

    with store._txn.reading() as v:
        desc, loaded = _index.usable(store.path, v, store._index_maps)
        p = _index.probes_for(desc, recall)
        args = (q, loaded.centroids, p, loaded.offsets, loaded.vectors, loaded.rows, k, v.metric, None)
        assert loaded.codes is not None
        return probe(*args, codes=loaded.codes, inv_c=loaded.inv_c), probe(*args, inv_c=loaded.inv_c)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=matrices(max_rows=60, min_rows=2, max_dim=6), cells=st.integers(2, 9), k=st.integers(1, 8),
       dtype=st.sampled_from(["float32", "float16"]), metric=st.sampled_from(["cosine", "dot"]),
       shortlist=st.integers(1, 12), wide=st.integers(1, 30), seed=st.integers(0, 3))
@example(x=np.float32([[0.0], [-1.0], [1e-45]]), cells=2, k=1, dtype="float32", metric="cosine", shortlist=1,
         wide=1, seed=0)  # a query of length 2**-149: scaled for its estimates without overflow
def test_codes_shortlist_scores_exactly_and_holds_every_probed_row_when_long_enough(
        x, cells, k, dtype, metric, shortlist, wide, seed):
    x = np.clip(x, -1000, 1000)
    n = len(x)
    q = np.concatenate([x[::-1], np.zeros((1, x.shape[1]), np.float32)])[:10].astype(np.float32)
    with tempfile.TemporaryDirectory() as d, _config.override(INDEX_MIN_CELL=1):
        store = ec.VectorStore(d, dtype=dtype, metric=metric)
        store.add(ids_of(n), x)
        store.create_index(cells=cells, seed=seed)
        kk = min(k, n)
        for first in (0, n + 1):  # the 8-bit codes alone; the 1-bit codes first, every row kept
            with _config.override(STORE_INDEX_SHORTLIST=n, STORE_INDEX_SHORTLIST_PER_K=1,
                                  STORE_INDEX_SIGN_SHORTLIST=first, STORE_INDEX_SIGN_SHORTLIST_PER_K=0,
                                  STORE_INDEX_SIGN_SHORTLIST_SHARE=0):
                (cs, ci), (fs, fi) = _probe_both(store, q, kk, 0.5)
            np.testing.assert_array_equal(cs, fs)  # every probed row shortlisted: the exact scan's answer
            np.testing.assert_array_equal(ci, fi)
        with _config.override(STORE_INDEX_SHORTLIST=shortlist, STORE_INDEX_SHORTLIST_PER_K=0,
                              STORE_INDEX_SIGN_SHORTLIST=shortlist + wide, STORE_INDEX_SIGN_SHORTLIST_PER_K=0,
                              STORE_INDEX_SIGN_SHORTLIST_SHARE=0):
            (cs, ci), (fs, fi) = _probe_both(store, q, kk, 0.5)
        xs = store.get([f"r{i}" for i in range(n)]).astype(np.float32)
        exact = ec.cosine_similarity(q, xs) if metric == "cosine" else ec.dot_similarity(q, xs)
        for t in range(len(q)):
            got = ci[t][ci[t] >= 0]
            assert len(got) == min(kk, max(shortlist, kk), (fi[t] >= 0).sum())
            np.testing.assert_array_equal(cs[t][: len(got)], exact[t, got])  # exact scores, never estimates
            assert set(got) <= set(_probed_rows(store, q[t : t + 1], 0.5))
        store.close()


def _probed_rows(store, q, recall):
    from embedcache.store import _index
    from embedcache.store._nearest import nearest_cells

    with store._txn.reading() as v:
        desc, loaded = _index.usable(store.path, v, store._index_maps)
        near = nearest_cells(q, loaded.centroids, _index.probes_for(desc, recall))[0]
        return np.concatenate([loaded.rows[loaded.offsets[c] : loaded.offsets[c + 1]] for c in near])


@settings(max_examples=40, deadline=None)
@given(x=matrices(max_rows=30, min_rows=1, max_dim=8), seed=st.integers(0, 5), energy=st.sampled_from([0.5, 1.0]))
def test_a_code_holds_its_offset_within_half_a_step_in_the_directions_kept(x, seed, energy):
    from embedcache.store._codes import code_basis, encode, residuals

    x = np.clip(x, -1000, 1000).astype(np.float32)
    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(3, x.shape[1])).astype(np.float32)
    cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-30)
    cell = rng.integers(0, 3, len(x))
    resid, _ = residuals(x, cent, cell)
    basis = code_basis(resid.T.astype(np.float64) @ resid, energy)
    d, m = basis.shape
    np.testing.assert_allclose(basis.T @ basis, np.eye(m), atol=1e-5)  # orthonormal directions
    assert m == d or (m % 16 == 0 and m < d)
    if energy == 1.0:
        assert m == d
    for cosine in (True, False):
        codes, fac = encode(x, cent, cell, cosine, basis)
        norm = np.linalg.norm(x.astype(np.float64), axis=1)
        unit = np.divide(x, norm[:, None], out=np.zeros(x.shape), where=norm[:, None] > 0)
        kept = (unit - cent[cell]) @ basis.astype(np.float64)
        step = fac[:, :1].astype(np.float64)
        assert np.all(np.abs(kept - step * codes) <= 0.5 * step + 1e-6)
        np.testing.assert_allclose(fac[:, 1], 1.0 if cosine else norm, rtol=1e-6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.data_too_large, HealthCheck.too_slow])
@given(x=matrices(max_rows=130, min_rows=1, max_dim=40), seed=st.integers(0, 5),
       energy=st.sampled_from([0.5, 1.0]), cosine=st.booleans())
def test_the_one_bit_estimate_is_the_signs_against_the_query_in_4_bits(x, seed, energy, cosine):
    from embedcache.kernels._core import _NO_INDEX
    from embedcache.store._codes import (QUERY_BITS, SIGN_BLOCK, code_basis, encode_signs, query_planes, residuals, spin,
                                         words_for)
    from embedcache.store._probe import _fold_signs

    x = np.clip(x, -1000, 1000).astype(np.float32)
    n, d = x.shape
    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(1, d)).astype(np.float32)
    cent /= max(float(np.linalg.norm(cent)), 1e-30)
    cell = np.zeros(n, np.int64)
    resid, inv = residuals(x, cent, cell)
    axes = spin(code_basis(resid.T.astype(np.float64) @ resid, energy), seed)
    m = axes.shape[1]
    np.testing.assert_allclose(axes.T.astype(np.float64) @ axes, np.eye(m), atol=1e-5)  # still orthonormal
    blocked, sfac = encode_signs(x, cent, cell, cosine, axes)
    w = words_for(m)
    assert blocked.shape == (-(-n // 64), w, 64) and blocked.dtype == np.uint64 and sfac.shape == (-(-n // 64), 3, 64)
    per_row = np.ascontiguousarray(blocked.transpose(0, 2, 1).reshape(-1, w))  # word t of row j: [j // 64, t, j % 64]
    assert not per_row[n:].any()  # rows past the last: clear
    bits = np.unpackbits(per_row[:n].view(np.uint8), axis=1, bitorder="little")
    r = resid.astype(np.float64) @ axes
    np.testing.assert_array_equal(bits[:, :m], r >= 0)  # bit t: the sign in direction t
    assert not bits[:, m:].any()
    q = (rng.normal(size=(3, d)) * rng.choice([1e-3, 1.0, 1e3])).astype(np.float32)
    turned = q @ axes
    planes, terms = query_planes(turned, w)
    levels = sum(np.unpackbits(planes[:, b].view(np.uint8), axis=-1, bitorder="little")[:, :m].astype(np.int64)
                 << b for b in range(QUERY_BITS))
    low = turned.min(axis=1, keepdims=True)
    step = terms[:, :1] / 2.0
    assert levels.max() < 2**QUERY_BITS
    assert np.all(np.abs(low + step * levels - turned) <= 0.5 * step * (1 + 1e-4))  # within half a level
    width = n + 2 * SIGN_BLOCK  # never full: every estimate kept
    bs = np.full((3, width), -np.inf, np.float32)
    bi = np.full((3, width), _NO_INDEX, np.int64)
    fill = np.zeros(3, np.int64)
    qc = (q @ cent[0]).astype(np.float32)
    j0 = int(rng.integers(0, n))  # rows from the middle of a block too
    _fold_signs(blocked, sfac, j0, n, np.arange(n), np.zeros(0, np.int64), False, np.arange(3), qc, planes, terms,
                bs, bi, fill, np.full(3, -np.inf, np.float32), np.full(3, _NO_INDEX, np.int64), width)
    assert np.all(fill == n - j0)
    got = np.full((3, n), np.nan)
    for t in range(3):
        got[t, bi[t, : fill[t]]] = bs[t, : fill[t]]
    got = got[:, j0:]
    gain = np.ones(n) if cosine else np.linalg.norm(x.astype(np.float64), axis=1)
    l1 = np.abs(r).sum(axis=1)
    f = np.divide((r * r).sum(axis=1), l1, out=np.zeros(n), where=l1 > 0)
    signed = np.where(bits[:, :m] > 0, 1.0, -1.0)
    want = gain[None, :] * qc[:, None].astype(np.float64) + (gain * f)[None, :] * ((low + step * levels) @ signed.T)
    size = gain[None, :] * (np.abs(qc)[:, None] + f[None, :] * np.abs(turned).sum(axis=1, keepdims=True) * 2)
    np.testing.assert_allclose(got, want[:, j0:], rtol=0, atol=1e-4 * float(size.max()) + 1e-30)


@settings(max_examples=60, deadline=None)
@given(a=st.lists(st.sampled_from([-1.0, 0.0, 2.0]) | st.floats(-5, 5, width=32), min_size=1, max_size=50),
       data=st.data())
def test_the_kth_highest_is_the_sorted_value(a, data):
    from embedcache.store._select import _kth_highest

    x = np.array(a, np.float32)
    kth = data.draw(st.integers(0, len(x) - 1))
    assert _kth_highest(x.copy(), kth) == np.sort(x)[::-1][kth]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), levels=st.sampled_from([1, 4, 10**6]), scale=st.sampled_from([1e-300, 1.0, 1e300]),
       seed=st.integers(0, 2**32 - 1), data=st.data())
def test_the_kth_highest_through_buckets_is_the_sorted_value(n, levels, scale, seed, data):
    from embedcache.store._select import _kth_of

    rng = np.random.default_rng(seed)
    a = rng.integers(0, levels, n) * scale - rng.integers(0, 2) * scale  # ties, and ranges near the limits
    kth = data.draw(st.integers(0, n - 1))
    before = a.copy()
    assert _kth_of(a, kth) == np.sort(a)[::-1][kth]
    np.testing.assert_array_equal(a, before)


@settings(max_examples=60, deadline=None)
@given(scores=st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0, 3.0]) | st.floats(-5, 5, width=32), min_size=2,
                       max_size=60), data=st.data())
def test_a_full_buffer_keeps_its_best_under_score_then_lower_index(scores, data):
    from embedcache.store._select import _keep_best

    n = len(scores)
    keep = data.draw(st.integers(1, n - 1))
    s = np.array(scores, np.float32)
    i = np.array(data.draw(st.permutations(range(100, 100 + n))), np.int64)
    want = np.lexsort((i, -s))[:keep]
    s2, i2 = s.copy(), i.copy()
    kept, bar, barj = _keep_best(s2, i2, n, keep)
    assert kept == keep
    assert set(i2[:keep]) == set(i[want])  # the best under (score descending, index ascending)
    assert (bar, barj) == (s[want[-1]], i[want[-1]])  # the worst of them
    np.testing.assert_array_equal(np.sort(s2[:keep]), np.sort(s[want]))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 5000), levels=st.sampled_from([3, 50, 100_000]), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_a_full_buffer_of_thousands_keeps_its_best_through_its_histogram(n, levels, seed, data):
    from embedcache.store._select import _keep_best

    # many entries: the buckets of the histogram decide, and ties (few levels) straddle them
    rng = np.random.default_rng(seed)
    s = (rng.integers(0, levels, n) * rng.choice([1e-30, 1e-3, 1.0, 1e30])).astype(np.float32)
    s[rng.random(n) < 0.05] = np.float32(rng.normal())  # a few outliers stretch the range
    keep = data.draw(st.integers(1, n + 2))  # more than there are: all of them
    i = rng.permutation(n).astype(np.int64) + 7
    want = np.lexsort((i, -s))[:keep]
    kept = min(keep, n)
    s2, i2 = s.copy(), i.copy()
    assert _keep_best(s2, i2, n, keep) == (kept, s[want[-1]], i[want[-1]])
    assert sorted(zip(s2[:kept].tolist(), i2[:kept].tolist())) == sorted(zip(s[want].tolist(), i[want].tolist()))


def test_a_nan_among_a_buffers_scores_stays_within_its_buckets():
    from embedcache.store._select import _keep_best

    # estimates are never NaN; if one were, the histogram must count it within itself (in
    # its lowest bucket): the best of the others are still the ones kept
    rng = np.random.default_rng(0)
    s = rng.normal(size=3000).astype(np.float32)
    s[[5, 700, 2999]] = np.nan
    i = np.arange(3000, dtype=np.int64)
    s2, i2 = s.copy(), i.copy()
    assert _keep_best(s2, i2, 3000, 1000)[0] == 1000
    finite = np.flatnonzero(~np.isnan(s))
    assert set(i2[:1000]) == set(finite[np.argsort(-s[finite], kind="stable")[:1000]])


@pytest.mark.parametrize("dead", [False, True])
def test_full_one_bit_buffers_hold_the_best_estimates_of_every_row(dead):
    from embedcache.kernels._core import _NO_INDEX
    from embedcache.store._codes import SIGN_BLOCK, code_basis, encode_signs, query_planes, residuals, spin
    from embedcache.store._probe import BUFFER_SPAN, _fold_signs

    # buffers far narrower than the rows: they fill and keep their best many times over,
    # and still hold every row that is among the best ``keep`` of all (deleted rows never)
    x = clustered(3000, d=48, clusters=4, noise=0.5, seed=5)
    n, d = x.shape
    cent = (x.mean(axis=0) / np.linalg.norm(x.mean(axis=0))).astype(np.float32)[None]
    cell = np.zeros(n, np.int64)
    resid, _ = residuals(x, cent, cell)
    axes = spin(code_basis(resid.T.astype(np.float64) @ resid, 0.9), 1)
    blocked, sfac = encode_signs(x, cent, cell, True, axes)
    q = x[:4] + np.float32(0.1)
    planes, terms = query_planes(q @ axes, blocked.shape[1])
    qc = (q @ cent[0]).astype(np.float32)
    deleted = np.arange(0, n, 7) if dead else np.zeros(0, np.int64)

    def fold(keep, width):
        bs = np.full((4, width), -np.inf, np.float32)
        bi = np.full((4, width), _NO_INDEX, np.int64)
        fill = np.zeros(4, np.int64)
        _fold_signs(blocked, sfac, 5, n, np.arange(n), deleted, dead, np.arange(4), qc, planes, terms, bs, bi, fill,
                    np.full(4, -np.inf, np.float32), np.full(4, _NO_INDEX, np.int64), keep)
        return [sorted(zip(bs[t, : fill[t]].tolist(), bi[t, : fill[t]].tolist()), key=lambda e: (-e[0], e[1]))
                for t in range(4)]

    every = fold(n, n + 2 * SIGN_BLOCK)
    keep = 150
    narrow = fold(keep, BUFFER_SPAN * keep + SIGN_BLOCK)
    for t in range(4):
        assert len(every[t]) == n - 5 - int(np.sum(deleted >= 5))  # all rows, less the deleted
        assert not {j for _, j in narrow[t]} & set(deleted.tolist())
        assert narrow[t][:keep] == every[t][:keep]


def test_one_bit_codes_first_keep_the_recall_of_the_8_bit_codes(tmp_path):
    x = clustered(12_000, d=128, clusters=60, noise=0.8, seed=3)
    q = clustered(12_200, d=128, clusters=60, noise=0.8, seed=3)[12_000:]
    with ec.VectorStore(tmp_path / "s") as store:
        store.add(ids_of(len(x)), x)
        store.create_index(cells=20, seed=0)
        rows = np.mean([len(_probed_rows(store, q[i : i + 1], 0.95)) for i in range(20)])
        with _config.override(STORE_INDEX_SIGN_SHORTLIST=0, STORE_INDEX_SIGN_SHORTLIST_PER_K=0,
                              STORE_INDEX_SIGN_SHORTLIST_SHARE=0):
            eight = store.search(q, 10, recall=0.95)
        with _config.override(STORE_INDEX_SIGN_SHORTLIST=0, STORE_INDEX_SIGN_SHORTLIST_PER_K=100,
                              STORE_INDEX_SIGN_SHORTLIST_SHARE=0):
            assert 1000 * 1.4 < rows  # the 1-bit shortlist leaves out a third of the probed rows
            both = store.search(q, 10, recall=0.95)
        # isotropic noise in 128 dimensions is the hard case for 1 bit (the planted near-duplicates
        # of real data stand out far more); the loss is measured at build time either way
        same = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(both[1], eight[1])])
        assert same >= 0.985, same


def test_the_one_bit_shortlist_grows_with_the_rows_the_probes_hold(tmp_path):
    x = clustered(3000, d=32, clusters=20, noise=0.8, seed=2)
    q = clustered(3050, d=32, clusters=20, noise=0.8, seed=2)[3000:]
    with ec.VectorStore(tmp_path / "s") as store:
        store.add(ids_of(len(x)), x)
        info = store.create_index(cells=30, seed=0)
        with _config.override(STORE_INDEX_SHORTLIST=20, STORE_INDEX_SHORTLIST_PER_K=0, STORE_INDEX_SIGN_SHORTLIST=0,
                              STORE_INDEX_SIGN_SHORTLIST_PER_K=0, STORE_INDEX_SIGN_SHORTLIST_SHARE=0):
            eight = store.search(q, 5, recall=0.9)  # the 8-bit codes alone
        base = dict(STORE_INDEX_SHORTLIST=20, STORE_INDEX_SHORTLIST_PER_K=0, STORE_INDEX_SIGN_SHORTLIST=21,
                    STORE_INDEX_SIGN_SHORTLIST_PER_K=0)
        with _config.override(**base, STORE_INDEX_SIGN_SHORTLIST_SHARE=info["cells"]):  # at least every row
            _assert_same(store.search(q, 5, recall=0.9), eight)
        with _config.override(**base, STORE_INDEX_SIGN_SHORTLIST_SHARE=0):  # 21 rows of each query's hundreds
            few = store.search(q, 5, recall=0.9)
        assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(few[1], eight[1])]) < 0.99


def _rewrite_index(root, rewrite):
    """Change the index of the store at ``root`` as ``rewrite(description)`` does (to what
    an older version wrote), in its committed setting."""
    import json
    import sqlite3

    con = sqlite3.connect(root / "store.sqlite")
    desc = json.loads(con.execute("SELECT value FROM settings WHERE key = 'index'").fetchone()[0])
    rewrite(desc)
    with con:
        con.execute("UPDATE settings SET value = ? WHERE key = 'index'", (json.dumps(desc),))
    con.close()


def _indexed(root, **search):
    """A store of 3000 clustered rows at ``root`` with its index; returns 50 queries like
    them and what ``store.search(queries, 5, **search)`` answers right after the build."""
    x = clustered(3000, d=32, clusters=20, noise=0.8, seed=2)
    q = clustered(3050, d=32, clusters=20, noise=0.8, seed=2)[3000:]
    with ec.VectorStore(root) as store:
        store.add(ids_of(len(x)), x)
        store.create_index(seed=0)
        return q, store.search(q, 5, **search)


def test_an_index_without_one_bit_codes_is_searched_with_the_8_bit_codes(tmp_path):
    with _config.override(STORE_INDEX_SIGN_SHORTLIST=0, STORE_INDEX_SIGN_SHORTLIST_PER_K=0,
                          STORE_INDEX_SIGN_SHORTLIST_SHARE=0):
        q, want = _indexed(tmp_path / "s", recall=0.9)

    def without_them(desc):  # as an index written before them
        old = [f for f in desc["files"] if f["file"].endswith((".srot", ".sign", ".sblk"))]
        assert len(old) == 3
        desc["files"] = [f for f in desc["files"] if f not in old]
        for f in old:
            (tmp_path / "s" / f["file"]).unlink()

    _rewrite_index(tmp_path / "s", without_them)
    with ec.VectorStore(tmp_path / "s") as store:
        got = store.search(q, 5, recall=0.9)
        store.verify()
    _assert_same(got, want)


def test_an_index_with_its_1_bit_factors_a_row_at_a_time_is_searched_the_same(tmp_path):
    import zlib

    # the factors were written (rows, 4) before they were kept in blocks of 64 rows
    q, want = _indexed(tmp_path / "s", recall=0.9)

    def a_row_at_a_time(desc):
        (entry,) = [f for f in desc["files"] if f["file"].endswith(".sblk")]
        path = tmp_path / "s" / entry["file"]
        blocked = np.fromfile(path, "<f4").reshape(-1, 3, 64)
        rows = np.zeros((desc["rows"], 4), "<f4")
        rows[:, :3] = blocked.transpose(0, 2, 1).reshape(-1, 3)[: desc["rows"]]
        path.unlink()
        rows.tofile(path.with_suffix(".sfac"))
        entry.update(file=entry["file"][: -len("sblk")] + "sfac", nbytes=rows.nbytes, crc32=zlib.crc32(rows.tobytes()))
        assert desc.pop("format") == 2  # written before the description said its format

    _rewrite_index(tmp_path / "s", a_row_at_a_time)
    with ec.VectorStore(tmp_path / "s") as store:
        store.verify()
        assert store.index_info()["format"] == 1
        got = store.search(q, 5, recall=0.9)
    _assert_same(got, want)


def test_an_index_of_a_later_format_is_left_unused_never_misread(tmp_path):
    q, exact = _indexed(tmp_path / "s", exact=True)
    with ec.VectorStore(tmp_path / "s") as store:
        assert store.index_info()["format"] == 2 and store.index_info()["readable"]

    def later(desc):  # as a newer version might write it: another layout, other keys
        desc.update(format=3, cells="elsewhere")
        name = desc["files"][0]["file"]
        (tmp_path / "s" / name).rename(tmp_path / "s" / name.replace(".cent", ".tree"))
        desc["files"][0]["file"] = name.replace(".cent", ".tree")

    _rewrite_index(tmp_path / "s", later)
    with ec.VectorStore(tmp_path / "s") as store:
        with pytest.warns(UserWarning, match=r"newer version of embedcache \(index format 3; this version reads "
                                             r"formats up to 2\); searching exactly"):
            got = store.search(q, 5, recall=0.5)
        _assert_same(got, exact)
        info = store.index_info()
        assert info["format"] == 3 and info["readable"] is False and info["bytes"] > 0
        assert "cells" not in info
        store.verify()  # its files are whole (lengths and checksums); their layout is not read


def test_codes_keep_the_recall_of_the_cells_they_probe(tmp_path):
    x = clustered(12_000, d=24, clusters=80, noise=0.6, seed=3)
    q = clustered(12_400, d=24, clusters=80, noise=0.6, seed=3)[12_000:]
    with ec.VectorStore(tmp_path / "s") as store:
        store.add(ids_of(len(x)), x)
        store.create_index(seed=0)
        (cs, ci), (fs, fi) = _probe_both(store, q, 10, 0.95)
        same = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ci, fi)])
        assert same >= 0.99, same  # the shortlist loses almost nothing the scan of those cells finds
        assert np.all(cs <= fs)  # the k-th best of fewer rows is never better


def test_what_the_shortlist_loses_is_measured_and_probed_for(tmp_path):
    x = clustered(12_000, d=24, clusters=80, noise=0.6, seed=3)
    q = clustered(12_400, d=24, clusters=80, noise=0.6, seed=3)[12_000:]
    from embedcache.store import _index

    with _config.override(STORE_INDEX_SHORTLIST=12, STORE_INDEX_SHORTLIST_PER_K=1, STORE_INDEX_CODE_ENERGY=0.3), \
            ec.VectorStore(tmp_path / "s") as store:
        store.add(ids_of(len(x)), x)
        info = store.create_index(seed=0)
        assert 0 < info["code_dims"] < 24 and info["shortlist_loss"] > 0.01  # a short list over coarse codes
        with store._txn.reading() as v:
            desc = _index.description(v)
        losses = info["shortlist_losses"]
        assert set(losses) == {0.8, 0.9, 0.95, 0.99} and max(losses.values()) == info["shortlist_loss"]
        assert _index.shortlist_loss(desc, 0.9) == losses[0.9]  # each level its own
        assert _index.shortlist_loss(desc, 0.92) == max(losses[0.9], losses[0.95])  # between: the larger
        assert _index.shortlist_loss({**desc, "shortlist_losses": None}, 0.9) == info["shortlist_loss"]  # older
        plain = _index.probes_for({**desc, "shortlist_losses": {}, "shortlist_loss": 0.0}, 0.9)
        assert info["probes"][0.9] > plain  # asks the curve for what the shortlist loses
        rec = info["recall"][0.9]
        assert rec["high"] >= 0.9, rec  # measured through the search itself
        _, exact = store.search(q, 10, exact=True)
        _, got = store.search(q, 10, recall=0.9)
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)]) >= 0.87


def test_one_query_alone_and_in_a_batch_shortlist_the_same_rows(tmp_path):
    # codes in fewer directions than the rows have (d 40), a shortlist of 3: a row at its edge
    # must fall the same way for a query alone as in a batch
    x = clustered(4000, d=40, clusters=30, noise=0.8, seed=5)
    q = clustered(4100, d=40, clusters=30, noise=0.8, seed=5)[4000:]
    with _config.override(STORE_INDEX_SHORTLIST=3, STORE_INDEX_SHORTLIST_PER_K=0, STORE_INDEX_FEW_QUERIES=4,
                          STORE_INDEX_CODE_ENERGY=0.6, STORE_INDEX_QUERY_BLOCK=32), \
            ec.VectorStore(tmp_path / "s") as store:
        store.add(ids_of(len(x)), x)
        info = store.create_index(seed=0)
        assert info["code_dims"] < 40
        batch = store.search(q, 3, recall=0.8)  # blocks of 32, several threads
        alone = [store.search(v, 3, recall=0.8) for v in q]
        np.testing.assert_array_equal(batch[0], np.concatenate([a[0] for a in alone]))
        np.testing.assert_array_equal(batch[1], np.concatenate([a[1] for a in alone]))


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 1e3, 1e30])
def test_a_few_queries_rank_cells_as_top_k_does_at_any_scale(scale):
    from embedcache.store._nearest import nearest_cells

    rng = np.random.default_rng(7)
    cent = rng.normal(size=(300, 24)).astype(np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    cent[10] = cent[11]  # a tie: the lower cell first
    q = np.concatenate([cent[[11, 3]] + 1e-7, rng.normal(size=(3, 24))]).astype(np.float32) * np.float32(scale)
    for p in (1, 7, 300):
        with _config.override(STORE_INDEX_FEW_QUERIES=16):
            few = nearest_cells(q, cent, p)
        np.testing.assert_array_equal(np.sort(few, axis=1), np.sort(ec.top_k(q, cent, p)[1], axis=1))


def test_a_query_whose_cells_hold_too_few_live_rows_is_searched_further(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((10, 32)) * 5  # ten tight clusters of 500 rows
    x = (centres.repeat(500, 0) + 0.1 * rng.standard_normal((5000, 32))).astype(np.float32)
    with ec.VectorStore(tmp_path / "s") as store:
        store.add(ids_of(len(x)), x)
        store.create_index(seed=0)
        store.delete(ids_of(500))  # the query's whole cluster, a tenth of the rows: not stale
        assert not store.index_info()["stale"]
        got = store.search(x[:3], 5, recall=0.9)
        _assert_same(got, store.search(x[:3], 5, exact=True))
        # k beyond the rows of any few cells: every live row comes back, in the exact order
        got = store.search(x[600:601], 6000, recall=0.9)
        assert got[1].shape == (1, 4500) and None not in got[1][0]
        _assert_same(got, store.search(x[600:601], 6000, exact=True))


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_the_query_scale_changes_no_row_the_codes_shortlist(tmp_path, metric):
    x = clustered(3000, d=16, clusters=20, noise=0.8, seed=4) * np.float32(0.01)  # dot scores stay finite
    q = clustered(3020, d=16, clusters=20, noise=0.8, seed=4)[3000:]
    with ec.VectorStore(tmp_path / "s", metric=metric) as store:
        store.add(ids_of(len(x)), x)
        store.create_index(seed=0)
        _, want = store.search(q, 5, recall=0.9)
        for scale in (2.0**-100, 1e-30, 3.0, 1e30, 1e37):  # products of codes and a query this long overflow float32
            got = store.search(q * np.float32(scale), 5, recall=0.9)[1]
            np.testing.assert_array_equal(got, want, err_msg=f"scale {scale}")
        assert np.all(np.isfinite(store.search(q * np.float32(1e37), 5, exact=True)[0]))


def test_a_zero_query_gets_the_lowest_rows_as_the_exact_scan_does(tmp_path):
    x = clustered(3000, d=16, clusters=20, noise=0.8, seed=4)
    with ec.VectorStore(tmp_path / "s") as store:
        store.add(ids_of(len(x)), x)
        store.create_index(seed=0)
        q = np.zeros((2, 16), np.float32)
        q[1] = x[7]
        got = store.search(q, 5, recall=0.5)
        _assert_same(got, store.search(q, 5, exact=True))
        assert list(got[1][0]) == ids_of(5)


def test_drop_index_removes_it_and_its_files_and_searches_scan_exactly(tmp_path):
    x = clustered(1500, d=16, clusters=15, seed=5)
    with ec.VectorStore(tmp_path / "s") as store:
        assert store.drop_index() is False
        store.add(ids_of(len(x)), x)
        store.create_index(seed=0)
        store.search(x[:5], 3, recall=0.5)  # maps the index
        assert store.drop_index() is True and store.index_info() is None
        assert list((tmp_path / "s" / "index").iterdir()) == []
        _assert_same(store.search(x[:5], 3, recall=0.5), store.search(x[:5], 3, exact=True))
        store.verify()
