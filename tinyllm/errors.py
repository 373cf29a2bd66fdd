"""The errors tinyllm raises for things a user can fix.

Every error a user can cause (a bad path, a bad flag, a checkpoint we cannot read,
a prompt that does not fit) is a `TinyLLMError`. Its message is one line that names
the file, flag or field and what was expected; the CLI prints it as it is and exits.
They also subclass the built-in error a Python user would try to catch first.
"""


class TinyLLMError(Exception):
    """Base class: a user-facing error with a one-line message."""


class ConfigError(TinyLLMError, ValueError):
    """A missing, inconsistent or unsupported model configuration field."""


class CheckpointError(TinyLLMError, ValueError):
    """A weights file or tokenizer that cannot be read or does not match the config."""


class CheckpointNotFoundError(TinyLLMError, FileNotFoundError):
    """A path that does not exist or holds no weights."""


class DeviceError(TinyLLMError, RuntimeError):
    """A device that cannot be used: CuPy missing, no GPU, bad index, out of memory."""


class ContextOverflowError(TinyLLMError, ValueError):
    """A request that needs more positions than the KV cache or the model allows."""


def one_line(error: BaseException) -> str:
    """An error's message on one line (newlines and runs of spaces folded), or its type's
    name when it has no message: what the command lines print and the server logs."""
    return " ".join(str(error).split()) or type(error).__name__
