"""The server under abuse: the app in this process behind a real uvicorn (a thread, on
127.0.0.1), a tiny random Llama with a small trained tokenizer, so each request costs
milliseconds. Every bad input must end in an answer in OpenAI's error format that names
the problem (400, 401, 413, 500 with a request id), the event loop must keep answering
/health while large requests are handled, and connections that send nothing are closed."""
from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from contextlib import contextmanager

import pytest

openai = pytest.importorskip("openai", reason="the server tests need the openai client (pip install 'tinyllm[test]')")
pytest.importorskip("starlette", reason="the server needs starlette (pip install 'tinyllm[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'tinyllm[serve]')")
pytest.importorskip("prometheus_client", reason="the server needs prometheus_client (pip install 'tinyllm[serve]')")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tinyllm  # noqa: E402
from tinyllm.server.app import Server  # noqa: E402
from tinyllm.server.main import api_key, limits, parse_args, uvicorn_config  # noqa: E402

from helpers_serve import http_request, uvicorn_thread  # noqa: E402

API_KEY = "sk-test-0123456789"
ORIGIN = "https://app.example.com"
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (context 256) with a trained tokenizer and a chat template."""
    from conftest import tiny_checkpoint_dir

    d = tmp_path_factory.mktemp("tiny_serve_model")
    tiny_checkpoint_dir(d, chat_template=TEMPLATE)
    return tinyllm.load(d)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(llm, *flags):
    """Server + uvicorn configured from the command line's own flags, in a thread."""
    args = parse_args(["--port", str(free_port()), "--log-level", "warning", *flags])
    server = Server(llm, "tiny", max_batch=4, max_queue=16, default_max_tokens=4, limits=limits(args),
                    api_key=api_key(args), cors_origins=args.cors_origin)
    server.start(warm_up=False)
    try:
        with uvicorn_thread(server.app(), args):
            yield server, args.port
    finally:
        server.stop()


@pytest.fixture(scope="module")
def plain(tiny):
    with serving(tiny) as (server, port):
        yield server, port


@pytest.fixture(scope="module")
def guarded(tiny):
    with serving(tiny, "--api-key", API_KEY, "--cors-origin", ORIGIN, "--header-timeout", "0.5") as (server, port):
        yield server, port


def request(port, method, path, body=None, headers=None, timeout=60):
    """(status, headers, parsed JSON or text); `body`: bytes as they are, anything else as JSON."""
    return http_request(port, method, path, body, headers, timeout)


def assert_error(status, body, expected_status, param, *words):
    assert status == expected_status, body
    error = body["error"]
    assert error["param"] == param, error
    assert error["message"].startswith("request body:" if param == "body" else f"{param}:"), error
    for word in words:
        assert word in error["message"], (word, error)


# ---- the validator: random bodies never make a 500 ----------------------------------------------

FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop", "stream",
          "stream_options", "n", "best_of", "logprobs", "return_token_ids", "echo", "user"]
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                             max_size=4), max_leaves=12)
good_prompts = st.sampled_from(["Hi", "a baker had", [1, 5, 9], ["once"]])
good_messages = st.just([{"role": "user", "content": "Hi"}])
bodies = st.fixed_dictionaries({}, optional={
    **{name: values for name in FIELDS},
    "prompt": good_prompts | values, "messages": good_messages | values,
    "max_tokens": st.integers(1, 8) | values, "stream": st.booleans(),
}) | values


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(body=bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_random_bodies_get_200_or_a_400_naming_a_field(plain, body, path):
    _, port = plain
    status, _, answer = request(port, "POST", path, json.dumps(body).encode())  # NaN/Infinity as Python writes them
    assert status in (200, 400, 404), (body, answer)
    if status == 404:  # an unknown model, answered before the other fields
        assert answer["error"]["param"] == "model" and answer["error"]["code"] == "model_not_found"
    if status == 400:
        error = answer["error"]
        param = error["param"]
        assert error["message"].startswith("request body:" if param == "body" else f"{param}:"), (body, error)
        if param != "body":  # a field of the body, or the one it lacks
            assert param in body or param == ("prompt" if path == "/v1/completions" else "messages"), (body, error)


# ---- limits on the body --------------------------------------------------------------------------

def test_body_over_the_limit_is_413_naming_it(plain):
    server, port = plain
    limit = server.limits.max_body_bytes
    big = json.dumps({"prompt": "x" * (limit + 10)}).encode()
    status, _, answer = request(port, "POST", "/v1/completions", big)
    assert_error(status, answer, 413, "body", str(limit), "--max-body-bytes")

    # chunked: no Content-Length to trust, so the bytes are counted as they arrive
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=(big[i:i + 65536] for i in range(0, len(big), 65536)),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    assert_error(resp.status, answer, 413, "body", str(limit))


def test_prompt_longer_than_the_context_could_hold_is_refused_before_tokenizing(plain, monkeypatch):
    server, port = plain
    chars = server.validator.max_prompt_chars + 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized")

    monkeypatch.setattr(server.llm, "prompt_ids", no_tokenizing)
    status, _, answer = request(port, "POST", "/v1/completions", {"prompt": "a" * chars})
    assert_error(status, answer, 400, "prompt", f"{chars} characters cannot fit")
    status, _, answer = request(port, "POST", "/v1/chat/completions",
                                {"messages": [{"role": "user", "content": "a" * chars}]})
    assert_error(status, answer, 400, "messages", "cannot fit")


def test_json_nested_too_deep(plain):
    _, port = plain
    status, _, answer = request(port, "POST", "/v1/completions", {"prompt": "Hi", "user": [[[[[[[[[[[[[[[[[[[[[
        [[[[[[[[[[[[[[[[[["deep"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]})
    assert_error(status, answer, 400, "user", "nested deeper than 32")
    status, _, answer = request(port, "POST", "/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert_error(status, answer, 400, "body", "nested deeper")


@pytest.mark.parametrize("field, literal, words", [
    ("max_tokens", "1" + "0" * 400, ["401 digits", "out of range"]),
    ("seed", "-" + "9" * 30, ["out of range"]),
    ("temperature", "1e400", ["does not fit a 64-bit float"]),
    ("top_p", "NaN", ["NaN is not a JSON number"]),
    ("min_p", "-Infinity", ["-Infinity is not a JSON number"]),
])
def test_numbers_out_of_range(plain, field, literal, words):
    _, port = plain
    body = b'{"prompt": "Hi", "%s": %s}' % (field.encode(), literal.encode())
    status, _, answer = request(port, "POST", "/v1/completions", body)
    assert_error(status, answer, 400, field, *words)


def test_text_that_is_not_utf8(plain):
    _, port = plain
    status, _, answer = request(port, "POST", "/v1/completions", b'{"prompt": "caf\xe9"}')  # Latin-1
    assert_error(status, answer, 400, "body", "not valid UTF-8", "0xe9", "offset 15")
    status, _, answer = request(port, "POST", "/v1/chat/completions",
                                b'{"messages": [{"role": "user", "content": "\\ud800"}]}')
    assert_error(status, answer, 400, "messages", "messages[0].content", "lone surrogate")


# ---- failures at the boundary --------------------------------------------------------------------

def test_unexpected_exception_is_a_json_500_with_a_request_id_and_a_log_line(plain, monkeypatch, caplog):
    server, port = plain

    def broken(raw, kind):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(server, "job", broken)
    with caplog.at_level(logging.ERROR, logger="tinyllm.server"):
        status, headers, answer = request(port, "POST", "/v1/completions", {"prompt": "Hi"})
    assert status == 500
    request_id = headers["x-request-id"]
    assert request_id.startswith("req-")
    assert answer["error"]["type"] == "server_error" and request_id in answer["error"]["message"]
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info[0] is RuntimeError
    monkeypatch.undo()
    status, headers, answer = request(port, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200 and headers["x-request-id"] != request_id


def test_health_stays_fast_while_large_requests_are_handled(plain):
    server, port = plain
    limit = server.limits.max_body_bytes
    ids = json.dumps({"prompt": [1] * (limit // 3 - 20)}).encode()  # ~limit bytes: a million numbers to parse
    assert len(ids) <= limit
    text = json.dumps({"prompt": "a baker had " * (limit // 13)}).encode()
    chat = json.dumps({"messages": [{"role": "user", "content": "a baker had"}] * 4000}).encode()
    done = threading.Event()
    statuses = []

    def flood():
        for body in (ids, text, chat, ids):
            statuses.append(request(port, "POST", "/v1/completions" if b"prompt" in body[:12]
                                    else "/v1/chat/completions", body)[0])
        done.set()

    thread = threading.Thread(target=flood)
    thread.start()
    latencies = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    while not done.is_set():
        start = time.perf_counter()
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        latencies.append(time.perf_counter() - start)
        assert resp.status == 200
        time.sleep(0.005)
    conn.close()
    thread.join()
    assert statuses == [400, 400, 400, 400]
    assert len(latencies) >= 5
    # Each of the four bodies, were it parsed or checked on the event loop, would hold up the
    # probes that arrive meanwhile: four slow probes at least. One pause of the whole process
    # (the garbage collector, a busy machine) delays one probe, and is allowed once.
    slow = [t for t in latencies if t >= 0.1]
    assert len(slow) <= 1 and max(latencies) < 1.0, sorted(latencies)[-5:]


# ---- connections ---------------------------------------------------------------------------------

def test_a_connection_that_sends_no_complete_headers_is_closed(guarded):
    _, port = guarded
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # ... and never the blank line
        start = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server, well before the socket's own timeout
        assert time.monotonic() - start < 3


def test_connection_flags_reach_uvicorn():
    args = parse_args(["--keep-alive-timeout", "7", "--limit-concurrency", "99", "--max-header-bytes", "8192"])
    config = uvicorn_config(None, args)
    assert (config.timeout_keep_alive, config.limit_concurrency, config.h11_max_incomplete_event_size) == (7, 99, 8192)
    assert issubclass(config.http, __import__("uvicorn.protocols.http.h11_impl").protocols.http.h11_impl.H11Protocol)


# ---- API key and CORS ----------------------------------------------------------------------------

def test_api_key_with_the_openai_client(guarded):
    _, port = guarded
    base = f"http://127.0.0.1:{port}/v1"
    good = openai.OpenAI(base_url=base, api_key=API_KEY, max_retries=0, timeout=60)
    r = good.completions.create(model="tiny", prompt="Hi", max_tokens=2)
    assert r.usage.completion_tokens >= 1
    assert good.models.list().data[0].id == "tiny"
    for key in ("sk-wrong", API_KEY[:-1], API_KEY + "x"):
        bad = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}])
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"

    status, _, answer = request(port, "GET", "/v1/models")  # no header at all
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert request(port, "GET", "/health")[0] == 200  # open: probes carry no key
    assert request(port, "GET", "/metrics")[0] == 401
    assert request(port, "GET", "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})[0] == 200


def test_api_key_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from tinyllm.cli import UsageError

    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("TINYLLM_API_KEY", "from-env")
    assert api_key(parse_args(["--api-key", "from-flag"])) == "from-flag"
    assert api_key(parse_args(["--api-key-file", str(key_file)])) == "from-file"
    assert api_key(parse_args([])) == "from-env"
    monkeypatch.delenv("TINYLLM_API_KEY")
    assert api_key(parse_args([])) is None
    with pytest.raises(UsageError, match="--api-key-file"):
        api_key(parse_args(["--api-key-file", str(tmp_path / "missing")]))


def test_cors(guarded, plain):
    _, port = guarded
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    status, headers, _ = request(port, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert status == 200  # answered before the key is checked: a preflight carries no credentials
    assert headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in headers["access-control-allow-headers"].lower()
    auth = {"Authorization": f"Bearer {API_KEY}"}
    status, headers, _ = request(port, "GET", "/v1/models", headers={"Origin": ORIGIN, **auth})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = request(port, "GET", "/v1/models", headers={"Origin": "https://evil.example", **auth})
    assert "access-control-allow-origin" not in headers
    _, plain_port = plain  # off by default
    status, headers, _ = request(plain_port, "GET", "/v1/models", headers={"Origin": ORIGIN})
    assert status == 200 and "access-control-allow-origin" not in headers


def test_warm_up_stores_then_loads_a_prefix_and_counts_nothing(tiny):
    """With a prefix cache, the warm-up runs a prompt of two whole blocks twice: the second
    copies its blocks back (on a GPU, CuPy compiles those copies then, not for the first
    client); none of it reaches /metrics."""
    server = Server(tiny, "tiny", max_batch=4, max_queue=16, default_max_tokens=4, prefix_cache_mb=1)
    server.start()
    try:
        prefix = server.scheduler.prefix
        assert prefix.stored == 2 and prefix.hit_tokens == 2 * prefix.block
        assert b"tinyllm_prefix_cache_hit_tokens_total 0.0" in server.metrics.text()
    finally:
        server.stop()


def test_log_lines_follow_stderr_when_it_is_replaced(monkeypatch):
    """The server's log handler writes to the stderr of the moment: a stream replaced (and the
    old one closed) after configuration gets the lines, with no logging error per line (which
    would cost every request a traceback)."""
    import io

    from tinyllm.server.main import configure_logging

    logger = logging.getLogger("tinyllm")
    saved = logger.handlers[:], logger.level, logger.propagate
    first = io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    try:
        configure_logging("info")
        first.close()
        later = io.StringIO()
        monkeypatch.setattr("sys.stderr", later)
        logging.getLogger("tinyllm.server.access").info("GET /health 200")
        assert later.getvalue().rstrip().endswith("INFO tinyllm.server.access: GET /health 200")
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def test_a_stream_interval_sends_fewer_writes_with_the_same_text(tiny, monkeypatch):
    """--stream-interval-ms: a stream is written at most once per interval (the first token at
    once; the end not held back), its text the same as the answer without streaming. Steps are
    slowed to 30 ms, so without an interval every token with text is a write of its own. The writes are
    counted as the ASGI body messages the app sends."""
    from tinyllm.step import ReadableBatch

    step = ReadableBatch.step

    def slow_step(self, *args, **kwargs):
        time.sleep(0.03)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(ReadableBatch, "step", slow_step)
    args = parse_args(["--port", str(free_port()), "--log-level", "warning"])
    server = Server(tiny, "tiny", max_batch=4, max_queue=16, limits=limits(args))
    writes = []

    def counted(app):
        async def asgi(scope, receive, send):
            async def counting(message):
                if message["type"] == "http.response.body" and scope.get("path") == "/v1/completions":
                    writes.append(message.get("body", b""))
                await send(message)
            await app(scope, receive, counting)
        return asgi

    body = {"model": "tiny", "prompt": "a baker had", "max_tokens": 16, "temperature": 0}
    runs = {}
    server.start(warm_up=False)
    try:
        with uvicorn_thread(counted(server.app()), args):
            status, _, whole = request(args.port, "POST", "/v1/completions", body)
            assert status == 200 and whole["usage"]["completion_tokens"] == 16, whole
            for interval in (0.0, 0.2):
                server.stream_interval = interval
                writes.clear()
                began = time.monotonic()
                status, _, streamed = request(args.port, "POST", "/v1/completions", {**body, "stream": True})
                assert status == 200, streamed
                events = [json.loads(line[len("data: "):]) for line in streamed.split("\n\n")
                          if line.startswith("data: ") and line != "data: [DONE]"]
                assert "".join(e["choices"][0]["text"] for e in events) == whole["choices"][0]["text"]
                runs[interval] = len(writes), time.monotonic() - began
    finally:
        server.stop()
    (every, _), (spaced, took) = runs[0.0], runs[0.2]
    assert every >= 8, runs  # 16 tokens, 30 ms apart: each with text its own write
    # the first token, then one write per 0.2 s, the last with the end, then [DONE] and the close
    assert spaced <= 4 + took / 0.2 and spaced < every, runs
    assert took < 0.03 * 16 + 0.5, runs  # the end was not held for an interval


def test_the_stream_interval_flag():
    from tinyllm.cli import UsageError
    from tinyllm.server.main import check_args

    assert parse_args(["-m", "x"]).stream_interval_ms is None  # the server's own: by the streams open
    assert parse_args(["-m", "x", "--stream-interval-ms", "0"]).stream_interval_ms == 0
    for bad in ("-1", "nan", "1e9"):
        with pytest.raises(UsageError, match=r"^--stream-interval-ms: must be 0 to 10000 milliseconds, got "):
            check_args(parse_args(["-m", "x", "--stream-interval-ms", bad]))


def test_the_http_processes_flag():
    from tinyllm.cli import UsageError
    from tinyllm.server.main import check_args, engine_process_wanted, http_processes

    args = parse_args(["-m", "x", "--device", "cpu"])
    check_args(args)
    assert http_processes(args) == 1 and not engine_process_wanted(args)  # auto, on the CPU: one process
    args = parse_args(["-m", "x", "--device", "cpu", "--http-processes", "3"])
    check_args(args)
    assert http_processes(args) == 3 and engine_process_wanted(args)  # several need the engine process
    for bad, message in (("0", "must be 1 to 64, got 0"), ("two", "expected a whole number or auto, got 'two'")):
        with pytest.raises(UsageError, match=f"^--http-processes: {message}$"):
            check_args(parse_args(["-m", "x", "--http-processes", bad]))
    with pytest.raises(UsageError, match="^--http-processes above 1 needs the engine in a process of its own"):
        check_args(parse_args(["-m", "x", "--http-processes", "2", "--engine-process", "off"]))
