"""Batch-1 decode on the GPU with block-quantized weights: GGUF blocks multiplied as they
are (quant.cu) against the same shape in fp16, on random weights of real model shapes.

    python benchmarks/gpu_quant.py --shapes tinyllama-1.1b llama-3-8b --kinds fp16 q8_0 q4_k q4_0
    python benchmarks/gpu_quant.py --shapes llama-3-8b --kinds fp16 q8_0 q4_k --gpt-fast fp16 int8 int4

Bandwidth does not depend on the values, so every linear weight (the LM head included) is
drawn as random blocks of one kind; the embedding table stays fp16 (a decode step reads one
row of it). Per shape and kind: decode tok/s (graph-captured, 256 tokens after a 16-token
prompt, median of repeats), GPU time per step, bytes a step reads and their fraction of the
copy bandwidth measured in the same run, and the 512-token prefill (weights rebuilt in fp16
by a kernel, then cuBLAS). With --gpt-fast, gpt-fast's batch-1 decode of the same shape
(benchmarks/gpt_fast_peer.py: fp16, its int8 and int4 weight-only modes) runs after tinyllm's
rows, in the same process. Results go to JSON (--out) and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import git_commit  # noqa: E402
from benchmarks.gpu_decode import bench_fast, bench_prefill, copy_bandwidth  # noqa: E402
from benchmarks.gpu_models import random_model  # noqa: E402
from tinyllm.cuda import CudaDecoder  # noqa: E402
from tinyllm.quant import QuantizedMatrix, plane_layout  # noqa: E402

KINDS = ["fp16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k"]


def random_matrix(kind: str, n: int, k: int, std: float, seed: int) -> QuantizedMatrix:
    """Random planes of `kind` drawn on the GPU: random quants, scales that give the weights a
    standard deviation of about std / sqrt(K) (K-quants: every sub-block's 6-bit scale and
    minimum 32, so the weights are centred)."""
    r = cp.random.default_rng(seed)
    d = std / math.sqrt(k)
    planes = {}
    for name, (dtype, shape) in plane_layout(kind, n, k).items():
        planes[name] = r.integers(0, 256, shape, dtype=np.int32).astype(np.uint8).view(dtype)
    if kind == "q8_0":
        planes["scale"] = cp.full((n, k // 32), d / 73, dtype=np.float16)
    elif kind == "q4_0":
        planes["scale"] = cp.full((n, k // 32), d / 4.6, dtype=np.float16)
    elif kind == "q4_1":
        planes["scale"] = cp.asarray(np.broadcast_to(np.asarray([d / 4.6, -7.5 * d / 4.6], np.float16),
                                                     (n, k // 32, 2)).copy())
    elif kind == "q4_k":
        head = np.zeros(16, np.uint8)
        head[0:4] = np.asarray([d / (4.6 * 32), 7.5 * d / (4.6 * 32)], np.float16).view(np.uint8)
        head[4:12] = 160  # sc = m = 32 for the eight sub-blocks (6-bit fields split across the bytes)
        planes["meta"] = cp.asarray(np.broadcast_to(head, (n, k // 256, 16)).copy())
    elif kind == "q6_k":
        planes["meta"] = cp.full((n, k // 256, 16), 32, dtype=np.int8)
        planes["scale"] = cp.full((n, k // 256), d / (18 * 32), dtype=np.float16)
    return QuantizedMatrix(kind, (n, k), planes)


def quantize_model(model, kind: str, seed: int = 0):
    """Every linear weight of `model` replaced, one at a time, by random `kind` blocks."""
    if kind == "fp16":
        return model
    w = model.weights
    for i, layer in enumerate(w.layers):
        for j, field in enumerate(("wqkv", "wo", "w_gate_up", "w_down")):
            n, k = getattr(layer, field).shape
            setattr(layer, field, None)
            setattr(layer, field, random_matrix(kind, n, k, 1.0, seed + 10 * i + j))
    n, k = w.output.shape
    w.output = random_matrix(kind, n, k, 3.0, seed + 7)
    cp.get_default_memory_pool().free_all_blocks()
    return model


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["tinyllama-1.1b"])
    ap.add_argument("--kinds", nargs="+", default=["fp16", "q8_0", "q4_k"], choices=KINDS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--gpt-fast", nargs="*", default=[], choices=["fp16", "int8", "int4"],
                    help="gpt-fast modes to run on each shape after tinyllm's (needs .gptfast/)")
    ap.add_argument("--q-kernel", choices=["auto", "gemv_q"], default="auto",
                    help="gemv_q: every quantized matrix on the first kernel, to compare with q_kernel's choice")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.q_kernel != "auto":
        from tinyllm.cuda import kernels

        kernels.Q_KERNEL = args.q_kernel
    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), "device": name,
              "commit": git_commit(), "command": "python benchmarks/gpu_quant.py " + " ".join(argv or sys.argv[1:]),
              "copy_bandwidth_GBs": copy_bandwidth() / 1e9, "q_kernel": args.q_kernel, "rows": [], "gpt_fast": {}}
    for shape in args.shapes:
        for kind in args.kinds:
            print(f"[{shape} {kind}] building", flush=True)
            model = quantize_model(random_model(shape, "cuda", seed=0), kind)
            start = time.perf_counter()
            decoder = CudaDecoder(model)
            row = {"shape": shape, "kind": kind, "warmup_s": time.perf_counter() - start,
                   "weights_GB": model.weights.nbytes / 1e9}
            row.update(bench_fast(decoder.eager, decoder, args.repeats))
            row["bandwidth_fraction"] = row["bytes_per_step"] / (row["gpu_step_us"] * 1e-6) / (
                result["copy_bandwidth_GBs"] * 1e9)
            row["limit_tok_s"] = result["copy_bandwidth_GBs"] * 1e9 / row["bytes_per_step"]
            if not args.no_prefill:
                row.update(bench_prefill(decoder.eager, args.repeats))
            print(f"[{shape} {kind}] {row['decode_tok_s']:.0f} tok/s, step {row['gpu_step_us']:.0f} us, "
                  f"{100 * row['bandwidth_fraction']:.0f}% of copy bandwidth", flush=True)
            result["rows"].append(row)
            save(result, args.out)
            del decoder, model
            cp.get_default_memory_pool().free_all_blocks()
        for mode in args.gpt_fast:  # one mode at a time, saved as it comes: a slow compile loses only its own
            from benchmarks.gpt_fast_peer import run_peer

            peer = run_peer(shape, [mode], repeats=args.repeats)
            result["gpt_fast"].setdefault(shape, {**peer, "modes": {}})["modes"].update(peer["modes"])
            save(result, args.out)
            cp.get_default_memory_pool().free_all_blocks()
    save(result, args.out)
    print(markdown(result))
    return result


def save(result: dict, out: Path | None) -> None:
    if out:
        out.write_text(json.dumps(result, indent=1))


def markdown(result: dict) -> str:
    lines = [f"{result['date']} · {result['device']} · commit {result['commit']} · copy bandwidth "
             f"{result['copy_bandwidth_GBs']:.0f} GB/s · `{result['command']}`", "",
             "| shape | weights | GB | decode tok/s | GPU µs/step | MB/step | of copy BW | BW limit tok/s | TTFT 512 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['shape']} | {r['kind']} | {r['weights_GB']:.2f} | {r['decode_tok_s']:.0f} | "
                     f"{r['gpu_step_us']:.0f} | {r['bytes_per_step'] / 1e6:.0f} | {100 * r['bandwidth_fraction']:.0f}% | "
                     f"{r['limit_tok_s']:.0f} | {r.get('ttft_ms', float('nan')):.1f} |")
    for shape, peer in result.get("gpt_fast", {}).items():
        for mode, r in peer["modes"].items():
            figure = f"{r['decode_tok_s']:.0f} tok/s" if "decode_tok_s" in r else f"error: {r.get('error')}"
            lines.append(f"\ngpt-fast {shape} {mode}: {figure}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
