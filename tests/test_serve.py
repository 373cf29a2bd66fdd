"""The HTTP server, end to end: the real `python -m tinyllm.serve` in a subprocess on
127.0.0.1, the default model, talked to with the official `openai` client (chat and
completions, streamed and not) and with plain HTTP (errors, disconnects, /metrics).

The reference for "the tokens a request returns alone" is greedy decoding written here,
one sequence at a time with `Model.forward` (itself checked against transformers in
test_default_model.py): a batched step must not change any sequence's tokens."""
from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the server tests need the openai client (pip install 'tinyllm[test]')")
pytest.importorskip("starlette", reason="the server needs starlette (pip install 'tinyllm[serve]')")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'tinyllm[serve]')")
pytest.importorskip("prometheus_client", reason="the server needs prometheus_client (pip install 'tinyllm[serve]')")

import tinyllm  # noqa: E402

from benchmarks.serve_load import ServeProcess  # noqa: E402
from helpers_serve import http_request  # noqa: E402

pytestmark = pytest.mark.slow

MAX_BATCH, MAX_QUEUE = 16, 4
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # a prompt the model continues for a long time
PROMPTS = [
    "The capital of France is", "Once upon a time, there was a", "def fibonacci(n):",
    "The three primary colors are", "My favourite breakfast is", "Water boils at a temperature of",
    "In 1492, Columbus", "The quick brown fox", "To make a cup of tea, first", "The largest planet in our solar system",
    "A haiku about autumn:", "import numpy as np\n", "The meaning of life is", "Photosynthesis is the process",
    "Dear diary, today I", "The best way to learn a language is",
]


# ---- the server and the reference model, once per module ------------------------------------------

@pytest.fixture(scope="module", params=["off", "on"], ids=["engine-in-process", "engine-process"])
def server(request, tmp_path_factory):
    """The server in a subprocess with one BLAS thread (ServeProcess's default): the test process
    works while the server waits and the other way round, and on a 2-core machine with other
    jobs two OpenBLAS threads that wait for each other made steps up to 10x slower. Every test
    runs twice: with the model and its scheduler in the server's process, and in a process of
    their own (--engine-process on, the GPU's default)."""
    srv = ServeProcess(tmp_path_factory.mktemp("serve") / "serve.log",
                       ["--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE), "--shutdown-timeout", "20",
                        "--engine-process", request.param])
    try:
        try:
            srv.wait_ready(300)
        except SystemExit as e:  # wait_healthy's one line, with the server's own output
            pytest.fail(f"{e}:\n{srv.log_path.read_text()}")
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def llm():
    return tinyllm.load()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def request(method: str, path: str, body=None, *, port: int, timeout: float = 120):
    """Plain HTTP: (status, parsed JSON or text)."""
    status, _, answer = http_request(port, method, path, body, timeout=timeout)
    return status, answer


def greedy_alone(llm, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding of one sequence with Model.forward: prefill, then one token at a time."""
    model = llm.model
    eos = set(llm.tokenizer.eos_ids) | set(model.config.eos_token_ids)
    cache = model.new_cache(len(prompt_ids) + max_tokens)
    logits = model.forward(np.asarray([prompt_ids]), cache)  # [1, 1, V]
    out = []
    for _ in range(max_tokens):
        token = int(np.argmax(logits[0, -1]))
        out.append(token)
        if token in eos or len(out) == max_tokens:
            break
        logits = model.forward(np.asarray([[token]]), cache)
    return out


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from the Prometheus text format (0 when absent)."""
    pattern = re.escape(name + ("{" + labels + "}" if labels else "")) + r" ([0-9.e+-]+)"
    m = re.search(r"^" + pattern + "$", text, re.M)
    return float(m.group(1)) if m else 0.0


def metrics(server) -> str:
    status, text = request("GET", "/metrics", port=server.port)
    assert status == 200
    return text


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"not within {timeout} s: {what}")


def open_stream(port: int, body: dict):
    """A streamed completion over a raw connection: (connection, response) once headers arrived."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def hang_up(conn) -> None:
    """Close the connection the way a client that goes away does (FIN now, whatever is unread)."""
    if conn.sock is not None:
        conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def idle(server) -> bool:
    text = metrics(server)
    return metric(text, "tinyllm_running_requests") == 0 and metric(text, "tinyllm_queue_depth") == 0


# ---- the OpenAI API through the official client ------------------------------------------------------

def test_models_and_health(server, client):
    models = client.models.list().data
    assert len(models) == 1 and models[0].id == "SmolLM2-135M-Instruct.Q4_1"
    status, body = request("GET", "/health", port=server.port)
    assert status == 200 and body["status"] == "ok"


def test_completion_matches_greedy_reference(client, model_id, llm):
    prompt = "The capital of France is"
    ids = llm.tokenizer.encode(prompt)
    expected = greedy_alone(llm, ids, 8)
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=8, extra_body={"return_token_ids": True})
    choice = r.choices[0]
    assert choice.token_ids == expected
    assert choice.text == llm.tokenizer.decode(expected)
    assert choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 8, len(ids) + 8)
    assert r.object == "text_completion" and r.model == model_id


def test_completion_stream_equals_non_stream(client, model_id):
    args = dict(model=model_id, prompt="Once upon a time, there was a", max_tokens=8)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_ignore_eos_generates_past_the_end_to_max_tokens(client, model_id):
    """ignore_eos (vLLM's request extension): the default question's greedy answer ends with the
    end-of-sequence token before 40 tokens; with the flag the same answer goes on to 40, its
    first text unchanged, finishing for length. A value that is not a boolean is a 400 naming it."""
    messages = [{"role": "user", "content": "In two sentences, what does a baker do?"}]
    plain = client.chat.completions.create(model=model_id, messages=messages, max_tokens=40)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 40
    longer = client.chat.completions.create(model=model_id, messages=messages, max_tokens=40,
                                            extra_body={"ignore_eos": True})
    assert longer.choices[0].finish_reason == "length" and longer.usage.completion_tokens == 40
    assert longer.choices[0].message.content.startswith(plain.choices[0].message.content)
    with pytest.raises(openai.BadRequestError, match="ignore_eos: expected true or false"):
        client.chat.completions.create(model=model_id, messages=messages, max_tokens=4, extra_body={"ignore_eos": 1})


def test_chat_non_stream_and_stream(client, model_id, llm):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]
    ids = llm.prompt_ids(messages, chat=True)
    expected = greedy_alone(llm, ids, 10)
    r = client.chat.completions.create(model=model_id, messages=messages, max_tokens=10,
                                       extra_body={"return_token_ids": True})
    assert r.choices[0].token_ids == expected
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == llm.tokenizer.decode(expected)
    eos = set(llm.tokenizer.eos_ids) | set(llm.config.eos_token_ids)
    assert r.choices[0].finish_reason == ("stop" if expected[-1] in eos else "length")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected)

    chunks = list(client.chat.completions.create(model=model_id, messages=messages, max_tokens=10, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_string_and_seeded_sampling(client, model_id, llm):
    prompt = "The three primary colors are"
    full = llm.tokenizer.decode(greedy_alone(llm, llm.tokenizer.encode(prompt), 12))
    word = full.split()[2]  # a word from the middle of the greedy answer
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=12, stop=[word])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(word)]

    args = dict(model=model_id, prompt=prompt, max_tokens=8, temperature=1.0, top_p=0.95, seed=1234)
    assert client.completions.create(**args).choices[0].text == client.completions.create(**args).choices[0].text


# ---- continuous batching -------------------------------------------------------------------------------

def test_16_concurrent_greedy_requests_equal_their_alone_answers(server, client, model_id, llm):
    max_tokens = 6

    def ask(prompt):
        r = client.completions.create(model=model_id, prompt=prompt, max_tokens=max_tokens,
                                      extra_body={"return_token_ids": True})
        return r.choices[0].token_ids

    reference = [greedy_alone(llm, llm.tokenizer.encode(p), max_tokens) for p in PROMPTS]
    alone = [ask(p) for p in PROMPTS]  # one at a time: each decodes in a batch of 1
    assert alone == reference

    steps_before = metric(metrics(server), "tinyllm_batch_size_count")
    barrier = threading.Barrier(len(PROMPTS))

    def ask_together(prompt):
        barrier.wait()
        return ask(prompt)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(ask_together, PROMPTS))
    assert together == reference

    # The requests really shared decode steps: far fewer steps than tokens, batches above 1.
    text = metrics(server)
    steps = metric(text, "tinyllm_batch_size_count") - steps_before
    assert 0 < steps < len(PROMPTS) * (max_tokens - 1) / 2
    assert metric(text, "tinyllm_batch_size_bucket", 'le="1.0"') < metric(text, "tinyllm_batch_size_count")
    # every step's round is split into host time and model time (the round that emitted the
    # last token records its time just after: wait for that)
    deadline = time.monotonic() + 5
    while (metric(text, "tinyllm_step_host_seconds_count") != metric(text, "tinyllm_batch_size_count")
           and time.monotonic() < deadline):
        time.sleep(0.05)
        text = metrics(server)
    assert metric(text, "tinyllm_step_host_seconds_count") == metric(text, "tinyllm_batch_size_count")
    assert metric(text, "tinyllm_step_model_seconds_count") == metric(text, "tinyllm_batch_size_count")
    assert metric(text, "tinyllm_step_model_seconds_sum") > 0


def test_scheduler_sequences_join_and_leave_at_step_boundaries(llm):
    """The scheduler driven step by step in this process: B joins while A runs, C joins
    later and leaves first, D is cancelled mid-way; each finished sequence has exactly its
    alone tokens, and the batch sizes show who shared which step."""
    from tinyllm.generate import StopRules
    from tinyllm.sampler import SamplingParams
    from tinyllm.scheduler import Finished, Observer, Piece, Request, Scheduler

    class Steps(Observer):
        def __init__(self):
            self.sizes = []  # batch size of every decode step
            self.times = []  # (host, model) seconds of every round that ran a step

        def step(self, batch_size):
            self.sizes.append(batch_size)

        def step_time(self, host, model):
            self.times.append((host, model))

    steps = Steps()
    sched = Scheduler(llm.model, llm.tokenizer, max_batch=4, max_queue=0, observer=steps)
    no_eos = ()  # fixed lengths, so the join/leave timing below is known
    events: dict[str, list] = {}

    def submit(name, prompt, max_tokens):
        events[name] = []
        request = Request(llm.tokenizer.encode(prompt), SamplingParams(), StopRules(max_tokens, eos_ids=no_eos),
                          events[name].append)
        sched.submit(request)
        return request

    # a sequence's first step prefills its prompt (its first token), each later one decodes
    submit("A", PROMPTS[0], 6)
    sched.run_once()                      # A prefilled (token 1)
    submit("B", PROMPTS[1], 6)
    sched.run_once()                      # B joins: a step of 2 (A token 2, B token 1)
    d = submit("D", PROMPTS[3], 20)
    submit("C", PROMPTS[2], 2)
    sched.run_once()                      # D and C join: a step of 4
    sched.cancel(d)
    while sched.running or sched.waiting:
        sched.run_once()                  # D leaves at the boundary; C (2 tokens), A, then B finish
    assert steps.sizes == [1, 2, 4, 3, 2, 2, 1]
    # each round's time, split: the model's forward passes, and the host's share around them
    assert len(steps.times) == len(steps.sizes)
    assert all(host >= 0 and model > 0 for host, model in steps.times)

    def alone(prompt, n):  # greedy_alone without EOS: the same fixed lengths
        model = llm.model
        ids = llm.tokenizer.encode(prompt)
        cache = model.new_cache(len(ids) + n)
        logits, out = model.forward(np.asarray([ids]), cache), []
        for _ in range(n):
            out.append(int(np.argmax(logits[0, -1])))
            logits = model.forward(np.asarray([[out[-1]]]), cache)
        return out

    for name, prompt, n in (("A", PROMPTS[0], 6), ("B", PROMPTS[1], 6), ("C", PROMPTS[2], 2)):
        pieces, end = events[name][:-1], events[name][-1]
        assert isinstance(end, Finished) and end.reason == "length"
        assert [p.token_id for p in pieces] == end.token_ids == alone(prompt, n)
    end = events["D"][-1]
    assert isinstance(end, Finished) and end.reason == "cancelled"
    assert all(isinstance(p, Piece) for p in events["D"][:-1]) and end.completion_tokens == 1  # its prefill's token
    assert not sched.running and sched.queue_depth == 0


# ---- bad requests, disconnects, a full queue ------------------------------------------------------------

def test_disconnect_mid_stream_frees_the_slot(server, client, model_id):
    before = metric(metrics(server), "tinyllm_request_finish_total", 'reason="cancelled"')
    conn, resp = open_stream(server.port, {"prompt": COUNTING, "max_tokens": 500})
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")  # the first token arrived
    wait_until(lambda: metric(metrics(server), "tinyllm_running_requests") == 1, 30, "the stream is running")
    hang_up(conn)
    wait_until(lambda: idle(server), 10, "the disconnected stream left the batch")
    text = metrics(server)
    assert metric(text, "tinyllm_request_finish_total", 'reason="cancelled"') == before + 1
    r = client.completions.create(model=model_id, prompt="Hello", max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_burst_beyond_the_queue_gets_503_then_service_resumes(server, client, model_id):
    streams = []
    try:
        for i in range(MAX_BATCH + MAX_QUEUE):  # fill the batch and the queue; each stream is accepted
            conn, resp = open_stream(server.port, {"prompt": COUNTING, "max_tokens": 500})
            assert resp.status == 200
            streams.append(conn)
        status, body = request("POST", "/v1/completions", {"prompt": "One more", "max_tokens": 2}, port=server.port)
        assert status == 503
        assert body["error"]["code"] == "queue_full" and "--max-queue" in body["error"]["message"]
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=model_id, prompt="And another", max_tokens=2)
        assert e.value.status_code == 503
    finally:
        for conn in streams:
            hang_up(conn)
    wait_until(lambda: idle(server), 30, "all disconnected streams left the batch and the queue")
    assert metric(metrics(server), "tinyllm_requests_total", 'endpoint="/v1/completions",status="503"') >= 2
    r = client.completions.create(model=model_id, prompt="Hello", max_tokens=3)
    assert r.usage.completion_tokens == 3


BAD_FIELDS = [
    ("temperature", -1), ("top_p", 0), ("top_k", 1.5), ("min_p", 2),
    ("repetition_penalty", 0), ("presence_penalty", 3), ("frequency_penalty", "x"), ("seed", -1),
    ("max_tokens", 0), ("stop", [""]), ("n", 0), ("stream", "yes"), ("logprobs", 21),
    ("logit_bias", {"-1": 5}), ("suffix", "x"), ("no_such_field", 1), ("prompt", [["a"], ["b"]]),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f for f, _ in BAD_FIELDS])
def test_each_invalid_field_is_a_400_naming_it(server, field, value):
    status, body = request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2, field: value},
                           port=server.port)
    assert status == 400, body
    error = body["error"]
    assert error["param"] == field and error["message"].startswith(f"{field}:")
    assert error["type"] == "invalid_request_error"


def test_every_invalid_field_at_once_then_a_normal_request(server, client, model_id, llm):
    body = {field: value for field, value in BAD_FIELDS}
    status, answer = request("POST", "/v1/completions", body, port=server.port)
    assert status == 400
    message = answer["error"]["message"]
    for field, _ in BAD_FIELDS:
        assert f"{field}:" in message, field
    assert answer["error"]["param"] == "no_such_field"  # a field the server does not know is named first
    status, answer = request("POST", "/v1/completions", {**body, "model": "no-such-model"}, port=server.port)
    assert status == 404 and answer["error"]["code"] == "model_not_found"  # an unknown model comes first

    cases = [  # (path, body, the field the error names)
        ("/v1/completions", b'{"prompt": "Hi", "max_tokens": 2', "body"),         # malformed JSON
        ("/v1/completions", b'["a list"]', "body"),
        ("/v1/completions", {"max_tokens": 2}, "prompt"),                            # no prompt
        ("/v1/completions", {"prompt": [1] * llm.config.max_seq_len}, "prompt"),     # longer than the context
        ("/v1/completions", {"prompt": "Hi", "max_tokens": llm.config.max_seq_len}, "max_tokens"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1},
         "max_completion_tokens"),
    ]
    for path, body, field in cases:
        status, answer = request("POST", path, body, port=server.port)
        assert status == 400 and answer["error"]["param"] == field, (body, answer)

    status, answer = request("GET", "/v1/nowhere", port=server.port)
    assert status == 404 and answer["error"]["message"].startswith("GET /v1/nowhere")

    with pytest.raises(openai.BadRequestError) as e:  # what a client of the official SDK sees
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}], n=17)
    assert "n: must be an integer in [1, 16]" in str(e.value)
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert r.usage.completion_tokens >= 1


def test_metrics_in_prometheus_format(server):
    # its own requests: one answered, one refused (the test passes alone, not only after others)
    assert request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}, port=server.port)[0] == 200
    assert request("POST", "/v1/completions", {"prompt": "Hi", "temperature": -1}, port=server.port)[0] == 400
    text = metrics(server)
    assert metric(text, "tinyllm_requests_total", 'endpoint="/v1/completions",status="200"') > 0
    assert metric(text, "tinyllm_requests_total", 'endpoint="/v1/completions",status="400"') > 0
    assert metric(text, "tinyllm_prompt_tokens_total") > 0
    assert metric(text, "tinyllm_generation_tokens_total") > 0
    assert metric(text, "tinyllm_time_to_first_token_seconds_count") > 0
    assert metric(text, "tinyllm_time_per_output_token_seconds_count") > 0
    assert "# TYPE tinyllm_time_to_first_token_seconds histogram" in text
    assert "# TYPE tinyllm_queue_depth gauge" in text


# ---- last: shutdown ----------------------------------------------------------------------------------

def test_graceful_shutdown_finishes_the_stream_in_flight(server):
    conn, resp = open_stream(server.port, {"prompt": "Count to ten:", "max_tokens": 12})
    assert resp.readline().startswith(b"data: ")
    server.proc.send_signal(signal.SIGTERM)
    rest = resp.read().decode()
    assert rest.rstrip().endswith("data: [DONE]")
    assert '"finish_reason": "length"' in rest
    # uvicorn re-raises the signal it handled once it has shut down cleanly
    assert server.proc.wait(60) in (0, -signal.SIGTERM)
    server.log.flush()
    assert "tinyllm.serve: stopped" in server.log_path.read_text()
    with pytest.raises(OSError):
        request("GET", "/health", port=server.port, timeout=2)


def test_step_histogram_reports_what_prometheus_histogram_would():
    """The time between tokens is fed a step at a time (tinyllm/server/metrics.py StepHistogram);
    scraped, it must read as prometheus_client's own Histogram fed the same values one by one:
    values on a bound count in that bucket, past the last bound only in +Inf."""
    import numpy as np
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from tinyllm.server.metrics import StepHistogram

    bounds = (.005, .01, .02, .04, .08, .16, .32, .64, 1.28, 2.56, 5)
    rng = np.random.default_rng(0)
    steps = [list(rng.exponential(0.05, size=n)) for n in (1, 7, 64, 33)] + [[0.0, .005, .01, 5.0, 5.0001, 60.0]]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h = StepHistogram("gap_seconds", "test", bounds)
    ours.register(h)
    ref = Histogram("gap_seconds", "test", buckets=bounds, registry=theirs)
    for values in steps:
        h.observe_many(values)
        for v in values:
            ref.observe(v)

    def samples(registry):
        lines = [line for line in generate_latest(registry).decode().splitlines()
                 if line.startswith("gap_seconds") and "_created" not in line]
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines}

    got, want = samples(ours), samples(theirs)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    assert want['gap_seconds_bucket{le="+Inf"}'] == want["gap_seconds_count"] == sum(map(len, steps))


def test_a_running_server_shortens_the_switch_interval_only(llm):
    """The scheduler thread gets the interpreter back within SWITCH_INTERVAL of asking (it lets
    go in every GPU call); a host program's own shorter interval is kept."""
    import sys

    from tinyllm.server.app import SWITCH_INTERVAL, Server

    before = sys.getswitchinterval()
    try:
        for asked, expected in ((0.005, SWITCH_INTERVAL), (SWITCH_INTERVAL / 5, SWITCH_INTERVAL / 5)):
            sys.setswitchinterval(asked)
            server = Server(llm, max_batch=2, prefix_cache_mb=0)
            server.start(warm_up=False)
            try:
                assert sys.getswitchinterval() == pytest.approx(expected, rel=0.02)  # kept in whole microseconds
            finally:
                server.stop()
    finally:
        sys.setswitchinterval(before)
