"""The filter of absent keys (embedcache.cache._keyfilter) and the proxy's misses through it:
"absent" is never said of a key the cache holds, whoever wrote it and whatever was deleted."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("starlette", reason="needs the server extra")  # installed by the dev extra

from embedcache import EmbeddingCache, OpenAIEmbeddings, _config  # noqa: E402
from embedcache.cache._keyfilter import KeyFilter  # noqa: E402
from embedcache.testing import FakeEmbeddingServer, expected_vector  # noqa: E402
from tests.support.proxy import UPSTREAM_KEY, running_proxy, wait_written  # noqa: E402

MODEL = "test-embed-small"
DIM = 8


def _keys(n: int, seed: int, shared_prefix: bool = False) -> list[bytes]:
    """``n`` raw keys; with ``shared_prefix`` every odd key has the 8-byte prefix of the even one before it."""
    rng = np.random.default_rng(seed)
    keys = [bytes(k) for k in rng.integers(0, 256, (n, 32), dtype=np.uint8)]
    if shared_prefix:
        keys = [keys[i - 1][:8] + k[8:] if i % 2 else k for i, k in enumerate(keys)]
    return keys


def _vectors(n: int) -> np.ndarray:
    return np.arange(n * 3, dtype=np.float32).reshape(n, 3)


def _ready(f: KeyFilter) -> None:
    """Wait for the filter's background load."""
    deadline = time.monotonic() + 10
    while not f.ready:
        assert time.monotonic() < deadline, "the filter did not load within 10 s"
        time.sleep(0.005)


def _answer(f: KeyFilter, keys: list[bytes]) -> np.ndarray:
    """The filter's answer, after the reload it may ask for."""
    for _ in range(5):
        got = f.absent(keys)
        if got is not None:
            return got
        _ready(f)
    raise AssertionError("the filter kept answering 'cannot tell'")


def _tail_deletes(directory: str) -> int:
    with sqlite3.connect(os.path.join(directory, "cache.db")) as con:
        return con.execute("SELECT value FROM Embedcache_counters WHERE name = 'tail_deletes'").fetchone()[0]


# ---------------------------------------------------------------------------- the filter


def test_rows_added_after_a_clear_reuse_rowids_and_are_still_seen(tmp_path):
    directory = str(tmp_path)
    first, second = _keys(3, 1), _keys(3, 2)
    with EmbeddingCache(directory) as cache, EmbeddingCache(directory) as other:
        cache.put(first, _vectors(3))  # rowids 1, 2, 3
        f = KeyFilter(cache)
        f.load()
        assert _answer(f, first + second).tolist() == [False] * 3 + [True] * 3
        before = _tail_deletes(directory)
        other.clear()  # another connection; the next rows get rowids 1, 2, 3 again
        other.put(second, _vectors(3))
        assert _tail_deletes(directory) == before + 1  # one deletion of the highest rowid
        # rowid > 3 finds nothing new: only the deletion count says the filter is out of date
        assert _answer(f, first + second).tolist() == [True] * 3 + [False] * 3  # after a reload
        found, _ = cache.lookup(first + second, 3)
        assert found.tolist() == [False] * 3 + [True] * 3
        f.close()


def test_a_cache_made_before_the_counter_gets_it_on_open(tmp_path):
    directory = str(tmp_path)
    keys = _keys(4, 3)
    with EmbeddingCache(directory) as cache:
        cache.put(keys[:2], _vectors(2))
    with sqlite3.connect(os.path.join(directory, "cache.db")) as con:  # as an older version left it
        con.execute("DROP TRIGGER Embedcache_tail_delete")
        con.execute("DELETE FROM Embedcache_counters WHERE name = 'tail_deletes'")
    with EmbeddingCache(directory) as cache:  # opening it migrates it
        assert _tail_deletes(directory) == 0
        f = KeyFilter(cache)
        f.load()
        assert _answer(f, keys).tolist() == [False, False, True, True]
        found, vectors = cache.lookup(keys[:2], 3)  # the old rows read as before
        assert found.all()
        np.testing.assert_array_equal(vectors, _vectors(2))
        f.close()


_OPS = st.lists(
    st.tuples(
        st.one_of(
            st.tuples(st.just("put"), st.sampled_from(["a", "b"]),
                      st.lists(st.integers(0, 23), min_size=1, max_size=8)),
            st.tuples(st.just("clear")),
            st.tuples(st.just("prune"), st.sampled_from(["a", "b"])),
        ),
        st.booleans(),  # whether the filter is asked before the next step
    ),
    max_size=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS, merge=st.sampled_from([2, 65_536]))
@example(ops=[(("clear",), False), (("put", "a", [9]), True)], merge=65_536)  # rowid 1 again, another key
@example(ops=[(("put", "b", [5, 6]), True), (("prune", "b"), False), (("put", "a", [7, 8]), True)], merge=2)
def test_the_filter_never_calls_a_stored_key_absent(tmp_path_factory, ops, merge):
    """Writes, clears and prunes by another connection, with keys that share 8-byte prefixes;
    whenever it is asked, every key the cache holds is "maybe present" and every key never written is
    "absent" (prefixes of 8 random bytes do not collide)."""
    directory = str(tmp_path_factory.mktemp("filter"))
    pool, never = _keys(24, 4, shared_prefix=True), _keys(8, 5)
    with _config.override(KEYFILTER_MERGE_KEYS=merge), EmbeddingCache(directory) as cache, \
            EmbeddingCache(directory) as other:
        cache.put(pool[:4], _vectors(4), source=("a", "m", 0))
        f = KeyFilter(cache)
        f.start()
        _ready(f)
        try:
            for op, look in ops:
                if op[0] == "put":
                    keys = list(dict.fromkeys(pool[i] for i in op[2]))
                    other.put(keys, _vectors(len(keys)), source=(op[1], "m", 0))
                elif op[0] == "clear":
                    other.clear()
                else:
                    other.prune(op[1])
                if not look:
                    continue
                absent = _answer(f, pool + never)
                found, _ = cache.lookup(pool, 3)
                assert not (absent[: len(pool)] & found).any(), "a stored key was called absent"
                assert absent[len(pool):].all()
        finally:
            f.close()


# ---------------------------------------------------------------------------- through the proxy


@pytest.fixture(scope="module")
def upstream():
    with FakeEmbeddingServer(dimensions=DIM, api_key=UPSTREAM_KEY) as server:
        yield server


def _post(proxy, texts):
    r = httpx.post(proxy.base_url + "/embeddings", json={"model": MODEL, "input": texts}, timeout=30)
    assert r.status_code == 200, r.text
    return r, np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


_WRITE = """
import sys, numpy as np
from embedcache import EmbeddingCache, OpenAIEmbeddings
directory, base_url, model, text = sys.argv[1:]
emb = OpenAIEmbeddings(model, base_url=base_url, api_key="unused")
with EmbeddingCache(directory) as cache:
    keys = cache.raw_keys(emb.cache_namespace, emb.model, emb.dimensions, [text])
    cache.put(keys, np.full((1, 8), 0.25, dtype=np.float32), source=(emb.cache_namespace, emb.model, emb.dimensions))
"""


def test_a_row_another_process_writes_after_the_filter_loaded_is_a_hit(upstream, tmp_path):
    cache_dir = str(tmp_path)
    with running_proxy(upstream.base_url, cache=cache_dir) as p:
        keys = p.upstream.keys
        _ready(keys)
        metrics = p.upstream.metrics.registry
        r, got = _post(p, ["filtered miss 1", "filtered miss 2"])
        assert r.headers["x-embedcache-misses"] == "2"
        assert metrics.get_sample_value("embedcache_proxy_cache_lookups_skipped_total") == 2  # no SQL read
        wait_written(p)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
        subprocess.run([sys.executable, "-c", _WRITE, cache_dir, upstream.base_url, MODEL, "written elsewhere"],
                       check=True, env=env, timeout=60)
        sent = len(upstream.embedding_requests)
        r, got = _post(p, ["written elsewhere", "filtered miss 1", "filtered miss 3"])
        assert (r.headers["x-embedcache-hits"], r.headers["x-embedcache-misses"]) == ("2", "1")
        np.testing.assert_array_equal(got[0], np.full(8, 0.25, dtype=np.float32))  # the other process's vector
        np.testing.assert_array_equal(got[1:], np.stack([expected_vector(t, DIM)
                                                         for t in ["filtered miss 1", "filtered miss 3"]]))
        assert [t for req in upstream.embedding_requests[sent:] for t in req.body["input"]] == ["filtered miss 3"]
        assert keys.ready


def test_the_proxy_asks_the_cache_while_the_filter_cannot_tell(upstream, tmp_path):
    cache_dir = str(tmp_path)
    emb = OpenAIEmbeddings(MODEL, base_url=upstream.base_url, api_key=UPSTREAM_KEY)
    with EmbeddingCache(cache_dir) as cache:
        keys = cache.raw_keys(emb.cache_namespace, emb.model, emb.dimensions, ["stored before"])
        cache.put(keys, np.full((1, DIM), 0.5, dtype=np.float32))
    with running_proxy(upstream.base_url, cache=cache_dir) as p:
        p.upstream.keys.close()  # never answers again: every item is looked up in SQLite
        r, got = _post(p, ["stored before", "not stored"])
        assert (r.headers["x-embedcache-hits"], r.headers["x-embedcache-misses"]) == ("1", "1")
        np.testing.assert_array_equal(got[0], np.full(DIM, 0.5, dtype=np.float32))
        assert p.upstream.metrics.registry.get_sample_value("embedcache_proxy_cache_lookups_skipped_total") == 0
