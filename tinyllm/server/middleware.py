"""What wraps every request before it reaches an endpoint: ASGI middleware, outermost first.

- `RequestBoundary` gives each request an id (the `x-request-id` response header, which
  OpenAI's clients read too) and is the last line of defence: an exception that nothing
  else handled is logged through `logging` with that id and answered with a JSON 500 in
  OpenAI's error format, so a client always gets an answer it can parse, never a dropped
  connection. (A stream whose headers are out already ends with an error event instead:
  see app.py.) It also logs one line per request at `info` when the response is done (a
  stream: when its last event is out): method, path, status, tokens (prompt + completion,
  noted by the endpoint with `note_tokens`) and the time taken.
- CORS (Starlette's `CORSMiddleware`), only with `--cors-origin`: browsers on those origins
  may call the API, and their preflight requests are answered before the key is checked.
- `APIKeyCheck`: with a key configured, `/v1/*` and `/metrics` need `Authorization: Bearer
  KEY`, compared in constant time (`hmac.compare_digest`: how long the comparison takes does
  not tell how many leading characters were right); otherwise 401 in OpenAI's format.
  `/health` stays open: load balancers and orchestrators probe it without credentials and
  it tells only whether the server is up. `/metrics` needs the key: traffic figures are
  not for everyone, and Prometheus sends a bearer token (`authorization` in a scrape config).

An ASGI middleware is an app that wraps an app: `await self.app(scope, receive, send)`,
with `send` wrapped to see (and add to) the response as it goes out.
"""
from __future__ import annotations

import hmac
import logging
import time
import uuid

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from .openai import APIError

log = logging.getLogger("tinyllm.server")
access_log = logging.getLogger("tinyllm.server.access")


def note_tokens(scope, prompt_tokens: int, completion_tokens: int) -> None:
    """What a generation endpoint tells the request's log line."""
    scope.setdefault("state", {})["tokens"] = (prompt_tokens, completion_tokens)


class RequestBoundary:
    def __init__(self, app, on_error=None):
        self.app = app
        self.on_error = on_error  # called with (path, status) for each 500 sent, e.g. to count it

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = "req-" + uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started, status, begun = False, None, time.perf_counter()

        async def send_with_id(message):
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = status or 500
            log.exception("request %s: %s %s failed", request_id, scope.get("method"), scope.get("path"))
            if started:  # the status line is out: nothing more can be said on this response
                return
            error = APIError(500, f"internal server error (request id {request_id})", type="server_error",
                             code="internal_error")
            await JSONResponse(error.body(), status_code=500)(scope, receive, send_with_id)
            if self.on_error is not None:
                self.on_error(scope.get("path", ""), 500)
        finally:
            if access_log.isEnabledFor(logging.INFO):
                tokens = state.get("tokens")
                shown = f"{tokens[0]}+{tokens[1]} tokens" if tokens else "- tokens"
                access_log.info("%s %s %s %s %.3f s %s", scope.get("method"), scope.get("path"), status, shown,
                                time.perf_counter() - begun, request_id)


class APIKeyCheck:
    PROTECTED = ("/v1/", "/metrics")

    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self._protected(scope["path"]) and not self._authorized(scope):
            error = APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer KEY'",
                             code="invalid_api_key")
            response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def _protected(self, path: str) -> bool:
        return path == "/v1" or path.startswith(self.PROTECTED)

    def _authorized(self, scope) -> bool:
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        return hmac.compare_digest(given, self.key)


def middleware(api_key: str | None, cors_origins=(), on_error=None) -> list[Middleware]:
    """The middleware stack, outermost first."""
    stack = [Middleware(RequestBoundary, on_error=on_error)]
    if cors_origins:
        stack.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                                allow_headers=["Authorization", "Content-Type"], expose_headers=["x-request-id"],
                                max_age=600))
    if api_key:
        stack.append(Middleware(APIKeyCheck, api_key=api_key))
    return stack
