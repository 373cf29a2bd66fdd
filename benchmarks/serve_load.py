"""The server under load: total tokens/s with 1, 4 and 16 concurrent streams.

    python -m benchmarks.serve_load                        # the default model, 1 / 4 / 16 streams
    python -m benchmarks.serve_load --streams 1 8 --max-tokens 64 --repeats 3 --out results/

What it shows: continuous batching. One stream decodes one token per step, and each step
reads every weight once; 16 streams share each step, so the weights are read once for 16
tokens. Total throughput should grow with the number of streams while each stream's own
speed drops a little.

How: the real `python -m tinyllm.serve` runs in a subprocess with --threads BLAS threads
(default 1: the clients run on the same machine, and on a 2-core machine whose other core
is busy, two OpenBLAS threads that wait for each other made runs 10x slower at random). For each stream count C, C client threads open streamed completions at the
same moment (distinct prompts, greedy, `max_tokens` each) and read them to the end.
    total tok/s       generated tokens of all streams / wall time from the first request to the last [DONE]
    stream tok/s      one stream's (tokens - 1) / (its last token - its first token), median over streams
    ttft_s            time from sending a request to its first text, median over streams
                      (ttft_p90_s: the 90th percentile)
Generated tokens are the server's own `usage.completion_tokens`. After a warm-up, the counts
take turns (1, 4, 16, 1, 4, 16, ...) --repeats times; the tables show medians.

Beside it, without HTTP, the engine ceiling: `Model.decode_batch` for B sequences timed
in this process (after the server has exited), B tokens per step. The gap between the two
is the cost of the scheduler, the sampler, the detokenizer and HTTP.
"""
from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from .common import (PASSAGE, fmt, header_markdown, machine_info, markdown_table, summarize, thread_env,
                     write_outputs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int) -> list[str]:
    """n distinct plain-text prompts: the passage, starting at different words."""
    words = PASSAGE.split()
    return [" ".join(words[(7 * i) % len(words):][:40]) for i in range(n)]


class ServeProcess:
    """`python -m tinyllm.serve` on a free loopback port, `flags` added to its command line, its
    output in `log_path`, BLAS limited to `threads`, until `stop()`: the server that the load,
    lm-eval and replica benchmarks and the server tests start."""

    def __init__(self, log_path: Path, flags=(), model=None, threads: int = 1):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1/completions"
        self.log_path = log_path
        self.log = open(log_path, "w")
        cmd = [sys.executable, "-m", "tinyllm.serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning", *flags]
        if model:
            cmd += ["--model", str(model)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=thread_env(threads))

    def wait_ready(self, timeout: float = 600) -> "ServeProcess":
        wait_healthy(self.proc, self.port, "the server", f"see {self.log_path}", timeout=timeout)
        return self

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (the server's graceful shutdown), a kill after `timeout` s; the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def http_request(port: int, method: str, path: str, body=None, headers=None, timeout: float = 60):
    """(status, headers, parsed JSON or text); `body`: bytes as they are, anything else as JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read().decode()
        try:
            return resp.status, resp.headers, json.loads(raw)
        except json.JSONDecodeError:
            return resp.status, resp.headers, raw
    finally:
        conn.close()


def start_server(model, threads: int, max_batch: int, log_path: Path):
    """A ready server; -> (its process, its port)."""
    server = ServeProcess(log_path, ["--max-batch", str(max_batch)], model, threads).wait_ready()
    return server.proc, server.port


def wait_healthy(proc, port: int, what: str, hint: str, ready=lambda body: True, timeout: float = 600) -> None:
    """Poll GET /health on 127.0.0.1:port until it answers 200 and `ready(parsed body)`; exit
    (SystemExit naming `what` and `hint`) if the process ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}; {hint}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            resp = conn.getresponse()
            if resp.status == 200 and ready(json.loads(resp.read() or b"{}")):
                return
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{what} did not start in {timeout:g} s; {hint}")


def stream_once(port: int, prompt: str, max_tokens: int, start_gate: threading.Barrier) -> dict:
    """One streamed completion; times of its first and last text, and the server's token count."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "stream": True,
                       "stream_options": {"include_usage": True}})
    start_gate.wait()
    sent = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    written = time.perf_counter()  # connected, and the request handed to the socket
    resp = conn.getresponse()
    first = last = None
    tokens = 0
    for line in resp:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"] and chunk["choices"][0]["text"]:
            last = time.perf_counter()
            first = first or last
    done = time.perf_counter()
    conn.close()
    return {"sent": sent, "written": written, "first": first, "last": last, "done": done, "tokens": tokens}


def percentile(values, q: float):
    """The nearest-rank q-th percentile (q in [0, 100]) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def load_run(port: int, n_streams: int, max_tokens: int, texts: list[str] | None = None,
             per_request: bool = False) -> dict:
    """n_streams streams started together (prompts: `texts`, default `prompts(n_streams)`);
    figures of this one run. per_request: also each request's [sent, written (connected and
    the request handed to the socket), first text, done] times
    (time.perf_counter: one clock for every process of the machine)."""
    texts = prompts(n_streams) if texts is None else texts
    if len(texts) != n_streams:
        raise ValueError(f"load_run: {n_streams} streams need {n_streams} prompts, got {len(texts)}")
    gate = threading.Barrier(n_streams)
    results: list[dict] = [None] * n_streams

    def worker(i):
        results[i] = stream_once(port, texts[i], max_tokens, gate)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = min(r["sent"] for r in results)
    end = max(r["done"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    per_stream = [(r["tokens"] - 1) / (r["last"] - r["first"]) for r in results
                  if r["tokens"] > 1 and r["last"] > r["first"]]
    ttfts = [r["first"] - r["sent"] for r in results if r["first"]]
    return {"tokens": tokens, "wall_s": end - start, "total_tok_s": tokens / (end - start),
            "stream_tok_s": statistics.median(per_stream) if per_stream else None,
            "ttft_s": statistics.median(ttfts) if ttfts else None,
            "ttft_p90_s": percentile(ttfts, 90) if ttfts else None} | (
        {"requests": [[r["sent"], r["written"], r["first"], r["done"]] for r in results]} if per_request else {})


def engine_ceiling(model_path, batch_sizes, repeats: int, steps: int = 8) -> dict:
    """decode_batch alone: B sequences with a 40-token prompt each, tokens/s = B / step time."""
    import numpy as np

    import tinyllm

    llm = tinyllm.load(model_path)
    model = llm.model
    out = {}
    for b in batch_sizes:
        caches = []
        for text in prompts(b):
            cache = model.new_cache(256)
            model.forward(np.asarray([llm.tokenizer.encode(text)]), cache)
            caches.append(cache)
        model.decode_batch([1] * b, caches)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                model.decode_batch([1] * b, caches)
            times.append((time.perf_counter() - start) / steps)
        out[b] = {"step_s": summarize(times), "tok_s": b / statistics.median(times), "best_tok_s": b / min(times)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per stream")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS threads of the server and of decode_batch alone (default 1, see above)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    # BLAS reads its thread count when NumPy is first imported: set it before anything imports NumPy.
    os.environ.update({k: v for k, v in thread_env(args.threads).items() if k.endswith("_THREADS")})
    info = machine_info(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    proc, port = start_server(args.model, args.threads, max(args.streams), out_dir / "serve_load.server.log")
    runs = {}
    try:
        load_run(port, 2, 4)  # warm-up: the client side and the batched path
        for repeat in range(args.repeats):  # counts take turns, so a noisy moment hits them alike
            for n in args.streams:
                runs.setdefault(n, []).append(load_run(port, n, args.max_tokens))
                print(f"repeat {repeat + 1}: {n:3d} streams, {runs[n][-1]['total_tok_s']:7.1f} tok/s total",
                      file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        proc.wait(60)

    ceiling = engine_ceiling(args.model, args.streams, args.repeats)

    def med(n, key):
        return statistics.median(r[key] for r in runs[n] if r[key] is not None)

    def best(n):
        return max(r["total_tok_s"] for r in runs[n])

    first = args.streams[0]
    rows = []
    for n in args.streams:
        rows.append([n, fmt(med(n, "total_tok_s")), fmt(med(n, "total_tok_s") / med(first, "total_tok_s"), 2) + "x",
                     fmt(best(n)), fmt(best(n) / best(first), 2) + "x", fmt(med(n, "stream_tok_s")),
                     fmt(med(n, "ttft_s")), fmt(ceiling[n]["tok_s"]), fmt(ceiling[n]["best_tok_s"])])
    table = markdown_table(["streams", "total tok/s (median)", "vs 1 stream", "total tok/s (best)", "vs 1 stream",
                            "tok/s per stream", "TTFT s", "decode_batch alone (median)", "(best)"], rows)
    markdown = (f"{header_markdown(info)}\nServer: `python -m tinyllm.serve --max-batch {max(args.streams)}`, "
                f"{args.max_tokens} greedy tokens per stream, {args.threads} BLAS threads, "
                f"{args.repeats} runs per stream count (median, and best = least disturbed run).\n\n{table}\n")
    result = {"machine": info, "settings": vars(args), "runs": {str(k): v for k, v in runs.items()},
              "decode_batch": {str(k): v for k, v in ceiling.items()}}
    json_path, md_path = write_outputs(out_dir, "serve_load", result, markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
