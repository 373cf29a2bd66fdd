"""Batched decode on the GPU: total tokens/s for B = 1, 2, 4, 8, 16 (--batches) sequences per step.

Three ways, on random fp16 weights of the real shapes (benchmarks/gpu_models.py):
- fast batched: tinyllm/cuda/batch.py, what the server's scheduler runs on a GPU: one
  CUDA graph per B, tensor-core GEMMs over the B tokens, one attention launch for all
  sequences, ids chosen on the device; each step also pays its host round trip (inputs
  copied in, B ids copied out, a sync), as the scheduler does;
- fast single: the one-sequence fast path (decoder.py, steps queued ahead), B = 1 only:
  the best a single stream gets, and the baseline of "B=8 / B=1";
- readable: `Model.decode_batch` with cuBLAS matmuls and one attention call per sequence.
Every sequence has its own prompt length (so its own position), 128 + 8b tokens for row b.
Beside the fast batched tok/s (host round trips included), `replay ms` is the GPU's own time
for one step of B rows: the captured graph replayed back to back, timed by CUDA events; where
it is far below B / tok/s, the host round trip, not the GPU, sets the pace.

    python benchmarks/gpu_batch.py [--out DIR] [--steps 128] [--batches 1 16 32 64] [--no-readable]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_models import random_model  # noqa: E402

BATCHES = (1, 2, 4, 8, 16)


def prompt_lengths(b: int) -> list[int]:
    return [128 + 8 * i for i in range(b)]


def readable_tok_s(model, b: int, steps: int = 16) -> float:
    caches = [model.new_cache(512) for _ in range(b)]
    for n, cache in zip(prompt_lengths(b), caches):
        model.forward(np.ones((1, n), dtype=np.int64), cache)
    tokens = [1] * b
    model.decode_batch(tokens, caches)  # warm-up: CuPy compiles its kernels for this shape
    model.device.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        tokens = [int(t) for t in model.decode_batch(tokens, caches).argmax(-1).get()]
    return b * steps / (time.perf_counter() - start)


def single_tok_s(model, decoder, steps: int) -> float:
    cache = model.new_cache(512)
    model.forward(np.ones((1, 128), dtype=np.int64), cache)
    list(decoder.decode(cache, 1, 8))  # warm-up
    cache.trim(cache.length - 128)
    start = time.perf_counter()
    n = len(list(decoder.decode(cache, 1, steps)))
    return n / (time.perf_counter() - start)


def batched_tok_s(model, batch, b: int, steps: int) -> float:
    caches = [batch.new_cache() for _ in range(b)]
    try:
        for n, cache in zip(prompt_lengths(b), caches):
            model.forward(np.ones((1, n), dtype=np.int64), cache)
        tokens = batch.step([1] * b, caches)  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            tokens = batch.step(tokens, caches)
        tok_s = b * steps / (time.perf_counter() - start)
        return tok_s, replay_ms(batch, b, steps)
    finally:
        for cache in caches:
            batch.release(cache)


def replay_ms(batch, b: int, steps: int) -> float:
    """GPU milliseconds per replay of the graph that runs a step of b rows (the last step's
    inputs, replayed back to back: the same work as a step, without the host between)."""
    graph = batch.graphs[batch.bucket(b)][0]
    start, end = batch.cp.cuda.Event(), batch.cp.cuda.Event()
    graph.launch(batch.stream)
    start.record(batch.stream)
    for _ in range(steps):
        graph.launch(batch.stream)
    end.record(batch.stream)
    end.synchronize()
    return batch.cp.cuda.get_elapsed_time(start, end) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--shapes", nargs="+", default=["tinyllama-1.1b", "smollm2-135m"])
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="batch sizes (default 1 2 4 8 16)")
    ap.add_argument("--no-readable", action="store_true", help="skip the readable decode_batch (slow at large B)")
    args = ap.parse_args()
    batches = sorted(set(args.batches))
    if 1 not in batches:
        batches = [1] + batches  # the baseline of the ratios
    from tinyllm.cuda import CudaDecoder
    from tinyllm.cuda.batch import BatchDecoder

    results = {}
    for name in args.shapes:
        readable = random_model(name)
        decoder = CudaDecoder(readable)
        fast = decoder.eager  # the same weights computing with the fused kernels
        batch = BatchDecoder(decoder, max_batch=max(batches), capacity=1024)
        r = {"capture_s": round(batch.capture_seconds, 2), "single": round(single_tok_s(fast, decoder, args.steps), 1)}
        for b in batches:
            tok_s, ms = batched_tok_s(fast, batch, b, args.steps)
            r[f"batched_{b}"], r[f"replay_ms_{b}"] = round(tok_s, 1), round(ms, 3)
            r[f"readable_{b}"] = None if args.no_readable else round(readable_tok_s(readable, b), 1)
            print(name, b, r[f"batched_{b}"], r[f"replay_ms_{b}"], r[f"readable_{b}"], flush=True)
        results[name] = r
        del batch, decoder, fast, readable
    top = max(batches)
    head = ("| shape | way | " + " | ".join(f"B={b}" for b in batches)
            + f" | B={top} / single B=1 | B={top} / B=1 (same way) |")
    lines = [head, "|" + "---|" * (len(batches) + 4)]
    for name, r in results.items():
        fast = [r[f"batched_{b}"] for b in batches]
        lines.append(f"| {name} | fast batched, tok/s | " + " | ".join(f"{v:.0f}" for v in fast)
                     + f" | {r[f'batched_{top}'] / r['single']:.2f}x | {r[f'batched_{top}'] / r['batched_1']:.2f}x |")
        lines.append(f"| {name} | fast batched, replay ms | " + " | ".join(f"{r[f'replay_ms_{b}']:.3f}" for b in batches)
                     + " | | |")
        lines.append(f"| {name} | fast single, tok/s | {r['single']:.0f} |" + " |" * (len(batches) - 1) + " | |")
        if not args.no_readable:
            slow = [r[f"readable_{b}"] for b in batches]
            lines.append(f"| {name} | readable, tok/s | " + " | ".join(f"{v:.0f}" for v in slow)
                         + f" | | {r[f'readable_{top}'] / r['readable_1']:.2f}x |")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_batch.json").write_text(json.dumps(results, indent=1))
        (args.out / "gpu_batch.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
