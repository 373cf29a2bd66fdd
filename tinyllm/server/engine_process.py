"""The engine in a process of its own: the model and its scheduler in one process, HTTP in others.

In one process the scheduler thread and the event loop take turns for one interpreter lock.
With many streams that is what sets the pace: the GPU's step for 64 sequences is shorter
than the host's work around it (scheduling, detokenizing, and the event loop framing and
writing 64 streams), and each time the scheduler lets go of the lock (to wait for the GPU)
it waits for the event loop to hand it back. Here the two sides have a lock each:

    HTTP process k (uvicorn, Starlette, validation, SSE)   engine process (Scheduler, step, GPU)
    EngineClient.submit / cancel ─── ("submit", ...) ───►  a reader thread per pipe: Scheduler.submit
                                                            the scheduler thread: rounds
    a reader thread: request.emit(event) ◄── ("events", ...)  one message per round and HTTP
                                                            process: its requests' events of the
                                                            round, and the queue's state

`EngineClient` is what an HTTP process's `Server` holds in place of a `Scheduler`: the same
`submit`, `cancel`, `start`, `stop`, `queue_depth`, `batch_size`, `observer`, `prefix` and
`rows` (read-only descriptions of the engine's caches), and `llm`, the loaded model's
tokenizer, configuration and names without its weights (what validation, tokenization and
the chat template need). `EngineProcess` is the first HTTP process's: it starts the engine
and holds the pipes of the others (--http-processes: each the same app on the same listening
socket, main.start_http_workers). A request's tokens do not change: the same scheduler runs
the same steps; only its events cross a pipe, a round's events in one message.

- The metrics live in the engine, with the scheduler that reports them (metrics.Metrics):
  each HTTP process sends it the endpoint and status of each answer, and /metrics asks the
  engine for its text, so every HTTP process reports the same figures.
- Each HTTP process counts the requests it has sent and not yet seen end, and from each
  engine message the others', and refuses one beyond `max_batch + max_queue` (QueueFull, the
  503), as the scheduler would; the engine's queue has room for those that cross meanwhile.
- A JSON grammar (`response_format`) crosses as its text and is compiled again against the
  engine's own view of the vocabulary (llguidance's objects stay in their process).
- The engine ignores SIGINT and SIGTERM: a terminal's Ctrl-C reaches every process of its
  group, and the in-flight streams the HTTP side lets finish at shutdown still need the
  engine. It stops when the first HTTP process tells it to (after the others have ended), or
  when that process is gone (its end of the pipe closes); another HTTP process that goes
  away has its requests cancelled.
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
from ..scheduler import Failed, Finished, QueueFull, Request, Scheduler, SchedulerStopped

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
    """The engine's prefix cache as the HTTP side needs it (its block size, for the warm-up)."""

    def __init__(self, block: int, budget: int):
        self.block, self.budget = block, budget


class PoolView:
    """The engine's paged KV cache: its size (kv_cache.BlockPool's)."""

    def __init__(self, n_blocks: int, block: int, block_bytes: int):
        self.n_blocks, self.block, self.block_bytes = n_blocks, block, block_bytes


class RowsView:
    """The engine's batch (step.py's `batch`): its class's name, capacity and paged cache."""

    def __init__(self, kind: str, capacity: int, pool: PoolView | None):
        self.kind, self.capacity, self.pool = kind, capacity, pool


# ---- the engine process -----------------------------------------------------------------------

class _RelayScheduler(Scheduler):
    """The engine's scheduler: each round's events go out as one message per HTTP process."""

    def __init__(self, *args, send, processes: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self._send = send               # send(k, message): to HTTP process k
        self._out: list = []            # ((k, request id), event)
        self._out_lock = threading.Lock()
        self.in_flight = [0] * processes  # per HTTP process: its requests submitted and not ended

    def post(self, item) -> None:
        with self._out_lock:
            self._out.append(item)

    def flush(self) -> None:
        """Send what the round emitted: to each HTTP process its requests' events, and to every
        one the state /health and the request limit read (one message each, or none when the
        round emitted nothing). Taken and sent under one lock: several threads flush (the
        scheduler's, and a reader's for a request it refused or dropped), and a request's
        events must arrive in order."""
        with self._out_lock:
            items, self._out = self._out, []
            if not items:
                return
            by_process: dict[int, list] = {}
            for (k, rid), event in items:
                by_process.setdefault(k, []).append((rid, event))
            state = self.state()  # to every HTTP process: each counts the others' requests
            for k in range(len(self.in_flight)):
                self._send(k, ("events", state, by_process.get(k, [])))

    def state(self) -> tuple:
        """(waiting, running, requests in flight per HTTP process, preemptions)."""
        return (len(self.waiting) + len(self.preempted), len(self.running), tuple(self.in_flight),
                self.preemptions)

    def run_once(self) -> None:
        try:
            super().run_once()
        finally:
            self.flush()

    def close(self) -> None:
        super().close()
        self.flush()


def _engine_main(conns: list, factory, factory_args: tuple, options: dict, tracer=None) -> None:
    """The engine process: load the model, run its scheduler, relay requests and events. conns:
    one pipe per HTTP process, the first the process that started this one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the HTTP side decides when the engine stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from .app import SWITCH_INTERVAL, build_scheduler
    from .metrics import Metrics

    send_locks = [threading.Lock() for _ in conns]

    def send(k: int, message) -> None:
        try:
            with send_locks[k]:
                conns[k].send(message)
        except (OSError, ValueError):  # that HTTP process is gone; its reader cancels its requests
            pass

    try:
        llm = factory(*factory_args)
        scheduler = build_scheduler(llm, scheduler_class=_RelayScheduler, send=send, processes=len(conns),
                                    **options)
        metrics = Metrics(scheduler)
        model = llm.model
        prefix = scheduler.prefix
        pool = getattr(scheduler.rows, "pool", None)
        info = {"tokenizer": llm.tokenizer, "config": model.config, "dtype": model.dtype,
                "device": model.device.name, "step": llm.step.name, "path": str(llm.path),
                "load_seconds": llm.load_seconds, "batch": type(scheduler.rows).__name__,
                "capacity": scheduler.rows.capacity,
                "pool": None if pool is None else (pool.n_blocks, pool.block, pool.block_bytes),
                "prefix": None if prefix is None else (prefix.block, prefix.budget), "pid": os.getpid()}
    except BaseException as e:  # noqa: BLE001 — every failure is reported, as one line if it is the user's
        send(0, ("error", _picklable(e)))
        return
    traced = None if tracer is None else tracer(scheduler)
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
    scheduler.start()
    requests: dict[tuple, Request] = {}   # (HTTP process, its request id) -> the request
    requests_lock = threading.Lock()
    grammars = None  # built at the first JSON grammar

    def take(key) -> Request | None:  # a request that ended or left: no longer in flight
        with requests_lock:
            request = requests.pop(key, None)
            if request is not None:
                scheduler.in_flight[key[0]] -= 1
            return request

    def emitter(key):
        def emit(event) -> None:  # the scheduler thread
            if isinstance(event, (Finished, Failed)):
                take(key)
            scheduler.post((key, event))
        return emit

    def submit(k: int, message) -> None:
        nonlocal grammars
        _, rid, prompt_ids, sampling, grammar, rules, prompt_logprobs, arrived = message
        key = (k, rid)
        try:
            if grammar is not None:  # compiled again against this process's vocabulary
                with requests_lock:
                    if grammars is None:
                        from ..constrain import Grammars
                        grammars = Grammars(llm.tokenizer, llm.config.vocab_size)
                sampling = dataclasses.replace(sampling, grammar=grammars.compiled(grammar))
            request = Request(prompt_ids, sampling, rules, emitter(key), arrived=arrived,
                              prompt_logprobs=prompt_logprobs)
            with requests_lock:
                requests[key] = request
                scheduler.in_flight[k] += 1
            scheduler.submit(request)
        except Exception as e:  # noqa: BLE001 — refused here: the request alone ends
            take(key)
            scheduler.post((key, Failed(f"{type(e).__name__}: {e}")))
            scheduler.flush()

    def serve(k: int) -> float | None:
        """HTTP process k's messages, until its pipe closes or, from the first, a stop (its
        timeout returned)."""
        conn = conns[k]
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # that HTTP process is gone
                break
            kind = message[0]
            if kind == "submit":
                submit(k, message)
            elif kind == "cancel":
                key = (k, message[1])
                with requests_lock:
                    request = requests.get(key)
                if request is not None and scheduler.cancel(request):  # it was waiting: no event will end it
                    take(key)
                    scheduler.post((key, None))
                    scheduler.flush()
            elif kind == "request":  # an HTTP process counted an answer (endpoint, status)
                metrics.request(message[1], message[2])
            elif kind == "metrics":
                send(k, ("metrics", metrics.text()))
            elif kind == "observe":  # warmed up: from here on the scheduler's calls are counted
                scheduler.observer = metrics
            elif kind == "trace":  # a benchmark's tracer: one of its methods, the result sent back
                send(k, ("trace", None if traced is None else getattr(traced, message[1])()))
            elif kind == "stop" and k == 0:
                return message[1]
        if k == 0:
            return None
        with requests_lock:  # nobody reads these answers any more
            mine = [(key, r) for key, r in requests.items() if key[0] == k]
        for key, request in mine:
            if scheduler.cancel(request):  # it was waiting: no event will end it
                take(key)
        return None

    for k in range(1, len(conns)):
        threading.Thread(target=serve, args=(k,), name=f"tinyllm-http-{k}", daemon=True).start()
    send(0, ("ready", info))
    asked = None
    try:
        asked = serve(0)
    finally:
        scheduler.stop(timeout=10.0 if asked is None else asked)
        send(0, ("stopped",))


def _picklable(error: BaseException):
    """The error itself where it crosses a pipe, else a RuntimeError with its one line."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return EngineProcessError(f"{type(error).__name__}: {one_line(error)}")


# ---- the HTTP side's handle on it -------------------------------------------------------------

class EngineClient:
    """One HTTP process's handle on the engine (see the module's docstring): what its `Server`
    holds in place of a `Scheduler`. conn: its pipe to the engine; info: what the engine sent
    when it was ready; index: which of the engine's pipes this is (0: the process that started
    the engine, `EngineProcess`)."""

    def __init__(self, conn, info: dict, max_batch: int, max_queue: int, index: int = 0, process=None):
        self.max_batch, self.max_queue, self.index = max_batch, max_queue, index
        self.process = process
        self.info = info
        self.pid = info["pid"]
        model = ModelInfo(info["config"], info["dtype"], info["device"])
        self.llm = LLM(model, info["tokenizer"], Path(info["path"]), info["load_seconds"], StepInfo(info["step"]))
        self.rows = RowsView(info["batch"], info["capacity"], None if info["pool"] is None else PoolView(*info["pool"]))
        self.prefix = None if info["prefix"] is None else PrefixView(*info["prefix"])
        self.metrics = EngineMetrics(self)
        self.failure: str | None = None    # why the engine ended, once it has
        self.preemptions = 0                # as Scheduler.preemptions
        self._queue_depth = self._batch_size = 0
        self._others = 0                    # the other HTTP processes' requests in flight, as last told
        self._conn = conn
        self._ids = itertools.count()
        self._requests: dict[int, Request] = {}   # sent, not yet ended
        self._rids: dict[Request, int] = {}       # request -> its id (a Request hashes by identity)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._ask_lock = threading.Lock()
        self._stopping = False
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, name="tinyllm-engine-events", daemon=True)
        self._reader.start()

    # ---- the Scheduler's interface --------------------------------------------------------------
    def start(self) -> "EngineClient":
        return self  # the engine's scheduler runs from the start

    @property
    def observer(self):
        return self.metrics

    @observer.setter
    def observer(self, metrics) -> None:
        """Set once warmed up (Server.start): from then on the engine counts the scheduler's
        reports in its metrics (warm-up requests are not counted)."""
        if metrics is self.metrics:
            self._send(("observe",))

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
            held = len(self._requests) + self._others
            if held >= self.max_batch + self.max_queue:
                raise QueueFull(f"server busy: {held} requests running or waiting "
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
        """This process's pipe closes; the engine cancels the requests it sent (the process that
        started the engine stops it: EngineProcess.stop)."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._conn.close()
        self._reader.join(10)

    def trace(self, method: str, timeout: float = 60.0):
        """The result of the engine's tracer's `method()` (see EngineProcess)."""
        return self._ask(("trace", method), timeout)

    # ---- the pipe ----------------------------------------------------------------------------------
    def _send(self, message) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):  # the engine is gone: the reader fails what was in flight
            pass

    def _ask(self, message, timeout: float):
        """Send a question ("metrics", "trace") and wait for its answer; SchedulerStopped if the
        engine has ended or does not answer within `timeout` seconds."""
        with self._ask_lock:
            while not self._replies.empty():  # a late answer to one that timed out
                self._replies.get_nowait()
            if self.failure is not None or self._stopping:
                raise SchedulerStopped(self.failure or "the server is shutting down")
            self._send(message)
            try:
                reply = self._replies.get(timeout=timeout)
            except queue.Empty:
                raise SchedulerStopped(f"the engine process did not answer within {timeout:g} s") from None
            if reply is _GONE:
                raise SchedulerStopped(self.failure or "the server is shutting down")
            return reply

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "stopped":
                break
            if kind in ("trace", "metrics"):
                self._replies.put(message[1])
                continue
            _, state, items = message
            self._queue_depth, self._batch_size, in_flight, self.preemptions = state
            self._others = sum(in_flight) - in_flight[self.index]
            for rid, event in items:  # (id, None): a request left the queue before it ran
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
        code = None
        if self.process is not None:
            self.process.join(10 if self._stopping else 1)
            code = self.process.exitcode
        with self._lock:
            if not self._stopping:
                self.failure = "the engine process ended" + ("" if code is None else f" (exit code {code})")
            requests, self._requests, self._rids = list(self._requests.values()), {}, {}
            self._batch_size = self._queue_depth = 0
        self._replies.put(_GONE)  # a question waiting for its answer gets none
        for request in requests:
            _deliver(request, Failed(self.failure or "the server is shutting down"))


_GONE = object()  # in place of an answer: the engine has ended


class EngineMetrics:
    """The server's metrics, kept in the engine (one set for every HTTP process): this process's
    answers are counted there, and `text()` is the engine's exposition."""

    def __init__(self, client: EngineClient):
        from prometheus_client import CONTENT_TYPE_LATEST

        self.client = client
        self.content_type = CONTENT_TYPE_LATEST

    def request(self, endpoint: str, status: int) -> None:
        self.client._send(("request", endpoint, status))

    def text(self, timeout: float = 30.0) -> bytes:
        return self.client._ask(("metrics",), timeout)


class EngineProcess(EngineClient):
    """The scheduler of a model loaded in a process of its own (see the module's docstring), and
    this process's handle on it.

    factory(*factory_args) -> LLM runs in the new process (tinyllm.load and its arguments, or
    any picklable function that builds one); options: build_scheduler's (max_batch,
    max_queue, max_context, prefix_cache_mb, kv_cache_mb). The constructor returns once the
    model is loaded; a failure to load is raised here (as the error the engine raised).
    http_processes: how many HTTP processes will talk to the engine; this one and, for each
    other, a pipe in `pipes` to hand to it (`EngineClient(pipe, engine.info, ...)` there).
    tracer (benchmarks): a picklable callable that the engine calls with its scheduler once
    it is built; `trace(method)` then calls that method of what it returned, in the engine,
    and returns its result."""

    def __init__(self, factory, factory_args: tuple = (), *, max_batch: int = 16, max_queue: int = 64,
                 timeout: float = START_TIMEOUT, tracer=None, http_processes: int = 1, **options):
        # Each HTTP process refuses a request beyond max_batch + max_queue counting its own
        # and the others' as of the engine's last message; the engine's queue takes the slack
        # of requests that crossed meanwhile.
        options.update(max_batch=max_batch, max_queue=max_queue + (http_processes - 1) * (max_batch + max_queue))
        ctx = multiprocessing.get_context("spawn")  # a CUDA context does not survive a fork
        pipes = [ctx.Pipe() for _ in range(http_processes)]
        process = ctx.Process(target=_engine_main, args=([child for _, child in pipes], factory, factory_args,
                                                         options, tracer),
                              name="tinyllm-engine", daemon=True)
        process.start()
        for _, child in pipes:
            child.close()
        conn = pipes[0][0]
        message = self._first_message(conn, process, timeout)
        if message[0] == "error":
            process.join(10)
            raise message[1]
        self.pipes = [parent for parent, _ in pipes[1:]]
        self.helpers: list = []  # the other HTTP processes, once started (main.start_http_workers)
        # closed by stop() or with this process: they shut down as on a signal (their streams finish)
        self.helpers_stop, self._helpers_go = ctx.Pipe(duplex=False)
        super().__init__(conn, message[1], max_batch, max_queue, 0, process)

    @staticmethod
    def _first_message(conn, process, timeout: float):
        deadline = time.monotonic() + timeout
        while not conn.poll(0.2):
            if not process.is_alive():
                raise EngineProcessError(f"the engine process ended while loading the model "
                                         f"(exit code {process.exitcode})")
            if time.monotonic() > deadline:
                process.kill()
                raise EngineProcessError(f"the engine process did not load its model within {timeout:g} s")
        try:
            return conn.recv()
        except EOFError:
            process.join(10)
            raise EngineProcessError(f"the engine process ended while loading the model "
                                     f"(exit code {process.exitcode})") from None

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests; the other HTTP processes end (their streams in flight finish
        first, within `timeout`); the engine fails the waiting requests and cancels the running
        ones (their events still arrive), then ends."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._helpers_go.close()
        for helper in self.helpers:
            helper.join(timeout + 10)
            if helper.is_alive():
                helper.kill()
                helper.join(10)
        self._send(("stop", timeout))
        self.process.join(timeout + 10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)
        self._reader.join(10)
        self._conn.close()


def _deliver(request: Request, event) -> None:
    try:
        request.emit(event)
    except Exception:  # noqa: BLE001 — one request's callback must not stop the others' events
        pass
