"""Loading a model: checkpoint files -> Config, Weights on a device, Tokenizer."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import Device, get_device
from .errors import ConfigError
from .loaders import Checkpoint, assemble_weights, read_checkpoint
from .model import Model
from .tokenizer import Tokenizer

DTYPES = {"float32": np.float32, "fp32": np.float32, "float16": np.float16, "fp16": np.float16}


def resolve_dtype(dtype: str | None, device: Device):
    """float32 on the CPU (NumPy has no fast float16 matmul), float16 on the GPU."""
    if dtype is None or dtype == "auto":
        return np.float16 if device.is_cuda else np.float32
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: expected one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


@dataclass
class LLM:
    """A loaded model with its tokenizer: what `tinyllm.load` returns."""

    model: Model
    tokenizer: Tokenizer
    path: Path
    load_seconds: float

    @property
    def config(self):
        return self.model.config


def load_tokenizer(ckpt: Checkpoint) -> Tokenizer:
    c = ckpt.config
    if ckpt.format == "gguf":
        return Tokenizer.from_gguf_fields(ckpt.gguf_fields, str(ckpt.path))
    return Tokenizer.from_dir(ckpt.directory, bos_id=c.bos_token_id, eos_ids=c.eos_token_ids)


def load(path: str | Path | None = None, device: str | Device = "cpu", dtype: str | None = None) -> LLM:
    """Load a checkpoint (None: the embedded default model) onto a device."""
    start = time.perf_counter()
    device = get_device(device)
    ckpt = read_checkpoint(path)
    tokenizer = load_tokenizer(ckpt)
    weights = assemble_weights(ckpt, resolve_dtype(dtype, device), device)
    model = Model(ckpt.config, weights, device)
    return LLM(model, tokenizer, ckpt.path, time.perf_counter() - start)
