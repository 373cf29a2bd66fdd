"""The engine in a process of its own (`--engine-process on`, tinyllm/server/engine_process.py):
what only a second process can get wrong. The server's whole behaviour through it (answers
equal to the greedy reference, disconnects, 503s, metrics, graceful shutdown) is
tests/test_serve.py, which runs every test both ways.

- a model that cannot load is the engine's own error, raised in the HTTP process;
- a JSON grammar is compiled again in the engine, and still constrains the answer;
- a terminal's Ctrl-C reaches both processes: the stream in flight still ends whole;
- an engine that dies ends the requests in flight with an error, and the server says so;
- several HTTP processes (--http-processes) share one engine: each request's answer is the
  greedy reference's, the metrics count every process's requests, and a supervisor's SIGTERM
  to the first process lets every process's streams end whole before all of them exit."""
from __future__ import annotations

import functools
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the server needs starlette (pip install 'tinyllm[serve]')")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'tinyllm[serve]')")
pytest.importorskip("prometheus_client", reason="the server needs prometheus_client (pip install 'tinyllm[serve]')")

import tinyllm  # noqa: E402
from tinyllm.errors import CheckpointNotFoundError  # noqa: E402
from tinyllm.server.engine_process import EngineProcess  # noqa: E402

from benchmarks.serve_load import ServeProcess  # noqa: E402
from helpers_serve import http_request  # noqa: E402

pytestmark = pytest.mark.slow

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def engine_server(tmp_path, *flags) -> ServeProcess:
    srv = ServeProcess(tmp_path / "serve.log", ["--engine-process", "on", "--max-batch", "4",
                                                "--shutdown-timeout", "20", *flags])
    try:
        srv.wait_ready(300)
    except SystemExit as e:
        srv.stop()
        pytest.fail(f"{e}:\n{srv.log_path.read_text()}")
    return srv


def engines(pid: int) -> list[int]:
    """The engine processes `pid` started (from /proc: its children that multiprocessing spawned,
    not its resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:  # field 4: the parent's pid
            found.append(int(stat.parent.name))
    return found


def assert_gone(pids: list[int], timeout: float = 30) -> None:
    """Each of `pids` has exited (within `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} outlived the server"


def open_stream(port: int, body: dict):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def test_a_model_that_cannot_load_is_the_engines_error_raised_here(tmp_path):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(CheckpointNotFoundError, match="missing.gguf"):
        EngineProcess(functools.partial(tinyllm.load, missing))
    # and from the command line: one line naming the file, no traceback
    run = subprocess.run([sys.executable, "-m", "tinyllm.serve", "--engine-process", "on", "-m", str(missing)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.gguf" in lines[0] and "Traceback" not in run.stderr, run.stderr


def test_a_json_grammar_crosses_to_the_engine_and_constrains_the_answer(tmp_path):
    pytest.importorskip("llguidance", reason="response_format needs llguidance (pip install 'tinyllm[json]')")
    from tinyllm.constrain import Grammars

    llm = tinyllm.load()
    grammars = Grammars(llm.tokenizer, llm.config.vocab_size)

    def first_refused(ids: list[int]) -> int | None:
        """The index of the first token a fresh json_object matcher does not allow (None: all allowed)."""
        constraint = grammars.json_object().start()
        for i, token in enumerate(ids):
            if not constraint.allowed()[token]:
                return i
            constraint.advance(token)
        return None

    srv = engine_server(tmp_path)
    try:
        def ask(**extra):
            status, _, body = http_request(srv.port, "POST", "/v1/chat/completions", {
                "messages": [{"role": "user", "content": "Describe a cat in one sentence."}], "max_tokens": 24,
                "return_token_ids": True, **extra})
            assert status == 200, body
            return body["choices"][0]["token_ids"]

        free = ask()
        constrained = ask(response_format={"type": "json_object"})
    finally:
        srv.stop()
    assert first_refused(free) is not None  # unconstrained, the model writes prose: the check can fail
    assert first_refused(constrained) is None
    assert llm.tokenizer.decode(constrained).startswith("{")


def test_ctrl_c_to_both_processes_lets_the_stream_in_flight_end_whole(tmp_path):
    srv = engine_server(tmp_path)
    try:
        (engine,) = engines(srv.proc.pid)
        conn, resp = open_stream(srv.port, {"prompt": "Count to ten:", "max_tokens": 16, "ignore_eos": True})
        assert resp.readline().startswith(b"data: ")
        for pid in (engine, srv.proc.pid):  # what a terminal's Ctrl-C does to its process group
            os.kill(pid, signal.SIGINT)
        rest = resp.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        assert '"finish_reason": "length"' in rest
        assert srv.proc.wait(60) in (0, -signal.SIGINT)
        assert not Path(f"/proc/{engine}").exists()
    finally:
        srv.stop()
    assert "tinyllm.serve: stopped" in srv.log_path.read_text()


def test_an_engine_that_dies_fails_the_requests_in_flight_and_health_says_so(tmp_path):
    srv = engine_server(tmp_path)
    try:
        (engine,) = engines(srv.proc.pid)
        conn, resp = open_stream(srv.port, {"prompt": COUNTING, "max_tokens": 2000, "ignore_eos": True})
        assert resp.readline().startswith(b"data: ")
        os.kill(engine, signal.SIGKILL)
        rest = resp.read().decode()  # the stream ends: an error event, then [DONE]
        assert '"type": "server_error"' in rest and "engine process ended" in rest
        assert rest.rstrip().endswith("data: [DONE]")
        status, _, body = http_request(srv.port, "GET", "/health")
        assert status == 503 and body["status"] == "failed" and "engine process ended" in body["error"]
        status, _, body = http_request(srv.port, "GET", "/metrics")  # kept by the engine: gone with it
        assert status == 503 and "engine process ended" in body["error"]["message"]
        status, _, body = http_request(srv.port, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 503 and "engine process ended" in body["error"]["message"]
        assert body["error"]["code"] == "engine_failed"
        assert srv.proc.poll() is None  # the HTTP side still answers
    finally:
        srv.stop()


def greedy(llm, prompt: str, max_tokens: int) -> str:
    """The greedy answer, one token at a time with Model.forward (the readable reference)."""
    model = llm.model
    ids = llm.prompt_ids(prompt)
    cache = model.new_cache(len(ids) + max_tokens)
    logits = model.forward(np.asarray([ids]), cache)
    out = []
    for _ in range(max_tokens):
        out.append(int(np.argmax(logits[0, -1])))
        logits = model.forward(np.asarray([[out[-1]]]), cache)
    return llm.tokenizer.decode(out)


def read_stream(resp) -> tuple[str, list]:
    """The text of a streamed completion and its finish reasons (data lines up to [DONE])."""
    text, reasons = "", []
    for line in resp:
        if not line.startswith(b"data: "):
            continue
        if line.strip() == b"data: [DONE]":
            break
        choice = json.loads(line[6:])["choices"][0]
        text += choice["text"]
        reasons.append(choice["finish_reason"])
    return text, reasons


def test_several_http_processes_share_one_engine_and_its_metrics(tmp_path):
    prompts = [f"{COUNTING[:3 * k]}" for k in range(1, 7)] * 2  # 12 requests, 6 prompts
    expected = {p: greedy(tinyllm.load(), p, 10) for p in set(prompts)}
    srv = engine_server(tmp_path, "--http-processes", "3")
    try:
        children = engines(srv.proc.pid)
        assert len(children) == 3  # the engine and two more HTTP processes
        streams = [open_stream(srv.port, {"prompt": p, "max_tokens": 10, "ignore_eos": True}) for p in prompts]
        for prompt, (conn, resp) in zip(prompts, streams):
            text, reasons = read_stream(resp)
            assert text == expected[prompt], prompt
            assert reasons[-1] == "length"
        status, _, body = http_request(srv.port, "GET", "/health")
        assert status == 200 and body["status"] == "ok"
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
    finally:
        srv.stop()
    counted = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("tinyllm_")}
    assert counted['tinyllm_requests_total{endpoint="/v1/completions",status="200"}'] == 12
    assert counted["tinyllm_generation_tokens_total"] == 120
    assert counted["tinyllm_time_to_first_token_seconds_count"] == 12


def test_sigterm_to_the_first_http_process_lets_every_stream_end_whole(tmp_path):
    """A supervisor stops the server with SIGTERM to the process it started: the other HTTP
    processes shut down with it, their streams in flight finishing first, and every process
    (the engine too) exits."""
    srv = engine_server(tmp_path, "--http-processes", "3")
    try:
        children = engines(srv.proc.pid)
        streams = [open_stream(srv.port, {"prompt": COUNTING, "max_tokens": 24, "ignore_eos": True})
                   for _ in range(6)]
        for conn, resp in streams:
            assert resp.readline().startswith(b"data: ")
        srv.proc.send_signal(signal.SIGTERM)
        for conn, resp in streams:
            text, reasons = read_stream(resp)
            assert reasons[-1] == "length"
        assert srv.proc.wait(60) in (0, -signal.SIGTERM)
        assert_gone(children)
    finally:
        srv.stop()


def test_the_request_limit_holds_across_http_processes(tmp_path):
    """--max-batch 1 --max-queue 1: with one request running and one waiting, each HTTP
    process refuses the next (a 503), whichever took the connection; once they end, requests
    are taken again."""
    srv = engine_server(tmp_path, "--http-processes", "2", "--max-batch", "1", "--max-queue", "1")
    try:
        long = {"prompt": COUNTING, "max_tokens": 2000, "ignore_eos": True}
        running = open_stream(srv.port, long)
        assert running[1].readline().startswith(b"data: ")
        waiting = open_stream(srv.port, long)
        for _ in range(200):
            status, _, health = http_request(srv.port, "GET", "/health")
            if (health["running"], health["waiting"]) == (1, 1):
                break
            time.sleep(0.05)
        assert (health["running"], health["waiting"]) == (1, 1), health
        for _ in range(8):  # new connections: each process takes some
            status, _, body = http_request(srv.port, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
            assert status == 503 and "server busy" in body["error"]["message"], body
        for conn, resp in (running, waiting):
            conn.close()
        for _ in range(200):
            status, _, body = http_request(srv.port, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
            if status == 200:
                break
            time.sleep(0.05)
        assert status == 200, body
    finally:
        srv.stop()


def test_when_the_first_http_process_is_killed_the_others_and_the_engine_end(tmp_path):
    """No process outlives the one a supervisor started, even killed outright."""
    srv = engine_server(tmp_path, "--http-processes", "3")
    try:
        children = engines(srv.proc.pid)
        assert len(children) == 3
        srv.proc.kill()
        srv.proc.wait(30)
        assert_gone(children)
    finally:
        srv.stop()

