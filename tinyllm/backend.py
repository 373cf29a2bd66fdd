"""The array-module shim: one forward pass, two array libraries.

Every function in tinyllm that touches arrays takes them from `xp`, which is NumPy on
the CPU and CuPy on an NVIDIA GPU. Both speak the same API, so the model is written
once. CuPy is imported only when a CUDA device is asked for, so a CPU install never
needs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from .errors import DeviceError

CUDA_EXTRA_HINT = "pip install 'tinyllm[cuda12]' (CUDA 12) or 'tinyllm[cuda13]' (CUDA 13)"


@dataclass(frozen=True)
class Device:
    """Where arrays live: kind is 'cpu' or 'cuda'; index is the GPU number."""

    kind: str
    index: int
    xp: ModuleType

    @property
    def name(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def synchronize(self) -> None:
        """Wait for queued GPU work (a no-op on the CPU); needed before reading a clock."""
        if self.is_cuda:
            self.xp.cuda.Device(self.index).synchronize()


def parse_device(spec: str) -> tuple[str, int]:
    """'cpu' -> ('cpu', 0); 'cuda' -> ('cuda', 0); 'cuda:1' -> ('cuda', 1)."""
    text = spec.strip().lower()
    if text == "cpu":
        return "cpu", 0
    if text == "cuda":
        return "cuda", 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    raise DeviceError(f"--device: expected 'cpu', 'cuda' or 'cuda:N', got {spec!r}")


def import_cupy() -> ModuleType:
    try:
        import cupy
    except ImportError:
        raise DeviceError(f"CUDA needs CuPy, which is not installed: {CUDA_EXTRA_HINT}") from None
    return cupy


def get_device(spec: str | Device = "cpu") -> Device:
    """Resolve a device string to a Device, checking that a requested GPU exists."""
    if isinstance(spec, Device):
        return spec
    kind, index = parse_device(spec)
    if kind == "cpu":
        return Device("cpu", 0, np)
    cupy = import_cupy()
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # the CUDA driver itself is missing or broken
        raise DeviceError(f"--device {spec}: no usable NVIDIA GPU ({type(e).__name__}: {e})") from None
    if count == 0:
        raise DeviceError(f"--device {spec}: no NVIDIA GPU is visible")
    if index >= count:
        raise DeviceError(f"--device {spec}: GPU {index} does not exist (found {count}: cuda:0..cuda:{count - 1})")
    cupy.cuda.Device(index).use()
    return Device("cuda", index, cupy)


def to_numpy(a) -> np.ndarray:
    """Bring an array back to the host (a no-op for NumPy arrays)."""
    if isinstance(a, np.ndarray):
        return a
    return a.get()


def array_module(a) -> ModuleType:
    """numpy for NumPy arrays, cupy for CuPy arrays (without importing CuPy on the CPU)."""
    if isinstance(a, (np.ndarray, np.generic)):
        return np
    import cupy
    return cupy.get_array_module(a)
