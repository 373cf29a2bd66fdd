"""Where a prompt's prefill time goes on the GPU: device time by kernel against wall time.

The prefill is the fast path's eager forward pass (tinyllm/cuda/ops.py: cuBLAS for the
matmuls, one kernel each for the norms, RoPE, softmax and SwiGLU), as `CudaStep.prefill`
runs it. For a prompt of --tokens tokens it reports:
    wall ms      the forward pass and the first token's id on the host, median of --repeats
    device ms    the sum of every kernel's device time (torch profiler; CUPTI sees CuPy's kernels)
    launches     kernels per prefill
    host ms      the host's own time in the pass with the device's work not waited for
                 (the pass timed up to its last launch, before the synchronize)
If wall is near device, the GPU sets the pace; if near host, the launches do. Random fp16
weights of a real shape (benchmarks/gpu_models.py).

    python benchmarks/gpu_prefill_profile.py [--shapes llama-3-8b] [--tokens 512] [--out DIR]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import command_line, git_commit  # noqa: E402
from benchmarks.gpu_models import ALL_SHAPES, random_model  # noqa: E402
from benchmarks.gpu_step_profile import kernel_times  # noqa: E402


def profile_prefill(model, tokens: int, repeats: int) -> dict:
    import cupy as cp
    import torch

    ids = np.random.default_rng(1).integers(3, model.config.vocab_size, (1, tokens))
    cache = model.new_cache(tokens + 8)

    def once():
        cache.trim(cache.length)
        logits = model.forward(ids, cache)
        launched = time.perf_counter()
        int(cp.argmax(logits[0, -1]).get())
        return launched

    once()
    walls, hosts = [], []
    for _ in range(repeats):
        cp.cuda.Device().synchronize()
        start = time.perf_counter()
        launched = once()
        walls.append(time.perf_counter() - start)
        hosts.append(launched - start)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        once()
        cp.cuda.Device().synchronize()
    kernels = {name[:120]: v for name, v in kernel_times(prof).items()}
    profiler = cProfile.Profile()
    profiler.enable()
    once()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    return {"tokens": tokens, "wall_ms": round(1e3 * statistics.median(walls), 2),
            "host_ms": round(1e3 * statistics.median(hosts), 2),
            "device_ms": round(sum(us for us, _ in kernels.values()) / 1e3, 2),
            "launches": sum(n for _, n in kernels.values()), "kernels": kernels, "host_profile": text.getvalue()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["llama-3-8b"], choices=sorted(ALL_SHAPES))
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from tinyllm.cuda.decoder import CudaDecoder

    out = {"commit": git_commit(), "command": command_line(), "shapes": {}}
    for shape in args.shapes:
        model = CudaDecoder(random_model(shape, "cuda", seed=0, dtype=np.float16)).eager
        r = profile_prefill(model, args.tokens, args.repeats)
        out["shapes"][shape] = r
        print(f"{shape}: {args.tokens} tokens, wall {r['wall_ms']} ms, host (to the last launch) {r['host_ms']} ms, "
              f"device {r['device_ms']} ms in {r['launches']} launches", flush=True)
        for name, (us, n) in list(r["kernels"].items())[:14]:
            print(f"  {us / 1e3:8.2f} ms  {n:5d}  {name}")
        print(r["host_profile"][:5000])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_prefill_profile.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
