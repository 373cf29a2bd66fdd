"""The real default model on a GPU: greedy answers against the CPU's (not a test, a check).

    python benchmarks/gpu_default_check.py --expect cpu.json [--model PATH] [--quantized dequantize] [--out gpu.json]
    python benchmarks/gpu_default_check.py --device cpu --out cpu.json      # the expectation

Six chat prompts, 32 greedy tokens each, through `LLM.generate` (one sequence: on a GPU the
captured decode step) and through `LLM.generate_batch` (the scheduler: on a GPU the batched
graphs, with the prompts prefilled inside the steps); with `--server`, also through
`python -m tinyllm.serve --engine-process on` (the six sent at once to /v1/chat/completions,
the model and its scheduler in a process of their own), compared with the expectation's
batched answers. With `--expect`, each answer's token ids are compared with the file's (made
by the same script on the CPU, whose greedy answers `tests/test_default_model.py` checks
against transformers) and the first difference is shown. The GPU machine has no copy of the
model: carry the GGUF (see the device notes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["What is the capital of France?", "Name three colors.", "Why is the sky blue?",
           "Write a haiku about the sea.", "What is 2 + 2?", "Give me a synonym for happy."]


def answers(llm, max_new_tokens: int = 32) -> dict:
    single = [llm.generate(p, chat=True, max_new_tokens=max_new_tokens).token_ids for p in PROMPTS]
    batch = [c.token_ids for c in llm.generate_batch(PROMPTS, chat=True, max_new_tokens=max_new_tokens)]
    return {"single": single, "batch": batch}


def server_answers(args, max_new_tokens: int = 32) -> list:
    """The six answers' token ids from the server's command line, the requests sent together."""
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.serve_load import ServeProcess, http_request

    flags = ["--device", args.device, "--quantized", args.quantized, "--max-batch", "8", "--engine-process", "on"]
    log = Path(args.out or "answers").with_suffix(".serve.log")
    server = ServeProcess(log, flags, args.model).wait_ready(600)
    try:
        def ask(prompt):
            status, _, body = http_request(server.port, "POST", "/v1/chat/completions", {
                "messages": [{"role": "user", "content": prompt}], "max_tokens": max_new_tokens,
                "temperature": 0, "return_token_ids": True})
            if status != 200:
                raise SystemExit(f"the server answered {status}: {body}")
            return body["choices"][0]["token_ids"]

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = list(pool.map(ask, PROMPTS))
    finally:
        code = server.stop()
    print(f"server: stopped with exit status {code}; its log: {log}: {log.read_text().strip()[-300:]}")
    return got


def main(argv=None) -> int:
    import tinyllm

    p = argparse.ArgumentParser(prog="python benchmarks/gpu_default_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="the checkpoint (default: the embedded default model)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quantized", default="auto", choices=("auto", "keep", "dequantize"),
                   help="keep the GGUF's blocks on the GPU (auto, keep) or expand them to fp16 (dequantize)")
    p.add_argument("--expect", type=Path, help="answers to compare with (this script's --out on the CPU)")
    p.add_argument("--out", type=Path, help="where to write this run's answers")
    p.add_argument("--server", action="store_true", help="also through `python -m tinyllm.serve` (above)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    llm = tinyllm.load(args.model, device=args.device, quantized=args.quantized)
    print(f"loaded on {args.device} in {time.perf_counter() - start:.1f} s, decode step: {llm.step.name}")
    got = answers(llm)
    if args.server:
        del llm
        got["server"] = server_answers(args)
    if args.out:
        args.out.write_text(json.dumps(got))
    if not args.expect:
        return 0
    want, same_all = json.loads(args.expect.read_text()), True
    for way in [w for w in ("single", "batch", "server") if w in got]:
        expected = want["batch" if way == "server" else way]
        same = [a == b for a, b in zip(got[way], expected)]
        same_all &= all(same)
        print(f"{way}: {sum(same)} of {len(same)} answers identical to the expectation")
        for i, (a, b) in enumerate(zip(got[way], expected)):
            if a != b:
                n = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                print(f"  prompt {i}: first difference at token {n}: {a[n:n + 3]} vs {b[n:n + 3]}")
    return 0 if same_all else 1


if __name__ == "__main__":
    sys.exit(main())
