"""``embedcache store``: ids, metadata and the embedder of a store, end to end in a subprocess
(through the ``run`` fixture of test_cli.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import embedcache as ec
from test_cli import EXAMPLE, ROWS, TEXTS, assert_one_line_error, run  # noqa: F401 (run: a fixture)


def search_hits(stdout):
    """(score, id, text) of each result line of ``store search``."""
    return [tuple(line.split(None, 2)) for line in stdout.splitlines() if line.startswith("  ")]


# ----------------------------------------------------------------------------- ids


def test_rows_without_ids_of_two_files_do_not_collide(run, tmp_path):
    (tmp_path / "a.txt").write_text("red fox\nblue whale\nred fox\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("green frog\nyellow bird\n", encoding="utf-8")
    assert "vs: 3 rows (+3)" in run("store", "add", "vs", "a.txt", "-q").stdout  # a repeated line too
    assert "vs: 5 rows (+2)" in run("store", "add", "vs", "b.txt", "-q", inproc=True).stdout
    with ec.VectorStore(tmp_path / "vs") as vs:
        texts = [m["text"] for m in vs.metadata(vs.ids())]
    assert texts == ["red fox", "blue whale", "red fox", "green frog", "yellow bird"]
    # adding a file again is caught rather than stored twice; the message names the options
    proc = run("store", "add", "vs", "a.txt", ok=False)
    assert_one_line_error(proc, "a.txt: the text of row 1 is already in vs", "--upsert", "--id-field")
    assert "upsert=True" not in proc.stderr
    assert "vs: 5 rows (+0)" in run("store", "add", "vs", "a.txt", "--upsert", "-q", inproc=True).stdout
    help_text = run("store", "add", "--help", inproc=True).stdout
    assert "a hash of the row's text" in " ".join(help_text.split())


def test_an_id_already_in_the_store_names_the_command_line_options(run, tmp_path):
    run("store", "add", "vs", EXAMPLE, "-q", inproc=True)
    proc = run("store", "add", "vs", EXAMPLE, ok=False, inproc=True)
    assert_one_line_error(proc, "id 'r01' (row 1) is already in vs", "--upsert", "--id-field")
    assert "upsert=True" not in proc.stderr
    (tmp_path / "twice.jsonl").write_text(
        '{"id": "x", "text": "one"}\n{"id": "y", "text": "two"}\n{"id": "x", "text": "three"}\n', encoding="utf-8"
    )
    proc = run("store", "add", "other", "twice.jsonl", ok=False, inproc=True)
    assert_one_line_error(proc, "rows 1 and 3 have the same id 'x'", "--id-field")


# ----------------------------------------------------------------------------- metadata


def test_store_add_keeps_every_field_and_says_where_the_text_is(run, tmp_path):
    rows = [
        {"id": "q1", "text": "short summary one", "body": "How do I reset my password?", "n": 1},
        {"id": "q2", "text": "short summary two", "body": "Where can I download my invoices?", "n": 2},
    ]
    (tmp_path / "faq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run("store", "add", "vs", "faq.jsonl", "--field", "body", "-q", inproc=True)
    with ec.VectorStore(tmp_path / "vs") as vs:
        assert vs.metadata(["q1", "q2"]) == rows
    assert "text_key: body" in run("store", "info", "vs", inproc=True).stdout
    found = run("store", "search", "vs", "reset my password", "-k", "1", "-q", inproc=True).stdout
    score, hit, text = search_hits(found)[0]
    assert (hit, text) == ("q1", rows[0]["body"])
    # a later file whose own "body" is not its text would lose that field: refused
    (tmp_path / "more.jsonl").write_text('{"id": "q3", "text": "a text", "body": "another"}\n', encoding="utf-8")
    proc = run("store", "add", "vs", "more.jsonl", ok=False, inproc=True)
    assert_one_line_error(proc, "row 1 has a field 'body' of its own", "--field 'text'")
    (tmp_path / "more.txt").write_text("How do I change my email address?\n", encoding="utf-8")
    run("store", "add", "vs", "more.txt", "-q", inproc=True)  # plain text: its text goes under "body"
    with ec.VectorStore(tmp_path / "vs") as vs:
        assert vs.metadata([vs.ids()[-1]])[0] == {"text": "How do I change my email address?",
                                                  "body": "How do I change my email address?"}


def test_a_lone_surrogate_is_stored_and_read_back_unchanged(run, tmp_path):
    lines = ['{"text": "truncated tweet \\ud83d", "user": "\\udc00bob"}', '{"text": "a whole tweet"}']
    (tmp_path / "tweets.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = run("store", "add", "vs", "tweets.jsonl", "-q", inproc=True)
    assert "vs: 2 rows (+2)" in proc.stdout
    with ec.VectorStore(tmp_path / "vs") as vs:
        assert vs.metadata(vs.ids()) == [json.loads(line) for line in lines]
    assert_one_line_error(run("store", "add", "vs", "tweets.jsonl", ok=False, inproc=True), "row 1 is already in vs")
    hits = search_hits(run("store", "search", "vs", "truncated tweet", "-k", "1", "-q", inproc=True).stdout)
    assert hits[0][2] == "truncated tweet \\ud83d"  # printed as an escape


# ----------------------------------------------------------------------------- the store's embedder


def test_a_python_store_of_any_hashing_dimension_is_used_as_it_is(run, tmp_path):
    emb = ec.HashingEmbeddings(dimensions=256, ngram_range=(2, 4))
    with ec.VectorStore(tmp_path / "vs") as vs:
        vs.add_texts(TEXTS, emb, ids=[r["id"] for r in ROWS])
    found = search_hits(run("store", "search", "vs", TEXTS[4], "-k", "1", "-q", inproc=True).stdout)
    assert found[0][1] == ROWS[4]["id"] and float(found[0][0]) > 0.99
    (tmp_path / "new.txt").write_text("A brand new review of a garden hose.\n", encoding="utf-8")
    assert f"{len(ROWS) + 1} rows (+1)" in run("store", "add", "vs", "new.txt", "-q", inproc=True).stdout
    info = run("store", "info", "vs", inproc=True).stdout
    assert "embedder: HashingEmbeddings(dimensions=256, ngram_range=(2, 4), lowercase=True)" in info
    # options that name another embedder are the only ones the message names
    proc = run("store", "search", "vs", "hose", "--provider", "hashing", ok=False, inproc=True)
    assert_one_line_error(proc, "dim=256", "dim=512", "leave out --provider to use the store's embedder")
    assert "--model" not in proc.stderr and "--base-url" not in proc.stderr
    with ec.VectorStore(tmp_path / "vs") as vs:
        np.testing.assert_allclose(vs.get(["r05"]), emb.embed([TEXTS[4]]))


class CustomEmbedder:
    cache_namespace = "custom|my-model|v3"
    model = "my-model"

    def embed(self, texts, *, on_batch=None):
        return ec.HashingEmbeddings(dimensions=32).embed(texts)


def test_a_store_of_a_custom_embedder_says_what_the_command_line_cannot_rebuild(run, tmp_path):
    with ec.VectorStore(tmp_path / "vs") as vs:
        vs.add_texts(TEXTS[:3], CustomEmbedder())
    (tmp_path / "new.txt").write_text("another review\n", encoding="utf-8")
    for command, python in ((["search", "vs", "battery"], "store.search(embedder.embed(queries))"),
                            (["add", "vs", "new.txt"], "store.add_texts(texts, embedder)")):
        proc = run("store", *command, ok=False, inproc=True)
        assert_one_line_error(proc, "'custom|my-model|v3'", "cannot rebuild", python)
        assert "--provider" not in proc.stderr and "--model" not in proc.stderr
        proc = run("store", *command, "--provider", "hashing", ok=False, inproc=True)
        assert_one_line_error(proc, "'custom|my-model|v3'", "cannot rebuild", "--provider gives 'hashing|")
    assert "embedder: none that the command line can rebuild" in run("store", "info", "vs", inproc=True).stdout


def test_options_naming_another_embedder_than_a_servers_store(run, tmp_path, fake_server):
    emb = ec.OpenAIEmbeddings("test-embed-small", base_url=fake_server.base_url, api_key="test-key")
    with ec.VectorStore(tmp_path / "vs") as vs:
        vs.add_texts(TEXTS[:3], emb)
    emb.close()
    proc = run("store", "search", "vs", "battery", "--provider", "hashing", "-q", ok=False, inproc=True)
    assert_one_line_error(proc, "--provider gives 'hashing|", "leave out --provider to use the store's embedder")
    proc = run("store", "search", "vs", "battery", "--model", "other-model", "-q", ok=False, inproc=True)
    assert_one_line_error(proc, "--model gives 'openai|", "other-model", "leave out --model")
    info = run("store", "info", "vs", inproc=True).stdout
    assert f"embedder: OpenAIEmbeddings(model='test-embed-small', base_url='{fake_server.base_url}')" in info
    assert fake_server.embedding_requests[-1].body["input"] == TEXTS[:3]  # nothing sent since


def test_store_help_states_the_stores_embedder_as_the_default(run):
    for command in ("add", "search"):
        help_text = " ".join(run("store", command, "--help", inproc=True).stdout.split())
        assert "Default: the embedder that made STORE's vectors (a new store: openai when" in help_text
    assert "Default: openai when IONOS_API_TOKEN" in " ".join(run("embed", "--help", inproc=True).stdout.split())


def test_a_failed_first_add_leaves_no_empty_store_behind(run, tmp_path):
    bad = ("--provider", "openai", "--model", "m", "--base-url", "http://127.0.0.1:9/v1?key=sk-0123456789")
    proc = run("store", "add", "new", EXAMPLE, *bad, ok=False, inproc=True, extra_env={"OPENAI_API_KEY": "sk-x"})
    assert_one_line_error(proc, "query string")
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    run("store", "add", "mine", EXAMPLE, *bad, ok=False, inproc=True, extra_env={"OPENAI_API_KEY": "sk-x"})
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]  # the directory was there before
    run("store", "add", "vs", EXAMPLE, "-q", inproc=True)
    run("store", "add", "vs", EXAMPLE, *bad, ok=False, inproc=True, extra_env={"OPENAI_API_KEY": "sk-x"})
    with ec.VectorStore(tmp_path / "vs") as vs:  # a store that was there keeps its rows
        assert len(vs) == len(TEXTS)


def test_store_index_drop(run, tmp_path):
    run("store", "add", "vs", EXAMPLE, "-q", inproc=True)
    run("store", "index", "vs", "-q", inproc=True)
    assert "vs: index removed" in run("store", "index", "vs", "--drop", inproc=True).stdout
    assert "vs: had no index" in run("store", "index", "vs", "--drop", inproc=True).stdout
    assert_one_line_error(run("store", "index", "vs", "--drop", "--cells", "4", ok=False, inproc=True), "--drop")
    with ec.VectorStore(tmp_path / "vs") as vs:
        assert vs.index_info() is None
