"""VectorStore: adding, upserting, deleting and compacting; input checks, locking, durability."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from support.stores import SMALL, ids_of, vecs

import embedcache as ec
from embedcache import _config
from embedcache.errors import (
    ConfigurationError,
    DimensionMismatchError,
    DuplicateIdError,
    InvalidInputError,
    InvalidInputTypeError,
    NamespaceMismatchError,
    StoreError,
    StoreLockedError,
)
from embedcache.store import VectorStore, text_ids
from embedcache.store import _write as store_write


@pytest.fixture
def path(tmp_path):
    return tmp_path / "store"


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
        with pytest.raises(InvalidInputTypeError, match="real numbers"):
            s.add(["c"], np.array([["a"] * 16]))
        with pytest.raises(InvalidInputError, match="2-D array"):
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
    with pytest.raises(InvalidInputError, match="dimensions must be >= 1, got 0"):
        VectorStore(path, dimensions=0)
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
    with _config.override(MAX_SEGMENT_BYTES=SMALL), VectorStore(path) as s:
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
    monkeypatch.setattr(_config, "STORE_CHUNK_BYTES", 3 * 16 * 4)
    x = vecs(100).astype(np.float64)  # converted chunk by chunk
    with _config.override(MAX_SEGMENT_BYTES=SMALL), VectorStore(path) as s:
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


def test_large_add_has_bounded_memory(path, tmp_path, monkeypatch):
    import tracemalloc

    monkeypatch.setattr(_config, "STORE_CHUNK_BYTES", 1 << 20)
    n, d = 5000, 512  # 20 MB of float64 on disk, 10 MB once converted to float32
    src = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float64, shape=(n, d))
    src[:] = np.random.default_rng(0).standard_normal((n, d))
    src.flush()
    ids = ids_of(n)
    with _config.override(MAX_SEGMENT_BYTES=4 << 20), VectorStore(path) as s:
        tracemalloc.start()
        try:
            s.add(ids, src)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 6 << 20, f"peak {peak / 2**20:.1f} MiB while adding 10 MiB of vectors"
        assert s.info()["segments"] == 3
        np.testing.assert_array_equal(s.get(["r0", "r4999"]), src[[0, -1]].astype(np.float32))


def test_ids_may_be_a_numpy_array_of_strings(path):
    with VectorStore(path) as s:
        s.add(np.array(["a", "b"]), vecs(2))
        s.delete(np.array(["a"]))
        assert s.ids() == ["b"] and type(s.ids()[0]) is str
        with pytest.raises(InvalidInputTypeError, match=r"ids\[1\] must be a str"):
            s.add(["c", 5], vecs(2))


def test_metadata_keys_must_be_strings(path):
    with VectorStore(path) as s:
        with pytest.raises(InvalidInputError, match=r"metadata\[1\].*key.*1"):
            s.add(ids_of(2), vecs(2), metadata=[{"a": 1}, {1: "x"}])
        with pytest.raises(InvalidInputError, match=r"metadata\[0\].*key"):
            s.add(ids_of(1), vecs(1), metadata=[{"a": {2: "x"}}])
        assert len(s) == 0


class _CountingEmbedder:
    """Hashing vectors; counts the texts it was asked to embed."""

    def __init__(self, dimensions=16):
        self.inner = ec.HashingEmbeddings(dimensions)
        self.cache_namespace = self.inner.cache_namespace
        self.model = self.inner.model
        self.seen = 0

    def embed(self, texts, *, on_batch=None):
        self.seen += len(texts)
        return self.inner.embed(texts)


def test_add_texts_records_namespace_and_keeps_text(path, tmp_path):
    emb = ec.CachedEmbedder(ec.HashingEmbeddings(32), cache=ec.EmbeddingCache(tmp_path / "cache"))
    texts = ["a red fox", "a red fox!", "stock markets fell"]
    with VectorStore(path) as s:
        with pytest.raises(InvalidInputError, match=r"metadata\[2\] holds another value .* under 'text'"):
            s.add_texts(texts, emb, metadata=[{"src": "x"}, None, {"text": "not the text"}])
        assert len(s) == 0
        ids = s.add_texts(texts, emb, metadata=[{"src": "x"}, None, {"text": texts[2]}])
        assert ids == [hashlib.sha256(t.encode()).hexdigest()[:32] for t in texts]
        assert s.namespace == emb.cache_namespace and s.model == emb.model and s.dimensions == 32
        assert s.metadata(ids) == [{"src": "x", "text": texts[0]}, {"text": texts[1]}, {"text": texts[2]}]
        np.testing.assert_allclose(s.get(ids), ec.HashingEmbeddings(32).embed(texts))
        with pytest.raises(DuplicateIdError):
            s.add_texts(texts[:1], emb)
        s.add_texts(texts[:1], emb, upsert=True)
        s.add_texts(["more"], emb, ids=["mine"])
        assert len(s) == 4 and s.ids()[-2:] == [ids[0], "mine"]
        _, found = s.search(emb.embed(["a red fox"]), k=1)
        assert found[0, 0] == ids[0]
        with pytest.raises(NamespaceMismatchError, match="namespace"):
            s.add_texts(["x"], ec.HashingEmbeddings(32, lowercase=False))
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

    with VectorStore(path, dimensions=4) as s:
        with pytest.raises(DimensionMismatchError, match="dimension 4, got dimension 8"):
            s.add_texts(["x"], Fake())
        assert len(s) == 0


def test_add_texts_embeds_in_chunks_and_commits_once(path, monkeypatch):
    monkeypatch.setattr(_config, "STORE_EMBED_CHUNK", 3)
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


def test_add_texts_records_base_url_and_dimensions(path):
    emb = ec.OpenAIEmbeddings("m", base_url="http://localhost:9/v1", api_key="k", dimensions=8)
    with VectorStore(path) as s:
        assert s.info()["embedder_base_url"] is None and s.info()["embedder_dimensions"] is None
        s.add_texts(["a"], _FixedEmbedder(emb))
        info = s.info()
        assert info["embedder_base_url"] == "http://localhost:9/v1" and info["embedder_dimensions"] == 8
        assert info["dimensions"] == 8  # of the vectors stored
    with VectorStore(path) as s:
        assert s.info()["embedder_base_url"] == "http://localhost:9/v1"


class _FixedEmbedder:
    """Takes the settings of ``inner`` (an embedder never asked for vectors) and returns ones."""

    def __init__(self, inner):
        self.embedder = inner
        self.cache_namespace = inner.cache_namespace
        self.model = inner.model
        self.dimensions = inner.dimensions

    def embed(self, texts, *, on_batch=None):
        return np.ones((len(texts), 8), dtype=np.float32)


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
    monkeypatch.setattr(_config, "STORE_EMBED_CHUNK", 3)
    with VectorStore(path, dimensions=4) as s:
        with pytest.raises(DimensionMismatchError, match="dimension 4, got dimension 8"):
            s.add_texts([f"t{i}" for i in range(8)], _Widths(4, 8))
        assert len(s) == 0
    with VectorStore(path) as s:  # still readable
        s.add_texts(["a", "b"], _Widths(4))
        assert len(s) == 2 and s.verify()["live"] == 2


def test_non_finite_row_number_counts_earlier_chunks(path, monkeypatch):
    monkeypatch.setattr(_config, "STORE_EMBED_CHUNK", 3)
    with VectorStore(path) as s:
        with pytest.raises(InvalidInputError, match="row 4 is not"):
            s.add_texts([f"t{i}" for i in range(8)], _Widths(4, nan_at=(2, 1)))
    monkeypatch.setattr(_config, "STORE_CHUNK_BYTES", 3 * 16 * 8)  # three float64 rows per slice
    x = vecs(10).astype(np.float64)
    x[7, 3] = np.inf
    with VectorStore(path) as s:
        with pytest.raises(InvalidInputError, match="row 7 is not"):
            s.add(ids_of(10), x)


def test_default_ids_hash_the_text_and_number_its_repeats(path):
    texts = ["one", "two", "one", "one"]
    ids = text_ids(texts)
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


HOLDER = textwrap.dedent(
    """
    import sys, time
    from embedcache.store import VectorStore
    s = VectorStore(sys.argv[1])
    with s._txn.locked():
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

    monkeypatch.setattr(store_write, "fsync_dir", fsync_dir)
    parent = path.parent / "new"
    with VectorStore(parent / "store") as s:
        assert ("dir", parent.parent) in events and ("dir", parent) in events and ("dir", parent / "store") in events
        events.clear()
        monkeypatch.setattr(_os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
        monkeypatch.setattr(_os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
        s._txn.wconn.set_trace_callback(lambda sql: events.append("commit") if sql == "COMMIT" else None)
        s.add(ids_of(3), vecs(3))
        s._txn.wconn.set_trace_callback(None)
    assert events == ["fsync", "replace", ("dir", parent / "store" / "segments"), "commit"], events


def test_segment_length_is_checked_before_it_is_registered(path, monkeypatch):
    with VectorStore(path) as s:
        s.add(["a"], vecs(1))
        real = store_write.write_segment

        def short(seg_dir, seg, chunks, stop):
            nbytes, crc = real(seg_dir, seg, chunks, stop)
            return nbytes - 4, crc

        monkeypatch.setattr(store_write, "write_segment", short)
        with pytest.raises(StoreError, match="bytes"):
            s.add(["b"], vecs(1))
    with VectorStore(path) as s:
        assert s.ids() == ["a"] and s.verify()["segments"] == 1


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
    with _config.override(MAX_SEGMENT_BYTES=SMALL), VectorStore(path) as s:
        s.add(ids_of(3), vecs(3))
        real = s._txn.wconn
        s._txn.wconn = _InterruptAfterCommit(real)
        with pytest.raises(KeyboardInterrupt):
            s.add(ids_of(12, "n"), vecs(12, seed=1))
        s._txn.wconn = real
    with VectorStore(path) as s:
        assert len(s) == 15 and s.verify()["live"] == 15
        np.testing.assert_array_equal(s.get(["n11"]), vecs(12, seed=1)[11:])


def test_compact_does_not_wait_for_readers(path):
    with _config.override(MAX_SEGMENT_BYTES=SMALL), VectorStore(path) as s:
        s.add(ids_of(20), vecs(20))
        s.delete(["r3"])
        reader = sqlite3.connect(path / "store.sqlite")
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM rows").fetchone()  # holds a read snapshot
        statements = []
        s._txn.wconn.set_trace_callback(statements.append)
        s._txn.conn.set_trace_callback(statements.append)
        s.compact()
        reader.rollback()
        reader.close()
        assert any("wal_checkpoint(PASSIVE)" in x for x in statements)
        assert not any("TRUNCATE" in x for x in statements)
        assert len(s) == 19 and s.verify()["rows"] == 19


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


def test_an_embedder_of_another_width_costs_one_text_before_it_is_refused(path):
    class Counting(_Widths):
        texts = 0

        def embed(self, texts):
            Counting.texts += len(texts)
            return super().embed(texts)

    with VectorStore(path, dimensions=3) as s:
        with pytest.raises(DimensionMismatchError, match="dimension 3"):
            s.add_texts([f"t{i}" for i in range(50)], Counting(5))
        assert Counting.texts == 1 and len(s) == 0
        s.add_texts([f"t{i}" for i in range(50)], Counting(3))  # one text, then the other 49
        assert len(s) == 50 and Counting.texts == 51
