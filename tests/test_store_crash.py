"""Crash safety: SIGKILL a writer at random moments and at each step of the write protocol."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from support import store_crash_worker as cw

from embedcache.store import VectorStore


def test_sigkill_at_random_moments_keeps_exactly_the_acked_writes(tmp_path):
    totals = cw.crash_cycles(tmp_path, 24, seed=1, max_delay=0.15)
    assert totals["cycles"] == 24
    assert totals["acked"] >= 8  # the kills landed among real writes, not only before them
    assert totals["rows"] > 0


def _seeded_store(path):
    state = {}
    with cw.small_segments(), VectorStore(path, metric="dot") as s:
        for op in [("add", [f"a{i}" for i in range(100)]), ("delete", ["a3", "a70"]), ("add", ["b0", "b1"])]:
            cw.run_one(s, state, op)
            state = cw.apply(state, op)
    return state


OPS = {
    "add": ("add", [f"n{i}" for i in range(150)]),  # several new segments
    "add merging the tail": ("add", [f"m{i}" for i in range(20)]),  # rewrites the small last segment
    "upsert": ("upsert", ["a5", "b1"]),
    "compact": ("compact",),
}
# every step of each write; "committed" (before obsolete files are removed) where files become obsolete
CASES = [(op, stage) for op in OPS for stage in cw.STAGES[:-1]] + [
    ("add merging the tail", "committed"),
    ("compact", "committed"),
]


@pytest.mark.parametrize(("op", "stage"), CASES)
def test_sigkill_at_each_step_of_the_protocol(tmp_path, op, stage):
    path = str(tmp_path / "store")
    before = _seeded_store(path)
    after = cw.apply(before, OPS[op])
    code = cw.kill_at_stage(path, stage, OPS[op])
    assert code == -signal.SIGKILL
    expected = after if stage == "committed" else before
    assert cw.read_state(path) == expected
    # the next writer removes what the dead one left behind, and the store works on
    with VectorStore(path) as s:
        s.add(["z"], np.zeros((1, cw.DIM), np.float32))
    with VectorStore(path) as s:
        s.verify()
        db = sqlite3.connect(tmp_path / "store" / "store.sqlite")
        committed = {Path(f).name for (f,) in db.execute("SELECT file FROM segments")}
        db.close()
        assert {p.name for p in (tmp_path / "store" / "segments").iterdir()} == committed
        assert s.ids()[-1] == "z" and len(s) == len(expected) + 1


def test_readers_see_only_committed_states(tmp_path):
    """A reader polling a store while another process writes sees each commit whole, in order."""
    import os
    import random
    import time

    path = str(tmp_path / "store")
    VectorStore(path, metric="dot").close()
    ack = tmp_path / "acks"
    seed = 5
    proc = cw._context().Process(target=cw.worker, args=(path, seed, 0, str(ack)), daemon=True)
    proc.start()
    try:
        op_rng = random.Random(seed)
        states = [[]]
        model: dict = {}
        seen = 0  # index of the last state observed
        distinct = set()
        with VectorStore(path) as reader:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline or len(distinct) < 3:
                ids = reader.ids()
                while ids not in states[seen:]:
                    assert len(states) < seen + 500, f"reader saw a state no commit produced: {len(ids)} ids"
                    model = cw.apply(model, cw.next_op(op_rng, model, f"c0-{len(states) - 1}"))
                    states.append(list(model))
                seen = states.index(ids, seen)
                distinct.add(seen)
                assert time.monotonic() < deadline + 30
    finally:
        os.kill(proc.pid, 9)
        proc.join()
    assert len(distinct) >= 3
