"""The server on a GPU: total tokens/s with 1, 4, 8 and 16 concurrent streamed completions.

    python benchmarks/gpu_serve.py                         # TinyLlama-1.1B's shape on cuda, 1 / 4 / 8 / 16 streams
    python benchmarks/gpu_serve.py --streams 1 16 --max-tokens 64 --repeats 3 --out DIR
    python benchmarks/gpu_serve.py --device cpu --n-layers 2 --streams 1 4 --max-tokens 16 --repeats 1
    python benchmarks/gpu_serve.py --shape llama-3-8b --shared-prefix 500 --streams 16 64 --max-tokens 64

What it shows: continuous batching on the GPU. A decode step of one sequence reads every
weight once, and at batch size 1 reading the weights *is* the step; 16 sequences share each
step, so the weights are read once for 16 tokens. Total throughput should grow almost
linearly with the number of streams until the step stops being bound by weight reads, or
until the host (scheduler, sampler, detokenizer, HTTP) cannot keep up with the GPU.

What runs: the same `tinyllm.serve.Server` that `python -m tinyllm.serve` runs, started in
this process and served by uvicorn from a background thread on 127.0.0.1 (a free port),
configured as the server's command configures it (`tinyllm.server.main.uvicorn_config` with
its default flags: the same HTTP protocol, timeouts and limits).
The GPU machine gets no checkpoint, so the model is built here:
- weights: random fp16 of a real model's shape (benchmarks/gpu_models.py; --shape takes
  its SHAPES and its Llama 3 shapes). Speed depends on shapes, not on values, so these
  time the real work. On cuda the fast path is on
  (`CudaStep`), and the server's scheduler then decodes the whole batch as one
  replayed CUDA graph per batch size (tinyllm/cuda/batch.py).
- tokenizer: a word-level vocabulary of the model's size (the words of the benchmark's
  passage, then filler words), built with `tokenizers`. It has a BOS token and *no* EOS
  token, so a random model cannot end a reply early: every request generates exactly
  `max_tokens` tokens, and the script checks the server's `usage.completion_tokens` says so.

How it measures (as benchmarks/serve_load.py, whose client functions it reuses): for each
stream count C, C client threads open streamed completions at the same moment (distinct
prompts of about 45 tokens, greedy, `max_tokens` each) and read them to the end.
    total tok/s       generated tokens of all streams / wall time from the first request to the last [DONE]
    server CPU        this process's CPU time over the run (time.process_time) per generated token: the
                      host's cost of a token (scheduler, event loop, HTTP), whatever the wall clock did
    stream tok/s      one stream's (tokens - 1) / (its last token - its first token), median over streams
    TTFT s            time from sending a request to its first text, median over streams
The client threads run in a child process (--clients process, the default): in this
process they would take turns for Python's global interpreter lock with the event loop and
the scheduler thread, and the server would look slower than it is. After a warm-up, the
counts take turns (1, 4, 8, 16, 1, 4, ...) --repeats times; the table shows medians.
The server keeps its prefix cache (--prefix-cache-mb, default the server's own), as
`python -m tinyllm.serve` does; --engine instant keeps no keys and values, so its server runs
without one.

Shared prefix (--shared-prefix N): the burst a prefix cache is for. Every request of a run
begins with the same system prompt of N tokens (BOS included) and ends with a question of
its own (QUESTION_TOKENS tokens); all of a run's requests are sent at the same moment. The
scenario runs twice in one script run, on two servers over the same model: with the prefix
cache (--prefix-cache-mb) and without it (0). Each run sends a system prompt that no earlier
run sent, so every run starts cold and the best a server can do is compute it once. Beside
TTFT (median and p90 over the streams) and total tok/s, the table shows the server's own
counters tinyllm_prefix_cache_hit_tokens_total and tinyllm_prefix_cache_miss_tokens_total
(GET /metrics, read before and after each run): with the cache the hits should be (streams
- 1) x the system prompt's whole blocks of prefix.BLOCK tokens, i.e. the system prompt
computed once; without it every prompt token is a miss. This scenario does not run the
transformers peer: its batch generate shares nothing between the prompts of a batch, which
is what the cache-off server already measures with tinyllm's own engine.

Timeline (--timeline DIR): per run, a JSON list of ["submit", t, prompt ids] (a request reached
the scheduler), ["round", start, end] (one scheduler round: admission, the step, the events it
sends), ["admit", start, end, sequences that joined], ["step", start, end, rows, decode rows,
seconds waiting for the GPU], from the client, ["request", sent, written, first text, done],
and from the (first) HTTP process ["accepted", t] (a connection's `connection_made`),
["received", t] (a /v1 request reached the app) and, with --engine-process, ["sent", t] (a
request went to the engine); times in seconds from the run's first event, on one clock
(time.perf_counter is the machine's monotonic clock in every process). With --engine-process
the scheduler's side is recorded in the engine process and read over its pipe after each run;
with --http-processes the others' intake is not recorded.

Packages: numpy, tokenizers, starlette, uvicorn, prometheus_client (and cupy on cuda). The
script checks them first and exits with status 2, naming the missing ones.
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import importlib.util
import os
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]

# import name -> what to install
NEEDED = {"numpy": "numpy", "tokenizers": "tokenizers", "starlette": "starlette", "uvicorn": "uvicorn",
          "prometheus_client": "prometheus-client"}


def missing_packages(device: str) -> list[str]:
    needed = dict(NEEDED)
    if device.startswith("cuda"):
        needed["cupy"] = "cupy-cuda12x or cupy-cuda13x"
    return [pip for name, pip in needed.items() if importlib.util.find_spec(name) is None]


# ---- the model and its tokenizer ---------------------------------------------------------------

def word_tokenizer(vocab_size: int):
    """A word-level tinyllm Tokenizer of exactly `vocab_size` entries, with BOS and no EOS.

    ids 0, 1: <unk>, <s> (special: left out of decoded text); then every word and punctuation
    mark of the benchmark's passage (so the prompts encode without <unk>); then filler words
    w<id> up to the model's vocabulary. Text is cut at whitespace and punctuation; decoding
    joins the words with spaces."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from benchmarks.common import PASSAGE
    from tinyllm.tokenizer import Tokenizer

    split = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
    specials = ["<unk>", "<s>"]
    words = list(dict.fromkeys(w for w, _ in split.pre_tokenize_str(PASSAGE)))
    tokens = specials + words
    if len(tokens) > vocab_size:
        raise SystemExit(f"gpu_serve: --vocab-size: the passage needs {len(tokens)} tokens, got {vocab_size}")
    tokens += [f"w{i}" for i in range(len(tokens), vocab_size)]
    tk = HFTokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tk.pre_tokenizer = split
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # no "##" pieces here: words joined by spaces
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return Tokenizer(tk, bos_id=1, eos_ids=(), add_bos=True, chat_template=None,
                     source=f"word-level vocabulary of {vocab_size} (built by benchmarks/gpu_serve.py)")


def passage_pieces() -> list[str]:
    """The passage's words and punctuation marks, in order: one token each in `word_tokenizer`."""
    from tokenizers import pre_tokenizers

    from benchmarks.common import PASSAGE

    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(PASSAGE)]


QUESTION_TOKENS = 16  # each request's own tokens after the shared system prompt


def shared_prefix_prompts(tokenizer, n_prefix: int, n_streams: int, run: int) -> list[str]:
    """n_streams prompts: one system prompt of n_prefix tokens (BOS included), then a question
    of QUESTION_TOKENS tokens per request. The system prompt is the passage's pieces cycled from
    piece `run`, so each run's differs from its first block on (nothing of it is cached before
    the run); the questions start at different pieces, so no two share the block that follows
    the system prompt."""
    pieces = passage_pieces()

    def cycled(start, n):
        return " ".join(pieces[(start + i) % len(pieces)] for i in range(n))

    system = cycled(run, n_prefix - 1)  # BOS is the n_prefix-th token
    if len(tokenizer.encode(system)) != n_prefix:
        raise SystemExit(f"gpu_serve: the system prompt encodes to {len(tokenizer.encode(system))} tokens, "
                         f"not {n_prefix}")
    return [f"{system} {cycled(7 * i + len(pieces) // 2, QUESTION_TOKENS)}" for i in range(n_streams)]


PREFIX_COUNTERS = {"hit": "tinyllm_prefix_cache_hit_tokens_total", "miss": "tinyllm_prefix_cache_miss_tokens_total"}
# the scheduler's rounds with a step (Observer.step_time, step): how many, the seconds on the host and in
# (or waiting for) the model, and the sequences per step (a sequence whose prompt chunk rides in a
# step counts once, however many rows the chunk takes)
STEP_SERIES = {"steps": "tinyllm_step_host_seconds_count", "host_s": "tinyllm_step_host_seconds_sum",
               "model_s": "tinyllm_step_model_seconds_sum", "sequences": "tinyllm_batch_size_sum"}


def server_metrics(port: int) -> dict:
    """The server's counters that a run is judged by (prefix cache tokens, step time split),
    from its Prometheus text at GET /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
    finally:
        conn.close()
    if resp.status != 200:
        raise SystemExit(f"gpu_serve: GET /metrics answered {resp.status}")
    values = dict(line.split(" ", 1) for line in body.splitlines() if line and not line.startswith("#"))
    wanted = {**PREFIX_COUNTERS, **STEP_SERIES}
    missing = [name for name in wanted.values() if name not in values]
    if missing:
        raise SystemExit(f"gpu_serve: /metrics has no {', '.join(missing)}")
    return {key: float(values[name]) for key, name in wanted.items()}


def run_figures(before: dict, after: dict) -> dict:
    """A run's share of the server's counters: prefix cache tokens, and per step the host's and
    the model's milliseconds and the rows."""
    d = {key: after[key] - before[key] for key in after}
    steps = d["steps"]
    out = {f"prefix_{key}_tokens": int(d[key]) for key in PREFIX_COUNTERS}
    out |= {"steps": int(steps), "host_ms_per_step": 1e3 * d["host_s"] / steps if steps else None,
            "model_ms_per_step": 1e3 * d["model_s"] / steps if steps else None,
            "sequences_per_step": d["sequences"] / steps if steps else None}
    return out


def _instant_step(model, step_ms: float = 0.0):
    from tinyllm.cuda.ops import STEP_ROWS
    from tinyllm.step import DecodeStep

    class InstantStep(DecodeStep):
        """--engine instant: a decode step that does no model work (every row's next token is drawn
        at once), so the figures are the host's ceiling: scheduler, detokenizer, SSE and HTTP."""

        name, max_batch = "the instant stand-in", None

        def __init__(self, model):
            self.model = model

        def batch(self, max_batch: int, capacity: int, kv_bytes=None):
            return _InstantBatch(self.model, capacity, step_ms, STEP_ROWS)

        def prompt_logits(self, ids, chunk=256):
            raise NotImplementedError("the instant engine scores no prompts")

    return InstantStep(model)


class _InstantBatch:
    """step_ms > 0: each step also sleeps that long (the interpreter released, as while the
    host waits for a GPU), so steps gather as many sequences as on a GPU whose step takes
    that long, and the host's work per step can be measured at that batch size on any
    machine. The sleep is the step's model time; nothing overlaps it."""

    def __init__(self, model, capacity: int, step_ms: float = 0.0, max_rows: int = 64):
        import numpy as np

        self.max_rows = max_rows  # rows per step, decode rows and prompt chunks together (as the GPU's)
        self.model, self.capacity, self.rng = model, capacity, np.random.default_rng(0)
        self.step_s = step_ms / 1e3
        self.model_seconds = 0.0  # the scheduler's split of a round into host and model time

    def enter_thread(self) -> None:
        pass

    def new_cache(self, positions: int):
        from tinyllm.kv_cache import KVCache

        class Positions(KVCache):  # the position bookkeeping of a cache, without its arrays
            def __init__(self, capacity):
                self.capacity, self._length = capacity, 0

        return Positions(min(positions, self.capacity))

    def release(self, cache) -> None:
        pass

    def can_take(self, positions: int, spare_blocks: int = 0) -> bool:
        return True

    def step(self, tokens, caches, samplers, histories, n_decode=None, horizon=None) -> list:
        counts: dict[int, list] = {}
        for cache in caches:
            counts.setdefault(id(cache), [cache, 0])[1] += 1
        for cache, n in counts.values():
            cache.advance(n)
        if self.step_s:
            began = time.perf_counter()
            time.sleep(self.step_s)
            self.model_seconds = time.perf_counter() - began
        return self.rng.integers(3, self.model.config.vocab_size, len(caches)).tolist()


def build_llm(args):
    """(LLM, seconds to build, whether the CUDA fast path is on)."""
    from benchmarks.gpu_models import random_model
    from tinyllm.engine import LLM

    overrides = {k: v for k, v in (("n_layers", args.n_layers), ("vocab_size", args.vocab_size)) if v is not None}
    start = time.perf_counter()
    model = random_model(args.shape, args.device, seed=0, **overrides)
    tokenizer = word_tokenizer(model.config.vocab_size)
    if model.config.eos_token_ids or tokenizer.eos_ids:
        raise SystemExit("gpu_serve: the benchmark model must have no EOS id (requests would end early)")
    fast = model.device.is_cuda and args.engine == "model"
    step = _instant_step(model, args.instant_step_ms) if args.engine == "instant" else None
    if fast:
        # The fused kernels and the graph-captured decoder, as tinyllm.load picks them; the
        # server's scheduler captures batched graphs through the same step.
        from tinyllm.cuda import CudaStep

        if args.queue_depth is not None:
            from tinyllm.cuda import batch

            batch.QUEUE_DEPTH = args.queue_depth

        step = CudaStep(model)
    model.device.synchronize()
    seconds = time.perf_counter() - start
    return LLM(model, tokenizer, Path(f"random-{args.shape}"), seconds, step), seconds, fast


# ---- the server, in this process ---------------------------------------------------------------

def engine_llm(args):
    """--engine-process: the engine process's own model (the same seed: the same weights)."""
    return build_llm(args)[0]


def start_server(llm, args, prefix_cache_mb: float, trace: HttpTrace | None = None):
    """tinyllm's Server (warmed up) behind uvicorn in a background thread; (server, http, thread, port, seconds).
    With --engine-process, its engine (model and scheduler) runs in a child process; with
    `trace`, its intake is noted there (--timeline)."""
    import uvicorn

    from benchmarks.serve_load import free_port
    from tinyllm.serve import Server
    from tinyllm.server.main import build_parser, uvicorn_config

    start = time.perf_counter()
    if args.inline_body_bytes is not None:
        from tinyllm.server import app

        app.INLINE_BODY_BYTES = args.inline_body_bytes
    engine = None
    if args.engine_process:
        from tinyllm.server.engine_process import EngineProcess

        engine = EngineProcess(engine_llm, (args,), max_batch=args.max_batch, max_context=args.max_context,
                               prefix_cache_mb=prefix_cache_mb, kv_cache_mb=args.kv_cache_mb,
                               tracer=Timeline if args.timeline else None, http_processes=args.http_processes)
    server = Server(llm if engine is None else engine.llm, f"random-{args.shape}", max_batch=args.max_batch,
                    max_context=args.max_context, prefix_cache_mb=prefix_cache_mb, kv_cache_mb=args.kv_cache_mb,
                    scheduler=engine,
                    **({} if args.stream_interval_ms is None else {"stream_interval": args.stream_interval_ms / 1000}))
    server.start(warm_up=True)  # on the GPU: batched graphs captured, first-call costs paid
    if args.switch_interval is not None:  # after start, which sets the server's own
        sys.setswitchinterval(args.switch_interval)
    warm_s = time.perf_counter() - start
    port = free_port()
    # uvicorn as `python -m tinyllm.serve` configures it (its HTTP protocol and limits), not
    # uvicorn's own defaults, which take a faster parser where one is installed
    flags = ["--port", str(port), "--log-level", "warning", "--max-batch", str(args.max_batch),
             "--prefix-cache-mb", str(prefix_cache_mb), "--served-model-name", f"random-{args.shape}",
             "--engine-process", "on" if args.engine_process else "off", "--http-processes", str(args.http_processes)]
    for flag, value in (("--max-context", args.max_context), ("--kv-cache-mb", args.kv_cache_mb),
                        ("--stream-interval-ms", args.stream_interval_ms)):
        if value is not None:
            flags += [flag, str(value)]
    server_args = build_parser().parse_args(flags)
    app = server.app()
    if trace is not None:
        app = trace.app(app)
        if engine is not None:
            trace.engine(engine)
    config = uvicorn_config(app, server_args)
    if trace is not None:
        config.http = trace.protocol(config.http)
    http = uvicorn.Server(config)  # off the main thread, uvicorn installs no signal handlers
    sockets = None
    if engine is not None and engine.pipes:  # --http-processes: the others, as `tinyllm serve` starts them
        from tinyllm.server.main import start_http_workers

        sockets = [config.bind_socket()]
        start_http_workers(engine, server_args, sockets[0])
    thread = threading.Thread(target=http.run, kwargs={"sockets": sockets}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not http.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.stop()
            raise SystemExit(f"gpu_serve: uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    return server, http, thread, port, warm_s


def stop_server(server, http, thread) -> None:
    http.should_exit = True  # what SIGINT does: stop accepting, let streams end, run the lifespan's shutdown
    thread.join(30)
    server.stop()  # in case the lifespan did not run (a second stop does nothing)


# ---- the clients --------------------------------------------------------------------------------

class Clients:
    """Runs serve_load.load_run in a child process (default) or in this one."""

    def __init__(self, where: str):
        self.pool = None
        if where == "process":
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: a fresh interpreter, nothing of this process's GPU state or threads
            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def run(self, port: int, n_streams: int, max_tokens: int, texts: list[str] | None = None,
            per_request: bool = False) -> dict:
        from benchmarks.serve_load import load_run

        if self.pool is None:
            return load_run(port, n_streams, max_tokens, texts, per_request)
        return self.pool.submit(load_run, port, n_streams, max_tokens, texts, per_request).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


# ---- what was measured, where -------------------------------------------------------------------

def transformers_batch(llm, batches, max_tokens: int, prompt_len: int = 45, repeats: int = 2) -> dict:
    """The peer: transformers' own batch generation on the same weights, one `generate` call of
    B prompts (static cache, greedy, exactly max_tokens new tokens each), total tok/s = B *
    max_tokens / wall time of the call, the median of `repeats` after a warm-up per B."""
    import torch

    from benchmarks.gpu_models import to_transformers

    hf = to_transformers(llm.model)
    out = {}
    try:
        for b in batches:
            ids = torch.randint(3, llm.config.vocab_size, (b, prompt_len), device="cuda",
                                generator=torch.Generator("cuda").manual_seed(b))
            kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                          do_sample=False, cache_implementation="static", pad_token_id=0)
            try:
                with torch.no_grad():
                    hf.generate(ids, **kwargs)  # warm-up (and compilation) for this batch size
                    rates = []
                    for _ in range(repeats):
                        torch.cuda.synchronize()
                        start = time.perf_counter()
                        gen = hf.generate(ids, **kwargs)
                        torch.cuda.synchronize()
                        rates.append(b * (gen.shape[1] - prompt_len) / (time.perf_counter() - start))
                out[b] = statistics.median(rates)
            except Exception as e:  # report, never hide, a failing peer
                out[b] = f"{type(e).__name__}: {e}"[:200]
            print(f"transformers static-cache generate, B={b}: {out[b]}", file=sys.stderr, flush=True)
    finally:
        del hf
        torch.cuda.empty_cache()
    return out


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    from benchmarks.common import cpu_model

    return f"{cpu_model()} ({os.cpu_count()} cores, NumPy)"


# ---- the runs -----------------------------------------------------------------------------------

class Timeline:
    """--timeline: when each request reached the scheduler; each scheduler round's start and
    end, and within it the admission's (with how many joined) and the step's, with its rows
    (decode rows first) and the part of it spent waiting for the model; and, from the client,
    when each request was sent, written to its socket, got its first text and ended (one
    clock: time.perf_counter is the machine's monotonic clock in every process). One JSON
    file per run, times in seconds from the run's first event."""

    CLOCK_FIELDS = {"submit": 1, "step": 2, "round": 2, "admit": 2, "request": 4,  # per kind: its leading clock readings
                    "accepted": 1, "received": 1, "sent": 1}

    def __init__(self, scheduler):
        self.rows = scheduler.rows
        self.events: list = []
        submit, step, run_once, admit = scheduler.submit, self.rows.step, scheduler.run_once, scheduler._admit

        def traced_submit(request):
            self.events.append(("submit", time.perf_counter(), len(request.prompt_ids)))
            return submit(request)

        def traced_round():
            began = time.perf_counter()
            try:
                return run_once()
            finally:
                self.events.append(("round", began, time.perf_counter()))

        def traced_admit():
            began, before = time.perf_counter(), len(scheduler.running)
            try:
                return admit()
            finally:
                self.events.append(("admit", began, time.perf_counter(), len(scheduler.running) - before))

        def traced_step(tokens, caches, samplers, histories, n_decode=None, horizon=None):
            began = time.perf_counter()
            try:
                return step(tokens, caches, samplers, histories, n_decode=n_decode, horizon=horizon)
            finally:
                self.events.append(("step", began, time.perf_counter(), len(tokens), n_decode,
                                    self.rows.model_seconds))

        scheduler.submit, self.rows.step = traced_submit, traced_step
        scheduler.run_once, scheduler._admit = traced_round, traced_admit

    def clear(self) -> None:
        self.events = []

    def taken(self) -> list:  # (in an engine process: what crosses back)
        return self.events

    def write(self, folder: str, name: str, requests=None, http=()) -> None:
        write_timeline(folder, name, self.events + list(http), requests)


class EngineTimeline:
    """--timeline with --engine-process: a Timeline in the engine process (EngineProcess's
    tracer), cleared and read over its pipe."""

    def __init__(self, engine):
        self.engine = engine

    def clear(self) -> None:
        self.engine.trace("clear")

    def write(self, folder: str, name: str, requests=None, http=()) -> None:
        write_timeline(folder, name, self.engine.trace("taken") + list(http), requests)


class HttpTrace:
    """--timeline: the HTTP process's side of the intake (see Timeline): when each connection
    was accepted, each /v1 request reached the app and, with an engine process, was sent to it."""

    def __init__(self):
        self.events: list = []

    def protocol(self, base):
        """uvicorn's HTTP protocol class `base`, its connections' arrival noted."""
        events = self.events

        class Traced(base):
            def connection_made(self, transport):
                events.append(("accepted", time.perf_counter()))
                super().connection_made(transport)

        return Traced

    def app(self, app):
        events = self.events

        async def traced(scope, receive, send):
            if scope["type"] == "http" and scope["path"].startswith("/v1/"):
                events.append(("received", time.perf_counter()))
            await app(scope, receive, send)

        return traced

    def engine(self, engine) -> None:
        submit, events = engine.submit, self.events

        def traced(request):
            events.append(("sent", time.perf_counter()))
            return submit(request)

        engine.submit = traced

    def taken(self) -> list:
        events, self.events[:] = list(self.events), []
        return events


def write_timeline(folder: str, name: str, events: list, requests=None) -> None:
    """One run's timeline (see Timeline) as FOLDER/timeline_<name>.json."""
    import json

    Path(folder).mkdir(parents=True, exist_ok=True)
    events = events + [("request", *times) for times in requests or []]
    t0 = min((e[1] for e in events), default=0.0)

    def since(t):  # (a request without text has no time of its first text)
        return None if t is None else round(t - t0, 6)

    rows = [[kind] + [since(t) for t in fields[:Timeline.CLOCK_FIELDS[kind]]]
            + list(fields[Timeline.CLOCK_FIELDS[kind]:]) for kind, *fields in events]
    (Path(folder) / f"timeline_{name}.json").write_text(json.dumps(rows))


def measure(llm, args, clients: Clients, prefix_cache_mb: float, texts_for=None, longest_prompt: int | None = None,
            label: str = "") -> dict:
    """One server (a prefix cache of `prefix_cache_mb`; 0: none), warmed up, then --repeats
    rounds over the stream counts. texts_for(n, run) gives the prompts of a run of n streams
    (None: serve_load's); longest_prompt (tokens), when given, must fit the server's context
    with --max-tokens. Each run records the prefix-cache counters' change over it."""
    trace = HttpTrace() if args.timeline else None
    server, http, thread, port, warm_s = start_server(llm, args, prefix_cache_mb, trace)
    engine_pid = getattr(server.scheduler, "pid", None)  # --engine-process: the engine's process
    helpers = [p.pid for p in getattr(server.scheduler, "helpers", [])]  # --http-processes: the others
    timeline = None
    if args.timeline:
        timeline = Timeline(server.scheduler) if engine_pid is None else EngineTimeline(server.scheduler)
    batched_graphs = False
    if llm.model.device.is_cuda and args.engine == "model":
        # (CudaStep gives a ReadableBatch where no graphs fit the model)
        rows = server.scheduler.rows
        batched_graphs = getattr(rows, "kind", type(rows).__name__) == "CudaBatch"
    print(f"gpu_serve: server{label} warmed up in {warm_s:.1f} s (batched CUDA graphs: "
          f"{'yes' if batched_graphs else 'no'}), port {port}", file=sys.stderr, flush=True)
    from benchmarks.common import fmt

    texts_for = texts_for or (lambda n, run: None)
    runs: dict[int, list[dict]] = {}
    try:
        if longest_prompt is not None and longest_prompt + args.max_tokens > server.max_context:
            raise SystemExit(f"gpu_serve: prompts of {longest_prompt} tokens and --max-tokens {args.max_tokens} "
                             f"do not fit the server's context of {server.max_context} tokens")
        run = 0  # every run's prompts are texts_for(n, run) with a run index of its own
        # warm-up: the client process, every batch size up to the largest
        clients.run(port, max(args.streams), 8, texts_for(max(args.streams), run))
        for repeat in range(args.repeats):  # counts take turns, so a noisy moment hits them alike
            for n in args.streams:
                run += 1
                if timeline is not None:
                    timeline.clear()
                    trace.taken()
                before, cpu, engine_cpu = server_metrics(port), time.process_time(), cpu_seconds(engine_pid)
                cpu += sum(map(cpu_seconds, helpers))
                r = clients.run(port, n, args.max_tokens, texts_for(n, run), per_request=timeline is not None)
                requests = r.pop("requests", None)
                cpu = time.process_time() + sum(map(cpu_seconds, helpers)) - cpu
                engine_cpu = cpu_seconds(engine_pid) - engine_cpu
                r |= run_figures(before, server_metrics(port))
                # with --engine-process: both processes' CPU time, and the engine's alone
                r["server_cpu_us_per_token"] = 1e6 * (cpu + engine_cpu) / r["tokens"] if r["tokens"] else None
                r["engine_cpu_us_per_token"] = (1e6 * engine_cpu / r["tokens"] if r["tokens"] and engine_pid
                                                else None)
                r["exact"] = r["tokens"] == n * args.max_tokens  # every request made max_tokens tokens
                runs.setdefault(n, []).append(r)
                if timeline is not None:
                    timeline.write(args.timeline, f"{n}-{repeat + 1}{label.strip(' ()').replace(' ', '-')}",
                                   requests, trace.taken())
                print(f"repeat {repeat + 1}{label}: {n:3d} streams, {r['total_tok_s']:8.1f} tok/s total, "
                      f"{r['tokens']} tokens{'' if r['exact'] else ' (NOT streams x max_tokens)'}, "
                      f"prefix cache {r['prefix_hit_tokens']} hit / {r['prefix_miss_tokens']} missed tokens, "
                      f"{r['steps']} steps: host {fmt(r['host_ms_per_step'], 3)} + model {fmt(r['model_ms_per_step'], 3)} "
                      f"ms per step, {fmt(r['sequences_per_step'], 1)} sequences, "
                      f"server CPU {fmt(r['server_cpu_us_per_token'], 3)} us per token"
                      + (f" (engine {fmt(r['engine_cpu_us_per_token'], 3)})" if engine_pid else ""),
                      file=sys.stderr, flush=True)
    finally:
        stop_server(server, http, thread)
    pool = getattr(server.scheduler.rows, "pool", None)
    return {"prefix_cache_mb": prefix_cache_mb, "warm_up_s": warm_s, "batched_graphs": batched_graphs,
            "max_context": server.max_context, "runs": runs, "preemptions": server.scheduler.preemptions,
            "kv_cache_blocks": pool.n_blocks if pool else None, "kv_cache_block_positions": pool.block if pool else None,
            "kv_cache_mb": pool.n_blocks * pool.block_bytes / 2**20 if pool else None}


def cpu_seconds(pid: int | None) -> float:
    """Another process's CPU time so far (user + system, from /proc; 0 without a pid)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


def median_of(runs: list[dict], key: str):
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else None


def model_markdown(llm, args, fast: bool) -> str:
    c = llm.config
    dtype = "fp16" if llm.model.device.is_cuda else "fp32"
    return (f"Model: random {dtype} weights of {args.shape}'s shape ({c.n_layers} layers, dim {c.dim}, "
            f"vocabulary {c.vocab_size}), a word-level tokenizer without EOS (every request generates "
            f"`max_tokens`). Server: tinyllm.serve.Server in process (uvicorn thread)"
            f"{', its engine in a child process (--engine-process)' if args.engine_process else ''}"
            f"{f', {args.http_processes} HTTP processes on its port (--http-processes)' if args.http_processes > 1 else ''}, "
            f"--max-batch {args.max_batch}, "
            f"fast path {'on' if fast else 'off'}")


def plain_report(llm, args, fast: bool, measured: dict, peer: dict) -> tuple[str, dict]:
    """The stream-count table (markdown) and its JSON fields."""
    from benchmarks.common import fmt, markdown_table

    runs, batched_graphs, warm_s = measured["runs"], measured["batched_graphs"], measured["warm_up_s"]

    def med(n, key):
        return median_of(runs[n], key)

    mb = measured["prefix_cache_mb"]
    cache = (f"prefix cache {fmt(mb)} MB (the runs repeat their prompts, so from the warm-up on each prompt's "
             f"first block is copied)" if mb else "prefix cache off")
    first = args.streams[0]
    rows = []
    for n in args.streams:
        tokens = ", ".join(str(r["tokens"]) for r in runs[n])
        theirs = peer.get(n)
        ratio = f"{med(n, 'total_tok_s') / theirs:.2f}x" if isinstance(theirs, float) else "-"
        rows.append([n, fmt(med(n, "total_tok_s")), f"{med(n, 'total_tok_s') / med(first, 'total_tok_s'):.2f}x",
                     fmt(med(n, "stream_tok_s")), fmt(med(n, "ttft_s")),
                     fmt(theirs) if isinstance(theirs, float) else (theirs or "-"), ratio,
                     fmt(med(n, "host_ms_per_step"), 3), fmt(med(n, "model_ms_per_step"), 3),
                     fmt(med(n, "sequences_per_step"), 1), fmt(med(n, "server_cpu_us_per_token"), 3),
                     f"{tokens} ({'= ' if all(r['exact'] for r in runs[n]) else '!= '}{n} x {args.max_tokens})"])
    table = markdown_table(["streams", "total tok/s (median)", f"vs {first} stream{'s' if first > 1 else ''}",
                            "tok/s per stream (median)", "TTFT s (median)",
                            "transformers batch generate, tok/s", "tinyllm / transformers",
                            "host ms per step", "model ms per step", "sequences per step",
                            "server CPU µs per token", "tokens generated per run"], rows)
    markdown = (
        f"{model_markdown(llm, args, fast)}, batched CUDA graphs {'yes' if batched_graphs else 'no'}, {cache}; "
        f"warmed up in {warm_s:.1f} s. Clients: threads in {'a child' if args.clients == 'process' else 'the server'} "
        f"process, {args.max_tokens} greedy tokens per stream, prompts of ~45 tokens, "
        f"{args.repeats} run{'s' if args.repeats > 1 else ''} per stream count (medians). Host and model ms per "
        f"step: the server's own split of its scheduler rounds over the run (tinyllm_step_host_seconds and "
        f"tinyllm_step_model_seconds at /metrics: the model's share is the forward pass, or the wait for the GPU "
        f"that the queued-ahead step did not hide); sequences per step: tinyllm_batch_size (a prompt chunk of many "
        f"rows counts once). Server CPU µs per token: "
        f"this process's CPU time over a run (scheduler, event loop, HTTP; the clients run elsewhere, and on a GPU "
        f"the wait for it may spin) per generated token.\n\n{table}\n")
    result = {"batched_graphs": batched_graphs, "warm_up_s": warm_s, "prefix_cache_mb": measured["prefix_cache_mb"],
              "runs": {str(k): v for k, v in runs.items()},
              **{k: measured[k] for k in ("preemptions", "kv_cache_blocks", "kv_cache_block_positions", "kv_cache_mb")},
              "transformers_batch_generate": {str(k): v for k, v in peer.items()}}
    return markdown, result


def shared_prefix_report(llm, args, fast: bool, servers: dict) -> tuple[str, dict]:
    """The shared-prefix tables, prefix cache on against off (markdown), and their JSON fields."""
    from benchmarks.common import fmt, markdown_table
    from tinyllm.prefix import BLOCK

    whole = args.shared_prefix // BLOCK * BLOCK  # the system prompt's tokens in whole blocks: what can be reused

    def computed(n, r):  # times the system prompt's whole blocks were computed in run r
        return n - r["prefix_hit_tokens"] / whole if whole else None

    rows, once = [], True
    for label, measured in servers.items():
        for n in args.streams:
            runs = measured["runs"][n]
            times = [computed(n, r) for r in runs]
            if label == "on" and whole and any(t != 1 for t in times):
                once = False
            tokens = ", ".join(str(r["tokens"]) for r in runs)
            rows.append([f"{label} ({fmt(measured['prefix_cache_mb'])} MB)" if label == "on" else "off", n,
                         fmt(median_of(runs, "total_tok_s")), fmt(median_of(runs, "ttft_s")),
                         fmt(median_of(runs, "ttft_p90_s")), fmt(median_of(runs, "stream_tok_s")),
                         ", ".join(str(r["prefix_hit_tokens"]) for r in runs),
                         ", ".join(str(r["prefix_miss_tokens"]) for r in runs),
                         ", ".join(fmt(t, 2) for t in times),
                         f"{tokens} ({'= ' if all(r['exact'] for r in runs) else '!= '}{n} x {args.max_tokens})"])
    table = markdown_table(["prefix cache", "streams", "total tok/s (median)", "TTFT s (median)",
                            "TTFT s p90 (median of runs)", "tok/s per stream (median)",
                            "hit tokens per run", "missed tokens per run", "system prompt computed, times per run",
                            "tokens generated per run"], rows)
    on, off = servers["on"]["runs"], servers["off"]["runs"]

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "-"

    compare = markdown_table(
        ["streams", "TTFT median, off / on", "TTFT p90, off / on", "total tok/s, on / off"],
        [[n, ratio(median_of(off[n], "ttft_s"), median_of(on[n], "ttft_s")),
          ratio(median_of(off[n], "ttft_p90_s"), median_of(on[n], "ttft_p90_s")),
          ratio(median_of(on[n], "total_tok_s"), median_of(off[n], "total_tok_s"))] for n in args.streams])
    markdown = (
        f"{model_markdown(llm, args, fast)}, batched CUDA graphs "
        f"{'yes' if servers['on']['batched_graphs'] else 'no'}; two servers in turn over the same model, prefix "
        f"cache on (--prefix-cache-mb {fmt(servers['on']['prefix_cache_mb'])}, warmed up in "
        f"{servers['on']['warm_up_s']:.1f} s) and off (0, warmed up in {servers['off']['warm_up_s']:.1f} s). "
        f"Clients: threads in {'a child' if args.clients == 'process' else 'the server'} process; every request "
        f"of a run is sent at once and is one system prompt of {args.shared_prefix} tokens (BOS included; "
        f"{whole // BLOCK} whole blocks of {BLOCK}, {whole} tokens reusable) and a question of its own of "
        f"{QUESTION_TOKENS} tokens; each run has a system prompt no earlier run sent. {args.max_tokens} greedy "
        f"tokens per stream, {args.repeats} run{'s' if args.repeats > 1 else ''} per stream count (medians). "
        f"Hit and missed tokens: the server's tinyllm_prefix_cache_hit_tokens_total and "
        f"tinyllm_prefix_cache_miss_tokens_total (/metrics) after a run minus before it; system prompt computed = "
        f"streams - hit tokens / {whole}, 1 when the burst computed it once.\n\n{table}\n\n{compare}\n")
    if not once:
        markdown += ("\n**Note**: with the prefix cache on, some run computed the system prompt more than once "
                     "(a budget too small for it, or requests that did not wait for its blocks).\n")
    result = {"shared_prefix": {"tokens": args.shared_prefix, "question_tokens": QUESTION_TOKENS, "block": BLOCK,
                                "reusable_tokens": whole, "computed_once_with_cache": once},
              "servers": {label: {**m, "runs": {str(k): v for k, v in m["runs"].items()}}
                          for label, m in servers.items()}}
    return markdown, result


def profile_scheduler():
    """A cProfile.Profile that records every round of every Scheduler's thread (a profile is
    per thread: enabled inside run_once, it sees the scheduler thread alone, not the event
    loop's or the clients')."""
    import cProfile

    from tinyllm.scheduler import Scheduler

    profiler, run_once = cProfile.Profile(), Scheduler.run_once

    def profiled(self):
        profiler.enable()
        try:
            run_once(self)
        finally:
            profiler.disable()

    Scheduler.run_once = profiled
    return profiler


def write_profile(profiler, path: str, info: dict) -> None:
    import io
    import pstats

    out = io.StringIO()
    out.write(f"{info['date']} · {info['device']} · commit {info['commit']} · {info['command']}\n"
              "The scheduler thread's rounds (Scheduler.run_once), all runs together.\n\n")
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    Path(path).write_text(out.getvalue())
    print(f"gpu_serve: the scheduler thread's profile is in {path}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_serve.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (to try the script without a GPU)")
    p.add_argument("--shape", default="tinyllama-1.1b",
                   help="a shape of benchmarks/gpu_models.py, Llama 3's included (default tinyllama-1.1b)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16],
                   help="concurrent streams (default 1 4 8 16)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per stream (default 128)")
    p.add_argument("--repeats", type=int, default=2, help="runs per stream count (default 2)")
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (default 16)")
    p.add_argument("--max-context", type=int, default=None, help="the server's --max-context (default: the shape's)")
    p.add_argument("--kv-cache-mb", type=float, default=None, metavar="MB",
                   help="the server's --kv-cache-mb: its paged KV cache (default: the server's)")
    p.add_argument("--prefix-cache-mb", type=float, default=None, metavar="MB",
                   help="the server's --prefix-cache-mb (default: the server's own); with --shared-prefix, the "
                   "budget of the cache-on server")
    p.add_argument("--shared-prefix", type=int, default=None, metavar="N",
                   help="the shared-prefix scenario: every request begins with one N-token system prompt; run "
                   "with the prefix cache and without it (see the docstring)")
    p.add_argument("--n-layers", type=int, default=None, help="override the shape's layer count (a small test model)")
    p.add_argument("--vocab-size", type=int, default=None, help="override the shape's vocabulary size")
    p.add_argument("--clients", choices=("process", "thread"), default="process",
                   help="where the client threads run: a child process (default) or this process")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the JSON and markdown")
    p.add_argument("--engine", choices=("model", "instant"), default="model",
                   help="instant: a stand-in step that does no model work, to measure the host's ceiling")
    p.add_argument("--instant-step-ms", type=float, default=0.0,
                   help="the instant stand-in sleeps this long per step (a GPU step's time: e.g. 2.6 for TinyLlama "
                        "at ~40 rows on an H200), so steps batch as many sequences as there")
    p.add_argument("--stream-interval-ms", type=float, default=None, metavar="MS",
                   help="the server's --stream-interval-ms (default: the server's own)")
    p.add_argument("--switch-interval", type=float, default=None, metavar="S",
                   help="the interpreter's switch interval while serving (default: the server's, "
                        "tinyllm.server.app.SWITCH_INTERVAL): to measure its effect")
    p.add_argument("--profile-host", metavar="FILE", default=None,
                   help="profile the scheduler thread's rounds (cProfile; its host work and its waits on the "
                        "step) over every run, and write the functions by own time and by cumulative time to FILE")
    p.add_argument("--queue-depth", type=int, default=None, metavar="N",
                   help="steps the batched GPU step queues ahead (default: tinyllm.cuda.batch.QUEUE_DEPTH): "
                        "to measure its effect")
    p.add_argument("--timeline", metavar="FOLDER", default=None,
                   help="write each run's submits, scheduler rounds, admissions (with how many joined) and steps "
                        "(start, end, rows, decode rows, model wait) and the client's times per request to "
                        "FOLDER/timeline_<streams>-<repeat>.json")
    p.add_argument("--inline-body-bytes", type=int, default=None, metavar="N",
                   help="the largest request body validated on the event loop (default: "
                   "tinyllm.server.app.INLINE_BODY_BYTES; 0: every one in a worker thread): to measure its effect")
    p.add_argument("--engine-process", action="store_true",
                   help="the server's engine (model and scheduler) in a process of its own, as `tinyllm serve "
                   "--engine-process on` runs it; server CPU then counts both processes")
    p.add_argument("--http-processes", type=int, default=1, metavar="N",
                   help="with --engine-process: N HTTP processes on the server's port, as `tinyllm serve "
                   "--http-processes N` runs them (this one and N - 1 more); server CPU counts them all")
    p.add_argument("--peer", action="store_true",
                   help="also run transformers' static-cache batch generate of B prompts for each stream count B "
                   "(not with --shared-prefix)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    missing = missing_packages(args.device)
    if missing:
        print(f"gpu_serve: missing Python packages: {', '.join(missing)} (install them, or carry them as wheels)",
              file=sys.stderr)
        return 2
    from benchmarks.common import git_commit, write_outputs
    from benchmarks.gpu_models import ALL_SHAPES
    from tinyllm.prefix import BUDGET_MB

    if args.shape not in ALL_SHAPES:
        print(f"gpu_serve: --shape: expected one of {', '.join(ALL_SHAPES)}, got {args.shape!r}", file=sys.stderr)
        return 2
    if min(args.streams) < 1 or args.max_tokens < 1 or args.repeats < 1:
        print("gpu_serve: --streams, --max-tokens and --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.prefix_cache_mb is not None and not args.prefix_cache_mb >= 0:
        print(f"gpu_serve: --prefix-cache-mb: must be >= 0, got {args.prefix_cache_mb}", file=sys.stderr)
        return 2
    if args.http_processes != 1 and not (args.engine_process and 1 <= args.http_processes <= 64):
        print("gpu_serve: --http-processes: 1 to 64, above 1 with --engine-process", file=sys.stderr)
        return 2
    if args.engine_process and args.profile_host:
        print("gpu_serve: --profile-host profiles the scheduler in this process: not with --engine-process",
              file=sys.stderr)
        return 2
    prefix_mb = BUDGET_MB if args.prefix_cache_mb is None else args.prefix_cache_mb
    if args.shared_prefix is not None:
        problem = None
        if args.shared_prefix < 2:
            problem = f"must be >= 2 (BOS and one word), got {args.shared_prefix}"
        elif args.engine == "instant":
            problem = "needs --engine model: the instant stand-in keeps no keys and values to reuse"
        elif prefix_mb == 0:
            problem = "compares the prefix cache with none: --prefix-cache-mb must be > 0"
        if problem:
            print(f"gpu_serve: --shared-prefix: {problem}", file=sys.stderr)
            return 2
        if args.peer:
            print("gpu_serve: --peer is not run with --shared-prefix (see the docstring)", file=sys.stderr)

    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device_name(args.device), "commit": git_commit(),
            "command": " ".join(["python", "benchmarks/gpu_serve.py"] + [shlex.quote(a) for a in sys.argv[1:]])}
    print(f"gpu_serve: {info['device']}, commit {info['commit']}", file=sys.stderr, flush=True)

    llm, build_s, fast = build_llm(args)
    c = llm.config
    print(f"gpu_serve: random {args.shape} ({c.n_layers} layers, vocabulary {c.vocab_size}) built in {build_s:.1f} s"
          f"{', fast path on' if fast else ''}", file=sys.stderr, flush=True)

    clients = Clients(args.clients)
    profiler = profile_scheduler() if args.profile_host else None
    try:
        if args.shared_prefix is not None:
            def texts_for(n, run):
                return shared_prefix_prompts(llm.tokenizer, args.shared_prefix, n, run)

            longest = args.shared_prefix + QUESTION_TOKENS
            # the same prompts, run for run, on both servers: each server's cache starts empty
            servers = {"on": measure(llm, args, clients, prefix_mb, texts_for, longest, " (prefix cache on)"),
                       "off": measure(llm, args, clients, 0, texts_for, longest, " (prefix cache off)")}
        else:
            # the instant stand-in's caches hold positions only: nothing a prefix cache could copy
            measured = measure(llm, args, clients, 0 if args.engine == "instant" else prefix_mb)
    finally:
        clients.close()
    if profiler is not None:
        write_profile(profiler, args.profile_host, info)

    dtype = "fp16" if llm.model.device.is_cuda else "fp32"
    header = (f"Measured {info['date']} on {info['device']}, commit `{info['commit']}`.\n\n"
              f"Command: `{info['command']}`\n\n")
    common = {**info, "settings": vars(args), "model": {k: getattr(c, k) for k in ALL_SHAPES[args.shape]} | {
                  "n_layers": c.n_layers, "vocab_size": c.vocab_size, "dtype": dtype},
              "fast_path": fast, "build_s": build_s}
    if args.shared_prefix is not None:
        body, fields = shared_prefix_report(llm, args, fast, servers)
        all_runs = [r for m in servers.values() for rs in m["runs"].values() for r in rs]
        name = "gpu_serve_shared_prefix"
    else:
        peer = transformers_batch(llm, args.streams, args.max_tokens) if args.peer and fast else {}
        body, fields = plain_report(llm, args, fast, measured, peer)
        all_runs = [r for rs in measured["runs"].values() for r in rs]
        name = "gpu_serve"
    all_exact = all(r["exact"] for r in all_runs)
    markdown = header + body
    if not all_exact:
        markdown += "\n**Warning**: some requests did not generate exactly max_tokens tokens.\n"
    result = {**common, "all_requests_max_tokens": all_exact, **fields}
    json_path, md_path = write_outputs(args.out, name if args.device.startswith("cuda") else f"{name}_cpu",
                                       result, markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0 if all_exact else 1


if __name__ == "__main__":
    sys.exit(main())
