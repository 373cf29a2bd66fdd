"""The decode step's GEMVs one at a time: fp16 `gemv` against the quantized GEMV on each block
format (`kernels.gemv_q`: quant.cu's gemv_qs or gemv_q, as `q_kernel` picks), per matrix of a
shape, with the bandwidth each reaches.

Each kernel is launched into a CUDA graph, four times over each of several copies of the
matrix in turn (at least 300 MB of them, so that no launch reads a matrix still in the 50 MB
L2 cache, which a step never does), and the graph replayed; µs per launch from CUDA events
(launch gaps between graph nodes included, as in a captured step). GB/s: the bytes of the
matrix's planes over that time, beside the copy bandwidth measured in the same run. Random
weights and blocks (benchmarks/gpu_quant.py's random_matrix: bandwidth does not depend on
the values).

    python benchmarks/gpu_quant_kernels.py [--shapes llama-3-8b] [--kinds fp16 q4_0 q4_k] [--batches 1] [--out DIR]
    python benchmarks/gpu_quant_kernels.py --q-kernel gemv_q ...     # every matrix on the first kernel
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import command_line, git_commit  # noqa: E402
from benchmarks.gpu_models import ALL_SHAPES  # noqa: E402
from benchmarks.gpu_rows_kernels import matrices, time_us  # noqa: E402

KINDS = ["fp16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["llama-3-8b"], choices=sorted(ALL_SHAPES))
    ap.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    ap.add_argument("--roles", nargs="+", default=["qkv", "lm_head", "gate_up", "wo", "down"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    ap.add_argument("--q-kernel", choices=["auto", "gemv_q"], default="auto",
                    help="gemv_q: every quantized matrix on the first kernel, to compare with q_kernel's choice")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import cupy as cp

    from benchmarks.gpu_decode import copy_bandwidth
    from benchmarks.gpu_quant import random_matrix
    from tinyllm.cuda import kernels as K

    if args.q_kernel != "auto":
        K.Q_KERNEL = args.q_kernel
    bandwidth = copy_bandwidth() / 1e9
    rng = cp.random.default_rng(0)
    rows = []
    lines = [f"copy bandwidth {bandwidth:.0f} GB/s", "",
             "| shape | matrix | N x K | kind | B | MB | µs | GB/s | of copy BW |", "|---|---|---|---|---|---|---|---|---|"]
    print(lines[0], flush=True)
    for shape in args.shapes:
        for role, (n, k, epi, norm) in matrices(shape).items():
            if role not in args.roles:
                continue
            mats = 2 if epi == K.EPI_SWIGLU else 1
            nw = (1 + 0.1 * rng.standard_normal(k, dtype=cp.float32)).astype(cp.float16) if norm else None
            for kind in args.kinds:
                one = random_matrix(kind, mats * n, k, 1.0, 0) if kind != "fp16" else None
                nbytes = one.nbytes if one is not None else mats * n * k * 2
                count = max(1, min(8, -(-300_000_000 // nbytes)))
                if kind == "fp16":
                    copies = [(rng.standard_normal((mats * n, k), dtype=cp.float32) / k ** 0.5).astype(cp.float16)
                              for _ in range(count)]
                else:
                    copies = [one] + [random_matrix(kind, mats * n, k, 1.0, i) for i in range(1, count)]
                for b in args.batches:
                    if kind == "fp16" and b > 1:
                        continue
                    x = rng.standard_normal((b, k), dtype=cp.float32).astype(cp.float16)
                    res = rng.standard_normal((b, n), dtype=cp.float32).astype(cp.float16) if epi == K.EPI_RESIDUAL else None
                    out = cp.empty((b, n), cp.float16)
                    if kind == "fp16":
                        fn = lambda w: K.gemv(w, x[0], out[0], epilogue=epi, norm_w=nw, eps=1e-5,  # noqa: E731
                                              residual=res[0] if res is not None else None)
                    else:
                        fn = lambda w: K.gemv_q(w, x, out, epilogue=epi, norm_w=nw, eps=1e-5, residual=res)  # noqa: E731
                    us = time_us(cp, fn, copies)
                    gbs = nbytes / us / 1e3
                    rows.append(dict(shape=shape, matrix=role, n=n, k=k, kind=kind, batch=b, MB=round(nbytes / 1e6, 2),
                                     us=round(us, 2), GBs=round(gbs), of_copy=round(gbs / bandwidth, 3)))
                    lines.append(f"| {shape} | {role} | {n} x {k} | {kind} | {b} | {nbytes / 1e6:.1f} | {us:.1f} | "
                                 f"{gbs:.0f} | {100 * gbs / bandwidth:.0f} % |")
                    print(lines[-1], flush=True)
                del copies, one
                cp.get_default_memory_pool().free_all_blocks()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "commit": git_commit(),
                "command": command_line(), "copy_bandwidth_GBs": round(bandwidth)}
        (args.out / "gpu_quant_kernels.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        (args.out / "gpu_quant_kernels.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
