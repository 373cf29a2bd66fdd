"""The two batched GEMM kernels side by side: gemv_rows and gemm_rows (tinyllm/cuda/kernels.cu)
on the decode step's matrices, per batch size, and which one `rows_kernel` picks.

Each kernel is launched into a CUDA graph, four times over each of several copies of the
matrix in turn (at least 300 MB of them: a matrix read again while it still sits in the
50 MB L2 cache would be timed at L2 speed, which a step never sees, as the other layers'
weights come in between), and the graph replayed; µs per launch from CUDA events (the
GPU's own time, launch gaps between graph nodes included, as in a captured step). Random
fp16 weights; gemm_rows gets the workspace its K split needs.

    python benchmarks/gpu_rows_kernels.py [--shapes tinyllama-1.1b llama-3-8b] [--batches 1 16 64] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import command_line, git_commit  # noqa: E402
from benchmarks.gpu_models import ALL_SHAPES, shape_config  # noqa: E402


def matrices(name: str) -> dict:
    """role -> (N, K, epilogue, norm) of one decode step's GEMMs (FastOps's list)."""
    from tinyllm.cuda.ops import step_gemms

    roles = ("qkv", "lm_head", "gate_up", "wo", "down")
    return {role: (n, k, epi, norm) for role, (n, k, norm, epi) in zip(roles, step_gemms(shape_config(name)))}


def time_us(cp, fn, copies: list, replays: int = 5) -> float:
    """µs per call of fn(w), w going round `copies` four times in one graph."""
    for w in copies:
        fn(w)
    launches = 4 * len(copies)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        for i in range(launches):
            fn(copies[i % len(copies)])
        graph = stream.end_capture()
    graph.launch(stream)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record(stream)
    for _ in range(replays):
        graph.launch(stream)
    end.record(stream)
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) * 1000 / (replays * launches)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["tinyllama-1.1b", "llama-3-8b"], choices=sorted(ALL_SHAPES))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import cupy as cp

    from tinyllm.cuda import kernels as K

    rng = cp.random.default_rng(0)
    rows, lines = [], ["| shape | matrix | N x K | picked | B | gemv_rows µs | gemm_rows µs |", "|---|---|---|---|---|---|---|"]
    for shape in args.shapes:
        for role, (n, k, epi, norm) in matrices(shape).items():
            if k % 64:
                continue
            mats = 2 if epi == K.EPI_SWIGLU else 1
            copies = [(rng.standard_normal((mats * n, k), dtype=cp.float32) / k ** 0.5).astype(cp.float16)
                      for _ in range(max(1, min(8, -(-300_000_000 // (mats * n * k * 2)))))]
            nw = (1 + 0.1 * rng.standard_normal(k, dtype=cp.float32)).astype(cp.float16) if norm else None
            workspace = cp.empty(max(K.tile_workspace(n, k, epi, max(args.batches)), 1), cp.float32)
            counters = cp.zeros(K.row_tiles(n), cp.int32)
            for b in args.batches:
                x = rng.standard_normal((b, k), dtype=cp.float32).astype(cp.float16)
                res = rng.standard_normal((b, n), dtype=cp.float32).astype(cp.float16) if epi == K.EPI_RESIDUAL else None
                out = cp.empty((b, n), cp.float16)
                us = {}
                for kernel in ("gemv_rows", "gemm_rows"):
                    us[kernel] = time_us(cp, lambda w: K.gemv_rows(w, x, out, epilogue=epi, norm_w=nw, eps=1e-5, residual=res,
                                                                   workspace=workspace, counters=counters,
                                                                   kernel_name=kernel), copies)
                picked = K.rows_kernel(n, k, epi)
                rows.append(dict(shape=shape, matrix=role, n=n, k=k, batch=b, picked=picked,
                                 gemv_rows_us=round(us["gemv_rows"], 2), gemm_rows_us=round(us["gemm_rows"], 2)))
                lines.append(f"| {shape} | {role} | {n} x {k} | {picked} | {b} | {us['gemv_rows']:.1f} | {us['gemm_rows']:.1f} |")
                print(lines[-1], flush=True)
            del copies
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "commit": git_commit(),
                "command": command_line()}
        (args.out / "gpu_rows_kernels.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        (args.out / "gpu_rows_kernels.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
