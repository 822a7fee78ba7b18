"""The command line keeps rows intact: every input format read exactly (TSV unquoted, CSV
strictly quoted, headers with blank or repeated names), every output format written so that
reading it back gives the input rows (or the documented conversion of them), and outputs that
would replace an input refused before any work."""

from __future__ import annotations

import base64
import csv
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embedcache as ec
from test_cli import assert_one_line_error, run  # noqa: F401  (the fixture)

TEXTS = [
    '"Hello world, said the reviewer',
    "another review with \"quoted\" words, and a comma",
    'third "quoted" line',
    "Ünïcödé — ümlauts and an emoji 😀",
    "plain text about the battery life of this phone",
    "plain text about the battery life of this phone!",  # a near-duplicate of the row before
    "  leading spaces and a trailing one ",
    "a backslash \\n that is not a line break",
    "'single quotes' and a semicolon; here",
]
THRESHOLD = 0.9
FORMATS = ["txt", "jsonl", "csv", "tsv", "parquet"]


def kept_rows() -> list[int]:
    x = ec.HashingEmbeddings().embed(TEXTS)
    kept = ec.deduplicate(x, threshold=THRESHOLD, progress=False).kept.tolist()
    assert len(kept) < len(TEXTS)  # the data makes the command remove something
    return kept


def records() -> list[dict]:
    """JSON Lines rows: numbers, lists, null and a field only some rows have."""
    rows = []
    for k, text in enumerate(TEXTS):
        row = {"id": f"r{k}", "text": text, "stars": k % 5, "tags": ["a", "b,c"][: k % 3]}
        if k % 3:
            row["note"] = None if k % 3 == 1 else f'n"{k}'
        rows.append(row)
    return rows


def parquet_table() -> pa.Table:
    return pa.table({
        "id": [f"r{k}" for k in range(len(TEXTS))],
        "text": TEXTS,
        "stars": [k % 5 for k in range(len(TEXTS))],
        "tags": [["a", "b,c"][: k % 3] for k in range(len(TEXTS))],
        "blob": [bytes([k, 0, 255]) for k in range(len(TEXTS))],
    })


HEADER = ["id", "text", "stars"]
CELLS = [[f"r{k}", t, "" if k == 2 else str(k % 5)] for k, t in enumerate(TEXTS)]


def write_input(tmp_path: Path, fmt: str) -> Path:
    path = tmp_path / f"in.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records()), encoding="utf-8")
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([HEADER, *CELLS])
    elif fmt == "tsv":
        path.write_text("".join("\t".join(r) + "\n" for r in [HEADER, *CELLS]), encoding="utf-8")
    else:
        pq.write_table(parquet_table(), path)
    return path


def read_back(path: Path, fmt: str):
    """The output, read without embedcache: lines, JSON objects, CSV/TSV rows of cells
    (header first), or the Parquet column names and rows."""
    if fmt == "parquet":
        table = pq.read_table(path)
        return table.column_names, table.to_pylist()
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.reader(f))
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", "the file ends with a line break"
    if fmt == "txt":
        return lines[:-1]
    if fmt == "jsonl":
        return [json.loads(line) for line in lines[:-1]]
    return [line.split("\t") for line in lines[:-1]]


def as_cell(value) -> str:
    """The documented CSV/TSV form of a value: strings as they are, null empty, bytes in
    base64, everything else JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return json.dumps(value, ensure_ascii=False)


def as_json(row: dict) -> dict:
    return {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in row.items()}


def expected_output(src: str, out: str, kept: list[int]):
    """What reading the output back must give: the input rows, converted as README says."""
    if src in ("csv", "tsv"):
        header, rows = HEADER, [dict(zip(HEADER, CELLS[k])) for k in kept]
    elif src == "txt":
        header, rows = ["text"], [{"text": TEXTS[k]} for k in kept]
    elif src == "jsonl":
        header, rows = ["id", "text", "stars", "tags", "note"], [records()[k] for k in kept]
    else:
        header, rows = parquet_table().column_names, [parquet_table().to_pylist()[k] for k in kept]
    if out == "txt":
        return [TEXTS[k] for k in kept]
    if out in ("csv", "tsv"):
        return [header, *([as_cell(r.get(name)) for name in header] for r in rows)]
    if out == "jsonl":
        return [as_json(r) for r in rows]
    return header, [{name: r.get(name) for name in header} for r in rows]


@pytest.mark.parametrize("out", FORMATS)
@pytest.mark.parametrize("src", FORMATS)
def test_dedup_round_trip_keeps_every_row_and_field(run, tmp_path, src, out):
    write_input(tmp_path, src)
    column = [] if src == "txt" else ["--column", "text"]
    run("dedup", f"in.{src}", *column, "-t", THRESHOLD, "-o", f"out.{out}", "-q", inproc=True)
    assert read_back(tmp_path / f"out.{out}", out) == expected_output(src, out, kept_rows())


@pytest.mark.parametrize("src", FORMATS)
def test_embed_writes_one_vector_per_row(run, tmp_path, src):
    write_input(tmp_path, src)
    column = [] if src == "txt" else ["--column", "text"]
    run("embed", f"in.{src}", *column, "-o", "v.npy", "-q", inproc=True)
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), ec.HashingEmbeddings().embed(TEXTS))


@pytest.mark.parametrize("out", ["csv", "tsv", "jsonl", "parquet"])
def test_pairs_in_each_table_format(run, tmp_path, out):
    write_input(tmp_path, "tsv")
    run("pairs", "in.tsv", "-t", THRESHOLD, "-o", f"p.{out}", "-q", inproc=True)
    got = read_back(tmp_path / f"p.{out}", out)
    if out == "parquet":
        rows = got[1]
    elif out == "jsonl":
        rows = got
    else:
        rows = [dict(zip(got[0], r)) for r in got[1:]]
    pairs = ec.near_duplicates(ec.HashingEmbeddings().embed(TEXTS), threshold=THRESHOLD, progress=False)
    assert len(rows) == len(pairs) > 0
    for row, (i, j) in zip(rows, zip(pairs.i.tolist(), pairs.j.tolist())):
        assert (int(row["i"]), int(row["j"])) == (i, j)
        assert (row["id_i"], row["text_i"], row["text_j"]) == (f"r{i}", TEXTS[i], TEXTS[j])


# ---------------------------------------------------------------------------------------
# TSV and CSV reading
# ---------------------------------------------------------------------------------------


def test_tsv_cell_that_begins_with_a_quote_is_not_a_quoted_field(run, tmp_path):
    text = 'id\ttext\n1\t"Hello world, said the reviewer\n2\tanother review\n3\tthird "quoted" line\n'
    (tmp_path / "q.tsv").write_text(text, encoding="utf-8")
    run("embed", "q.tsv", "-o", "v.npy", "-q", inproc=True)
    assert np.load(tmp_path / "v.npy").shape[0] == 3
    run("dedup", "q.tsv", "-o", "out.tsv", "-q", inproc=True)
    assert (tmp_path / "out.tsv").read_text(encoding="utf-8") == text


def test_tsv_output_refuses_a_tab_or_line_break_in_a_value(run, tmp_path):
    rows = [{"id": "a", "text": "first review"}, {"id": "b", "text": "a\ttab inside"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run("dedup", "in.jsonl", "-o", "out.tsv", ok=False, inproc=True)
    assert_one_line_error(proc, "out.tsv", "row 2", "column 'text'", "tab or line break")
    assert not (tmp_path / "out.tsv").exists() and not list(tmp_path.glob(".*.part"))
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "x", "multi\nline key": 1}) + "\n")
    proc = run("dedup", "in.jsonl", "-o", "out.tsv", ok=False, inproc=True)
    assert_one_line_error(proc, "header", "tab or line break")


def test_csv_quote_left_open_is_an_error_not_one_long_cell(run, tmp_path):
    (tmp_path / "q.csv").write_text('id,text\n1,"Hello world, said the reviewer\n2,another review\n')
    proc = run("embed", "q.csv", "-o", "v.npy", ok=False, inproc=True)
    assert_one_line_error(proc, "q.csv:3", "not valid CSV")
    assert not (tmp_path / "v.npy").exists()


def test_csv_cell_with_a_line_break_stays_one_row(run, tmp_path):
    with open(tmp_path / "in.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "text"], ["1", "two\nlines"], ["2", "bare\rreturn"], ["3", "end"]])
    run("dedup", "in.csv", "-o", "out.csv", "-q", inproc=True)
    assert read_back(tmp_path / "out.csv", "csv") == [["id", "text"], ["1", "two\nlines"],
                                                      ["2", "bare\rreturn"], ["3", "end"]]
    run("dedup", "in.csv", "-o", "out.txt", "-q", inproc=True)  # one line per row, breaks as spaces
    assert read_back(tmp_path / "out.txt", "txt") == ["two lines", "bare return", "end"]


def test_jsonl_with_a_repeated_key_is_an_error(run, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n{"text": "b", "n": 1, "n": 2}\n')
    proc = run("dedup", "in.jsonl", "-o", "out.jsonl", ok=False, inproc=True)
    assert_one_line_error(proc, "in.jsonl:2", "'n' appears twice")


# ---------------------------------------------------------------------------------------
# CSV headers with blank or repeated names, rows longer than the header
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("header, rows", [
    (["id", "text", "", ""], [["1", "alpha beta", "", ""], ["2", "gamma delta", "x", "y"]]),
    (["a", "a", "text"], [["1", "2", "alpha beta"], ["3", "4", "gamma delta"]]),
    (["id", "text"], [["1", "alpha beta", "extra"], ["2", "gamma delta"]]),
])
@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_awkward_headers_and_long_rows_are_written_back_exactly(run, tmp_path, header, rows, fmt):
    delimiter = "," if fmt == "csv" else "\t"
    (tmp_path / f"in.{fmt}").write_text("".join(delimiter.join(r) + "\n" for r in [header, *rows]))
    for out in ("csv", "tsv"):
        run("dedup", f"in.{fmt}", "-o", f"out.{out}", "-q", inproc=True)
        assert read_back(tmp_path / f"out.{out}", out) == [header, *rows]
    run("pairs", f"in.{fmt}", "-t", "0.1", "-o", "p.csv", "-q", inproc=True)
    for out in ("jsonl", "parquet"):  # no name for every column: refused, nothing written
        proc = run("dedup", f"in.{fmt}", "-o", f"out.{out}", ok=False, inproc=True)
        assert_one_line_error(proc, f"in.{fmt}", "only be written back as CSV or TSV")
        assert not (tmp_path / f"out.{out}").exists()


def test_column_with_a_repeated_name_is_ambiguous(run, tmp_path):
    (tmp_path / "in.csv").write_text("text,id,text\nalpha,1,beta\n")
    proc = run("dedup", "in.csv", "-o", "out.csv", ok=False, inproc=True)
    assert_one_line_error(proc, "2 columns are named 'text'", "--column")
    (tmp_path / "in.csv").write_text("id,text,id\n1,alpha,2\n")
    proc = run("dedup", "in.csv", "-o", "out.csv", "--duplicates", "r.csv", ok=False, inproc=True)
    assert_one_line_error(proc, "2 columns are named 'id'", "--id-field")


def test_short_rows_are_kept_short(run, tmp_path):
    (tmp_path / "in.csv").write_text("id,text,stars\n1,alpha beta\n2,gamma delta,5\n")
    run("dedup", "in.csv", "-o", "out.csv", "-q", inproc=True)
    assert read_back(tmp_path / "out.csv", "csv") == [["id", "text", "stars"], ["1", "alpha beta"],
                                                      ["2", "gamma delta", "5"]]
    run("dedup", "in.csv", "-o", "out.jsonl", "-q", inproc=True)
    assert read_back(tmp_path / "out.jsonl", "jsonl") == [{"id": "1", "text": "alpha beta"},
                                                          {"id": "2", "text": "gamma delta", "stars": "5"}]


# ---------------------------------------------------------------------------------------
# outputs never replace inputs
# ---------------------------------------------------------------------------------------


def _inputs(tmp_path):
    write_input(tmp_path, "jsonl")
    (tmp_path / "ref.jsonl").write_text(json.dumps({"text": "reference"}) + "\n")
    (tmp_path / "data").write_text("\n".join(TEXTS) + "\n")  # plain text, no extension
    os.symlink("in.jsonl", tmp_path / "link.jsonl")
    os.link(tmp_path / "in.jsonl", tmp_path / "hard.jsonl")


@pytest.mark.parametrize("args, fragments", [
    (["dedup", "in.jsonl", "-o", "out.csv", "--duplicates", "in.jsonl"], ["--duplicates in.jsonl", "INPUT"]),
    (["dedup", "in.jsonl", "-o", "./in.jsonl"], ["-o ./in.jsonl", "INPUT in.jsonl"]),
    (["dedup", "in.jsonl", "-o", "link.jsonl"], ["-o link.jsonl"]),
    (["dedup", "in.jsonl", "-o", "hard.jsonl"], ["-o hard.jsonl"]),
    (["dedup", "in.jsonl", "-o", "k.jsonl", "--against", "ref.jsonl", "--duplicates", "ref.jsonl"],
     ["--against ref.jsonl"]),
    (["dedup", "in.jsonl", "-o", "out.csv", "--duplicates", "sub/../out.csv"], ["-o out.csv"]),
    (["embed", "data", "-o", "./data"], ["-o ./data", "INPUT data"]),
    (["embed", "in.jsonl", "-o", "in.jsonl"], [".npy"]),
    (["pairs", "in.jsonl", "-t", "0.9", "-o", "in.jsonl"], ["INPUT in.jsonl"]),
    (["pairs", "in.jsonl", "-t", "0.9", "-o", "p.txt"], ["p.txt", ".parquet"]),
    (["dedup", "in.jsonl", "-o", "k.jsonl", "--duplicates", "r.txt"], ["r.txt", ".csv"]),
])
def test_outputs_that_would_replace_an_input_are_refused_before_any_work(run, tmp_path, args, fragments):
    _inputs(tmp_path)
    (tmp_path / "sub").mkdir()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    proc = run(*args, ok=False, inproc=True)
    assert_one_line_error(proc, *fragments)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not (tmp_path / "cache").exists()  # nothing was embedded


def test_pairs_parquet_is_parquet_and_the_report_follows_its_extension(run, tmp_path):
    write_input(tmp_path, "jsonl")
    run("pairs", "in.jsonl", "-t", THRESHOLD, "-o", "p.parquet", "-q", inproc=True)
    assert pq.read_table(tmp_path / "p.parquet").column_names == ["i", "j", "score", "id_i", "id_j",
                                                                  "text_i", "text_j"]
    run("dedup", "in.jsonl", "-t", THRESHOLD, "-o", "k.jsonl", "--duplicates", "r.jsonl", "-q", inproc=True)
    report = read_back(tmp_path / "r.jsonl", "jsonl")
    removed = sorted(set(range(len(TEXTS))) - set(kept_rows()))
    assert [r["index"] for r in report] == removed
    assert [r["text"] for r in report] == [TEXTS[k] for k in removed]


# ---------------------------------------------------------------------------------------
# conversions that used to lose information
# ---------------------------------------------------------------------------------------


def test_nested_values_go_to_csv_as_json(run, tmp_path):
    row = {"text": "alpha", "tags": ["x", "y"], "meta": {"a": None}, "ok": True, "n": 1.5}
    (tmp_path / "in.jsonl").write_text(json.dumps(row) + "\n")
    for fmt in ("csv", "tsv"):
        run("dedup", "in.jsonl", "-o", f"out.{fmt}", "-q", inproc=True)
        header, cells = read_back(tmp_path / f"out.{fmt}", fmt)
        assert header == list(row) and cells == ["alpha", '["x", "y"]', '{"a": null}', "true", "1.5"]
        assert [json.loads(c) for c in cells[1:]] == list(row.values())[1:]


def test_parquet_bytes_and_dates_go_to_json_as_text(run, tmp_path):
    import datetime

    day = datetime.date(2024, 2, 29)
    pq.write_table(pa.table({"text": ["alpha", "beta"], "blob": [b"\x00\xff", None], "day": [day, None]}),
                   tmp_path / "in.parquet")
    run("dedup", "in.parquet", "-o", "out.jsonl", "-q", inproc=True)
    first, second = read_back(tmp_path / "out.jsonl", "jsonl")
    assert base64.b64decode(first["blob"]) == b"\x00\xff" and first["day"] == "2024-02-29"
    assert second == {"text": "beta", "blob": None, "day": None}


def test_text_output_is_one_line_per_row(run, tmp_path):
    rows = [{"text": "carriage\rreturn"}, {"text": "line\nbreak"}, {"text": "crlf\r\nend"}, {"text": "plain"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run("dedup", "in.jsonl", "-o", "out.txt", "-q", inproc=True)
    assert read_back(tmp_path / "out.txt", "txt") == ["carriage return", "line break", "crlf end", "plain"]
    assert "out.txt: 3 of the texts written held line breaks, written as spaces" in proc.stderr
    run("embed", "out.txt", "-o", "v.npy", "-q", inproc=True)
    assert np.load(tmp_path / "v.npy").shape[0] == len(rows)


def test_jsonl_missing_fields_reach_parquet_as_null(run, tmp_path):
    rows = [{"text": "alpha"}, {"text": "beta", "late": 7}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run("dedup", "in.jsonl", "-o", "out.parquet", "-q", inproc=True)
    assert read_back(tmp_path / "out.parquet", "parquet") == (["text", "late"], [
        {"text": "alpha", "late": None}, {"text": "beta", "late": 7}])


# ---------------------------------------------------------------------------------------
# lone surrogates and integers beyond 64 bits
# ---------------------------------------------------------------------------------------

SURROGATE_ROWS = '{"id": "a", "text": "truncated tweet \\ud83d"}\n{"id": "b", "text": "another tweet"}\n'


def test_lone_surrogate_round_trips_through_jsonl(run, tmp_path):
    (tmp_path / "in.jsonl").write_text(SURROGATE_ROWS)
    run("dedup", "in.jsonl", "-o", "out.jsonl", "-q", inproc=True)
    assert "\\ud83d" in (tmp_path / "out.jsonl").read_text(encoding="utf-8")
    assert read_back(tmp_path / "out.jsonl", "jsonl") == [json.loads(x) for x in SURROGATE_ROWS.splitlines()]
    run("pairs", "in.jsonl", "-t", "-1", "-o", "p.jsonl", "-q", inproc=True)
    assert read_back(tmp_path / "p.jsonl", "jsonl")[0]["text_i"] == "truncated tweet \ud83d"
    run("embed", "in.jsonl", "-o", "v.npy", "-q", inproc=True)


@pytest.mark.parametrize("command, out", [("dedup", "out.csv"), ("dedup", "out.tsv"), ("dedup", "out.txt"),
                                          ("dedup", "out.parquet"), ("pairs", "p.csv")])
def test_lone_surrogate_where_utf8_cannot_hold_it_is_one_line(run, tmp_path, command, out):
    (tmp_path / "in.jsonl").write_text(SURROGATE_ROWS)
    threshold = ["-t", "-1"] if command == "pairs" else []
    proc = run(command, "in.jsonl", *threshold, "-o", out, ok=False, inproc=True)
    where = "pair 1" if command == "pairs" else "row 1"
    assert_one_line_error(proc, out, where, "lone surrogate", ".jsonl")
    assert not (tmp_path / out).exists()


def test_integer_beyond_64_bits_to_parquet_is_one_line(run, tmp_path):
    rows = [{"text": "alpha", "n": 1}, {"text": "beta", "n": 2**64 + 1}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run("dedup", "in.jsonl", "-o", "out.parquet", ok=False, inproc=True)
    assert_one_line_error(proc, "out.parquet", "row 2", "field 'n'", "64 bits")
    run("dedup", "in.jsonl", "-o", "out.jsonl", "-q", inproc=True)
    assert read_back(tmp_path / "out.jsonl", "jsonl") == rows


def test_lone_surrogate_is_printed_as_an_escape(run, tmp_path):
    # the groups printed to the terminal, not only the files, must survive such a text
    rows = '{"id": "a", "text": "truncated tweet \\ud83d here"}\n{"id": "b", "text": "truncated tweet \\ud83d here!"}\n'
    (tmp_path / "in.jsonl").write_text(rows)
    proc = run("dedup", "in.jsonl", "-o", "out.jsonl", extra_env={"PYTHONIOENCODING": "utf-8"})
    assert "truncated tweet \\ud83d here" in proc.stdout and "Traceback" not in proc.stderr
    assert len(read_back(tmp_path / "out.jsonl", "jsonl")) == 1


def test_an_output_through_a_link_a_fifo_or_a_private_file_is_written_into_not_replaced(run, tmp_path):
    import stat
    import threading

    write_input(tmp_path, "jsonl")
    run("dedup", "in.jsonl", "-o", "plain.jsonl", inproc=True)
    want = (tmp_path / "plain.jsonl").read_bytes()
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "kept.jsonl").write_text("old\n")
    os.symlink("real/kept.jsonl", tmp_path / "link.jsonl")
    run("dedup", "in.jsonl", "-o", "link.jsonl", inproc=True)
    assert (tmp_path / "link.jsonl").is_symlink()  # the link stays, the file it names is replaced
    assert (tmp_path / "real" / "kept.jsonl").read_bytes() == want
    (tmp_path / "private.jsonl").write_text("old\n")
    os.chmod(tmp_path / "private.jsonl", 0o600)
    run("dedup", "in.jsonl", "-o", "private.jsonl", inproc=True)
    assert stat.S_IMODE(os.stat(tmp_path / "private.jsonl").st_mode) == 0o600
    assert (tmp_path / "private.jsonl").read_bytes() == want
    os.mkfifo(tmp_path / "fifo.jsonl")
    got = []
    reader = threading.Thread(target=lambda: got.append((tmp_path / "fifo.jsonl").read_bytes()), daemon=True)
    reader.start()
    run("dedup", "in.jsonl", "-o", "fifo.jsonl", inproc=True)
    reader.join(30)
    assert got == [want] and stat.S_ISFIFO(os.stat(tmp_path / "fifo.jsonl").st_mode)
    assert not list(tmp_path.glob(".*.part"))


def test_an_output_inside_a_store_or_a_directory_that_is_no_store_is_refused(run, tmp_path):
    write_input(tmp_path, "jsonl")
    run("store", "add", "st", "in.jsonl", inproc=True)
    before = {p: p.read_bytes() for p in (tmp_path / "st").rglob("*") if p.is_file()}
    for args in (["dedup", "st", "-o", "st/store.sqlite"], ["pairs", "in.jsonl", "-t", "0.9", "-o", "st/segments/p.csv"]):
        assert_one_line_error(run(*args, ok=False, inproc=True), "is inside the vector store")
    assert {p: p.read_bytes() for p in (tmp_path / "st").rglob("*") if p.is_file()} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.bin").write_bytes(b"theirs")
    for args in (["store", "info", "other"], ["store", "search", "other", "hello"], ["store", "compact", "other"],
                 ["store", "index", "other"]):
        assert_one_line_error(run(*args, ok=False, inproc=True), "other", "vector store")
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["data.bin"]
