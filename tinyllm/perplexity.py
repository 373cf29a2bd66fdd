"""`python -m tinyllm.perplexity FILE`: how well a model predicts a text.

Perplexity is exp(mean negative log-likelihood) of the text's tokens, each predicted from the
tokens before it: the number of equally likely choices the model is, on average, hesitating
between. Lower is better; a model that knew the text by heart would score 1.

    python -m tinyllm.perplexity tests/data/eval/lighthouse.txt                 # the embedded SmolLM2-135M
    python -m tinyllm.perplexity book.txt --model m.gguf --device cuda --context 1024 --stride 512 --json

Which tokens are scored (the sliding window of Hugging Face's perplexity guide):

- The text is tokenized as a plain prompt: with BOS in front only where the checkpoint's
  tokenizer adds one (Llama 2 does, SmolLM2 does not). There are N tokens t[0..N-1].
- Windows of `context` tokens start at 0, stride, 2 x stride, ...; the last one ends at N,
  and no window starts after the one that reaches N.
- Each window scores the tokens that no earlier window scored, from the tokens before them
  in the same window: window [b, e) scores t[i] for max(prev_e, b + 1) <= i < e, where prev_e
  is the end of the previous window (0 for the first). A token is never scored twice.
- t[0] is never scored: nothing comes before it (with BOS, BOS is t[0], so every token of
  the text is scored). With stride < context, every other token is scored once, with at least
  context - stride tokens before it (fewer only in the first window). With stride = context
  the windows do not overlap, and the first token of each window after the first has nothing
  before it in its window, so it is not scored either.

    perplexity = exp( sum of -log p(t[i] | window's tokens before i) / number of scored tokens )

The forward pass is the readable one (`Model.forward`, NumPy or CuPy): a window is a prefill,
not a decode step, so the GPU fast path has nothing to add here and `--no-fast-path` changes
nothing. Logits are only projected to the vocabulary for the chunks of a window that hold
scored tokens; the rest of the window is context, run with `last_only=True`.

Bad input is one line on stderr: an empty file, a text shorter than one window (its figure
would not be at the context asked for: give a smaller --context), a stride larger than the
context; exit status 2 for a malformed flag, 1 for everything else (cli.py's conventions).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .cli import ArgumentParser, UsageError, add_debug_flag, add_model_flags, decode_utf8, load_options, run_main
from .kv_cache import PREFILL_CHUNK

PROG = "python -m tinyllm.perplexity"
DEFAULT_CONTEXT = 512


@dataclass(frozen=True)
class Window:
    begin: int  # the window is tokens [begin, end)
    end: int
    first_scored: int  # tokens [first_scored, end) are scored in this window

    @property
    def n_scored(self) -> int:
        return self.end - self.first_scored


def check_windows(n_tokens: int, context: int, stride: int) -> None:
    """ValueError naming the flag when `context` and `stride` cannot cut N tokens into windows."""
    if context < 2:
        raise UsageError(f"--context: a window needs at least 2 tokens (one to predict from), got {context}")
    if stride < 1:
        raise UsageError(f"--stride: must be a positive number of tokens, got {stride}")
    if stride > context:
        raise UsageError(f"--stride {stride} is larger than --context {context}: the tokens between windows "
                         "would never be scored")
    if n_tokens < context:
        raise UsageError(f"the text has {n_tokens} tokens, fewer than one window of --context {context}: its "
                         f"perplexity would not be at that context; give --context {max(n_tokens, 2)} or less")


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The sliding windows over N tokens and the tokens each one scores (see the module docstring)."""
    check_windows(n_tokens, context, stride)
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        out.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def token_nll(xp, logits, targets):
    """-log softmax(logits)[target] per row, in float32.  logits [T, V], targets [T] -> [T]"""
    m = logits.max(axis=-1, keepdims=True)  # [T, 1]: subtracted so exp cannot overflow
    log_z = m[:, 0] + xp.log(xp.exp(logits - m).sum(axis=-1))  # [T]
    return log_z - logits[xp.arange(len(targets)), targets]


def window_nll(model, cache, ids, window: Window) -> float:
    """Sum of -log p over the tokens `window` scores, running its tokens through `model` from
    an empty cache in PREFILL_CHUNK pieces; only pieces with scored tokens get logits."""
    xp = model.xp
    tokens = np.asarray(ids[window.begin:window.end], dtype=np.int64)  # [W]
    # the logit at window position j predicts token j + 1: positions [need_from, need_to) are needed
    need_from, need_to = window.first_scored - window.begin - 1, len(tokens) - 1
    cache.trim(cache.length)
    total = 0.0
    for i in range(0, len(tokens), PREFILL_CHUNK):
        chunk = tokens[i:i + PREFILL_CHUNK]
        lo, hi = max(need_from, i), min(need_to, i + len(chunk))  # needed positions inside this chunk
        if lo >= hi:
            model.forward(chunk[None, :], cache, last_only=True)  # context only: fills the cache
            continue
        logits = model.forward(chunk[None, :], cache, last_only=False)[0]  # [C, V]
        targets = xp.asarray(tokens[lo + 1:hi + 1])
        total += float(token_nll(xp, logits[lo - i:hi - i], targets).astype(xp.float64).sum())
    return total


@dataclass
class Perplexity:
    perplexity: float
    mean_nll: float   # nats per scored token
    nll_sum: float
    tokens: int       # N, BOS included when the tokenizer adds one
    scored: int
    windows: int
    context: int
    stride: int


def perplexity(model, ids, context: int = DEFAULT_CONTEXT, stride: int | None = None, progress=None) -> Perplexity:
    """The perplexity of token ids under `model` over sliding windows (see the module docstring).
    `stride` defaults to half the context. `progress(done_windows, all_windows, tokens_scored,
    nll_sum)` is called after each window."""
    stride = max(1, context // 2) if stride is None else stride
    if context > model.config.max_seq_len:
        raise UsageError(f"--context {context} is more than the model's context length ({model.config.max_seq_len})")
    plan = windows(len(ids), context, stride)
    cache = model.new_cache(context)
    nll_sum, scored = 0.0, 0
    for k, window in enumerate(plan):
        nll_sum += window_nll(model, cache, ids, window)
        scored += window.n_scored
        if progress is not None:
            progress(k + 1, len(plan), scored, nll_sum)
    mean = nll_sum / scored
    return Perplexity(math.exp(mean), mean, nll_sum, len(ids), scored, len(plan), context, stride)


# ---- the command line ------------------------------------------------------------------------

def build_parser(prog: str = PROG) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description=(
        "The perplexity of a UTF-8 text file under a model, over sliding windows of --context tokens "
        "advanced by --stride; each window scores only the tokens no earlier window scored."))
    p.add_argument("file", metavar="FILE", help="a UTF-8 text file")
    add_model_flags(p)
    w = p.add_argument_group("windows")
    w.add_argument("--context", type=int, default=DEFAULT_CONTEXT, metavar="N",
                   help=f"tokens per window (default {DEFAULT_CONTEXT})")
    w.add_argument("--stride", type=int, default=None, metavar="S",
                   help="tokens between the starts of two windows, at most --context (default: half of --context)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object instead of a line of text")
    o.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_debug_flag(o)
    return p


def read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a text file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if not data.strip():
        raise UsageError(f"{path}: the file is empty: there is no text to score")
    return decode_utf8(data, str(path))


class Progress:
    """One line per window on stderr: redrawn in place on a terminal, appended otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int, scored: int, nll_sum: float) -> None:
        if not self.enabled:
            return
        rate = scored / max(time.perf_counter() - self.start, 1e-9)
        line = (f"window {done}/{total}: {scored} tokens scored, perplexity so far "
                f"{math.exp(nll_sum / scored):.4f} ({rate:.0f} tok/s)")
        sys.stderr.write(f"\r\033[K{line}" if self.tty else line + "\n")
        if self.tty and done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def run(args) -> int:
    import tinyllm

    stride = max(1, args.context // 2) if args.stride is None else args.stride
    check_windows(sys.maxsize, args.context, stride)  # the flags alone, before the slow load
    path = Path(args.file)
    text = read_text(path)
    llm = tinyllm.load(args.model, **{**load_options(args), "fast_path": False})
    ids = llm.tokenizer.encode(text)
    start = time.perf_counter()
    result = perplexity(llm.step.prompt_model, ids, args.context, stride, Progress(not args.quiet))
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"file": str(path), "model": str(llm.path), "device": args.device,
                          "dtype": np.dtype(llm.model.dtype).name, "bos": bool(llm.tokenizer.add_bos),
                          **asdict(result), "seconds": round(seconds, 3)}), flush=True)
    else:
        print(f"perplexity {result.perplexity:.4f} ({result.scored} of {result.tokens} tokens scored, "
              f"{result.windows} windows of {result.context} tokens, stride {result.stride}; {seconds:.1f} s)",
              flush=True)
    return 0


def main(argv=None, prog: str = PROG) -> int:
    """`prog` names the command in messages: `tinyllm perplexity` when a console command runs this."""
    return run_main(prog, run, build_parser(prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
