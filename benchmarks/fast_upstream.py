"""A fast fake OpenAI-compatible upstream for the proxy benchmark: ``POST /v1/embeddings`` and
``GET /v1/models`` on 127.0.0.1, one asyncio protocol on uvloop with httptools' parser.

``embedcache.testing.FakeEmbeddingServer`` is made for tests (faults, recorded requests,
vectors computed from each text) and spends about 2.5 ms of CPU on a 64-item request, in
threads of the standard library's HTTP server. On a 2-core machine that CPU is taken from the
proxy under test. This one answers from a pool of pre-encoded vectors, picked by a hash of each
text (a text always gets the same vector within one run), so that what the benchmark measures is
the proxy's cost, as the issue asks ("a fast fake upstream").

    python -m benchmarks.fast_upstream --dimensions 384      # prints its base URL, then serves
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import socket
import sys
import zlib

import httptools
import numpy as np
import orjson

POOL = 4096


class _Pool:
    def __init__(self, dimensions: int) -> None:
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((POOL, dimensions)).astype("<f4")
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        self.b64 = [b'"' + base64.b64encode(v.tobytes()) + b'"' for v in vectors]
        self.floats = [orjson.dumps(v.tolist()) for v in vectors]


class _Protocol(asyncio.Protocol):
    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.url.endswith(b"/models"):
            self._reply(b'{"object":"list","data":[{"id":"test-embed-small","object":"model"}]}')
            return
        request = orjson.loads(b"".join(self.body))
        texts = request["input"]
        if isinstance(texts, str):
            texts = [texts]
        table = self.pool.floats if request.get("encoding_format") == "float" else self.pool.b64
        parts = [b'{"object":"embedding","index":%d,"embedding":%s}' % (i, table[zlib.crc32(t.encode()) % POOL])
                 for i, t in enumerate(texts)]
        tokens = sum(len(t) for t in texts) // 4 + len(texts)
        self._reply(b'{"object":"list","data":[' + b",".join(parts) + b'],"model":"%s","usage":'
                    b'{"prompt_tokens":%d,"total_tokens":%d}}' % (request["model"].encode(), tokens, tokens))

    def _reply(self, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dimensions", type=int, default=384)
    args = parser.parse_args(argv)
    import uvloop

    pool = _Pool(args.dimensions)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(lambda: _Protocol(pool), sock=sock, backlog=512)
        print(f"http://127.0.0.1:{sock.getsockname()[1]}/v1", flush=True)
        async with server:
            await server.serve_forever()

    try:
        uvloop.run(serve())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
