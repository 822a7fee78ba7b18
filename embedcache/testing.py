"""A real OpenAI-compatible embeddings server on loopback, with a switch for every fault,
for tests of code that calls an embeddings API (this package's own, and yours).

>>> from embedcache import OpenAIEmbeddings
>>> with FakeEmbeddingServer(dimensions=8, api_key="k", models=("my-model",)) as server:
...     emb = OpenAIEmbeddings(model="my-model", base_url=server.base_url, api_key="k")
...     emb.embed(["hello"]).shape
(1, 8)

Vectors are deterministic: the unit vector derived from SHAKE-256 of the text (and the
dimension), so a test can compute what any text must come back as (:func:`expected_vector`).

Faults are queued with :meth:`FakeEmbeddingServer.push`; each incoming request takes the
next one (first come, first served), requests find an empty queue served normally::

    server.push(Fault.error(429, retry_after="0"), Fault.nan())

Run as a script to serve in a process of its own (used by the benchmarks); it prints the
base URL on its first line of stdout::

    python -m embedcache.testing --dimensions 1024 --port 0
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

DEFAULT_MODELS = ("test-embed-small", "test-embed-large")


def expected_vector(text: str, dimensions: int) -> np.ndarray:
    """The float32 unit vector the server returns for ``text`` at ``dimensions``."""
    raw = hashlib.shake_256(f"{dimensions}:{text}".encode("utf-8", "surrogatepass")).digest(4 * dimensions)
    v = np.frombuffer(raw, dtype="<u4").astype(np.float64) / 2.0**32 - 0.5
    return (v / np.linalg.norm(v)).astype(np.float32)


@dataclass
class Fault:
    """What to do to one request instead of (or on top of) answering it normally."""

    kind: str
    status: int = 200
    style: str = "openai"  # error body: "openai" {"error": {...}}, "fastapi" {"detail": ...}, "text"
    message: str = "simulated failure"
    headers: dict = field(default_factory=dict)
    delay: float = 0.0

    @classmethod
    def error(cls, status: int, *, style: str = "openai", message: str = "simulated failure",
                     retry_after: str | None = None, retry_after_ms: str | None = None) -> Fault:
        headers = {}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        if retry_after_ms is not None:
            headers["retry-after-ms"] = retry_after_ms
        return cls("status", status=status, style=style, message=message, headers=headers)

    @classmethod
    def insufficient_quota(cls, *, retry_after: str | None = None) -> Fault:
        """429 with OpenAI's ``insufficient_quota`` body: out of credit, not rate limited."""
        headers = {} if retry_after is None else {"Retry-After": retry_after}
        return cls("insufficient_quota", status=429, headers=headers,
                   message="You exceeded your current quota, please check your plan and billing "
                           "details. For more information on this error, read the docs.")

    @classmethod
    def slow(cls, delay: float) -> Fault:
        """Answer correctly, but only after ``delay`` seconds."""
        return cls("slow", delay=delay)

    @classmethod
    def drop(cls) -> Fault:
        """Read the request, then close the connection without a reply."""
        return cls("drop")

    @classmethod
    def reorder(cls) -> Fault:
        """Valid reply with ``data`` in reverse order (indexes still right)."""
        return cls("reorder")

    @classmethod
    def one_too_few(cls) -> Fault:
        return cls("one_too_few")

    @classmethod
    def nan(cls) -> Fault:
        return cls("nan")

    @classmethod
    def wrong_dim(cls) -> Fault:
        """The last vector is one element short."""
        return cls("wrong_dim")

    @classmethod
    def all_wrong_dim(cls) -> Fault:
        """Every vector has ``dimensions + 1`` elements."""
        return cls("all_wrong_dim")

    @classmethod
    def duplicate_index(cls) -> Fault:
        return cls("duplicate_index")

    @classmethod
    def malformed_json(cls) -> Fault:
        return cls("malformed_json")

    @classmethod
    def floats(cls) -> Fault:
        """Reply with float lists even when base64 was asked for."""
        return cls("floats")


@dataclass
class Recorded:
    method: str
    path: str
    body: dict | None
    authorization: str | None
    arrived: float


class FakeEmbeddingServer:
    """OpenAI-compatible ``/v1/embeddings`` and ``/v1/models`` on 127.0.0.1, in a thread.

    dimensions: native dimension (a request's ``dimensions`` overrides it).
    api_key: required bearer token (``None`` accepts any). A wrong key gets a 401 whose
        message echoes the key back, like some real servers do.
    truncate_tokens: read only the first this many tokens of each input, as a model with
        that window does (the vector is that of the text up to its last token read, and
        ``usage`` counts the tokens read). Tokens here are whitespace-separated words.
    max_batch_inputs: refuse a request of more inputs with a 413, as
        text-embeddings-inference does (``"batch size 128 > maximum allowed batch size 32"``).
    max_batch_tokens: refuse a request of more tokens (words) with OpenAI's 400
        ``max_tokens_per_request``. ``refused`` lists ``(status, inputs)`` of each refusal.
    """

    def __init__(self, dimensions: int = 8, *, api_key: str | None = "test-key",
                 models: tuple[str, ...] = DEFAULT_MODELS, port: int = 0,
                 truncate_tokens: int | None = None, max_batch_inputs: int | None = None,
                 max_batch_tokens: int | None = None) -> None:
        self.dimensions = dimensions
        self.truncate_tokens = truncate_tokens
        self.max_batch_inputs = max_batch_inputs
        self.max_batch_tokens = max_batch_tokens
        self.refused: list[tuple[int, int]] = []
        self.api_key = api_key
        self.models = list(models)
        self.faults: deque[Fault] = deque()
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._release = threading.Event()  # set on stop: slow replies give up waiting
        handler = type("Handler", (_Handler,), {"fake": self})
        self.httpd = _QuietServer(("127.0.0.1", port), handler)
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeEmbeddingServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeEmbeddingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def push(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self.faults.popleft() if self.faults else None

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)

    @property
    def embedding_requests(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/embeddings")]


_WORD = re.compile(r"\S+")


def read_window(text: str, tokens: int | None) -> tuple[str, int]:
    """What a model with a window of ``tokens`` words reads of ``text``, and how many tokens
    that is (the whole text when ``tokens`` is ``None`` or the text is shorter)."""
    words = list(_WORD.finditer(text))
    if tokens is None or len(words) <= tokens:
        return text, len(words)
    return text[: words[tokens - 1].end()], tokens


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog of 5 drops connections when dozens of clients connect at
    # once (each drop costs the client a 1 s SYN retry)
    request_queue_size = 128

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that timed out or a dropped connection is expected here, not news.
        if not isinstance(sys.exc_info()[1], (ConnectionError, OSError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeEmbeddingServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, status: int, message: str, style: str = "openai",
                    headers: dict | None = None) -> None:
        if style == "fastapi":
            body = {"detail": message} if status != 422 else {
                "detail": [{"loc": ["body", "input"], "msg": message, "type": "value_error"}]}
        elif style == "text":
            self._send(status, message.encode(), headers, content_type="text/plain")
            return
        else:
            body = {"error": {"message": message, "type": "invalid_request_error", "code": status}}
        self._send(status, json.dumps(body).encode(), headers)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization")
        want = self.fake.api_key
        if want is None or auth == f"Bearer {want}":
            return True
        got = (auth or "").removeprefix("Bearer ")
        self._send_error(401, f"Incorrect API key provided: {got}. Check your key.")
        return False

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self) -> None:  # noqa: N802
        self._read_body()
        self.fake._record(Recorded("GET", self.path, None, self.headers.get("Authorization"), time.monotonic()))
        fault = self.fake._next_fault()
        if fault is not None and self._apply_early(fault):
            return
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/v1/models":
            self._send_error(404, f"no route {self.path}")
            return
        body = {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "test"}
                                           for m in self.fake.models]}
        self._send(200, json.dumps(body).encode())

    def _apply_early(self, fault: Fault) -> bool:
        """Faults that replace the reply; True when the request is answered (or dropped)."""
        if fault.kind == "status":
            self._send_error(fault.status, fault.message, fault.style, fault.headers)
            return True
        if fault.kind == "insufficient_quota":
            body = {"error": {"message": fault.message, "type": "insufficient_quota", "param": None,
                              "code": "insufficient_quota"}}
            self._send(fault.status, json.dumps(body).encode(), fault.headers)
            return True
        if fault.kind == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return True
        if fault.kind == "slow":
            self.fake._release.wait(fault.delay)
        if fault.kind == "malformed_json":
            self._send(200, b'{"object": "list", "data": [{"embedding": ')
            return True
        return False

    def do_POST(self) -> None:  # noqa: N802
        raw = self._read_body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self.fake._record(Recorded("POST", self.path, body, self.headers.get("Authorization"), time.monotonic()))
        fault = self.fake._next_fault()
        if fault is not None and self._apply_early(fault):
            return
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/v1/embeddings":
            self._send_error(404, f"no route {self.path}")
            return
        if not isinstance(body, dict) or not isinstance(body.get("input"), list) or not body["input"]:
            self._send_error(422, "input must be a non-empty list of strings", "fastapi")
            return
        if body.get("model") not in self.fake.models:
            self._send_error(404, f"The model `{body.get('model')}` does not exist.")
            return
        texts = body["input"]
        if self._refuse(texts):
            return
        read = [read_window(t, self.fake.truncate_tokens) for t in texts]
        texts = [t for t, _ in read]
        dim = body.get("dimensions") or self.fake.dimensions
        kind = fault.kind if fault is not None else None
        vectors = [expected_vector(t, dim) for t in texts]
        if kind == "nan":
            vectors[-1] = vectors[-1].copy()
            vectors[-1][0] = np.nan
        elif kind == "wrong_dim":
            vectors[-1] = vectors[-1][:-1]
        elif kind == "all_wrong_dim":
            vectors = [np.append(v, np.float32(0.0)) for v in vectors]
        as_b64 = body.get("encoding_format") == "base64" and kind != "floats"
        data = [
            {"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if as_b64 else v.tolist()}
            for i, v in enumerate(vectors)
        ]
        if kind == "reorder":
            data.reverse()
        elif kind == "one_too_few":
            data.pop()
        elif kind == "duplicate_index" and len(data) > 1:
            data[1]["index"] = data[0]["index"]
        tokens = sum(n for _, n in read)
        reply = {"object": "list", "data": data, "model": body["model"],
                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        self._send(200, json.dumps(reply).encode())


    def _refuse(self, texts: list) -> bool:
        """Refuse a batch over the server's limits, as real servers do; True when refused."""
        fake = self.fake
        if fake.max_batch_inputs is not None and len(texts) > fake.max_batch_inputs:
            with fake._lock:
                fake.refused.append((413, len(texts)))
            self._send(413, json.dumps({
                "error": f"batch size {len(texts)} > maximum allowed batch size {fake.max_batch_inputs}",
                "error_type": "Validation"}).encode())
            return True
        tokens = sum(len(_WORD.findall(t)) for t in texts if isinstance(t, str))
        if fake.max_batch_tokens is not None and tokens > fake.max_batch_tokens:
            with fake._lock:
                fake.refused.append((400, len(texts)))
            self._send(400, json.dumps({"error": {
                "message": f"Requested {tokens:,} tokens, max {fake.max_batch_tokens:,} tokens per request",
                "type": "max_tokens_per_request", "param": None,
                "code": "max_tokens_per_request"}}).encode())
            return True
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dimensions", type=int, default=1024)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="test-key")
    args = parser.parse_args(argv)
    server = FakeEmbeddingServer(args.dimensions, api_key=args.api_key, port=args.port)
    print(server.base_url, flush=True)
    try:
        server.httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])
