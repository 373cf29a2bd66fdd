"""Replicas on Ray Serve (tinyllm/server/replicas.py): one local Ray instance for the module,
two CPU replicas of a tiny random Llama behind the front, on 127.0.0.1, talked to with the
official `openai` client and with plain HTTP.

The reference is the single-process server (tinyllm/server/app.py, itself checked against
greedy decoding and transformers in test_serve.py), serving the same files in this process:
every answer through the replicas must carry the same tokens and the same errors.

The routing policies, the metrics merge and the flags are tested without Ray."""
from __future__ import annotations

import json
import socket
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib.util import find_spec

import pytest

openai = pytest.importorskip("openai", reason="the server tests need the openai client (pip install 'tinyllm[test]')")
pytest.importorskip("starlette", reason="the server needs starlette (pip install 'tinyllm[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'tinyllm[serve]')")
pytest.importorskip("prometheus_client", reason="the server needs prometheus_client (pip install 'tinyllm[serve]')")

import tinyllm  # noqa: E402
from tinyllm.errors import TinyLLMError  # noqa: E402
from tinyllm.server import replicas as rep  # noqa: E402
from tinyllm.server.routing import LeastLoaded, PrefixAffinity, Replica, make_policy, prefix_key  # noqa: E402

from helpers_serve import http_request  # noqa: E402

needs_ray = pytest.mark.skipif(find_spec("ray") is None, reason="Ray is not installed: pip install 'tinyllm[ray]' "
                               "(not part of tinyllm[test]: ray[serve] is a large download)")
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["a baker had a little shop", "The quick brown fox", "def main():\n", "Once upon a time",
           "Numbers like 12345", "the old town, and every"]


# ---- routing, without Ray ---------------------------------------------------------------------------

def records(n, up=True):
    return [Replica(f"r{i}", up=up) for i in range(n)]


def test_least_loaded_takes_the_fewest_in_flight_then_the_fewest_routed():
    rs = records(3)
    rs[0].in_flight, rs[1].in_flight, rs[2].in_flight = 2, 1, 1
    rs[1].routed, rs[2].routed = 5, 3
    assert LeastLoaded().choose(rs) is rs[2]
    rs[2].up = False
    assert LeastLoaded().choose(rs) is rs[1]
    assert LeastLoaded().choose(records(2, up=False)) is None


def test_prefix_affinity_is_consistent_and_spreads_keys():
    rs = records(4)
    policy = PrefixAffinity([r.name for r in rs])
    keys = [f"system prompt {i}" for i in range(2000)]
    owner = {k: policy.choose(rs, k).name for k in keys}
    assert all(policy.choose(rs, k).name == owner[k] for k in keys[:100])  # same key, same replica
    shares = [sum(o == r.name for o in owner.values()) / len(keys) for r in rs]
    assert min(shares) > 0.1, shares  # 64 points per replica: no replica gets a tiny share
    rs[1].up = False  # a replica goes: only its keys move
    moved = [k for k in keys if policy.choose(rs, k).name != owner[k]]
    assert moved and all(owner[k] == "r1" for k in moved)
    rs[1].up = True  # and come back to it when it returns (a replaced replica keeps its name)
    assert all(policy.choose(rs, k).name == owner[k] for k in keys)


def test_prefix_affinity_bounds_the_load_of_a_hot_prefix():
    rs = records(2)
    policy = PrefixAffinity([r.name for r in rs], load_factor=1.25)
    home = policy.choose(rs, "hot")
    other = rs[1 - rs.index(home)]
    home.in_flight = other.in_flight = 4  # bound: ceil(1.25 * (4 + 4 + 1) / 2) = 6 > 4: it takes the key
    assert policy.choose(rs, "hot") is home
    home.in_flight, other.in_flight = 6, 2  # the same bound, now reached: the next replica on the ring
    assert policy.choose(rs, "hot") is other
    other.in_flight = 0
    assert policy.choose(rs, None) is other  # no key: least loaded
    with pytest.raises(ValueError, match="load_factor"):
        PrefixAffinity(["a"], load_factor=0.5)
    with pytest.raises(ValueError, match="--routing"):
        make_policy("random", ["a"])


def test_prefix_key():
    assert prefix_key({"prompt": "x" * 300}, "completion") == "x" * 256
    assert prefix_key({"prompt": ["abc"]}, "completion") == "abc"
    assert prefix_key({"prompt": [1, 22, 333]}, "completion") == "1,22,333"
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    assert prefix_key(chat, "chat") == "system\nBe brief.\nuser\nHi\n"
    for bad, kind in (([1], "chat"), ({"prompt": 3}, "completion"), ({"messages": "hi"}, "chat"),
                      ({"messages": [{"role": "user", "content": 5}]}, "chat")):
        assert prefix_key(bad, kind) is None


def test_merge_metrics_sums_replicas_and_keeps_each():
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    texts = {}
    for name, tokens, waits in (("a", 5, (0.02, 0.3)), ("b", 7, (0.02,))):
        r = CollectorRegistry()
        Counter("tinyllm_generation_tokens", "Tokens generated", registry=r).inc(tokens)
        h = Histogram("tinyllm_time_to_first_token_seconds", "ttft", buckets=(0.05, 1), registry=r)
        for w in waits:
            h.observe(w)
        texts[name] = generate_latest(r)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(rep.RouterMetrics([]).text(texts).decode())
               for s in family.samples}
    assert samples[("tinyllm_generation_tokens_total", ())] == 12
    assert samples[("tinyllm_replica_generation_tokens_total", (("replica", "a"),))] == 5
    assert samples[("tinyllm_replica_generation_tokens_total", (("replica", "b"),))] == 7
    assert samples[("tinyllm_time_to_first_token_seconds_bucket", (("le", "0.05"),))] == 2
    assert samples[("tinyllm_time_to_first_token_seconds_count", ())] == 3
    assert not any(name.endswith("_created") and "replica" in name for name, _ in samples)


# ---- flags, and a GPU index that does not exist -------------------------------------------------------

def test_replica_flags():
    args = rep.parse_args(["--replicas", "2", "--device", "CUDA", "--routing", "prefix"])
    rep.check_args(args)
    load_kwargs, server_kwargs = rep.replica_options(args)
    assert load_kwargs["device"] == "cuda" and server_kwargs["max_batch"] == args.max_batch
    assert rep.actor_options("cuda", 1) == {"num_gpus": 1, "num_cpus": 1}
    assert rep.actor_options("cpu", 2)["runtime_env"]["env_vars"]["OPENBLAS_NUM_THREADS"] == "2"
    for argv, words in ((["--replicas", "2", "--device", "cuda:1"], "use --device cuda"),
                        (["--replicas", "0"], "--replicas: must be >= 1"),
                        (["--replicas", "2", "--cpus-per-replica", "0"], "--cpus-per-replica"),
                        (["--replicas", "2", "--device", "tpu"], "expected 'cpu', 'cuda' or 'cuda:N'")):
        with pytest.raises((ValueError, TinyLLMError), match=words):
            rep.check_args(rep.parse_args(argv))


def test_replicas_beyond_this_machine_are_refused_and_a_cluster_is_warned(capsys):
    two_gpus = rep.parse_args(["--replicas", "2", "--device", "cuda"])
    with pytest.raises(ValueError, match=r"--replicas 2: needs 2 GPUs \(1 each\), this machine has 1"):
        rep.check_resources(two_gpus, {"GPU": 1.0, "CPU": 16.0}, local=True)
    rep.check_resources(two_gpus, {"GPU": 1.0}, local=False)  # a cluster may grow: a warning
    assert "warning: --replicas 2: needs 2 GPUs (1 each), the Ray cluster has 1" in capsys.readouterr().err
    rep.check_resources(rep.parse_args(["--replicas", "2"]), {"CPU": 2.0}, local=True)
    with pytest.raises(ValueError, match="needs 4 CPUs"):
        rep.check_resources(rep.parse_args(["--replicas", "2", "--cpus-per-replica", "2"]), {"CPU": 2.0}, local=True)


def test_replicas_command_is_one_line_errors(capsys):
    assert rep.main(["--replicas", "2", "--device", "cuda:1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m tinyllm.replicas: error: --device cuda:1" in err


def test_cuda_index_beyond_the_gpus_is_refused(monkeypatch):
    """`--device cuda:1` on a one-GPU machine: one line naming the GPUs that exist (CuPy faked, so
    this runs without a GPU; test_cuda.py checks it against the real count)."""
    from tinyllm.backend import get_device
    from tinyllm.errors import DeviceError

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(DeviceError, match=r"--device cuda:1: GPU 1 does not exist \(found 1: cuda:0\.\.cuda:0\)"):
        get_device("cuda:1")
    with pytest.raises(DeviceError, match="--device cuda:1"):
        tinyllm.load(device="cuda:1")


# ---- two replicas on a local Ray instance -------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def http_serving(app):
    """uvicorn with the single server's configuration, in a thread, on 127.0.0.1."""
    from helpers_serve import uvicorn_thread
    from tinyllm.server.main import parse_args

    args = parse_args(["--port", str(free_port()), "--log-level", "warning"])
    with uvicorn_thread(app, args):
        yield args.port


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama (context 1024) with a trained tokenizer and a chat template, and no
    end-of-sequence token, so that a request runs for as many tokens as it asks."""
    from conftest import tiny_checkpoint_dir

    d = tmp_path_factory.mktemp("tiny_replicas_model")
    tiny_checkpoint_dir(d, eos=False, chat_template=TEMPLATE, max_position_embeddings=1024)
    return d


SERVER_KWARGS = {"model_id": "tiny", "max_batch": 4, "max_queue": 16, "default_max_tokens": 8}


@pytest.fixture(scope="module")
def single(tiny_dir):
    """The single-process server on the same files: the reference."""
    from tinyllm.server.app import Server

    server = Server(tinyllm.load(tiny_dir), **SERVER_KWARGS)
    server.start(warm_up=False)
    try:
        with http_serving(server.app()) as port:
            yield port
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ray_front(tiny_dir):
    """A local Ray instance (started once for the module), two CPU replicas, the front."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'tinyllm[ray]'")
    from ray import serve

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    try:
        replicas = rep.deploy(2, str(tiny_dir), {"device": "cpu"}, SERVER_KWARGS, warm_up=False)
        front = rep.Front(replicas, LeastLoaded(), probe_period=0.5, probe_timeout=5.0)
        with http_serving(front.app()) as port:
            yield front, port
    finally:
        serve.shutdown()
        ray.shutdown()


def client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)


def request(port, method, path, body=None, timeout=60):
    """(status, headers, parsed JSON or text)."""
    return http_request(port, method, path, body, timeout=timeout)


def answers(port, prompt: str, **sampling):
    """(text, token ids, finish reason) of one prompt four ways: completion and chat, whole and streamed."""
    c = client(port)
    extra = {"return_token_ids": True}
    out = []
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, extra_body=extra, **sampling)
    out.append((r.choices[0].text, r.choices[0].token_ids, r.choices[0].finish_reason, r.usage.total_tokens))
    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=12, stream=True, extra_body=extra,
                                       **sampling))
    out.append(("".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].token_ids,
                chunks[-1].choices[0].finish_reason))
    messages = [{"role": "user", "content": prompt}]
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, extra_body=extra, **sampling)
    out.append((r.choices[0].message.content, r.choices[0].token_ids, r.choices[0].finish_reason))
    chunks = [ch for ch in c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, stream=True,
                                                      stream_options={"include_usage": True}, extra_body=extra,
                                                      **sampling)]
    out.append(("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices),
                [ch.choices[0].token_ids for ch in chunks if ch.choices and ch.choices[0].finish_reason][0],
                chunks[-1].usage.completion_tokens))
    return out


@needs_ray
def test_openai_client_gets_the_single_servers_tokens(ray_front, single):
    front, port = ray_front
    for prompt in PROMPTS[:3]:
        assert answers(port, prompt) == answers(single, prompt)
    seeded = {"temperature": 0.9, "top_p": 0.95, "seed": 7}
    assert answers(port, PROMPTS[3], **seeded) == answers(single, PROMPTS[3], **seeded)
    assert [m.id for m in client(port).models.list().data] == ["tiny"]


@needs_ray
def test_errors_are_the_single_servers(ray_front, single):
    front, port = ray_front
    for method, path, body in (("POST", "/v1/completions", {"prompt": "hi", "temperature": -1, "n": 2}),
                               ("POST", "/v1/chat/completions", {"messages": []}),
                               ("POST", "/v1/completions", b"{not json"),
                               ("POST", "/v1/completions", {"prompt": "hi " * 2000}),
                               ("GET", "/v1/nothing", None), ("GET", "/v1/completions", None)):
        status, headers, got = request(port, method, path, body)
        expected_status, _, expected = request(single, method, path, body)
        assert (status, got) == (expected_status, expected), path
        assert status >= 400 and headers["x-request-id"].startswith("req-")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client(port).completions.create(model="tiny", prompt="hi", temperature=-1)


@needs_ray
def test_concurrent_requests_spread_over_both_replicas(ray_front):
    front, port = ray_front
    body = {"prompt": "The quick brown fox", "max_tokens": 24}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: request(port, "POST", "/v1/completions", body), range(8)))
    assert all(status == 200 for status, _, _ in results)
    assert {got["choices"][0]["text"] for _, _, got in results} == {results[0][2]["choices"][0]["text"]}
    used = [headers["x-tinyllm-replica"] for _, headers, _ in results]
    assert set(used) == {r.name for r in front.replicas}, used
    status, _, health = request(port, "GET", "/health")
    assert status == 200 and health["replicas_up"] == 2
    _, _, metrics = request(port, "GET", "/metrics")
    tokens = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
              if line.startswith(("tinyllm_generation_tokens_total", "tinyllm_replica_generation_tokens_total"))}
    per = [v for k, v in tokens.items() if k.startswith("tinyllm_replica_")]
    assert len(per) == 2 and all(v > 0 for v in per) and tokens["tinyllm_generation_tokens_total"] == sum(per)
    assert 'tinyllm_router_replica_up{replica="tinyllm-replica-0"} 1.0' in metrics


@needs_ray
def test_prefix_routing_keeps_a_shared_prefix_on_one_replica(ray_front):
    front, port = ray_front
    names = [r.name for r in front.replicas]
    front.policy = PrefixAffinity(names)
    try:
        used = {}
        for system in ("You are a baker. " * 20, "You count numbers. " * 20):
            used[system] = {request(port, "POST", "/v1/chat/completions", {
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}],
                "max_tokens": 2})[1]["x-tinyllm-replica"] for i in range(4)}
        assert all(len(replicas) == 1 for replicas in used.values()), used
    finally:
        front.policy = LeastLoaded()


def replica_actor(name: str):
    import ray

    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if a["name"].startswith(f"SERVE_REPLICA::{name}#")]
    assert len(actors) == 1, actors
    return ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.2)


@needs_ray
def test_a_killed_replica_fails_its_requests_clearly_and_the_other_serves(ray_front):
    import ray

    front, port = ray_front
    c = client(port)
    stream = c.completions.with_streaming_response.create(model="tiny", prompt="Once upon a time", max_tokens=1000,
                                                          stream=True)
    with stream as response:
        victim = response.headers["x-tinyllm-replica"]
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        ray.kill(replica_actor(victim), no_restart=True)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]", rest[-3:]
    error = json.loads(rest[-2][6:])["error"]  # the stream's last event, after the tokens sent before the kill
    assert error["code"] == "replica_failed" and victim in error["message"], error
    assert not any("error" in json.loads(line[6:]) for line in rest[:-2])

    # The other replica serves meanwhile; the victim is routed around while Ray replaces it.
    survivor = next(r.name for r in front.replicas if r.name != victim)
    for _ in range(4):
        status, headers, got = request(port, "POST", "/v1/completions", {"prompt": "The quick brown fox"})
        assert status == 200 and headers["x-tinyllm-replica"] == survivor, got

    # Ray starts a new replica under the same name; the front's probe brings it back.
    wait_until(lambda: request(port, "GET", "/health")[2]["replicas_up"] == 2, 90, "the replica did not come back")
    with ThreadPoolExecutor(4) as pool:
        used = set(pool.map(lambda _: request(port, "POST", "/v1/completions", {"prompt": "Once", "max_tokens": 24})
                            [1]["x-tinyllm-replica"], range(4)))
    assert used == {r.name for r in front.replicas}
