"""The ``embedcache`` command end to end, in a subprocess: every command, every input
format, and every user error as one line on stderr with a non-zero exit."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import embedcache as ec
from embedcache.cli import main
from embedcache.tables import atomic_output, read_table
from embedcache.testing import FakeEmbeddingServer

EXAMPLE = Path(ec.__file__).parent / "examples" / "reviews.jsonl"
ROWS = [json.loads(line) for line in EXAMPLE.read_text(encoding="utf-8").splitlines()]
TEXTS = [r["text"] for r in ROWS]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    """Run ``embedcache ARGS`` in tmp_path with a private cache and no API keys: in a
    subprocess (end to end, through ``python -m embedcache.cli``), or with ``inproc=True``
    through ``main()`` in this process (the same code path, without the start-up time)."""
    env = {k: v for k, v in os.environ.items() if k not in ("IONOS_API_TOKEN", "OPENAI_API_KEY")}
    env["EMBEDCACHE_DIR"] = str(tmp_path / "cache")

    def _run(*args, ok=True, extra_env=None, inproc=False):
        args = [str(a) for a in args]
        if inproc:
            with monkeypatch.context() as m:
                m.chdir(tmp_path)
                for key in ("IONOS_API_TOKEN", "OPENAI_API_KEY"):
                    m.delenv(key, raising=False)
                for key, value in {"EMBEDCACHE_DIR": env["EMBEDCACHE_DIR"], **(extra_env or {})}.items():
                    m.setenv(key, value)
                capsys.readouterr()
                code = main(args)
                out, err = capsys.readouterr()
            proc = Result(code, out, err)
        else:
            proc = subprocess.run(
                [sys.executable, "-m", "embedcache.cli", *args],
                cwd=tmp_path, env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=120,
            )
        if ok:
            assert proc.returncode == 0, proc.stderr
        return proc

    return _run


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("embedcache: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_entry_point_is_declared():
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts.get("embedcache") == "embedcache.cli:main"


# ---------------------------------------------------------------------------------------
# dedup on every format
# ---------------------------------------------------------------------------------------


def test_dedup_example_prints_groups_and_keeps_rows_intact(run, tmp_path):
    proc = run("dedup", EXAMPLE, "--field", "text", "-o", "kept.jsonl", "--duplicates", "dups.csv")
    assert "hashing" in proc.stderr  # says which embedder it used
    res = ec.deduplicate(ec.HashingEmbeddings().embed(TEXTS), threshold=0.9, progress=False)
    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert kept == [ROWS[k] for k in res.kept]  # every field, unchanged
    assert len(res.groups) >= 5
    assert proc.stdout.count("group of") == min(10, len(res.groups))
    assert f"kept {len(res.kept)} of {len(ROWS)} rows" in proc.stdout
    with open(tmp_path / "dups.csv", newline="") as f:
        report = list(csv.DictReader(f))
    assert [int(r["index"]) for r in report] == res.removed.tolist()
    assert [int(r["duplicate_of"]) for r in report] == res.duplicate_of.tolist()
    assert [r["id"] for r in report] == [ROWS[k]["id"] for k in res.removed]
    assert all(float(r["score"]) > 0.9 for r in report)
    assert not list(tmp_path.glob(".*.part"))


def test_dedup_options_threshold_keep_mode(run, tmp_path):
    run("dedup", EXAMPLE, "-o", "a.jsonl", "--threshold", "0.75", "--keep", "longest", "--mode", "greedy", "-q")
    x = ec.HashingEmbeddings().embed(TEXTS)
    res = ec.deduplicate(TEXTS, threshold=0.75, keep="longest", mode="greedy", progress=False,
                         embedder=ec.CachedEmbedder(ec.HashingEmbeddings(), cache=ec.EmbeddingCache(tmp_path / "c2")))
    kept = [json.loads(line)["id"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert kept == [ROWS[k]["id"] for k in res.kept]
    assert len(res.kept) < len(ec.deduplicate(x, threshold=0.9, progress=False).kept)


def test_dedup_against_reference(run, tmp_path):
    (tmp_path / "train.txt").write_text("\n".join(TEXTS[:10]) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(TEXTS[10:20]) + "\n")
    proc = run("dedup", "test.txt", "--against", "train.txt", "-o", "clean.txt")
    x = ec.HashingEmbeddings().embed(TEXTS[:20])
    res = ec.deduplicate(x[10:], against=x[:10], threshold=0.9, progress=False)
    assert (tmp_path / "clean.txt").read_text().splitlines() == [TEXTS[10 + k] for k in res.kept]
    assert len(res.removed) >= 2 and "reference #" in proc.stdout


def write_formats(tmp_path):
    """The example as plain text, CSV, TSV and Parquet, with an extra column."""
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n\n")
    for name, delim in (("in.csv", ","), ("in.tsv", "\t")):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "body", "stars"], delimiter=delim)
            w.writeheader()
            for k, r in enumerate(ROWS):
                w.writerow({"id": r["id"], "body": r["text"], "stars": str(k % 5 + 1)})
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [r["id"] for r in ROWS], "body": TEXTS,
                             "stars": [k % 5 + 1 for k in range(len(ROWS))]}), tmp_path / "in.parquet")


@pytest.mark.parametrize("name", ["in.txt", "in.csv", "in.tsv", "in.parquet"])
def test_dedup_each_input_format(run, tmp_path, name):
    write_formats(tmp_path)
    args = [] if name == "in.txt" else ["--column", "body"]
    out = "out" + Path(name).suffix
    run("dedup", name, *args, "-o", out, "-q", inproc=name in ("in.csv", "in.tsv"))
    keep = ec.deduplicate(ec.HashingEmbeddings().embed(TEXTS), threshold=0.9, progress=False).kept
    if name == "in.txt":
        assert (tmp_path / out).read_text().splitlines() == [TEXTS[k] for k in keep]
    elif name == "in.parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(tmp_path / out)
        assert table.column_names == ["id", "body", "stars"]
        assert table.column("id").to_pylist() == [ROWS[k]["id"] for k in keep]
        assert table.column("stars").to_pylist() == [k % 5 + 1 for k in keep]
    else:
        delim = "\t" if name.endswith("tsv") else ","
        with open(tmp_path / out, newline="") as f:
            rows = list(csv.DictReader(f, delimiter=delim))
        assert [r["id"] for r in rows] == [ROWS[k]["id"] for k in keep]
        assert [r["stars"] for r in rows] == [str(k % 5 + 1) for k in keep]
        assert [r["body"] for r in rows] == [TEXTS[k] for k in keep]


def test_output_format_follows_the_extension(run, tmp_path):
    write_formats(tmp_path)
    run("dedup", "in.csv", "--column", "body", "-o", "out.jsonl", "-q", inproc=True)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"id", "body", "stars"} and rows[0]["id"] == "r01"
    run("dedup", EXAMPLE, "-o", "out.parquet", "-q", inproc=True)
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column_names == ["id", "text"] and table.num_rows == len(rows)


# ---------------------------------------------------------------------------------------
# the other commands
# ---------------------------------------------------------------------------------------


def test_embed_writes_vectors(run, tmp_path):
    proc = run("embed", EXAMPLE, "-o", "vectors.npy")
    x = np.load(tmp_path / "vectors.npy")
    np.testing.assert_array_equal(x, ec.HashingEmbeddings().embed(TEXTS))
    assert x.dtype == np.float32 and "0 from the cache" in proc.stderr
    proc = run("embed", EXAMPLE, "-o", "again.npy", inproc=True)
    assert f"{len(set(TEXTS))} from the cache, 0 embedded" in proc.stderr


def test_pairs_writes_sorted_pairs(run, tmp_path):
    run("pairs", EXAMPLE, "--threshold", "0.9", "-o", "pairs.csv", "-q")
    with open(tmp_path / "pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    table = ec.near_duplicates(ec.HashingEmbeddings().embed(TEXTS), threshold=0.9, progress=False)
    assert [(int(r["i"]), int(r["j"])) for r in rows] == list(zip(table.i.tolist(), table.j.tolist()))
    assert [r["id_i"] for r in rows] == [ROWS[i]["id"] for i in table.i]
    assert rows[0]["text_i"] == TEXTS[int(rows[0]["i"])]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.9


def test_store_commands(run, tmp_path):
    proc = run("store", "add", "vs", EXAMPLE, "-q")
    assert f"{len(ROWS)} rows" in proc.stdout
    info = run("store", "info", "vs", inproc=True).stdout
    assert f"{len(ROWS)}" in info and "512" in info
    found = run("store", "search", "vs", TEXTS[4], "-k", "2", "-q", inproc=True).stdout.splitlines()
    assert found[1].split()[1] == "r05" and float(found[1].split()[0]) > 0.99
    # a key in the environment does not switch the provider away from the store's own
    found = run("store", "search", "vs", TEXTS[4], "-q", extra_env={"IONOS_API_TOKEN": "k"}, inproc=True)
    assert found.stdout.splitlines()[1].split()[1] == "r05"
    proc = run("store", "add", "vs", EXAMPLE, "-q", ok=False, inproc=True)  # ids exist, no --upsert
    assert_one_line_error(proc, "r01")
    run("store", "add", "vs", EXAMPLE, "--upsert", "-q", inproc=True)
    assert "compacted" in run("store", "compact", "vs", inproc=True).stdout
    assert_one_line_error(run("store", "info", "missing", ok=False, inproc=True), "missing")


def test_cache_commands(run, tmp_path):
    run("embed", EXAMPLE, "-o", "v.npy", "-q", inproc=True)
    info = run("cache", "info").stdout
    assert str(tmp_path / "cache") in info and f"entries: {len(set(TEXTS))}" in info
    assert f"removed {len(set(TEXTS))}" in run("cache", "clear", inproc=True).stdout
    assert "entries: 0" in run("cache", "info", inproc=True).stdout
    other = run("cache", "info", "--cache-dir", tmp_path / "other", inproc=True).stdout
    assert str(tmp_path / "other") in other


def test_openai_provider_against_a_loopback_server(run, tmp_path):
    with FakeEmbeddingServer(dimensions=8, api_key="test-key") as server:
        key = {"OPENAI_API_KEY": "test-key"}
        proc = run("models", "--base-url", server.base_url, extra_env=key, inproc=True)
        assert proc.stdout.split() == ["test-embed-small", "test-embed-large"]
        proc = run("embed", EXAMPLE, "-o", "v.npy", "--base-url", server.base_url,
                   "--model", "test-embed-small", extra_env=key)
        assert server.base_url in proc.stderr  # key set: the remote provider is the default
        assert "with the key from OPENAI_API_KEY" in proc.stderr  # where the key came from, not the key
        assert np.load(tmp_path / "v.npy").shape == (len(ROWS), 8)
        assert "test-key" not in proc.stderr + proc.stdout


def test_the_ionos_token_is_never_sent_to_another_server(run, tmp_path):
    token, key = "ionos-token-0123456789", "sk-openai-0123456789"
    with FakeEmbeddingServer(dimensions=8, api_key=None) as server:
        args = ("embed", EXAMPLE, "-o", "v.npy", "--base-url", server.base_url, "--model", "test-embed-small")
        proc = run(*args, extra_env={"IONOS_API_TOKEN": token}, ok=False, inproc=True)
        assert_one_line_error(proc, "OPENAI_API_KEY", "IONOS_API_TOKEN is sent only to")
        assert server.requests == [] and not (tmp_path / "v.npy").exists()
        proc = run(*args, extra_env={"IONOS_API_TOKEN": token, "OPENAI_API_KEY": key}, inproc=True)
        assert "with the key from OPENAI_API_KEY" in proc.stderr
        assert {r.authorization for r in server.requests} == {f"Bearer {key}"}
        assert token not in proc.stderr + proc.stdout and key not in proc.stderr + proc.stdout


def test_hashing_models(run):
    assert run("models", "--provider", "hashing", "-q", inproc=True).stdout.startswith("hashing")


# ---------------------------------------------------------------------------------------
# user errors: one line, non-zero, no traceback, no half-written output
# ---------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SUB, INPROC = False, True  # the errors of the issue run end to end; the rest in-process


@pytest.mark.parametrize(
    "inproc, args, fragments",
    [
        (SUB, ["dedup", "nope.jsonl", "-o", "k.jsonl"], ["nope.jsonl", "does not exist"]),
        (SUB, ["dedup", EXAMPLE, "--field", "body", "-o", "k.jsonl"], ["no field 'body'", "id, text"]),
        (INPROC, ["dedup", "in.csv", "--column", "txt", "-o", "k.csv"], ["no column 'txt'", "id, body, stars"]),
        (INPROC, ["dedup", "bad.jsonl", "-o", "k.jsonl"], ["bad.jsonl:2", "not valid JSON"]),
        (SUB, ["dedup", EXAMPLE, "--threshold", "1.5", "-o", "k.jsonl"], ["threshold", "[-1, 1]"]),
        (INPROC, ["dedup", EXAMPLE, "--threshold", "high", "-o", "k.jsonl"], ["threshold", "high"]),
        (SUB, ["dedup", EXAMPLE, "--provider", "openai", "-o", "k.jsonl"], ["IONOS_API_TOKEN"]),
        (INPROC, ["dedup", EXAMPLE, "-o", "no/such/dir/k.jsonl"], ["no/such/dir"]),
        (INPROC, ["dedup", EXAMPLE, "--provider", "hashing", "--model", "x", "-o", "k.jsonl"], ["--model"]),
        (INPROC, ["pairs", EXAMPLE, "-o", "p.csv"], ["--threshold"]),
        (INPROC, ["embed", "binary.txt", "-o", "v.npy"], ["UTF-8"]),
        (INPROC, ["frobnicate"], ["No such command"]),
    ],
)
def test_user_errors_are_one_line(run, tmp_path, inproc, args, fragments):
    write_formats(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad\n")
    proc = run(*args, ok=False, inproc=inproc)
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "k.jsonl").exists()


def test_unreachable_server_is_one_line_and_leaves_old_output_alone(run, tmp_path):
    (tmp_path / "k.jsonl").write_text("previous result\n")
    url = f"http://127.0.0.1:{closed_port()}/v1"
    proc = run("dedup", EXAMPLE, "-o", "k.jsonl", "--base-url", url, "--max-retries", "0",
               extra_env={"OPENAI_API_KEY": "secret-key"}, ok=False)
    assert_one_line_error(proc)
    assert "secret-key" not in proc.stderr
    assert (tmp_path / "k.jsonl").read_text() == "previous result\n"
    assert not list(tmp_path.glob(".k.jsonl.*"))


def test_wrong_key_is_one_line(run):
    with FakeEmbeddingServer(dimensions=8, api_key="test-key") as server:
        proc = run("embed", EXAMPLE, "-o", "v.npy", "--base-url", server.base_url,
                   extra_env={"OPENAI_API_KEY": "wrong-key"}, ok=False, inproc=True)
    assert_one_line_error(proc, "401")
    assert "wrong-key" not in proc.stderr


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_output_removes_the_temporary_file_on_failure(tmp_path, error):
    target = tmp_path / "out.txt"
    with pytest.raises(error):
        with atomic_output(str(target)) as f:
            f.write("half")
            raise error("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_output(str(target)) as f:
        f.write("whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]


def test_read_table_rejects_empty_texts(tmp_path):
    (tmp_path / "e.jsonl").write_text('{"text": "a"}\n{"text": "  "}\n')
    with pytest.raises(ec.InvalidInputError, match="e.jsonl:2: field 'text' is empty"):
        read_table(str(tmp_path / "e.jsonl"))
    (tmp_path / "n.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ec.InvalidInputError, match="must be a string, got int"):
        read_table(str(tmp_path / "n.jsonl"))


def test_parquet_without_pyarrow_is_one_line(run, tmp_path, monkeypatch):
    write_formats(tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    proc = run("dedup", "in.parquet", "--column", "body", "-o", "k.parquet", ok=False, inproc=True)
    assert_one_line_error(proc, 'pip install "embedcache-sim[parquet]"')


def test_group_without_command_shows_its_help(run):
    proc = run("cache", ok=False, inproc=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "info" in proc.stderr and "clear" in proc.stderr


def test_interrupted_run_leaves_no_output(tmp_path):
    import signal
    import time

    from embedcache.testing import Fault

    env = {k: v for k, v in os.environ.items() if k not in ("IONOS_API_TOKEN", "OPENAI_API_KEY")}
    env.update(EMBEDCACHE_DIR=str(tmp_path / "cache"), OPENAI_API_KEY="test-key")
    (tmp_path / "k.jsonl").write_text("previous result\n")
    with FakeEmbeddingServer(dimensions=8, api_key="test-key") as server:
        server.push(Fault.slow(3.0))
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedcache.cli", "dedup", str(EXAMPLE), "-o", "k.jsonl",
             "--base-url", server.base_url, "--model", "test-embed-small", "--timeout", "10"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # a test run started in the background (`cmd &`, nohup) ignores SIGINT, and so would
            # the child: Python only turns SIGINT into KeyboardInterrupt when it starts with the default
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 60
        while not server.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.requests, "the command never reached the server"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip() == "embedcache: interrupted"
    assert (tmp_path / "k.jsonl").read_text() == "previous result\n"
    assert not list(tmp_path.glob(".k.jsonl.*"))


# ---------------------------------------------------------------------------------------
# input and output details
# ---------------------------------------------------------------------------------------


def test_csv_with_a_byte_order_mark(run, tmp_path):
    with open(tmp_path / "bom.csv", "w", encoding="utf-8-sig", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "id"])
        w.writeheader()
        w.writerows({"text": r["text"], "id": r["id"]} for r in ROWS)
    data = read_table(str(tmp_path / "bom.csv"))
    assert data.fieldnames == ["text", "id"] and data.texts == TEXTS
    run("dedup", "bom.csv", "-o", "out.csv", "-q", inproc=True)
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == ["text", "id"]  # written back without the mark


def test_outputs_get_the_mode_of_a_new_file(run, tmp_path):
    old = os.umask(0o027)
    try:
        run("dedup", EXAMPLE, "-o", "kept.jsonl", "--duplicates", "d.csv", "-q", inproc=True)
        run("embed", EXAMPLE, "-o", "v.npy", "-q", inproc=True)
    finally:
        os.umask(old)
    for name in ("kept.jsonl", "d.csv", "v.npy"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_show_must_not_be_negative(run):
    proc = run("dedup", EXAMPLE, "-o", "k.jsonl", "--show", "-1", ok=False, inproc=True)
    assert_one_line_error(proc, "--show", "-1")
    assert proc.returncode == 2


def test_parquet_output_of_mixed_field_types_is_one_line(run, tmp_path):
    lines = [json.dumps({"id": 1 if k % 2 else f"x{k}", "text": t}) for k, t in enumerate(TEXTS)]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    proc = run("dedup", "mixed.jsonl", "-o", "k.parquet", ok=False, inproc=True)
    assert_one_line_error(proc, "k.parquet", "Parquet")
    assert not (tmp_path / "k.parquet").exists() and not list(tmp_path.glob(".k.parquet.*"))


def test_bad_report_path_fails_before_any_work(run, tmp_path):
    (tmp_path / "k.jsonl").write_text("previous result\n")
    proc = run("dedup", EXAMPLE, "-o", "k.jsonl", "--duplicates", "no/such/dir/r.csv", ok=False, inproc=True)
    assert_one_line_error(proc, "no/such/dir")
    assert (tmp_path / "k.jsonl").read_text() == "previous result\n"
    assert not (tmp_path / "cache").exists()  # nothing was embedded
    proc = run("pairs", EXAMPLE, "-t", "0.9", "-o", "no/such/p.csv", ok=False, inproc=True)
    assert_one_line_error(proc, "no/such")
    assert not (tmp_path / "cache").exists()


def test_staged_outputs_replace_all_or_nothing(tmp_path):
    from embedcache.tables import staged_outputs

    (tmp_path / "a.txt").write_text("old a")
    with pytest.raises(OSError, match="disk full"):
        with staged_outputs() as outputs:
            with outputs.open(str(tmp_path / "a.txt")) as f:
                f.write("new a")
            with outputs.open(str(tmp_path / "b.txt")) as f:
                f.write("half of b")
                raise OSError("disk full")
    assert (tmp_path / "a.txt").read_text() == "old a" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with staged_outputs() as outputs:
        for name in ("a.txt", "b.txt"):
            with outputs.open(str(tmp_path / name)) as f:
                f.write("new " + name)
    assert (tmp_path / "a.txt").read_text() == "new a.txt" and (tmp_path / "b.txt").read_text() == "new b.txt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_interrupt_while_writing_leaves_old_outputs(run, tmp_path, monkeypatch):
    (tmp_path / "k.csv").write_text("previous result\n")
    (tmp_path / "r.csv").write_text("previous report\n")
    write_formats(tmp_path)
    import embedcache.tables as tables_mod

    cell, calls = tables_mod._cell, []

    def interrupted(value):  # the report's cells (the kept CSV rows are written as read)
        calls.append(value)
        if len(calls) > 8:  # in the second row of the report, after the kept rows were written
            raise KeyboardInterrupt
        return cell(value)

    monkeypatch.setattr(tables_mod, "_cell", interrupted)
    proc = run("dedup", "in.csv", "--column", "body", "-o", "k.csv", "--duplicates", "r.csv",
               ok=False, inproc=True)
    assert proc.returncode == 130 and proc.stderr.strip().endswith("embedcache: interrupted")
    assert len(calls) == 9  # the interrupt came in the middle of writing the report
    assert (tmp_path / "k.csv").read_text() == "previous result\n"
    assert (tmp_path / "r.csv").read_text() == "previous report\n"
    assert not list(tmp_path.glob(".*.part"))


def test_interrupt_closes_the_embedder(run, monkeypatch):
    import embedcache.cli._options as cli_options

    class Interrupted:
        cache_namespace, model, dimensions = "test|interrupted", "m", None
        closed = 0

        def embed(self, texts, *, on_batch=None):
            raise KeyboardInterrupt

        def close(self):
            Interrupted.closed += 1

    monkeypatch.setattr(cli_options, "_make_embedder", lambda *a, **k: Interrupted())
    proc = run("embed", EXAMPLE, "-o", "v.npy", ok=False, inproc=True)
    assert proc.returncode == 130 and Interrupted.closed == 1


# ---------------------------------------------------------------------------------------
# stores remember their embedder
# ---------------------------------------------------------------------------------------


def test_store_search_uses_the_stores_server_and_dimensions(run, tmp_path):
    with FakeEmbeddingServer(dimensions=8, api_key="test-key") as server:
        emb = ec.OpenAIEmbeddings("test-embed-small", base_url=server.base_url, api_key="test-key",
                                  dimensions=4)
        with ec.VectorStore(tmp_path / "vs") as vs:
            vs.add_texts(TEXTS[:5], ec.CachedEmbedder(emb, cache=ec.EmbeddingCache(tmp_path / "c2")),
                         ids=[r["id"] for r in ROWS[:5]])
        emb.close()
        before = len(server.embedding_requests)
        proc = run("store", "search", "vs", TEXTS[2], "-k", "1", "--max-retries", "0", "--timeout", "5",
                   extra_env={"OPENAI_API_KEY": "test-key"}, inproc=True)
        assert len(server.embedding_requests) == before + 1
        assert server.embedding_requests[-1].body["dimensions"] == 4
        hit = proc.stdout.splitlines()[1].split()
        assert hit[1] == ROWS[2]["id"] and float(hit[0]) > 0.99
        # a store made by the command line remembers its server too
        key = {"OPENAI_API_KEY": "test-key"}
        run("store", "add", "vs2", EXAMPLE, "--base-url", server.base_url, "--model", "test-embed-small",
            "-q", extra_env=key, inproc=True)
        proc = run("store", "search", "vs2", TEXTS[3], "-k", "1", "--max-retries", "0", "--timeout", "5",
                   extra_env=key, inproc=True)
        assert proc.stdout.splitlines()[1].split()[1] == ROWS[3]["id"]


def test_store_refuses_an_embedder_of_another_namespace(run, tmp_path):
    run("store", "add", "vs", EXAMPLE, "-q", inproc=True)  # hashing vectors
    with FakeEmbeddingServer(dimensions=8, api_key="test-key") as server:
        for command in (["search", "vs", "battery"], ["add", "vs", EXAMPLE, "--upsert"]):
            proc = run("store", *command, "--provider", "openai", "--base-url", server.base_url,
                       "--model", "test-embed-small", extra_env={"OPENAI_API_KEY": "test-key"},
                       ok=False, inproc=True)
            assert_one_line_error(proc, "hashing", "test-embed-small")
        assert server.embedding_requests == []  # refused before a request was made


def test_the_command_starts_without_loading_the_kernels():
    # the package's names load their submodules at first use: the command line reaches its
    # own Ctrl-C handling (and --help) before numba and the kernels are imported
    code = ("import sys, embedcache, embedcache.cli; assert 'numba' not in sys.modules, 'numba'; "
            "import numpy as np; s, i = embedcache.top_k(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), 1); "
            "assert 'numba' in sys.modules and i.ravel().tolist() == [0, 1, 2]; "
            "assert sorted(embedcache.__all__) == sorted(n for n in dir(embedcache) if n in embedcache.__all__)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_recall_nan_is_a_usage_error_and_an_exhaustive_search_says_so(run):
    proc = run("dedup", EXAMPLE, "-o", "k.jsonl", "--recall", "nan", ok=False, inproc=True)
    assert proc.returncode == 2 and "Invalid value for '--recall': nan" in proc.stderr
    proc = run("dedup", EXAMPLE, "-o", "k.jsonl", "--method", "partitioned", inproc=True)
    assert "method: partitioned, recall 1 (every cell searched: the exact answer)" in proc.stdout
