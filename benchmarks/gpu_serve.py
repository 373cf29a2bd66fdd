"""The server on a GPU: total tokens/s with 1, 4, 8 and 16 concurrent streamed completions.

    python benchmarks/gpu_serve.py                         # TinyLlama-1.1B's shape on cuda, 1 / 4 / 8 / 16 streams
    python benchmarks/gpu_serve.py --streams 1 16 --max-tokens 64 --repeats 3 --out DIR
    python benchmarks/gpu_serve.py --device cpu --n-layers 2 --streams 1 4 --max-tokens 16 --repeats 1

What it shows: continuous batching on the GPU. A decode step of one sequence reads every
weight once, and at batch size 1 reading the weights *is* the step; 16 sequences share each
step, so the weights are read once for 16 tokens. Total throughput should grow almost
linearly with the number of streams until the step stops being bound by weight reads, or
until the host (scheduler, sampler, detokenizer, HTTP) cannot keep up with the GPU.

What runs: the same `tinyllm.serve.Server` that `python -m tinyllm.serve` runs, started in
this process and served by uvicorn from a background thread on 127.0.0.1 (a free port).
The GPU machine gets no checkpoint, so the model is built here:
- weights: random fp16 of a real model's shape (benchmarks/gpu_models.py). Speed depends
  on shapes, not on values, so these time the real work. On cuda the fast path is on
  (`CudaStep`), and the server's scheduler then decodes the whole batch as one
  replayed CUDA graph per batch size (tinyllm/cuda/batch.py).
- tokenizer: a word-level vocabulary of the model's size (the words of the benchmark's
  passage, then filler words), built with `tokenizers`. It has a BOS token and *no* EOS
  token, so a random model cannot end a reply early: every request generates exactly
  `max_tokens` tokens, and the script checks the server's `usage.completion_tokens` says so.

How it measures (as benchmarks/serve_load.py, whose client functions it reuses): for each
stream count C, C client threads open streamed completions at the same moment (distinct
prompts of about 45 tokens, greedy, `max_tokens` each) and read them to the end.
    total tok/s       generated tokens of all streams / wall time from the first request to the last [DONE]
    stream tok/s      one stream's (tokens - 1) / (its last token - its first token), median over streams
    TTFT s            time from sending a request to its first text, median over streams
The client threads run in a child process (--clients process, the default): in this
process they would take turns for Python's global interpreter lock with the event loop and
the scheduler thread, and the server would look slower than it is. After a warm-up, the
counts take turns (1, 4, 8, 16, 1, 4, ...) --repeats times; the table shows medians.

Packages: numpy, tokenizers, starlette, uvicorn, prometheus_client (and cupy on cuda). The
script checks them first and exits with status 2, naming the missing ones.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]

# import name -> what to install
NEEDED = {"numpy": "numpy", "tokenizers": "tokenizers", "starlette": "starlette", "uvicorn": "uvicorn",
          "prometheus_client": "prometheus-client"}


def missing_packages(device: str) -> list[str]:
    needed = dict(NEEDED)
    if device.startswith("cuda"):
        needed["cupy"] = "cupy-cuda12x or cupy-cuda13x"
    return [pip for name, pip in needed.items() if importlib.util.find_spec(name) is None]


# ---- the model and its tokenizer ---------------------------------------------------------------

def word_tokenizer(vocab_size: int):
    """A word-level tinyllm Tokenizer of exactly `vocab_size` entries, with BOS and no EOS.

    ids 0, 1: <unk>, <s> (special: left out of decoded text); then every word and punctuation
    mark of the benchmark's passage (so the prompts encode without <unk>); then filler words
    w<id> up to the model's vocabulary. Text is cut at whitespace and punctuation; decoding
    joins the words with spaces."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from benchmarks.common import PASSAGE
    from tinyllm.tokenizer import Tokenizer

    split = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
    specials = ["<unk>", "<s>"]
    words = list(dict.fromkeys(w for w, _ in split.pre_tokenize_str(PASSAGE)))
    tokens = specials + words
    if len(tokens) > vocab_size:
        raise SystemExit(f"gpu_serve: --vocab-size: the passage needs {len(tokens)} tokens, got {vocab_size}")
    tokens += [f"w{i}" for i in range(len(tokens), vocab_size)]
    tk = HFTokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tk.pre_tokenizer = split
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # no "##" pieces here: words joined by spaces
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return Tokenizer(tk, bos_id=1, eos_ids=(), add_bos=True, chat_template=None,
                     source=f"word-level vocabulary of {vocab_size} (built by benchmarks/gpu_serve.py)")


def _instant_step(model):
    from tinyllm.step import DecodeStep

    class InstantStep(DecodeStep):
        """--engine instant: a decode step that does no model work (every row's next token is drawn
        at once), so the figures are the host's ceiling: scheduler, detokenizer, SSE and HTTP."""

        name, max_batch = "the instant stand-in", None

        def __init__(self, model):
            self.model = model

        def batch(self, max_batch: int, capacity: int):
            return _InstantBatch(self.model, capacity)

        def prompt_logits(self, ids, chunk=256):
            raise NotImplementedError("the instant engine scores no prompts")

    return InstantStep(model)


class _InstantBatch:
    max_rows = 64

    def __init__(self, model, capacity: int):
        import numpy as np

        self.model, self.capacity, self.rng = model, capacity, np.random.default_rng(0)

    def enter_thread(self) -> None:
        pass

    def new_cache(self, positions: int):
        from tinyllm.kv_cache import KVCache

        class Positions(KVCache):  # the position bookkeeping of a cache, without its arrays
            def __init__(self, capacity):
                self.capacity, self._length = capacity, 0

        return Positions(min(positions, self.capacity))

    def release(self, cache) -> None:
        pass

    def step(self, tokens, caches, samplers, histories, n_decode=None) -> list:
        counts: dict[int, list] = {}
        for cache in caches:
            counts.setdefault(id(cache), [cache, 0])[1] += 1
        for cache, n in counts.values():
            cache.advance(n)
        return [int(t) for t in self.rng.integers(3, self.model.config.vocab_size, len(caches))]


def build_llm(args):
    """(LLM, seconds to build, whether the CUDA fast path is on)."""
    from benchmarks.gpu_models import random_model
    from tinyllm.engine import LLM

    overrides = {k: v for k, v in (("n_layers", args.n_layers), ("vocab_size", args.vocab_size)) if v is not None}
    start = time.perf_counter()
    model = random_model(args.shape, args.device, seed=0, **overrides)
    tokenizer = word_tokenizer(model.config.vocab_size)
    if model.config.eos_token_ids or tokenizer.eos_ids:
        raise SystemExit("gpu_serve: the benchmark model must have no EOS id (requests would end early)")
    fast = model.device.is_cuda and args.engine == "model"
    step = _instant_step(model) if args.engine == "instant" else None
    if fast:
        # The fused kernels and the graph-captured decoder, as tinyllm.load picks them; the
        # server's scheduler captures batched graphs through the same step.
        from tinyllm.cuda import CudaStep

        step = CudaStep(model)
    model.device.synchronize()
    seconds = time.perf_counter() - start
    return LLM(model, tokenizer, Path(f"random-{args.shape}"), seconds, step), seconds, fast


# ---- the server, in this process ---------------------------------------------------------------

def start_server(llm, args):
    """tinyllm's Server (warmed up) behind uvicorn in a background thread; (server, http, thread, port, seconds)."""
    import uvicorn

    from benchmarks.serve_load import free_port
    from tinyllm.serve import Server

    start = time.perf_counter()
    server = Server(llm, f"random-{args.shape}", max_batch=args.max_batch, max_context=args.max_context)
    server.start(warm_up=True)  # on the GPU: batched graphs captured, first-call costs paid
    warm_s = time.perf_counter() - start
    port = free_port()
    config = uvicorn.Config(server.app(), host="127.0.0.1", port=port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=10)
    http = uvicorn.Server(config)  # off the main thread, uvicorn installs no signal handlers
    thread = threading.Thread(target=http.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not http.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.stop()
            raise SystemExit(f"gpu_serve: uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    return server, http, thread, port, warm_s


def stop_server(server, http, thread) -> None:
    http.should_exit = True  # what SIGINT does: stop accepting, let streams end, run the lifespan's shutdown
    thread.join(30)
    server.stop()  # in case the lifespan did not run (a second stop does nothing)


# ---- the clients --------------------------------------------------------------------------------

class Clients:
    """Runs serve_load.load_run in a child process (default) or in this one."""

    def __init__(self, where: str):
        self.pool = None
        if where == "process":
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: a fresh interpreter, nothing of this process's GPU state or threads
            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def run(self, port: int, n_streams: int, max_tokens: int) -> dict:
        from benchmarks.serve_load import load_run

        if self.pool is None:
            return load_run(port, n_streams, max_tokens)
        return self.pool.submit(load_run, port, n_streams, max_tokens).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


# ---- what was measured, where -------------------------------------------------------------------

def transformers_batch(llm, batches, max_tokens: int, prompt_len: int = 45, repeats: int = 2) -> dict:
    """The peer: transformers' own batch generation on the same weights, one `generate` call of
    B prompts (static cache, greedy, exactly max_tokens new tokens each), total tok/s = B *
    max_tokens / wall time of the call, the median of `repeats` after a warm-up per B."""
    import torch

    from benchmarks.gpu_models import to_transformers

    hf = to_transformers(llm.model)
    out = {}
    try:
        for b in batches:
            ids = torch.randint(3, llm.config.vocab_size, (b, prompt_len), device="cuda",
                                generator=torch.Generator("cuda").manual_seed(b))
            kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                          do_sample=False, cache_implementation="static", pad_token_id=0)
            try:
                with torch.no_grad():
                    hf.generate(ids, **kwargs)  # warm-up (and compilation) for this batch size
                    rates = []
                    for _ in range(repeats):
                        torch.cuda.synchronize()
                        start = time.perf_counter()
                        gen = hf.generate(ids, **kwargs)
                        torch.cuda.synchronize()
                        rates.append(b * (gen.shape[1] - prompt_len) / (time.perf_counter() - start))
                out[b] = statistics.median(rates)
            except Exception as e:  # report, never hide, a failing peer
                out[b] = f"{type(e).__name__}: {e}"[:200]
            print(f"transformers static-cache generate, B={b}: {out[b]}", file=sys.stderr, flush=True)
    finally:
        del hf
        torch.cuda.empty_cache()
    return out


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    from benchmarks.common import cpu_model

    return f"{cpu_model()} ({os.cpu_count()} cores, NumPy)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_serve.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (to try the script without a GPU)")
    p.add_argument("--shape", default="tinyllama-1.1b",
                   help="a shape of benchmarks/gpu_models.py (default tinyllama-1.1b)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16],
                   help="concurrent streams (default 1 4 8 16)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per stream (default 128)")
    p.add_argument("--repeats", type=int, default=2, help="runs per stream count (default 2)")
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (default 16)")
    p.add_argument("--max-context", type=int, default=None, help="the server's --max-context (default: the shape's)")
    p.add_argument("--n-layers", type=int, default=None, help="override the shape's layer count (a small test model)")
    p.add_argument("--vocab-size", type=int, default=None, help="override the shape's vocabulary size")
    p.add_argument("--clients", choices=("process", "thread"), default="process",
                   help="where the client threads run: a child process (default) or this process")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the JSON and markdown")
    p.add_argument("--engine", choices=("model", "instant"), default="model",
                   help="instant: a stand-in step that does no model work, to measure the host's ceiling")
    p.add_argument("--peer", action="store_true",
                   help="also run transformers' static-cache batch generate of B prompts for each stream count B")
    args = p.parse_args(argv)

    missing = missing_packages(args.device)
    if missing:
        print(f"gpu_serve: missing Python packages: {', '.join(missing)} (install them, or carry them as wheels)",
              file=sys.stderr)
        return 2
    from benchmarks.common import fmt, git_commit, markdown_table, write_outputs
    from benchmarks.gpu_models import SHAPES

    if args.shape not in SHAPES:
        print(f"gpu_serve: --shape: expected one of {', '.join(SHAPES)}, got {args.shape!r}", file=sys.stderr)
        return 2
    if min(args.streams) < 1 or args.max_tokens < 1 or args.repeats < 1:
        print("gpu_serve: --streams, --max-tokens and --repeats must be >= 1", file=sys.stderr)
        return 2

    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device_name(args.device), "commit": git_commit(),
            "command": " ".join(["python", "benchmarks/gpu_serve.py"] + [shlex.quote(a) for a in sys.argv[1:]])}
    print(f"gpu_serve: {info['device']}, commit {info['commit']}", file=sys.stderr, flush=True)

    llm, build_s, fast = build_llm(args)
    c = llm.config
    print(f"gpu_serve: random {args.shape} ({c.n_layers} layers, vocabulary {c.vocab_size}) built in {build_s:.1f} s"
          f"{', fast path on' if fast else ''}", file=sys.stderr, flush=True)
    server, http, thread, port, warm_s = start_server(llm, args)
    batched_graphs = getattr(server.scheduler, "rows", None) is not None
    print(f"gpu_serve: server warmed up in {warm_s:.1f} s (batched CUDA graphs: {'yes' if batched_graphs else 'no'}), "
          f"port {port}", file=sys.stderr, flush=True)

    clients = Clients(args.clients)
    runs: dict[int, list[dict]] = {}
    try:
        clients.run(port, max(args.streams), 8)  # warm-up: the client process, every batch size up to the largest
        for repeat in range(args.repeats):  # counts take turns, so a noisy moment hits them alike
            for n in args.streams:
                r = clients.run(port, n, args.max_tokens)
                r["exact"] = r["tokens"] == n * args.max_tokens  # every request made max_tokens tokens
                runs.setdefault(n, []).append(r)
                print(f"repeat {repeat + 1}: {n:3d} streams, {r['total_tok_s']:8.1f} tok/s total, "
                      f"{r['tokens']} tokens{'' if r['exact'] else ' (NOT streams x max_tokens)'}",
                      file=sys.stderr, flush=True)
    finally:
        clients.close()
        stop_server(server, http, thread)

    def med(n, key):
        values = [r[key] for r in runs[n] if r[key] is not None]
        return statistics.median(values) if values else None

    peer = transformers_batch(llm, args.streams, args.max_tokens) if args.peer and fast else {}
    first = args.streams[0]
    all_exact = all(r["exact"] for rs in runs.values() for r in rs)
    rows = []
    for n in args.streams:
        tokens = ", ".join(str(r["tokens"]) for r in runs[n])
        theirs = peer.get(n)
        ratio = f"{med(n, 'total_tok_s') / theirs:.2f}x" if isinstance(theirs, float) else "-"
        rows.append([n, fmt(med(n, "total_tok_s")), f"{med(n, 'total_tok_s') / med(first, 'total_tok_s'):.2f}x",
                     fmt(med(n, "stream_tok_s")), fmt(med(n, "ttft_s")),
                     fmt(theirs) if isinstance(theirs, float) else (theirs or "-"), ratio,
                     f"{tokens} ({'= ' if all(r['exact'] for r in runs[n]) else '!= '}{n} x {args.max_tokens})"])
    table = markdown_table(["streams", "total tok/s (median)", f"vs {first} stream{'s' if first > 1 else ''}",
                            "tok/s per stream (median)", "TTFT s (median)",
                            "transformers batch generate, tok/s", "tinyllm / transformers",
                            "tokens generated per run"], rows)
    dtype = "fp16" if llm.model.device.is_cuda else "fp32"
    markdown = (
        f"Measured {info['date']} on {info['device']}, commit `{info['commit']}`.\n\n"
        f"Command: `{info['command']}`\n\n"
        f"Model: random {dtype} weights of {args.shape}'s shape ({c.n_layers} layers, dim {c.dim}, "
        f"vocabulary {c.vocab_size}), a word-level tokenizer without EOS (every request generates "
        f"`max_tokens`). Server: tinyllm.serve.Server in process (uvicorn thread), --max-batch {args.max_batch}, "
        f"fast path {'on' if fast else 'off'}, batched CUDA graphs {'yes' if batched_graphs else 'no'}; "
        f"warmed up in {warm_s:.1f} s. Clients: threads in {'a child' if args.clients == 'process' else 'the server'} "
        f"process, {args.max_tokens} greedy tokens per stream, prompts of ~45 tokens, "
        f"{args.repeats} run{'s' if args.repeats > 1 else ''} per stream count (medians).\n\n{table}\n")
    if not all_exact:
        markdown += "\n**Warning**: some requests did not generate exactly max_tokens tokens.\n"
    result = {**info, "settings": vars(args), "model": {k: getattr(c, k) for k in SHAPES[args.shape]} | {
                  "n_layers": c.n_layers, "vocab_size": c.vocab_size, "dtype": dtype},
              "fast_path": fast, "batched_graphs": batched_graphs, "build_s": build_s, "warm_up_s": warm_s,
              "all_requests_max_tokens": all_exact, "runs": {str(k): v for k, v in runs.items()},
              "transformers_batch_generate": {str(k): v for k, v in peer.items()}}
    name = "gpu_serve" if args.device.startswith("cuda") else "gpu_serve_cpu"
    json_path, md_path = write_outputs(args.out, name, result, markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0 if all_exact else 1


if __name__ == "__main__":
    sys.exit(main())
