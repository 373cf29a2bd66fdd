"""GPU check of the server's command line end to end: `python -m tinyllm.serve --device cuda`
on a random SmolLM2-shaped checkpoint written to disk (benchmarks/gpu_cli_check.py's), then
concurrent streamed completions over HTTP, /metrics, and a clean stop on SIGINT.

What must hold: the server starts (batched CUDA graphs captured before the port opens),
every stream ends with `data: [DONE]` and its `usage`, the same seeded request gives the
same token ids alone and among 7 others, /metrics counts batched steps, and SIGINT exits 0.
Run on a machine with an NVIDIA GPU:  python benchmarks/gpu_serve_check.py
"""
from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_cli_check import write_checkpoint  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def complete(port: int, prompt: str, max_tokens: int = 24) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True, "temperature": 1.0, "seed": 7}  # seeded: varied and reproducible
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    text, usage, done, ids = [], None, False, None
    for line in resp:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            usage = chunk["usage"]
        elif chunk["choices"]:
            text.append(chunk["choices"][0]["text"] or "")
            ids = chunk["choices"][0].get("token_ids", ids)  # on the finishing chunk
    return {"status": resp.status, "text": "".join(text), "usage": usage, "done": done, "ids": ids}


def main() -> int:
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_checkpoint(d, embed_std=0.05)  # spread-out logits: seeded sampling varies
        port = free_port()
        log = open(d / "server.log", "w+")
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "tinyllm.serve", "--model", str(d), "--device", "cuda",
                                 "--port", str(port), "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                if proc.poll() is not None or time.perf_counter() - start > 300:
                    log.seek(0)
                    print(log.read())
                    print("the server did not start")
                    return 1
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    conn.request("GET", "/health")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    time.sleep(0.5)
            print(f"server up in {time.perf_counter() - start:.1f} s")
            prompts = [f"the {w} of the day is" for w in ("colour", "sound", "end", "start", "time", "light", "air", "sea")]
            alone = complete(port, prompts[0])
            results = [None] * len(prompts)

            def worker(i):
                results[i] = complete(port, prompts[i])

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for i, r in enumerate(results):
                if r["status"] != 200 or not r["done"] or not r["usage"]:
                    failures.append(f"stream {i}: {r}")
            if (not alone["ids"] or len(alone["ids"]) != 24 or len(set(alone["ids"])) < 4
                    or results[0]["ids"] != alone["ids"]):
                failures.append(f"batched ids differ from alone: {results[0]['ids']} vs {alone['ids']}")
            print("alone:   ", alone["ids"], repr(alone["text"][:60]), alone["usage"])
            print("batched: ", results[0]["ids"], repr(results[0]["text"][:60]), results[0]["usage"])
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/metrics")
            metrics = conn.getresponse().read().decode()
            steps = [line for line in metrics.splitlines() if line.startswith("tinyllm_batch_size_count")]
            print("metrics:", steps)
            if not steps or float(steps[0].split()[-1]) <= 0:
                failures.append("no batched steps in /metrics")
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = "killed"
            log.seek(0)
            print(log.read()[-1500:])
        if rc != 0:
            failures.append(f"exit status after SIGINT: {rc}")
    print("FAILED:\n  " + "\n  ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
