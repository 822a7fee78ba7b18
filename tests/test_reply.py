"""Reading replies: the pure functions of embedcache.providers._reply, bytes in, arrays out."""

import base64
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedcache.errors import InvalidResponseError
from embedcache.providers._reply import decode_vector, parse_embeddings, parse_models


def b64(v):
    return base64.b64encode(np.asarray(v, "<f4").tobytes()).decode()


def body(data, **extra):
    return json.dumps({"data": data, **extra}).encode()


def test_vectors_are_placed_by_index_whatever_their_encoding():
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = [{"index": 2, "embedding": b64(rows[2])}, {"index": 0, "embedding": rows[0].tolist()},
            {"index": 1, "embedding": b64(rows[1])}]
    reply = parse_embeddings(body(data, usage={"total_tokens": 5}), 3)
    assert reply.vectors.dtype == np.float32 and reply.vectors.flags.c_contiguous
    np.testing.assert_array_equal(reply.vectors, rows)
    assert reply.tokens == 5


@settings(max_examples=50, deadline=None)
@given(st.permutations(range(6)), st.lists(st.booleans(), min_size=6, max_size=6))
def test_any_order_and_any_mix_of_encodings(order, as_base64):
    rows = np.random.default_rng(len(order)).standard_normal((6, 3)).astype(np.float32)
    data = [{"index": i, "embedding": b64(rows[i]) if as_base64[i] else rows[i].tolist()} for i in order]
    np.testing.assert_array_equal(parse_embeddings(body(data), 6).vectors, rows)


@pytest.mark.parametrize(
    "usage, tokens",
    [({"prompt_tokens": 7, "total_tokens": 9}, 9), ({"prompt_tokens": 7}, 7), (None, 0),
     ({"total_tokens": "x"}, 0), ({"total_tokens": True}, 0), ({"total_tokens": -3}, 0), ("lots", 0)],
)
def test_tokens(usage, tokens):
    assert parse_embeddings(body([{"index": 0, "embedding": [1.0]}], usage=usage), 1).tokens == tokens


def test_requested_dimensions_are_checked():
    reply = body([{"index": 0, "embedding": [0.1, 0.2, 0.3]}])
    assert parse_embeddings(reply, 1, dimensions=3).vectors.shape == (1, 3)
    with pytest.raises(InvalidResponseError, match="requested dimensions=2, got 3-d embeddings"):
        parse_embeddings(reply, 1, dimensions=2)


@pytest.mark.parametrize(
    "content, n, text",
    [
        (b"<html>oops</html>", 1, "-> 502: reply is not valid JSON"),
        (b"\xff\xfe", 1, "not valid JSON"),
        (body([{"index": 0, "embedding": [0.1]}]), 2, "expected 2 embeddings, got 1"),
        (body([{"index": 0, "embedding": [0.1]}, {"index": 0, "embedding": [0.2]}]), 2, "index 0 appears twice"),
        (body([{"index": 0, "embedding": [0.1]}, {"index": 1, "embedding": [0.2, 0.3]}]), 2,
         r"unequal dimensions \[1, 2\]"),
        (body([{"index": 0, "embedding": [0.1]}, {"index": 1, "embedding": [float("nan")]}]), 2,
         "embedding 1 has NaN or infinite values"),
    ],
)
def test_bad_replies(content, n, text):
    with pytest.raises(InvalidResponseError, match=text):
        parse_embeddings(content, n, status_code=502 if content.startswith(b"<") else 200)


def test_decode_vector_reads_little_endian_float32():
    raw = np.array([1.5, -2.0], dtype="<f4").tobytes()
    np.testing.assert_array_equal(decode_vector(base64.b64encode(raw).decode(), "x"), [1.5, -2.0])
    assert decode_vector([1, 2], "x").dtype == np.float32
    with pytest.raises(InvalidResponseError, match="^data\\[3\\]: embedding is not valid base64"):
        decode_vector("@@", "data[3]")


@pytest.mark.parametrize(
    "body, text",
    [
        ({"data": [{"index": 0, "embedding": "!!not base64!!"}]}, "not valid base64"),
        ({"data": [{"index": 0, "embedding": base64.b64encode(b"abcdef").decode()}]}, "multiple of 4"),
        ({"data": [{"index": 0, "embedding": ["0.1", "0.2"]}]}, "flat list of numbers"),
        ({"data": [{"index": 0, "embedding": [[0.1], [0.2]]}]}, "flat list of numbers"),
        ({"data": [{"index": 0, "embedding": [True, False]}]}, "flat list of numbers"),
        ({"data": [{"index": 0, "embedding": [0.1, None]}]}, "flat list of numbers"),
        ({"data": [{"index": 0, "embedding": [0.1, [0.2, 0.3]]}]}, "flat list of numbers"),
        ({"data": [{"index": 0, "embedding": [[0.1, 0.2], [0.3]]}]}, "flat list of numbers"),
        ({"data": [{"index": 0, "embedding": {"x": 1}}]}, "base64 string or a list"),
        ({"data": [{"embedding": [0.1, 0.2]}]}, "index must be an int"),
        ({"data": [{"index": True, "embedding": [0.1, 0.2]}]}, "index must be an int"),
        ({"data": [{"index": 1, "embedding": [0.1, 0.2]}]}, "index must be an int"),
        ({"data": [{"index": 0, "embedding": [1e300, 0.2]}]}, "infinite"),
        ({"data": [{"index": 0, "embedding": []}]}, "empty"),
        ({"data": "nope"}, "no 'data' list"),
        ([1, 2], "no 'data' list"),
        ({"data": [7]}, "must be an object"),
    ],
)
def test_contract_breaking_replies(body, text):
    with pytest.raises(InvalidResponseError, match=text):
        parse_embeddings(json.dumps(body).encode(), 1)


def test_parse_models():
    assert parse_models(b'{"data": [{"id": "a"}, {"id": "b", "owned_by": "x"}]}') == ["a", "b"]
    assert parse_models(b'{"data": []}') == []
    for bad in (b'{"data": [{"name": "a"}]}', b'{"models": []}', b"[]"):
        with pytest.raises(InvalidResponseError, match="GET /models: expected"):
            parse_models(bad)
    with pytest.raises(InvalidResponseError, match="GET /models -> 200: reply is not valid JSON"):
        parse_models(b"nope")


def _reference(data, n):
    """Each item decoded on its own and placed by its index: what a reply means."""
    out = [None] * n
    for item in data:
        e = item["embedding"]
        out[item["index"]] = (np.frombuffer(base64.b64decode(e), "<f4") if isinstance(e, str)
                              else np.array(e, np.float32))
    return np.stack(out)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 9),
    dim=st.sampled_from([1, 2, 3, 4, 5, 6, 12, 384]),
    shuffle=st.booleans(),
    floats_at=st.sets(st.integers(0, 8), max_size=2),
    damage=st.sampled_from([None, "nan", "bad base64", "short row", "bool index"]),
    seed=st.integers(0, 2**16),
)
def test_replies_read_at_once_equal_item_by_item(n, dim, shuffle, floats_at, damage, seed):
    """Base64 rows in index order are decoded in one call when their width allows, every other
    reply item by item: either way the vectors equal each item decoded alone, and a damaged
    reply is refused."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    order = rng.permutation(n).tolist() if shuffle else list(range(n))
    data = [{"object": "embedding", "index": i,
             "embedding": rows[i].tolist() if i in floats_at else b64(rows[i])} for i in order]
    k = int(rng.integers(n))
    if damage == "nan":
        bad = rows[order[k]].copy()
        bad[0] = np.nan
        data[k]["embedding"] = b64(bad)
    elif damage == "bad base64":
        data[k]["embedding"] = "!" + b64(rows[order[k]])[1:]
    elif damage == "short row":
        data[k]["embedding"] = b64(rows[order[k]][:-1]) if dim > 1 else ""
    elif damage == "bool index" and order[k] in (0, 1):
        data[k]["index"] = bool(order[k])
    content = json.dumps({"data": data}).encode()
    try:
        want = _reference(data, n)
    except ValueError:  # bad base64, rows of unequal length
        want = None
    valid = (want is not None and want.shape[1] > 0 and np.isfinite(want).all()
             and all(type(d["index"]) is int for d in data))
    if valid:
        np.testing.assert_array_equal(parse_embeddings(content, n).vectors, want)
    else:
        with pytest.raises(InvalidResponseError):
            parse_embeddings(content, n)


def test_the_common_reply_is_read_at_once():
    from embedcache.providers._reply import _base64_in_order

    rows = np.random.default_rng(1).standard_normal((4, 384)).astype(np.float32)
    data = [{"index": i, "embedding": b64(r)} for i, r in enumerate(rows)]
    np.testing.assert_array_equal(_base64_in_order(data, 4), rows)
    assert _base64_in_order(data[::-1], 4) is None  # out of order: item by item
    padded = [{"index": i, "embedding": b64(r[:4])} for i, r in enumerate(rows)]  # 16 bytes: padding
    assert _base64_in_order(padded, 4) is None
