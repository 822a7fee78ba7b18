"""Inputs as people have them: gzip and zstandard files (by extension), CSV/TSV without a
header row (the text column by number, ragged trailing fields kept), a .csv file of
tab-separated lines, and rows without text (--skip-empty). Each read and written back, and
compared with what the uncompressed, headed, complete file gives."""

from __future__ import annotations

import csv
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import embedcache as ec
from test_cli import assert_one_line_error, run  # noqa: F401  (the fixture)
from test_cli_io import FORMATS, THRESHOLD, TEXTS, kept_rows, read_back, write_input

STSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb"


def compress(path: Path, kind: str) -> Path:
    data = path.read_bytes()
    if kind == "gz":
        out, blob = path.with_name(path.name + ".gz"), gzip.compress(data)
    else:  # two frames, as pzstd and concatenated files have
        c = zstandard.ZstdCompressor()
        out, blob = path.with_name(path.name + ".zst"), c.compress(data[:50]) + c.compress(data[50:])
    out.write_bytes(blob)
    return out


def decompress(path: Path) -> bytes:
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes())
    return zstandard.ZstdDecompressor().stream_reader(path.read_bytes(), read_across_frames=True).read()


# ---------------------------------------------------------------------------------------
# compressed inputs and outputs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gz", "zst"])
@pytest.mark.parametrize("src", [f for f in FORMATS if f != "parquet"])
def test_compressed_input_gives_what_the_plain_file_gives(run, tmp_path, src, kind):
    plain = write_input(tmp_path, src)
    packed = compress(plain, kind)
    column = [] if src == "txt" else ["--column", "text"]
    run("dedup", plain.name, *column, "-t", THRESHOLD, "-o", f"plain.{src}", "--duplicates", "r.csv", "-q",
        inproc=True)
    run("dedup", packed.name, *column, "-t", THRESHOLD, "-o", f"packed.{src}.{kind}", "--duplicates",
        f"r.csv.{kind}", "-q", inproc=True)
    assert decompress(tmp_path / f"packed.{src}.{kind}") == (tmp_path / f"plain.{src}").read_bytes()
    assert decompress(tmp_path / f"r.csv.{kind}") == (tmp_path / "r.csv").read_bytes()
    # compressed in, plain out: the same rows, and the plain output is the input's rows
    run("dedup", packed.name, *column, "-t", THRESHOLD, "-o", "unpacked.jsonl", "-q", inproc=True)
    run("dedup", plain.name, *column, "-t", THRESHOLD, "-o", "ref.jsonl", "-q", inproc=True)
    assert (tmp_path / "unpacked.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    run("embed", packed.name, *column, "-o", "v.npy", "-q", inproc=True)
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), ec.HashingEmbeddings().embed(TEXTS))


def test_gzip_output_is_the_same_bytes_each_time(run, tmp_path):
    write_input(tmp_path, "jsonl")
    run("dedup", "in.jsonl", "-o", "a.jsonl.gz", "-q", inproc=True)
    first = (tmp_path / "a.jsonl.gz").read_bytes()
    run("dedup", "in.jsonl", "-o", "a.jsonl.gz", "-q", inproc=True)
    assert (tmp_path / "a.jsonl.gz").read_bytes() == first  # no timestamp in the header
    assert len(read_back_text(decompress(tmp_path / "a.jsonl.gz"))) == len(kept_rows())


def read_back_text(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


@pytest.mark.parametrize("name, blob, fragments", [
    ("bad.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 50, mtime=0)[:25], ["bad.jsonl.gz", "not a readable gzip file"]),
    ("bad.jsonl.gz", b"plain text, not gzip", ["bad.jsonl.gz", "not a readable gzip file"]),
    ("bad.csv.zst", b"plain text, not zstd", ["bad.csv.zst", "not a readable zstd file"]),
])
def test_a_damaged_compressed_file_is_one_line(run, tmp_path, name, blob, fragments):
    (tmp_path / name).write_bytes(blob)
    proc = run("dedup", name, "-o", "out.jsonl", ok=False, inproc=True)
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "out.jsonl").exists()


def test_compressed_parquet_is_refused_by_name(run, tmp_path):
    write_input(tmp_path, "jsonl")
    proc = run("dedup", "in.jsonl", "-o", "out.parquet.gz", ok=False, inproc=True)
    assert_one_line_error(proc, "out.parquet.gz", "Parquet compresses its own columns")
    write_input(tmp_path, "parquet")
    compress(tmp_path / "in.parquet", "gz")
    proc = run("dedup", "in.parquet.gz", "-o", "out.jsonl", ok=False, inproc=True)
    assert_one_line_error(proc, "in.parquet.gz", "Parquet compresses its own columns")


def test_zstd_without_zstandard_says_how_to_install(run, tmp_path, monkeypatch):
    compress(write_input(tmp_path, "jsonl"), "zst")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    proc = run("dedup", "in.jsonl.zst", "-o", "out.jsonl", ok=False, inproc=True)
    assert_one_line_error(proc, "zstandard", 'pip install "embedcache-sim[zstd]"')
    proc = run("dedup", "in.jsonl", "-o", "out.jsonl.zst", ok=False, inproc=True)
    assert_one_line_error(proc, 'pip install "embedcache-sim[zstd]"')
    assert not list(tmp_path.glob("out.*"))


# ---------------------------------------------------------------------------------------
# CSV/TSV without a header row
# ---------------------------------------------------------------------------------------

# ragged rows: two carry extra trailing fields, one is short of the last (unused) column
HEADERLESS = [
    ["g1", "0.5", TEXTS[0], "x"],
    ["g2", "1.0", TEXTS[4]],
    ["g3", "2.0", TEXTS[5], "y", "source (http://example.org/a,b)", "extra"],
    ["g4", "3.0", TEXTS[3], ""],
]


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_headerless_rows_are_written_back_as_they_were(run, tmp_path, fmt):
    path = tmp_path / f"in.{fmt}"
    if fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerows(HEADERLESS)
    else:  # TSV: nothing quoted
        path.write_text("".join("\t".join(r) + "\n" for r in HEADERLESS), encoding="utf-8")
    texts = [row[2] for row in HEADERLESS]
    kept = ec.deduplicate(ec.HashingEmbeddings().embed(texts), threshold=THRESHOLD, progress=False).kept.tolist()
    assert kept == [0, 1, 3]  # the near-duplicate in row 3 goes
    run("dedup", path.name, "--no-header", "--column", "3", "-t", THRESHOLD, "-o", f"out.{fmt}", "-q", inproc=True)
    assert read_back(tmp_path / f"out.{fmt}", fmt) == [HEADERLESS[k] for k in kept]
    if fmt == "tsv":  # not one byte changed
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        assert (tmp_path / "out.tsv").read_text(encoding="utf-8") == "".join(lines[k] for k in kept)
    run("dedup", path.name, "--no-header", "--column", "3", "-t", THRESHOLD, "-o", "out.jsonl", "-q", inproc=True)
    assert read_back(tmp_path / "out.jsonl", "jsonl") == [
        {str(c + 1): cell for c, cell in enumerate(HEADERLESS[k])} for k in kept]  # columns by number
    run("embed", path.name, "--no-header", "--column", "3", "-o", "v.npy", "-q", inproc=True)
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), ec.HashingEmbeddings().embed(texts))


def test_headerless_ids_by_number(run, tmp_path):
    (tmp_path / "in.tsv").write_text("".join("\t".join(r) + "\n" for r in HEADERLESS), encoding="utf-8")
    run("pairs", "in.tsv", "--no-header", "--column", "3", "--id-field", "1", "-t", THRESHOLD, "-o", "p.jsonl",
        "-q", inproc=True)
    [pair] = read_back(tmp_path / "p.jsonl", "jsonl")
    assert (pair["i"], pair["j"], pair["id_i"], pair["id_j"]) == (1, 2, "g2", "g3")


@pytest.mark.parametrize("args, fragments", [
    (["in.tsv", "--no-header"], ["without a header row", "--column 2"]),
    (["in.tsv", "--no-header", "--column", "text"], ["column number", "'text'"]),
    (["in.tsv", "--no-header", "--column", "0"], ["column number", "'0'"]),
    (["in.tsv", "--no-header", "--column", "4"], ["in.tsv:2 (3 cells)", "no value for column 4"]),
    (["in.tsv", "--no-header", "--column", "7"], ["in.tsv:1 (4 cells)", "no value for column 7"]),
    (["in.jsonl", "--no-header", "--column", "1"], ["--no-header applies to CSV and TSV"]),
])
def test_headerless_mistakes_are_one_line(run, tmp_path, args, fragments):
    (tmp_path / "in.tsv").write_text("".join("\t".join(r) + "\n" for r in HEADERLESS), encoding="utf-8")
    write_input(tmp_path, "jsonl")
    proc = run("dedup", *args, "-o", "out.tsv", ok=False, inproc=True)
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "out.tsv").exists()


def test_a_csv_file_of_tab_separated_lines_is_read_as_tsv(run, tmp_path):
    # as data sets are published: a .csv name, tabs between fields, quotes that are text
    rows = [["a", 'He said "hi", then left'], ["b", "plain, with a comma"], ["c", 'He said "hi", then left!']]
    (tmp_path / "in.csv").write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    proc = run("dedup", "in.csv", "--no-header", "--column", "2", "-t", THRESHOLD, "-o", "out.tsv",
               inproc=True)
    assert "read in.csv as tab-separated" in proc.stderr and "--format csv" in proc.stderr
    assert read_back(tmp_path / "out.tsv", "tsv") == rows[:2]
    proc = run("dedup", "in.csv", "--format", "csv", "--skip-empty", "--no-header", "--column", "2", "-o",
               "forced.csv", inproc=True)  # split at commas, as asked
    assert "tab-separated" not in proc.stderr
    assert read_back(tmp_path / "forced.csv", "csv")[0] == ['a\tHe said "hi"', " then left"]
    with open(tmp_path / "real.csv", "w", newline="") as f:  # a CSV whose text holds a tab stays CSV
        csv.writer(f).writerows([["id", "text"], ["1", "tab\tinside"], ["2", "none here"]])
    run("dedup", "real.csv", "-o", "out.csv", "-q", inproc=True)
    assert read_back(tmp_path / "out.csv", "csv") == [["id", "text"], ["1", "tab\tinside"], ["2", "none here"]]


@pytest.mark.skipif(not (STSB / "sts-train.csv").is_file(), reason="STS Benchmark data not present")
def test_sts_benchmark_as_a_new_user_runs_it(run, tmp_path):
    src = STSB / "sts-train.csv"
    proc = run("dedup", src, "--no-header", "--column", "6", "-o", "kept.tsv", "--show", "0")
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    texts = [line.rstrip("\n").split("\t")[5] for line in lines]
    res = ec.deduplicate(ec.HashingEmbeddings().embed(texts), threshold=0.9, progress=False)
    assert 0 < len(res.removed) < len(texts)
    assert (tmp_path / "kept.tsv").read_text(encoding="utf-8") == "".join(lines[k] for k in res.kept)
    assert f"kept {len(res.kept)} of {len(texts)} rows" in proc.stdout


# ---------------------------------------------------------------------------------------
# rows without text
# ---------------------------------------------------------------------------------------

EMPTY_JSONL = [
    {"id": "a", "text": TEXTS[4]},
    {"id": "b", "text": ""},
    {"id": "c", "text": TEXTS[5]},  # a near-duplicate of a
    {"id": "d", "text": None},
    {"id": "e"},
    {"id": "f", "text": "   "},
    {"id": "g", "text": TEXTS[0]},
]
WITH_TEXT = [0, 2, 6]


def _write_empty(tmp_path: Path, fmt: str) -> Path:
    path = tmp_path / f"in.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in EMPTY_JSONL), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.table({"id": [r["id"] for r in EMPTY_JSONL],
                                 "text": [r.get("text") for r in EMPTY_JSONL]}), path)
    else:  # a null is an empty cell; the row without the field, a short row
        rows = [["id", "text"]] + [[r["id"]] + ([r["text"] or ""] if "text" in r else []) for r in EMPTY_JSONL]
        if fmt == "csv":
            with open(path, "w", newline="", encoding="utf-8") as f:
                csv.writer(f, lineterminator="\n").writerows(rows)
        else:
            path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_skip_empty_keeps_rows_without_text_as_they_are(run, tmp_path, fmt):
    _write_empty(tmp_path, fmt)
    proc = run("dedup", f"in.{fmt}", "-o", "out.txt", ok=False, inproc=True)  # without it: an error
    assert_one_line_error(proc, "in.", "--skip-empty")
    proc = run("dedup", f"in.{fmt}", "--skip-empty", "-t", THRESHOLD, "-o", f"out.{fmt}", "--duplicates",
               "r.jsonl", "-q", inproc=True)
    assert "kept 6 of 7 rows, removed 1" in proc.stdout and "4 without text kept, not compared" in proc.stdout
    if fmt == "jsonl":
        assert read_back(tmp_path / "out.jsonl", "jsonl") == [r for k, r in enumerate(EMPTY_JSONL) if k != 2]
    elif fmt == "parquet":
        assert [r["id"] for r in pq.read_table(tmp_path / "out.parquet").to_pylist()] == list("abdefg")
    else:
        src = (tmp_path / f"in.{fmt}").read_text(encoding="utf-8").splitlines(keepends=True)
        assert (tmp_path / f"out.{fmt}").read_text(encoding="utf-8") == "".join(src[:3] + src[4:])
    [removed] = read_back(tmp_path / "r.jsonl", "jsonl")  # positions in the input, not among those compared
    assert (removed["index"], removed["duplicate_of"], removed["id"]) == (2, 0, "c")


def test_skip_empty_pairs_name_input_rows_and_never_an_empty_one(run, tmp_path):
    _write_empty(tmp_path, "jsonl")
    proc = run("pairs", "in.jsonl", "--skip-empty", "-t", "-1", "-o", "p.jsonl", "-q", inproc=True)
    got = read_back(tmp_path / "p.jsonl", "jsonl")
    x = ec.HashingEmbeddings().embed([EMPTY_JSONL[k]["text"] for k in WITH_TEXT])
    want = ec.near_duplicates(x, threshold=-1, progress=False)
    assert [(r["i"], r["j"]) for r in got] == [(WITH_TEXT[i], WITH_TEXT[j]) for i, j in zip(want.i, want.j)]
    assert len(got) == 3 and all(r["text_i"].strip() and r["text_j"].strip() for r in got)
    assert "3 pairs at or above -1.0 among 3 rows; 4 without text kept, not compared" in proc.stdout


def test_skip_empty_with_no_text_anywhere_is_an_error(run, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"body": "y"}) + "\n")
    proc = run("dedup", "in.jsonl", "--skip-empty", "-o", "out.jsonl", ok=False, inproc=True)
    assert_one_line_error(proc, "in.jsonl", "no row has text in field 'text'", "--field")
