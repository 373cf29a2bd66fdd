"""Solutions to the exercises of docs/13-profiling-and-benchmarks.md;
`python docs/solutions/13_profiling_and_benchmarks.py`.

1. The profiler's per-function totals: the model's operations ranked by time for a short
   generation (the ranking, not the times, is the answer: it depends on the machine).
2. Decode throughput counts generated tokens only: Stats' figures for one run.
"""
import io

import tinyllm
from tinyllm import profiling

OPS = ("Ops.linear", "Ops.attention", "Ops.rms_norm", "Ops.swiglu", "Ops.softmax", "apply_rope")


def main():
    llm = tinyllm.load()
    with profiling.profile(llm, out=io.StringIO()) as prof:
        done = llm.generate("The capital of France is", max_new_tokens=2)
    totals = {}
    for (_, _, name), lines in prof.profiler.get_stats().timings.items():
        if name in OPS and lines:
            totals[name] = sum(t for _, _, t in lines)
    ranked = sorted(totals, key=totals.get, reverse=True)
    assert ranked[0] == "Ops.linear"
    print("1. by total time:", ", ".join(ranked))

    s = done.stats
    print(f"2. {len(done.token_ids)} tokens generated; stats: {s.summary()}")


if __name__ == "__main__":
    main()
