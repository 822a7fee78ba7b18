"""A real proxy (uvicorn on a loopback port, in a thread) in front of a fake upstream."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

UPSTREAM_KEY = "upstream-secret-0123456789"
CLIENT_KEY = "client-key-alice-0001"


class RunningProxy:
    def __init__(self, app: Any, server: Any, port: int) -> None:
        self.app = app
        self.server = server
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = self.url + "/v1"

    @property
    def upstream(self) -> Any:
        return self.app.state.upstream


@contextlib.contextmanager
def running_proxy(upstream_url: str, **options: Any) -> Iterator[RunningProxy]:
    """``create_app(upstream_url, **options)`` served by uvicorn on 127.0.0.1 until the block ends."""
    import uvicorn

    from embedcache.server import create_app

    options.setdefault("api_key", UPSTREAM_KEY)
    app = create_app(upstream_url, **options)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the proxy did not start")
        time.sleep(0.01)
    try:
        yield RunningProxy(app, server, port)
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def wait_written(proxy: RunningProxy, timeout: float = 30.0) -> None:
    """Wait until the proxy has committed every vector it answered to the cache (misses are
    answered first and written in the background)."""
    deadline = time.monotonic() + timeout
    while proxy.upstream.writer.pending:
        assert time.monotonic() < deadline, f"the proxy's cache writes did not commit within {timeout:g} s"
        time.sleep(0.01)
