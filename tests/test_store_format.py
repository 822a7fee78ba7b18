"""VectorStore: the on-disk format, reopening, settings, and damage named by file."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from support.stores import SMALL, ids_of, vecs

from embedcache import _config
from embedcache.errors import (
    ConfigurationError,
    DimensionMismatchError,
    InvalidInputError,
    NamespaceMismatchError,
    StoreCorruptedError,
    StoreError,
)
from embedcache.store import FORMAT_VERSION, VectorStore

FIXTURES = Path(__file__).parent / "data"


@pytest.fixture
def path(tmp_path):
    return tmp_path / "store"


def _make(path, n=20):
    with _config.override(MAX_SEGMENT_BYTES=SMALL), VectorStore(path) as s:
        s.add(ids_of(n), vecs(n))
    return sorted((path / "segments").iterdir())


def test_add_get_reopen_keeps_everything(path):
    x = vecs(30)
    md = [{"n": i, "even": i % 2 == 0} for i in range(30)]
    with _config.override(MAX_SEGMENT_BYTES=SMALL), VectorStore(path) as s:
        s.add(ids_of(20), x[:20], metadata=md[:20])
        s.add(ids_of(10, "q"), x[20:])
        assert len(s) == 30 and s.dimensions == 16 and s.dtype == "float32" and s.metric == "cosine"
    with VectorStore(path) as s:
        assert s.ids() == ids_of(20) + ids_of(10, "q")
        assert list(s) == s.ids()
        assert "r3" in s and "q9" in s and "zz" not in s and 3 not in s
        np.testing.assert_array_equal(s.get(["q1", "r19", "r0"]), x[[21, 19, 0]])
        assert s.metadata(["r5", "q0"]) == [md[5], {}]
        np.testing.assert_array_equal(s.vectors(), x)
        info = s.info()
        assert info["rows"] == 30 and info["deleted"] == 0 and info["segments"] > 1
        assert info["format_version"] == FORMAT_VERSION
        assert s.verify()["live"] == 30


def test_format_is_readable_without_embedcache(path):
    """The documented format: segments of raw little-endian rows, located through SQLite."""
    x = vecs(20)
    with _config.override(MAX_SEGMENT_BYTES=SMALL), VectorStore(path) as s:
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


def test_a_store_written_before_the_package_split_opens_and_reads_back(path):
    """tests/data/store-format-1 was written by the single-module store of embedcache 0.x
    (segments of 3 rows, a delete, an upsert, add_texts with text_key="body"); the code that
    made it is in tests/data/README.md. Its bytes must read back as they were written."""
    shutil.copytree(FIXTURES / "store-format-1", path)
    x = (np.arange(24, dtype=np.float32).reshape(6, 4) - 10) / 8
    texts = np.array([[5, 1, -1, 0.5], [5, 1, -1, 0.5]], np.float32)
    with VectorStore(path) as s:
        assert s.verify() == {"segments": 4, "rows": 9, "live": 7, "bytes": 9 * 4 * 4}
        assert s.ids() == ["t1", "t2", "a", "d", "e", "f", "b"]
        np.testing.assert_array_equal(s.vectors(), np.vstack([texts, x[[0, 3, 4, 5]], x[[5]] * 2]))
        assert s.metadata(s.ids()) == [
            {"src": "s", "body": "hello"},
            {"body": "wörld"},
            {"n": 1},
            {"nested": {"k": None}},
            {},
            {"w": 1.5},
            {"lang": "de"},
        ]
        info = s.info()
        assert (info["dimensions"], info["dtype"], info["metric"], info["text_key"]) == (4, "float32", "cosine", "body")
        assert (info["namespace"], info["model"]) == ("fixture|1", "fixture-model")
        assert (info["embedder_base_url"], info["embedder_dimensions"]) == ("http://localhost:9/v1", 4)
        assert (info["deleted"], info["generation"]) == (2, 4)
        _, found = s.search(x[[3]], k=1)
        assert found.tolist() == [["d"]]
        s.add(["g"], x[[1]])  # and it takes writes in the same format
    with VectorStore(path) as s:
        assert s.ids()[-1] == "g" and s.verify()["live"] == 8


def test_settings_are_recorded_and_checked(path):
    VectorStore(path, dimensions=16, dtype="float16", metric="dot", namespace="ns", model="m").close()
    with VectorStore(path) as s:
        assert (s.dimensions, s.dtype, s.metric, s.namespace, s.model) == (16, "float16", "dot", "ns", "m")
    with pytest.raises(DimensionMismatchError, match="dimension 16.*got dimension 8"):
        VectorStore(path, dimensions=8)
    with pytest.raises(ConfigurationError, match="float16"):
        VectorStore(path, dtype="float32")
    with pytest.raises(ConfigurationError, match="metric"):
        VectorStore(path, metric="cosine")
    with pytest.raises(NamespaceMismatchError, match="'ns'.*'other'"):
        VectorStore(path, namespace="other")
    # a bad option is bad input, the same class and message as everywhere
    with pytest.raises(InvalidInputError, match="metric must be one of 'cosine', 'dot', got 'l2'"):
        VectorStore(path / "x", metric="l2")
    with pytest.raises(InvalidInputError, match="dtype must be one of 'float32', 'float16', got 'int8'"):
        VectorStore(path / "y", dtype="int8")
    assert not (path / "x").exists() and not (path / "y").exists()


def test_dimension_is_taken_from_first_add_and_enforced(path):
    with VectorStore(path) as s:
        assert s.dimensions is None and len(s) == 0
        scores, ids = s.search(np.ones((2, 5)), k=3)
        assert scores.shape == (2, 0) and ids.shape == (2, 0)
        s.add(["a"], np.ones((1, 5)))
        assert s.dimensions == 5
        with pytest.raises(DimensionMismatchError, match="dimension 5, got dimension 6"):
            s.add(["b"], np.ones((1, 6)))
        with pytest.raises(DimensionMismatchError, match="dimension 5"):
            s.search(np.ones((1, 6)))
        assert s.ids() == ["a"]


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


def test_damaged_next_segment_never_overwrites_a_committed_file(path):
    _make(path)
    db = sqlite3.connect(path / "store.sqlite")
    db.execute("UPDATE settings SET value = 1 WHERE key = 'next_segment'")
    db.commit()
    db.close()
    with _config.override(MAX_SEGMENT_BYTES=SMALL), VectorStore(path) as s:
        with pytest.raises(StoreCorruptedError, match="next_segment"):
            s.verify()
        s.add(["new"], vecs(1, seed=5))
        assert s.verify()["live"] == 21
        np.testing.assert_array_equal(s.get(["r0", "r19", "new"]), np.vstack([vecs(20)[[0, 19]], vecs(1, seed=5)]))
