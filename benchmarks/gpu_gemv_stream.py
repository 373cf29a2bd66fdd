"""Which one-token GEMVs should stream: the decode step's GPU time with gemv_stream's choices varied.

`gemv` holds a weight row in registers; `gemv_stream` streams rows through shared memory
(tinyllm/cuda/kernels.cu). Which matrices take which is decided per step by
kernels.STREAM_MIN_BYTES and STREAM_HEAD_BLOCKS, and a streaming launch's shape by STREAM_SLOTS
(pieces in flight per warp) and STREAM_PER_SM (blocks per SM at most). Here each variant
sets them, a new CudaDecoder captures the step, and back-to-back replays are timed with
CUDA events (median of 3 runs of N replays, cache at 144 positions); variants take turns
for --rounds rounds. The greedy tokens of a 16-token prompt (33 of them) are compared with
the first variant's. Random fp16 weights of the named shapes (benchmarks/gpu_models.py).

    python benchmarks/gpu_gemv_stream.py [--shapes tinyllama-1.1b llama-3-8b] [--rounds 2] [--out FILE]
        [--variants '[{"name": "all gemv", "stream": false}, {"name": "LM head too", "lm_head": true}]']
        [--soak N]

--soak N: after the timings, each variant also decodes 256 greedy tokens N more times from
the same prompt (the graph feeding itself, steps queued ahead, as `gpu_decode.py` runs it),
and counts the passes whose tokens differ from its first: a check for faults that appear
only now and then (a pass that raises is reported with its error, and the run stops).

A variant is a JSON object: name, and any of stream (false: every GEMV on gemv; streaming
is on unless a variant says so, as in the library), min_mib, lm_head (true: the LM head
streams whatever gemv's blocks per SM; false: never), slots, per_sm; what it leaves out
keeps the library's value.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import git_commit  # noqa: E402

DEFAULT_VARIANTS = [
    {"name": "all gemv", "stream": False},
    {"name": "streaming on"},
    {"name": "LM head never", "lm_head": False},
    {"name": "LM head always", "lm_head": True},
    {"name": "every matrix", "min_mib": 0, "lm_head": True},
    {"name": "3 slots", "slots": 3},
    {"name": "1 block per SM", "per_sm": 1},
]


def configure(K, defaults: dict, v: dict) -> None:
    K.set_gemv_stream(v.get("stream", True))
    K.STREAM_MIN_BYTES = int(v["min_mib"] * 2 ** 20) if "min_mib" in v else defaults["min_bytes"]
    # lm_head: true streams it whatever gemv's blocks per SM, false never
    K.STREAM_HEAD_BLOCKS = {True: 1 << 20, False: -1}.get(v.get("lm_head"), defaults["head_blocks"])
    K.STREAM_SLOTS = v.get("slots", defaults["slots"])
    K.STREAM_PER_SM = v.get("per_sm", defaults["per_sm"])


def soak(cp, model, decoder, prompt_ids, passes: int) -> dict:
    """256 greedy tokens from one prompt, `passes` + 1 times: passes differing from the first."""
    ids = prompt_ids(16, model.config.vocab_size)
    cache = decoder.new_cache(16 + 256 + 8)
    first, differ = None, 0
    for i in range(passes + 1):
        cache.trim(cache.length)
        try:
            tok = int(cp.argmax(decoder.eager.forward(ids, cache)[0, -1]))
            tokens = [tok] + list(decoder.decode(cache, tok, 255))
        except Exception as e:  # the fault itself is the finding: report it, never hide it
            return {"passes": i, "differ": differ, "error": f"{type(e).__name__}: {e}"[:300]}
        first = first or tokens
        differ += tokens != first
    return {"passes": passes, "differ": differ}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["tinyllama-1.1b", "llama-3.2-1b", "smollm2-135m", "llama-3-8b"])
    ap.add_argument("--variants", type=json.loads, default=DEFAULT_VARIANTS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--soak", type=int, default=0, help="decode passes of 256 tokens per variant after the timings")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import cupy as cp

    from benchmarks.gpu_decode import replay_us
    from benchmarks.gpu_models import ALL_SHAPES, prompt_ids, random_model
    from tinyllm.cuda import CudaDecoder
    from tinyllm.cuda import kernels as K

    for name in args.shapes:
        if name not in ALL_SHAPES:
            ap.error(f"--shapes: unknown shape {name!r}; expected one of {', '.join(ALL_SHAPES)}")
    defaults = {"stream": K._stream["enabled"], "min_bytes": K.STREAM_MIN_BYTES, "head_blocks": K.STREAM_HEAD_BLOCKS, "slots": K.STREAM_SLOTS,
                "per_sm": K.STREAM_PER_SM}
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "commit": git_commit(), "command": "python benchmarks/gpu_gemv_stream.py " + " ".join(argv or sys.argv[1:]),
              "library": defaults, "variants": args.variants, "shapes": {}}
    try:
        for shape in args.shapes:
            model = random_model(shape)
            n = 200 if model.config.dim < 4096 else 60
            rows: dict[str, dict] = {}
            first = None
            for r in range(args.rounds):
                for v in args.variants:
                    configure(K, defaults, v)
                    decoder = CudaDecoder(model)
                    cache = decoder.new_cache(16 + 256 + 8)
                    us = replay_us(decoder, cache, 16 + 128, n, runs=3)
                    row = rows.setdefault(v["name"], {"us": []})
                    row["us"].append(us)
                    if r == 0:
                        ids = prompt_ids(16, model.config.vocab_size)
                        c2 = decoder.new_cache(16 + 40)
                        tok = int(cp.argmax(decoder.eager.forward(ids, c2)[0, -1]))
                        tokens = [tok] + list(decoder.decode(c2, tok, 32))
                        first = first or tokens
                        row["same_tokens"] = tokens == first
                    print(f"{shape} {v['name']:>16} round {r}: {us:8.1f} µs per step", flush=True)
                    del decoder, cache
                    gc.collect()
                    cp.get_default_memory_pool().free_all_blocks()
            for v in args.variants if args.soak else ():
                configure(K, defaults, v)
                found = rows[v["name"]]["soak"] = soak(cp, model, CudaDecoder(model), prompt_ids, args.soak)
                print(f"{shape} {v['name']:>16} soak: {found}", flush=True)
                if "error" in found:  # the GPU context is lost: keep what was measured, go no further
                    result["shapes"][shape] = rows
                    result["fault"] = {"shape": shape, "variant": v["name"], **found}
                    if args.out:
                        args.out.write_text(json.dumps(result, indent=1))
                    return result
                gc.collect()
                cp.get_default_memory_pool().free_all_blocks()
            base = statistics.median(rows[args.variants[0]["name"]]["us"])
            for row in rows.values():
                row["median_us"] = statistics.median(row["us"])
                row["tok_s"] = 1e6 / row["median_us"]
                row["vs_first"] = base / row["median_us"]
            result["shapes"][shape] = rows
            del model
            gc.collect()
            cp.get_default_memory_pool().free_all_blocks()
    finally:
        configure(K, defaults, {"stream": defaults["stream"]})
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print("\n| shape | variant | GPU µs per step (median) | tok/s | vs first | runs | same tokens |\n|---|---|---|---|---|---|---|")
    for shape, rows in result["shapes"].items():
        for name, row in rows.items():
            print(f"| {shape} | {name} | {row['median_us']:.1f} | {row['tok_s']:.0f} | {row['vs_first']:.3f}× | "
                  f"{', '.join(f'{u:.1f}' for u in row['us'])} | {row.get('same_tokens', '')} |")
    return result


if __name__ == "__main__":
    main()
