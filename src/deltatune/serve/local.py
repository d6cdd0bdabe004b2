"""The HTTP server on a free loopback port in a background thread: for tests, benches and notebooks."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from deltatune.utils.errors import DeltatuneError


@contextlib.contextmanager
def local_server(app, start_timeout: float = 20.0, log_level: str = "critical") -> Iterator[int]:
    """Run ``app`` (from :func:`deltatune.serve.api.create_app`) with uvicorn on 127.0.0.1; yield its port.

    The app's lifespan (the engine's loop) starts with it; leaving the block stops both."""
    import uvicorn  # the serving extra: only where a server is started

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + start_timeout
    try:
        while not server.started:
            if time.time() > deadline or not thread.is_alive():
                raise DeltatuneError(f"the local server did not start within {start_timeout:g} s")
            time.sleep(0.02)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
