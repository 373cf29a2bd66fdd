"""Batch-1 decode on the GPU: tinyllm's graph-captured fast path, its readable CuPy path,
and transformers (eager, and with a static cache) side by side, on random fp16 weights
of real model shapes; gpt-fast too when asked for.

    python benchmarks/gpu_decode.py                      # both default shapes, all peers
    python benchmarks/gpu_decode.py --shapes smollm2-135m --peers none
    python benchmarks/gpu_decode.py --shapes llama-3.2-1b llama-3-8b --quick --gpt-fast all

What is measured, per shape (medians of repeats, after warm-up, clocks read after a sync):
- decode tok/s: 256 new tokens after a 16-token prompt, greedy; the time from the first
  decode launch to the last token on the host (prefill excluded);
- GPU time per step: back-to-back graph replays timed with CUDA events, and the graph's
  kernel count; bytes per step (weights + KV cache read) over that time, as a fraction of
  the device-to-device copy bandwidth measured in the same run;
- prefill tok/s and time to first token for a 512-token prompt;
- transformers' generate() on the same weights: eager (dynamic cache) and with
  cache_implementation="static" (which transformers compiles), decode tok/s measured as
  (tokens(256) - tokens(1)) / (time(256) - time(1)) so its prefill cancels out;
- with --gpt-fast: gpt-fast's compiled decode on the same weights and prompt, fp16 and
  (with `all`) its int8 and int4 weight-only modes (benchmarks/gpt_fast_peer.py; its files
  are copied to .gptfast/ by benchmarks/fetch_gpt_fast.py), after tinyllm's memory is
  given back, with its bytes per step as a fraction of the copy bandwidth.
--quick leaves out the slow extras (the readable CuPy model's eager decode, the
transformers peers, the run without programmatic dependent launch), so that an 8B shape
takes minutes. Shapes default to SHAPES of benchmarks/gpu_models.py; the Llama 3 shapes
run when named.
Results go to JSON (--out) and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cupy as cp  # noqa: E402

from benchmarks.common import git_commit  # noqa: E402
from tinyllm.engine import bfloat16  # noqa: E402
from benchmarks.gpu_models import ALL_SHAPES, SHAPES, prompt_ids, random_model, to_transformers  # noqa: E402
from tinyllm.cuda import CudaDecoder  # noqa: E402
from tinyllm.cuda import kernels as K  # noqa: E402
from tinyllm.model import Model  # noqa: E402

PROMPT_LEN, NEW_TOKENS, LONG_PROMPT = 16, 256, 512


def sync():
    cp.cuda.Device().synchronize()


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (1 GiB, median of 10)."""
    a = cp.ones(2 ** 29, dtype=cp.float16)
    b = cp.empty_like(a)
    times = []
    for _ in range(12):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        b[...] = a
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    del a, b
    return 2 * 2 ** 30 / statistics.median(times[2:])


def step_bytes(model: Model, context: int) -> int:
    """Bytes one decode step must read: every weight but the embedding table (one row),
    plus the KV cache over `context` positions."""
    c, w = model.config, model.weights
    layer_bytes = sum(a.nbytes for layer in w.layers for a in vars(layer).values())
    kv = 2 * c.n_layers * c.n_kv_heads * c.head_dim * 2 * context
    return layer_bytes + w.norm.nbytes + w.output.nbytes + c.dim * 2 + kv


def bench_fast(model: Model, decoder: CudaDecoder, repeats: int) -> dict:
    ids = prompt_ids(PROMPT_LEN, model.config.vocab_size)
    cache = decoder.new_cache(PROMPT_LEN + NEW_TOKENS + 8)
    rates, tokens, first = [], None, None
    for r in range(repeats + 1):
        cache.trim(cache.length)
        first = int(cp.argmax(model.forward(ids, cache)[0, -1]))
        sync()
        start = time.perf_counter()
        out = list(decoder.decode(cache, first, NEW_TOKENS))
        elapsed = time.perf_counter() - start
        if r:  # the first run is warm-up
            rates.append(NEW_TOKENS / elapsed)
        tokens = out
    return {"decode_tok_s": statistics.median(rates), "decode_runs": rates,
            "gpu_step_us": replay_us(decoder, cache, PROMPT_LEN + NEW_TOKENS // 2, 200),
            "graph_kernels": decoder.captured(cache).n_nodes, "first_token": first, "tokens_head": tokens[:8],
            "bytes_per_step": step_bytes(model, PROMPT_LEN + NEW_TOKENS // 2)}


def replay_us(decoder: CudaDecoder, cache, context: int, n: int, runs: int = 1) -> float:
    """GPU µs per step of the cache's captured step at `context` positions: n replays queued
    back to back, timed with events (the median of `runs` such runs)."""
    step = decoder.captured(cache)
    cache.trim(cache.length)
    cache.advance(context)
    times = []
    for _ in range(runs):
        start_ev, end_ev = cp.cuda.Event(), cp.cuda.Event()
        with decoder.stream:
            K.set_step(decoder.token, decoder.pos, decoder.params, 1, cache.length, 0.0)
            start_ev.record(decoder.stream)
            for _ in range(n):  # the graph advances the position itself; stays inside the cache
                K.set_step(decoder.token, decoder.pos, decoder.params, 1, cache.length, 0.0)
                step.graph.launch(decoder.stream)
            end_ev.record(decoder.stream)
        end_ev.synchronize()
        times.append(cp.cuda.get_elapsed_time(start_ev, end_ev) * 1e3 / n)
    return statistics.median(times)


def kernel_profile(model: Model, decoder: CudaDecoder, context: int = PROMPT_LEN + NEW_TOKENS // 2) -> list[dict]:
    """GPU time of each fused kernel of one eager fast step, from CUDA events around each
    launch, with the bytes it must read and the rate achieved."""
    from tinyllm.cuda import kernels as K

    c = model.config
    records = []
    originals = {}

    def wrap(name, label, nbytes):
        fn = getattr(K, name)
        originals[name] = fn

        def timed(*args, **kwargs):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            fn(*args, **kwargs)
            end.record()
            records.append((label(*args, **kwargs), nbytes(*args, **kwargs), start, end))
        setattr(K, name, timed)

    def gemv_label(w, x, out, epilogue=0, norm_w=None, **_):
        kind = {0: "store", 1: "residual", 2: "swiglu"}[epilogue]
        return f"gemv {w.shape[0]}x{w.shape[1]} {'norm+' if norm_w is not None else ''}{kind}"

    wrap("gemv", gemv_label, lambda w, x, out, **_: w.nbytes)
    wrap("gemv_stream", lambda *a, **k: "stream " + gemv_label(*a, **k), lambda w, x, out, **_: w.nbytes)
    wrap("decode_attention", lambda *a, **k: "attention (rope+kv+split-K)",
         lambda *a, **k: 2 * c.n_kv_heads * c.head_dim * 2 * context)
    wrap("embedding", lambda *a, **k: "embedding", lambda *a, **k: c.dim * 4)
    wrap("sample_token", lambda *a, **k: "sample (argmax)", lambda logits, *a, **k: logits.nbytes)
    # a spinning kernel holds the GPU while Python queues the step, so that the kernels run
    # back to back and each event pair brackets GPU work only, not Python's launch time
    spin = cp.RawKernel(r'''extern "C" __global__ void spin(long long n) {
        long long t0 = clock64(); while (clock64() - t0 < n) {} }''', "spin")
    try:
        cache = model.new_cache(context + 8)
        history = cp.zeros(cache.capacity + 1, cp.int64)
        for _ in range(3):
            records.clear()
            cache.trim(cache.length)
            cache.advance(context - 1)
            # the sampler writes history[pos + 1]: pos is the decoder's last position until
            # set here, and a longer run before this one left it past this history's end
            K.set_step(decoder.token, decoder.pos, decoder.params, 1, cache.length, 0.0)
            spin((1,), (1,), (np.int64(300_000_000),))  # ~0.15 s
            logits = model.forward(np.array([[1]]), cache)
            K.sample_token(logits, decoder.params, decoder.w_scratch, decoder.token, history, decoder.pos)
            sync()
    finally:
        for name, fn in originals.items():
            setattr(K, name, fn)
    rows: dict[str, dict] = {}
    for label, nbytes, start, end in records:
        r = rows.setdefault(label, {"kernel": label, "count": 0, "us": 0.0, "bytes": nbytes})
        r["count"] += 1
        r["us"] += cp.cuda.get_elapsed_time(start, end) * 1e3
    out = []
    for r in rows.values():
        r["us_each"] = r["us"] / r["count"]
        r["GB_s"] = r["bytes"] / (r["us_each"] * 1e-6) / 1e9
        out.append(r)
    return sorted(out, key=lambda r: -r["us"])


class _IdsTokenizer:
    """Just enough of a tokenizer for tinyllm.generate (random weights have no vocabulary)."""
    bos_id, eos_ids, tk = 1, (), None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def bench_generation(model: Model, decoder: CudaDecoder, repeats: int) -> float:
    """Decode tok/s through tinyllm.generate.Generation (the CLI's loop: one token per
    call, detokenizing and stop-string checks on the host), greedy, 256 new tokens."""
    from tinyllm.generate import Generation, StopRules

    from tinyllm.cuda import CudaStep

    ids = [int(i) for i in prompt_ids(PROMPT_LEN, model.config.vocab_size)[0]]
    step = CudaStep(decoder.model, decoder=decoder)
    rates = []
    for r in range(repeats + 1):
        done = Generation(step, _IdsTokenizer(), ids, rules=StopRules(max_new_tokens=NEW_TOKENS, eos_ids=())).run()
        if r:
            rates.append(done.stats.decode_tps)
    return statistics.median(rates)


def bench_prefill(model: Model, repeats: int) -> dict:
    ids = prompt_ids(LONG_PROMPT, model.config.vocab_size, seed=1)
    cache = model.new_cache(LONG_PROMPT + 8)
    ttft, prefill = [], []
    for r in range(repeats + 1):
        cache.trim(cache.length)
        sync()
        start = time.perf_counter()
        logits = model.forward(ids, cache)
        sync()
        mid = time.perf_counter()
        int(cp.argmax(logits[0, -1]).get())  # the first token, on the host
        end = time.perf_counter()
        if r:
            prefill.append(mid - start)
            ttft.append(end - start)
    return {"ttft_ms": 1e3 * statistics.median(ttft), "prefill_tok_s": LONG_PROMPT / statistics.median(prefill)}


def bench_eager(model: Model, n: int = 32) -> float:
    """Eager decode (no graph), greedy, tok/s over n steps (host-bound: for comparison)."""
    ids = prompt_ids(PROMPT_LEN, model.config.vocab_size)
    cache = model.new_cache(PROMPT_LEN + n + 8)
    tok = int(cp.argmax(model.forward(ids, cache)[0, -1]))
    for _ in range(4):  # warm-up steps
        tok = int(cp.argmax(model.forward(np.array([[tok]]), cache)[0, -1]))
    sync()
    start = time.perf_counter()
    for _ in range(n):
        tok = int(cp.argmax(model.forward(np.array([[tok]]), cache)[0, -1]))
    return n / (time.perf_counter() - start)


def bench_transformers(model: Model, static: bool) -> dict:
    import torch

    hf = to_transformers(model)
    ids = torch.tensor(prompt_ids(PROMPT_LEN, model.config.vocab_size), device="cuda")
    kwargs = dict(do_sample=False, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"

    def run(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    compile_s = run(NEW_TOKENS)  # warm-up (static: torch.compile happens here)
    run(NEW_TOKENS)
    t1 = statistics.median([run(1) for _ in range(3)])
    tn = statistics.median([run(NEW_TOKENS) for _ in range(3)])
    del hf
    torch.cuda.empty_cache()
    return {"decode_tok_s": (NEW_TOKENS - 1) / (tn - t1), "first_call_s": compile_s}


def bench_gpt_fast(name: str, readable: Model, row: dict, args) -> dict:
    """gpt-fast's decode of the same weights (benchmarks/gpt_fast_peer.py), its greedy tokens
    compared with the fast path's; a failure of any kind is reported, never raised."""
    modes = ["fp16"] if args.gpt_fast == "fp16" else ["fp16", "int8", "int4"]
    try:
        from benchmarks.gpt_fast_peer import run_peer

        return run_peer(name, modes, NEW_TOKENS, model=readable, repeats=args.repeats,
                        reference_tokens=[row["first_token"], *row["tokens_head"]])
    except Exception as e:
        return {"modes": {m: {"error": f"{type(e).__name__}: {e}"[:300]} for m in modes}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(ALL_SHAPES))
    ap.add_argument("--peers", choices=["none", "eager", "all"], default="all")
    ap.add_argument("--gpt-fast", choices=["none", "fp16", "all"], default="none",
                    help="gpt-fast's decode on the same weights: fp16, or all of fp16, int8 and int4")
    ap.add_argument("--quick", action="store_true",
                    help="leave out readable eager decode, the transformers peers and the run without PDL")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", nargs="+", choices=["float16", "bfloat16"], default=["float16"],
                    help="the weights' dtype; a bfloat16 row is keyed 'shape bfloat16' (its peers are left out)")
    ap.add_argument("--gemv-stream", choices=["on", "off"], default=None,
                    help="big matrices on the streaming GEMV or not (kernels.set_gemv_stream; default: the library's, on)")
    ap.add_argument("--compare-gemv", action="store_true",
                    help="also time the step with streaming the other way (on/off), same weights")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    streaming = K._stream["enabled"] if args.gemv_stream is None else args.gemv_stream == "on"
    K.set_gemv_stream(streaming)
    props = cp.cuda.runtime.getDeviceProperties(0)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "device": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
              "commit": git_commit(), "command": "python benchmarks/gpu_decode.py " + " ".join(argv or sys.argv[1:]),
              "copy_bandwidth_GBs": copy_bandwidth() / 1e9, "shapes": {}}
    for name, dtype in [(n, d) for n in args.shapes for d in args.dtypes]:
        print(f"[{name}] building random {dtype} weights", flush=True)
        readable = random_model(name, "cuda", seed=0, dtype=bfloat16() if dtype == "bfloat16" else np.float16)
        row = {"weights_GB": readable.weights.nbytes / 1e9, "dtype": dtype}
        start = time.perf_counter()
        decoder = CudaDecoder(readable)
        fast = decoder.eager  # the same weights computing with the fused kernels
        row["warmup_s"] = time.perf_counter() - start
        row.update(bench_fast(fast, decoder, args.repeats))
        row["pdl"] = K.pdl_active()
        if row["pdl"] and not args.quick:  # the same without programmatic dependent launch, for comparison
            K.set_pdl(False)
            plain = bench_fast(fast, decoder, args.repeats)
            K.set_pdl(True)
            row["no_pdl"] = {k: plain[k] for k in ("decode_tok_s", "gpu_step_us")}
        row["gemv_stream"] = streaming
        if args.compare_gemv:  # the big matrices' GEMV the other way (kernels.streams), re-captured
            K.set_gemv_stream(not streaming)
            other = bench_fast(fast, decoder, args.repeats)
            K.set_gemv_stream(streaming)
            row["other_gemv"] = {k: other[k] for k in ("decode_tok_s", "gpu_step_us", "tokens_head")}
            row["other_gemv"].update(gemv_stream=not streaming, same_tokens=other["tokens_head"] == row["tokens_head"])
        row["bandwidth_fraction"] = row["bytes_per_step"] / (row["gpu_step_us"] * 1e-6) / (result["copy_bandwidth_GBs"] * 1e9)
        row["limit_tok_s"] = result["copy_bandwidth_GBs"] * 1e9 / row["bytes_per_step"]
        row["generate_tok_s"] = bench_generation(fast, decoder, args.repeats)
        row["kernels"] = kernel_profile(fast, decoder)
        row.update(bench_prefill(fast, args.repeats))
        if not args.quick:
            row["readable_eager_tok_s"] = bench_eager(readable)
        row["fast_eager_tok_s"] = bench_eager(fast)
        print(f"[{name}] fast {row['decode_tok_s']:.0f} tok/s, step {row['gpu_step_us']:.0f} us", flush=True)
        if dtype == "bfloat16":  # the peers run once per shape, in fp16
            name = f"{name} bfloat16"
        elif args.peers != "none" and not args.quick:
            row["transformers_eager"] = bench_transformers(fast, static=False)
        if args.peers == "all" and not args.quick and dtype == "float16":
            try:
                row["transformers_static"] = bench_transformers(fast, static=True)
            except Exception as e:  # report, never hide, a failing peer
                row["transformers_static"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        del decoder, fast
        cp.get_default_memory_pool().free_all_blocks()  # gpt-fast's torch allocator gets the memory back
        if args.gpt_fast != "none" and dtype == "float16":
            row["gpt_fast"] = bench_gpt_fast(name, readable, row, args)
        result["shapes"][name] = row
        del readable
        cp.get_default_memory_pool().free_all_blocks()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    def peer(row, key):
        p = row.get(key)
        if not p:
            return "-"
        return f"{p['decode_tok_s']:.1f}" if "decode_tok_s" in p else "error"

    def num(row, key, digits=1):
        return "-" if row.get(key) is None else f"{row[key]:.{digits}f}"

    def gpt_fast(row, mode):
        return peer(row.get("gpt_fast", {}).get("modes", {}), mode)

    gf_modes = ("fp16", "int8", "int4")
    with_gf = any("gpt_fast" in r for r in result["shapes"].values())

    lines = [f"{result['date']} · {result['device']} · commit {result['commit']} · copy bandwidth "
             f"{result['copy_bandwidth_GBs']:.0f} GB/s · `{result['command']}`", "",
             "| shape | tinyllm fast (graph) tok/s | via generate.py tok/s | GPU µs/step | kernels/step | of copy BW | BW limit tok/s "
             "| TTFT 512 ms | prefill tok/s | readable CuPy tok/s | fast eager tok/s | transformers eager | "
             "transformers static |" + ("".join(f" gpt-fast {m} |" for m in gf_modes) if with_gf else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" * len(gf_modes) if with_gf else "")]
    for name, r in result["shapes"].items():
        lines.append(
            f"| {name} | {r['decode_tok_s']:.0f} | {r.get('generate_tok_s', 0):.0f} | {r['gpu_step_us']:.0f} | "
            f"{r['graph_kernels']} | "
            f"{100 * r['bandwidth_fraction']:.0f}% | {r['limit_tok_s']:.0f} | {r['ttft_ms']:.1f} | "
            f"{r['prefill_tok_s']:.0f} | {num(r, 'readable_eager_tok_s')} | {num(r, 'fast_eager_tok_s')} | "
            f"{peer(r, 'transformers_eager')} | {peer(r, 'transformers_static')} |"
            + ("".join(f" {gpt_fast(r, m)} |" for m in gf_modes) if with_gf else ""))
    for name, r in result["shapes"].items():
        if "gpt_fast" in r:
            lines += ["", gpt_fast_markdown(name, r, result["copy_bandwidth_GBs"])]
    for name, r in result["shapes"].items():
        if "other_gemv" in r:
            a, way = r["other_gemv"], ("on" if r["other_gemv"]["gemv_stream"] else "off")
            lines.append(f"\n{name}: with the streaming GEMV {way} {a['decode_tok_s']:.0f} tok/s, "
                         f"{a['gpu_step_us']:.0f} µs per step (against {r['gpu_step_us']:.0f}); "
                         f"same first tokens: {a['same_tokens']}")
        if "no_pdl" in r:
            lines.append(f"\n{name}: without programmatic dependent launch {r['no_pdl']['decode_tok_s']:.0f} tok/s, "
                         f"{r['no_pdl']['gpu_step_us']:.0f} µs per step")
    for name, r in result["shapes"].items():
        if "kernels" in r:
            lines += ["", f"{name}: GPU time per kernel of one eager step (CUDA events; {r['graph_kernels']} graph nodes, "
                      f"{r['gpu_step_us']:.0f} µs per replayed step)", "",
                      "| kernel | per step | µs each | µs per step | GB/s |", "|---|---|---|---|---|"]
            for k in r["kernels"]:
                lines.append(f"| {k['kernel']} | {k['count']} | {k['us_each']:.1f} | {k['us']:.0f} | {k['GB_s']:.0f} |")
            lines.append(f"| total timed | | | {sum(k['us'] for k in r['kernels']):.0f} | |")
    return "\n".join(lines)


def gpt_fast_markdown(name: str, row: dict, copy_GBs: float) -> str:
    g = row["gpt_fast"]
    source = g.get("gpt_fast") or {}
    edited = f", edited since fetched: {', '.join(source['edited_since_fetch'])}" if source.get("edited_since_fetch") else ""
    lines = [f"{name}: gpt-fast {source.get('commit') or '(commit unknown)'}{edited}, torch {g.get('torch', '?')}; "
             f"tinyllm fast path: {row['bytes_per_step'] / 1e6:.0f} MB per step, {row['decode_tok_s']:.0f} tok/s", "",
             "| gpt-fast mode | dtype | decode tok/s | MB per step (weights + whole KV cache) | of copy BW | "
             "first call s | greedy tokens as tinyllm's | prefill logits: max abs diff, same arg max |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, r in g.get("modes", {}).items():
        if "error" in r:
            error = " ".join(r["error"].split()).replace("|", "/")[:300]  # one table cell
            lines.append(f"| {mode} | error: {error} | | | | | | |")
            continue
        same, n = "-", r.get("tokens_compared")
        if "tokens_match" in r:
            same = f"all {n}" if r["tokens_match"] else f"first {r['leading_tokens_as_tinyllm']} of {n}"
        check = r.get("logits_vs_tinyllm")
        check = f"{check['max_abs_diff']:.3g}, {100 * check['same_argmax']:.0f}%" if check else "-"
        lines.append(f"| {mode} | {r['dtype']} | {r['decode_tok_s']:.1f} | {r['bytes_per_step'] / 1e6:.0f} | "
                     f"{100 * r['GB_s'] / copy_GBs:.0f}% | {r['first_call_s']:.0f} | {same} | {check} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
