"""The ASGI app: the model's scheduler behind Starlette routes, and the answers it streams.

- The HTTP side is asynchronous (one event loop, many open connections); the model is not:
  one scheduler thread (scheduler.py) owns it and runs continuous batching. A request's
  body is read on the loop (it only waits for bytes), then parsed, validated, tokenized
  and rendered through the chat template in a worker thread (`anyio.to_thread`) unless it
  is small (INLINE_BODY_BYTES) and asks for no JSON schema, so that a large or slow request
  never stalls the loop, and `/health` answers at once whatever
  else arrives. The job goes to the scheduler; the scheduler sends back events (a piece
  of text, the end) through an `Outbox`, and the loop writes them out.
- Per token, the host's work is the server's ceiling at many streams (the GPU step is shared
  by all of them, the writes are not), so the way back is built to shrink per token when the
  loop falls behind: the outbox wakes the loop once for a burst of events, not once per
  token; a stream takes every event that waits for it and writes them in one send; and a
  stream is written at most once per interval (`--stream-interval-ms`; by default 0.1 ms
  times the streams open, so the loop makes about 10,000 writes a second at most: with 64
  streams a write carries the tokens of ~6 ms, with one stream every token goes at once).
- Two threads share one interpreter lock: the scheduler's, which the GPU waits on, and the
  loop's. Each CUDA call the scheduler makes lets go of the lock, and Python hands it back
  only when the holder reaches its switch interval (5 ms by default): with the loop busy
  writing, every step waited that long, several times. A running server shortens the
  interval (SWITCH_INTERVAL), so the scheduler gets the lock back within a fraction of a
  GPU step, and the loop, falling behind, writes longer bursts instead. On a GPU the server
  runs the scheduler in a process of its own by default (engine_process.py), and the two
  no longer share a lock at all.
- Streaming is Server-Sent Events: a `text/event-stream` response of `data: {json}` lines,
  one per piece of text, closed by `data: [DONE]`, the format OpenAI's clients read.
- A client that goes away cancels its request: its sequence leaves the batch at the next
  step and its KV cache is freed.
- A full server says so at once (503) instead of queueing without bound.
- A request for several choices (`n`, a list of prompts) is one scheduler request per
  choice, all submitted together: they decode side by side in the batch, and their events,
  tagged with the choice's index, meet in one queue. With the prefix cache (`--prefix-cache-mb`,
  tinyllm/prefix.py) the first choice computes the prompt, and the others, held back in the
  queue until then, copy its keys and values.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import sys
import threading
import time
import uuid
import weakref
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..cli import version
from ..generate import StopRules
from ..prefix import BUDGET_MB, PrefixCache
from ..sampler import SamplingParams
from ..scheduler import Failed, Finished, PromptLogprobs, QueueFull, Request, Scheduler, SchedulerStopped
from ..step import as_step
from .limits import Limits, parse_body, read_body
from .metrics import Metrics
from .middleware import middleware, note_tokens
from .openai import SSE_DONE, APIError, Choice, Chunks, Job, Logprobs, Validator, completion, sse_line

log = logging.getLogger("tinyllm.server")

SWITCH_INTERVAL = 0.0005  # seconds: the longest a thread holds the interpreter while another waits
# A body up to this size is parsed, validated and tokenized on the event loop (about a tenth of
# a millisecond for a short prompt, a millisecond for a chat template): handing it to a worker
# thread and back costs more than that on a busy server, where each hand-over waits for the
# interpreter lock, and a burst of arrivals would reach the scheduler one hand-over at a time.
INLINE_BODY_BYTES = 2048
# seconds per open stream: by default a stream is written at most once per (open streams x
# this), so the event loop makes about 1 / WRITE_SPACING writes a second however many streams
# are open (see gather_until)
WRITE_SPACING = 0.0001


def build_scheduler(llm, max_batch: int = 16, max_queue: int = 64, max_context: int | None = None,
                    prefix_cache_mb: float = BUDGET_MB, kv_cache_mb: float | None = None, *,
                    scheduler_class=Scheduler, **extra) -> Scheduler:
    """The server's scheduler over a loaded model (see Server for the arguments); extra: the
    scheduler class's own keyword arguments."""
    step = as_step(llm.step)
    max_context = min(max_context or llm.config.max_seq_len, llm.config.max_seq_len)
    prefix = PrefixCache.for_model(step.model, int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
    return scheduler_class(step, llm.tokenizer, max_batch, max_queue, max_context=max_context, prefix_cache=prefix,
                           kv_cache_bytes=None if kv_cache_mb is None else int(kv_cache_mb * 2**20), **extra)


class Server:
    """The model, its scheduler, the request validator and the Starlette app around them.
    prefix_cache_mb: the budget of the prompt prefixes' keys and values kept for reuse
    (tinyllm/prefix.py), in MiB; 0: none kept. kv_cache_mb: the memory of the running
    sequences' keys and values, in blocks they take as they grow (kv_cache.py BlockPool); None:
    on the GPU enough for --max-batch sequences of the context as far as half its free memory
    goes, on the CPU a cache of its own per sequence. scheduler: one built elsewhere, an
    `EngineProcess` (the model in a process of its own; `llm` is then its `llm`), which
    max_batch, max_queue, prefix_cache_mb and kv_cache_mb were given to instead."""

    def __init__(self, llm, model_id: str | None = None, max_batch: int = 16, max_queue: int = 64,
                 max_context: int | None = None, default_max_tokens: int = 256, *,
                 limits: Limits | None = None, api_key: str | None = None, cors_origins=(),
                 prefix_cache_mb: float = BUDGET_MB, stream_interval: float | None = None,
                 kv_cache_mb: float | None = None, scheduler=None):
        self.llm = llm
        self.model_id = model_id or Path(llm.path).name.removesuffix(".gguf")
        self.max_context = min(max_context or llm.config.max_seq_len, llm.config.max_seq_len)
        # a scheduler built elsewhere: the engine in a process of its own (engine_process.py),
        # whose `llm` this is
        self.scheduler = scheduler or build_scheduler(llm, max_batch, max_queue, self.max_context,
                                                      prefix_cache_mb, kv_cache_mb)
        if self.scheduler.rows is not None:  # the GPU's batched cache may hold fewer positions (GPU memory)
            self.max_context = min(self.max_context, self.scheduler.rows.capacity)
        self.validator = Validator(llm, self.model_id, self.max_context, default_max_tokens)
        # an engine process keeps the metrics of every HTTP process that talks to it
        self.metrics = getattr(scheduler, "metrics", None) or Metrics(self.scheduler)
        self.limits = limits or Limits()
        self.api_key = api_key
        self.cors_origins = tuple(cors_origins)
        self.created = int(time.time())
        self.ready = False
        self.logprobs = Logprobs(llm.tokenizer)
        self.fingerprint = fingerprint(llm)
        self._outboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its Outbox
        # seconds between two writes to one stream, at least; None: open streams x WRITE_SPACING
        self.stream_interval = stream_interval
        self.open_streams = 0

    # ---- life cycle ----------------------------------------------------------------------------
    def start(self, warm_up: bool = True) -> None:
        # process-wide; only ever shortened, so a host program's own shorter setting stands
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self.scheduler.start()
        if warm_up:
            self.warm_up()
        self.scheduler.observer = self.metrics  # warm-up requests are not counted
        self.ready = True

    def warm_up(self, timeout: float = 600.0) -> None:
        """Two short requests through the scheduler (prefill, batched decode, sampling), so the
        first client does not pay for first-call costs (on a GPU: kernel compilation). With a
        prefix cache, then one prompt of two whole blocks, twice in turn: the first stores
        its blocks and the second loads them, so the first shared prompt after start does not
        wait for those copies' first calls either (on a GPU, CuPy compiles them); the two
        blocks stay cached like any other."""
        done = threading.Semaphore(0)
        rules = StopRules(max_new_tokens=4, eos_ids=())

        def run(prompts) -> None:
            for seed, ids in enumerate(prompts):
                self.scheduler.submit(Request(ids, SamplingParams(temperature=1.0, seed=seed), rules,
                                              lambda e: done.release() if isinstance(e, (Finished, Failed)) else None))
            for _ in prompts:
                if not done.acquire(timeout=timeout):
                    raise RuntimeError("warm-up did not finish")

        hello = self.llm.prompt_ids("Hello")
        run([hello, hello])
        prefix = self.scheduler.prefix
        if prefix is not None:
            ids = (list(hello) * (2 * prefix.block // max(len(hello), 1) + 2))[:2 * prefix.block + 1]
            run([ids])
            run([ids])

    def stop(self) -> None:
        self.ready = False
        self.scheduler.stop()

    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app):
            yield
            self.stop()  # after uvicorn has let in-flight streams finish (or cancelled them)
            print("tinyllm.serve: stopped", file=sys.stderr, flush=True)

        async def http_error(request, exc):  # 404, 405, ... in OpenAI's error format too
            error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
            return JSONResponse(error.body(), status_code=exc.status_code)

        return Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
        ], middleware=middleware(self.api_key, self.cors_origins, on_error=self.metrics.request),
            exception_handlers={HTTPException: http_error}, lifespan=lifespan)

    # ---- small endpoints -----------------------------------------------------------------------
    async def health(self, request):
        failure = getattr(self.scheduler, "failure", None)  # an engine process that ended
        if failure is not None:
            return JSONResponse({"status": "failed", "error": failure}, status_code=503)
        if not self.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.model_id, "running": self.scheduler.batch_size,
                             "waiting": self.scheduler.queue_depth})

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "tinyllm",
                "max_model_len": self.max_context}

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request):
        try:
            self.validator.check_model({"model": request.path_params["model_id"]})
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return JSONResponse(self.model_card())

    async def metrics_endpoint(self, request):
        try:
            text = await anyio.to_thread.run_sync(self.metrics.text)  # (an engine process's: a round trip)
        except SchedulerStopped as e:  # the engine process that keeps them has ended
            return JSONResponse(APIError(503, str(e), type="server_error", code="engine_failed").body(), status_code=503)
        return Response(text, media_type=self.metrics.content_type)

    # ---- generation endpoints ------------------------------------------------------------------
    async def completions(self, request):
        return await self._generate(request, "completion")

    async def chat_completions(self, request):
        return await self._generate(request, "chat")

    def job(self, raw: bytes, kind: str) -> Job:
        """Bytes -> a validated, tokenized job: CPU work, run in a worker thread."""
        return self.validator.job(parse_body(raw, self.limits), kind)

    async def _generate(self, request, kind: str):
        endpoint = request.url.path
        try:
            raw = await read_body(request, self.limits)
            # (a schema to compile may take long: such a body goes to a worker thread, whatever its size)
            if len(raw) <= INLINE_BODY_BYTES and b"response_format" not in raw:
                job = self.job(raw, kind)
            else:
                job = await anyio.to_thread.run_sync(self.job, raw, kind)
            events = Events()
            loop = asyncio.get_running_loop()
            outbox = self._outboxes.get(loop)
            if outbox is None:
                outbox = self._outboxes[loop] = Outbox(loop)

            def emitter(index):
                def emit(event):  # called from the scheduler thread
                    outbox.post(events, (index, event))
                return emit

            reqs = [Request(job.prompts[p], sampling, job.rules, emitter(i), prompt_logprobs=job.prompt_logprobs)
                    for i, (p, sampling) in enumerate(job.choices)]
            try:
                for req in reqs:
                    self.scheduler.submit(req)
            except (QueueFull, SchedulerStopped) as e:
                for req in reqs:  # all the choices or none
                    self.scheduler.cancel(req)
                if isinstance(e, QueueFull):
                    raise APIError(503, str(e), None, type="server_busy", code="queue_full") from None
                if getattr(self.scheduler, "failure", None) is not None:  # an engine process that ended
                    raise APIError(503, str(e), None, type="server_error", code="engine_failed") from None
                raise APIError(503, str(e), None, type="server_shutting_down") from None
        except APIError as e:
            self.metrics.request(endpoint, e.status)
            return JSONResponse(e.body(), status_code=e.status)
        self.metrics.request(endpoint, 200)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        choices = [Choice(i, p) for i, (p, _) in enumerate(job.choices)]
        if job.stream:
            return StreamingResponse(self._sse(request, reqs, choices, events, job, rid),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._complete(request, reqs, choices, events, job, rid)

    # ---- answers -------------------------------------------------------------------------------
    async def _next_events(self, events: asyncio.Queue) -> list | None:
        """Every (choice index, event) the scheduler has sent and this request has not taken:
        at least one, waiting for it if need be; None when the client went away first
        (`_watch_disconnect` puts None in the queue)."""
        burst = [await events.get()]
        while not events.empty():
            burst.append(events.get_nowait())
        return None if None in burst else burst

    def _cancel_unfinished(self, reqs, choices) -> None:
        for req, choice in zip(reqs, choices):
            if choice.finished is None:
                self.scheduler.cancel(req)  # client gone, a sibling failed, or this task cancelled

    async def _complete(self, request, reqs, choices: list[Choice], events, job: Job, rid: str):
        """A non-streamed answer: wait for every choice's end, then one JSON body."""
        disconnect = asyncio.ensure_future(_watch_disconnect(request, events))
        failed = burst = None
        try:
            while failed is None and any(c.finished is None for c in choices):
                burst = await self._next_events(events)
                if burst is None:
                    break
                for index, event in burst:
                    choice = choices[index]
                    if isinstance(event, Failed):
                        failed = event
                        break
                    if isinstance(event, Finished):
                        choice.finished = event
                    elif isinstance(event, PromptLogprobs):
                        choice.prompt_logprobs = event.logprobs
                    else:
                        choice.text.append(event.text)
                        if event.logprob is not None:
                            choice.logprobs.append(event.logprob)
        finally:
            disconnect.cancel()
            self._cancel_unfinished(reqs, choices)
        if burst is None:
            return JSONResponse({}, status_code=499)  # nobody reads it
        if failed is not None:
            return JSONResponse(APIError(500, failed.message, type="server_error").body(), status_code=500)
        answer = completion(job, rid, self.model_id, self.fingerprint, choices, self.logprobs)
        note_tokens(request.scope, answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"])
        return JSONResponse(answer)

    async def _sse(self, request, reqs, choices: list[Choice], events, job: Job, rid: str):
        """A streamed answer: one `data:` event per piece of text, then each choice's finish,
        then [DONE]. The status line is sent before the first event, so a failure after it is
        told as an error event: the client still reads a well-formed stream to its end."""
        chunks = Chunks(job, rid, self.model_id, self.fingerprint, self.logprobs)
        disconnect = asyncio.ensure_future(_watch_disconnect(request, events))
        self.open_streams += 1
        try:
            opening = []
            for c in choices:
                if chunks.chat:
                    opening.append(sse_line(chunks.text(None, first=True, index=c.index)))
                elif job.echo and job.prompt_logprobs is None:  # else with the prompt's logprobs, below
                    opening.append(sse_line(chunks.text(job.prompt_texts[c.prompt], index=c.index)))
            if opening:
                yield "".join(opening)
            failed = False
            loop, written = asyncio.get_running_loop(), None
            while not failed and any(c.finished is None for c in choices):
                burst = await self._next_events(events)
                if burst is None:  # the client disconnected
                    return
                interval = self.open_streams * WRITE_SPACING if self.stream_interval is None else self.stream_interval
                if written is not None and interval > 0:
                    burst = await gather_until(events, burst, written + interval)
                    if burst is None:
                        return
                lines = []
                for index, event in burst:
                    choice = choices[index]
                    if isinstance(event, Failed):
                        lines.append(sse_line(APIError(500, event.message, type="server_error").body()))
                        failed = True
                        break
                    if isinstance(event, Finished):
                        choice.finished = event
                        lines.append(sse_line(chunks.finish(event, job.return_token_ids, index)))
                    elif isinstance(event, PromptLogprobs):
                        lines.append(sse_line(chunks.text(job.prompt_texts[choice.prompt], index=index,
                                                          entries=event.logprobs, ids=job.prompts[choice.prompt])))
                    elif event.logprob is not None:
                        lines.append(sse_line(chunks.text(event.text, index=index, entries=[event.logprob])))
                    elif event.text:
                        lines.append(chunks.piece(event.text, index))
                if lines:
                    yield "".join(lines)  # one send for the burst
                    written = loop.time()
            finished = [c.finished for c in choices]
            if all(finished):
                note_tokens(request.scope, sum(len(ids) for ids in job.prompts),
                            sum(e.completion_tokens for e in finished))
                if job.include_usage:
                    yield sse_line(chunks.usage(finished))
            yield SSE_DONE
        except Exception:
            request_id = request.scope.get("state", {}).get("request_id")
            log.exception("request %s: %s failed while streaming", request_id, request.url.path)
            yield sse_line(APIError(500, f"internal server error (request id {request_id})", type="server_error",
                                    code="internal_error").body())
            yield SSE_DONE
        finally:
            # Runs on normal end, on disconnect, and when the server cancels this task.
            self.open_streams -= 1
            disconnect.cancel()
            self._cancel_unfinished(reqs, choices)


def fingerprint(llm) -> str:
    """What produced the tokens: tinyllm's version, the checkpoint, device, dtype and step."""
    model = llm.model
    what = f"tinyllm {version()} {llm.path} {model.device.name} {model.dtype} {llm.step.name}"
    return "fp_" + hashlib.sha256(what.encode()).hexdigest()[:12]


class Events(asyncio.Queue):
    """A request's queue of (choice index, event) pairs from the scheduler (None: the client went
    away), which a stream can sleep on until a deadline, woken early by an end, a failure or
    the client's leaving (`nap`)."""

    def __init__(self):
        super().__init__()
        self._nap: asyncio.Future | None = None

    def put_nowait(self, item) -> None:
        super().put_nowait(item)
        if self._nap is not None and _ends(item):
            _wake(self._nap)

    async def nap(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        self._nap = loop.create_future()
        timer = loop.call_at(deadline, _wake, self._nap)
        try:
            await self._nap
        finally:
            timer.cancel()
            self._nap = None


def _ends(item) -> bool:
    """Whether a queue item ends the stream's wait: the client gone (None), an end or a failure."""
    return item is None or isinstance(item[1], (Finished, Failed))


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


async def gather_until(events: Events, burst: list, deadline: float) -> list | None:
    """`burst` and the events that reach the queue until `deadline` (loop time), or until an end
    arrives: a stream is written at most once per interval, because each write costs the event
    loop, which shares the interpreter with the scheduler, about as much as scheduling a
    token. None when the client went away."""
    if deadline > asyncio.get_running_loop().time() and not any(map(_ends, burst)):
        await events.nap(deadline)
        while not events.empty():
            burst.append(events.get_nowait())
    return None if None in burst else burst


async def _watch_disconnect(request, events: asyncio.Queue) -> None:
    """Puts None in the request's event queue when the client closes the connection (the
    body has been read already), so that one wait serves both."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            events.put_nowait(None)
            return


class Outbox:
    """Events from the scheduler thread to one event loop's queues, with one wake-up of the
    loop per burst: `post` wakes the loop only when no delivery is already due, so a step's
    events for many streams (posted while the scheduler holds the interpreter) cross
    together, and the loop is not woken per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: collections.deque = collections.deque()
        self._due = False

    def post(self, queue: asyncio.Queue, item) -> None:
        """(Any thread.) `queue.put_nowait(item)`, on the loop, soon."""
        with self._lock:
            self._items.append((queue, item))
            if self._due:
                return
            self._due = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            pass

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._due = self._items, collections.deque(), False
        for queue, item in items:
            queue.put_nowait(item)
