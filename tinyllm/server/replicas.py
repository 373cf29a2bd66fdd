"""Replicas on Ray Serve: N copies of the engine behind one OpenAI-compatible endpoint.

    python -m tinyllm.replicas --replicas 2 --device cuda      # one replica per GPU
    python -m tinyllm.replicas --replicas 2 --device cpu       # one process per replica

How a request travels:

    client ──► front: this process; uvicorn and Starlette with the single server's flags,
                 │    middleware (request id, JSON 500, CORS, API key) and body limits;
                 │    it reads the body and picks a replica (routing.py)
                 ▼    Ray Serve DeploymentHandle, streamed
               replica k: a Ray actor holding tinyllm.load(...) and the single server's
                 │    `Server` (scheduler thread, validator, metrics); it runs the request
                 │    through Server's own app and sends back the ASGI messages
                 ▼    a few messages per streamed item
               front ──► client: the same status, headers and bytes (SSE or JSON) the
                      single server sends, plus `x-tinyllm-replica: <name>`

What Ray Serve does: it places each replica where a GPU is free (`num_gpus=1`: Ray sets
CUDA_VISIBLE_DEVICES, so the replica's GPU is its `cuda`) or a CPU core is, on this machine
or on any machine of a Ray cluster; it starts a new replica when one dies; it carries the
streamed answers between processes. What tinyllm adds is small: the replica runs `Server`'s
app unchanged (routes, validation, tokenizing, the scheduler, SSE and errors are the single
server's code), and the front chooses the replica. The front answers /health and /metrics
itself, checks the API key and CORS, and forwards every other request.

Why a front of our own instead of Ray Serve's HTTP proxy: routing by prompt prefix needs the
request body, and Ray's proxy picks a replica before it reads the body; our front also keeps
the single server's connection limits, header timeout and TLS exactly as they are.

Each replica is a Serve application of its own (one deployment, one replica), so the front
can name it: route to it, count its requests, read its /metrics. Ray restarts it under the
same name when its actor dies.

Failures: the requests a dying replica was running fail, and say so: one not yet answered
gets a 502 `replica_failed` naming the replica; a stream already under way ends with that
error as an event, then `data: [DONE]`. The front marks the replica down and routes around
it; a probe every `--probe-period` seconds brings it back once Ray's replacement answers.

Metrics (`GET /metrics`): the single server's metric names, summed over the replicas (so a
dashboard made for one server reads the whole set), the same series per replica as
`tinyllm_replica_*{replica="..."}`, and the front's own `tinyllm_router_*`.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..cli import UsageError, load_options, run_main
from . import main as single
from .limits import Limits, parse_body, read_body
from .middleware import middleware
from .openai import SSE_DONE, APIError, sse_line
from .routing import POLICIES, Replica, make_policy, prefix_key

log = logging.getLogger("tinyllm.server")

PROG = "python -m tinyllm.replicas"
APP_PREFIX = "tinyllm-replica-"  # Serve application names: tinyllm-replica-0, -1, ...
GENERATION_PATHS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}  # what routing.py reads
PROBE_ROOM = 8  # calls a replica takes beyond its batch and queue: health probes, /metrics, /v1/models
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


# ---- a replica: the engine and the single server's request handling, in a Ray actor -----------

class EngineReplica:
    """One replica: `tinyllm.load` and a `Server`, whose app answers forwarded requests.
    Made a Ray Serve deployment by `deploy` (Ray is imported only there)."""

    def __init__(self, model, load_kwargs: dict, server_kwargs: dict, warm_up: bool = True):
        import tinyllm

        from .app import Server

        llm = tinyllm.load(model, **load_kwargs)
        self.server = Server(llm, **server_kwargs)
        self.server.start(warm_up=warm_up)
        self.device = llm.model.device.name
        self.app = self.server.app()  # its lifespan never runs here: Ray's shutdown stops the server

    async def forward(self, scope: dict, body: bytes):
        """Runs one HTTP request through the server's app; yields its ASGI messages, in lists
        of those ready together (one streamed item costs more than a message)."""
        messages: asyncio.Queue = asyncio.Queue()
        body_given = False

        async def receive():
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": body, "more_body": False}
            # Waiting for a disconnect: it comes as the front cancelling this generator.
            await asyncio.Future()

        async def send(message):
            messages.put_nowait(message)

        async def run():
            try:
                await self.app(scope, receive, send)
            finally:
                messages.put_nowait(None)

        task = asyncio.ensure_future(run())
        try:
            while True:
                ready = [await messages.get()]
                while not messages.empty():
                    ready.append(messages.get_nowait())
                done = ready[-1] is None
                if done:
                    ready.pop()
                if ready:
                    yield ready
                if done:
                    break
            await task  # re-raises a failure the app's own boundary did not answer
        finally:
            task.cancel()  # the client left: the endpoint's own clean-up cancels the scheduler request

    def health(self) -> dict:
        s = self.server
        return {"model": s.model_id, "device": self.device, "ready": s.ready,
                "running": s.scheduler.batch_size, "waiting": s.scheduler.queue_depth}

    def metrics_text(self) -> bytes:
        return self.server.metrics.text()

    def __del__(self):  # Ray Serve's graceful shutdown
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()


def actor_options(device: str, cpus: int) -> dict:
    """Ray resources of one replica: a GPU of its own, or `cpus` cores and as many BLAS threads."""
    if device == "cuda":
        return {"num_gpus": 1, "num_cpus": 1}
    threads = str(cpus)
    return {"num_cpus": cpus, "runtime_env": {"env_vars": dict.fromkeys(BLAS_THREAD_VARS, threads)}}


def deploy(n: int, model, load_kwargs: dict, server_kwargs: dict, *, cpus: int = 1, warm_up: bool = True,
           health_check_period_s: float = 2.0) -> list[Replica]:
    """Starts N replicas as Serve applications (Ray must be initialised) and waits until each
    has loaded its model; returns the front's records of them, all up."""
    from ray import serve

    serve.start(proxy_location="Disabled")  # the front is our own; Ray opens no HTTP port
    device = load_kwargs.get("device", "cpu")
    max_ongoing = server_kwargs.get("max_batch", 16) + server_kwargs.get("max_queue", 64) + PROBE_ROOM
    deployment = serve.deployment(EngineReplica, name="engine", num_replicas=1, max_ongoing_requests=max_ongoing,
                                  ray_actor_options=actor_options(device, cpus),
                                  health_check_period_s=health_check_period_s)
    names = [f"{APP_PREFIX}{i}" for i in range(n)]
    targets = [serve.RunTarget(deployment.bind(model, load_kwargs, server_kwargs, warm_up), name=name,
                               route_prefix=None) for name in names]
    handles = serve.run_many(targets)  # all load at once; returns when every one is running
    replicas = [Replica(name, handle, up=True) for name, handle in zip(names, handles)]
    for r in replicas:
        r.status = r.handle.health.remote().result(timeout_s=60)
    return replicas


def undeploy(replicas: list[Replica]) -> None:
    from ray import serve

    for r in replicas:
        serve.delete(r.name)


# ---- the front: one endpoint, the single server's middleware, a choice of replica -------------

def forwarded_scope(scope) -> dict:
    """The parts of an ASGI scope a replica's app reads (the rest, the front's app and router,
    does not cross processes)."""
    keep = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "root_path",
            "headers", "client", "server")
    return {k: scope[k] for k in keep if k in scope}


def replica_died(error: BaseException) -> bool:
    """Whether a failed call means the replica's process is gone (rather than a bug in it)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return isinstance(error, (RayActorError, ReplicaUnavailableError))


class Front:
    """The HTTP side: forwards each request to a replica chosen by `policy`, probes them."""

    def __init__(self, replicas: list[Replica], policy, limits: Limits | None = None, *,
                 api_key: str | None = None, cors_origins=(), probe_period: float = 1.0, probe_timeout: float = 10.0):
        self.replicas = replicas
        self.policy = policy
        self.limits = limits or Limits()
        self.api_key = api_key
        self.cors_origins = tuple(cors_origins)
        self.probe_period = probe_period
        self.probe_timeout = probe_timeout
        self.metrics = RouterMetrics(replicas)

    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app):
            prober = asyncio.ensure_future(self.probe_forever())
            yield
            prober.cancel()

        async def http_error(request, exc):  # 404, 405, ... in OpenAI's error format, as the single server
            error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
            return JSONResponse(error.body(), status_code=exc.status_code)

        return Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            # the rest, unknown paths and methods too: the replica's app answers, in its own words
            Route("/{path:path}", self.route, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
        ], middleware=middleware(self.api_key, self.cors_origins, on_error=self.metrics.front_error),
            exception_handlers={HTTPException: http_error}, lifespan=lifespan)

    # ---- replicas' health ----------------------------------------------------------------------
    async def call(self, replica: Replica, method: str):
        """A short call on a replica (health, metrics), bounded by the probe timeout."""
        async def ask():
            return await getattr(replica.handle, method).remote()

        return await asyncio.wait_for(ask(), self.probe_timeout)

    async def probe(self, replica: Replica) -> None:
        try:
            replica.status = await self.call(replica, "health")
        except Exception as e:  # dead, being replaced, or stuck: no new requests until it answers
            if replica.up:
                log.warning("replica %s is down: %s", replica.name, type(e).__name__)
            replica.up = False
            return
        if not replica.up:
            log.warning("replica %s is up again", replica.name)
        replica.up = True

    async def probe_forever(self) -> None:
        while True:
            await asyncio.gather(*(self.probe(r) for r in self.replicas))
            await asyncio.sleep(self.probe_period)

    # ---- endpoints -----------------------------------------------------------------------------
    async def health(self, request):
        up = [r for r in self.replicas if r.up]
        replicas = {r.name: {"up": r.up, "in_flight": r.in_flight, **(r.status or {})} for r in self.replicas}
        if not up:
            return JSONResponse({"status": "no replica is up", "replicas": replicas}, status_code=503)
        return JSONResponse({"status": "ok", "model": (up[0].status or {}).get("model"), "replicas_up": len(up),
                             "running": sum((r.status or {}).get("running", 0) for r in up),
                             "waiting": sum((r.status or {}).get("waiting", 0) for r in up), "replicas": replicas})

    async def metrics_endpoint(self, request):
        up = [r for r in self.replicas if r.up]
        answers = await asyncio.gather(*(self.call(r, "metrics_text") for r in up), return_exceptions=True)
        texts = {r.name: a for r, a in zip(up, answers) if isinstance(a, bytes)}
        return Response(self.metrics.text(texts), media_type=self.metrics.content_type)

    def key(self, raw: bytes, kind: str) -> str | None:
        """The routing key of a body (CPU work: run in a worker thread). A body that does not
        parse routes by load; its replica answers the 400, in the single server's words."""
        try:
            return prefix_key(parse_body(raw, self.limits), kind)
        except APIError:
            return None

    async def route(self, request):
        kind = GENERATION_PATHS.get(request.url.path)
        try:
            raw = await read_body(request, self.limits)
            key = None
            if kind is not None and self.policy.needs_key:
                key = await anyio.to_thread.run_sync(self.key, raw, kind)
            replica = self.policy.choose(self.replicas, key)
            if replica is None:
                raise APIError(503, "no replica is up (they are restarting or failed): retry shortly",
                               type="server_busy", code="no_replica")
        except APIError as e:
            self.metrics.refused.labels(str(e.status)).inc()
            return JSONResponse(e.body(), status_code=e.status)
        return Relay(self, replica, raw)


class Relay:
    """The answer to a forwarded request: the replica's ASGI messages, sent on as they come.
    A Starlette endpoint may return any ASGI callable as its response."""

    def __init__(self, front: Front, replica: Replica, body: bytes):
        self.front, self.replica, self.body = front, replica, body

    async def __call__(self, scope, receive, send):
        r = self.replica
        r.in_flight += 1
        r.routed += 1
        stream = r.handle.options(stream=True).forward.remote(forwarded_scope(scope), self.body)
        disconnect = asyncio.ensure_future(_wait_for_disconnect(receive))
        started = streaming = complete = finished = False
        outcome = "disconnected"
        try:
            while True:
                item = asyncio.ensure_future(stream.__anext__())
                if not complete:  # once the answer is out, a client that closes changes nothing
                    await asyncio.wait({item, disconnect}, return_when=asyncio.FIRST_COMPLETED)
                    if not item.done():  # the client left: cancelling the stream cancels its request
                        item.add_done_callback(_retrieve)
                        item.cancel()
                        return
                try:
                    messages = await item
                except StopAsyncIteration:
                    finished = True
                    outcome = "answered"
                    return
                for message in messages:
                    if message["type"] == "http.response.start":
                        started = True
                        # the replica's own request id goes: the front's middleware adds the client's
                        headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                        streaming = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
                        message = {**message, "headers": [*headers, (b"x-tinyllm-replica", r.name.encode())]}
                    elif message["type"] == "http.response.body" and not message.get("more_body", False):
                        complete = True
                    await send(message)
        except Exception as e:
            finished = True
            outcome = "failed"
            await self.fail(e, started, streaming, scope, receive, send)
        finally:
            if not finished:
                stream.cancel()
            disconnect.cancel()
            r.in_flight -= 1
            self.front.metrics.routed.labels(r.name, outcome).inc()

    async def fail(self, error: Exception, started: bool, streaming: bool, scope, receive, send) -> None:
        r = self.replica
        request_id = scope.get("state", {}).get("request_id")
        if replica_died(error):
            r.up = False  # until a probe reaches Ray's replacement
            log.warning("request %s: replica %s died: %s", request_id, r.name, type(error).__name__)
            answer = APIError(502, f"replica {r.name} failed while answering this request "
                              f"({type(error).__name__}); the other replicas are serving: retry it",
                              type="server_error", code="replica_failed")
        else:  # the replica's code raised: a bug, answered as the single server answers one
            log.error("request %s: replica %s failed: %s", request_id, r.name, error)
            answer = APIError(500, f"internal server error (request id {request_id})", type="server_error",
                              code="internal_error")
        if not started:
            response = JSONResponse(answer.body(), status_code=answer.status,
                                    headers={"x-tinyllm-replica": r.name})
            await response(scope, receive, send)
        elif streaming:  # the status line is out: tell it as the stream's last event, as app.py does
            await send({"type": "http.response.body", "body": (sse_line(answer.body()) + SSE_DONE).encode(),
                        "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _retrieve(task) -> None:
    """Marks a cancelled call's outcome as seen (asyncio would log it as never retrieved)."""
    if not task.cancelled():
        task.exception()


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# ---- metrics: per replica and in total ---------------------------------------------------------

class RouterMetrics:
    """The front's own counters, and the replicas' metrics merged at scrape time."""

    def __init__(self, replicas: list[Replica]):
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter
        from prometheus_client.core import GaugeMetricFamily

        self.content_type = CONTENT_TYPE_LATEST
        r = self.registry = CollectorRegistry()
        self.routed = Counter("tinyllm_router_requests", "Requests forwarded, by replica and outcome "
                              "(answered, failed, disconnected)", ["replica", "outcome"], registry=r)
        self.refused = Counter("tinyllm_router_refused", "Requests the front answered itself, by status "
                               "(body limits, no replica up)", ["status"], registry=r)
        self.errors = Counter("tinyllm_router_errors", "Failures of the front itself (JSON 500)", ["endpoint"],
                              registry=r)

        class Replicas:  # read when scraped
            def collect(self):
                up = GaugeMetricFamily("tinyllm_router_replica_up", "1 while the replica answers", labels=["replica"])
                busy = GaugeMetricFamily("tinyllm_router_in_flight", "Requests routed to the replica and not yet "
                                         "answered", labels=["replica"])
                for rep in replicas:
                    up.add_metric([rep.name], float(rep.up))
                    busy.add_metric([rep.name], rep.in_flight)
                return [up, busy]

        r.register(Replicas())

    def front_error(self, endpoint: str, status: int) -> None:
        self.errors.labels(endpoint).inc()

    def text(self, replica_texts: dict[str, bytes]) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        merged = CollectorRegistry(auto_describe=False)
        families = merge_metrics(replica_texts)

        class Merged:
            def collect(self):
                return families

        merged.register(Merged())
        return generate_latest(merged) + generate_latest(self.registry)


def merge_metrics(replica_texts: dict[str, bytes]) -> list:
    """Each replica's Prometheus text -> the same families summed over replicas (totals, under
    the single server's names) and per replica (`tinyllm_replica_*`, labelled `replica`).
    Counters, gauges and histogram buckets of the same labels add up; `_created` times do not."""
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    def per_replica(name: str) -> str:
        return "tinyllm_replica_" + name.removeprefix("tinyllm_")

    totals, sums, per = {}, {}, {}
    for replica, text in replica_texts.items():
        for family in text_string_to_metric_families(text.decode()):
            if family.name not in totals:
                totals[family.name] = Metric(family.name, family.documentation, family.type)
                per[family.name] = Metric(per_replica(family.name), family.documentation + " (per replica)",
                                          family.type)
                sums[family.name] = {}
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                per[family.name].add_sample(per_replica(s.name), {"replica": replica, **s.labels}, s.value)
                key = (s.name, tuple(s.labels.items()))
                sums[family.name][key] = sums[family.name].get(key, 0.0) + s.value
    for name, metric in totals.items():
        for (sample, labels), value in sums[name].items():
            metric.add_sample(sample, dict(labels), value)
    return [*totals.values(), *per.values()]


# ---- the command line ----------------------------------------------------------------------------

def build_parser():
    """The single server's flags (model, serving, limits, security), and the replicas' own."""
    p = single.build_parser()
    p.prog = PROG
    p.description = "N replicas of a Llama-family model on Ray Serve, behind one OpenAI-compatible endpoint."
    g = p.add_argument_group("replicas (Ray Serve)")
    g.add_argument("--replicas", type=int, required=True, metavar="N",
                   help="engine replicas: with --device cuda one per GPU, on the CPU one process each")
    g.add_argument("--routing", choices=tuple(POLICIES), default="least-loaded",
                   help="least-loaded (default), or prefix: requests sharing a prompt prefix go to one replica "
                   "(consistent hashing, bounded loads)")
    g.add_argument("--ray-address", default="local", metavar="ADDRESS",
                   help="'local' (default): a Ray instance of this machine's own, no cluster needed; 'auto': the "
                   "cluster that `ray start` joined this machine to; or the head's HOST:PORT")
    g.add_argument("--cpus-per-replica", type=int, default=1, metavar="N",
                   help="CPU cores Ray reserves for each replica; on the CPU also its BLAS threads (default 1)")
    g.add_argument("--probe-period", type=float, default=1.0, metavar="S",
                   help="seconds between health probes of the replicas (default 1)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def check_args(args) -> None:
    single.check_args(args)
    if args.replicas < 1:
        raise UsageError(f"--replicas: must be >= 1, got {args.replicas}")
    if args.cpus_per_replica < 1:
        raise UsageError(f"--cpus-per-replica: must be >= 1, got {args.cpus_per_replica}")
    if not args.probe_period > 0:
        raise UsageError(f"--probe-period: must be > 0 seconds, got {args.probe_period}")
    from ..backend import parse_device

    parse_device(args.device)  # a malformed value is refused with the single server's words
    if args.device.strip().lower() not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: with --replicas, Ray gives each replica a GPU of its own, "
                         "which the replica sees as 'cuda': use --device cuda (or cpu)")


def check_resources(args, resources: dict, local: bool) -> None:
    """Ray waits, without a word, for resources that never come: refuse what this machine
    cannot hold. A cluster may be growing (an autoscaler), so there it is only a warning."""
    kind, each = ("GPU", 1) if args.device.strip().lower() == "cuda" else ("CPU", args.cpus_per_replica)
    need, have = args.replicas * each, int(resources.get(kind, 0))
    if need <= have:
        return
    message = (f"--replicas {args.replicas}: needs {need} {kind}s ({each} each), "
               f"{'this machine has' if local else 'the Ray cluster has'} {have}")
    if local:
        raise UsageError(message)
    print(f"{PROG}: warning: {message}; replicas wait until the cluster has them", file=sys.stderr, flush=True)


def replica_options(args) -> tuple[dict, dict]:
    """(tinyllm.load's keyword arguments, Server's) for every replica."""
    load_kwargs = {**load_options(args), "device": args.device.strip().lower()}
    server_kwargs = {"model_id": args.served_model_name, "max_batch": args.max_batch, "max_queue": args.max_queue,
                     "max_context": args.max_context, "default_max_tokens": args.default_max_tokens,
                     "limits": single.limits(args), "prefix_cache_mb": args.prefix_cache_mb}
    return load_kwargs, server_kwargs


def serve(args) -> int:
    check_args(args)
    key = single.api_key(args)
    try:
        import uvicorn

        import prometheus_client  # noqa: F401
        import ray
        import starlette  # noqa: F401
        from ray import serve as ray_serve  # noqa: F401
    except ImportError as e:
        raise UsageError(f"{e.name} is missing: pip install 'tinyllm[ray]'") from None

    local = args.ray_address == "local"
    ray.init(address=args.ray_address, include_dashboard=False if local else None,
             logging_level=logging.WARNING, log_to_driver=True)
    replicas = []
    try:
        check_resources(args, ray.cluster_resources(), local)
        load_kwargs, server_kwargs = replica_options(args)
        start = time.perf_counter()
        replicas = deploy(args.replicas, args.model, load_kwargs, server_kwargs, cpus=args.cpus_per_replica,
                          warm_up=not args.no_warm_up)
        front = Front(replicas, make_policy(args.routing, [r.name for r in replicas]), single.limits(args),
                      api_key=key, cors_origins=args.cors_origin, probe_period=args.probe_period)
        status = replicas[0].status
        print(f"tinyllm.replicas: {len(replicas)} replicas of {status['model']} on {status['device']} "
              f"({'this machine' if local else 'Ray cluster ' + args.ray_address}), ready in "
              f"{time.perf_counter() - start:.1f} s, routing {args.routing}{', API key required' if key else ''}",
              file=sys.stderr, flush=True)
        try:
            uvicorn.Server(single.uvicorn_config(front.app(), args)).run()
        except KeyboardInterrupt:
            pass
    finally:
        if replicas:
            undeploy(replicas)
        ray.shutdown()
    return 0


def main(argv=None, prog: str = PROG) -> int:
    """`prog` names the command in messages: `tinyllm replicas` when the console command runs this."""
    return run_main(prog, serve, parse_args(argv))
