"""A vector store as the input of ``dedup`` and ``pairs`` (and as ``dedup --against``): the
vectors as stored, nothing embedded, rows written back with their ids and metadata; the
``store index`` command; ``--method`` and ``--recall``; the pairs progress bar in work units.

End to end through the ``run`` fixture of test_cli.py, compared with the library called on the
same store.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import embedcache as ec
from embedcache import _config
from embedcache.cli._search import search_kwargs, search_note
from embedcache.errors import ConfigurationError
from test_cli import EXAMPLE, ROWS, TEXTS, assert_one_line_error, run  # noqa: F401 (run: a fixture)



def clustered(n=240, d=24, seed=0):
    """Rows around a few centres, with exact copies and near-copies planted."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, d))
    x = centres[rng.integers(0, 6, n)] + rng.normal(scale=0.35, size=(n, d))
    x[10:20] = x[0:10]  # exact copies
    x[20:40] = x[40:60] + rng.normal(scale=0.02, size=(20, d))  # near-copies
    return x.astype(np.float32)


def make_store(path, x=None, *, dtype="float32", texts=True, namespace=None):
    x = clustered() if x is None else x
    ids = [f"doc-{k:03d}" for k in range(len(x))]
    meta = [{"text": f"text of {k}", "n": k, "tags": ["a", f"t{k % 3}"]} if texts else {"n": k} for k in range(len(x))]
    with ec.VectorStore(path, dtype=dtype, namespace=namespace) as vs:
        vs.add(ids, x, metadata=meta)
    return ids, meta


def jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- dedup


def test_dedup_of_a_store_writes_its_rows_with_ids_and_metadata(run, tmp_path):
    ids, meta = make_store(tmp_path / "vs")
    proc = run("dedup", "vs", "-o", "kept.jsonl", "--duplicates", "dups.csv", "--threshold", "0.95",
               "--report", "report.html")
    assert "embedder" not in proc.stderr  # nothing embedded, no embedder named
    with ec.VectorStore(tmp_path / "vs") as vs:
        res = ec.deduplicate(vs, threshold=0.95, progress=False)
    assert len(res.removed) >= 20
    assert jsonl(tmp_path / "kept.jsonl") == [{"id": ids[k], **meta[k]} for k in res.kept]
    with open(tmp_path / "dups.csv", newline="") as f:
        report = list(csv.DictReader(f))
    assert [r["id"] for r in report] == [ids[k] for k in res.removed]
    assert [int(r["duplicate_of"]) for r in report] == res.duplicate_of.tolist()
    assert [r["text"] for r in report] == [meta[k]["text"] for k in res.removed]
    assert f"kept {len(res.kept)} of {len(ids)} rows" in proc.stdout
    assert "(kept doc-000)" in proc.stdout  # groups are labelled by the store's ids
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert any(ids[k] in page for k in res.removed) and "a vector store&#x27;s vectors, as stored" in page


@pytest.mark.parametrize("out", ["kept.csv", "kept.parquet", "kept.txt", "kept.out"])
def test_dedup_of_a_store_in_each_output_format(run, tmp_path, out):
    ids, meta = make_store(tmp_path / "vs")
    run("dedup", "vs", "-o", out, "-q", inproc=True)
    with ec.VectorStore(tmp_path / "vs") as vs:
        kept = ec.deduplicate(vs, threshold=0.9, progress=False).kept
    if out == "kept.csv":
        with open(tmp_path / out, newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["id"] for r in rows] == [ids[k] for k in kept]
        assert [json.loads(r["tags"]) for r in rows] == [meta[k]["tags"] for k in kept]
    elif out == "kept.parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(tmp_path / out)
        assert table.column_names == ["id", "text", "n", "tags"]
        assert table.column("n").to_pylist() == kept.tolist()
    elif out == "kept.txt":
        assert (tmp_path / out).read_text().splitlines() == [meta[k]["text"] for k in kept]
    else:  # no extension that names a format: JSON Lines
        assert jsonl(tmp_path / out) == [{"id": ids[k], **meta[k]} for k in kept]


def test_a_float16_store_and_a_store_without_texts(run, tmp_path):
    x = clustered(seed=3)
    ids, meta = make_store(tmp_path / "half", x, dtype="float16", texts=False)
    run("dedup", "half", "-o", "kept.jsonl", "-t", "0.97", "-q", inproc=True)
    with ec.VectorStore(tmp_path / "half") as vs:
        res = ec.deduplicate(vs, threshold=0.97, progress=False)
    assert len(res.removed) >= 10
    assert jsonl(tmp_path / "kept.jsonl") == [{"id": ids[k], **meta[k]} for k in res.kept]
    # plain text output needs a text per row: refused before anything is written
    proc = run("dedup", "half", "-o", "kept.txt", ok=False, inproc=True)
    assert_one_line_error(proc, "row 'doc-000' has no text", ".jsonl")
    assert not (tmp_path / "kept.txt").exists()


def test_dedup_against_a_store_and_a_store_against_a_file(run, tmp_path):
    (tmp_path / "train.txt").write_text("\n".join(TEXTS[:20]) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(TEXTS[20:] + TEXTS[:5]) + "\n")
    run("store", "add", "train", "train.txt", "-q", inproc=True)
    run("store", "add", "test", "test.txt", "-q", inproc=True)
    emb = ec.HashingEmbeddings()
    x_train, x_test = emb.embed(TEXTS[:20]), emb.embed(TEXTS[20:] + TEXTS[:5])
    expected = ec.deduplicate(x_test, against=x_train, threshold=0.9, progress=False)
    assert len(expected.removed) >= 5
    test_rows = (TEXTS[20:] + TEXTS[:5])
    # a file against a store: the file is embedded with the store's embedder
    proc = run("dedup", "test.txt", "--against", "train", "-o", "a.txt")
    assert "store's embedder" in proc.stderr
    assert (tmp_path / "a.txt").read_text().splitlines() == [test_rows[k] for k in expected.kept]
    # a store against a store, and a store against a file
    for against in ("train", "train.txt"):
        run("dedup", "test", "--against", against, "-o", "b.txt", "-q", inproc=True)
        assert (tmp_path / "b.txt").read_text().splitlines() == [test_rows[k] for k in expected.kept]


def test_stores_of_two_embedders_are_refused(run, tmp_path):
    make_store(tmp_path / "a", namespace="one-model")
    make_store(tmp_path / "b", namespace="another-model")
    proc = run("dedup", "a", "--against", "b", "-o", "k.jsonl", ok=False, inproc=True)
    assert_one_line_error(proc, "one-model", "another-model")


# ----------------------------------------------------------------------------- pairs


def test_pairs_of_a_store(run, tmp_path):
    ids, meta = make_store(tmp_path / "vs")
    proc = run("pairs", "vs", "-t", "0.9", "-o", "pairs.jsonl", "--report", "pairs.html")
    with ec.VectorStore(tmp_path / "vs") as vs:
        table = ec.near_duplicates(vs, threshold=0.9, progress=False)
    rows = jsonl(tmp_path / "pairs.jsonl")
    assert len(rows) == len(table) >= 30
    assert [(r["i"], r["j"], r["score"]) for r in rows] == [(p["i"], p["j"], p["score"]) for p in table]
    assert [(r["id_i"], r["id_j"]) for r in rows] == [(ids[i], ids[j]) for i, j in zip(table.i, table.j)]
    assert [r["text_i"] for r in rows] == [meta[i]["text"] for i in table.i]
    assert f"{len(table)} pairs at or above 0.9 among {len(ids)} rows" in proc.stdout
    page = (tmp_path / "pairs.html").read_text(encoding="utf-8")
    assert any(ids[i] in page for i in table.i)


# ----------------------------------------------------------------------------- refused


def test_what_does_not_apply_to_a_store_is_refused(run, tmp_path):
    make_store(tmp_path / "vs")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not a store\n")
    cases = [
        (("dedup", "plain", "-o", "k.jsonl"), ("INPUT plain", "without a vector store")),
        (("pairs", "vs", "-t", "0.9", "-o", "p.csv", "--field", "body"), ("--field does not apply",)),
        (("dedup", "vs", "-o", "k.jsonl", "--format", "csv"), ("--format does not apply",)),
        (("dedup", "vs", "-o", "k.jsonl", "--provider", "local"), ("--provider does not apply",)),
        (("dedup", EXAMPLE, "-o", "k.jsonl", "--against", "plain"), ("--against plain",)),
        (("dedup", "vs", "-o", "k.jsonl", "--method", "exact", "--recall", "0.9"), ("--recall applies",)),
        (("store", "index", "plain"), ("STORE plain", "without a vector store")),
    ]
    for args, fragments in cases:
        assert_one_line_error(run(*args, ok=False, inproc=True), *fragments)
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["notes.txt"]  # no store made there
    assert not list(tmp_path.glob("k.*")) and not list(tmp_path.glob("p.*"))


def test_a_store_written_while_it_is_read_gives_no_output(run, tmp_path, monkeypatch):
    make_store(tmp_path / "vs")
    import embedcache.workflows as wf

    real = wf.deduplicate

    def with_a_write(items, **kwargs):
        with ec.VectorStore(tmp_path / "vs") as other:  # another writer, between the reads
            other.add(["late"], np.ones((1, 24), dtype=np.float32))
        return real(items, **kwargs)

    monkeypatch.setattr(wf, "deduplicate", with_a_write)
    proc = run("dedup", "vs", "-o", "kept.jsonl", ok=False, inproc=True)
    assert_one_line_error(proc, "vs changed while it was read", "run the command again")
    assert not (tmp_path / "kept.jsonl").exists()


def test_search_options_pass_only_what_was_given():
    assert search_kwargs({"method": None, "recall": None}) == {}
    assert search_kwargs({"method": "partitioned", "recall": 0.9}) == {"method": "partitioned", "recall": 0.9}
    with pytest.raises(ConfigurationError, match="--recall applies to a partitioned search"):
        search_kwargs({"method": "exact", "recall": 0.9})
    assert search_note(object(), {"method": None}) == ""  # a result that does not say: nothing


# ----------------------------------------------------------------------------- method, recall, index


@pytest.mark.parametrize("command", ["dedup", "pairs"])
def test_auto_says_it_chose_exact_on_a_small_input(run, tmp_path, command):
    out = "k.jsonl" if command == "dedup" else "p.csv"
    proc = run(command, EXAMPLE, "-t", "0.9", "-o", out, "-q", inproc=True)
    assert proc.stdout.splitlines()[-1].endswith("; method: exact (auto)")
    proc = run(command, EXAMPLE, "-t", "0.9", "-o", out, "-q", "--method", "exact", inproc=True)
    assert proc.stdout.splitlines()[-1].endswith("; method: exact")


def test_partitioned_dedup_and_pairs_report_the_recall_the_library_measured(run, tmp_path):
    ids, meta = make_store(tmp_path / "vs", clustered(n=600, seed=5))
    proc = run("dedup", "vs", "-o", "kept.jsonl", "--method", "partitioned", "--recall", "0.9", "-q",
               inproc=True)
    with ec.VectorStore(tmp_path / "vs") as vs:
        res = ec.deduplicate(vs, threshold=0.9, method="partitioned", recall=0.9, progress=False)
        table = ec.near_duplicates(vs, threshold=0.9, method="partitioned", recall=0.9, progress=False)
    assert res.method == "partitioned" and res.recall is not None
    assert jsonl(tmp_path / "kept.jsonl") == [{"id": ids[k], **meta[k]} for k in res.kept]
    rec = res.recall
    assert (f"; method: partitioned, recall {rec.estimate:.4f} (95% CI {rec.low:.4f}-{rec.high:.4f}"
            in proc.stdout)
    proc = run("pairs", "vs", "-t", "0.9", "-o", "p.csv", "--method", "partitioned", "--recall", "0.9", "-q",
               inproc=True)
    rec = table.recall
    assert f"recall {rec.estimate:.4f} (95% CI {rec.low:.4f}-{rec.high:.4f}" in proc.stdout
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["i"]), int(r["j"])) for r in rows] == list(zip(table.i.tolist(), table.j.tolist()))
    # every pair listed is a true pair, with its exact score
    exact = ec.near_duplicates(clustered(n=600, seed=5), threshold=0.9, method="exact", progress=False)
    truth = {(i, j): s for i, j, s in zip(exact.i.tolist(), exact.j.tolist(), exact.score.tolist())}
    assert all(truth[(int(r["i"]), int(r["j"]))] == pytest.approx(float(r["score"]), abs=1e-6) for r in rows)


def test_store_index_builds_the_index_the_workflows_use(run, tmp_path):
    ids, meta = make_store(tmp_path / "vs", clustered(n=600, seed=7))
    proc = run("store", "index", "vs", "--cells", "8", "--seed", "1")
    assert proc.stdout.startswith(f"vs: indexed {len(ids)} rows")
    with ec.VectorStore(tmp_path / "vs") as vs:
        assert vs.index_info() is not None
        res = ec.deduplicate(vs, threshold=0.9, method="partitioned", recall=0.95, progress=False)
    proc = run("dedup", "vs", "-o", "kept.jsonl", "--method", "partitioned", "--recall", "0.95", "-q",
               inproc=True)
    assert jsonl(tmp_path / "kept.jsonl") == [{"id": ids[k], **meta[k]} for k in res.kept]
    assert "; method: partitioned, recall" in proc.stdout
    # searching still works, and store info still reads the store
    assert "rows: 600" in run("store", "info", "vs", inproc=True).stdout


# ----------------------------------------------------------------------------- progress


def test_the_pairs_bar_counts_pairs_compared_not_rows(monkeypatch):
    """Each block of rows moves the bar by its share of the triangle (the first block of n rows
    compares with every later row, the last with none), so the time estimate holds."""
    import embedcache.workflows.pairs as pairs_mod

    bars = []
    real = pairs_mod._progress_bar

    def recording(progress, total, desc, unit="rows"):
        bar = real(True, total, desc, unit)
        steps = []
        update = bar.update
        bar.update = lambda n=1: (steps.append(n), update(n))[1]
        bars.append((total, unit, steps))
        return bar

    monkeypatch.setattr(pairs_mod, "_progress_bar", recording)
    x = clustered(n=230, seed=1)
    with _config.override(CHUNK_ROWS=50):
        table = ec.near_duplicates(x, threshold=0.9, method="exact", progress=True)
    assert len(table) > 0
    [(total, unit, steps)] = bars
    u = len(np.unique(x, axis=0))  # exact copies are collapsed before the search
    assert u == 220 and unit != "rows" and total == u * (u - 1) // 2 == sum(steps)
    # a naive count of the pairs (r, later row) each block of rows looks at
    naive = [sum(u - 1 - r for r in range(a, min(a + 50, u))) for a in range(0, u, 50)]
    assert steps == naive and steps == sorted(steps, reverse=True)
