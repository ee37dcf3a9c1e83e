"""An ASGI app served by a real uvicorn in a thread, on a free loopback port, for tests that need
a real HTTP(S) server (a browser, a TLS handshake, a command-line client in another process)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Iterator

import uvicorn

from agent.config import KEEP_ALIVE_SECONDS


@contextlib.contextmanager
def serve(app: Any, tls: Any = None, name: str = "test-uvicorn") -> Iterator[str]:
    """Serve ``app`` until the block ends; yields its base URL (``https://`` with ``tls``, an
    ``agent.config.ServerTLS`` whose ``uvicorn_options()`` give the certificate and key).

    Raises AssertionError when uvicorn has not started within 10 s.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options = tls.uvicorn_options() if tls is not None else {}
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                           timeout_keep_alive=KEEP_ALIVE_SECONDS, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=name)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"{'https' if tls is not None else 'http'}://127.0.0.1:{port}"
    finally:
        # force_exit: no wait for the shutdown of kept-alive (TLS) connections.
        server.should_exit = server.force_exit = True
        thread.join(10)
        sock.close()
