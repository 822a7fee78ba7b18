"""The store's jobs on real Dask clusters: a ``LocalCluster`` of two worker processes, and a
cluster started by its command lines (``dask scheduler``, two ``dask worker``) on loopback.

Same answers as one machine bit for bit; a worker killed mid-job changes nothing; a worker
that cannot see the store, or a scheduler that cannot be reached, is one clear error.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream
from test_cli import assert_one_line_error, run  # noqa: F401 (run: a fixture)
from test_dask_engine import (
    SMALL_INDEX,
    assert_partitioned_like_one_machine,
    assert_same_dedup,
    assert_same_against,
    assert_same_pairs,
    built_index,
    clustered_vectors,
    make_store,
    near_dup_vectors,
)

import embedcache as ec
from embedcache import _config
from embedcache.engine import connect

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _reclaim_closed_comms():
    """After this module: reclaim what the Dask clients closed. distributed closes a client's
    comms on its event loop; a transport whose close had not run when the loop stopped is
    reclaimed here, not by a garbage collection in whatever test of another module runs then
    (as an unclosed-transport warning that test would wrongly carry)."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture(scope="module")
def client():
    with LocalCluster(processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_jobs_on_a_local_cluster_give_the_answers_of_one_machine(client, tmp_path, dtype):
    x = near_dup_vectors(150)
    store = make_store(tmp_path / "s", x, dtype=dtype, delete=(4, 77, 149))
    q = np.random.default_rng(3).standard_normal((40, 16)).astype(np.float32)
    with _config.override(ENGINE_BLOCK_ROWS=23):  # 7 blocks, 28 tiles over segments of 7 rows
        assert_same_pairs(ec.near_duplicates(store, threshold=0.8, progress=False),
                          ec.near_duplicates(store, threshold=0.8, progress=False, client=client))
        for mode in ("connected", "greedy"):
            assert_same_dedup(ec.deduplicate(store, threshold=0.8, mode=mode, progress=False),
                              ec.deduplicate(store, threshold=0.8, mode=mode, progress=False, client=client))
        ga = ec.knn_graph(store, 5, progress=False)
        gb = ec.knn_graph(store, 5, progress=False, client=client)
        assert np.array_equal(ga.indices, gb.indices) and np.array_equal(ga.data.view(np.uint32), gb.data.view(np.uint32))
        sa, ia = store.search(q, 10)
        sb, ib = store.search(q, 10, client=client)
        assert np.array_equal(sa.view(np.uint32), sb.view(np.uint32)) and np.array_equal(ia, ib)
    # nothing of the jobs is left on the cluster (results are released as they are merged)
    deadline = time.monotonic() + 10
    while (left := client.run_on_scheduler(lambda dask_scheduler: [k for k in dask_scheduler.tasks
                                                                    if "embedcache" in str(k)])) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left
    store.close()


def test_the_partitioned_method_on_a_local_cluster_gives_the_answers_of_one_machine(client, tmp_path):
    x = clustered_vectors(400)
    store = make_store(tmp_path / "s", x, dtype="float16", delete=(4, 77, 399))
    with _config.override(ENGINE_BLOCK_ROWS=50, **SMALL_INDEX):  # cells split, probes calibrated
        # the workers run with the client's knobs: they only read what the tasks name
        table = assert_partitioned_like_one_machine(store, client, seed=3)
        # a store's index: rows assigned to cells on the workers, the same files
        assert built_index(store, seed=1) == built_index(store, seed=1, client=client)
    assert table.recall.probes >= 1 and 0 < table.recall.estimate <= 1
    store.close()


def _index_files(path):
    """The committed index of the store at ``path``: its description (less the commit's
    numbers) and the bytes of its files."""
    import json

    with ec.VectorStore(path) as store, store._txn.reading() as view:
        desc = json.loads(view.settings["index"])
    files = [(path / f["file"]).read_bytes() for f in desc["files"]]
    return {k: v for k, v in desc.items() if k not in ("number", "generation", "files")}, files


def test_store_index_with_a_scheduler_writes_the_index_of_one_machine(client, run, tmp_path, capsys):
    address = client.scheduler.address
    make_store(tmp_path / "vs", clustered_vectors(400), dtype="float16", delete=(4, 77, 399)).close()
    with _config.override(ENGINE_BLOCK_ROWS=50, **SMALL_INDEX):  # cells split, probes calibrated
        here = run("store", "index", "vs", "--seed", "2", inproc=True)
        seed2 = _index_files(tmp_path / "vs")
        with get_task_stream(client) as ts:
            there = run("store", "index", "vs", "--seed", "2", "--scheduler", address, inproc=True)
        assert _index_files(tmp_path / "vs") == seed2
        assert len([t for t in ts.data if "embedcache-assign-block" in str(t["key"])]) >= 8  # 397 rows / 50
        same = re.sub(r"generation \d+", "", here.stdout)  # one commit later
        assert re.sub(r"generation \d+", "", there.stdout) == same and "indexed 397 rows" in same
        assert f"ran on the Dask cluster at {address} (2 workers)" in there.stderr
        # the variable names the scheduler too; --cells is passed on
        run("store", "index", "vs", "--cells", "5", "-q", inproc=True)
        expected = _index_files(tmp_path / "vs")
        there = run("store", "index", "vs", "--cells", "5", "-q", inproc=True,
                    extra_env={"EMBEDCACHE_SCHEDULER": address})
        assert _index_files(tmp_path / "vs") == expected and there.stderr == ""
        # the progress bar counts the cluster's tasks: every scan adds its tasks to the total
        capsys.readouterr()
        with ec.VectorStore(tmp_path / "vs") as store, get_task_stream(client) as ts:
            store.create_index(seed=2, client=client, progress=True)
        tasks = [t for t in ts.data if "embedcache" in str(t["key"])]
        shown = [tuple(map(int, m)) for m in re.findall(r"index: .*?(\d+)/(\d+) \[", capsys.readouterr().err)]
        assert shown and all(done <= total for done, total in shown)
        assert max(total for _, total in shown) == len(tasks) > 8  # assignment, calibration
        assert _index_files(tmp_path / "vs") == seed2
    # an unreachable scheduler is one line, and the old index stays
    with _config.override(SCHEDULER_TIMEOUT=1):
        gone = f"tcp://127.0.0.1:{free_port()}"
        assert_one_line_error(run("store", "index", "vs", "--scheduler", gone, ok=False, inproc=True),
                              f"cannot reach the Dask scheduler at {gone}")


def test_dedup_against_a_reference_on_a_local_cluster_gives_the_answer_of_one_machine(client, run, tmp_path):
    x = near_dup_vectors(200)
    make_store(tmp_path / "vs", x[:120], dtype="float16", delete=(5, 60)).close()
    ref = x[100:].copy()
    ref[[0, 1, 2]] = ref[3]  # copies in the reference: the first one is named
    make_store(tmp_path / "ref", ref, delete=(7,)).close()
    with _config.override(ENGINE_BLOCK_ROWS=17), ec.VectorStore(tmp_path / "vs") as store, \
            ec.VectorStore(tmp_path / "ref") as reference:
        for against in (reference, ref):  # a store the workers read; vectors sent to them
            one = ec.deduplicate(store, threshold=0.85, against=against, progress=False)
            assert_same_against(one, ec.deduplicate(store, threshold=0.85, against=against, client=client,
                                                    progress=False))
            assert 10 < len(one.removed) < 110
        # from the shell: the same files
        address = client.scheduler.address
        here = run("dedup", "vs", "--against", "ref", "-t", "0.85", "-o", "here.jsonl", "--duplicates", "here.csv",
                   "-q", inproc=True)
        there = run("dedup", "vs", "--against", "ref", "-t", "0.85", "-o", "there.jsonl", "--duplicates",
                    "there.csv", "--scheduler", address, inproc=True)
    assert here.stdout.replace("here.", "") == there.stdout.replace("there.", "")
    assert (tmp_path / "here.csv").read_text() == (tmp_path / "there.csv").read_text()
    assert (tmp_path / "here.jsonl").read_text() == (tmp_path / "there.jsonl").read_text()
    assert f"ran on the Dask cluster at {address}" in there.stderr


@pytest.mark.parametrize("method", ["exact", "partitioned"])
def test_a_worker_killed_mid_job_changes_nothing(client, tmp_path, method):
    x = near_dup_vectors(1500, d=32) if method == "exact" else clustered_vectors(1200, d=32)
    store = make_store(tmp_path / "s", x, delete=(10, 1100))
    knobs = {"INDEX_MIN_CELL": 8, "INDEX_RECALL_SAMPLE": 200}
    kw = {"threshold": 0.85, "progress": False, "method": method, "recall": 0.9}
    with _config.override(**knobs):
        expected = ec.deduplicate(store, **kw)
    assert expected.method == method
    result: dict = {}

    def job():
        try:
            # exact: 25 blocks, 325 tasks; partitioned: 40 tasks per scan, a task per group of cells
            with _config.override(ENGINE_BLOCK_ROWS=60 if method == "exact" else 30, **knobs):
                result["res"] = ec.deduplicate(store, client=client, **kw)
        except BaseException as exc:  # reported by the assertion below
            result["error"] = exc

    def busy_worker(dask_scheduler):
        done = sum(1 for k in dask_scheduler.tasks if "embedcache" in str(k))
        for addr, ws in dask_scheduler.workers.items():
            if any("embedcache" in str(ts.key) for ts in ws.processing):
                return addr, done
        return None, done

    pids_before = client.run(os.getpid)
    t = threading.Thread(target=job)
    t.start()
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and t.is_alive() and time.monotonic() < deadline:
        victim, _ = client.run_on_scheduler(busy_worker)
        time.sleep(0.05)
    assert victim is not None, "the job ended before a worker could be killed; make it longer"
    os.kill(pids_before[victim], signal.SIGKILL)  # the worker process, in the middle of a task
    assert t.is_alive()  # mid-job
    t.join(300)
    assert "error" not in result, result.get("error")
    assert_same_dedup(expected, result["res"], diagnostics=method == "exact")
    assert result["res"].recall == expected.recall and result["res"].method == method
    client.wait_for_workers(2, timeout=60)  # the nanny started a new worker
    assert set(client.run(os.getpid).values()) != set(pids_before.values())
    store.close()


def test_an_unreachable_scheduler_is_one_clear_line(run, tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(ec.ClusterError, match=f"cannot reach the Dask scheduler at {address} within 1 s") as err:
        connect(address, timeout=1)
    assert "\n" not in str(err.value) and time.monotonic() - t0 < 30
    make_store(tmp_path / "vs", near_dup_vectors(20)).close()
    with _config.override(SCHEDULER_TIMEOUT=1):
        proc = run("pairs", "vs", "-t", "0.9", "-o", "p.csv", "--scheduler", address, ok=False, inproc=True)
        assert_one_line_error(proc, f"cannot reach the Dask scheduler at {address}")
        proc = run("dedup", "vs", "-o", "kept.jsonl", ok=False, inproc=True, extra_env={"EMBEDCACHE_SCHEDULER": address})
        assert_one_line_error(proc, f"cannot reach the Dask scheduler at {address}")
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "kept.jsonl").exists()
    assert_one_line_error(run("pairs", "vs", "-t", "0.9", "-o", "p.csv", "--scheduler", "localhost:1",
                              ok=False, inproc=True), "tcp://HOST:PORT", "'localhost:1'")
    # what a cluster does not run is refused before the scheduler is looked for
    (tmp_path / "rows.txt").write_text("a\nb\n")
    for args, fragments in [
        (("dedup", "rows.txt", "-o", "kept.txt"), ("--scheduler runs jobs over a vector store", "rows.txt is a file")),
        (("graph", "rows.txt", "-o", "g.npz"), ("--scheduler runs jobs over a vector store", "rows.txt is a file")),
    ]:
        assert_one_line_error(run(*args, "--scheduler", address, ok=False, inproc=True), *fragments)
    assert not {"p.csv", "kept.jsonl", "kept.txt", "g.npz"} & {p.name for p in tmp_path.iterdir()}


# ----------------------------------------------------------------------------- command lines


def _dask(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("dask")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "dask", *args]


@pytest.fixture(scope="module")
def cli_cluster(tmp_path_factory):
    """``dask scheduler`` and two ``dask worker`` processes on loopback, started in a directory
    of their own (so a path relative to the test's directory means nothing to them)."""
    home = tmp_path_factory.mktemp("workers-home")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen(_dask("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"),
                              cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(2):
            procs.append(subprocess.Popen(
                _dask("worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"),
                cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with connect(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=120)
        yield address
    finally:  # the workers first (with the scheduler gone too, a worker waits seconds to reconnect)
        for group in (procs[1:], procs[:1]):
            for p in group:
                p.send_signal(signal.SIGINT)
            for p in group:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()


def test_dedup_a_store_through_a_cluster_started_by_its_command_lines(cli_cluster, run, tmp_path):
    x = near_dup_vectors(400)
    make_store(tmp_path / "vs", x, delete=(3, 200)).close()
    here = run("dedup", "vs", "-t", "0.85", "-o", "here.jsonl", "--duplicates", "here.csv", "-q", inproc=True)
    there = run("dedup", "vs", "-t", "0.85", "-o", "there.jsonl", "--duplicates", "there.csv",
                "--scheduler", cli_cluster)
    assert here.stdout.replace("here.", "") == there.stdout.replace("there.", "")
    assert "; method: exact (auto)" in there.stdout  # a cluster runs the exact method
    assert (tmp_path / "here.csv").read_text() == (tmp_path / "there.csv").read_text()
    assert (tmp_path / "here.jsonl").read_text() == (tmp_path / "there.jsonl").read_text()
    assert len((tmp_path / "here.csv").read_text().splitlines()) > 100
    assert f"ran on the Dask cluster at {cli_cluster} (2 workers)" in there.stderr
    # the environment variable names the scheduler too; pairs are the same, bit for bit
    run("pairs", "vs", "-t", "0.85", "-o", "here-pairs.jsonl", "-q", inproc=True)
    there = run("pairs", "vs", "-t", "0.85", "-o", "there-pairs.jsonl", extra_env={"EMBEDCACHE_SCHEDULER": cli_cluster})
    assert "ran on the Dask cluster" in there.stderr
    assert (tmp_path / "here-pairs.jsonl").read_text() == (tmp_path / "there-pairs.jsonl").read_text()
    # the partitioned method too: the same pairs, and the same recall reported
    here = run("dedup", "vs", "-t", "0.85", "-o", "here-p.jsonl", "--method", "partitioned", "--recall", "0.9",
               inproc=True)
    there = run("dedup", "vs", "-t", "0.85", "-o", "there-p.jsonl", "--method", "partitioned", "--recall", "0.9",
                "--scheduler", cli_cluster, inproc=True)
    assert "; method: partitioned, recall " in there.stdout
    assert here.stdout.replace("here-p.", "") == there.stdout.replace("there-p.", "")
    assert (tmp_path / "here-p.jsonl").read_text() == (tmp_path / "there-p.jsonl").read_text()
    # graph takes --scheduler too
    here = run("graph", "vs", "-k", "5", "-o", "here.npz", "--method", "partitioned", "--recall", "0.9", inproc=True)
    there = run("graph", "vs", "-k", "5", "-o", "there.npz", "--method", "partitioned", "--recall", "0.9",
                "--scheduler", cli_cluster, inproc=True)
    assert "; method: partitioned, recall " in there.stdout
    assert here.stdout.replace("here.", "") == there.stdout.replace("there.", "")
    from scipy.sparse import load_npz

    ga, gb = load_npz(tmp_path / "here.npz"), load_npz(tmp_path / "there.npz")
    assert np.array_equal(ga.indptr, gb.indptr) and np.array_equal(ga.indices, gb.indices)
    assert np.array_equal(ga.data.view(np.uint32), gb.data.view(np.uint32))


def test_a_worker_that_cannot_see_the_store_names_itself_and_the_path(cli_cluster, tmp_path, monkeypatch):
    make_store(tmp_path / "vs", near_dup_vectors(30)).close()
    monkeypatch.chdir(tmp_path)
    # the same path names another directory on the workers (their working directory differs),
    # as a store on a disk the workers do not mount would
    path = "/proc/self/cwd/vs"
    with ec.VectorStore(path) as store, connect(cli_cluster) as c:
        with pytest.raises(ec.ClusterError) as err:
            ec.near_duplicates(store, threshold=0.9, client=c, progress=False)
        message = str(err.value)
        assert message.startswith("worker tcp://127.0.0.1:") and "(host " in message
        assert f"cannot read {path}/segments/" in message and "No such file or directory" in message
        assert "shared filesystem" in message and "\n" not in message
        assert len(store) == 30 and store.verify()["live"] == 30  # nothing changed
