"""The CUDA fast path: fused CuPy RawKernels and graph-captured decode steps.

Nothing here forks the model. `FastOps` (ops.py) subclasses model.py's `Ops` and
overrides its named fusions with fused kernels (kernels.cu) for one-token decode;
`CudaDecoder` (decoder.py) captures the model's own `forward`, computing with those ops,
into one CUDA graph and replays it per token, sampling on the device; `BatchDecoder`
(batch.py) does the same for B sequences at once. `CudaStep` (step.py) offers all of it
through the decode-step interface of tinyllm/step.py, and `tinyllm.load` picks it for a
float16 or bfloat16 model on a GPU. Delete this package and tinyllm still runs on the GPU through the
readable CuPy path, only slower.

    from tinyllm.cuda import CudaStep
    step = CudaStep(llm.model)     # warm: kernels compiled, a step captured
"""
from __future__ import annotations

from .decoder import CudaDecoder
from .ops import FastOps
from .step import CudaStep

__all__ = ["CudaDecoder", "CudaStep", "FastOps"]
