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
    q.add_argument("--chat", action="store_true", help="interactive multi-turn chat; the KV cache is kept between "
                   "turns. One message per line (on a terminal: line editing, history in ~/.tinyllm_history); "
                   "a message that begins and ends with \"\"\" may span lines. Commands: /clear, /system TEXT, "
                   "/help, /exit (end of input quits too)")

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
    from .quant import weight_formats

    out = {"text": done.text, "token_ids": done.token_ids, "prompt_ids": done.prompt_ids,
           "finish_reason": done.finish_reason, "stats": {**done.stats.as_dict(), **peak_memory(llm)},
           "model": str(llm.path), "device": device, "load_s": round(llm.load_seconds, 3),
           "linear_weights": weight_formats(llm.model.weights)}
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


# ---- the chat REPL ---------------------------------------------------------------------------

HISTORY_FILE = Path("~/.tinyllm_history")
HISTORY_LENGTH = 1000  # lines kept in the history file
BLOCK = '"""'          # a message between two of these may span lines
CHAT_HELP = f"""\
Type a message and press Enter. Commands:
  /clear         forget the conversation and its KV cache (the system prompt stays)
  /system TEXT   set the system prompt and start a new conversation (/system alone: none)
  /help          this help
  /exit          quit (also /quit, or Ctrl-D)
Multi-line: begin a message with {BLOCK} and end it with {BLOCK}; inside, / is plain text.
Ctrl-C stops an answer and keeps the chat going; at the prompt it clears the line."""


class ChatInput:
    """Where the chat's messages come from. On a terminal: `input()` with the standard
    readline module (line editing, and history kept in HISTORY_FILE); otherwise lines of
    stdin, decoded strictly. read_message() joins a multi-line block into one message."""

    def __init__(self, interactive: bool, history: Path = HISTORY_FILE):
        self.interactive = interactive
        self.history = history.expanduser()
        self.readline = None
        if interactive:
            try:
                import readline  # its import is what gives input() line editing
            except ImportError:  # e.g. Windows: input() still works, without history
                pass
            else:
                self.readline = readline
                load_history(readline, self.history)

    def read_line(self, prompt: str) -> str | None:
        """One line without its newline; None at the end of input."""
        if not self.interactive:
            line = read_line()
            return line.rstrip("\r\n") if line else None
        try:
            return check_text(input(prompt), "the message")
        except EOFError:
            sys.stdout.write("\n")  # Ctrl-D leaves the cursor after the prompt
            return None

    def read_message(self) -> tuple[str, bool] | None:
        """(text, literal): a line, or a block between two BLOCK marks (literal: never a
        /command); None at the end of input (which also closes an open block)."""
        line = self.read_line(">>> ")
        if line is None or not line.lstrip().startswith(BLOCK):
            return None if line is None else (line, False)
        lines, text = [], line.lstrip()[len(BLOCK):]
        while text is not None:
            if text.rstrip().endswith(BLOCK):
                lines.append(text.rstrip()[:-len(BLOCK)])
                break
            lines.append(text)
            text = self.read_line("... ")
        return "\n".join(lines).strip("\n"), True

    def close(self) -> None:
        if self.readline is not None:
            save_history(self.readline, self.history)


def load_history(readline, path: Path) -> None:
    """The previous sessions' lines, if the file can be read (a missing or unreadable history
    is no reason to refuse to chat)."""
    readline.set_history_length(HISTORY_LENGTH)
    try:
        readline.read_history_file(str(path))
    except (OSError, ValueError):
        pass


def save_history(readline, path: Path) -> None:
    """The last HISTORY_LENGTH lines, if the file can be written (silently not, otherwise)."""
    try:
        readline.set_history_length(HISTORY_LENGTH)
        readline.write_history_file(str(path))
    except (OSError, ValueError):
        pass


class TypeAhead:
    """Keys typed on the terminal while the model answers: not echoed into the answer, and
    discarded (termios.tcflush with TCIFLUSH) before the next prompt, so they do not become the
    next message. A no-op where stdin is not a terminal or termios is missing (Windows)."""

    def __init__(self, stream=None):
        self.fd, self.saved = None, None
        try:
            import termios

            stream = sys.stdin if stream is None else stream
            if stream.isatty():
                self.termios, self.fd = termios, stream.fileno()
        except (ImportError, OSError, ValueError):  # no termios; a closed or fake stdin
            pass

    def __enter__(self):
        if self.fd is not None:
            try:
                self.saved = self.termios.tcgetattr(self.fd)
                quiet = list(self.saved)
                quiet[3] &= ~self.termios.ECHO  # lflags; ISIG stays on, so Ctrl-C still interrupts
                self.termios.tcsetattr(self.fd, self.termios.TCSANOW, quiet)
            except self.termios.error:
                self.saved = None
        return self

    def __exit__(self, *exc):
        self.flush()
        if self.saved is not None:
            try:
                self.termios.tcsetattr(self.fd, self.termios.TCSANOW, self.saved)
            except self.termios.error:
                pass
        return False

    def flush(self) -> None:
        if self.fd is not None:
            try:
                self.termios.tcflush(self.fd, self.termios.TCIFLUSH)
            except self.termios.error:
                pass


def chat_command(session, line: str, quiet: bool) -> bool:
    """Act on a /command; False when it ends the chat. Its messages go to stderr, so that
    stdout holds only answers (or --json objects)."""
    name, _, rest = line.strip().partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/clear":
        session.clear()
        note = "conversation cleared"
    elif name == "/system":
        session.set_system(rest or None)
        note = "system prompt set; new conversation" if rest else "no system prompt; new conversation"
    elif name in ("/help", "/?"):
        print(CHAT_HELP, file=sys.stderr, flush=True)
        return True
    else:
        print(f"unknown command {name!r}: /help lists them (a message that starts with / goes in a "
              f"{BLOCK} block)", file=sys.stderr, flush=True)
        return True
    if not quiet:
        print(f"[{note}]", file=sys.stderr, flush=True)
    return True


def chat_loop(llm, args, sampling, rules, first: str | None) -> int:
    from .chat import ChatSession
    from .sampler import Sampler

    session = ChatSession(llm, system=args.system, max_context=args.max_context, sampler=Sampler(sampling),
                          rules=rules)
    interactive = sys.stdin.isatty()
    lines = ChatInput(interactive)
    if interactive and not args.quiet:
        print("chat: /help lists the commands; /exit or Ctrl-D quits", file=sys.stderr)
    try:
        while True:
            if first is not None:
                (text, literal), first = (first, True), None
            else:
                try:
                    message = lines.read_message()
                except KeyboardInterrupt:  # at the prompt: a fresh line, as in Python's REPL
                    if not interactive:
                        raise
                    sys.stdout.write("\n")
                    continue
                if message is None:
                    break
                text, literal = message
            if not literal and text.lstrip().startswith("/"):
                if not chat_command(session, text, args.quiet):
                    break
                continue
            if not text.strip():
                continue
            try:
                with TypeAhead():
                    done = generate_and_show(llm, args, session.send(text))
            except KeyboardInterrupt:  # Ctrl-C ends this answer, not the chat (the partial answer is kept)
                if not interactive:
                    raise
                print("\n[interrupted]", file=sys.stderr)
                continue
            report(llm, done, args, turn_end="\n\n" if interactive else "\n")
    finally:
        lines.close()
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
