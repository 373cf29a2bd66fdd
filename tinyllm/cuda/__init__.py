"""The CUDA fast path: fused CuPy RawKernels and a graph-captured decode step.

Nothing here forks the model. `FastOps` (ops.py) subclasses model.py's `Ops` and
replaces its named operations with fused kernels (kernels.cu) for one-token decode;
`CudaDecoder` (decoder.py) captures the model's own `forward` with those ops into one
CUDA graph and replays it per token, sampling on the device. Delete this package and
tinyllm still runs on the GPU through the readable CuPy path, only slower.

    from tinyllm.cuda import enable_fast_path
    decoder = enable_fast_path(llm.model)     # warm: kernels compiled, a step captured
"""
from __future__ import annotations

from .decoder import CudaDecoder, enable_fast_path
from .ops import FastOps

__all__ = ["CudaDecoder", "FastOps", "enable_fast_path"]
