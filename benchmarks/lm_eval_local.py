"""lm-evaluation-harness scores the model through tinyllm's server, on a task shipped in the repo.

    pip install -e '.[eval]'                             # lm-eval[api]: several hundred MB of dependencies
    python -m benchmarks.lm_eval_local                   # the default model on the CPU, task tinyllm_facts
    python -m benchmarks.lm_eval_local --base-url http://127.0.0.1:8000/v1/completions --tokenizer DIR

What runs: `python -m tinyllm.serve` in a subprocess on 127.0.0.1 (unless --base-url names a
server already running), then lm-evaluation-harness's own command line with its
`local-completions` model against it, on `tests/data/eval/tinyllm_facts.yaml` (a local JSONL
task; the datasets and hub libraries are told to stay offline). A multiple-choice task needs
only log-likelihoods: for each choice lm-eval sends the question's and the choice's token ids
together with `echo: true, logprobs: 1, max_tokens: 1` and sums the prompt log-probabilities
of the choice's tokens. It counts tokens with a Hugging Face tokenizer, so the GGUF's
tokenizer is written out as one first (transformers converts it).

Prints the task's accuracy and writes lm-eval's results and per-example samples under --out.
tests/test_lm_eval.py runs this end to end and checks every example's log-likelihood against
tinyllm's own forward pass and against transformers.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from .serve_load import ServeProcess

REPO = Path(__file__).resolve().parent.parent
TASK_DIR = REPO / "tests" / "data" / "eval"
TASK = "tinyllm_facts"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def export_tokenizer(gguf_path: Path, out_dir: Path) -> Path:
    """The GGUF's tokenizer as a Hugging Face tokenizer directory (what lm-eval loads)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(out_dir)
    return out_dir


def post_json(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    conn.request("POST", u.path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, {"raw": data[:200].decode("utf-8", "replace")}


def model_id(base_url: str) -> str:
    u = urlparse(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/v1/models")
    return json.loads(conn.getresponse().read())["data"][0]["id"]


def echo_logprobs_missing(base_url: str, ids: list[int]) -> str | None:
    """None when the completions endpoint returns prompt log-probabilities the way lm-eval reads
    them (echo + logprobs: one entry per prompt token, the first None, then the generated token);
    otherwise why not, in one line."""
    status, body = post_json(base_url, {"prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1,
                                        "echo": True})
    if status != 200:
        return f"/v1/completions answers {status}: {body.get('error', {}).get('message', body)}"
    try:
        lp = body["choices"][0]["logprobs"]
        token_logprobs, top = lp["token_logprobs"], lp["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        return f"/v1/completions with echo + logprobs gave no choices[0].logprobs: {json.dumps(body)[:200]}"
    if len(token_logprobs) != len(ids) + 1 or token_logprobs[0] is not None or len(top) != len(token_logprobs):
        return (f"/v1/completions with echo: expected {len(ids) + 1} token_logprobs (the prompt's, None first, "
                f"then the generated token's), got {len(token_logprobs)}")
    return None


def run_lm_eval(base_url: str, tokenizer_dir: Path, out_dir: Path, limit: int | None = None) -> subprocess.CompletedProcess:
    """lm-evaluation-harness's command line, local-completions, on the shipped task."""
    model_args = (f"model={model_id(base_url)},base_url={base_url},tokenizer={tokenizer_dir},"
                  "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,max_length=2048")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
           "--include_path", str(TASK_DIR.relative_to(REPO)), "--tasks", TASK, "--batch_size", "1",
           "--log_samples", "--output_path", str(out_dir)]
    if limit:
        cmd += ["--limit", str(limit)]
    env = dict(os.environ, **OFFLINE, OPENAI_API_KEY=os.environ.get("OPENAI_API_KEY", "unused"))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


def read_outputs(out_dir: Path) -> tuple[dict, list[dict]]:
    """lm-eval's results (task -> metrics) and its per-example samples of the task."""
    results = sorted(out_dir.rglob("results_*.json"))
    samples = sorted(out_dir.rglob(f"samples_{TASK}_*.jsonl"))
    if not results or not samples:
        raise FileNotFoundError(f"lm-eval wrote no results_*.json / samples_{TASK}_*.jsonl under {out_dir}")
    metrics = json.loads(results[-1].read_text())["results"][TASK]
    rows = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
    return metrics, rows


def choice_logliks(sample: dict) -> list[tuple[str, str, float]]:
    """(context, continuation, log-likelihood) for each choice of one lm-eval sample, in order."""
    args = sample["arguments"]  # {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}
    keys = sorted(args, key=lambda k: int(k.rsplit("_", 1)[1]))
    return [(args[k]["arg_0"], args[k]["arg_1"], float(resp[0][0])) for k, resp in zip(keys, sample["resps"])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lm_eval_local", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint the server loads (default: the embedded SmolLM2 GGUF)")
    p.add_argument("--base-url", help="use a server already running (its /v1/completions URL); needs --tokenizer")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer directory (default: the GGUF's, written out)")
    p.add_argument("--limit", type=int, help="only the first N examples")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lm_eval"), help="lm-eval's output folder")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.base_url and not args.tokenizer:
        p.error("--base-url needs --tokenizer (the served model's Hugging Face tokenizer directory)")
    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    scratch = tempfile.TemporaryDirectory(prefix="tinyllm-lm-eval-")
    if tokenizer is None:
        from tinyllm.loaders import default_model_path

        gguf = Path(args.model) if args.model else default_model_path()
        if gguf.suffix != ".gguf":
            p.error("--model is not a GGUF file: give its Hugging Face tokenizer directory with --tokenizer")
        tokenizer = export_tokenizer(gguf, Path(scratch.name) / "tokenizer")
    server = None
    try:
        base_url = args.base_url
        if base_url is None:
            server = ServeProcess(out / "serve.log", model=args.model).wait_ready()
            base_url = server.base_url
        import transformers

        probe_ids = transformers.AutoTokenizer.from_pretrained(tokenizer)("The keeper lit the lamp")["input_ids"]
        missing = echo_logprobs_missing(base_url, probe_ids)
        if missing:
            print(f"cannot score through this server: {missing}", file=sys.stderr)
            return 1
        done = run_lm_eval(base_url, tokenizer, out, args.limit)
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
            return 1
        metrics, samples = read_outputs(out)
    finally:
        if server is not None:
            server.stop()
        scratch.cleanup()
    print(f"{TASK}: {len(samples)} examples, acc {metrics['acc,none']:.4f} "
          f"(stderr {metrics['acc_stderr,none']:.4f}), acc_norm {metrics['acc_norm,none']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
