"""The cache keeps what was paid for: no limit by default, evictions only under a limit the
user set (counted, warned about, shown), writes that stop before the disk fills, namespaces
counted without scanning and pruned on purpose, and the CLI's --cache-size, estimate and
``cache info`` / ``cache prune``."""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
import subprocess
import sys
import warnings

import numpy as np
import pytest

import embedcache as ec
from embedcache import _config
from embedcache.cache import CacheEvictionWarning, _diskcache, _space
from embedcache.cache._space import entry_bytes, format_size, free_bytes, parse_size
from embedcache.cli import main
from embedcache.errors import CacheError, InvalidInputError, InvalidInputTypeError


class Counting:
    """A deterministic embedder of ``dimensions`` that counts the texts it was asked for."""

    def __init__(self, dimensions=16, namespace="test|counting"):
        self.dimensions = dimensions
        self.model = "counting"
        self.cache_namespace = f"{namespace}|{dimensions}"
        self.asked = 0

    def embed(self, texts):
        self.asked += len(texts)
        seeds = [sum(t.encode()) for t in texts]
        return np.stack([np.random.default_rng(s).standard_normal(self.dimensions) for s in seeds]).astype(np.float32)


def texts(n, prefix="t"):
    return [f"{prefix} {i}" for i in range(n)]


def embed_in_batches(emb, items, batch):
    for start in range(0, len(items), batch):
        emb.embed(items[start : start + batch], progress=False)


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "given, expected",
    [
        ("500MB", 500 * 10**6), ("40GB", 40 * 10**9), ("2GiB", 2 * 2**30), ("1.5 kb", 1500),
        ("1000000", 10**6), ("7", 7), (" 3T ", 3 * 10**12), ("512KiB", 512 * 1024), (4096, 4096),
        (np.int64(10), 10), (None, None), ("none", None), ("Unlimited", None),
    ],
)
def test_sizes_parse_as_bytes_or_units(given, expected):
    assert parse_size("--cache-size", given) == expected


@pytest.mark.parametrize(
    "given, error",
    [("40 XB", InvalidInputError), ("", InvalidInputError), ("-1GB", InvalidInputError),
     ("0", InvalidInputError), (0, InvalidInputError), (1.5, InvalidInputTypeError),
     (True, InvalidInputTypeError), ("GB", InvalidInputError)],
)
def test_bad_sizes_say_what_was_expected(given, error):
    with pytest.raises(error, match="size"):
        parse_size("size_limit", given)


def test_sizes_print_for_people():
    assert [format_size(n) for n in (0, 999, 1000, 6_740_000, 40 * 10**9, None)] == [
        "0 B", "999 B", "1 kB", "6.74 MB", "40 GB", "no limit"]


def disk_bytes(path):
    return sum(f.stat().st_size for f in path.iterdir())


@pytest.mark.parametrize(
    "dim, page",
    [(384, None), (1024, None), (100, 4096), (384, 4096), (1024, 4096), (1536, 4096),
     (384, 65536), (1024, 65536), (768, 16384), (1536, 32768)],
)
def test_the_estimate_of_an_entry_matches_what_the_disk_holds(tmp_path, dim, page):
    # the page layout model against the bytes a cache adds per entry, at the default page
    # size and others, for vectors that share pages, fill one, or spill into overflow pages
    # (what the first 500 entries add includes the part of the empty cache's pages they fill)
    n = 4000
    page = page or _config.CACHE_PAGE_SIZE
    sizes = []
    with _config.override(CACHE_PAGE_SIZE=page), ec.EmbeddingCache(tmp_path) as c:
        keys = c.raw_keys("ns", "m", dim, texts(n))
        for start in range(0, n, 500):  # as CachedEmbedder writes: batch by batch
            c.put(keys[start : start + 500], np.ones((500, dim), np.float32))
            c.close()
            sizes.append(disk_bytes(tmp_path))
        assert c.info()["page_size"] == page
    per_entry = (sizes[-1] - sizes[0]) / (n - 500)
    assert per_entry == pytest.approx(entry_bytes(dim, page), rel=0.03)


def test_new_caches_get_the_configured_page_size_and_older_caches_keep_theirs(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    other = 65536 if _config.CACHE_PAGE_SIZE != 65536 else 4096  # as made by an earlier version
    x = np.random.default_rng(0).standard_normal((300, 384), dtype=np.float32)
    keys = ec.EmbeddingCache.raw_keys("ns", "m", 384, texts(300))
    with _config.override(CACHE_PAGE_SIZE=other), ec.EmbeddingCache(old) as c:
        c.put(keys[:200], x[:200], source=("ns", "m", 384))
    for path, page in ((new, _config.CACHE_PAGE_SIZE), (old, other)):
        with ec.EmbeddingCache(path) as c:
            c.put(keys[100:], x[100:], source=("ns", "m", 384))
            found, got = c.lookup(keys, 384)
            start = 0 if path == old else 100
            assert found[start:].all() and not found[:start].any()
            np.testing.assert_array_equal(got[start:], x[start:])
            info = c.info()
            assert info["page_size"] == page and info["entries"] == 300 - start
            assert info["namespaces"][0]["entries"] == 300 - start
        with sqlite3.connect(path / "cache.db") as con:
            assert con.execute("PRAGMA page_size").fetchone()[0] == page
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert _config.CACHE_PAGE_SIZE != other


# ----------------------------------------------------------------------------- no limit by default


def test_the_default_cache_has_no_limit_and_evicts_nothing(tmp_path, monkeypatch):
    # diskcache is told a huge limit when there is none; make that "huge" tiny: far past it,
    # nothing is evicted, because only a limit the user set ever evicts
    monkeypatch.setattr(_diskcache, "_NO_LIMIT", 100_000)
    cache = ec.EmbeddingCache(tmp_path)
    assert cache.size_limit is None and cache.info()["size_limit"] is None
    inner = Counting(dimensions=8)
    emb = ec.CachedEmbedder(inner, cache=cache)
    items = texts(6000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheEvictionWarning)
        embed_in_batches(emb, items, 500)
    assert cache.info()["size_bytes"] > 10 * 100_000  # ten times the patched limit
    assert emb.stats.evicted == 0 and cache.info()["evicted"] == 0 and len(cache) == 6000
    emb.embed(items, progress=False)  # the rerun pays for nothing
    assert inner.asked == 6000 and emb.stats.hits == 6000


def test_a_size_limit_is_a_per_object_setting_and_pickles(tmp_path):
    limited = ec.EmbeddingCache(tmp_path, size_limit="40GB")
    assert limited.size_limit == 40 * 10**9
    assert pickle.loads(pickle.dumps(limited)).size_limit == 40 * 10**9
    assert pickle.loads(pickle.dumps(ec.EmbeddingCache(tmp_path))).size_limit is None


# ----------------------------------------------------------------------------- a limit that evicts


def test_a_limit_that_forces_eviction_is_counted_warned_and_shown(tmp_path):
    cache = ec.EmbeddingCache(tmp_path, size_limit="2MB")
    inner = Counting(dimensions=64)
    emb = ec.CachedEmbedder(inner, cache=cache)
    items = texts(20_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embed_in_batches(emb, items, 1000)
    evicted = emb.stats.evicted
    assert evicted > 10_000  # the limit holds a few thousand of these vectors
    assert cache.info()["evicted"] == evicted == 20_000 - len(cache)
    warned = [w for w in caught if issubclass(w.category, CacheEvictionWarning)]
    assert warned and all(str(tmp_path) in str(w.message) and "2 MB" in str(w.message) for w in warned)
    assert sum(int(str(w.message).split()[3]) for w in warned) == evicted  # "this call evicted N ..."
    assert warned[0].filename == __file__  # points at the caller's line
    # what was evicted is exactly what the rerun pays for again
    rerun = ec.CachedEmbedder(inner, cache=ec.EmbeddingCache(tmp_path))  # no limit: keeps it all
    before = inner.asked
    rerun.embed(items, progress=False)
    assert inner.asked - before == evicted == rerun.stats.misses and rerun.stats.evicted == 0
    # the lifetime count survives reopening, and counts other processes' evictions too
    assert ec.EmbeddingCache(tmp_path).info()["evicted"] == evicted


def test_evictions_of_several_processes_add_up(tmp_path):
    script = (
        "import sys, warnings, numpy as np, embedcache as ec\n"
        "c = ec.EmbeddingCache(sys.argv[1], size_limit=1_000_000)\n"
        "keys = c.raw_keys('ns', sys.argv[2], None, [str(i) for i in range(3000)])\n"
        "print(sum(c.put(keys[s:s + 300], np.ones((300, 64), np.float32)) for s in range(0, 3000, 300)))\n"
    )
    counts = []
    for model in ("a", "b"):
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path), model],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        counts.append(int(done.stdout))
    assert counts[0] > 0 and counts[1] > 0
    assert ec.EmbeddingCache(tmp_path).info()["evicted"] == sum(counts)


# ----------------------------------------------------------------------------- a disk that fills


def test_a_write_that_would_fill_the_disk_is_refused_naming_the_directory_and_the_free_space(tmp_path):
    cache = ec.EmbeddingCache(tmp_path)
    keys = cache.raw_keys("ns", "m", None, ["old"])
    cache.put(keys, np.ones((1, 4), np.float32))
    free = free_bytes(str(tmp_path))
    with _config.override(CACHE_MIN_FREE_BYTES=free + 10**9):
        with pytest.raises(CacheError) as info:
            cache.put(cache.raw_keys("ns", "m", None, ["new"]), np.ones((1, 4), np.float32))
    message = str(info.value)
    assert message.startswith(f"not writing to the embedding cache at {str(tmp_path)!r}")
    assert "GB free" in message and "kept free" in message
    assert len(cache) == 1 and cache.lookup(keys, 4)[0].all()


def test_an_embed_call_on_a_full_disk_returns_its_vectors_and_loses_nothing_written(tmp_path):
    inner = Counting()
    emb = ec.CachedEmbedder(inner, cache=ec.EmbeddingCache(tmp_path))
    first = emb.embed(texts(100), progress=False)
    with _config.override(CACHE_MIN_FREE_BYTES=free_bytes(str(tmp_path)) + 10**9):
        with pytest.warns(RuntimeWarning, match="free") as caught:
            x = emb.embed(texts(300), progress=False)
    assert str(tmp_path) in str(caught[0].message)
    np.testing.assert_array_equal(x, inner.embed(texts(300)))  # every vector, correct
    np.testing.assert_array_equal(x[:100], first)
    assert len(emb.cache) == 100  # what was written before is all still there
    before = inner.asked
    emb.embed(texts(100), progress=False)
    assert inner.asked == before


# ----------------------------------------------------------------------------- namespaces


def test_info_counts_namespaces_without_reading_the_cache_table(tmp_path):
    cache = ec.EmbeddingCache(tmp_path)
    a = ec.CachedEmbedder(Counting(16, "ns|a"), cache=cache)
    b = ec.CachedEmbedder(Counting(32, "ns|b"), cache=cache)
    a.embed(texts(50), progress=False)
    b.embed(texts(20), progress=False)
    b.embed(texts(30), progress=False)  # 10 new, 20 hits
    cache.set_many([cache.make_key("x", "y", None, "z")], np.ones((1, 3), np.float32))  # no source
    statements = []
    cache._table._dc._con.set_trace_callback(statements.append)
    info = cache.info()
    cache._table._dc._con.set_trace_callback(None)
    assert not [s for s in statements if " Cache " in f" {s} ".replace("\n", " ") or "FROM Cache" in s]
    assert info["entries"] == 81
    assert info["namespaces"] == [
        {"namespace": "ns|a|16", "model": "counting", "dimensions": 16, "entries": 50, "vector_dimensions": 16},
        {"namespace": "ns|b|32", "model": "counting", "dimensions": 32, "entries": 30, "vector_dimensions": 32},
    ]


def test_namespace_counts_follow_rewrites_evictions_and_clear(tmp_path):
    cache = ec.EmbeddingCache(tmp_path)
    keys = cache.raw_keys("ns", "m", None, texts(100))
    cache.put(keys, np.ones((100, 8), np.float32), source=("ns", "m", None))
    cache.put(keys[:40], np.zeros((40, 8), np.float32), source=("ns", "m", None))  # rewrites
    cache.put(keys[90:], np.zeros((10, 8), np.float32), source=("other", "m", 8))  # moves 10
    counts = {ns["namespace"]: ns["entries"] for ns in cache.info()["namespaces"]}
    assert counts == {"ns": 90, "other": 10}
    with sqlite3.connect(os.path.join(cache.directory, "cache.db")) as con:
        assert con.execute("SELECT COUNT(*) FROM Cache WHERE tag IS NOT NULL").fetchone() == (100,)
    cache.clear()
    assert cache.info()["namespaces"] == [] and cache.info()["evicted"] == 0


def test_prune_removes_one_namespace_across_chunks_and_nothing_else(tmp_path):
    cache = ec.EmbeddingCache(tmp_path)
    keep = ec.CachedEmbedder(Counting(8, "keep"), cache=cache)
    drop_a = ec.CachedEmbedder(Counting(8, "drop"), cache=cache)
    drop_b = ec.CachedEmbedder(Counting(16, "drop"), cache=cache)
    for i in range(3):  # interleaved writes
        keep.embed(texts(30, f"k{i}"), progress=False)
        drop_a.embed(texts(40, f"a{i}"), progress=False)
    drop_b.embed(texts(5), progress=False)
    with _config.override(CACHE_DELETE_CHUNK=7):
        assert cache.prune("drop|8") == 120 and cache.prune("nothing") == 0
    assert {ns["namespace"]: ns["entries"] for ns in cache.info()["namespaces"]} == {"keep|8": 90, "drop|16": 5}
    assert len(cache) == 95
    before = keep.embedder.asked
    keep.embed(texts(30, "k1"), progress=False)
    assert keep.embedder.asked == before
    with pytest.raises(InvalidInputTypeError):
        cache.prune(b"drop|8")


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMBEDCACHE_DIR", str(tmp_path / "cache"))
    for key in ("IONOS_API_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.delenv(key, raising=False)

    def run(*args, ok=True):
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        assert (code == 0) == ok, err
        return out, err

    return run


def write_rows(path, items):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in items), encoding="utf-8")


def test_cli_cache_size_evicts_says_so_and_cache_info_shows_it(cli, tmp_path):
    for part in range(3):
        write_rows(tmp_path / f"part{part}.jsonl", texts(1500, f"part {part}"))
    out, err = cli("embed", "part0.jsonl", "-o", "a.npy", "--provider", "hashing", "--cache-size", "8MB")
    assert "evicted" not in err
    _, err = cli("embed", "part1.jsonl", "-o", "b.npy", "--provider", "hashing", "--cache-size", "8MB", "-q")
    lines = [line for line in err.splitlines() if "evicted" in line]
    assert len(lines) == 1, err  # shown even with --quiet; the library's warning is not repeated
    n = int(lines[0].split("warning: ")[1].split()[0])
    assert n > 0 and f"under --cache-size 8 MB" in lines[0] and "--cache-size" in lines[0].split(";")[1]
    out, _ = cli("cache", "info")
    assert f"evicted: {n} vectors so far" in out and "size_limit: no limit" in out
    assert f"entries: {3000 - n}" in out
    namespace = ec.HashingEmbeddings().cache_namespace
    assert f"  {namespace}  model=hashing-char-3-5  dimensions=512  entries={3000 - n}" in out
    out, _ = cli("cache", "info", "--cache-size", "40GB")
    assert "size_limit: 40 GB" in out
    out, _ = cli("cache", "prune", "--namespace", namespace)
    assert f"removed {3000 - n} cached vectors of {namespace}" in out
    assert "entries: 0" in cli("cache", "info")[0]


def test_cli_estimates_the_space_of_a_job_before_it_starts(cli, tmp_path, monkeypatch):
    write_rows(tmp_path / "rows.jsonl", texts(1000))
    _, err = cli("embed", "rows.jsonl", "-o", "a.npy", "--provider", "hashing", "--cache-size", "1MB")
    need = format_size(1000 * entry_bytes(512))
    assert err.splitlines()[0] == (
        f"embedcache: warning: the 1000 vectors of this job take about {need} in the cache, more than "
        f"--cache-size 1 MB: vectors it pays for will be evicted before it ends; pass --cache-size "
        f"{need.replace(' ', '')} or more, or leave it out"
    )
    _, err = cli("embed", "rows.jsonl", "-o", "b.npy", "--provider", "hashing")
    assert "warning" not in err
    # a disk with less free space than the job needs (writes are then refused too: no room)
    monkeypatch.setattr(_space, "free_bytes", lambda directory: 1000)
    _, err = cli("dedup", "rows.jsonl", "-o", "kept.jsonl", "--provider", "hashing", "-q")
    assert "more than the 1 kB free on the disk of" in err and str(tmp_path / "cache") in err


@pytest.mark.parametrize("value", ["lots", "0", "-5MB"])
def test_cli_bad_cache_size_is_one_line(cli, tmp_path, value):
    write_rows(tmp_path / "rows.jsonl", texts(3))
    _, err = cli("embed", "rows.jsonl", "-o", "a.npy", "--provider", "hashing", "--cache-size", value, ok=False)
    assert len(err.strip().splitlines()) == 1 and err.startswith("embedcache: error: ")
    assert "--cache-size" in err and "Traceback" not in err


def test_cli_prune_of_an_unknown_namespace_names_those_held(cli, tmp_path):
    write_rows(tmp_path / "rows.jsonl", texts(3))
    cli("embed", "rows.jsonl", "-o", "a.npy", "--provider", "hashing")
    _, err = cli("cache", "prune", "--namespace", "nope", ok=False)
    assert err.strip() == (
        f"embedcache: error: --namespace 'nope': the cache at {tmp_path / 'cache'} holds no vectors "
        f"of it; namespaces it holds: {ec.HashingEmbeddings().cache_namespace}"
    )


def test_every_command_that_embeds_takes_cache_size(cli):
    for command in (["embed"], ["dedup"], ["pairs"], ["store", "add"], ["store", "search"], ["cache", "info"]):
        out, _ = cli(*command, "--help")
        assert "--cache-size SIZE" in out, command
