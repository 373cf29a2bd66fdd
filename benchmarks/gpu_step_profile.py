"""Where a batched decode step's GPU time goes: each kernel's time per step, by kernel.

The step that the server's scheduler replays (tinyllm/cuda/batch.py) is run as ordinary
calls, the same kernels as its captured graph, under the torch profiler (CUPTI sees
CuPy's kernels too); each kernel's device time is summed over the step's launches and
averaged over --repeats steps. Beside it, `replay ms`: the captured graph replayed back
to back (CUDA events), the step as the server runs it. Random fp16 weights of a real
shape (benchmarks/gpu_models.py); sequence b has a prompt of 100 + b tokens.

    python benchmarks/gpu_step_profile.py [--shapes tinyllama-1.1b] [--batches 16 64] [--gemms kernels cublas] [--out DIR]

--gemms: the batched step's GEMMs (tinyllm/cuda/ops.py GEMMS), each measured in turn in one run.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import command_line, git_commit  # noqa: E402
from benchmarks.gpu_batch import replay_ms  # noqa: E402
from benchmarks.gpu_models import ALL_SHAPES, random_model  # noqa: E402


def profile_step(batch, b: int, repeats: int) -> dict:
    """kernel name -> (microseconds per step, launches per step) for a step of b rows."""
    import torch

    caches = [batch.new_cache() for _ in range(b)]
    try:
        for i, cache in enumerate(caches):
            batch.decoder.eager.forward(np.ones((1, 100 + i), dtype=np.int64), cache)
        tokens = batch.step([1] * b, caches)
        for _ in range(4):
            tokens = batch.step(tokens, caches)
        replay = replay_ms(batch, b, 32)  # (ends with the device idle)
        batch._write_inputs(0, tokens, [c.length for c in caches], caches, [None] * b)
        batch._copy_inputs(0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                with batch.stream:
                    batch._run(b, caches, batch.batched_model)
            batch.stream.synchronize()
    finally:
        for cache in caches:
            batch.release(cache)
    kernels = kernel_times(prof, repeats)
    return {"replay_ms": round(replay, 3), "kernels_ms": round(sum(us for us, _ in kernels.values()) / 1000, 3),
            "kernels": kernels}


def kernel_times(prof, repeats: int = 1) -> dict:
    """kernel name -> (device µs, launches) per repeat, from a torch profiler run, longest first."""
    import torch

    per = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per[event.name][0] += event.device_time / repeats
            per[event.name][1] += 1
    return {name: (round(us, 1), n // repeats) for name, (us, n) in sorted(per.items(), key=lambda kv: -kv[1][0])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["tinyllama-1.1b"], choices=sorted(ALL_SHAPES))
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gemms", nargs="+", default=["kernels"], choices=("kernels", "cublas"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from tinyllm.cuda import CudaDecoder
    from tinyllm.cuda.batch import BatchDecoder

    result = {"commit": git_commit(), "command": command_line(), "steps": {}}
    for shape in args.shapes:
        readable = random_model(shape)
        decoder = CudaDecoder(readable)
        for gemm in args.gemms:
            batch = BatchDecoder(decoder, max_batch=max(args.batches), capacity=1024, gemm=gemm)
            for b in args.batches:
                r = result["steps"][f"{shape} {gemm} B={b}"] = profile_step(batch, b, args.repeats)
                print(f"== {shape}, {gemm}, {b} rows: replay {r['replay_ms']:.3f} ms, kernels {r['kernels_ms']:.3f} ms, "
                      f"{sum(n for _, n in r['kernels'].values())} launches")
                for name, (us, n) in list(r["kernels"].items())[:12]:
                    print(f"{us:9.1f} us  {n:4d}x  {name[:110]}")
            del batch
        del decoder, readable
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_step_profile.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
