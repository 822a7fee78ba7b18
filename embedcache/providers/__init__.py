"""Embedders: an OpenAI-compatible HTTP client, a built-in offline hashing embedder, and
sentence-transformers models on the local machine (the ``local`` extra)."""

from embedcache.providers.base import Embedder, Usage, validate_texts
from embedcache.providers.hashing import HashingEmbeddings
from embedcache.providers.local import LocalEmbeddings
from embedcache.providers.openai import OpenAIEmbeddings

__all__ = ["Embedder", "HashingEmbeddings", "LocalEmbeddings", "OpenAIEmbeddings", "Usage", "validate_texts"]
