"""Serving in tests: an ASGI app on a uvicorn thread of the test process, and plain HTTP
requests to it, on 127.0.0.1 (benchmarks/serve_load.py's `http_request`, which the
benchmarks use too)."""
from __future__ import annotations

import contextlib
import threading
import time

from benchmarks.serve_load import http_request

__all__ = ["http_request", "uvicorn_thread"]


@contextlib.contextmanager
def uvicorn_thread(app, args):
    """Serve `app` with the server's own uvicorn settings (`args`: parsed server flags) until
    the block ends; yields once the port is open."""
    import uvicorn

    from tinyllm.server.main import uvicorn_config

    http_server = uvicorn.Server(uvicorn_config(app, args))
    thread = threading.Thread(target=http_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield http_server
    finally:
        http_server.should_exit = True
        thread.join(30)
