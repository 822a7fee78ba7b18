"""Kill a process writing to a VectorStore at random moments; check nothing committed is lost.

A worker process applies a deterministic sequence of writes (adds of various sizes, deletes,
upserts, compactions) to a store, and after each write returns it appends a line to an ack
file. The controller kills it with SIGKILL after a random delay, then opens the store and
checks that it passes ``verify()`` and equals, row for row, the state after exactly the
acknowledged writes or after those plus the one in flight, never anything in between.

Used by tests/test_store_crash.py (a few dozen cycles) and benchmarks/crash_store.py (hundreds).
Workers are forked from a multiprocessing forkserver that has imported embedcache once, so a
cycle costs milliseconds of start-up instead of a fresh interpreter.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np

DIM = 8
#: small segments (64 rows) so that adds span several segments and merges happen often
SEGMENT_BYTES = 64 * DIM * 4

State = dict  # id -> version, in insertion order (dicts keep order)


def vector(id_: str, version: int) -> np.ndarray:
    """The vector stored for ``id_`` at ``version``: a pure function, so states compare exactly."""
    digest = hashlib.blake2b(f"{id_}|{version}".encode(), digest_size=DIM).digest()
    return (np.frombuffer(digest, dtype=np.uint8).astype(np.float32) - 127.5) / 64.0


def next_op(rng: random.Random, state: State, tag: str) -> tuple:
    """The next write, chosen from ``rng`` and the current state only."""
    r = rng.random()
    ids = list(state)
    if r < 0.08 and ids:
        return ("compact",)
    if r < 0.22 and ids:
        return ("delete", rng.sample(ids, min(len(ids), rng.randint(1, 6))))
    if r < 0.36 and ids:
        return ("upsert", rng.sample(ids, min(len(ids), rng.randint(1, 6))))
    n = rng.choice([1, 2, 5, 17, 64, 150, 400])
    return ("add", [f"{tag}-{j}" for j in range(n)])


def apply(state: State, op: tuple) -> State:
    state = dict(state)
    if op[0] == "add":
        for i in op[1]:
            state[i] = 0
    elif op[0] == "delete":
        for i in op[1]:
            del state[i]
    elif op[0] == "upsert":
        for i in op[1]:
            state[i] = state.pop(i) + 1
    return state


def run_ops(store, state: State, seed: int, cycle: int, ack_path: str) -> None:
    """Apply ops forever (until killed), acking each one after it commits."""
    rng = random.Random(seed)
    fd = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # tells the controller we run
    for k in range(10**9):
        op = next_op(rng, state, f"c{cycle}-{k}")
        run_one(store, state, op)
        state = apply(state, op)
        os.write(fd, b"%d\n" % k)


def small_segments():
    """Segments of 64 rows while the context lasts."""
    from embedcache import _config

    return _config.override(MAX_SEGMENT_BYTES=SEGMENT_BYTES)


def worker(path: str, seed: int, cycle: int, ack_path: str) -> None:
    from embedcache import _config
    from embedcache.store import VectorStore

    _config.MAX_SEGMENT_BYTES = SEGMENT_BYTES  # this process only writes to this store
    store = VectorStore(path, metric="dot")
    ids = store.ids()
    state = {i: m["v"] for i, m in zip(ids, store.metadata(ids))}
    run_ops(store, state, seed, cycle, ack_path)


def read_state(path: str) -> State:
    """Open the store, verify it, and return its state; vectors are checked against ``vector``."""
    from embedcache.store import VectorStore

    with VectorStore(path) as store:
        store.verify()
        ids = store.ids()
        state = {i: m["v"] for i, m in zip(ids, store.metadata(ids))}
        assert len(store) == len(ids) == len(state)
        if ids:
            expected = np.stack([vector(i, v) for i, v in state.items()])
            got = store.get(ids)
            if not np.array_equal(got, expected):
                bad = ids[int(np.flatnonzero((got != expected).any(axis=1))[0])]
                raise AssertionError(f"vector of {bad!r} differs from what was written")
            np.testing.assert_array_equal(store.vectors(), expected)
            _, found = store.search(expected[-1:], k=1)  # the store is searchable
            assert found.shape == (1, 1)
    return state


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["embedcache.store", "numpy"])
    return ctx


def crash_cycles(
    directory: str | os.PathLike[str],
    cycles: int,
    *,
    seed: int = 0,
    max_delay: float = 0.3,
    log=None,
) -> dict[str, int]:
    """Run ``cycles`` start-kill-check rounds on one store; raise AssertionError on any loss.

    Returns counts: cycles, acked ops, cycles that ended with the in-flight op committed.
    """
    directory = Path(directory)
    path = str(directory / "store")
    rng = random.Random(seed)
    ctx = _context()
    state: State = {}
    totals = {"cycles": 0, "acked": 0, "in_flight_committed": 0, "rows": 0}
    for cycle in range(cycles):
        ack_path = directory / f"acks-{cycle}"
        op_seed = rng.randrange(2**32)
        proc = ctx.Process(target=worker, args=(path, op_seed, cycle, str(ack_path)), daemon=True)
        t_start = time.monotonic()
        proc.start()
        deadline = time.monotonic() + 60
        while not ack_path.exists() and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.002)  # the store is open: now kill it at a random moment
        t_ready = time.monotonic()
        time.sleep(rng.uniform(0.0, max_delay))
        if not proc.is_alive():
            raise AssertionError(f"cycle {cycle}: the worker failed on its own (exit code {proc.exitcode})")
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        lines = ack_path.read_bytes().split(b"\n") if ack_path.exists() else [b""]
        acked = len(lines) - 1  # a last line without newline was cut by the kill
        # replay the worker's ops from the state it started from
        op_rng = random.Random(op_seed)
        committed = state
        for k in range(acked):
            committed = apply(committed, next_op(op_rng, committed, f"c{cycle}-{k}"))
        in_flight = apply(committed, next_op(op_rng, committed, f"c{cycle}-{acked}"))
        t_killed = time.monotonic()
        got = read_state(path)
        t_checked = time.monotonic()
        if got == committed:
            state = committed
        elif got == in_flight:
            state = in_flight
            totals["in_flight_committed"] += 1
        else:
            raise AssertionError(
                f"cycle {cycle}: store holds {len(got)} rows, expected {len(committed)} "
                f"(after {acked} acked ops) or {len(in_flight)} (with the op in flight); "
                f"missing {sorted(set(committed) - set(got))[:5]}, extra {sorted(set(got) - set(in_flight))[:5]}"
            )
        totals["cycles"] += 1
        totals["acked"] += acked
        totals["rows"] = len(state)
        if log:
            log(
                f"cycle {cycle}: {acked} ops acked, {len(state)} rows; start {t_ready - t_start:.2f} s, "
                f"run {t_killed - t_ready:.2f} s, check {t_checked - t_killed:.2f} s"
            )
    return totals


STAGES = ("segment written", "segment renamed", "directory synced", "committed")


def die_during(path: str, stage: str, op: tuple) -> None:
    """Apply ``op`` and SIGKILL this process at ``stage`` of the write protocol."""
    import pathlib

    from embedcache import _config
    from embedcache.store import VectorStore
    from embedcache.store import _write as store_write

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    _config.MAX_SEGMENT_BYTES = SEGMENT_BYTES  # this process only writes to this store
    store = VectorStore(path, metric="dot")
    if stage == "segment written":  # data written, not yet fsynced
        os.fsync = die
    elif stage == "segment renamed":
        real_replace = os.replace

        def replace_then_die(a, b):
            real_replace(a, b)
            die()

        os.replace = replace_then_die
    elif stage == "directory synced":  # every segment in place, transaction not committed
        real_sync = store_write.fsync_dir

        def sync_then_die(p):
            real_sync(p)
            die()

        store_write.fsync_dir = sync_then_die
    elif stage == "committed":  # committed, obsolete files not yet removed
        pathlib.Path.unlink = die
    ids = store.ids()
    run_one(store, {i: m["v"] for i, m in zip(ids, store.metadata(ids))}, op)
    raise AssertionError(f"{op[0]} finished without reaching stage {stage!r}")


def run_one(store, state: State, op: tuple) -> None:
    if op[0] == "add":
        store.add(op[1], np.stack([vector(i, 0) for i in op[1]]), [{"v": 0}] * len(op[1]))
    elif op[0] == "delete":
        store.delete(op[1])
    elif op[0] == "upsert":
        versions = [state[i] + 1 for i in op[1]]
        store.add(
            op[1], np.stack([vector(i, v) for i, v in zip(op[1], versions)]), [{"v": v} for v in versions], upsert=True
        )
    elif op[0] == "index":
        store.create_index(seed=1)
    else:
        store.compact()


def kill_at_stage(path: str, stage: str, op: tuple) -> int:
    """Run ``die_during`` in a forked worker; return its exit code (-SIGKILL when it died)."""
    proc = _context().Process(target=die_during, args=(path, stage, op), daemon=True)
    proc.start()
    proc.join(120)
    return proc.exitcode
