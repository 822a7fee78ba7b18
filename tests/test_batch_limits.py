"""A server's batch limits, learned from its refusals, against a real server on loopback that
refuses as text-embeddings-inference (413 above 32 inputs) and OpenAI (400
``max_tokens_per_request`` above a token budget) do."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import numpy as np
import pytest

import embedcache as ec
from embedcache.errors import BadRequestError
from embedcache.providers._limits import ServerLimits, refusal
from embedcache.testing import FakeEmbeddingServer, expected_vector

DIM = 8
TEXTS = [f"text number {k} " + "word " * (k % 17) for k in range(1000)]


def client(server, **kwargs):
    return ec.OpenAIEmbeddings("test-embed-small", base_url=server.base_url, api_key="k", **kwargs)


def answered(server, max_inputs=None, max_tokens=None) -> list[list[str]]:
    """The inputs of every request the server answered."""
    out = []
    for r in server.embedding_requests:
        batch = r.body["input"]
        if max_inputs is not None and len(batch) > max_inputs:
            continue
        if max_tokens is not None and sum(len(t.split()) for t in batch) > max_tokens:
            continue
        out.append(batch)
    return out


def assert_each_sent_once(batches, texts):
    counts = Counter(t for b in batches for t in b)
    assert set(counts) == set(texts) and max(counts.values()) == 1


@pytest.mark.parametrize(
    "status, message, want",
    [
        (413, "batch size 128 > maximum allowed batch size 32", ("inputs", 32)),
        (413, "Payload Too Large", ("inputs", None)),
        (400, "Requested 327,680 tokens, max 300,000 tokens per request", ("tokens", 300000)),
        (400, "max_tokens_per_request", ("tokens", None)),
        (422, "batch size 64 > maximum allowed batch size 16", ("inputs", 16)),
        (400, "input must be a non-empty list", None),
        (429, "batch size 128 > maximum allowed batch size 32", None),
    ],
)
def test_refusals_are_read_with_their_limit(status, message, want):
    assert refusal(status, message) == want


def test_limits_plan_within_what_was_learned(caplog):
    limits = ServerLimits("http://x")
    texts = ["a b c"] * 10
    tokens = lambda ts: np.full(len(ts), 3)  # noqa: E731
    assert limits.plan(texts, 128, 10**6, tokens) == [(0, 10)]
    with caplog.at_level(logging.WARNING, logger="embedcache"):
        limits.learn("inputs", 4, 10, 0, 413)
        limits.learn("inputs", 8, 10, 0, 413)  # looser than known: ignored, not said again
        limits.learn("tokens", None, 4, 12, 400)  # no limit stated: half the batch
    assert (limits.max_inputs, limits.max_tokens) == (4, 6)
    assert limits.plan(texts, 128, 10**6, tokens) == [(k, k + 2) for k in range(0, 10, 2)]
    assert len(caplog.records) == 2 and "at most 4 inputs" in caplog.records[0].getMessage()


def test_a_thousand_texts_against_tei_limits_complete_with_a_handful_of_refusals(caplog):
    with FakeEmbeddingServer(dimensions=DIM, api_key="k", max_batch_inputs=32) as server:
        emb = client(server)  # default settings: 128 per batch, 8 at once
        with caplog.at_level(logging.WARNING, logger="embedcache"):
            x = emb.embed(TEXTS)
        np.testing.assert_array_equal(x, np.stack([expected_vector(t, DIM) for t in TEXTS]))
        assert 1 <= len(server.refused) <= 2
        assert_each_sent_once(answered(server, max_inputs=32), TEXTS)  # nothing answered sent twice
        said = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(said) == 1 and "at most 32 inputs" in said[0]
        # a new client of the same server knows the limit: no refusal
        before = len(server.refused)
        client(server).embed(TEXTS[:300])
        assert len(server.refused) == before


def test_a_token_budget_is_learned_too_sync_and_async():
    with FakeEmbeddingServer(dimensions=DIM, api_key="k", max_batch_tokens=500) as server:
        x = client(server).embed(TEXTS)
        np.testing.assert_array_equal(x, np.stack([expected_vector(t, DIM) for t in TEXTS]))
        assert 1 <= len(server.refused) <= 3
        assert_each_sent_once(answered(server, max_tokens=500), TEXTS)
    with FakeEmbeddingServer(dimensions=DIM, api_key="k", max_batch_tokens=500, max_batch_inputs=32) as server:
        x = asyncio.run(client(server).aembed(TEXTS))
        np.testing.assert_array_equal(x, np.stack([expected_vector(t, DIM) for t in TEXTS]))
        assert 1 <= len(server.refused) <= 4
        assert_each_sent_once(answered(server, max_inputs=32, max_tokens=500), TEXTS)


def test_through_the_cache_every_vector_is_kept(tmp_path):
    with FakeEmbeddingServer(dimensions=DIM, api_key="k", max_batch_inputs=32) as server:
        emb = ec.CachedEmbedder(client(server), ec.EmbeddingCache(tmp_path / "c"))
        x = emb.embed(TEXTS[:500])
        assert len(emb.cache) == 500 and emb.stats.misses == 500
        np.testing.assert_array_equal(emb.embed(TEXTS[:500]), x)


def test_one_text_over_the_budget_is_an_error_not_a_loop():
    with FakeEmbeddingServer(dimensions=DIM, api_key="k", max_batch_tokens=5) as server:
        with pytest.raises(BadRequestError, match="max 5 tokens per request"):
            client(server, max_retries=0).embed(["one two three four five six seven"])
        assert len(server.embedding_requests) == 1
