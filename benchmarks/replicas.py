"""Replicas on Ray Serve: total tokens/s with 1 and 2 CPU replicas behind one endpoint, beside
the single-process server with 1 and 2 BLAS threads (the same cores, shared another way).

    python -m benchmarks.replicas                     # the default model, 8 streams of 32 tokens
    python -m benchmarks.replicas --streams 4 8 --max-tokens 64 --repeats 3

What it shows: whether N processes, each with its own batch and one BLAS thread, get more
out of the machine's cores than one process whose BLAS calls use all of them, once HTTP,
the front and Ray's streaming are paid for. On a GPU machine the same command line runs one
replica per GPU (`--device cuda`): that measurement is a separate run (docs/replicas.md).

How: each configuration runs in a subprocess on 127.0.0.1 (`python -m tinyllm.replicas
--replicas N --cpus-per-replica 1`, or `python -m tinyllm.serve` with its BLAS threads set),
one after another (they would not fit in memory together); after a warm-up, C client threads
open streamed completions at the same moment (distinct prompts, greedy, `max_tokens` each)
and read them to the end, --repeats times, the stream counts taking turns. Figures as in
benchmarks/serve_load.py (its client code is reused):
    total tok/s   generated tokens of all streams / wall time from the first request to the last [DONE]
    stream tok/s  one stream's (tokens - 1) / (its last token - its first token), median over streams
    ttft_s        time from sending a request to its first text, median over streams
Every request is bounded: a fixed number, each with a timeout.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from .common import fmt, header_markdown, machine_info, markdown_table, publish, thread_env
from .serve_load import free_port, load_run, start_server, wait_healthy


def start_replicas(model, replicas: int, max_batch: int, log_path: Path):
    """`python -m tinyllm.replicas` in a subprocess; returns (process, port) once every replica is up."""
    port = free_port()
    cmd = [sys.executable, "-m", "tinyllm.replicas", "--replicas", str(replicas), "--cpus-per-replica", "1",
           "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(max_batch), "--log-level", "warning"]
    if model:
        cmd += ["--model", str(model)]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=thread_env(1))
    wait_healthy(proc, port, "tinyllm.replicas", f"see {log_path}",
                 ready=lambda health: health.get("replicas_up") == replicas)
    return proc, port


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


CONFIGS = {  # name -> how to start it
    "server, 1 thread": lambda model, batch, log: start_server(model, 1, batch, log),
    "server, 2 threads": lambda model, batch, log: start_server(model, 2, batch, log),
    "1 replica": lambda model, batch, log: start_replicas(model, 1, batch, log),
    "2 replicas": lambda model, batch, log: start_replicas(model, 2, batch, log),
}


def to_markdown(result: dict) -> str:
    runs, streams = result["runs"], result["settings"]["streams"]
    base_name = "1 replica" if "1 replica" in runs else next(iter(runs))
    base = statistics.median(r["total_tok_s"] for r in runs[base_name][str(streams[-1])])
    rows = []
    for name, by_streams in runs.items():
        for n in streams:
            rs = by_streams[str(n)]
            total = statistics.median(r["total_tok_s"] for r in rs)
            rows.append([name, n, fmt(total), fmt(max(r["total_tok_s"] for r in rs)),
                         fmt(total / base, 2) + "x" if n == streams[-1] else "",
                         fmt(statistics.median(r["stream_tok_s"] for r in rs if r["stream_tok_s"])),
                         fmt(statistics.median(r["ttft_s"] for r in rs))])
    table = markdown_table(["configuration", "streams", "total tok/s (median)", "total tok/s (best)",
                            f"vs {base_name} ({streams[-1]} streams)", "stream tok/s", "ttft s"], rows)
    s = result["settings"]
    return (f"# Replicas on Ray Serve (CPU)\n\n{header_markdown(result['machine'])}\n"
            f"{s['max_tokens']} tokens per stream, greedy, {s['repeats']} repeats; medians.\n\n{table}\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replicas", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--streams", type=int, nargs="+", default=[8])
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per stream")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                   help=f"which of: {', '.join(repr(c) for c in CONFIGS)} (default: all)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    os.environ.update({k: v for k, v in thread_env(1).items() if k.endswith("_THREADS")})
    info = machine_info(None)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict = {}
    for name in args.configs:
        proc, port = CONFIGS[name](args.model, max(args.streams), out_dir / "replicas.server.log")
        try:
            load_run(port, 2, 4)  # warm-up
            for repeat in range(args.repeats):
                for n in args.streams:
                    run = load_run(port, n, args.max_tokens)
                    runs.setdefault(name, {}).setdefault(str(n), []).append(run)
                    print(f"{name}, repeat {repeat + 1}: {n} streams, {run['total_tok_s']:.1f} tok/s total",
                          file=sys.stderr, flush=True)
        finally:
            stop(proc)
    result = {"machine": info, "settings": {"streams": args.streams, "max_tokens": args.max_tokens,
                                            "repeats": args.repeats, "model": args.model}, "runs": runs}
    publish(out_dir, "replicas", result, to_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
