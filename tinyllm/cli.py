"""What the two command lines share: `python -m tinyllm.run` and `python -m tinyllm.serve`.

- The model flags (`--model`, `--device`, `--dtype`, `--no-fast-path`), declared once, so both
  commands accept the same values and hand them to `tinyllm.load` the same way.
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

from .errors import TinyLLMError, one_line

DTYPE_CHOICES = ("auto", "float32", "fp32", "float16", "fp16")
DEBUG_ENV = "TINYLLM_DEBUG"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class UsageError(TinyLLMError, ValueError):
    """A flag value or an input the command line rejects before loading anything."""


def add_model_flags(parser: argparse.ArgumentParser):
    """--model, --device, --dtype, --no-fast-path in a "model" group (returned, so a command
    can add its own model flags beside them)."""
    m = parser.add_argument_group("model")
    m.add_argument("--model", metavar="PATH", help="a Hugging Face directory, a .safetensors file (config.json "
                   "beside it) or a .gguf file (default: the embedded SmolLM2-135M-Instruct Q4_1 GGUF)")
    m.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (CUDA needs CuPy and an NVIDIA GPU)")
    m.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="compute dtype (auto: float32 on the CPU, float16 on the GPU)")
    m.add_argument("--no-fast-path", action="store_true",
                   help="on CUDA, run the readable CuPy path instead of the fused kernels and CUDA graphs")
    return m


def load_options(args) -> dict:
    """The keyword arguments of `tinyllm.load` that the model flags set."""
    return {"device": args.device, "dtype": None if args.dtype == "auto" else args.dtype,
            "fast_path": not args.no_fast_path}


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"print the traceback of an error, not only its one line (also: {DEBUG_ENV}=1)")


def debug_wanted(args=None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_main(prog: str, body, args) -> int:
    """`body(args)`'s exit status; every exception becomes one line on stderr (see above)."""
    try:
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
