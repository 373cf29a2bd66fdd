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
