"""Sweep a fast-path setting on the GPU: rows per GEMV block (warps per block).

    python benchmarks/gpu_sweep.py
Prints the graph-replayed step time and decode tok/s per setting and shape."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cupy as cp  # noqa: E402

from benchmarks.gpu_decode import bench_fast  # noqa: E402
from benchmarks.gpu_models import SHAPES, random_model  # noqa: E402
from tinyllm.cuda import CudaDecoder  # noqa: E402
from tinyllm.cuda import kernels as K  # noqa: E402

rows = []
for name in SHAPES:
    model = random_model(name, "cuda", seed=0)
    decoder = CudaDecoder(model)
    for warps in (4, 8, 16, 8):
        K.GEMV_WARPS = warps
        r = bench_fast(decoder.eager, decoder, 3)
        rows.append((name, warps, r["gpu_step_us"], r["decode_tok_s"]))
        print(rows[-1], flush=True)
    K.GEMV_WARPS = 8
    del decoder, model
    cp.get_default_memory_pool().free_all_blocks()
print("| shape | warps per GEMV block | GPU µs/step | decode tok/s |\n|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.0f} |")
