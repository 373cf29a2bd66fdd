"""How speed changes with length: decode against context length, prefill against prompt length.

    python -m benchmarks.scaling                               # tinyllm on the default model
    python -m benchmarks.scaling --engines tinyllm,transformers --repeats 3

Decode: the cache is filled to each context length (128 ... 2048) and --decode-tokens
greedy steps are timed there. One cache grows through the lengths: after the steps at
128, prompt tokens are appended until it holds 256, and so on; every step attends
over the whole cache, so its cost grows with the context while the weights read stay
the same. Prefill: a fresh cache and one prompt of each length in one call.

Each engine runs in its own process (the workers of benchmarks.e2e). Output:
scaling.json, scaling.md and, when matplotlib is installed, scaling.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import (fmt, header_markdown, load_tokenizer, machine_info, markdown_table, prompt_ids, publish,
                     thread_env)
from .e2e import ENGINES, engine_available, make_engine

WARMUP_TOKENS = 16


def run_worker(spec: dict) -> dict:
    """Inside a worker: both curves for one engine, every repeat."""
    engine = make_engine(spec["engine"])
    engine.capacity = spec["capacity"]
    engine.imports()
    engine.load(spec["model"], spec["threads"])
    ids = spec["ids"]
    tok = engine.prefill(ids[:WARMUP_TOKENS], spec["capacity"])
    for _ in range(4):
        tok = engine.step(tok)

    decode = {str(n): [] for n in spec["contexts"]}
    prefill = {str(n): [] for n in spec["prompt_lengths"]}
    for _ in range(spec["repeats"]):
        held = 0  # tokens in the cache
        for n in spec["contexts"]:
            tok = engine.prefill(ids[:n], spec["capacity"]) if held == 0 else engine.extend(ids[held:n])
            start = time.perf_counter()
            for _ in range(spec["decode_tokens"]):
                tok = engine.step(tok)
            decode[str(n)].append(spec["decode_tokens"] / (time.perf_counter() - start))
            held = n + spec["decode_tokens"]
        for n in spec["prompt_lengths"]:
            start = time.perf_counter()
            engine.prefill(ids[:n], spec["capacity"])
            prefill[str(n)].append(n / (time.perf_counter() - start))
    return {"decode_tok_s": decode, "prefill_tok_s": prefill}


def spawn(spec: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--worker", str(spec_path), str(out_path)],
                              env=thread_env(spec["threads"]), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {"error": f"exit status {proc.returncode}: " + " | ".join(tail)}
        return json.loads(out_path.read_text())


def medians(curve: dict) -> dict:
    return {n: {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v} for n, v in curve.items()}


def plot(result: dict, path: Path) -> Path | None:
    """Both curves side by side; None (and no file) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in result["engines"].items():
        if "error" in r:
            continue
        for ax, key in ((left, "decode_tok_s"), (right, "prefill_tok_s")):
            xs = [int(n) for n in r[key]]
            ax.plot(xs, [r[key][str(n)]["median"] for n in xs], marker="o", label=name)
    left.set(title="decode", xlabel="context length (tokens in the cache)", ylabel="tokens / s")
    right.set(title="prefill", xlabel="prompt length (tokens)", ylabel="prompt tokens / s")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ticks = sorted({int(n) for r in result["engines"].values() if "error" not in r
                        for n in r["decode_tok_s" if ax is left else "prefill_tok_s"]})
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    info = result["machine"]
    fig.suptitle(f"{Path(result['settings']['model']).name} on {info['cpu']} ({result['settings']['threads']} threads), "
                 f"{info['date']}, commit {info['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def to_markdown(result: dict) -> str:
    s = result["settings"]
    md = [f"# Scaling with length: {Path(s['model']).name}\n", header_markdown(result["machine"]),
          f"Median of {s['repeats']} repeats; decode over {s['decode_tokens']} greedy steps at each context length.\n"]
    for key, what, lengths in (("decode_tok_s", "decode tok/s by context length", s["contexts"]),
                               ("prefill_tok_s", "prefill tok/s by prompt length", s["prompt_lengths"])):
        rows = []
        for name, r in result["engines"].items():
            rows.append([name] + (["failed"] * len(lengths) if "error" in r
                                  else [fmt(r[key][str(n)]["median"]) for n in lengths]))
        md += [f"## {what}\n", markdown_table(["engine"] + [str(n) for n in lengths], rows), ""]
    for name, r in result["engines"].items():
        if "error" in r:
            md.append(f"{name} failed: {r['error']}")
    if result.get("plot"):
        md.append(f"![scaling]({Path(result['plot']).name})")
    else:
        md.append("No plot: matplotlib is not installed (pip install matplotlib).")
    return "\n".join(md)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint (default: the embedded SmolLM2-135M-Instruct Q4_1 GGUF)")
    p.add_argument("--engines", default="tinyllm", help="comma-separated, of: " + ", ".join(ENGINES))
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024, 2048])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps(run_worker(spec)))
        return

    from tinyllm.loaders import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    contexts, lengths = sorted(args.contexts), sorted(args.prompt_lengths)
    longest = max(contexts[-1] + args.decode_tokens, lengths[-1])
    ids = prompt_ids(load_tokenizer(model), longest)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in ENGINES:
            raise SystemExit(f"--engines: unknown engine {e!r}; expected some of {', '.join(ENGINES)}")
    base = {"model": str(model), "threads": args.threads, "capacity": longest + 8, "ids": ids,
            "contexts": contexts, "prompt_lengths": lengths, "decode_tokens": args.decode_tokens,
            "repeats": args.repeats}
    result = {"benchmark": "scaling", "machine": machine_info(args.threads),
              "settings": {k: v for k, v in base.items() if k != "ids"}, "engines": {}}
    for e in engines:
        if not engine_available(e):
            result["engines"][e] = {"error": "not installed"}
            continue
        print(f"[scaling] {e}", file=sys.stderr, flush=True)
        r = spawn(base | {"engine": e}, args.timeout)
        result["engines"][e] = r if "error" in r else {k: medians(v) for k, v in r.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot(result, out / "scaling.png")
    result["plot"] = str(png) if png else None
    publish(out, "scaling", result, to_markdown, extra=[png] if png else [])


if __name__ == "__main__":
    main()
