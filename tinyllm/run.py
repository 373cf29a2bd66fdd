"""`tinyllm run` (or `python -m tinyllm.run`): the command line.

    tinyllm run                                   # the embedded SmolLM2-135M answers a built-in question
    tinyllm run "Why is the sky blue?"            # one answer, streamed (also -p/--prompt)
    echo "Why is the sky blue?" | tinyllm run     # the prompt from a pipe
    tinyllm run --chat                            # a conversation; the KV cache is kept between turns
    tinyllm run -m path/to/model --device cuda --raw -n 64 "Once upon a time"
    tinyllm run -m HuggingFaceTB/SmolLM2-360M-Instruct     # a Hub id, fetched into the Hugging Face cache
    tinyllm run --json "2+2?"                     # one JSON object (text, token ids, stats)
    tinyllm run --logprobs 5 "2+2?"               # each token with its probability and 5 alternatives

The prompt comes from the argument, -p/--prompt, --prompt-file, or, when none is given and
stdin is not a terminal, from stdin (with --chat, stdin carries the turns instead).

The flow is the library's: load (tinyllm.load) -> prompt ids (chat template unless --raw)
-> a Generation (sampler + stop rules) -> text streamed to stdout, one stats line on
stderr. Every error prints one line on stderr and exits non-zero: 2 for a bad flag, 1
for anything else (a bad path, a bad value, no GPU, a prompt that does not fit or is not
UTF-8, and any error nobody anticipated), 130 on Ctrl-C; `--debug` (or TINYLLM_DEBUG=1)
adds the traceback. The flags and the error printing shared with the server are in cli.py.
"""
from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path

from .cli import ArgumentParser, UsageError, add_debug_flag, add_model_flags, check_text, decode_utf8, load_options, \
    run_main

DEFAULT_PROMPT = "In two sentences, what does a baker do?"
PROG = "python -m tinyllm.run"


def build_parser(prog: str = PROG) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description=(
        "Run a Llama-family model: stream an answer to a prompt, or chat. With no flags, the "
        "embedded SmolLM2-135M-Instruct answers a built-in question on the CPU."))
    m = add_model_flags(p)
    m.add_argument("-c", "--max-context", type=int, metavar="N", help="KV cache size in tokens (default: prompt + "
                   "--max-new-tokens, or the model's context length with --chat)")

    q = p.add_argument_group("prompt")
    src = q.add_mutually_exclusive_group()
    src.add_argument("text", nargs="?", metavar="PROMPT", help="the prompt (the same as --prompt)")
    src.add_argument("-p", "--prompt", metavar="TEXT", help=f"the prompt; '-' reads it from stdin (default: stdin "
                     f"when it is not a terminal, else {DEFAULT_PROMPT!r})")
    src.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file ('-': stdin)")
    q.add_argument("--system", metavar="TEXT", help="a system prompt for the chat template")
    q.add_argument("--raw", action="store_true", help="plain text completion: skip the chat template")
    q.add_argument("--chat", action="store_true", help="interactive multi-turn chat: one user turn per line "
                   "of stdin (/exit or end of input quits); the KV cache is kept between turns")

    g = p.add_argument_group("generation")
    g.add_argument("-n", "--max-new-tokens", type=int, default=256, metavar="N", help="stop after N new tokens")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the text contains TEXT (not printed); repeatable; \\n and \\t "
                   "mean a newline and a tab")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; higher is more random")
    g.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="keep the most likely tokens up to this mass (1: off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (0: off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="transformers' definition (1: off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's definition, -2..2 (0: off)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's definition, -2..2 (0: off)")
    g.add_argument("-s", "--seed", type=int, help="random seed: the same seed gives the same text (default: random)")

    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, stats) at the "
                   "end instead of streaming; one per turn with --chat")
    o.add_argument("--logprobs", type=int, metavar="N", help="show each token's probability and the N most likely "
                   "alternatives (0-20): a table on the terminal, a 'logprobs' list with --json")
    o.add_argument("--quiet", action="store_true", help="no stats line, no progress display")
    o.add_argument("--profile", action="store_true", help="after the run, print a line-by-line profile (ms) of "
                   "the forward pass, sampler and generation loop on stderr (needs line_profiler)")
    add_debug_flag(o)
    return p


# ---- settings checked before the (slow) model load ---------------------------------------------

def sampling_params(args):
    from .sampler import SamplingError, SamplingParams

    try:
        return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty, seed=args.seed, logprobs=args.logprobs)
    except SamplingError as e:  # name the flag, not the Python parameter
        raise UsageError(f"--{e.param.replace('_', '-')}: {e.detail}") from None


def stop_rules(args):
    from .generate import StopRules

    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens: must be >= 0, got {args.max_new_tokens}")
    if any(not s for s in args.stop):
        raise UsageError("--stop: a stop string must not be empty")
    return StopRules(args.max_new_tokens, tuple(unescape(s) for s in args.stop))


def unescape(text: str) -> str:
    """'\\n' typed in a shell -> a newline; also '\\t' and '\\\\'."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def check_flags(args) -> None:
    if args.raw and args.system is not None:
        raise UsageError("--system needs the chat template; drop --raw")
    if args.system is not None:
        check_text(args.system, "--system")
    if args.raw and args.chat:
        raise UsageError("--chat needs the chat template; drop --raw")
    if args.max_context is not None and args.max_context <= 0:
        raise UsageError(f"--max-context: must be a positive number of tokens, got {args.max_context}")
    if args.chat and "-" in (args.prompt, args.prompt_file):
        raise UsageError("--chat reads its turns from stdin, so the prompt cannot come from stdin ('-')")


def read_prompt(args) -> str | None:
    """The prompt text from the argument, --prompt, --prompt-file or stdin ('-', or piped with
    none of those); None when none was given. Bytes are decoded here, strictly: a prompt that
    is not UTF-8 is an error naming its source."""
    if args.text is not None:
        return check_text(args.text, "the prompt")
    if args.prompt is None and args.prompt_file is None and not args.chat and not sys.stdin.isatty():
        text = read_stdin("the prompt")  # piped in: `echo "Why?" | tinyllm run`
        text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text  # echo's newline
        return text or None  # an empty pipe (e.g. /dev/null) gives no prompt
    if args.prompt is not None:
        return read_stdin("--prompt -") if args.prompt == "-" else check_text(args.prompt, "--prompt")
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            return read_stdin("--prompt-file -")
        path = Path(args.prompt_file)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UsageError(f"--prompt-file: {path}: no such file") from None
        except OSError as e:
            raise UsageError(f"--prompt-file: {path}: cannot be read ({e.strerror or type(e).__name__})") from None
        return decode_utf8(data, f"--prompt-file: {path}")
    return None


def read_stdin(source: str) -> str:
    return decode_utf8(sys.stdin.buffer.read(), f"{source} (stdin)")


def read_line(source: str = "stdin") -> str:
    """One line of stdin ('' at the end of input), decoded strictly."""
    return decode_utf8(sys.stdin.buffer.readline(), source)


# ---- loading, with a progress display on a terminal ------------------------------------------

def load_model(args):
    import tinyllm

    from .loaders import hub_id, resolve_model_path

    show = not args.quiet and sys.stderr.isatty()
    if args.quiet and hub_id(args.model):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    # A Hub id is fetched first, under huggingface_hub's own progress bars, so that they and
    # the loading display never draw on the same line.
    path = resolve_model_path(args.model)
    with LoadingDisplay(args.model or "the default model", enabled=show) as display:
        llm = tinyllm.load(path, **load_options(args), progress=display.update)
    if args.max_context is not None and args.max_context > llm.config.max_seq_len:
        raise UsageError(f"--max-context: {args.max_context} is more than the model's context length "
                         f"({llm.config.max_seq_len})")
    return llm


class LoadingDisplay:
    """A progress bar, the share done and the elapsed time on stderr while the model loads
    (a terminal only), redrawn ten times a second from what `tinyllm.load` reports through
    `update`; it is erased when loading ends."""

    WIDTH = 24

    def __init__(self, what: str, enabled: bool):
        self.what = Path(what).name if what else what
        self.enabled = enabled
        self.fraction = 0.0
        self._done = threading.Event()

    def update(self, fraction: float) -> None:
        self.fraction = max(self.fraction, min(1.0, fraction))

    def __enter__(self):
        if self.enabled:
            self._start = time.perf_counter()
            self._thread = threading.Thread(target=self._draw, daemon=True)
            self._thread.start()
        return self

    def _draw(self):
        while not self._done.wait(0.1):
            filled = int(self.fraction * self.WIDTH)
            bar = "#" * filled + " " * (self.WIDTH - filled)
            sys.stderr.write(f"\rloading {self.what} [{bar}] {self.fraction:4.0%} "
                             f"{time.perf_counter() - self._start:5.1f} s")
            sys.stderr.flush()

    def __exit__(self, *exc):
        if self.enabled:
            self._done.set()
            self._thread.join()
            sys.stderr.write("\r\033[K")  # erase the line
            sys.stderr.flush()
        return False


# ---- generation ------------------------------------------------------------------------------

def run_generation(generation, out=None, on_token=None):
    """Run one Generation to the end, streaming its text to `out` (None: no streaming);
    `on_token(token)`, if given, is called with each Token.

    The one call that does the model's work; a profiler can wrap it. -> Completion"""
    tokens = iter(generation)
    try:
        for token in tokens:
            if on_token is not None:
                on_token(token)
            if out is not None and token.text:
                out.write(token.text)
                out.flush()
    finally:
        tokens.close()  # on Ctrl-C too: the generation records where it stopped
    return generation.result()


def peak_memory(llm) -> dict:
    """The process's peak resident memory (MiB; where the OS reports it) and, on a GPU, what
    CuPy's memory pool holds (MiB)."""
    out = {}
    try:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_mib"] = round(kib / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)  # bytes on macOS
    except ImportError:  # Windows
        pass
    if llm.model.device.is_cuda:
        out["gpu_pool_mib"] = round(llm.model.xp.get_default_memory_pool().total_bytes() / 2**20, 1)
    return out


def memory_summary(memory: dict) -> str:
    parts = []
    if "peak_rss_mib" in memory:
        parts.append(f"peak memory {memory['peak_rss_mib']:.0f} MiB")
    if "gpu_pool_mib" in memory:
        parts.append(f"GPU pool {memory['gpu_pool_mib']:.0f} MiB")
    return "".join(f" | {p}" for p in parts)


def completion_json(llm, done, device: str) -> str:
    out = {"text": done.text, "token_ids": done.token_ids, "prompt_ids": done.prompt_ids,
           "finish_reason": done.finish_reason, "stats": {**done.stats.as_dict(), **peak_memory(llm)},
           "model": str(llm.path), "device": device, "load_s": round(llm.load_seconds, 3)}
    if done.logprobs is not None:
        from .logprobs import TokenText, as_dict

        text = TokenText(llm.tokenizer)
        out["logprobs"] = [as_dict(entry, text) for entry in done.logprobs]
    return json.dumps(out, ensure_ascii=False)


def report(llm, done, args, turn_end: str = "\n") -> None:
    """After a generation: the JSON object, or the newline + one stats line on stderr."""
    if args.json:
        print(completion_json(llm, done, args.device), flush=True)
        return
    if args.logprobs is not None:  # the table came first: now the text as a whole
        sys.stdout.write("\n" + done.text)
    sys.stdout.write(turn_end)
    sys.stdout.flush()
    if not args.quiet:
        note = ""
        if done.finish_reason == "context":
            note = f" | context full ({llm.config.max_seq_len if args.max_context is None else args.max_context} tokens)"
        print(f"[{done.stats.summary()} | load {llm.load_seconds:.1f} s{memory_summary(peak_memory(llm))}{note}]",
              file=sys.stderr, flush=True)


def generate_and_show(llm, args, generation):
    """Run a Generation with the output the flags ask for: streamed text, nothing until the
    JSON at the end, or (--logprobs) one table row per token. -> Completion"""
    if args.json:
        return run_generation(generation)
    if args.logprobs is None:
        return run_generation(generation, sys.stdout)
    from .logprobs import TokenText, table_row

    text = TokenText(llm.tokenizer)
    print(f"{'token':>16} {'prob':>6}  | the {args.logprobs} most likely tokens", flush=True)

    def show(token):
        print(table_row(token.logprob, text), flush=True)

    return run_generation(generation, None, on_token=show)


def one_shot(llm, args, sampling, rules, prompt: str) -> int:
    from .generate import Context, Generation
    from .sampler import Sampler

    ids = llm.prompt_ids(prompt, chat=not args.raw, system=args.system)
    context = None if args.max_context is None else Context(llm.model, args.max_context)
    generation = Generation(llm.step, llm.tokenizer, ids, sampler=Sampler(sampling), rules=rules, context=context)
    done = generate_and_show(llm, args, generation)
    report(llm, done, args)
    return 0


def chat_loop(llm, args, sampling, rules, first: str | None) -> int:
    from .chat import ChatSession
    from .sampler import Sampler

    session = ChatSession(llm, system=args.system, max_context=args.max_context, sampler=Sampler(sampling),
                          rules=rules)
    interactive = sys.stdin.isatty()
    if interactive and not args.quiet:
        print("chat: one message per line; /exit or Ctrl-D to quit", file=sys.stderr)
    while True:
        if first is not None:
            text, first = first, None
        else:
            if interactive:
                sys.stdout.write(">>> ")
                sys.stdout.flush()
            line = read_line()
            if not line:
                break
            text = line.rstrip("\r\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if not text.strip():
            continue
        try:
            done = generate_and_show(llm, args, session.send(text))
        except KeyboardInterrupt:  # Ctrl-C ends this answer, not the chat (the partial answer is kept)
            if not interactive:
                raise
            print("\n[interrupted]", file=sys.stderr)
            continue
        report(llm, done, args, turn_end="\n\n" if interactive else "\n")
    return 0


def run(args) -> int:
    check_flags(args)
    sampling = sampling_params(args)
    rules = stop_rules(args)
    prompt = read_prompt(args)
    from . import profiling

    if args.profile:
        profiling.check_available()  # before the slow load
    llm = load_model(args)
    with profiling.profile(llm, enabled=args.profile):  # the report is printed on stderr at the end
        if args.chat:
            return chat_loop(llm, args, sampling, rules, prompt)
        return one_shot(llm, args, sampling, rules, DEFAULT_PROMPT if prompt is None else prompt)


def main(argv=None, prog: str = PROG) -> int:
    return run_main(prog, run, build_parser(prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
