"""tinyllm: a Llama inference engine you can read.

    import tinyllm
    llm = tinyllm.load()                       # the embedded SmolLM2-135M-Instruct, on the CPU
    llm = tinyllm.load("path/to/model", device="cuda")
"""
from __future__ import annotations

from .cli import version
from .engine import LLM, load

__all__ = ["LLM", "load"]
__version__ = version()  # the installed package's: pyproject.toml holds the number
