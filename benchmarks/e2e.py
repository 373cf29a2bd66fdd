"""End to end on one model: tinyllm beside transformers and llama.cpp, in one run.

    python -m benchmarks.e2e                      # the default model, every peer that is installed
    python -m benchmarks.e2e --engines tinyllm,transformers --repeats 5 --out results/

Every engine gets the same token ids (made once by tinyllm's tokenizer), the same
thread count and greedy decoding, and runs in a process of its own, so that its peak
resident memory (RSS) is its own and one engine's warm caches cannot help another.
Engines are run in turn, repeat after repeat (tinyllm, transformers, llama.cpp,
tinyllm, ...), so that a noisy moment on the machine hits them alike.

Figures, per engine, as min and median over the repeats:
    import_s          importing the engine's package (torch is heavy)
    load_s            reading the checkpoint until the model can run (imports not included)
    ttft_s            time to first token: the chat prompt's prefill plus picking the first token
    prefill_<N>_tok_s N prompt tokens through the model in one call, from an empty cache
    decode_tok_s      --new-tokens greedy steps after the chat prompt, one token per step
    peak_rss_mib      the worker process's peak resident memory
Ratios are tinyllm / peer on the medians of the same run.

NumPy's ceiling: a separate worker times `x @ w.T` for every matrix one decode step of
tinyllm multiplies (the stacked QKV, output, stacked gate|up and down projections of
every layer and the LM head), as bare GEMVs. Decode cannot read the weights faster
than that, so tokens/s <= 1 / (time of those GEMVs).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import (chat_prompt_ids, fmt, header_markdown, leading_matches, load_tokenizer, machine_info,
                     markdown_table, peak_rss_mib, prompt_ids, publish, summarize, thread_env)

ENGINES = ("tinyllm", "transformers", "llama.cpp")
LLAMA_CPP_INSTALL = "pip install llama-cpp-python   # builds llama.cpp from source: a few minutes"
WARMUP_TOKENS = 16


# ---- engines: each runs inside its own worker process ------------------------------------------

class TinyLLMEngine:
    name = "tinyllm"

    def imports(self):
        import numpy as np

        import tinyllm

        self.np, self.tinyllm = np, tinyllm

    def load(self, path, threads):
        self.llm = self.tinyllm.load(path)
        self.model = self.llm.model

    def prefill(self, ids, capacity):
        """A fresh cache, the prompt in one forward, the greedy first token."""
        self.cache = self.model.new_cache(capacity)
        logits = self.model.forward(self.np.asarray([ids]), self.cache)  # [1, 1, V]
        return int(logits[0, -1].argmax())

    def step(self, token):
        logits = self.model.forward(self.np.asarray([[token]]), self.cache)
        return int(logits[0, -1].argmax())

    def extend(self, ids):
        """More prompt tokens after what the cache holds; the greedy next token."""
        logits = self.model.forward(self.np.asarray([ids]), self.cache)
        return int(logits[0, -1].argmax())


class TransformersEngine:
    """transformers in float32, the same checkpoint (a GGUF is dequantized by transformers itself)."""

    name = "transformers"

    def imports(self):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch, self.auto = torch, AutoModelForCausalLM

    def load(self, path, threads):
        torch, AutoModelForCausalLM = self.torch, self.auto
        torch.set_num_threads(threads)
        path = Path(path)
        if path.suffix == ".gguf":
            self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.eval()

    def prefill(self, ids, capacity):
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def step(self, token):
        return self.extend([token])

    def extend(self, ids):
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor([ids]), past_key_values=self.cache, use_cache=True,
                             logits_to_keep=1)
        self.cache = out.past_key_values
        return int(out.logits[0, -1].argmax())


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python, on the GGUF's own (quantized) weights."""

    name = "llama.cpp"

    def imports(self):
        import numpy as np
        from llama_cpp import Llama

        self.np, self.Llama = np, Llama

    def load(self, path, threads):
        self.turn_off_extra_buffer_types()
        self.llm = self.Llama(model_path=str(path), n_ctx=self.capacity, n_batch=512, n_threads=threads,
                              n_threads_batch=threads, logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    @staticmethod
    def turn_off_extra_buffer_types():
        """llama.cpp's "extra buffer types" repack weights for the CPU's matrix units; on this
        project's reference CPU that path segfaults with Q4_1. The switch is a field of the C
        struct llama_model_params that `Llama(...)` does not expose, so the binding's default
        params are wrapped to clear it (bindings without the field have no such path)."""
        import llama_cpp.llama_cpp as lib

        make = lib.llama_model_default_params
        if getattr(make, "tinyllm_wrapped", False) or "use_extra_bufts" not in dict(make()._fields_):
            return

        def without_extra_bufts():
            params = make()
            params.use_extra_bufts = False
            return params

        without_extra_bufts.tinyllm_wrapped = True
        lib.llama_model_default_params = without_extra_bufts

    def _argmax_last(self):
        # With logits_all=False, eval() keeps only the last token's logits inside llama.cpp.
        logits = self.np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def prefill(self, ids, capacity):
        self.llm.reset()  # forget the previous prompt: the next eval starts at position 0
        self.llm.eval(ids)
        return self._argmax_last()

    def step(self, token):
        return self.extend([token])

    def extend(self, ids):
        self.llm.eval(ids)
        return self._argmax_last()


def make_engine(name):
    return {"tinyllm": TinyLLMEngine, "transformers": TransformersEngine, "llama.cpp": LlamaCppEngine}[name]()


def engine_available(name) -> bool:
    module = {"tinyllm": "numpy", "transformers": "transformers", "llama.cpp": "llama_cpp"}[name]
    return importlib.util.find_spec(module) is not None


def run_engine(spec: dict) -> dict:
    """Inside a worker: load, warm up, then time TTFT, decode and each prefill length once."""
    engine = make_engine(spec["engine"])
    engine.capacity = spec["capacity"]
    start = time.perf_counter()
    engine.imports()
    import_s = time.perf_counter() - start
    start = time.perf_counter()
    engine.load(spec["model"], spec["threads"])
    load_s = time.perf_counter() - start

    chat = spec["prompts"]["chat"]
    # warm-up: first calls pay for lazy allocations, thread pools and page faults
    tok = engine.prefill(chat[:WARMUP_TOKENS], spec["capacity"])
    for _ in range(4):
        tok = engine.step(tok)

    start = time.perf_counter()
    tok = engine.prefill(chat, spec["capacity"])
    ttft_s = time.perf_counter() - start
    generated = [tok]
    n_new = spec["new_tokens"]
    start = time.perf_counter()
    for _ in range(n_new):
        tok = engine.step(tok)
        generated.append(tok)
    decode_s = time.perf_counter() - start

    result = {"import_s": import_s, "load_s": load_s, "ttft_s": ttft_s, "decode_tok_s": n_new / decode_s}
    for n, ids in spec["prompts"]["prefill"].items():
        start = time.perf_counter()
        engine.prefill(ids, spec["capacity"])
        result[f"prefill_{n}_tok_s"] = len(ids) / (time.perf_counter() - start)
    result["peak_rss_mib"] = peak_rss_mib()
    result["generated"] = generated
    return result


def run_gemv_ceiling(spec: dict) -> dict:
    """Inside a worker: NumPy's GEMV time for every matrix of one tinyllm decode step."""
    import numpy as np

    import tinyllm

    llm = tinyllm.load(spec["model"])
    w = llm.model.weights
    mats = [m for layer in w.layers for m in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)] + [w.output]
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, m.shape[1]), dtype=np.float32) for m in mats]  # [1, in] each

    def sweep():
        for x, m in zip(xs, mats):
            x @ m.T  # exactly what Ops.linear does for one token

    sweep()  # warm-up
    times = []
    for _ in range(spec["gemv_repeats"]):
        start = time.perf_counter()
        sweep()
        times.append(time.perf_counter() - start)
    weight_bytes = sum(m.nbytes for m in mats)
    return {"gemvs": len(mats), "weight_bytes": weight_bytes, "sweep_times": times}


def worker_main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = run_gemv_ceiling(spec) if spec["engine"] == "numpy-gemv" else run_engine(spec)
    Path(out_path).write_text(json.dumps(result))


# ---- the parent: prompts, workers in turn, aggregation ------------------------------------------

def spawn(spec: dict, tmp: Path, timeout: float) -> dict:
    spec_path, out_path = tmp / "spec.json", tmp / "result.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.e2e", "--worker", str(spec_path), str(out_path)]
    proc = subprocess.run(cmd, env=thread_env(spec["threads"]), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit status {proc.returncode}: " + " | ".join(tail)}
    return json.loads(out_path.read_text())


def figures(prefill_lengths) -> list[tuple[str, str, bool]]:
    """(key, label, higher is better) of every figure in the table."""
    return ([("import_s", "import the package (s)", False), ("load_s", "load (s)", False),
             ("ttft_s", "time to first token (s)", False)]
            + [(f"prefill_{n}_tok_s", f"prefill {n} tokens (tok/s)", True) for n in prefill_lengths]
            + [("decode_tok_s", "decode (tok/s)", True), ("peak_rss_mib", "peak RSS (MiB)", False)])


def aggregate(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out = {"repeats": len(ok), "errors": [r["error"] for r in runs if "error" in r]}
    if ok:
        for key in ok[0]:
            if key != "generated":
                out[key] = summarize([r[key] for r in ok])
        out["generated"] = ok[0]["generated"]
    return out


def compute_ratios(engines: dict) -> dict:
    """tinyllm / peer for every figure, on the medians of this run."""
    ratios = {}
    mine = engines.get("tinyllm", {})
    for peer, theirs in engines.items():
        if peer == "tinyllm" or not theirs.get("repeats") or not mine.get("repeats"):
            continue
        ratios[peer] = {k: mine[k]["median"] / theirs[k]["median"]
                        for k in mine if isinstance(mine[k], dict) and k in theirs and theirs[k]["median"]}
    return ratios


def run(args) -> dict:
    machine = machine_info(args.threads)  # before the workers: its load average is the starting one
    model = Path(args.model) if args.model else None
    if model is None:
        from tinyllm.loaders import default_model_path

        model = default_model_path()
    tokenizer = load_tokenizer(model)
    prompts = {"chat": chat_prompt_ids(tokenizer),
               "prefill": {str(n): prompt_ids(tokenizer, n) for n in args.prefill_lengths}}
    capacity = max(len(prompts["chat"]) + args.new_tokens + 1, *args.prefill_lengths) + 16

    wanted = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in wanted:
        if e not in ENGINES:
            raise SystemExit(f"--engines: unknown engine {e!r}; expected some of {', '.join(ENGINES)}")
    skipped = {e: "not installed" + (f" ({LLAMA_CPP_INSTALL})" if e == "llama.cpp" else "")
               for e in wanted if not engine_available(e)}
    engines = [e for e in wanted if e not in skipped]
    workers = engines + (["numpy-gemv"] if args.gemv and "tinyllm" in engines else [])

    base = {"model": str(model), "threads": args.threads, "capacity": capacity, "new_tokens": args.new_tokens,
            "prompts": prompts, "gemv_repeats": args.gemv_repeats}
    runs = {w: [] for w in workers}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for w in workers:
                print(f"[e2e] repeat {r + 1}/{args.repeats}: {w}", file=sys.stderr, flush=True)
                runs[w].append(spawn(base | {"engine": w}, Path(tmp), args.timeout))

    result = {
        "benchmark": "e2e",
        "machine": machine,
        "settings": {"model": str(model), "threads": args.threads, "repeats": args.repeats,
                     "new_tokens": args.new_tokens, "chat_prompt_tokens": len(prompts["chat"]),
                     "prefill_lengths": args.prefill_lengths, "decoding": "greedy, EOS ignored"},
        "skipped": skipped,
        "engines": {e: aggregate(runs[e]) for e in engines},
    }
    result["ratios"] = compute_ratios(result["engines"])
    if "numpy-gemv" in runs:
        result["gemv_ceiling"] = gemv_summary(runs["numpy-gemv"], result["engines"].get("tinyllm"))
    tiny = result["engines"].get("tinyllm", {})
    result["greedy_agreement"] = {
        e: leading_matches(tiny.get("generated", []), v.get("generated", []))
        for e, v in result["engines"].items() if e != "tinyllm" and v.get("generated") and tiny.get("generated")}
    result["targets"] = targets(result)
    return result


def gemv_summary(runs: list[dict], tiny: dict | None) -> dict:
    """The median sweep over every timed sweep of every GEMV worker of this run."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"errors": [r["error"] for r in runs]}
    times = summarize([t for r in ok for t in r["sweep_times"]])
    sweep, weight_bytes = times["median"], ok[0]["weight_bytes"]
    out = {"gemvs": ok[0]["gemvs"], "weight_bytes": weight_bytes, "sweep_s": times,
           "bandwidth_gb_s": weight_bytes / sweep / 1e9, "ceiling_tok_s": 1.0 / sweep}
    if tiny and tiny.get("repeats"):
        out["tinyllm_fraction"] = tiny["decode_tok_s"]["median"] / out["ceiling_tok_s"]
    return out


def targets(result: dict) -> list[dict]:
    """The project's CPU targets, checked on this run's medians (None: the peer did not run)."""
    e, ratios = result["engines"], result["ratios"]
    tr = ratios.get("transformers", {})
    tiny = e.get("tinyllm", {})
    gemv = result.get("gemv_ceiling", {})

    def check(name, value, goal, ok):
        return {"target": name, "value": value, "goal": goal, "met": None if value is None else ok(value)}

    return [
        check("decode vs transformers", tr.get("decode_tok_s"), ">= 1.25x", lambda v: v >= 1.25),
        check("decode vs NumPy GEMV ceiling", gemv.get("tinyllm_fraction"), ">= 0.90", lambda v: v >= 0.90),
        check("prefill 128 vs transformers", tr.get("prefill_128_tok_s"), ">= 1x", lambda v: v >= 1.0),
        check("prefill 512 vs transformers", tr.get("prefill_512_tok_s"), ">= 1x", lambda v: v >= 1.0),
        check("load time (s)", tiny.get("load_s", {}).get("median"), "<= 3 s", lambda v: v <= 3.0),
        check("peak RSS vs transformers", tr.get("peak_rss_mib"), "< 1x", lambda v: v < 1.0),
    ]


def to_markdown(result: dict) -> str:
    engines, ratios = result["engines"], result["ratios"]
    names = list(engines)
    peers = list(ratios)
    headers = ["figure"] + [f"{n} median (min)" for n in names] + [f"tinyllm / {p}" for p in peers]
    rows = []
    s = result["settings"]
    for key, label, higher in figures(s["prefill_lengths"]):
        row = [label]
        for n in names:
            v = engines[n].get(key)
            best = None if v is None else (v["max"] if higher else v["min"])
            row.append("-" if v is None else f"{fmt(v['median'])} ({fmt(best)})")
        row += [fmt(ratios[p].get(key)) for p in peers]
        rows.append(row)
    md = [f"# End to end on the CPU: {Path(s['model']).name}\n", header_markdown(result["machine"]),
          f"Chat prompt of {s['chat_prompt_tokens']} tokens, {s['new_tokens']} new tokens ({s['decoding']}), "
          f"{s['repeats']} repeats, each engine in its own process. 'min' is the best repeat "
          "(highest for tok/s, lowest for s and MiB). Ratios: tinyllm / peer on medians; above 1 is better "
          "for tok/s, below 1 for seconds and MiB.\n", markdown_table(headers, rows)]
    for e, why in result["skipped"].items():
        md.append(f"\n{e}: skipped, {why}.")
    for e, v in engines.items():
        for err in v.get("errors", []):
            md.append(f"\n{e}: a repeat failed: {err}")
    if result["greedy_agreement"]:
        agree = ", ".join(f"{e}: {n}" for e, n in result["greedy_agreement"].items())
        md.append(f"\nGreedy tokens identical to tinyllm's from the first on (of {s['new_tokens'] + 1}): {agree}.")
    g = result.get("gemv_ceiling")
    if g and "ceiling_tok_s" in g:
        md.append(
            f"\nNumPy GEMV ceiling: the {g['gemvs']} GEMVs of one decode step read {g['weight_bytes'] / 1e6:.1f} MB "
            f"of weights in {g['sweep_s']['median'] * 1e3:.2f} ms (median of {g['sweep_s']['n']}; "
            f"{g['bandwidth_gb_s']:.1f} GB/s), so decode cannot beat {g['ceiling_tok_s']:.1f} tok/s; "
            + (f"tinyllm reached {g['tinyllm_fraction'] * 100:.0f} % of it." if "tinyllm_fraction" in g else ""))
    md.append("\n" + markdown_table(
        ["target", "measured", "goal", "met"],
        [[t["target"], fmt(t["value"]), t["goal"], {True: "yes", False: "no", None: "-"}[t["met"]]]
         for t in result["targets"]]))
    return "\n".join(md)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint (default: the embedded SmolLM2-135M-Instruct Q4_1 GGUF)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, of: " + ", ".join(ENGINES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="worker processes per engine")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-lengths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--no-gemv", dest="gemv", action="store_false", help="skip NumPy's GEMV ceiling")
    p.add_argument("--gemv-repeats", type=int, default=20)
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per worker")
    p.add_argument("--out", default="benchmarks/results", help="directory for e2e.json and e2e.md")
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)
    result = run(args)
    publish(args.out, "e2e", result, to_markdown)


if __name__ == "__main__":
    main()
