"""Whether the GPU tests can run here, and if not, why (the reason their skip prints)."""
from __future__ import annotations

import importlib.util


def gpu_reason() -> str | None:
    """None where CuPy sees an NVIDIA GPU; otherwise what is missing, in one line."""
    if importlib.util.find_spec("cupy") is None:
        return "needs CuPy and an NVIDIA GPU: CuPy is not installed (pip install 'tinyllm[cuda13]')"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() == 0:
            return "needs an NVIDIA GPU: none is visible"
    except Exception as e:
        return f"needs an NVIDIA GPU: {type(e).__name__}: {e}"
    return None


def gemv_cases() -> dict:
    """The GEMVs of a decode step, by role: name -> (N, K, epilogue, norm) from a shape's sizes
    (D, H, K, E, F, V); what the fp16 and the block-quantized kernels are both tested on."""
    from tinyllm.cuda import kernels as K

    return {
        "qkv": (lambda D, H, Kh, E, F, V: ((H + 2 * Kh) * E, D, K.EPI_STORE, True)),
        "wo_residual": (lambda D, H, Kh, E, F, V: (D, H * E, K.EPI_RESIDUAL, False)),
        "gate_up_swiglu": (lambda D, H, Kh, E, F, V: (F, D, K.EPI_SWIGLU, True)),
        "down_residual": (lambda D, H, Kh, E, F, V: (D, F, K.EPI_RESIDUAL, False)),
        "lm_head": (lambda D, H, Kh, E, F, V: (V, D, K.EPI_STORE, True)),
    }
