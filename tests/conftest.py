import pytest

from embedcache.testing import FakeEmbeddingServer


@pytest.fixture
def fake_server():
    """A real OpenAI-compatible server on 127.0.0.1 (8-d vectors, key "test-key")."""
    with FakeEmbeddingServer(dimensions=8, api_key="test-key") as server:
        yield server
