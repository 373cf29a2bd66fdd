"""What one request costs the server's HTTP side (not a test).

    python benchmarks/serve_request_cost.py [--requests 500] [--device cpu] [--http-processes 1]

The server as `benchmarks/gpu_serve.py --engine instant --engine-process` builds it (a random
model of TinyLlama's shape cut to two layers and a 1,000-word vocabulary; its engine, in a
process of its own, is the instant stand-in that does no model work), then a client in
another process sends `--requests` requests one after another, each on a new connection, of
each kind in turn: `GET /health`, a completion (`max_tokens` 1, not streamed) and a streamed
one. For each kind: the wall time per request as the client sees it, and the CPU time the
HTTP processes spent per request (user + system, from this process and /proc for the
others). The engine's CPU is not counted: what is left is accepting the connection,
parsing, validation, tokenizing, sending to the engine, and writing the answer.

The difference between a completion and /health is what a request costs its HTTP process
beyond the connection itself: the number that says how fast one HTTP process can take in a
burst of new clients (docs/serving.md, "Several HTTP processes"). Writes
serve_request_cost*.json and .md into --out.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLIENT = r'''
import http.client, json, sys, time
port, kind, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
body = json.dumps({"prompt": "the quick brown fox jumps over the lazy dog " * 5, "max_tokens": 1,
                   "stream": kind == "stream"})
began = time.perf_counter()
for _ in range(n):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    if kind == "health":
        conn.request("GET", "/health")
    else:
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    if resp.status != 200:
        sys.exit(f"{kind}: status {resp.status}")
    conn.close()
print((time.perf_counter() - began) / n)
'''
KINDS = ("health", "completion", "stream")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python benchmarks/serve_request_cost.py", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=500, help="requests of each kind per round (default 500)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over the three kinds (default 2)")
    p.add_argument("--device", default="cpu", help="where the stand-in model's arrays live (default cpu)")
    p.add_argument("--http-processes", type=int, default=1, help="the server's HTTP processes (default 1)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown")
    args = p.parse_args(argv)
    if args.requests < 1 or args.rounds < 1:
        print("serve_request_cost: --requests and --rounds must be >= 1", file=sys.stderr)
        return 2

    from benchmarks import gpu_serve
    from benchmarks.common import cpu_model, fmt, git_commit, markdown_table, write_outputs

    serve_args = gpu_serve.build_parser().parse_args(
        ["--device", args.device, "--engine", "instant", "--engine-process", "--n-layers", "2", "--vocab-size", "1000",
         "--max-batch", "16", "--http-processes", str(args.http_processes)])
    llm = gpu_serve.build_llm(serve_args)[0]
    server, http, thread, port, _ = gpu_serve.start_server(llm, serve_args, 0)
    helpers = [w.pid for w in server.scheduler.helpers]
    try:
        def http_cpu() -> float:
            return time.process_time() + sum(map(gpu_serve.cpu_seconds, helpers))

        rows: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        for _ in range(args.rounds):
            for kind in KINDS:
                cpu = http_cpu()
                run = subprocess.run([sys.executable, "-c", CLIENT, str(port), kind, str(args.requests)],
                                     capture_output=True, text=True)
                cpu = http_cpu() - cpu
                if run.returncode != 0:
                    print(f"serve_request_cost: the client failed: {run.stderr.strip()[-300:]}", file=sys.stderr)
                    return 1
                r = {"wall_ms": 1e3 * float(run.stdout), "http_cpu_ms": 1e3 * cpu / args.requests}
                rows[kind].append(r)
                print(f"{kind:10s} wall {r['wall_ms']:.3f} ms per request, HTTP processes' CPU "
                      f"{r['http_cpu_ms']:.3f} ms per request", file=sys.stderr, flush=True)
    finally:
        gpu_serve.stop_server(server, http, thread)

    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": cpu_model(),
              "commit": git_commit(), "command": "python benchmarks/serve_request_cost.py " + " ".join(argv or sys.argv[1:]),
              "settings": vars(args), "rounds": rows}
    table = markdown_table(["request", "wall ms per request (rounds)", "HTTP processes' CPU ms per request (rounds)"],
                           [[kind, "; ".join(fmt(r["wall_ms"]) for r in rows[kind]),
                             "; ".join(fmt(r["http_cpu_ms"]) for r in rows[kind])] for kind in KINDS])
    markdown = (f"Measured {result['date']} on {result['machine']}, commit `{result['commit']}`.\n\n"
                f"Command: `{result['command']}`\n\n{table}\n")
    print(markdown)
    json_path, md_path = write_outputs(args.out, "serve_request_cost", result, markdown)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
