"""Serving in tests: an ASGI app on a uvicorn thread of the test process, and plain HTTP
requests to it, on 127.0.0.1."""
from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time


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


def http_request(port: int, method: str, path: str, body=None, headers=None, timeout: float = 60):
    """(status, headers, parsed JSON or text); `body`: bytes as they are, anything else as JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read().decode()
        try:
            return resp.status, resp.headers, json.loads(raw)
        except json.JSONDecodeError:
            return resp.status, resp.headers, raw
    finally:
        conn.close()
