"""What a model can read: its input window, token counts, and what happens to longer texts.

A model reads a window of tokens (special tokens included) and silently drops the rest:
paraphrase-multilingual-mpnet-base-v2 reads 128, bge-large-en-v1.5 512, bge-m3 8192. Two
texts that share their first window then get the same vector, so a deduplication removes one
of them. The long-text policy says what happens instead, one of :data:`LONG_TEXTS`:

``"chunk"`` (the default)
    split the text into window-sized chunks on sentence or whitespace boundaries, with a small
    overlap (:func:`chunk_spans`), embed each chunk as a text of its own, and pool the chunk
    vectors into one unit vector weighted by each chunk's token count (:func:`pool`), as
    LangChain does for OpenAI;
``"truncate"``
    embed the first window only, as the server would, but say so in the counts;
``"error"``
    refuse with :class:`~embedcache.errors.TextTooLongError` naming the row.

The window comes from :func:`resolve_window`: a setting (``max_input_tokens``), else the
table of known models (:data:`KNOWN_WINDOWS`), else the local model's own ``max_seq_length``,
else :data:`ASSUMED_WINDOW`, said once per model in a log warning.

Tokens are counted by a :class:`TokenCounter`: :class:`ExactCounter` with the model's own
tokenizer (a local sentence-transformers model's, or a ``tokenizer.json`` the user points
to), else :class:`EstimateCounter`, a conservative estimate that counts more tokens than the
tokenizers of the models above do on ordinary text, and that grows when a server reports more
tokens than it estimated (:meth:`EstimateCounter.calibrate`).

>>> counter = EstimateCounter()
>>> text = "One sentence here. Another one there. And a third one, somewhat longer."
>>> [text[a:b] for a, b in chunk_spans(text, counter, budget=8, overlap=3)]
['One sentence here. ', 'here. Another one ', 'one there. ', 'there. And a third ', 'a third one, somewhat ', 'somewhat longer.']
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from embedcache._validation import check_choice, check_int
from embedcache.errors import InvalidInputError, MissingDependencyError, TextTooLongError

__all__ = [
    "ASSUMED_WINDOW",
    "DEFAULT_LONG_TEXTS",
    "KNOWN_WINDOWS",
    "LONG_TEXTS",
    "EstimateCounter",
    "ExactCounter",
    "InputWindow",
    "TokenCounter",
    "check_long_texts",
    "chunk_spans",
    "known_window",
    "cut",
    "find_long",
    "pool",
    "resolve_window",
]

logger = logging.getLogger("embedcache")

#: the long-text policies; the first is the default
LONG_TEXTS = ("chunk", "truncate", "error")
DEFAULT_LONG_TEXTS = "chunk"

#: input windows in tokens (special tokens included) of the models of the IONOS AI Model Hub's
#: seed deployment, OpenAI's embedding models and the usual local model; looked up by model id
#: or by its last path component, in any case
KNOWN_WINDOWS: dict[str, int] = {
    "sentence-transformers/paraphrase-multilingual-mpnet-base-v2": 128,
    "BAAI/bge-large-en-v1.5": 512,
    "BAAI/bge-m3": 8192,
    "sentence-transformers/all-MiniLM-L6-v2": 256,
    "text-embedding-3-small": 8192,
    "text-embedding-3-large": 8192,
    "text-embedding-ada-002": 8192,
}
#: the window assumed for a model of unknown window (BERT-sized models, the commonest)
ASSUMED_WINDOW = 512
#: the special tokens ([CLS], [SEP] or <s>, </s>) an estimate reserves in every window
_ESTIMATED_SPECIALS = 2
#: a batch whose reported tokens exceed the estimate more than this counts characters or
#: bytes rather than tokens: it does not calibrate the estimate
_MAX_CALIBRATION = 3.0
#: margin over the largest ratio of reported to estimated tokens seen
_CALIBRATION_MARGIN = 1.1

_BY_NAME = {k.lower(): v for k, v in KNOWN_WINDOWS.items()}
_BY_TAIL = {k.lower().rsplit("/", 1)[-1]: v for k, v in KNOWN_WINDOWS.items()}
_warned: set[str] = set()
_warned_lock = threading.Lock()


def check_long_texts(value: object) -> str:
    """The policy ``value`` names, or InvalidInputError.

    >>> check_long_texts("truncate")
    'truncate'
    """
    return check_choice("long_texts", value, LONG_TEXTS)


def known_window(model: str) -> int | None:
    """The window of ``model`` from :data:`KNOWN_WINDOWS`, else ``None``.

    >>> known_window("BAAI/bge-m3"), known_window("bge-large-en-v1.5"), known_window("mine")
    (8192, 512, None)
    """
    name = model.strip().lower()
    return _BY_NAME.get(name, _BY_TAIL.get(name.rsplit("/", 1)[-1]))


def take_assumption_notice(model: str) -> bool:
    """For a caller that tells the user itself that the window of ``model`` is assumed (the
    command line, in its notes): True when it had not been said yet, and it is not logged."""
    key = f"window|{model}"
    with _warned_lock:
        if key in _warned:
            return False
        _warned.add(key)
        return True


def _warn_once(key: str, message: str) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    logger.warning("embedcache: %s", message)


# ---------------------------------------------------------------------- token counters


class TokenCounter(Protocol):
    """Counts tokens and cuts text into units a chunk may end between."""

    #: identifies the counting (part of the cache key of pooled vectors)
    name: str
    #: whether counts are the tokenizer's own (else an estimate)
    exact: bool
    #: special tokens added to every input
    specials: int

    def units(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(starts, ends, costs)``: the character span and token cost of each unit, in order
        (whitespace between units costs nothing)."""
        ...

    def counts(self, texts: Sequence[str]) -> np.ndarray:
        """Tokens of each text, special tokens left out."""
        ...

    def budget(self, window: int) -> int:
        """Tokens of text (as this counter counts) that fit in ``window``."""
        ...

    def bound(self, text: str) -> int:
        """A cheap upper bound of the tokens of ``text``."""
        ...


class ExactCounter:
    """Counts with a Hugging Face ``tokenizers`` tokenizer: the model's own tokens.

    tokenizer: a ``tokenizers.Tokenizer``; a private copy is taken, without truncation or
        padding. :meth:`from_file` reads a ``tokenizer.json``.
    """

    exact = True

    def __init__(self, tokenizer: object) -> None:
        from tokenizers import Tokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise InvalidInputError(
                f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
            )
        spec = tokenizer.to_str()
        self._tok = Tokenizer.from_str(spec)
        self._tok.no_truncation()
        self._tok.no_padding()
        self.specials = len(self._tok.encode("", add_special_tokens=True).ids)
        self.name = "tokenizer:" + hashlib.sha256(spec.encode()).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ExactCounter:
        """The tokenizer of a ``tokenizer.json`` file, or of a directory holding one."""
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise MissingDependencyError(
                'counting tokens with a tokenizer file needs tokenizers: pip install "tokenizers"'
            ) from exc
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise InvalidInputError(f"tokenizer must be a tokenizer.json file, got {os.fspath(path)!r}")
        try:
            return cls(Tokenizer.from_file(str(p)))
        except Exception as exc:  # the tokenizers library raises plain Exception
            raise InvalidInputError(f"tokenizer {str(p)!r} could not be read: {exc}") from None

    def units(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        offsets = self._tok.encode(text, add_special_tokens=False).offsets
        if not offsets:
            z = np.zeros(0, dtype=np.int64)
            return z, z, z
        spans = np.asarray(offsets, dtype=np.int64)
        return spans[:, 0].copy(), spans[:, 1].copy(), np.ones(len(spans), dtype=np.int64)

    def counts(self, texts: Sequence[str]) -> np.ndarray:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))

    def budget(self, window: int) -> int:
        return window - self.specials

    def bound(self, text: str) -> int:
        # a token spans one UTF-8 byte at least (byte-level BPE), a word piece one character,
        # a SentencePiece word at most one token more than its characters
        return 2 * len(text.encode("utf-8", "surrogatepass"))

    def __repr__(self) -> str:
        return f"ExactCounter({self.name!r})"


# runs of ASCII letters, runs of digits, then any other character alone (whitespace skipped)
_PIECE = re.compile(r"[A-Za-z]+|[0-9]+|\S", re.ASCII)
#: characters per token unit in a run of ASCII letters and of digits
_LETTERS_PER_TOKEN = 3
_DIGITS_PER_TOKEN = 2


class EstimateCounter:
    """A conservative token estimate, for when the model's tokenizer is not at hand.

    Runs of ASCII letters cost one token per 3 letters (English words average about 1.3
    tokens in WordPiece and SentencePiece tokenizers, 5 letters), digits one per 2, any other
    character one (CJK, accented letters, punctuation), and one outside the Basic
    Multilingual Plane (emoji) three. A long word is cut into its units, so that a text
    without spaces still splits.

    :meth:`calibrate` grows every count by the largest ratio of tokens a server reported to
    tokens estimated for the same inputs (plus 10%), never shrinks it, and ignores ratios
    above 3 (a server that counts characters or bytes).
    """

    exact = False
    specials = _ESTIMATED_SPECIALS
    name = "estimate"

    def __init__(self) -> None:
        self.factor = 1.0
        self._lock = threading.Lock()

    def units(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        starts: list[int] = []
        ends: list[int] = []
        costs: list[int] = []
        for m in _PIECE.finditer(text):
            a, b = m.span()
            c = text[a]
            if c.isascii() and c.isalnum():
                step = _LETTERS_PER_TOKEN if c.isalpha() else _DIGITS_PER_TOKEN
                cuts = range(a, b, step)
                starts.extend(cuts)
                ends.extend(min(s + step, b) for s in cuts)
                costs.extend([1] * len(cuts))
            else:
                starts.append(a)
                ends.append(b)
                costs.append(3 if ord(c) > 0xFFFF else 1)
        return (np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64),
                np.asarray(costs, dtype=np.int64))

    def count(self, text: str) -> int:
        total = 0
        for m in _PIECE.finditer(text):
            a, b = m.span()
            c = text[a]
            if c.isascii() and c.isalnum():
                total += -(-(b - a) // (_LETTERS_PER_TOKEN if c.isalpha() else _DIGITS_PER_TOKEN))
            else:
                total += 3 if ord(c) > 0xFFFF else 1
        return total

    def counts(self, texts: Sequence[str]) -> np.ndarray:
        return np.fromiter((self.count(t) for t in texts), dtype=np.int64, count=len(texts))

    def budget(self, window: int) -> int:
        return max(1, math.floor((window - self.specials) / self.factor))

    def bound(self, text: str) -> int:
        # no unit costs more than the UTF-8 bytes it spans
        return len(text.encode("utf-8", "surrogatepass"))

    def calibrate(self, estimated: int, reported: int, *, where: str = "the server") -> None:
        """Learn from ``reported`` tokens (a server's ``usage``) for inputs estimated at
        ``estimated`` tokens, special tokens included."""
        if estimated <= 0 or reported <= 0:
            return
        ratio = reported / estimated
        if ratio > _MAX_CALIBRATION:
            _warn_once(f"calibration|{where}", f"{where} reports {ratio:.1f} times the tokens "
                       "estimated: it seems to count characters or bytes; the estimate is kept")
            return
        with self._lock:
            if ratio * _CALIBRATION_MARGIN <= self.factor:
                return
            self.factor = ratio * _CALIBRATION_MARGIN
        logger.info("embedcache: %s counted %.2f times the tokens estimated; counting %.2f "
                    "times as many from now on", where, ratio, self.factor)

    def __repr__(self) -> str:
        return f"EstimateCounter(factor={self.factor:.2f})"


def local_counter(source: str) -> tuple[ExactCounter | None, int | None]:
    """The exact counter and ``max_seq_length`` of a sentence-transformers model directory,
    read from its files (no model load); ``(None, None)`` for what is not found there."""
    root = Path(source)
    if not root.is_dir():
        return None, None
    counter = None
    if (root / "tokenizer.json").is_file():
        try:
            counter = ExactCounter.from_file(root / "tokenizer.json")
        except (InvalidInputError, MissingDependencyError):
            counter = None
    length = None
    config = root / "sentence_bert_config.json"
    if config.is_file():
        import json

        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("max_seq_length")
        except (OSError, ValueError, AttributeError):
            value = None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            length = value
    return counter, length


# ---------------------------------------------------------------------- the window


@dataclass(frozen=True)
class InputWindow:
    """The window of one model and how its tokens are counted.

    tokens: the window, special tokens included.
    source: where it comes from: ``"setting"``, ``"known model"``, ``"model config"`` or
        ``"assumed"``.
    """

    tokens: int
    source: str
    counter: TokenCounter

    @property
    def budget(self) -> int:
        """Tokens of text, as the counter counts, that one chunk may hold."""
        return max(1, self.counter.budget(self.tokens))

    @property
    def overlap(self) -> int:
        """Tokens consecutive chunks share: a tenth of the budget, at most 64."""
        return min(64, self.budget // 10)

    def key(self, policy: str) -> str:
        """What made a pooled vector, for its cache namespace."""
        return f"long={policy}|window={self.tokens}|overlap={self.overlap}|{self.counter.name}"

    def describe(self) -> str:
        how = "counted exactly" if self.counter.exact else "estimated"
        return f"{self.tokens} tokens ({self.source}; tokens {how})"


def resolve_window(
    model: str,
    *,
    setting: int | None = None,
    model_config: int | None = None,
    counter: TokenCounter | None = None,
) -> InputWindow:
    """The window of ``model``: ``setting`` (``max_input_tokens=``), else the model's own
    ``model_config`` (a local model's ``max_seq_length``), else :data:`KNOWN_WINDOWS`, else
    :data:`ASSUMED_WINDOW`, logged once per model. ``counter``: default an estimate."""
    counter = counter if counter is not None else EstimateCounter()
    if setting is not None:
        return InputWindow(check_int("max_input_tokens", setting, 4), "setting", counter)
    if model_config is not None:
        return InputWindow(int(model_config), "model config", counter)
    known = known_window(model)
    if known is not None:
        return InputWindow(known, "known model", counter)
    _warn_once(f"window|{model}", f"the input window of model {model!r} is unknown; assuming "
               f"{ASSUMED_WINDOW} tokens (set max_input_tokens=..., or --max-input-tokens, to say "
               "what it is)")
    return InputWindow(ASSUMED_WINDOW, "assumed", counter)


# ---------------------------------------------------------------------- chunks and pooling


def _cut_ok(starts: np.ndarray, ends: np.ndarray, b: int) -> bool:
    """Whether a chunk may end before unit ``b`` (no character shared with unit ``b - 1``)."""
    return bool(starts[b] >= ends[b - 1])


_SENTENCE_END = frozenset(".!?;。！？；…")
#: sentence ends that need no space after them
_CJK_END = frozenset("。！？；")


def _pick_end(text: str, starts: np.ndarray, ends: np.ndarray, a: int, b_max: int, min_end: int) -> int:
    """Where a chunk from unit ``a`` ends (exclusive), in ``[min_end, b_max]``: the last
    sentence boundary in the second half, else the last whitespace there, else the last unit
    boundary that splits no character."""
    lo = max(a + max(1, (b_max - a) // 2), min_end)
    fallback = None
    for b in range(b_max, lo - 1, -1):
        if not _cut_ok(starts, ends, b):
            continue
        gap = text[ends[b - 1] : starts[b]]
        prev = text[ends[b - 1] - 1] if ends[b - 1] > 0 else ""
        if (gap and (prev in _SENTENCE_END or "\n" in gap)) or (prev and prev in _CJK_END):
            return b
        if fallback is None and gap:
            fallback = b
    if fallback is not None:
        return fallback
    for b in range(b_max, min_end - 1, -1):
        if _cut_ok(starts, ends, b):
            return b
    return b_max


def _word_start(starts: np.ndarray, ends: np.ndarray, cum: np.ndarray, a: int, nxt: int, b: int,
                overlap: int) -> int:
    """The start of the overlap: the first word start in ``[nxt, b)``, else the last one before
    ``nxt`` within twice the overlap, else ``nxt`` (text without spaces)."""
    for c in range(max(nxt, a + 1), b):
        if starts[c] > ends[c - 1]:
            return c
    c = nxt - 1
    while c > a and cum[b] - cum[c] <= 2 * overlap:
        if starts[c] > ends[c - 1]:
            return c
        c -= 1
    return nxt


def chunk_spans(text: str, counter: TokenCounter, budget: int, overlap: int = 0) -> list[tuple[int, int]]:
    """Character spans ``(start, stop)`` of the chunks of ``text``.

    Each chunk counts at most ``budget`` tokens (as ``counter`` counts them, recounted on the
    chunk's own text), ends on a sentence boundary, else on whitespace, else wherever it must
    (a word longer than the budget, a text without spaces); the next one starts at most
    ``overlap`` tokens earlier, on a word boundary when there is one. Together they cover
    every character; a text within the budget is one span, the whole text.
    """
    budget = check_int("budget", budget, 1)
    starts, ends, costs = counter.units(text)
    n = len(costs)
    cum = np.concatenate([[0], np.cumsum(costs)])
    if cum[-1] <= budget or n <= 1:
        return [(0, len(text))]
    overlap = min(overlap, budget // 2)
    spans: list[tuple[int, int]] = []
    a = end = 0
    while True:
        min_end = max(a, end) + 1  # each chunk reaches past the one before
        limit = budget
        while True:
            begin = 0 if a == 0 else int(starts[a])
            b_max = int(np.searchsorted(cum, cum[a] + limit, side="right")) - 1
            b_max = min(max(b_max, min_end), n)
            b = n if b_max >= n else _pick_end(text, starts, ends, a, b_max, min_end)
            while b < n and starts[b] <= begin:  # zero-width units: never an empty chunk
                b += 1
            stop = len(text) if b >= n else int(starts[b])
            excess = int(counter.counts([text[begin:stop]])[0]) - budget
            if excess <= 0:
                break
            if b > min_end:  # end earlier
                limit = max(1, min(limit - excess, int(cum[b] - cum[a]) - 1))
            elif a < end:  # the overlap leaves no room: give it up
                a, limit = end, budget
            else:  # one unit over the budget: nothing smaller to cut
                break
        spans.append((begin, stop))
        end = b
        if b >= n:
            return spans
        # the next chunk starts up to `overlap` tokens back, on a word start when one is there
        nxt = b
        while nxt - 1 > a and cum[b] - cum[nxt - 1] <= overlap:
            nxt -= 1
        nxt = _word_start(starts, ends, cum, a, nxt, b, overlap)
        a = nxt if nxt > a else b


def pool(vectors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One unit vector from chunk ``vectors`` (k, d), averaged with ``weights`` (k,) (the
    chunks' token counts), then scaled to unit length (a zero average stays zero).

    >>> pool(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([3, 1]))
    array([0.9486833 , 0.31622776], dtype=float32)
    """
    mean = np.average(np.asarray(vectors, dtype=np.float64), axis=0,
                      weights=np.asarray(weights, dtype=np.float64))
    norm = np.linalg.norm(mean)
    return (mean / norm if norm > 0 else mean).astype(np.float32)


def find_long(
    texts: Sequence[str], window: InputWindow, policy: str, *, model: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, tokens)``: the positions of the texts of ``texts`` over ``window`` and their
    token counts (special tokens left out). Only texts that may be over it are counted (see
    :meth:`TokenCounter.bound`). With ``policy="error"``, the first one raises
    :class:`~embedcache.errors.TextTooLongError`, naming its row."""
    budget = window.budget
    counter = window.counter
    maybe = [i for i, t in enumerate(texts) if counter.bound(t) > budget]
    if not maybe:
        z = np.zeros(0, dtype=np.int64)
        return z, z
    counts = counter.counts([texts[i] for i in maybe])
    over = counts > budget
    rows = np.asarray(maybe, dtype=np.int64)[over]
    if rows.size and policy == "error":
        i, n = int(rows[0]), int(counts[over][0])
        how = "" if counter.exact else " (estimated)"
        raise TextTooLongError(
            f"texts[{i}] has {n} tokens{how}, more than the {budget} that fit in the "
            f"{window.tokens}-token input window of model {model!r} ({window.source}); "
            f"{rows.size} text(s) are over it. Shorten them, or pass long_texts='chunk' "
            "(or --long-texts chunk) to embed them in chunks"
        )
    return rows, counts[over]


def cut(text: str, window: InputWindow, policy: str) -> tuple[list[str], np.ndarray]:
    """The pieces to embed for a ``text`` over ``window`` (its chunks, or its first chunk
    when ``policy`` is ``"truncate"``) and each one's token count (at least 1), the weights
    of :func:`pool`."""
    spans = chunk_spans(text, window.counter, window.budget, window.overlap)
    if policy == "truncate":
        spans = spans[:1]
    pieces = [text[a:b] for a, b in spans]
    return pieces, np.maximum(window.counter.counts(pieces), 1)
