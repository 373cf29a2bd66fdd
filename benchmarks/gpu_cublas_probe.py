"""cuBLAS for the batched decode step, the facts first: does a graph capture CuPy's matmul
(after a warm-up on the capturing stream), how fast is it at M = 1 .. 512 rows on the decode
step's matrices, and is one row's result the same bits whatever the other rows hold and
wherever the row sits (at a fixed M), and at another M?

CuPy itself refuses cuBLAS calls during a capture (its cublas.setStream raises
NotImplementedError while the stream captures, as of CuPy 14.2), so the probe also calls
cuBLAS through ctypes (tinyllm/cuda/cublas.py: a handle of its own, its workspace set before
any capture): `--via ctypes cupy` (the default).

Each matrix goes round copies of itself (at least 300 MB of them, so the 50 MB L2 does not
serve it as a step never would), the calls captured into a graph and replayed; µs per call
from CUDA events. Random fp16 values.

    python benchmarks/gpu_cublas_probe.py [--shapes tinyllama-1.1b llama-3-8b] [--rows 1 16 64 128 512]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_models import ALL_SHAPES, shape_config  # noqa: E402


def graph_us(cp, fn, calls: int = 16) -> float:
    """µs per fn(i) call, `calls` of them captured in one graph (decoder.capture_graph: one
    eager run first on the capturing stream, where cuBLAS sets itself up), the graph replayed
    3 times."""
    from tinyllm.cuda.decoder import capture_graph

    stream = cp.cuda.Stream(non_blocking=True)
    graph, _pool, _ = capture_graph(stream, lambda: [fn(i) for i in range(calls)])
    graph.launch(stream)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record(stream)
    for _ in range(3):
        graph.launch(stream)
    end.record(stream)
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) * 1000 / (3 * calls)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["tinyllama-1.1b", "llama-3-8b"], choices=sorted(ALL_SHAPES))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 128, 512])
    ap.add_argument("--via", nargs="+", choices=("cupy", "ctypes"), default=["ctypes", "cupy"])
    args = ap.parse_args()
    import cupy as cp

    rng = cp.random.default_rng(0)
    for via in args.via:
        if via == "ctypes":
            from tinyllm.cuda.cublas import handle

            mm = handle().gemm_nt
        else:
            mm = lambda x, w, out: cp.matmul(x, w.T, out=out)  # noqa: E731
        print(f"== cuBLAS via {via}", flush=True)
        probe(cp, rng, args, mm)
    return 0


def probe(cp, rng, args, mm) -> None:
    """Each shape's matrices: µs per call at each row count in a captured graph, and a row's bits."""
    for shape in args.shapes:
        c = shape_config(shape)
        mats = {"qkv": ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.dim), "gate|up": (2 * c.hidden_dim, c.dim),
                "wo": (c.dim, c.n_heads * c.head_dim), "down": (c.dim, c.hidden_dim), "lm_head": (c.vocab_size, c.dim)}
        for role, (n, k) in mats.items():
            copies = [(rng.standard_normal((n, k), dtype=cp.float32) * 0.02).astype(cp.float16)
                      for _ in range(max(1, min(8, -(-300_000_000 // (n * k * 2)))))]
            cells = []
            for m in args.rows:
                x = rng.standard_normal((m, k), dtype=cp.float32).astype(cp.float16)
                out = cp.empty((m, n), cp.float16)
                try:
                    us = graph_us(cp, lambda i, x=x, out=out, ws=copies: mm(x, ws[i % len(ws)], out))
                except Exception as e:  # noqa: BLE001 - the probe reports whatever capture raises
                    cells.append(f"M={m}: not captured ({type(e).__name__}: {e})")
                    break
                cells.append(f"M={m} {us:.1f} µs ({n * k * 2 / us / 1e3:.0f} GB/s of weights)")
            print(f"{shape} {role} {n}x{k}: " + "; ".join(cells), flush=True)
            w = copies[0]

            def product(a):
                out = cp.empty((a.shape[0], n), cp.float16)
                mm(cp.ascontiguousarray(a), w, out)
                return out

            x = rng.standard_normal((64, k), dtype=cp.float32).astype(cp.float16)
            others = x.copy()
            others[1:] = rng.standard_normal((63, k), dtype=cp.float32).astype(cp.float16) * 5
            moved = cp.concatenate([others[1:38], x[:1], others[38:]])
            row = product(x)[0]
            reference = (x[:1].astype(cp.float32) @ w.T.astype(cp.float32))[0]
            error = float(cp.abs(row.astype(cp.float32) - reference).max() / cp.abs(reference).max())
            print(f"  one row at M=64: among other rows {bool((product(others)[0] == row).all())}, "
                  f"moved to row 37 {bool((product(moved)[37] == row).all())}, "
                  f"alone at M=1 {bool((product(x[:1])[0] == row).all())}, "
                  f"at M=16 {bool((product(x[:16])[0] == row).all())}; "
                  f"max error against fp32 {error:.1e}", flush=True)
            del copies


if __name__ == "__main__":
    sys.exit(main())
