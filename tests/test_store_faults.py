"""Faults of the machine during a write: a file-size limit, a full disk, a read-only directory.

Each raises StoreWriteError (a StoreError and an OSError) naming the file, with the cause
chained, and leaves the store at its last commit: it verifies, holds the rows it held, and takes
the next write. The file-size limit is real (RLIMIT_FSIZE in a subprocess, SIGXFSZ ignored so
that write() fails with EFBIG) and needs no privileges; so is the read-only directory (chmod),
whose writer, when the tests run as root, runs without root's override of file modes.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from support.modes import bound_by_modes
from support.stores import ids_of, vecs

from embedcache import _config
from embedcache.errors import StoreError, StoreWriteError
from embedcache.store import VectorStore
from embedcache.store import _write as store_write

D = 64
ROOT = Path(__file__).resolve().parents[1]

# Runs one write in a fresh process under a limit, reports what it raised and the state after.
WRITER = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    from pathlib import Path
    import numpy as np
    from embedcache.errors import StoreError
    from embedcache.store import VectorStore

    path, case = Path(sys.argv[1]), sys.argv[2]
    s = VectorStore(path)
    before = len(s)
    if case.startswith("limit"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of a kill
        largest = max(p.stat().st_size for p in path.rglob("*") if p.is_file())
        resource.setrlimit(resource.RLIMIT_FSIZE, (largest + 16384, resource.RLIM_INFINITY))
    x = np.random.default_rng(1).standard_normal((4000, %(D)d)).astype(np.float32)
    out = {}
    try:
        if case.endswith("segment"):  # 1 MiB of vectors: the new segment passes the limit
            s.add([f"n{i}" for i in range(4000)], x)
        elif case.endswith("database"):  # small vectors, 1 MB of metadata: SQLite's log passes it
            s.add([f"n{i}" for i in range(20)], x[:20], metadata=[{"text": "m" * 50000}] * 20)
        else:  # compact rewrites every live row into one segment
            s.compact()
        out["raised"] = None
    except StoreError as exc:
        cause = exc.__cause__
        out.update(raised=type(exc).__name__, message=str(exc), errno=exc.errno,
                   is_oserror=isinstance(exc, OSError), cause=type(cause).__module__ + "." + type(cause).__name__)
    out["len_before"], out["len_after"] = before, len(s)
    out["verify"] = s.verify()
    s.close()
    print(json.dumps(out))
    """
    % {"D": D}
)


def _seed(path: Path) -> tuple[list[str], np.ndarray]:
    """A store of 600 rows in 64 KiB segments, two rows deleted (so compact has work)."""
    x = vecs(600, D)
    with _config.override(MAX_SEGMENT_BYTES=64 * 1024), VectorStore(path) as s:
        for a in range(0, 600, 200):
            s.add(ids_of(600)[a : a + 200], x[a : a + 200], metadata=[{"i": i} for i in range(a, a + 200)])
        s.delete(["r3", "r404"])
        ids = s.ids()
    keep = [i for i in range(600) if i not in (3, 404)]
    return ids, x[keep]


def _committed_files(path: Path) -> set[str]:
    db = sqlite3.connect(path / "store.sqlite")
    try:
        return {Path(f).name for (f,) in db.execute("SELECT file FROM segments")}
    finally:
        db.close()


def _run_writer(path: Path, case: str, **popen) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", WRITER, str(path), case], capture_output=True, text=True, env=env, timeout=120, **popen
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_at_last_commit(path: Path, ids: list[str], x: np.ndarray) -> None:
    """The store verifies, holds exactly ``ids``/``x``, lists no stray file, and takes a write."""
    with VectorStore(path) as s:
        assert s.verify()["live"] == len(ids)
        assert s.ids() == ids
        np.testing.assert_array_equal(s.vectors(), x)
        assert s.metadata(ids[:2]) == [{"i": 0}, {"i": 1}]
        s.add(["after"], vecs(1, D, seed=9))
    with VectorStore(path) as s:
        assert s.ids() == [*ids, "after"] and s.verify()["live"] == len(ids) + 1
    assert {p.name for p in (path / "segments").iterdir()} == _committed_files(path)


@pytest.mark.parametrize(
    ("case", "names", "cause"),
    [
        ("limit-segment", ".vec.tmp", "builtins.OSError"),
        ("limit-database", "store.sqlite", "sqlite3.OperationalError"),
        ("limit-compact", ".vec.tmp", "builtins.OSError"),
    ],
)
def test_a_file_size_limit_raises_store_write_error_and_keeps_the_last_commit(tmp_path, case, names, cause):
    path = tmp_path / "store"
    ids, x = _seed(path)
    files = _committed_files(path)
    got = _run_writer(path, case)
    assert got["raised"] == "StoreWriteError" and got["is_oserror"], got
    assert str(path) in got["message"] and names in got["message"], got["message"]
    assert "nothing was committed" in got["message"]
    assert got["cause"] == cause
    if cause == "builtins.OSError":
        assert got["errno"] == errno.EFBIG and "File too large" in got["message"]
    assert got["len_after"] == got["len_before"] == len(ids)  # the same process reads its last commit
    assert got["verify"]["live"] == len(ids)
    assert _committed_files(path) == files
    _assert_at_last_commit(path, ids, x)


@pytest.mark.parametrize("case", ["readonly-segment", "readonly-compact"])
def test_a_read_only_segment_directory_raises_store_write_error(tmp_path, case):
    path = tmp_path / "store"
    ids, x = _seed(path)
    (path / "segments").chmod(0o555)
    try:
        try:
            got = _run_writer(path, case, **bound_by_modes())
        except subprocess.SubprocessError as exc:
            pytest.skip(f"cannot start a writer bound by file modes here: {exc}")
    finally:
        (path / "segments").chmod(0o755)
    assert got["raised"] == "StoreWriteError" and got["errno"] == errno.EACCES, got
    assert str(path / "segments") in got["message"] and "Permission denied" in got["message"]
    assert got["len_after"] == len(ids) and got["verify"]["live"] == len(ids)
    _assert_at_last_commit(path, ids, x)


def test_a_full_disk_raises_store_write_error_naming_the_segment(tmp_path, monkeypatch):
    path = tmp_path / "store"
    ids, x = _seed(path)
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with VectorStore(path) as s:
        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(StoreWriteError, match=r"segments/\d+\.vec\.tmp: No space left on device") as info:
            s.add(["big"], vecs(1, D))
        monkeypatch.setattr(os, "fsync", real_fsync)
        exc = info.value
        assert isinstance(exc, StoreError) and isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        assert isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ENOSPC
        assert s.ids() == ids and s.verify()["live"] == len(ids)
        with pytest.raises(StoreWriteError, match="No space left on device"):
            monkeypatch.setattr(store_write, "fsync_dir", lambda p: full(None))
            s.compact()
        monkeypatch.undo()
    _assert_at_last_commit(path, ids, x)


def test_an_os_error_of_the_embedder_is_not_taken_for_a_fault_of_the_store(tmp_path):
    class Offline:
        cache_namespace = "offline|1"
        model = "offline"

        def embed(self, texts, *, on_batch=None):
            raise ConnectionRefusedError(errno.ECONNREFUSED, "connection refused")

    with VectorStore(tmp_path / "store") as s:
        with pytest.raises(ConnectionRefusedError):
            s.add_texts(["a"], Offline())
        assert len(s) == 0 and s.verify()["rows"] == 0
