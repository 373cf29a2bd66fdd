"""`python -m tinyllm.serve`: the server's flags, and the HTTP server (uvicorn) around the app.

Connections are bounded as well as requests, so that clients that open sockets and send
nothing, or send headers a byte at a time, cannot pile up:
- `--header-timeout`: a connection must deliver a request's headers within this time
  (uvicorn has no such limit of its own; `HeaderTimeoutH11` adds it);
- `--keep-alive-timeout`: an idle keep-alive connection is closed after this time;
- `--max-header-bytes`: h11's limit on a request's line and headers together;
- `--limit-concurrency`: open connections (and requests in flight) beyond this get 503.
Each request is logged in one line at `info` (`--log-level`): method, path, status, tokens
and time (middleware.py). The body's own limits (`--max-body-bytes`, `--body-timeout`) are checked in limits.py.
TLS: `--ssl-certfile` and `--ssl-keyfile`, handed to uvicorn.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time
from pathlib import Path

from ..cli import ArgumentParser, UsageError, add_debug_flag, add_model_flags, load_options, run_main
from ..prefix import BLOCK, BUDGET_MB, block_bytes

PROG = "python -m tinyllm.serve"
API_KEY_ENV = "TINYLLM_API_KEY"
# --http-processes auto: one HTTP process per this many cores (the engine process, the
# tokenizer's threads and the machine's other work need theirs), and at most this many
CORES_PER_HTTP_PROCESS = 4
AUTO_HTTP_PROCESSES = 4
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's names


def build_parser(prog: str = PROG) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="An OpenAI-compatible HTTP server for a Llama-family model.")
    add_model_flags(p)
    s = p.add_argument_group("serving")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: the file name)")
    s.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (the GPU "
                   "fast path takes up to 128 with cuBLAS, 64 with its own kernels; its steps take that many "
                   "rows whatever this is: prompt chunks beside the decoding sequences)")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait beyond the batch; "
                   "more get 503")
    s.add_argument("-c", "--max-context", type=int, default=None, help="prompt + generated tokens per request "
                   "(default: the model's context length)")
    s.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    s.add_argument("--prefix-cache-mb", type=float, default=BUDGET_MB, metavar="MB",
                   help="memory for the keys and values of prompt prefixes (system prompts, earlier turns, "
                   "the n choices of a request), reused by later requests instead of recomputed "
                   "(0: off)")
    s.add_argument("--kv-cache-mb", type=float, default=None, metavar="MB",
                   help="memory for the running requests' keys and values, shared in blocks that each takes as "
                   "it grows and gives back when it ends; when it runs short the request that joined last "
                   "waits and later recomputes its tokens (default: on the GPU, --max-batch requests of the "
                   "whole context as far as half the free memory goes; on the CPU, a cache per request)")
    s.add_argument("--stream-interval-ms", type=float, default=None, metavar="MS",
                   help="the least time between two writes to one stream; the tokens of the interval go out "
                   "together (default: 0.1 ms times the streams open, so the server makes about 10,000 writes "
                   "a second however many are open; 0: every step's tokens at once)")
    s.add_argument("--engine-process", choices=("auto", "on", "off"), default="auto",
                   help="run the model and its scheduler in a process of their own, the HTTP side in this one, "
                   "so that the two do not take turns for one interpreter (auto: on a GPU, where the host's "
                   "work per step is what limits many streams)")
    s.add_argument("--http-processes", default="auto", metavar="N",
                   help="processes that take connections on the port, all sending to one engine process "
                   "(above 1 it needs one: --engine-process auto turns it on): validation, tokenizing and "
                   "streaming spread over N cores, so that a burst of new clients reaches the engine sooner "
                   f"(auto: with the engine in a process of its own on a GPU, one per {CORES_PER_HTTP_PROCESS} "
                   f"cores, at most {AUTO_HTTP_PROCESSES}; else 1)")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests may take to finish at shutdown before they are cancelled")
    s.add_argument("--no-warm-up", action="store_true", help="skip the warm-up requests at start-up")
    s.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                   help="the least important messages logged: one line per request at info")
    add_debug_flag(s)

    lim = p.add_argument_group("limits")
    lim.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body in bytes; larger "
                     "gets 413")
    lim.add_argument("--body-timeout", type=float, default=30.0, help="seconds to receive a request's body")
    lim.add_argument("--max-json-depth", type=int, default=32, help="deepest JSON nesting accepted")
    lim.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds a connection may take to send a request's headers")
    lim.add_argument("--keep-alive-timeout", type=int, default=5,
                     help="seconds an idle keep-alive connection stays open")
    lim.add_argument("--max-header-bytes", type=int, default=16384,
                     help="largest request line + headers, in bytes")
    lim.add_argument("--limit-concurrency", type=int, default=256,
                     help="open connections and requests in flight; beyond them uvicorn answers 503")

    sec = p.add_argument_group("security")
    sec.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on /v1/* and /metrics "
                     f"(also: --api-key-file, or the {API_KEY_ENV} environment variable); /health stays open")
    sec.add_argument("--api-key-file", default=None, metavar="PATH", help="read the API key from a file (first line)")
    sec.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                     help="let browsers on ORIGIN call the API (e.g. https://app.example.com; '*' for any); "
                     "repeatable; off by default")
    sec.add_argument("--ssl-certfile", default=None, metavar="PATH", help="serve HTTPS with this certificate")
    sec.add_argument("--ssl-keyfile", default=None, metavar="PATH", help="the certificate's private key")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def check_args(args) -> None:
    """Flag values checked before the (slow) model load."""
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--default-max-tokens", args.default_max_tokens, 1),
                             ("--max-body-bytes", args.max_body_bytes, 1), ("--max-json-depth", args.max_json_depth, 1),
                             ("--max-header-bytes", args.max_header_bytes, 1024),
                             ("--limit-concurrency", args.limit_concurrency, 1)):
        if value < low:
            raise UsageError(f"{flag}: must be >= {low}, got {value}")
    if args.http_processes != "auto":
        try:
            args.http_processes = int(args.http_processes)
        except ValueError:
            raise UsageError(f"--http-processes: expected a whole number or auto, got {args.http_processes!r}") from None
        if not 1 <= args.http_processes <= 64:
            raise UsageError(f"--http-processes: must be 1 to 64, got {args.http_processes}")
    if args.http_processes not in ("auto", 1) and args.engine_process == "off":
        raise UsageError("--http-processes above 1 needs the engine in a process of its own "
                         "(--engine-process on or auto)")
    for flag, value in (("--body-timeout", args.body_timeout), ("--header-timeout", args.header_timeout),
                        ("--keep-alive-timeout", args.keep_alive_timeout)):
        if not value > 0:
            raise UsageError(f"{flag}: must be > 0 seconds, got {value}")
    if args.kv_cache_mb is not None and not args.kv_cache_mb > 0:
        raise UsageError(f"--kv-cache-mb: must be > 0, got {args.kv_cache_mb:g}")
    if not args.prefix_cache_mb >= 0:
        raise UsageError(f"--prefix-cache-mb: must be >= 0, got {args.prefix_cache_mb}")
    if args.stream_interval_ms is not None and not 0 <= args.stream_interval_ms <= 10_000:
        raise UsageError(f"--stream-interval-ms: must be 0 to 10000 milliseconds, got {args.stream_interval_ms:g}")
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        raise UsageError("--ssl-certfile and --ssl-keyfile go together")


def http_processes(args) -> int:
    """--http-processes, auto resolved (where the engine runs in a process of its own)."""
    if args.http_processes != "auto":
        return args.http_processes
    if not str(args.device).startswith("cuda"):
        return 1
    return max(1, min(AUTO_HTTP_PROCESSES, (os.cpu_count() or 1) // CORES_PER_HTTP_PROCESS))


def engine_process_wanted(args) -> bool:
    """--engine-process: auto is on where the model runs on a GPU through the fast path, or
    where several HTTP processes share the engine."""
    if args.engine_process != "auto":
        return args.engine_process == "on"
    if args.http_processes not in ("auto", 1):
        return True
    return str(args.device).startswith("cuda") and not args.no_fast_path


def check_prefix_cache_mb(mb: float, model) -> None:
    """--prefix-cache-mb against the loaded model: a budget under one block would keep nothing."""
    need = block_bytes(model.config, model.dtype)
    if 0 < mb and int(mb * 2**20) < need:  # as the server turns MB into its budget
        raise UsageError(f"--prefix-cache-mb: {mb:g} holds no block of this model's keys and values; give at least "
                         f"{math.ceil(need / 2**20 * 1000) / 1000:g} (one block of {BLOCK} tokens), or 0 for off")


def api_key(args) -> str | None:
    """--api-key, else the first line of --api-key-file, else $TINYLLM_API_KEY; None: no key."""
    if args.api_key is not None:
        key = args.api_key
    elif args.api_key_file is not None:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").partition("\n")[0]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--api-key-file: {args.api_key_file}: cannot be read ({type(e).__name__})") from None
    else:
        key = os.environ.get(API_KEY_ENV)
        if key is None:
            return None
    key = key.strip()
    if not key:
        raise UsageError("--api-key: the key is empty")
    return key


def limits(args):
    from .limits import Limits

    return Limits(max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout,
                  max_json_depth=args.max_json_depth)


def uvicorn_config(app, args):
    """uvicorn's settings from the flags (`app`: the ASGI app)."""
    import uvicorn

    return uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                          http=header_timeout_protocol(args.header_timeout),
                          timeout_graceful_shutdown=args.shutdown_timeout,
                          timeout_keep_alive=args.keep_alive_timeout, limit_concurrency=args.limit_concurrency,
                          h11_max_incomplete_event_size=args.max_header_bytes,
                          ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete
    within `seconds` of it opening (or of its previous response)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_header_timer()

        def _arm_header_timer(self):
            cycle = self.cycle  # a new request replaces it once its headers are in
            self.loop.call_later(seconds, self._header_timeout, cycle)

        def _header_timeout(self, cycle):
            if self.cycle is cycle and (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11


class _Stderr(logging.StreamHandler):
    """A handler on whatever sys.stderr is when a line is written, not when it was configured:
    where stderr is replaced later (a test harness's capture, a supervisor's redirect), lines
    still reach the live stream instead of failing on a closed one, each with a traceback."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(level: str) -> None:
    """tinyllm's own log lines (one per request, errors) on stderr at --log-level; uvicorn
    configures its own loggers from the same level."""
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("tinyllm")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if level == "trace" else level.upper())
    logger.propagate = False


_M_ARENA_MAX = -8  # glibc's mallopt parameter


def _glibc():
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def give_memory_back_when_idle(scheduler, period: float = 1.0) -> None:
    """glibc's malloc keeps freed memory in per-thread arenas and returns little of it to the
    system, so a server's resident size rises with each burst of requests (large bodies,
    worker threads) and stays there. Two arenas (set in `serve` before any thread starts),
    and a malloc_trim(0) each time the scheduler falls idle, keep it near its warm size; on
    another C library this does nothing."""
    import threading

    libc = _glibc()
    if libc is None:
        return

    def watch():
        busy = False
        while True:
            time.sleep(period)
            idle = scheduler.batch_size == 0 and scheduler.queue_depth == 0
            if idle and busy:
                libc.malloc_trim(0)
            busy = not idle

    threading.Thread(target=watch, name="tinyllm-trim", daemon=True).start()


def serve(args) -> int:
    check_args(args)
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, 2)  # before the threads that would each take an arena
    configure_logging(args.log_level)
    key = api_key(args)
    try:
        import uvicorn  # noqa: F401

        import starlette  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as e:
        raise UsageError(f"{e.name} is missing: pip install 'tinyllm[serve]'") from None
    import tinyllm

    from .app import Server

    server_kwargs = server_options(args, key)
    engine = None
    if engine_process_wanted(args):
        from .engine_process import EngineProcess

        engine = EngineProcess(functools.partial(tinyllm.load, args.model, **load_options(args)),
                               max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
                               prefix_cache_mb=args.prefix_cache_mb, kv_cache_mb=args.kv_cache_mb,
                               http_processes=http_processes(args))
        llm = engine.llm
    else:
        llm = tinyllm.load(args.model, **load_options(args))
    try:
        check_prefix_cache_mb(args.prefix_cache_mb, llm.model)
        server = Server(llm, args.served_model_name, args.max_batch, args.max_queue, args.max_context,
                        args.default_max_tokens, prefix_cache_mb=args.prefix_cache_mb, kv_cache_mb=args.kv_cache_mb,
                        scheduler=engine, **server_kwargs)
    except BaseException:
        if engine is not None:
            engine.stop()
        raise
    start = time.perf_counter()
    server.start(warm_up=not args.no_warm_up)  # the port opens only after this
    give_memory_back_when_idle(server.scheduler)
    print(f"tinyllm.serve: {server.model_id} on {llm.model.device.name}, loaded in {llm.load_seconds:.1f} s, "
          f"warmed up in {time.perf_counter() - start:.1f} s, context {server.max_context} tokens per request"
          f"{', API key required' if key else ''}", file=sys.stderr, flush=True)
    # On SIGINT/SIGTERM uvicorn stops accepting connections, lets in-flight streams finish
    # (cancelling those still running after --shutdown-timeout), runs the lifespan's
    # shutdown (the scheduler stops), then re-raises the signal so the exit status shows it;
    # Ctrl-C (SIGINT) then ends here as KeyboardInterrupt: a normal stop, not a traceback.
    config = uvicorn_config(server.app(), args)
    sockets = None
    try:
        if engine is not None and engine.pipes:
            sockets = [config.bind_socket()]  # one listening socket: each connection goes to one process
            start_http_workers(engine, args, sockets[0])
        uvicorn.Server(config).run(sockets=sockets)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()  # (the engine process's stop ends the other HTTP processes first)
    return 0


def server_options(args, key) -> dict:
    """Server's keyword arguments from the flags (but the model's and the scheduler's)."""
    return dict(limits=limits(args), api_key=key, cors_origins=args.cors_origin,
                stream_interval=None if args.stream_interval_ms is None else args.stream_interval_ms / 1000)


def start_http_workers(engine, args, sock) -> None:
    """--http-processes N: N - 1 processes more, each serving connections of the listening
    socket `sock` through its own pipe to the engine (engine.pipes). They end when the
    engine process's handle stops (the server's shutdown, after this process's own
    connections), or on a signal of their own (a terminal's Ctrl-C reaches them all), or
    when this process is gone."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    for index, pipe in enumerate(engine.pipes, start=1):
        worker = ctx.Process(target=http_worker, args=(pipe, engine.info, index, args, sock, engine.helpers_stop),
                             name=f"tinyllm-http-{index}", daemon=True)
        worker.start()
        pipe.close()  # the worker holds it now
        engine.helpers.append(worker)


def http_worker(pipe, info: dict, index: int, args, sock, stop) -> None:
    """One more HTTP process (--http-processes): the same app as the first, on the same socket,
    its requests sent to the engine through `pipe`. Once `stop` (a pipe's reading end) ends,
    the first process having closed the other end or being gone, it shuts down as uvicorn
    does on a signal (its streams in flight finish first)."""
    import threading

    import uvicorn

    from .app import Server
    from .engine_process import EngineClient

    configure_logging(args.log_level)
    engine = EngineClient(pipe, info, args.max_batch, args.max_queue, index)
    server = Server(engine.llm, args.served_model_name, args.max_batch, args.max_queue, args.max_context,
                    args.default_max_tokens, prefix_cache_mb=args.prefix_cache_mb, kv_cache_mb=args.kv_cache_mb,
                    scheduler=engine, **server_options(args, api_key(args)))
    server.start(warm_up=False)  # the first process warmed the engine up
    http = uvicorn.Server(uvicorn_config(server.app(), args))

    def watch() -> None:
        try:
            stop.recv()  # nothing is ever sent: returns (EOFError) when the other end closes
        except (EOFError, OSError):
            pass
        http.should_exit = True

    threading.Thread(target=watch, name="tinyllm-http-stop", daemon=True).start()
    try:
        http.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def main(argv=None, prog: str = PROG) -> int:
    return run_main(prog, serve, build_parser(prog).parse_args(argv))
