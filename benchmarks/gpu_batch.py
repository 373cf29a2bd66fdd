"""Batched decode on the GPU through the readable path: `Model.decode_batch` at B = 1, 4, 8, 16
(random fp16 weights of the real shapes, cuBLAS matmuls, one attention call per sequence).

This is what the server's scheduler runs on `--device cuda` today; the fused single-sequence
fast path (tinyllm/cuda) does not take a batch yet. Run on a GPU machine:
    python benchmarks/gpu_batch.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_models import random_model  # noqa: E402


def tok_per_s(model, batch: int, context: int = 16, steps: int = 32) -> float:
    caches = [model.new_cache(context + steps + 8) for _ in range(batch)]
    for cache in caches:
        model.forward([list(range(1, context + 1))], cache)
    tokens = [1] * batch
    model.decode_batch(tokens, caches)  # warm-up: compile the kernels for this shape
    model.device.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        logits = model.decode_batch(tokens, caches)
        tokens = [int(t) for t in logits.argmax(-1).get()]
    model.device.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = {}
    for name in ("tinyllama-1.1b", "smollm2-135m"):
        model = random_model(name)
        results[name] = {b: round(tok_per_s(model, b), 1) for b in (1, 4, 8, 16)}
        del model
    lines = ["| shape | B=1 tok/s | B=4 | B=8 | B=16 | B=8 / B=1 |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r[1]} | {r[4]} | {r[8]} | {r[16]} | {r[8] / r[1]:.2f}x |")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_batch.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
