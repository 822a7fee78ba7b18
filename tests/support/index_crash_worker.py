"""Kill a process at each step of building a store's index (used by tests/test_store_index.py)."""

from __future__ import annotations

import os
import signal

STAGES = ("file written", "file renamed", "directory synced", "committed")


def die_during_build(path: str, stage: str) -> None:
    """Build the index of the store at ``path`` and SIGKILL this process at ``stage``."""
    import pathlib

    from embedcache import _config
    from embedcache.store import VectorStore
    from embedcache.store import _write as store_write

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    _config.INDEX_MIN_CELL = 4
    store = VectorStore(path)
    if stage == "file written":  # index data written, not yet fsynced
        os.fsync = die
    elif stage == "file renamed":
        real_replace = os.replace

        def replace_then_die(a, b):
            real_replace(a, b)
            die()

        os.replace = replace_then_die
    elif stage == "directory synced":  # every index file in place, transaction not committed
        real_sync = store_write.fsync_dir

        def sync_then_die(p):
            real_sync(p)
            if pathlib.Path(p).name == "index":
                die()

        store_write.fsync_dir = sync_then_die
    elif stage == "committed":  # committed, the old index's files not yet removed
        pathlib.Path.unlink = die
    store.create_index(seed=1)
    raise AssertionError(f"create_index finished without reaching stage {stage!r}")


def kill_at_stage(path: str, stage: str) -> int:
    """Run ``die_during_build`` in a forked worker; return its exit code (-SIGKILL when it died)."""
    from support.store_crash_worker import _context

    proc = _context().Process(target=die_during_build, args=(path, stage), daemon=True)
    proc.start()
    proc.join(300)
    return proc.exitcode
