"""What the proxy keeps in memory: vectors whose cache write is pending, and recent vectors."""

from __future__ import annotations

import os
import sqlite3
import time
from collections import OrderedDict

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("starlette", reason="needs the server extra")  # installed by the dev extra

from embedcache import EmbeddingCache, OpenAIEmbeddings, _config  # noqa: E402
from embedcache.server._memory import ENTRY_OVERHEAD, RecentVectors  # noqa: E402
from embedcache.testing import FakeEmbeddingServer, expected_vector  # noqa: E402
from tests.support.proxy import UPSTREAM_KEY, running_proxy, wait_written  # noqa: E402

MODEL = "test-embed-small"
DIM = 8


@pytest.fixture(scope="module")
def upstream():
    with FakeEmbeddingServer(dimensions=DIM, api_key=UPSTREAM_KEY) as server:
        yield server


def _post(proxy, texts):
    r = httpx.post(proxy.base_url + "/embeddings", json={"model": MODEL, "input": texts}, timeout=30)
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, np.stack([expected_vector(t, DIM) for t in texts]))
    return r


def _on_disk(upstream, cache, texts):
    """What the library reads from the cache for each text (None: absent)."""
    emb = OpenAIEmbeddings(MODEL, base_url=upstream.base_url, api_key=UPSTREAM_KEY)
    return cache.get_many([EmbeddingCache.make_key(emb.cache_namespace, emb.model, emb.dimensions, t)
                           for t in texts])


def test_answered_before_written_and_served_from_memory_until_then(upstream, tmp_path):
    cache_dir = str(tmp_path)
    # no recent-vector memory: only the pending map serves what is not on disk
    with _config.override(SERVER_MEMORY_BYTES=0), running_proxy(upstream.base_url, cache=cache_dir) as p:
        assert len(p.upstream.recent) == 0 and p.upstream.recent.max_bytes == 0
        reader = EmbeddingCache(cache_dir)  # opened (its tables made) before the lock is taken
        # Another process holds the cache's write lock: the proxy's write has to wait.
        other = sqlite3.connect(os.path.join(cache_dir, "cache.db"), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            texts = ["pending one", "pending two", "pending one"]
            r = _post(p, texts)  # answered while its write cannot commit
            assert r.headers["x-embedcache-misses"] == "2"
            assert len(p.upstream.writer.pending) == 2
            assert _on_disk(upstream, reader, texts) == [None, None, None]
            before = len(upstream.embedding_requests)
            again = _post(p, ["pending two", "pending one", "fresh three"])
            assert again.headers["x-embedcache-hits"] == "2" and again.headers["x-embedcache-misses"] == "1"
            assert [r.body["input"] for r in upstream.embedding_requests[before:]] == [["fresh three"]]
            metrics = httpx.get(p.url + "/metrics").text
            assert "embedcache_proxy_pending_writes 3.0" in metrics
        finally:
            other.rollback()
            other.close()
        wait_written(p)
        on_disk = _on_disk(upstream, reader, ["pending one", "pending two", "fresh three"])
        for t, v in zip(["pending one", "pending two", "fresh three"], on_disk):
            np.testing.assert_array_equal(v, expected_vector(t, DIM))
        assert len(p.upstream.recent) == 0
        reader.close()


def test_writes_gather_until_enough_rows_or_the_delay_and_a_flush_writes_at_once(tmp_path):
    """SERVER_WRITE_ROWS rows start a write at once; fewer wait for SERVER_WRITE_DELAY; a flush
    (the app's shutdown) does not wait; every vector is written once, under its own key."""
    import asyncio

    from embedcache.server._memory import CacheWriter
    from embedcache.server._metrics import Metrics

    cache = EmbeddingCache(str(tmp_path))
    source = ("ns", "m", None)
    rng = np.random.default_rng(0)

    def rows(tag, n):
        keys = cache.raw_keys(*source, [f"{tag} {i}" for i in range(n)])
        vectors = rng.standard_normal((n, 4)).astype("<f4")
        return keys, vectors, [v.tobytes() for v in vectors]

    async def main():
        with _config.override(SERVER_WRITE_ROWS=10, SERVER_WRITE_DELAY=60):
            writer = CacheWriter(cache, Metrics())
        few = rows("few", 3)
        writer.add(source, *few)
        await asyncio.sleep(0.3)  # 3 < 10 rows, delay 60 s: still gathering
        assert len(writer.pending) == 3 and cache.lookup(few[0], 4)[0].sum() == 0
        many = rows("many", 7)  # 10 rows now: written without the delay
        writer.add(source, *many)
        for _ in range(1000):
            if not writer.pending:
                break
            await asyncio.sleep(0.01)
        assert not writer.pending
        last = rows("last", 2)
        writer.add(source, *last)
        await asyncio.wait_for(writer.flush(), 30)  # not the 60 s delay
        assert not writer.pending
        for keys, vectors, _ in (few, many, last):
            found, got = cache.lookup(keys, 4)
            assert found.all()
            np.testing.assert_array_equal(got, vectors)
        await writer.aclose()

    asyncio.run(main())
    cache.close()


def test_recent_vectors_are_bounded_and_equal_the_caches(upstream, tmp_path):
    cache_dir = str(tmp_path)
    budget = 10 * (4 * DIM + ENTRY_OVERHEAD)  # room for 10 vectors
    texts = [f"recent {i}" for i in range(50)]
    with _config.override(SERVER_MEMORY_BYTES=budget), running_proxy(upstream.base_url, cache=cache_dir) as p:
        recent = p.upstream.recent
        for start in range(0, 50, 7):
            _post(p, texts[start:start + 7])
            assert recent.nbytes <= budget and len(recent) <= 10
        wait_written(p)
        before = len(upstream.embedding_requests)
        r = _post(p, texts)  # 40 from the disk, 10 from memory: all hits, each vector its own
        assert r.headers["x-embedcache-misses"] == "0" and len(upstream.embedding_requests) == before
        assert len(recent) == 10 and recent.nbytes == budget
        # what memory holds is what the cache holds
        emb = OpenAIEmbeddings(MODEL, base_url=upstream.base_url, api_key=UPSTREAM_KEY)
        keys = EmbeddingCache.raw_keys(emb.cache_namespace, emb.model, emb.dimensions, texts)
        held = [(k, t) for k, t in zip(keys, texts) if k in recent]
        # 40-49 were found in memory, then 0-39 read from the disk, each put in memory in turn
        assert [t for _, t in held] == texts[30:40]
        with EmbeddingCache(cache_dir) as cache:
            on_disk = _on_disk(upstream, cache, [t for _, t in held])
        for (k, _), v in zip(held, on_disk):
            assert recent.get(k) == v.tobytes()


@settings(max_examples=60, deadline=None)
@given(
    budget=st.integers(0, 6 * (ENTRY_OVERHEAD + 12)),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.integers(0, 12)), max_size=60),
)
def test_recent_vectors_against_a_plain_lru(budget, ops):
    """Every get and every eviction as in a plain LRU of (key, value) under the byte budget."""
    recent = RecentVectors(budget)
    model: OrderedDict[bytes, bytes] = OrderedDict()
    for is_put, k, length in ops:
        key = bytes([k])
        if is_put:
            value = bytes([k]) * length
            if length + ENTRY_OVERHEAD > budget:  # never fits: not kept, and nothing evicted
                recent.put(key, value)
                continue
            model.pop(key, None)
            model[key] = value
            while sum(len(v) + ENTRY_OVERHEAD for v in model.values()) > budget:
                model.popitem(last=False)
            recent.put(key, value)
        else:
            expected = model.get(key)
            if expected is not None:
                model.move_to_end(key)
            assert recent.get(key) == expected
        assert list(recent._map.items()) == list(model.items())
        assert recent.nbytes == sum(len(v) + ENTRY_OVERHEAD for v in model.values()) <= budget


# ---------------------------------------------------------------------------- the writer process


@settings(max_examples=50, deadline=None)
@given(
    source=st.tuples(st.text(max_size=8), st.text(min_size=1, max_size=8), st.none() | st.integers(1, 4096)),
    rows=st.integers(0, 9), dim=st.integers(1, 7), seq=st.integers(0, 2**64 - 1),
)
def test_write_frames_read_back_as_sent(source, rows, dim, seq):
    from embedcache.server import _writer

    keys = [bytes([i]) * 32 for i in range(rows)]
    vectors = np.arange(rows * dim, dtype="<f4").tobytes()
    frame = _writer.encode_write(seq, source, keys, vectors, dim)
    assert int.from_bytes(frame[:4], "little") == len(frame) - 4
    assert _writer.decode_write(frame[4:]) == (seq, source, keys, vectors, dim)


def _rows(cache, source, tag, n, dim, rng):
    keys = cache.raw_keys(*source, [f"{tag} {i}" for i in range(n)])
    vectors = rng.standard_normal((n, dim)).astype("<f4")
    return keys, vectors, [v.tobytes() for v in vectors]


def test_the_writer_process_writes_every_row_it_is_sent(tmp_path):
    """Rows of several sources and lengths, keys sent twice (the last row wins), in writes
    of every size: what the library then reads is what was sent last, key by key."""
    import asyncio

    from embedcache.server._memory import CacheWriter
    from embedcache.server._metrics import Metrics

    cache = EmbeddingCache(str(tmp_path))
    rng = np.random.default_rng(1)
    sources = [("ns-a", "m", None), ("ns-b", "m", 4), ("ns-a", "other", None)]
    expected: dict[bytes, np.ndarray] = {}

    async def main():
        with _config.override(SERVER_WRITE_ROWS=50, SERVER_WRITE_DELAY=0.02):
            writer = CacheWriter(cache, Metrics())
        for i in range(40):
            source = sources[i % 3]
            keys, vectors, rows = _rows(cache, source, f"w{i % 25}", int(rng.integers(1, 40)), 4 + (i % 3 == 2) * 3, rng)
            writer.add(source, keys, vectors, rows)
            expected.update(zip(keys, vectors))
            if i % 7 == 0:
                await asyncio.sleep(0.03)
        assert writer.pid is not None and writer.pending
        await asyncio.wait_for(writer.flush(), 60)
        assert not writer.pending
        pid = writer.pid
        await writer.aclose()
        return pid

    pid = asyncio.run(main())
    assert not _alive(pid)  # closed: the writer process has ended
    for dim in (4, 7):
        keys = [k for k, v in expected.items() if len(v) == dim]
        found, got = cache.lookup(keys, dim)
        assert found.all()
        np.testing.assert_array_equal(got, np.stack([expected[k] for k in keys]))
    cache.close()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_killed_writer_process_is_reported_restarted_and_sent_what_was_not_written(tmp_path, caplog):
    import asyncio
    import signal

    from embedcache.server._memory import CacheWriter
    from embedcache.server._metrics import Metrics

    cache_dir = str(tmp_path)
    cache = EmbeddingCache(cache_dir)
    rng = np.random.default_rng(2)
    source = ("ns", "m", None)
    metrics = Metrics()
    sent = [_rows(cache, source, f"kill {i}", 5, 4, rng) for i in range(3)]

    async def main():
        writer = CacheWriter(cache, metrics)
        writer.add(source, *sent[0])
        await asyncio.wait_for(writer.flush(), 60)
        first = writer.pid
        # Another process holds the cache's write lock: the next rows cannot be committed.
        other = sqlite3.connect(os.path.join(cache_dir, "cache.db"), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            writer.add(source, *sent[1])
            await asyncio.sleep(0.3)
            assert len(writer.pending) == 5
            os.kill(first, signal.SIGKILL)
            time.sleep(0.3)  # (blocking: the loop has not seen the exit yet) it is gone, and
            writer.add(source, *sent[2])  # these rows go to a pipe nobody reads
            for _ in range(500):  # its exit is seen, and another starts
                if writer.pid != first:
                    break
                await asyncio.sleep(0.01)
            assert writer.pid != first and _alive(writer.pid)
            assert len(writer.pending) == 10  # still served from memory
        finally:
            other.rollback()
            other.close()
        await asyncio.wait_for(writer.flush(), 60)
        assert not writer.pending
        await writer.aclose()

    with caplog.at_level("WARNING", logger="embedcache.server"):
        asyncio.run(main())
    assert any("cache writer process exited" in r.getMessage() and "10 vectors not yet written" in r.getMessage()
               for r in caplog.records)
    assert metrics.registry.get_sample_value("embedcache_proxy_cache_errors_total") == 1
    for keys, vectors, _ in sent:
        found, got = cache.lookup(keys, 4)
        assert found.all()
        np.testing.assert_array_equal(got, vectors)
    cache.close()


def test_a_writer_killed_before_its_first_commit_hands_its_rows_to_the_next(tmp_path, caplog):
    """A writer killed by a signal before it answered anything is not taken for one that
    cannot write: the next one is started at once and sent every row not yet written."""
    import asyncio
    import signal

    from embedcache import _config
    from embedcache.server._memory import CacheWriter
    from embedcache.server._metrics import Metrics

    cache = EmbeddingCache(str(tmp_path))
    rng = np.random.default_rng(4)
    source = ("ns", "m", None)
    metrics = Metrics()
    sent = [_rows(cache, source, f"early {i}", 6, 4, rng) for i in range(2)]

    async def main():
        writer = CacheWriter(cache, metrics)  # commits after 30 s, or on a flush
        writer.add(source, *sent[0])
        first = writer.pid
        await asyncio.sleep(0.3)
        assert len(writer.pending) == 6  # nothing committed yet
        os.kill(first, signal.SIGKILL)
        for _ in range(500):  # its exit is seen, and another starts at once
            if writer.pid != first:
                break
            await asyncio.sleep(0.01)
        assert writer.pid != first and _alive(writer.pid)
        writer.add(source, *sent[1])
        await asyncio.wait_for(writer.flush(), 60)
        assert not writer.pending
        await writer.aclose()

    with _config.override(SERVER_WRITE_DELAY=30.0), caplog.at_level("WARNING", logger="embedcache.server"):
        asyncio.run(main())
    assert any("exited (code -9) with 6 vectors not yet written; starting it again" in r.getMessage()
               for r in caplog.records)
    for keys, vectors, _ in sent:
        found, got = cache.lookup(keys, 4)
        assert found.all()
        np.testing.assert_array_equal(got, vectors)
    cache.close()


def test_a_writer_process_that_cannot_write_is_reported_and_not_restarted_at_once(tmp_path, caplog):
    """A writer that exits without writing anything (here: its cache directory is gone, a
    file stands in its place) is logged and counted, its rows are dropped as a failed
    write's are (fetched again when next asked for), and none is started for a while."""
    import asyncio

    from embedcache.server._memory import CacheWriter
    from embedcache.server._metrics import Metrics

    cache_dir = tmp_path / "cache"
    cache = EmbeddingCache(str(cache_dir))
    cache_dir.rename(tmp_path / "moved")  # the proxy's own connection goes on working
    cache_dir.write_text("not a directory")
    metrics = Metrics()
    rng = np.random.default_rng(3)
    source = ("ns", "m", None)

    async def main():
        writer = CacheWriter(cache, metrics)
        writer.add(source, *_rows(cache, source, "a", 4, 4, rng))
        assert len(writer.pending) == 4
        for _ in range(3000):
            if not writer.pending:
                break
            await asyncio.sleep(0.01)
        assert not writer.pending
        failed = writer.pid
        writer.add(source, *_rows(cache, source, "b", 4, 4, rng))  # within the back-off: not kept
        assert not writer.pending and writer.pid == failed
        await asyncio.wait_for(writer.flush(), 5)
        await writer.aclose()

    with caplog.at_level("WARNING", logger="embedcache.server"):
        asyncio.run(main())
    assert any("exited (code 1) without writing anything; 4 vectors not written; trying again in 1 s"
               in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert metrics.registry.get_sample_value("embedcache_proxy_cache_errors_total") == 1
    cache.close()


def test_the_writer_writes_whole_frames_when_its_input_ends_mid_frame(tmp_path):
    """A proxy killed while handing a write over leaves half a frame: the writer writes the
    whole frames before it, answers them, and ends."""
    from embedcache.server import _writer

    source = ("ns", "m", None)
    rng = np.random.default_rng(4)
    with EmbeddingCache(str(tmp_path)) as cache:
        writes = [_rows(cache, source, f"frame {i}", 3, 4, rng) for i in range(3)]
    frames = [_writer.encode_write(i + 1, source, keys, vectors.tobytes(), 4)
              for i, (keys, vectors, _) in enumerate(writes)]
    rows_r, rows_w = os.pipe()
    acks_r, acks_w = os.pipe()
    os.write(rows_w, frames[0] + frames[1] + frames[2][: len(frames[2]) // 2])
    os.close(rows_w)
    _writer.run(str(tmp_path), None, 10.0, rows_r, acks_w, 1000, 60.0)  # returns: its input ended
    os.close(rows_r)
    os.close(acks_w)
    answers = os.read(acks_r, 1000)
    os.close(acks_r)
    assert answers == _writer.encode_ack(2)  # one transaction for both, answered
    with EmbeddingCache(str(tmp_path)) as cache:
        for (keys, vectors, _), written in zip(writes, [True, True, False]):
            found, got = cache.lookup(keys, 4)
            assert found.tolist() == [written] * 3
            if written:
                np.testing.assert_array_equal(got, vectors)


def test_the_writer_process_gets_no_api_key(tmp_path, monkeypatch):
    import asyncio

    import psutil

    from embedcache.server._memory import CacheWriter
    from embedcache.server._metrics import Metrics

    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-in-the-writer")
    monkeypatch.setenv("IONOS_API_TOKEN", "ionos-never-in-the-writer")
    cache = EmbeddingCache(str(tmp_path))

    async def main():
        writer = CacheWriter(cache, Metrics())
        writer.add(("ns", "m", None), *_rows(cache, ("ns", "m", None), "env", 2, 4, np.random.default_rng(5)))
        env = psutil.Process(writer.pid).environ()
        await writer.aclose()
        return env

    env = asyncio.run(main())
    assert "OPENAI_API_KEY" not in env and "IONOS_API_TOKEN" not in env
    assert "never-in-the-writer" not in repr(env)
    cache.close()
