"""What a server takes in one request, learned from its refusals.

Servers cap a request by its number of inputs (text-embeddings-inference: 32 by default,
refused with a 413; OpenAI: 2,048) and by its tokens (OpenAI: 300,000, refused with a 400
``max_tokens_per_request``). :func:`refusal` reads such a refusal (the limit itself when the
message states it); :class:`ServerLimits` remembers what was learned for one server, for
every client of it in this process (:func:`limits_for`), and plans batches within it
(:meth:`ServerLimits.plan`). The client splits a refused batch and sends the parts; nothing
that was answered is sent again.

>>> refusal(413, "batch size 128 > maximum allowed batch size 32")
('inputs', 32)
>>> refusal(400, "Requested 327,680 tokens, max 300,000 tokens per request")
('tokens', 300000)
>>> refusal(400, "input must not be empty") is None
True
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["ServerLimits", "limits_for", "refusal"]

logger = logging.getLogger("embedcache")

_TOKENS_LIMIT = re.compile(r"max(?:imum)?\s*(?:of\s*)?([\d,]+)\s*tokens\s*per\s*request", re.I)
_INPUTS_LIMIT = re.compile(
    r"(?:maximum allowed batch size|max(?:imum)?(?: batch)? size|at most|maximum of|maximum)"
    r"\s*(?:is\s*|of\s*|:\s*)?([\d,]+)", re.I)
_INPUTS_WORDS = re.compile(r"batch size|too many (?:inputs|items)|array too long|inputs? .*maximum", re.I)


def _number(text: str) -> int | None:
    value = int(text.replace(",", ""))
    return value if value > 0 else None


def refusal(status: int | None, message: str) -> tuple[str, int | None] | None:
    """``(kind, limit)`` when a reply of ``status`` with ``message`` refuses a batch as too
    large: kind ``"inputs"`` or ``"tokens"``, and the limit when the message states it;
    ``None`` for any other error."""
    if status not in (400, 413, 422):
        return None
    m = _TOKENS_LIMIT.search(message)
    if m or "max_tokens_per_request" in message:
        return "tokens", _number(m.group(1)) if m else None
    if status == 413 or _INPUTS_WORDS.search(message):
        if status == 413 and re.search(r"\btokens?\b", message, re.I):
            return "tokens", None
        m = _INPUTS_LIMIT.search(message)
        return "inputs", _number(m.group(1)) if m else None
    return None


class ServerLimits:
    """The batch limits learned for one server (``None``: none known); thread-safe."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.max_inputs: int | None = None
        self.max_tokens: int | None = None
        #: whether a batch request to this server has succeeded (later jobs send at full speed)
        self.answered = False
        self._lock = threading.Lock()

    def learn(self, kind: str, limit: int | None, batch_inputs: int, batch_tokens: int, status: int) -> None:
        """Record a refusal of a batch of ``batch_inputs`` inputs, ``batch_tokens`` tokens
        (estimated): the limit the server stated, else half the batch."""
        with self._lock:
            if kind == "inputs":
                new = limit if limit is not None and limit < batch_inputs else max(1, batch_inputs // 2)
                if self.max_inputs is not None and new >= self.max_inputs:
                    return
                self.max_inputs = new
                what = f"at most {new} inputs"
            else:
                new = limit if limit is not None and limit < batch_tokens else max(1, batch_tokens // 2)
                if self.max_tokens is not None and new >= self.max_tokens:
                    return
                self.max_tokens = new
                what = f"at most {new} tokens"
        logger.warning("embedcache: %s refused a batch of %d inputs (%d); sending %s per request "
                       "from now on", self.where, batch_inputs, status, what)

    def plan(self, texts: Sequence[str], batch_size: int, max_chars: int,
             tokens: Callable[[Sequence[str]], np.ndarray]) -> list[tuple[int, int]]:
        """Consecutive ``(start, stop)`` slices within the count, character and learned
        limits; ``tokens(texts)`` estimates each text's tokens (called only when a token limit
        is known)."""
        size = batch_size if self.max_inputs is None else min(batch_size, self.max_inputs)
        budget = self.max_tokens
        costs = tokens(texts) if budget is not None else None
        batches = []
        start, chars, used = 0, 0, 0
        for i, t in enumerate(texts):
            cost = int(costs[i]) if costs is not None else 0
            if i > start and (i - start >= size or chars + len(t) > max_chars
                              or (budget is not None and used + cost > budget)):
                batches.append((start, i))
                start, chars, used = i, 0, 0
            chars += len(t)
            used += cost
        batches.append((start, len(texts)))
        return batches


_registry: dict[str, ServerLimits] = {}
_registry_lock = threading.Lock()


def limits_for(where: str) -> ServerLimits:
    """The limits learned for the server at ``where`` (its base URL), shared in this process."""
    with _registry_lock:
        limits = _registry.get(where)
        if limits is None:
            limits = _registry[where] = ServerLimits(where)
        return limits
