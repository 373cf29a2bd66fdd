"""The `tinyllm` command, and what its two commands share (`tinyllm run`, `tinyllm serve`;
also `python -m tinyllm.run` and `python -m tinyllm.serve`).

- `main`: `tinyllm run ...` / `tinyllm serve ...` / `tinyllm --version`, the console
  script pyproject.toml installs. The version is the installed package's (importlib.metadata),
  so pyproject.toml holds the only copy of the number.
- The model flags (`-m/--model`, `--device`, `--dtype`, `--no-fast-path`, `-t/--threads`),
  declared once, so both commands accept the same values and hand them to `tinyllm.load`
  the same way. Short forms are llama.cpp's (`-m`, `-t`; run adds `-p -n -c -s`).
- `--threads N` caps the BLAS library's threads (OpenBLAS, MKL) through threadpoolctl,
  which finds the library NumPy loaded and calls its own setter: unlike
  OPENBLAS_NUM_THREADS it works after NumPy is imported.
- `--help` shows each flag's default once (`HelpFormatter`).
- A bad flag is one line on stderr and exit status 2 (argparse's usage block is left out).
- `run_main`: whatever goes wrong after the flags are parsed ends as one line on stderr and
  exit status 1. An error a user can cause (a `TinyLLMError`, a missing file, a bad value)
  prints its message; anything nobody anticipated prints its type and message and points to
  `--debug` (or `TINYLLM_DEBUG=1`), which prints the traceback as well. Ctrl-C exits 130.
- `decode_utf8`: text that comes in as bytes (a prompt file, stdin) is checked before it
  reaches the tokenizer, and a bad byte is named with its offset.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from importlib import metadata

from .engine import QUANTIZED
from .errors import TinyLLMError, one_line

DTYPE_CHOICES = ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
DEBUG_ENV = "TINYLLM_DEBUG"


def version() -> str:
    """The installed package's version ('unknown' when run from a tree that was never installed)."""
    try:
        return metadata.version("tinyllm")
    except metadata.PackageNotFoundError:
        return "unknown"


class HelpFormatter(argparse.HelpFormatter):
    """Each flag's default shown once: appended as "(default: X)" unless the help text already
    says it, and left out where the default means "not given" (None, False, an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or not action.option_strings or d is None or d is False or d == [] \
                or d == argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage block) and exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"tinyllm {version()}")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class UsageError(TinyLLMError, ValueError):
    """A flag value or an input the command line rejects before loading anything."""


def add_model_flags(parser: argparse.ArgumentParser):
    """--model, --device, --dtype, --quantized, --no-fast-path, --threads in a "model" group
    (returned, so a command can add its own model flags beside them)."""
    m = parser.add_argument_group("model")
    m.add_argument("-m", "--model", metavar="PATH", help="a Hugging Face directory, a .safetensors file (config.json "
                   "beside it), a .gguf file, or a Hugging Face Hub id, org/name (its safetensors) or "
                   "org/name:FILE.gguf, fetched into the Hugging Face cache (HF_HUB_OFFLINE=1: the cache only) "
                   "(default: the embedded SmolLM2-135M-Instruct Q4_1 GGUF)")
    m.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (CUDA needs CuPy and an NVIDIA GPU)")
    m.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="compute dtype (auto: float32 on the CPU; on the GPU bfloat16 for a checkpoint whose "
                   "matrices are all stored in bfloat16, else float16; bfloat16: GPU only)")
    m.add_argument("--quantized", default="auto", choices=QUANTIZED,
                   help="keep GGUF block-quantized weights as they are (multiplied by fused kernels on the GPU) "
                   "or expand them to --dtype at load; auto: keep on a GPU with the fast path in float16, "
                   "dequantize otherwise")
    m.add_argument("--no-fast-path", action="store_true",
                   help="on CUDA, run the readable CuPy path instead of the fused kernels and CUDA graphs")
    m.add_argument("-t", "--threads", type=int, metavar="N",
                   help="CPU threads for matrix products (the BLAS library's; default: its own choice)")
    return m


def apply_threads(args) -> None:
    """--threads: the BLAS library's thread count, for the rest of the process."""
    n = getattr(args, "threads", None)
    if n is None:
        return
    if n < 1:
        raise UsageError(f"--threads: must be >= 1, got {n}")
    import numpy  # noqa: F401  (loads the BLAS library that threadpoolctl looks for)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")


def load_options(args) -> dict:
    """The keyword arguments of `tinyllm.load` that the model flags set (--quantized only when
    it chooses: auto is load's own default)."""
    options = {"device": args.device, "dtype": None if args.dtype == "auto" else args.dtype,
               "fast_path": not args.no_fast_path}
    if getattr(args, "quantized", "auto") != "auto":
        options["quantized"] = args.quantized
    return options


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"print the traceback of an error, not only its one line (also: {DEBUG_ENV}=1)")


def debug_wanted(args=None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_main(prog: str, body, args) -> int:
    """`body(args)`'s exit status; every exception becomes one line on stderr (see above)."""
    try:
        apply_threads(args)
        return body(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        return 1
    except Exception as e:
        print_error(prog, e, debug_wanted(args))
        return 1


def print_error(prog: str, error: BaseException, debug: bool = False) -> None:
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    if isinstance(error, (TinyLLMError, OSError, ValueError)):
        message = one_line(error)
    else:  # a bug: say what it was, and how to see where
        hint = "" if debug else f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
        message = f"unexpected {type(error).__name__}: {one_line(error)}{hint}"
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


def decode_utf8(data: bytes, source: str) -> str:
    """Bytes -> text, or a UsageError naming the source and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{source}: not valid UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def check_text(text: str, source: str) -> str:
    """Text that came through a lenient decoder (command-line arguments, a terminal in the
    POSIX locale) holds undecodable bytes as lone surrogates: refuse them here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{source}: not valid UTF-8 text (an undecodable byte at character {e.start})") from None
    return text


COMMANDS = {"run": "run a model on a prompt, or chat with it", "serve": "an OpenAI-compatible HTTP server",
            "perplexity": "a text's perplexity under a model", "replicas": "the server as N replicas on Ray Serve"}


def main(argv=None) -> int:
    """`tinyllm run ...`, `tinyllm serve ...`, `tinyllm perplexity ...`, `tinyllm replicas ...`: each
    command's own flags follow its name
    (`tinyllm run --help`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        if argv[0] == "run":
            from .run import main as command
        elif argv[0] == "serve":
            from .server.main import main as command
        elif argv[0] == "perplexity":
            from .perplexity import main as command
        else:
            from .replicas import main as command
        return command(argv[1:], prog=f"tinyllm {argv[0]}")
    parser = ArgumentParser(prog="tinyllm", description="A Llama inference engine you can read.",
                            epilog="Each command has its own --help, e.g. tinyllm run --help.")
    parser.add_argument("command", choices=COMMANDS, metavar="{" + ",".join(COMMANDS) + "}",
                        help="; ".join(f"{name}: {what}" for name, what in COMMANDS.items()))
    parser.parse_args(argv)  # prints the usage, --help or --version, or names the bad command
    return 2
