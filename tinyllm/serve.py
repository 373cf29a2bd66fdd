"""An OpenAI-compatible HTTP server: `python -m tinyllm.serve`.

    python -m tinyllm.serve --model PATH --device cpu --host 127.0.0.1 --port 8000

    POST /v1/completions        {"model", "prompt", "max_tokens", "stream", ...}
    POST /v1/chat/completions   {"model", "messages", ...}  (the checkpoint's chat template)
    GET  /v1/models             the one model served
    GET  /health                200 once the model is loaded and warmed up
    GET  /metrics               Prometheus text format

What it teaches: how a language model is served to many clients at once.
- The HTTP side is asynchronous (one event loop, many open connections); the model is not:
  one scheduler thread (scheduler.py) owns it and runs continuous batching. A request is
  validated here, turned into token ids, and handed to the scheduler; the scheduler sends
  back events (a token's text, the end) that the event loop writes out.
- Streaming is Server-Sent Events: a `text/event-stream` response of `data: {json}` lines,
  one per piece of text, closed by `data: [DONE]`, the format OpenAI's clients read.
- A client that goes away cancels its request: its sequence leaves the batch at the next
  step and its KV cache is freed.
- A full server says so at once (503) instead of queueing without bound; a bad request
  gets a 400 whose body names the field, as OpenAI's API does.

Why Starlette and uvicorn (and not FastAPI): Starlette is the small ASGI toolkit FastAPI
is built on; uvicorn is the standard ASGI server. FastAPI would add pydantic models and
an OpenAPI schema. Here every field is checked by hand anyway, because the checks must
name the field the OpenAI way and reuse tinyllm's own validation (SamplingParams,
StopRules), so the extra layer would only hide the request handling this module shows.

Sampling defaults are the CLI's: temperature 0 (greedy) unless the request sets one.
`return_token_ids: true` (an extension, as in vLLM) adds the generated token ids to a
non-streamed choice. With `--device cuda` the model runs through the readable path on the
GPU (`tinyllm.load(device=...)`); a batched fast path on the GPU is not part of this server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import uuid
from pathlib import Path

from .errors import TinyLLMError
from .generate import StopRules
from .sampler import SamplingError, SamplingParams
from .scheduler import Failed, Finished, Observer, Piece, QueueFull, Request, Scheduler, SchedulerStopped

# The sampling parameters of the CLI, accepted in a request body under the same names.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "seed")
# OpenAI fields tinyllm does not implement: refused when set, rather than silently ignored.
UNSUPPORTED_FIELDS = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "tool_choice")
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "cancelled"}


# ---- errors, OpenAI style -------------------------------------------------------------------

class APIError(Exception):
    """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class FieldErrors:
    """Collects every bad field of a request, so one 400 names them all (param: the first)."""

    def __init__(self):
        self.errors: list[tuple[str, str]] = []

    def add(self, param: str, message: str) -> None:
        self.errors.append((param, message))

    def raise_if_any(self) -> None:
        if self.errors:
            message = "; ".join(f"{param}: {message}" for param, message in self.errors)
            code = "model_not_found" if self.errors[0][0] == "model" else None
            raise APIError(400, message, self.errors[0][0], code=code)


# ---- from a request body to a scheduler Request -----------------------------------------------

class Job:
    """A validated request: what to feed the scheduler and how to answer."""

    def __init__(self, kind: str, prompt_ids: list[int], sampling: SamplingParams, rules: StopRules,
                 stream: bool, include_usage: bool, return_token_ids: bool):
        self.kind = kind  # "completion" or "chat"
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.rules = rules
        self.stream = stream
        self.include_usage = include_usage
        self.return_token_ids = return_token_ids


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body: malformed JSON ({e})", "body") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body: expected a JSON object, got {type(body).__name__}", "body")
    return body


class Validator:
    """Checks a request body against the served model: field by field, all errors collected."""

    def __init__(self, llm, model_id: str, max_context: int, default_max_tokens: int):
        self.llm = llm
        self.model_id = model_id
        self.max_context = max_context
        self.default_max_tokens = default_max_tokens

    def job(self, body: dict, kind: str) -> Job:
        errors = FieldErrors()
        model = body.get("model")
        if model is not None and model != self.model_id:
            errors.add("model", f"unknown model {model!r}; this server serves {self.model_id!r}")
        n = body.get("n")
        if n is not None and n != 1:
            errors.add("n", f"only n=1 is supported, got {n!r}")
        best_of = body.get("best_of")
        if best_of is not None and best_of != 1:
            errors.add("best_of", f"only best_of=1 is supported, got {best_of!r}")
        for name in UNSUPPORTED_FIELDS:
            if body.get(name) not in (None, False):
                errors.add(name, "not supported by this server")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            errors.add("stream", f"expected true or false, got {stream!r}")
        include_usage = False
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
                errors.add("stream_options", f"expected {{\"include_usage\": true|false}}, got {options!r}")
            else:
                include_usage = options.get("include_usage", False)
        return_ids = body.get("return_token_ids", False)
        if not isinstance(return_ids, bool):
            errors.add("return_token_ids", f"expected true or false, got {return_ids!r}")
        sampling = self._sampling(body, errors)
        stop = self._stop(body.get("stop"), errors)
        max_name = "max_tokens"
        max_tokens = body.get("max_tokens")
        if kind == "chat" and body.get("max_completion_tokens") is not None:
            max_name, max_tokens = "max_completion_tokens", body["max_completion_tokens"]
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
            errors.add(max_name, f"must be an integer >= 1, got {max_tokens!r}")
            max_tokens = None
        prompt_name, prompt_ids = ("messages", self._messages(body, errors)) if kind == "chat" else \
                                  ("prompt", self._prompt(body, errors))
        if prompt_ids is not None:
            room = self.max_context - len(prompt_ids)
            if room < 1:
                errors.add(prompt_name, f"the prompt has {len(prompt_ids)} tokens but the context holds "
                           f"{self.max_context} (and at least one must be generated)")
            elif max_tokens is not None and max_tokens > room:
                errors.add(max_name, f"{max_tokens} new tokens do not fit: the prompt has {len(prompt_ids)} "
                           f"tokens and the context holds {self.max_context}")
            elif max_tokens is None:
                max_tokens = min(self.default_max_tokens, room)
        errors.raise_if_any()
        rules = StopRules(max_tokens, stop)
        return Job(kind, prompt_ids, sampling, rules, stream, include_usage, return_ids)

    def _sampling(self, body: dict, errors: FieldErrors) -> SamplingParams | None:
        """Each field checked by SamplingParams itself (one at a time, so all errors show)."""
        given = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
        ok = {}
        for name, value in given.items():
            try:
                SamplingParams(**{name: value})
                ok[name] = value
            except SamplingError as e:
                errors.add(e.param, e.detail)
        return SamplingParams(**ok)

    def _stop(self, stop, errors: FieldErrors) -> tuple[str, ...]:
        if stop is None:
            return ()
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            errors.add("stop", f"expected a non-empty string or a list of them, got {stop!r}")
            return ()
        return tuple(stops)

    def _prompt(self, body: dict, errors: FieldErrors) -> list[int] | None:
        """A string, a list of token ids, or a batch of one of either."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one prompt
        vocab = self.llm.config.vocab_size
        if isinstance(prompt, str):
            return self.llm.prompt_ids(prompt)
        if isinstance(prompt, list) and prompt and all(_is_int(t) and 0 <= t < vocab for t in prompt):
            return list(prompt)
        errors.add("prompt", "expected a string or a non-empty list of token ids in [0, "
                   f"{vocab}) (one prompt: n=1, no batches), got {str(prompt)[:60]!r}")
        return None

    def _messages(self, body: dict, errors: FieldErrors) -> list[int] | None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            errors.add("messages", f"expected a non-empty list of {{'role', 'content'}} objects, got {str(messages)[:60]!r}")
            return None
        plain = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                errors.add("messages", f"messages[{i}]: expected an object with a 'role' string")
                return None
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    errors.add("messages", f"messages[{i}].content: only text parts are supported")
                    return None
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                errors.add("messages", f"messages[{i}].content: expected a string, got {content!r:.60}")
                return None
            plain.append({"role": m["role"], "content": content})
        try:
            return self.llm.prompt_ids(plain, chat=True)
        except TinyLLMError as e:
            errors.add("messages", str(e))
            return None


# ---- metrics ----------------------------------------------------------------------------------

class Metrics(Observer):
    """Prometheus metrics, in a registry of their own (several servers may share a process)."""

    def __init__(self, scheduler: Scheduler):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("tinyllm_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finishes = Counter("tinyllm_request_finish", "Generations ended, by finish reason "
                                "(eos, stop, length, context, cancelled)", ["reason"], registry=r)
        self.prompt_tokens = Counter("tinyllm_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("tinyllm_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("tinyllm_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.tpot = Histogram("tinyllm_time_per_output_token_seconds", "Between two tokens of one request",
                              buckets=(.005, .01, .02, .04, .08, .16, .32, .64, 1.28, 2.56, 5), registry=r)
        self.batch = Histogram("tinyllm_batch_size", "Sequences in each decode step",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        Gauge("tinyllm_queue_depth", "Requests waiting to join the batch",
              registry=r).set_function(lambda: scheduler.queue_depth)
        Gauge("tinyllm_running_requests", "Sequences in the running batch",
              registry=r).set_function(lambda: scheduler.batch_size)

    # Observer: called from the scheduler thread (prometheus_client is thread-safe)
    def first_token(self, seconds):
        self.ttft.observe(seconds)

    def token_gap(self, seconds):
        self.tpot.observe(seconds)

    def step(self, batch_size):
        self.batch.observe(batch_size)

    def finished(self, event: Finished):
        self.finishes.labels(event.reason).inc()
        self.prompt_tokens.inc(event.prompt_tokens)
        self.generated_tokens.inc(event.completion_tokens)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---- the ASGI app -------------------------------------------------------------------------------

class Server:
    """The model, its scheduler, the request validator and the Starlette app around them."""

    def __init__(self, llm, model_id: str | None = None, max_batch: int = 16, max_queue: int = 64,
                 max_context: int | None = None, default_max_tokens: int = 256):
        self.llm = llm
        self.model_id = model_id or Path(llm.path).name.removesuffix(".gguf")
        self.max_context = min(max_context or llm.config.max_seq_len, llm.config.max_seq_len)
        self.scheduler = Scheduler(llm.model, llm.tokenizer, max_batch, max_queue, max_context=self.max_context)
        if self.scheduler.rows is not None:  # the GPU's batched cache may hold fewer positions (GPU memory)
            self.max_context = min(self.max_context, self.scheduler.rows.capacity)
        self.validator = Validator(llm, self.model_id, self.max_context, default_max_tokens)
        self.metrics = Metrics(self.scheduler)
        self.created = int(time.time())
        self.ready = False

    # ---- life cycle ----------------------------------------------------------------------------
    def start(self, warm_up: bool = True) -> None:
        self.scheduler.start()
        if warm_up:
            self.warm_up()
        self.scheduler.observer = self.metrics  # warm-up requests are not counted
        self.ready = True

    def warm_up(self, timeout: float = 600.0) -> None:
        """Two short requests through the scheduler (prefill, batched decode, sampling), so the
        first client does not pay for first-call costs (on a GPU: kernel compilation)."""
        done = threading.Semaphore(0)
        rules = StopRules(max_new_tokens=4, eos_ids=())
        for seed in (0, 1):
            self.scheduler.submit(Request(self.llm.prompt_ids("Hello"), SamplingParams(temperature=1.0, seed=seed),
                                          rules, lambda e: done.release() if isinstance(e, (Finished, Failed)) else None))
        for _ in range(2):
            if not done.acquire(timeout=timeout):
                raise RuntimeError("warm-up did not finish")

    def stop(self) -> None:
        self.ready = False
        self.scheduler.stop()

    def app(self):
        from contextlib import asynccontextmanager

        from starlette.applications import Starlette
        from starlette.routing import Route

        @asynccontextmanager
        async def lifespan(app):
            yield
            self.stop()  # after uvicorn has let in-flight streams finish (or cancelled them)
            print("tinyllm.serve: stopped", file=sys.stderr, flush=True)

        async def http_error(request, exc):  # 404, 405, ... in OpenAI's error format too
            from starlette.responses import JSONResponse

            error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
            return JSONResponse(error.body(), status_code=exc.status_code)

        from starlette.exceptions import HTTPException

        return Starlette(exception_handlers={HTTPException: http_error}, routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
        ], lifespan=lifespan)

    # ---- small endpoints -----------------------------------------------------------------------
    async def health(self, request):
        from starlette.responses import JSONResponse

        if not self.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.model_id, "running": self.scheduler.batch_size,
                             "waiting": self.scheduler.queue_depth})

    async def models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "tinyllm",
             "max_model_len": self.max_context}]})

    async def metrics_endpoint(self, request):
        from prometheus_client import CONTENT_TYPE_LATEST
        from starlette.responses import Response

        return Response(self.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    # ---- generation endpoints ------------------------------------------------------------------
    async def completions(self, request):
        return await self._generate(request, "completion")

    async def chat_completions(self, request):
        return await self._generate(request, "chat")

    async def _generate(self, request, kind: str):
        from starlette.responses import JSONResponse, StreamingResponse

        endpoint = request.url.path
        try:
            job = self.validator.job(parse_json(await request.body()), kind)
            events: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()

            def emit(event):  # called from the scheduler thread
                try:
                    loop.call_soon_threadsafe(events.put_nowait, event)
                except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                    pass

            req = Request(job.prompt_ids, job.sampling, job.rules, emit)
            try:
                self.scheduler.submit(req)
            except QueueFull as e:
                raise APIError(503, str(e), None, type="server_busy", code="queue_full") from None
            except SchedulerStopped as e:
                raise APIError(503, str(e), None, type="server_shutting_down") from None
        except APIError as e:
            self.metrics.requests.labels(endpoint, str(e.status)).inc()
            return JSONResponse(e.body(), status_code=e.status)
        self.metrics.requests.labels(endpoint, "200").inc()
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        if job.stream:
            return StreamingResponse(self._sse(request, req, events, job, rid), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._complete(request, req, events, job, rid)

    async def _next_event(self, request, events: asyncio.Queue, disconnect: asyncio.Future):
        """The scheduler's next event, or None when the client went away first."""
        get = asyncio.ensure_future(events.get())
        done, _ = await asyncio.wait({get, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        return None

    async def _complete(self, request, req: Request, events, job: Job, rid: str):
        """A non-streamed answer: wait for the end, then one JSON body."""
        from starlette.responses import JSONResponse

        disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
        text, event = [], None
        try:
            while True:
                event = await self._next_event(request, events, disconnect)
                if event is None or isinstance(event, (Finished, Failed)):
                    break
                text.append(event.text)
        finally:
            disconnect.cancel()
            if not isinstance(event, (Finished, Failed)):
                self.scheduler.cancel(req)  # client gone (or this task cancelled): free the slot
        if event is None:
            return JSONResponse({}, status_code=499)  # nobody reads it
        if isinstance(event, Failed):
            return JSONResponse(APIError(500, event.message, type="server_error").body(), status_code=500)
        choice = {"index": 0, "logprobs": None, "finish_reason": FINISH_REASONS[event.reason]}
        if job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        if job.return_token_ids:
            choice["token_ids"] = event.token_ids
        return JSONResponse({"id": rid, "object": "chat.completion" if job.kind == "chat" else "text_completion",
                             "created": int(time.time()), "model": self.model_id, "choices": [choice],
                             "usage": _usage(event)})

    async def _sse(self, request, req: Request, events, job: Job, rid: str):
        """A streamed answer: one `data:` event per piece of text, then the finish, then [DONE]."""
        chat = job.kind == "chat"
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_id}

        def chunk(text: str | None, finish: str | None = None, first: bool = False, token_ids=None) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if token_ids is not None:
                choice["token_ids"] = token_ids
            return _sse_line({**head, "choices": [choice]})

        disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
        event = None
        try:
            if chat:
                yield chunk(None, first=True)
            while True:
                event = await self._next_event(request, events, disconnect)
                if event is None:  # the client disconnected
                    return
                if isinstance(event, Failed):
                    yield _sse_line(APIError(500, event.message, type="server_error").body())
                    break
                if isinstance(event, Finished):
                    ids = event.token_ids if job.return_token_ids else None
                    yield chunk(None, FINISH_REASONS[event.reason], token_ids=ids)
                    if job.include_usage:
                        yield _sse_line({**head, "choices": [], "usage": _usage(event)})
                    break
                if event.text:
                    yield chunk(event.text)
            yield "data: [DONE]\n\n"
        finally:
            # Runs on normal end, on disconnect, and when the server cancels this task.
            disconnect.cancel()
            if not isinstance(event, (Finished, Failed)):
                self.scheduler.cancel(req)


async def _wait_for_disconnect(request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse_line(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(event: Finished) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


# ---- command line ---------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tinyllm.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint: GGUF file or safetensors directory "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, help="auto (default), float32 or float16")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the file name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16; the GPU fast path takes up to 16, "
                   "8 for very wide MLPs)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait beyond the batch; "
                   "more get 503 (default 64)")
    p.add_argument("--max-context", type=int, default=None, help="prompt + generated tokens per request "
                   "(default: the model's context length)")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests may take to finish at shutdown before they are cancelled")
    p.add_argument("--no-warm-up", action="store_true", help="skip the warm-up requests at start-up")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import uvicorn

        import tinyllm
    except ImportError as e:
        print(f"tinyllm.serve: {e.name} is missing: pip install 'tinyllm[serve]'", file=sys.stderr)
        return 2
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--default-max-tokens", args.default_max_tokens, 1)):
        if value < low:
            print(f"tinyllm.serve: {flag}: must be >= {low}, got {value}", file=sys.stderr)
            return 2
    try:
        llm = tinyllm.load(args.model, device=args.device, dtype=args.dtype)
        server = Server(llm, args.served_model_name, args.max_batch, args.max_queue,
                        args.max_context, args.default_max_tokens)
        start = time.perf_counter()
        server.start(warm_up=not args.no_warm_up)  # the port opens only after this
    except TinyLLMError as e:
        print(f"tinyllm.serve: {e}", file=sys.stderr)
        return 2
    print(f"tinyllm.serve: {server.model_id} on {llm.model.device.name}, loaded in {llm.load_seconds:.1f} s, "
          f"warmed up in {time.perf_counter() - start:.1f} s, context {server.max_context} tokens per request",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(server.app(), host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout, access_log=False)
    # On SIGINT/SIGTERM uvicorn stops accepting connections, lets in-flight streams finish
    # (cancelling those still running after --shutdown-timeout), runs the lifespan's
    # shutdown (the scheduler stops), then re-raises the signal so the exit status shows it;
    # Ctrl-C (SIGINT) then ends here as KeyboardInterrupt: a normal stop, not a traceback.
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
