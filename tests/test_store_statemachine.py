"""Random sequences of store operations against an in-memory model.

Vectors hold small integers, so every score is exact whatever the segment layout: ``search``
must equal ``top_k`` over the live vectors in memory (ids mapped) bit for bit, ties included,
and ``similar_pairs`` must equal the kernel's pairs over the same array.
"""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import embedcache as ec
from embedcache import _config
from embedcache.errors import DuplicateIdError
from embedcache.store import VectorStore

DIM = 4
ints = st.integers(-2, 2).map(float)


def int_rows(n):
    return st.lists(st.lists(ints, min_size=DIM, max_size=DIM), min_size=n, max_size=n).map(
        lambda rows: np.array(rows, dtype=np.float32).reshape(n, DIM)
    )


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="ecstore-")
        self.model: dict[str, tuple[np.ndarray, int]] = {}  # id -> (vector, group), insertion order
        self.counter = 0
        self.store = None

    @initialize(metric=st.sampled_from(["dot", "cosine"]), dtype=st.sampled_from(["float32", "float16"]))
    def open(self, metric, dtype):
        self.metric, self.dtype = metric, dtype
        # segments of 5 rows, for the machine's whole run
        self.small_segments = _config.override(MAX_SEGMENT_BYTES=5 * DIM * np.dtype(dtype).itemsize)
        self.small_segments.__enter__()
        self.store = VectorStore(self.dir, metric=metric, dtype=dtype)

    def teardown(self):
        if self.store is not None:
            self.store.close()
            self.small_segments.__exit__(None, None, None)
        shutil.rmtree(self.dir, ignore_errors=True)

    def fresh_ids(self, n):
        self.counter += n
        return [f"id{self.counter - n + i}" for i in range(n)]

    @rule(data=st.data(), n=st.integers(1, 12))
    def add(self, data, n):
        x = data.draw(int_rows(n))
        groups = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
        ids = self.fresh_ids(n)
        self.store.add(ids, x, metadata=[{"g": g} for g in groups])
        for i, v, g in zip(ids, x, groups):
            self.model[i] = (v, g)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def add_existing_fails(self, data):
        existing = data.draw(st.sampled_from(sorted(self.model)))
        with pytest.raises(DuplicateIdError):
            self.store.add(self.fresh_ids(1) + [existing], np.zeros((2, DIM)))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), new=st.integers(0, 2))
    def upsert(self, data, new):
        old = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=4, unique=True))
        ids = old + self.fresh_ids(new)
        x = data.draw(int_rows(len(ids)))
        self.store.add(ids, x, metadata=[{"g": 1}] * len(ids), upsert=True)
        for i, v in zip(ids, x):
            self.model.pop(i, None)
            self.model[i] = (v, 1)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=6, unique=True))
        self.store.delete(ids)
        for i in ids:
            del self.model[i]

    @rule()
    def compact(self):
        self.store.compact()

    @rule()
    def reopen(self):
        self.store.close()
        self.store = VectorStore(self.dir)

    def live(self):
        ids = list(self.model)
        x = np.array([v for v, _ in self.model.values()], dtype=np.float32).reshape(len(ids), DIM)
        groups = np.array([g for _, g in self.model.values()], dtype=np.int64)
        return ids, x.astype(self.dtype), groups

    @rule(data=st.data(), k=st.integers(1, 8), nq=st.integers(1, 3), group=st.none() | st.integers(0, 2))
    def search(self, data, k, nq, group):
        q = data.draw(int_rows(nq))
        where = None if group is None else {"g": group}
        scores, got = self.store.search(q, k=k, where=where)
        ids, x, groups = self.live()
        if not ids:
            assert scores.shape == got.shape == (nq, 0)
            return
        mask = None if group is None else groups == group
        ref_s, ref_i = ec.top_k(q, x, k, metric=self.metric, mask=mask)
        names = np.array(ids, dtype=object)[np.maximum(ref_i, 0)]
        names[ref_i < 0] = None
        np.testing.assert_array_equal(got, names)
        np.testing.assert_array_equal(scores, ref_s)

    @rule(threshold=st.sampled_from([0.5, 0.99, 2.0, 5.0]))
    def similar_pairs(self, threshold):
        if self.metric == "cosine":
            threshold /= 5.0
        left, right, scores = self.store.similar_pairs(threshold)
        ids, x, _ = self.live()
        if not ids:
            assert len(left) == len(right) == len(scores) == 0
            return
        i, j, s = ec.similar_pairs(x, threshold, metric=self.metric)
        order = np.lexsort((j, i, -s))
        names = np.array(ids, dtype=object)
        np.testing.assert_array_equal(left, names[i[order]])
        np.testing.assert_array_equal(right, names[j[order]])
        np.testing.assert_array_equal(scores, s[order])

    @invariant()
    def same_rows(self):
        if self.store is None:
            return
        assert self.store.ids() == list(self.model)
        assert len(self.store) == len(self.model)
        if self.model:
            ids, x, _ = self.live()
            np.testing.assert_array_equal(self.store.vectors(), x)


StoreMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreMachine = StoreMachine.TestCase


def test_verify_after_random_operations(tmp_path):
    """The machine's stores pass verify(): checked here on one long deterministic run."""
    rng = np.random.default_rng(0)
    with _config.override(MAX_SEGMENT_BYTES=5 * DIM * 4), VectorStore(tmp_path / "s", metric="dot") as s:
        live = []
        for step in range(40):
            r = rng.random()
            if r < 0.5 or not live:
                ids = [f"x{step}-{i}" for i in range(rng.integers(1, 9))]
                s.add(ids, rng.integers(-2, 3, (len(ids), DIM)))
                live += ids
            elif r < 0.8:
                gone = list(rng.choice(live, size=min(3, len(live)), replace=False))
                s.delete(gone)
                live = [i for i in live if i not in gone]
            else:
                s.compact()
            s.verify()
        assert s.ids() == live
