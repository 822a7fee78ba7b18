"""EmbeddingCache: keys, value format, no-pickle rule, batch reads and writes, processes."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pathlib
import pickle
import sqlite3
import struct

import diskcache
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support.modes import bound_by_modes

from embedcache import EmbeddingCache
from embedcache import _config
from embedcache.cache import _diskcache
from embedcache.cache._codec import FORMAT_VERSION
from embedcache.cache._diskcache import BytesOnlyDisk, Table
from embedcache.errors import (
    CacheError,
    InvalidInputError,
    InvalidInputTypeError,
)


@pytest.fixture
def cache(tmp_path):
    with EmbeddingCache(tmp_path / "cache") as c:
        yield c


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for hypothesis tests (function-scoped fixtures do not reset per example)."""
    with EmbeddingCache(tmp_path_factory.mktemp("shared")) as c:
        yield c


def key(text, namespace="ns", model="m", dimensions=None):
    return EmbeddingCache.make_key(namespace, model, dimensions, text)


def db(c):
    """A separate connection to the cache's database, for planting and inspecting rows."""
    con = sqlite3.connect(os.path.join(c.directory, "cache.db"), isolation_level=None)
    con.execute("PRAGMA busy_timeout = 10000")
    return con


def bits(x):
    return np.asarray(x, dtype=np.float32).view(np.uint32)


# any code point, lone surrogates included (st.text() leaves them out)
any_char = st.characters(exclude_categories=()) | st.characters(categories=["Cs"])


def any_text(**kwargs):
    return st.text(any_char, **kwargs)


# ----------------------------------------------------------------------------- keys


def reference_key(namespace, model, dimensions, text):
    """The documented encoding, written out independently: tag, 8-byte length, UTF-8 bytes."""

    def field(tag, payload):
        return tag + len(payload).to_bytes(8, "big") + payload

    dims = field(b"D", b"") if dimensions is None else field(b"I", str(dimensions).encode())
    data = (
        field(b"V", str(FORMAT_VERSION).encode())
        + field(b"N", namespace.encode("utf-8", "surrogatepass"))
        + field(b"M", model.encode("utf-8", "surrogatepass"))
        + dims
        + field(b"T", text.encode("utf-8", "surrogatepass"))
    )
    return hashlib.sha256(data).hexdigest()


def test_key_is_sha256_hex_of_the_length_prefixed_fields():
    k = key("hello", "openai|host|bge|1024", "bge", 1024)
    assert len(k) == 64 and int(k, 16) >= 0
    assert k == reference_key("openai|host|bge|1024", "bge", 1024, "hello")
    assert k == key("hello", "openai|host|bge|1024", "bge", 1024)  # deterministic


@pytest.mark.parametrize(
    "a, b",
    [
        (("ns", "a", None, "bc"), ("ns", "ab", None, "c")),
        (("a", "b", None, "c"), ("ab", "", None, "c")),
        (("ns|m", "x", None, "t"), ("ns", "m|x", None, "t")),
        (("ns", "m", None, "t"), ("ns", "m", 0, "t")),
        (("ns", "m", 1, "23"), ("ns", "m", 12, "3")),
        (("ns", "m", None, "t\x00"), ("ns", "m\x00", None, "t")),
        (("ns", "m", None, "é"), ("ns", "m", None, "e\u0301")),  # no Unicode normalization
    ],
)
def test_key_injective_where_a_naive_join_is_not(a, b):
    assert EmbeddingCache.make_key(*a) != EmbeddingCache.make_key(*b)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(any_text(max_size=6), any_text(max_size=6), st.none() | st.integers(0, 5000), any_text(max_size=8)),
        min_size=2,
        max_size=6,
        unique=True,
    )
)
def test_distinct_tuples_give_distinct_keys(tuples):
    keys = [EmbeddingCache.make_key(*t) for t in tuples]
    assert len(set(keys)) == len(tuples)
    assert keys == [reference_key(*t) for t in tuples]


def test_key_handles_lone_surrogates_and_rejects_bad_types():
    assert key("\ud800") != key("\ud801")
    with pytest.raises(InvalidInputTypeError, match="text must be a str"):
        EmbeddingCache.make_key("ns", "m", None, b"bytes")
    with pytest.raises(InvalidInputTypeError, match="dimensions must be an int or None"):
        EmbeddingCache.make_key("ns", "m", "1024", "t")
    with pytest.raises(InvalidInputTypeError, match="model must be a str"):
        EmbeddingCache.make_key("ns", None, None, "t")


# ----------------------------------------------------------------------------- round trips

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)


@settings(max_examples=60, deadline=None)
@given(
    vec=hnp.arrays(np.float32, st.integers(1, 4096), elements=finite_f32),
    text=any_text(min_size=1),
)
def test_vectors_round_trip_bit_for_bit(shared_cache, vec, text):
    k = key(text, dimensions=vec.shape[0])
    shared_cache.set_many([k], vec[None, :])
    (got,) = shared_cache.get_many([k])
    assert got.dtype == np.float32 and got.shape == vec.shape
    np.testing.assert_array_equal(bits(got), bits(vec))  # keeps -0.0 and subnormals exactly


def test_round_trip_awkward_values(cache):
    tiny = np.finfo(np.float32).smallest_subnormal
    vec = np.array([-0.0, 0.0, tiny, -tiny, np.finfo(np.float32).max, -1.5, 1e-38], np.float32)
    cache.set_many([key("x")], [vec])
    np.testing.assert_array_equal(bits(cache.get_many([key("x")])[0]), bits(vec))


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(any_text(min_size=1, max_size=30), min_size=1, max_size=30, unique=True))
def test_many_texts_round_trip_in_order(shared_cache, texts):
    keys = [key(t, namespace="many") for t in texts]
    vectors = np.arange(len(texts) * 3, dtype=np.float32).reshape(-1, 3) - 7.25
    shared_cache.set_many(keys, vectors)
    got = shared_cache.get_many(list(reversed(keys)))
    np.testing.assert_array_equal(np.stack(got), vectors[::-1])


def test_get_many_misses_repeats_and_empty(cache):
    a, b, c = key("a"), key("b"), key("c")
    cache.set_many([a, b], np.array([[1, 2], [3, 4]], np.float32))
    got = cache.get_many([c, b, a, b])
    assert got[0] is None
    np.testing.assert_array_equal(got[1], [3, 4])
    np.testing.assert_array_equal(got[2], [1, 2])
    np.testing.assert_array_equal(got[3], [3, 4])
    assert cache.get_many([]) == []
    cache.set_many([], np.zeros((0, 2), np.float32))
    assert len(cache) == 2


def test_many_keys_span_several_sql_chunks(cache):
    n = 2000  # > 2 chunks of 900
    keys = [key(str(i)) for i in range(n)]
    vectors = np.random.default_rng(0).standard_normal((n, 8), dtype=np.float32)
    cache.set_many(keys, vectors)
    assert len(cache) == n
    np.testing.assert_array_equal(np.stack(cache.get_many(keys)), vectors)


def test_set_many_overwrites_and_last_duplicate_wins(cache):
    k = key("x")
    cache.set_many([k], np.ones((1, 4), np.float32))
    cache.set_many([k, k], np.array([[2, 2], [3, 3]], np.float64))
    assert len(cache) == 1
    (got,) = cache.get_many([k])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [3, 3])


def test_set_many_accepts_vectors_of_several_lengths(cache):
    keys = [key("a"), key("b")]
    cache.set_many(keys, [np.ones(3), np.zeros(5, np.float16)])
    a, b = cache.get_many(keys)
    assert a.shape == (3,) and b.shape == (5,) and not b.any()


@pytest.mark.parametrize(
    "vectors, error, message",
    [
        (np.array([[1.0, np.nan]]), InvalidInputError, "NaN or infinity"),
        (np.array([[1.0, np.inf]]), InvalidInputError, "NaN or infinity"),
        (np.array([[1e39, 0.0]]), InvalidInputError, "must fit float32"),  # finite, beyond float32
        (np.array([[1, 2]]), InvalidInputTypeError, "floating point"),
        (np.ones((2, 2)), InvalidInputError, "expected 1 vectors"),
        (np.ones(2), InvalidInputError, "2-D array"),
        (np.ones((1, 0)), InvalidInputError, "at least one column"),
        ([np.ones((2, 2))], InvalidInputError, "must be a 1-D array"),
        (42, InvalidInputTypeError, "sequence of 1-D arrays"),
    ],
)
def test_set_many_refuses_bad_vectors_and_writes_nothing(cache, vectors, error, message):
    with pytest.raises(error, match=message):
        cache.set_many([key("x")], vectors)
    assert len(cache) == 0


@pytest.mark.parametrize(
    "keys, error",
    [
        (["not hex"], InvalidInputError),
        (["ab" * 31], InvalidInputError),
        ([b"\x00" * 32], InvalidInputTypeError),
        ("ab" * 32, InvalidInputTypeError),
    ],
)
def test_bad_keys_are_refused(cache, keys, error):
    with pytest.raises(error):
        cache.set_many(keys, np.ones((1, 2), np.float32))
    with pytest.raises(error):
        cache.get_many(keys)


# ----------------------------------------------------------------------------- damage


def stored_key(k):
    return bytes.fromhex(k)


@pytest.mark.parametrize(
    "damage",
    [
        "UPDATE Cache SET value = substr(value, 1, length(value) - 4)",  # truncated payload
        "UPDATE Cache SET value = substr(value, 1, 10)",  # truncated header
        "UPDATE Cache SET value = X''",
        "UPDATE Cache SET value = X'00' || substr(value, 2)",  # bad magic
        "UPDATE Cache SET value = substr(value, 1, 20) || X'FF' || substr(value, 22)",  # in key
        "UPDATE Cache SET value = substr(value, 1, 60) || X'FF' || substr(value, 62)",  # payload
        "UPDATE Cache SET value = value || X'00000000'",  # extra bytes
        "UPDATE Cache SET value = 'some text'",
        "UPDATE Cache SET value = 12345",
        "UPDATE Cache SET value = NULL",
    ],
)
def test_damaged_entry_is_a_miss(cache, damage):
    good, bad = key("good"), key("bad")
    cache.set_many([good, bad], np.ones((2, 6), np.float32))
    with db(cache) as con:
        con.execute(damage + " WHERE key = ?", (stored_key(bad),))
    got_good, got_bad = cache.get_many([good, bad])
    assert got_bad is None
    np.testing.assert_array_equal(got_good, np.ones(6))
    cache.set_many([bad], np.full((1, 6), 2.0))  # a damaged entry is simply replaced
    np.testing.assert_array_equal(cache.get_many([bad])[0], np.full(6, 2.0))


# ----------------------------------------------------------------------------- no pickles


class _TouchOnLoad:
    """Unpickling this object creates ``path``: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_the_planted_payload_would_run_if_unpickled(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_TouchOnLoad(str(marker))))
    assert marker.exists()


def test_planted_pickled_rows_are_refused_and_never_executed(cache, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_TouchOnLoad(str(marker)))
    inline, in_file = key("inline"), key("in-file")
    val = os.path.join("ab", "cd", "planted.val")
    os.makedirs(os.path.join(cache.directory, "ab", "cd"))
    with open(os.path.join(cache.directory, val), "wb") as f:
        f.write(payload)
    insert = (
        "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count,"
        " tag, size, mode, filename, value) VALUES (?, 1, 0, NULL, 0, 0, NULL, ?, ?, ?, ?)"
    )
    with db(cache) as con:
        con.execute(insert, (stored_key(inline), 0, diskcache.core.MODE_PICKLE, None, payload))
        con.execute(insert, (stored_key(in_file), len(payload), diskcache.core.MODE_PICKLE, val, None))
        # a pickled *key* too (raw = 0), as diskcache writes for non-str keys
        con.execute(insert.replace("?, 1,", "?, 0,"), (payload, 0, diskcache.core.MODE_RAW, None, b"x"))
        # and the same payload as a raw value: bytes that are never interpreted as a pickle
        con.execute(insert, (stored_key(key("raw")), 0, diskcache.core.MODE_RAW, None, payload))

    assert cache.get_many([inline, in_file, key("raw")]) == [None, None, None]
    # diskcache's own API on this cache goes through the bytes-only Disk: refused as a miss
    assert cache._table._dc.get(stored_key(inline)) is None
    assert cache._table._dc.get(stored_key(in_file)) is None
    with pytest.raises(CacheError, match="refusing"):
        list(cache._table._dc.iterkeys())
    assert not marker.exists()


def test_planted_rows_cannot_make_clear_delete_files_outside_the_cache(cache, tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    insert = (
        "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count,"
        " tag, size, mode, filename, value) VALUES (?, 1, 0, NULL, 0, 0, NULL, 7, 2, ?, NULL)"
    )
    with db(cache) as con:
        con.execute(insert, (b"abs", str(outside)))
        con.execute(insert, (b"rel", os.path.relpath(outside, cache.directory)))
    cache.set_many([key("x")], np.ones((1, 2), np.float32))
    assert cache.clear() == 3
    assert outside.read_text() == "keep me"


def test_a_plain_diskcache_directory_is_read_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    k = key("t")
    with diskcache.Cache(str(tmp_path / "c")) as plain:  # default Disk: pickles values
        plain.set(stored_key(k), _TouchOnLoad(str(marker)))
    with EmbeddingCache(tmp_path / "c") as c:
        assert c.get_many([k]) == [None]
    assert not marker.exists()


def test_bytes_only_disk_refuses_to_write_other_values(tmp_path):
    with diskcache.Cache(str(tmp_path), disk=BytesOnlyDisk) as dc:
        for value in (np.zeros(3), 123, "text", {"a": 1}):
            with pytest.raises(InvalidInputTypeError, match="bytes only"):
                dc.set("k", value)
        with pytest.raises(InvalidInputTypeError, match="keys must be bytes or str"):
            dc.set(("tuple", "key"), b"v")
        dc.set("k", b"value")
        assert dc.get("k") == b"value"
        assert len(dc) == 1


# ----------------------------------------------------------------------------- eviction


def test_eviction_drops_the_oldest_writes_and_reads_do_not_write(tmp_path):
    # 2000 vectors of 512-d take about 4 MB or more at any page size (an empty cache: a page
    # per table and index)
    with EmbeddingCache(tmp_path, size_limit=2_000_000) as c:
        keys = [key(str(i)) for i in range(2000)]
        vectors = np.random.default_rng(1).standard_normal((2000, 512), dtype=np.float32)
        for start in range(0, 2000, 100):
            c.set_many(keys[start : start + 100], vectors[start : start + 100])
            # reading the oldest entries does not protect them: least-recently-*stored*
            c.get_many(keys[:50])
        with db(c) as con:
            before = con.execute("SELECT SUM(access_count), MAX(access_time) FROM Cache").fetchone()
            c.get_many(keys)
            after = con.execute("SELECT SUM(access_count), MAX(access_time) FROM Cache").fetchone()
        assert before == after
        present = [v is not None for v in c.get_many(keys)]
        first = present.index(True)
        assert 0 < first and all(present[first:])  # the newest survive, as one run
        assert c.info()["size_bytes"] <= 2_000_000 * 1.1
        assert c.info()["evicted"] == first  # the lifetime count of evictions
        np.testing.assert_array_equal(np.stack(c.get_many(keys[first:])), vectors[first:])


# ----------------------------------------------------------------------------- housekeeping


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBEDCACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with EmbeddingCache() as c:
        assert c.directory == str(tmp_path / "explicit")
    monkeypatch.delenv("EMBEDCACHE_DIR")
    with EmbeddingCache() as c:
        assert c.directory == str(tmp_path / "xdg" / "embedcache")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with EmbeddingCache() as c:
        assert c.directory == str(tmp_path / "home" / ".cache" / "embedcache")


def test_info_len_clear_repr_and_reopen(tmp_path):
    with EmbeddingCache(tmp_path, size_limit=10**9) as c:
        c.set_many([key("a"), key("b")], np.ones((2, 4), np.float32))
        info = c.info()
        assert info["directory"] == str(tmp_path) and info["entries"] == 2 == len(c)
        assert info["size_limit"] == 10**9 and info["size_bytes"] > 0
        assert repr(c) == f"EmbeddingCache(directory={str(tmp_path)!r})"
    with EmbeddingCache(tmp_path) as c:  # persisted
        assert len(c) == 2
        assert c.clear() == 2
        assert len(c) == 0 and c.get_many([key("a")]) == [None]


def test_pickled_cache_reopens_the_same_directory(cache):
    cache.set_many([key("a")], np.ones((1, 2), np.float32))
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.directory == cache.directory and copy.size_limit == cache.size_limit
    np.testing.assert_array_equal(copy.get_many([key("a")])[0], [1, 1])


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"size_limit": 0}, InvalidInputError),
        ({"size_limit": 1.5}, InvalidInputTypeError),
        ({"size_limit": True}, InvalidInputTypeError),
        ({"timeout": 0}, InvalidInputError),
    ],
)
def test_bad_settings(tmp_path, kwargs, error):
    with pytest.raises(error):
        EmbeddingCache(tmp_path, **kwargs)


def test_unusable_directory_raises_cache_error(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(CacheError, match="cannot open the embedding cache"):
        EmbeddingCache(not_a_dir)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "cache.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(CacheError, match="cannot open the embedding cache"):
        EmbeddingCache(corrupt)


# ----------------------------------------------------------------------------- processes


def _value_of(i):
    return np.arange(16, dtype=np.float32) * np.float32(i) + np.float32(i) / 7


def _writer(cache, worker, n_keys, rounds, start):
    """Write overlapping keys in small batches, reading back as it goes."""
    rng = np.random.default_rng(worker)
    start.wait(timeout=60)  # all four begin together, after their imports
    for _ in range(rounds):
        idx = rng.choice(n_keys, size=20, replace=False)
        cache.set_many([key(str(i)) for i in idx], np.stack([_value_of(i) for i in idx]))
        for i, got in zip(idx, cache.get_many([key(str(i)) for i in idx])):
            if got is None or not np.array_equal(got, _value_of(i)):
                raise AssertionError(f"worker {worker}: key {i} read back wrong")


def test_four_processes_writing_overlapping_keys_lose_and_corrupt_nothing(cache):
    n_keys = 120
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(4)
    procs = [ctx.Process(target=_writer, args=(cache, w, n_keys, 25, start)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with db(cache) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        (count,) = con.execute("SELECT COUNT(*) FROM Cache").fetchone()
    assert count == len(cache)  # diskcache's counter kept by the triggers
    written = set()
    for w in range(4):
        rng = np.random.default_rng(w)
        for _ in range(25):
            written.update(int(i) for i in rng.choice(n_keys, size=20, replace=False))
    assert count == len(written)
    got = cache.get_many([key(str(i)) for i in sorted(written)])
    for i, v in zip(sorted(written), got):
        np.testing.assert_array_equal(v, _value_of(i))


def test_value_header_layout(cache):
    """The documented layout: magic, dtype code, dimension, payload word-sum, key, payload."""
    vec = np.array([1.0, -2.0, 3.5], np.float32)
    cache.set_many([key("x")], vec[None])
    with db(cache) as con:
        (blob,) = con.execute("SELECT value FROM Cache").fetchone()
    magic, code, dim, checksum, own_key = struct.unpack_from("<4sB3xII32s", blob)
    assert (magic, code, dim, len(blob)) == (b"ECv1", 1, 3, 48 + 12)
    assert checksum == int(vec.view("<u4").astype(np.uint64).sum() % 2**32)
    assert own_key.hex() == key("x")
    np.testing.assert_array_equal(np.frombuffer(blob, "<f4", offset=48), vec)


def test_rows_returned_out_of_order_are_placed_by_their_own_key(cache, monkeypatch):
    keys = [key(str(i)) for i in range(50)]
    vectors = np.arange(100, dtype=np.float32).reshape(50, 2)
    cache.set_many(keys[::2], vectors[::2])  # every other one is a miss
    select = Table.select

    def shuffled(self, *args, **kwargs):  # as if SQLite had not kept the VALUES order
        for start, values in select(self, *args, **kwargs):
            yield start, values[::-1]

    monkeypatch.setattr(Table, "select", shuffled)
    got = cache.get_many(keys)
    assert all(g is None for g in got[1::2])
    np.testing.assert_array_equal(np.stack(got[::2]), vectors[::2])


def test_a_value_moved_under_another_key_is_a_miss(cache):
    a, b = key("a"), key("b")
    cache.set_many([a, b], np.array([[1, 1], [2, 2]], np.float32))
    with db(cache) as con:
        (va,) = con.execute("SELECT value FROM Cache WHERE key = ?", (stored_key(a),)).fetchone()
        con.execute("UPDATE Cache SET value = ? WHERE key = ?", (va, stored_key(b)))
    got_a, got_b = cache.get_many([a, b])
    np.testing.assert_array_equal(got_a, [1, 1])
    assert got_b is None


# ----------------------------------------------------------------------------- the diskcache adapter


def test_diskcache_is_a_tested_version_with_the_internals_the_adapter_uses(tmp_path):
    """Fails loudly when diskcache changes what the adapter relies on: then check the adapter's
    SQL against the new version and move the pin in pyproject.toml."""
    from packaging.specifiers import SpecifierSet

    pyproject = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'"diskcache{_diskcache.TESTED}"' in pyproject
    assert diskcache.__version__ in SpecifierSet(_diskcache.TESTED)
    with diskcache.Cache(str(tmp_path)) as plain:  # a cache as diskcache itself makes it
        con = plain._con  # the thread-local, fork-aware connection
        assert isinstance(con, sqlite3.Connection)
        columns = tuple((r[1], r[2]) for r in con.execute("PRAGMA table_info(Cache)"))
        assert columns == _diskcache.COLUMNS
        assert isinstance(plain._disk, diskcache.Disk) and callable(plain._disk.remove)
        plain.set(b"k", b"raw bytes")
        row = con.execute("SELECT raw, mode, filename, value FROM Cache").fetchone()
        assert row == (1, diskcache.core.MODE_RAW, None, b"raw bytes")
        # the triggers that keep diskcache's count and size up to date under our own SQL
        con.execute("DELETE FROM Cache")
        assert len(plain) == 0


def test_a_cache_table_of_another_layout_is_refused_at_open(tmp_path):
    con = sqlite3.connect(tmp_path / "cache.db")  # as a later diskcache might: one more column
    columns = ", ".join(f"{name} {kind}" for name, kind in _diskcache.COLUMNS[1:])
    con.execute(f"CREATE TABLE Cache (rowid INTEGER PRIMARY KEY, {columns}, checksum BLOB)")
    con.commit()
    con.close()
    with pytest.raises(CacheError, match=r"cannot open the embedding cache at .*expected diskcache's Cache table"):
        EmbeddingCache(tmp_path)


def test_sql_chunk_size_comes_from_config(cache):
    keys = [key(str(i)) for i in range(23)]
    vectors = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)
    with _config.override(CACHE_SQL_CHUNK=5):
        cache.set_many(keys, vectors)
        chunks = [len(values) for _, values in cache._table.select([bytes.fromhex(k) for k in keys])]
        np.testing.assert_array_equal(np.stack(cache.get_many(keys)), vectors)
    assert chunks == [5, 5, 5, 5, 3]


def test_a_write_of_new_and_stored_keys_across_chunks_keeps_order_and_counts(cache):
    # the new rows of a write go in one INSERT per chunk: every one must land, in the order
    # given (rowids follow the batch, so a batch re-read in order reads neighbouring rows),
    # and fire the count triggers once each
    rng = np.random.default_rng(3)
    raw = [bytes.fromhex(key(str(i))) for i in range(23)]
    stored = raw[::3]  # 8 keys already in the cache when the second write comes
    with _config.override(CACHE_SQL_CHUNK=4):
        cache.put(stored, rng.standard_normal((8, 3), dtype=np.float32), source=("ns", "m", 3))
        second = rng.standard_normal((23, 3), dtype=np.float32)
        cache.put(raw, second, source=("ns", "m", 3))
    found, got = cache.lookup(raw, 3)
    assert found.all()
    np.testing.assert_array_equal(got, second)
    assert len(cache) == 23
    (ns,) = cache.info()["namespaces"]
    assert ns["entries"] == 23 and ns["vector_dimensions"] == 3
    con = db(cache)
    order = [k for (k,) in con.execute("SELECT key FROM Cache ORDER BY rowid")]
    con.close()
    new = [k for k in raw if k not in stored]
    assert [k for k in order if k not in stored] == new


# ----------------------------------------------------------------------------- faults of the machine


def test_a_write_blocked_by_another_writer_raises_cache_error_and_reads_go_on(tmp_path):
    with EmbeddingCache(tmp_path, timeout=0.2) as c:
        c.set_many([key("old")], np.ones((1, 4), np.float32))
        blocker = db(c)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(CacheError, match=r"stayed locked by another writer for more than 0.2 s") as info:
                c.set_many([key("new")], np.ones((1, 4), np.float32))
            assert str(tmp_path) in str(info.value)
            np.testing.assert_array_equal(c.get_many([key("old")])[0], np.ones(4))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        c.set_many([key("new")], np.ones((1, 4), np.float32))  # no transaction was left open
        assert len(c) == 2


_FSIZE_WORKER = r"""
import json, os, resource, signal, sys
import numpy as np
from embedcache import EmbeddingCache
from embedcache.errors import CacheError

directory = sys.argv[1]
key = lambda t: EmbeddingCache.make_key("ns", "m", None, t)
old = [key(f"old {i}") for i in range(50)]
new = [key(f"new {i}") for i in range(2000)]
rng = np.random.default_rng(0)
old_vectors = rng.standard_normal((50, 256), dtype=np.float32)
out = {}
cache = EmbeddingCache(directory)
cache.set_many(old, old_vectors)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
largest = max(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
resource.setrlimit(resource.RLIMIT_FSIZE, (largest + 64 * 1024, hard))
try:
    cache.set_many(new, rng.standard_normal((2000, 256), dtype=np.float32))  # 2 MB > the limit
except CacheError as exc:
    out["error"], out["cause"] = str(exc), type(exc.__cause__).__name__
out["old_served"] = all(np.array_equal(g, v) for g, v in zip(cache.get_many(old), old_vectors))
out["new_absent"] = cache.get_many(new[:5] + new[-5:]) == [None] * 10
out["entries"] = len(cache)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
cache.set_many(new[:10], np.ones((10, 256), np.float32))
out["entries_after"] = len(cache)
print(json.dumps(out))
"""


def _run_worker(script, *args, **popen):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=120,
        **popen,
    )
    assert done.returncode == 0, done.stderr
    import json

    return json.loads(done.stdout.splitlines()[-1])


def test_a_write_past_the_file_size_limit_raises_cache_error_and_keeps_the_last_commit(tmp_path):
    directory = tmp_path / "cache"
    out = _run_worker(_FSIZE_WORKER, directory)
    assert out["error"].startswith(f"cannot write the embedding cache at {str(directory)!r}")
    assert "file-size limit" in out["error"] and out["cause"] == "OperationalError"
    assert out["old_served"] and out["new_absent"]
    assert out["entries"] == 50  # nothing of the failed call was kept
    assert out["entries_after"] == 60  # and the cache takes writes again once there is room
    with EmbeddingCache(directory) as c:  # another process reads the last commit
        assert len(c) == 60
        with db(c) as con:
            assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)


_READ_ONLY_WORKER = """
import json, sys
import numpy as np
from embedcache import CacheError, EmbeddingCache
key = EmbeddingCache.make_key("ns", "m", None, "b")
try:
    with EmbeddingCache(sys.argv[1]) as c:
        c.set_many([key], np.ones((1, 2), np.float32))
    print(json.dumps({"error": None}))
except CacheError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def test_a_read_only_cache_raises_cache_error_naming_the_directory(tmp_path):
    directory = tmp_path / "cache"
    with EmbeddingCache(directory) as c:
        c.set_many([key("a")], np.ones((1, 2), np.float32))
    for f in directory.iterdir():
        f.chmod(0o444)
    directory.chmod(0o555)
    try:
        out = _run_worker(_READ_ONLY_WORKER, directory, **bound_by_modes())
    finally:
        directory.chmod(0o755)
        for f in directory.iterdir():
            f.chmod(0o644)
    assert out["error"] is not None and f"embedding cache at {str(directory)!r}" in out["error"]
    with EmbeddingCache(directory) as c:  # what was there is still served
        assert c.get_many([key("a")])[0] is not None


def test_another_programs_diskcache_or_a_store_is_never_opened_as_the_cache(tmp_path):
    from embedcache import VectorStore

    with diskcache.Cache(str(tmp_path / "theirs")) as theirs:
        theirs["user-key"] = "precious"
    tables = {r[0] for r in sqlite3.connect(tmp_path / "theirs" / "cache.db").execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    with pytest.raises(CacheError, match="holds another program's diskcache"):
        EmbeddingCache(tmp_path / "theirs")
    with diskcache.Cache(str(tmp_path / "theirs")) as theirs:
        assert theirs["user-key"] == "precious"
    assert {r[0] for r in sqlite3.connect(tmp_path / "theirs" / "cache.db").execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")} == tables  # nothing added to it
    with VectorStore(tmp_path / "store") as store:
        store.add(["a"], np.ones((1, 3), np.float32))
    with pytest.raises(CacheError, match="is a vector store, not an embedding cache"):
        EmbeddingCache(tmp_path / "store")
    assert not (tmp_path / "store" / "cache.db").exists()
    diskcache.Cache(str(tmp_path / "empty")).close()  # made, never filled: nothing to lose
    with EmbeddingCache(tmp_path / "empty") as cache:
        key = cache.make_key("ns", "m", None, "x")
        cache.set_many([key], np.ones((1, 3), np.float32))
    with EmbeddingCache(tmp_path / "empty") as cache:  # and ours from then on
        assert cache.get_many([key])[0] is not None
