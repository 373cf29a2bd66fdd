"""cuBLAS through ctypes: a matrix product that a CUDA graph can capture.

The batched decode step is one captured graph (batch.py). CuPy refuses cuBLAS calls while a
stream captures (its cublas.setStream raises NotImplementedError), so the step's GEMMs were
kernels of our own. cuBLAS itself captures, provided it allocates nothing during the capture:
a handle of our own, with a workspace set once before any capture, does that. One call:

    gemm_nt(x, w, out)                  out[M, N] = x[M, K] @ w[N, K].T   (fp16 or bf16, row-major, sums in fp32)
    gemm_nt(x, w, out, accumulate=True) out[M, N] += x[M, K] @ w[N, K].T  (a residual added in the same pass)
    matmul(a, b)                        a[..., M, K] @ b[..., K, N], batched over the leading axes (a prompt's
                                        attention: scores and weighted values; b may be a transposed view)

A CuPy call costs tens of microseconds of the host's time, cuBLAS through ctypes a few: a
prompt's forward pass, launched from Python, is bound by the host (docs/benchmarks.md), and
CuPy runs batched fp16 products through float32 copies.

cuBLAS chooses its algorithm from the shape, so a row's bits can differ between two M (they
do for some of Llama-3-8B's matrices between 1 and 64 rows); at one M they do not depend on
the other rows or on the row's place. A caller that needs a token's bits not to depend on its
batch calls it with one M whatever the batch (FastOps pads the batched step's rows).
"""
from __future__ import annotations

import ctypes
import glob
import os
import site

import numpy as np

OP_N, OP_T = 0, 1
DATA_TYPES = {"float16": 2, "bfloat16": 14}  # cudaDataType_t: CUDA_R_16F, CUDA_R_16BF
COMPUTE_32F, GEMM_DEFAULT = 68, -1
WORKSPACE_BYTES = 32 << 20  # what cuBLAS asks for on Hopper

_handles: dict = {}  # device id -> Handle


def _library():
    """libcublas as this process's CuPy loads it (from NVIDIA's wheels or a CUDA toolkit): CuPy
    loads it first, so that the name finds that same library."""
    import cupy as cp

    try:
        cp.cuda.device.get_cublas_handle()
    except Exception:  # noqa: BLE001 - then the paths below are all there is
        pass
    names = ["libcublas.so.13", "libcublas.so.12"]
    roots = [os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    roots += [os.path.join(p, "nvidia", sub) for p in site.getsitepackages() for sub in ("cu13", "cu12", "cublas")]
    for root in filter(None, roots):
        names += sorted(glob.glob(os.path.join(root, "lib*", "libcublas.so*")))
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError(f"cuBLAS was not found (tried {', '.join(names)})")


class Handle:
    """A cuBLAS handle with its own workspace, for the current device."""

    def __init__(self):
        import cupy as cp

        self.cp = cp
        self.lib = _library()
        self.ptr = ctypes.c_void_p()
        self._check(self.lib.cublasCreate_v2(ctypes.byref(self.ptr)), "cublasCreate")
        with cp.cuda.using_allocator(cp.get_default_memory_pool().malloc):  # never a graph's private pool
            self.workspace = cp.empty(WORKSPACE_BYTES, dtype=cp.uint8)
        self._check(self.lib.cublasSetWorkspace_v2(self.ptr, ctypes.c_void_p(self.workspace.data.ptr),
                                                   ctypes.c_size_t(WORKSPACE_BYTES)), "cublasSetWorkspace")
        self.one, self.zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def __del__(self):
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr and getattr(self, "lib", None) is not None:
            try:
                self.lib.cublasDestroy_v2(ptr)
            except Exception:  # noqa: BLE001 - at interpreter exit the library may be gone
                pass

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed: cuBLAS status {status}")

    def _on_current_stream(self) -> None:
        """The next call runs on CuPy's current stream (the one a capture records)."""
        self._check(self.lib.cublasSetStream_v2(self.ptr, ctypes.c_void_p(self.cp.cuda.get_current_stream().ptr)),
                    "cublasSetStream")

    def gemm_nt(self, x, w, out, accumulate: bool = False) -> None:
        """out[M, N] = x[M, K] @ w[N, K].T on the current stream; with accumulate, out += that
        (cuBLAS adds out to the fp32 sums and rounds once)."""
        m, k = x.shape
        n = w.shape[0]
        dtype = DATA_TYPES.get(np.dtype(x.dtype).name)
        if (dtype is None or w.dtype != x.dtype or out.dtype != x.dtype or w.shape[1] != k or out.shape != (m, n)
                or not (x.flags.c_contiguous and w.flags.c_contiguous and out.flags.c_contiguous)):
            raise ValueError(f"gemm_nt: contiguous fp16 or bf16 x [M, K], w [N, K], out [M, N] of one type; got "
                             f"{x.dtype} {x.shape}, {w.dtype} {w.shape}, {out.dtype} {out.shape}")
        self._on_current_stream()
        # cuBLAS is column-major: out.T [N, M] = op(w) [N, K] @ x.T [K, M], where w's rows seen
        # column-major are w.T [K, N] (so op = transpose) and x's rows are x.T [K, M]
        self._check(self.lib.cublasGemmEx(
            self.ptr, OP_T, OP_N, n, m, k, ctypes.byref(self.one),
            ctypes.c_void_p(w.data.ptr), dtype, k, ctypes.c_void_p(x.data.ptr), dtype, k,
            ctypes.byref(self.one if accumulate else self.zero),
            ctypes.c_void_p(out.data.ptr), dtype, n, COMPUTE_32F, GEMM_DEFAULT), "cublasGemmEx")

    def matmul(self, a, b):
        """a[..., M, K] @ b[..., K, N] -> [..., M, N] in a's type, one strided-batched GEMM over
        the leading axes; None when the layouts do not allow it (then the caller multiplies
        some other way). Each operand's rows must be contiguous, its leading axes one even
        stride apart; b may be a transposed view (its columns contiguous: keys.T)."""
        cp = self.cp
        dtype = DATA_TYPES.get(np.dtype(a.dtype).name)
        if dtype is None or b.dtype != a.dtype or a.ndim < 3 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2]:
            return None
        *lead, m, k = a.shape
        n = b.shape[-1]
        if b.shape[-2] != k or min(m, n, k) == 0:
            return None
        item = a.itemsize
        if a.strides[-1] != item:
            return None
        a_ld = a.strides[-2] // item
        if b.strides[-1] == item:      # b [K, N] row-major
            op_b, b_ld = OP_N, b.strides[-2] // item
        elif b.strides[-2] == item:    # b = w.T for w [N, K] row-major
            op_b, b_ld = OP_T, b.strides[-1] // item
        else:
            return None
        a_stride, b_stride = _batch_stride(a), _batch_stride(b)
        if a_stride is None or b_stride is None or a_ld < k or b_ld < (n if op_b == OP_N else k):
            return None
        count = int(np.prod(lead))
        out = cp.empty((*lead, m, n), dtype=a.dtype)
        self._on_current_stream()
        # column-major: out.T [N, M] = op(b).T [N, K] @ a.T [K, M]
        self._check(self.lib.cublasGemmStridedBatchedEx(
            self.ptr, op_b, OP_N, n, m, k, ctypes.byref(self.one),
            ctypes.c_void_p(b.data.ptr), dtype, b_ld, ctypes.c_longlong(b_stride),
            ctypes.c_void_p(a.data.ptr), dtype, a_ld, ctypes.c_longlong(a_stride), ctypes.byref(self.zero),
            ctypes.c_void_p(out.data.ptr), dtype, n, ctypes.c_longlong(m * n), count, COMPUTE_32F, GEMM_DEFAULT),
            "cublasGemmStridedBatchedEx")
        return out


def _batch_stride(x) -> int | None:
    """Elements between consecutive matrices of x [..., R, C] when its leading axes flatten to one
    even stride (0 for a single matrix); None otherwise."""
    lead, strides = x.shape[:-2], x.strides[:-2]
    dims = [(n, s // x.itemsize) for n, s in zip(lead, strides) if n != 1]
    if not dims:
        return 0
    for (n_outer, s_outer), (n_inner, s_inner) in zip(dims, dims[1:]):
        if s_outer != n_inner * s_inner:
            return None
    return dims[-1][1]


def handle() -> Handle:
    """This process's handle for the current device (made on first use, before any capture)."""
    import cupy as cp

    device = cp.cuda.runtime.getDevice()
    if device not in _handles:
        _handles[device] = Handle()
    return _handles[device]
