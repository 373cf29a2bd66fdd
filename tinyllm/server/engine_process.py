"""The engine in a process of its own: the model and its scheduler in one process, HTTP in another.

In one process the scheduler thread and the event loop take turns for one interpreter lock.
With many streams that is what sets the pace: the GPU's step for 64 sequences is shorter
than the host's work around it (scheduling, detokenizing, and the event loop framing and
writing 64 streams), and each time the scheduler lets go of the lock (to wait for the GPU)
it waits for the event loop to hand it back. Here the two sides have a lock each:

    HTTP process (uvicorn, Starlette, validation, SSE)     engine process (Scheduler, step, GPU)
    EngineProcess.submit / cancel ──── ("submit", ...) ───►  a reader thread: Scheduler.submit
                                                              the scheduler thread: rounds
    a reader thread: request.emit(event) ◄── ("events", ...)  one message per round: every event
                                                              the round emitted, its metrics calls,
                                                              and the queue's and caches' state

`EngineProcess` is what the HTTP side's `Server` holds in place of a `Scheduler`: the same
`submit`, `cancel`, `start`, `stop`, `queue_depth`, `batch_size`, `observer`, `prefix` and
`rows` (the last two read-only views of the engine's caches, for /metrics), and `llm`, the
loaded model's tokenizer, configuration and names without its weights (what validation,
tokenization and the chat template need). A request's tokens do not change: the same
scheduler runs the same steps; only its events cross a pipe, a round's events in one message.

- The HTTP side counts the requests it has sent and not yet seen end, and refuses one
  beyond `max_batch + max_queue` at once (QueueFull, the 503), as the scheduler would: it
  sees an end only after the engine has sent it, so it never holds fewer than the engine.
- A JSON grammar (`response_format`) crosses as its text and is compiled again against the
  engine's own view of the vocabulary (llguidance's objects stay in their process).
- The engine ignores SIGINT and SIGTERM: a terminal's Ctrl-C reaches every process of its
  group, and the in-flight streams the HTTP side lets finish at shutdown still need the
  engine. It stops when told to, or when the HTTP process is gone (its end of the pipe closes).
- An engine process that dies ends every request in flight with a `Failed` event, refuses new
  ones (SchedulerStopped: a 503), and /health says so.
"""
from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path

from ..engine import LLM
from ..errors import TinyLLMError, one_line
from ..scheduler import Failed, Finished, Observer, QueueFull, Request, Scheduler, SchedulerStopped

START_TIMEOUT = 1800.0  # seconds for the engine to load its model (an 8B checkpoint from a slow disk)


class EngineProcessError(TinyLLMError, RuntimeError):
    """The engine process could not start, or ended."""


# ---- what the HTTP side sees of the engine ----------------------------------------------------

class ModelInfo:
    """The loaded model as the HTTP side needs it: its configuration, dtype and device name."""

    def __init__(self, config, dtype, device_name: str):
        self.config, self.dtype, self.device = config, dtype, DeviceInfo(device_name)


class DeviceInfo:
    def __init__(self, name: str):
        self.name = name


class StepInfo:
    def __init__(self, name: str):
        self.name = name


class PrefixView:
    """The engine's prefix cache as /metrics reads it (prefix.PrefixCache's counters), as of the
    engine's last message."""

    def __init__(self, block: int, budget: int):
        self.block, self.budget = block, budget
        self.n_blocks = self.bytes = self.stored = self.evicted = self.store_failures = 0

    def __len__(self) -> int:
        return self.n_blocks

    def update(self, state) -> None:
        self.n_blocks, self.bytes, self.stored, self.evicted, self.store_failures = state


class PoolView:
    """The engine's paged KV cache as /metrics reads it (kv_cache.BlockPool's counts)."""

    def __init__(self, n_blocks: int, block: int, block_bytes: int):
        self.n_blocks, self.block, self.block_bytes, self.free_blocks = n_blocks, block, block_bytes, n_blocks


class RowsView:
    """The engine's batch (step.py's `batch`): its class's name, capacity and pool."""

    def __init__(self, kind: str, capacity: int, pool: PoolView | None):
        self.kind, self.capacity, self.pool = kind, capacity, pool


def _prefix_state(prefix) -> tuple:
    return len(prefix), prefix.bytes, prefix.stored, prefix.evicted, prefix.store_failures


# ---- the engine process -----------------------------------------------------------------------

class _RelayScheduler(Scheduler):
    """The engine's scheduler: each round's events and metrics calls go out as one message."""

    def __init__(self, *args, send, **kwargs):
        super().__init__(*args, **kwargs)
        self._send = send
        self._out: list = []            # (request id, event) or (None, (observer method, args))
        self._out_lock = threading.Lock()

    def post(self, item) -> None:
        with self._out_lock:
            self._out.append(item)

    def flush(self) -> None:
        """Send what the round emitted, with the state /metrics reads (one message, or none).
        Taken and sent under one lock: two threads flush (the scheduler's, and the reader's
        for a request it refused or dropped), and a request's events must arrive in order."""
        with self._out_lock:
            items, self._out = self._out, []
            if not items:
                return
            pool = getattr(self.rows, "pool", None)
            state = (len(self.waiting) + len(self.preempted), len(self.running),
                     None if self.prefix is None else _prefix_state(self.prefix),
                     None if pool is None else pool.free_blocks)
            self._send(("events", state, items))

    def run_once(self) -> None:
        try:
            super().run_once()
        finally:
            self.flush()

    def close(self) -> None:
        super().close()
        self.flush()


class _RelayObserver(Observer):
    """Observer calls, queued beside the events: the HTTP side's metrics make them there."""

    def __init__(self, post):
        self.post = post

    def _relay(self, name: str, *args) -> None:
        self.post((None, (name, args)))

    def first_token(self, seconds):
        self._relay("first_token", seconds)

    def token_gaps(self, seconds):
        self._relay("token_gaps", seconds)

    def step(self, batch_size):
        self._relay("step", batch_size)

    def step_time(self, host, model):
        self._relay("step_time", host, model)

    def prompt(self, reused, computed):
        self._relay("prompt", reused, computed)

    def preempted(self):
        self._relay("preempted")

    def finished(self, event):
        self._relay("finished", event)


def _engine_main(conn, factory, factory_args: tuple, options: dict, tracer=None) -> None:
    """The engine process: load the model, run its scheduler, relay requests and events."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the HTTP side decides when the engine stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from .app import SWITCH_INTERVAL, build_scheduler

    send_lock = threading.Lock()

    def send(message) -> None:
        with send_lock:
            conn.send(message)

    try:
        llm = factory(*factory_args)
        scheduler = build_scheduler(llm, scheduler_class=_RelayScheduler, send=send, **options)
        grammars = None
        model = llm.model
        pool = getattr(scheduler.rows, "pool", None)
        prefix = scheduler.prefix
        info = {"tokenizer": llm.tokenizer, "config": model.config, "dtype": model.dtype,
                "device": model.device.name, "step": llm.step.name, "path": str(llm.path),
                "load_seconds": llm.load_seconds, "batch": type(scheduler.rows).__name__,
                "capacity": scheduler.rows.capacity,
                "pool": None if pool is None else (pool.n_blocks, pool.block, pool.block_bytes),
                "prefix": None if prefix is None else (prefix.block, prefix.budget), "pid": os.getpid()}
    except BaseException as e:  # noqa: BLE001 — every failure is reported, as one line if it is the user's
        send(("error", _picklable(e)))
        return
    scheduler.observer = _RelayObserver(scheduler.post)
    traced = None if tracer is None else tracer(scheduler)
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
    scheduler.start()
    send(("ready", info))
    requests: dict[int, Request] = {}
    stop_timeout = 10.0
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the HTTP process is gone
                break
            kind = message[0]
            if kind == "submit":
                _, rid, prompt_ids, sampling, grammar, rules, prompt_logprobs, arrived = message
                try:
                    if grammar is not None:  # compiled again against this process's vocabulary
                        if grammars is None:
                            from ..constrain import Grammars
                            grammars = Grammars(llm.tokenizer, llm.config.vocab_size)
                        sampling = dataclasses.replace(sampling, grammar=grammars.compiled(grammar))
                    request = Request(prompt_ids, sampling, rules, _relay(scheduler, requests, rid),
                                      arrived=arrived, prompt_logprobs=prompt_logprobs)
                    requests[rid] = request
                    scheduler.submit(request)
                except Exception as e:  # noqa: BLE001 — refused here: the request alone ends
                    requests.pop(rid, None)
                    scheduler.post((rid, Failed(f"{type(e).__name__}: {e}")))
                    scheduler.flush()
            elif kind == "cancel":
                request = requests.get(message[1])
                if request is not None and scheduler.cancel(request):  # it was waiting: no event will end it
                    requests.pop(message[1], None)
                    scheduler.post((message[1], None))
                    scheduler.flush()
            elif kind == "trace":  # a benchmark's tracer: one of its methods, the result sent back
                send(("trace", None if traced is None else getattr(traced, message[1])()))
            elif kind == "stop":
                stop_timeout = message[1]
                break
    finally:
        scheduler.stop(timeout=stop_timeout)
        try:
            send(("stopped",))
        except (OSError, ValueError):
            pass


def _relay(scheduler: _RelayScheduler, requests: dict, rid: int):
    def emit(event) -> None:  # the scheduler thread
        if isinstance(event, (Finished, Failed)):
            requests.pop(rid, None)
        scheduler.post((rid, event))
    return emit


def _picklable(error: BaseException):
    """The error itself where it crosses a pipe, else a RuntimeError with its one line."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return EngineProcessError(f"{type(error).__name__}: {one_line(error)}")


# ---- the HTTP side's handle on it -------------------------------------------------------------

class EngineProcess:
    """The scheduler of a model loaded in a process of its own (see the module's docstring).

    factory(*factory_args) -> LLM runs in the new process (tinyllm.load and its arguments, or
    any picklable function that builds one); options: build_scheduler's (max_batch,
    max_queue, max_context, prefix_cache_mb, kv_cache_mb). The constructor returns once the
    model is loaded; a failure to load is raised here (as the error the engine raised).
    tracer (benchmarks): a picklable callable that the engine calls with its scheduler once
    it is built; `trace(method)` then calls that method of what it returned, in the engine,
    and returns its result."""

    def __init__(self, factory, factory_args: tuple = (), *, max_batch: int = 16, max_queue: int = 64,
                 timeout: float = START_TIMEOUT, tracer=None, **options):
        self.max_batch, self.max_queue = max_batch, max_queue
        options.update(max_batch=max_batch, max_queue=max_queue)
        ctx = multiprocessing.get_context("spawn")  # a CUDA context does not survive a fork
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_engine_main, args=(child, factory, factory_args, options, tracer),
                                   name="tinyllm-engine", daemon=True)
        self.process.start()
        child.close()
        message = self._first_message(timeout)
        if message[0] == "error":
            self.process.join(10)
            raise message[1]
        info = message[1]
        self.pid = info["pid"]
        model = ModelInfo(info["config"], info["dtype"], info["device"])
        self.llm = LLM(model, info["tokenizer"], Path(info["path"]), info["load_seconds"], StepInfo(info["step"]))
        pool = None if info["pool"] is None else PoolView(*info["pool"])
        self.rows = RowsView(info["batch"], info["capacity"], pool)
        self.prefix = None if info["prefix"] is None else PrefixView(*info["prefix"])
        self.observer = Observer()
        self.failure: str | None = None    # why the engine ended, once it has
        self.preemptions = 0                # as Scheduler.preemptions
        self._queue_depth = self._batch_size = 0
        self._ids = itertools.count()
        self._requests: dict[int, Request] = {}   # sent, not yet ended
        self._rids: dict[Request, int] = {}       # request -> its id (a Request hashes by identity)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._stopping = False
        self._traces: queue.SimpleQueue = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, name="tinyllm-engine-events", daemon=True)
        self._reader.start()

    def _first_message(self, timeout: float):
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.2):
            if not self.process.is_alive():
                raise EngineProcessError(f"the engine process ended while loading the model "
                                         f"(exit code {self.process.exitcode})")
            if time.monotonic() > deadline:
                self.process.kill()
                raise EngineProcessError(f"the engine process did not load its model within {timeout:g} s")
        try:
            return self._conn.recv()
        except EOFError:
            self.process.join(10)
            raise EngineProcessError(f"the engine process ended while loading the model "
                                     f"(exit code {self.process.exitcode})") from None

    # ---- the Scheduler's interface --------------------------------------------------------------
    def start(self) -> "EngineProcess":
        return self  # the engine's scheduler runs from the start

    @property
    def queue_depth(self) -> int:
        return self._queue_depth

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def submit(self, request: Request) -> None:
        sampling, grammar = request.sampling, None
        if sampling.grammar is not None:  # its text crosses; llguidance's objects do not
            sampling, grammar = dataclasses.replace(sampling, grammar=None), sampling.grammar.grammar
        with self._lock:
            if self._stopping or self.failure is not None:
                raise SchedulerStopped(self.failure or "the server is shutting down")
            if len(self._requests) >= self.max_batch + self.max_queue:
                raise QueueFull(f"server busy: {len(self._requests)} requests running or waiting "
                                f"(--max-batch {self.max_batch} + --max-queue {self.max_queue}); retry later")
            rid = next(self._ids)
            self._requests[rid] = request
            self._rids[request] = rid
        self._send(("submit", rid, list(request.prompt_ids), sampling, grammar, request.rules,
                    request.prompt_logprobs, request.arrived))

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self._lock:
            rid = self._rids.get(request)
        if rid is not None:
            self._send(("cancel", rid))

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests; the engine fails the waiting ones and cancels the running ones
        (their events still arrive), then ends."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._send(("stop", timeout))
        self.process.join(timeout + 10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)
        self._reader.join(10)
        self._conn.close()

    def trace(self, method: str, timeout: float = 60.0):
        """The result of the engine's tracer's `method()` (see the class's docstring)."""
        self._send(("trace", method))
        return self._traces.get(timeout=timeout)

    # ---- the pipe ----------------------------------------------------------------------------------
    def _send(self, message) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):  # the engine is gone: the reader fails what was in flight
            pass

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "stopped":
                break
            if message[0] == "trace":
                self._traces.put(message[1])
                continue
            _, state, items = message
            self._queue_depth, self._batch_size, prefix, free = state
            if prefix is not None and self.prefix is not None:
                self.prefix.update(prefix)
            if free is not None and self.rows.pool is not None:
                self.rows.pool.free_blocks = free
            for rid, event in items:  # (id, None): a request left the queue before it ran
                if rid is None:
                    name, args = event
                    if name == "preempted":
                        self.preemptions += 1
                    getattr(self.observer, name)(*args)
                    continue
                with self._lock:
                    request = self._requests.get(rid)
                    if event is None or isinstance(event, (Finished, Failed)):
                        self._requests.pop(rid, None)
                        self._rids.pop(request, None)
                if request is not None and event is not None:
                    _deliver(request, event)
        self._ended()

    def _ended(self) -> None:
        """The engine is gone: every request still in flight ends with a Failed event."""
        self.process.join(10 if self._stopping else 1)
        code = self.process.exitcode
        with self._lock:
            if not self._stopping:
                self.failure = f"the engine process ended (exit code {code})"
            requests, self._requests, self._rids = list(self._requests.values()), {}, {}
            self._batch_size = self._queue_depth = 0
        for request in requests:
            _deliver(request, Failed(self.failure or "the server is shutting down"))


def _deliver(request: Request, event) -> None:
    try:
        request.emit(event)
    except Exception:  # noqa: BLE001 — one request's callback must not stop the others' events
        pass
