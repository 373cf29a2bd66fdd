"""The server's memory under bursts of bad and concurrent good requests (not a test).

    python -m benchmarks.serve_rss [--bursts 6] [--good 16] [--bad 64] [--env MALLOC_ARENA_MAX=2]

Starts `python -m tinyllm.serve` (the default model, 127.0.0.1, a free port), reads its
resident set size (VmRSS in /proc) once it is warm, then runs N bursts. Each burst sends
`--bad` malformed or oversized requests (bodies near the size limit, deep JSON, bad
UTF-8, huge numbers, prompts longer than the context) and `--good` concurrent completions
(16 new tokens each), then waits for the server to be idle and reads RSS again.

A leak grows with every burst; an allocator that keeps freed memory (glibc's malloc keeps
per-thread arenas and returns little to the OS) grows for the first bursts and then stays,
and gives the memory back when asked. `--env MALLOC_ARENA_MAX=2` runs the server with glibc
limited to two arenas; `--trim` runs it through a small wrapper (WRAPPER) that calls glibc's
`malloc_trim(0)` twice a second, which returns every free page to the OS: what RSS falls
back to then is what the server really holds. Writes serve_rss*.json and .md into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import git_commit
from benchmarks.serve_load import free_port, wait_healthy

# The server, with a thread that calls glibc's malloc_trim(0) twice a second: whether the
# growth is memory the allocator keeps but could give back.
WRAPPER = """
import ctypes, sys, threading, time
from tinyllm.server.main import main
libc = ctypes.CDLL("libc.so.6")
def trim():
    while True:
        time.sleep(0.5)
        libc.malloc_trim(0)
threading.Thread(target=trim, daemon=True).start()
sys.exit(main(sys.argv[1:]))
"""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def post(port: int, path: str, body: bytes, timeout: float = 300) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return -1
    finally:
        conn.close()


def bad_bodies(n: int) -> list[tuple[str, bytes]]:
    big = 4 << 20
    kinds = [
        ("/v1/completions", json.dumps({"prompt": "word " * (big // 5 - 10)}).encode()),   # longer than the context
        ("/v1/completions", json.dumps({"prompt": [1] * (big // 3 - 10)}).encode()),       # a million ids
        ("/v1/completions", b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),      # deep
        ("/v1/completions", b'{"prompt": "Hi", "max_tokens": 1' + b"0" * 400 + b"}"),     # huge number
        ("/v1/completions", b'{"prompt": "caf\xe9"}'),                                    # not UTF-8
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}] * 20_000}).encode()),
        ("/v1/completions", b"x" * (big + 1)),                                            # over the limit
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--bursts", type=int, default=6)
    p.add_argument("--good", type=int, default=16, help="concurrent good requests per burst")
    p.add_argument("--bad", type=int, default=28, help="bad requests per burst (8 at a time)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="server environment")
    p.add_argument("--trim", action="store_true", help="the server calls malloc_trim(0) twice a second")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    port = free_port()
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env.update(kv.split("=", 1) for kv in args.env)
    serve = [sys.executable, "-c", WRAPPER] if args.trim else [sys.executable, "-m", "tinyllm.serve"]
    cmd = [*serve, "--port", str(port), "--log-level", "warning", "--max-queue", str(args.good)]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(proc, port, "the server", "its output is discarded: run it alone to see why")
        good = json.dumps({"prompt": "Once upon a time, there was a", "max_tokens": 16}).encode()
        # one good request first, so "warm" includes the first generation's allocations
        post(port, "/v1/completions", good)
        rows = [{"burst": 0, "rss_mib": round(rss_mib(proc.pid), 1), "bad_status": "", "good_ok": ""}]
        print(f"warm: {rows[0]['rss_mib']} MiB", flush=True)
        for burst in range(1, args.bursts + 1):
            with ThreadPoolExecutor(8) as pool:
                bad = list(pool.map(lambda pb: post(port, *pb), bad_bodies(args.bad)))
            with ThreadPoolExecutor(max(1, args.good)) as pool:
                ok = list(pool.map(lambda _: post(port, "/v1/completions", good), range(args.good)))
            time.sleep(1.5)  # idle: the scheduler's batch is empty, the trim thread has run
            row = {"burst": burst, "rss_mib": round(rss_mib(proc.pid), 1),
                   "bad_status": " ".join(str(s) for s in sorted(set(bad))), "good_ok": sum(s == 200 for s in ok)}
            rows.append(row)
            print(f"burst {burst}: {row['rss_mib']} MiB (bad requests got {row['bad_status']}; "
                  f"{row['good_ok']}/{args.good} good ones 200)", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    label = " ".join(args.env + (["malloc_trim"] if args.trim else [])) or "default allocator settings"
    report = {"settings": vars(args), "commit": git_commit(), "label": label, "rows": rows}
    table = [f"# serve_rss: {label}", "", "| burst | RSS (MiB) | bad requests' statuses | good 200s |",
             "|---|---|---|---|"] + [f"| {r['burst']} | {r['rss_mib']} | {r['bad_status']} | {r['good_ok']} |"
                                     for r in rows]
    name = "serve_rss" + ("_" + "_".join(kv.replace("=", "") for kv in args.env) if args.env else "") + \
           ("_trim" if args.trim else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    (out / f"{name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
