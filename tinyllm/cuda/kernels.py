"""Compiling and launching the fused kernels of kernels.cu.

CuPy compiles CUDA C++ at run time with NVRTC and keeps the binaries in its kernel
cache (~/.cupy/kernel_cache), so the compilation cost is paid once per machine, and
per process only a module load. Templates are instantiated for the model's element type
(fp16 or bf16: ELEMENT_TYPES) and its own sizes (K, the GEMV's input length, and E, R, the
attention's head dim and group size) so the compiler can unroll every loop and keep the
weight loads in registers.

Each launcher takes CuPy arrays and launches on the current stream; none of them
synchronizes or copies between host and device, so all of them can be captured into
a CUDA graph.
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np

from ..kv_cache import page_size

# one module: the quantized kernels (quant.cu) use kernels.cu's helpers and epilogues
SOURCE = "\n".join((Path(__file__).with_name(f)).read_text() for f in ("kernels.cu", "quant.cu"))
OPTIONS = ("--std=c++17",)
GEMV_WARPS = 8           # warps per block of gemv: 8 rows, or 8 / S for rows split over S warps

def attention_chunk(head_dim: int) -> int:
    """Positions per attention block (CHUNK in kernels.cu): its values must fit in shared memory.
    A paged cache's blocks are this size (kv_cache.page_size), so a chunk is one block."""
    return page_size(head_dim)

SAMPLE_THREADS = 1024
EPI_STORE, EPI_RESIDUAL, EPI_SWIGLU = 0, 1, 2

# kernels.cu's element type T for arrays of each dtype (by NumPy name; bf16 arrays have
# ml_dtypes' bfloat16 dtype, in NumPy and CuPy alike). The quantized kernels take fp16 only.
ELEMENT_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16"}


def element_type(dtype) -> str | None:
    """The C++ type the kernels are instantiated on for this dtype; None if they take none."""
    return ELEMENT_TYPES.get(np.dtype(dtype).name)


def _ctype(dtype) -> str:
    """element_type, or a TypeError naming the dtype (not a kernel name NVRTC cannot parse)."""
    t = element_type(dtype)
    if t is None:
        raise TypeError(f"the CUDA kernels take float16 or bfloat16 arrays, got {np.dtype(dtype).name}")
    return t


def _cupy():
    import cupy
    return cupy


_modules: dict[str, object] = {}  # kernel name -> the RawModule that holds it


def compile_kernels(names) -> None:
    """Compile every kernel in `names` in one NVRTC call (one module) unless already done."""
    cp = _cupy()
    todo = sorted({n for n in names if n not in _modules})
    if not todo:
        return
    templates = [n for n in todo if "<" in n]
    module = cp.RawModule(code=SOURCE, options=OPTIONS, name_expressions=templates)
    module.compile()
    for n in todo:
        _modules[n] = module


@functools.lru_cache(maxsize=None)
def kernel(name: str):
    """A compiled kernel by name; templates by their instantiation, e.g. 'gemv<2048, true, 0>'."""
    if name not in _modules:
        compile_kernels([name])
    return _modules[name].get_function(name)


PLAIN_KERNELS = ("embedding", "sample_token", "sample_rows", "set_step", "softmax_rows")
TYPED_KERNELS = ("rms_norm_rows", "rope_rows", "swiglu_rows", "causal_softmax_rows")  # templates on the element type alone


def plain_kernel_names(dtype) -> list[str]:
    """The kernels without sizes in their template, for a model of this dtype."""
    return list(PLAIN_KERNELS) + [f"{name}<{_ctype(dtype)}>" for name in TYPED_KERNELS]


def gemv_name(dtype, k: int, norm: bool, epilogue: int) -> str:
    return f"gemv<{_ctype(dtype)}, {k}, {'true' if norm else 'false'}, {epilogue}>"


def heads_per_block(n_rep: int) -> int:
    """Query heads per attention block for one sequence: 2 when the group size is even, else
    1 (more, smaller blocks: one token's attention is latency-bound)."""
    return 2 if n_rep % 2 == 0 else 1


ATTENTION_SMEM = 47 * 1024  # static shared memory of an attention block, at most (of 48 KB)
ROWS_HEADS_MIN = 32  # rows of a batched step from which an attention block takes a KV head's every query head


def rows_heads(n_rep: int, head_dim: int, rows: int) -> int:
    """Query heads per attention block for a batched step of `rows` rows. Below
    ROWS_HEADS_MIN, one sequence's count (heads_per_block: the GPU wants more, smaller
    blocks); from there the sequences give the GPU blocks enough, so a block takes the
    largest divisor of the group size up to 8 whose block fits in shared memory, and reads
    the cached keys and values once for all of them. A head's result does not depend on how
    many heads share its block (each head's scores, softmax and sums are its own), so the
    count may follow the batch."""
    if rows < ROWS_HEADS_MIN:
        return heads_per_block(n_rep)
    return max(r for r in range(1, min(n_rep, 8) + 1)
               if n_rep % r == 0 and attention_shared(head_dim, r) <= ATTENTION_SMEM)


def attention_shared(head_dim: int, heads: int) -> int:
    """Bytes of shared memory of an attention block (kernels.cu decode_attention's arrays)."""
    chunk = attention_chunk(head_dim)
    return chunk * head_dim * 2 + (heads + 1) * head_dim * 4 + heads * chunk * 4 + (chunk // 32) * heads * 4 + 4


def attention_name(dtype, head_dim: int, n_rep: int, heads: int | None = None, loop: bool = False) -> str:
    """loop: the variant whose blocks loop over chunks (a grid narrower than the cache's chunks)."""
    return (f"decode_attention<{_ctype(dtype)}, {head_dim}, {heads or heads_per_block(n_rep)}, "
            f"{attention_chunk(head_dim)}, {'true' if loop else 'false'}>")


# ---- launching, optionally with programmatic dependent launch (PDL) -----------------------
# CuPy launches kernels with cuLaunchKernel, which has no launch attributes. The PDL
# attribute ("this kernel may start before the previous one ends"; see pdl_wait in
# kernels.cu) needs cuLaunchKernelEx, reached through NVIDIA's cuda-python bindings
# (installed alongside CuPy 14). Stream capture records it as a programmatic edge of the
# graph. Without the bindings, or with TINYLLM_PDL=0, kernels launch the plain way.
_pdl = {"enabled": os.environ.get("TINYLLM_PDL", "1") != "0", "driver": None}


def set_pdl(enabled: bool) -> None:
    """Turn programmatic dependent launch on or off (for comparisons; re-capture graphs after)."""
    _pdl["enabled"] = enabled


def pdl_active() -> bool:
    if not _pdl["enabled"]:
        return False
    if _pdl["driver"] is None:
        try:
            from cuda.bindings import driver

            cp = _cupy()
            major = cp.cuda.Device().compute_capability[:1]
            _pdl["driver"] = driver if int(major) >= 9 else False
        except Exception:
            _pdl["driver"] = False
    return bool(_pdl["driver"])


def _ctype_arg(a):
    if hasattr(a, "data") and hasattr(a.data, "ptr"):
        return a.data.ptr, ctypes.c_void_p
    if isinstance(a, np.float32):
        return float(a), ctypes.c_float
    if isinstance(a, np.int32):
        return int(a), ctypes.c_int
    if isinstance(a, np.int64):
        return int(a), ctypes.c_longlong
    if isinstance(a, np.uint64):  # a pointer given as a number (NULL)
        return int(a), ctypes.c_void_p
    raise TypeError(f"unsupported kernel argument {type(a).__name__}")


def launch(name: str, grid, block, args, pdl: bool = False, shared: int = 0) -> None:
    """Launch a kernel on the current stream; with `pdl`, as a programmatic dependent launch.
    `shared`: bytes of dynamic shared memory."""
    fn = kernel(name)
    if shared > 48 * 1024:
        _allow_shared(name, shared)
    if not (pdl and pdl_active()):
        fn(grid, block, args, shared_mem=shared)
        return
    cu = _pdl["driver"]
    cfg = cu.CUlaunchConfig()
    grid = tuple(grid) + (1,) * (3 - len(grid))
    block = tuple(block) + (1,) * (3 - len(block))
    cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid
    cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = block
    cfg.sharedMemBytes = shared
    cfg.hStream = cu.CUstream(_cupy().cuda.get_current_stream().ptr)
    attr = cu.CUlaunchAttribute()
    attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    cfg.attrs = [attr]
    cfg.numAttrs = 1
    values, types = zip(*(_ctype_arg(a) for a in args))
    handle = fn.kernel.ptr if hasattr(fn, "kernel") else fn.ptr  # RawKernel -> its CUfunction
    err, = cu.cuLaunchKernelEx(cfg, cu.CUfunction(handle), (values, types), 0)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuLaunchKernelEx({name}) failed: {err}")


_shared_allowed: dict[str, int] = {}


def _allow_shared(name: str, nbytes: int) -> None:
    """A kernel may use more than 48 KB of dynamic shared memory only once it has asked for it."""
    if _shared_allowed.get(name, 0) >= nbytes:
        return
    kernel(name).max_dynamic_shared_size_bytes = nbytes
    _shared_allowed[name] = nbytes


def embedding(table, token, out):
    """out[b] = table[token[b]] for B ids read from device memory (zeros for an id outside the
    table).  token: [B] -> out: [B, D]"""
    d = table.shape[1]
    kernel("embedding")(((d + 255) // 256, token.size), (256,), (table, token, out, np.int32(d),
                                                                  np.int64(table.shape[0])))


def rms_norm_rows(x, w, eps: float, out, pdl: bool = False):
    """RMSNorm of each row of x [..., D] into out (kernels.cu). pdl: a programmatic launch (inside
    a captured step: the weights load while the kernel before it ends; off for a prompt's eager
    calls, whose Python launch it would make slower)."""
    d = x.shape[-1]
    launch(f"rms_norm_rows<{_ctype(x.dtype)}>", (x.size // d,), (min(512, max(32, (d // 8 + 31) // 32 * 32)),),
           (x, w, out, np.int32(d), np.float32(eps)), pdl=pdl)


def _blocks(n: int, threads: int = 256) -> int:
    return max(1, min((n + threads - 1) // threads, 65535))


def rope_rows(x, cos, sin, out):
    """RoPE of a prompt's rows. x: [B, T, N, E] fp16 or bf16 (heads contiguous, rows evenly strided);
    cos, sin: [T, E/2] or [B, T, E/2] fp32, contiguous; out: [B, T, N, E] contiguous."""
    b, t, n, e = x.shape
    rows = b * t
    kernel(f"rope_rows<{_ctype(x.dtype)}>")((_blocks(rows * n * e // 2),), (256,), (
        x, np.int64(x.strides[1] // 2), np.int32(n), np.int32(e), cos, sin, np.int32(cos.size // (e // 2)),
        np.int32(t), np.int64(rows), out))


def softmax_rows(x):
    """Softmax over the last axis of a contiguous fp32 array, in place."""
    s = x.shape[-1]
    kernel("softmax_rows")((x.size // s,), (256,), (x, np.int32(s)))


def causal_softmax_rows(x, t: int, pos: int):
    """A prompt block's attention weights in place (kernels.cu): x [..., rows, S] fp16 or bf16,
    contiguous, row r for new token r % t of the block, which starts at position pos."""
    s = x.shape[-1]
    kernel(f"causal_softmax_rows<{_ctype(x.dtype)}>")((x.size // s,), (256,), (x, np.int32(s), np.int32(t),
                                                                               np.int32(pos)))


def swiglu_rows(gate_up, out):
    """silu(gate) * up.  gate_up: [..., 2F] fp16 or bf16, contiguous -> out [..., F]"""
    f = gate_up.shape[-1] // 2
    rows = gate_up.size // (2 * f)
    kernel(f"swiglu_rows<{_ctype(gate_up.dtype)}>")((_blocks(rows * f),), (256,),
                                                     (gate_up, out, np.int32(f), np.int64(rows)))


def gemv_split(k: int, epilogue: int) -> int:
    """Warps that share one output row of `gemv` (GemvSplit in kernels.cu): 1 unless a lane's
    share of the row would pass 24 16-byte vectors, which ptxas would spill."""
    mats, nv = (2 if epilogue == EPI_SWIGLU else 1), k // 8
    return next(s for s in (1, 2, 4, 8) if s == 8 or ((nv + s - 1) // s + 31) // 32 * mats <= 24)


def _gemv_args(w, x, out, epilogue: int, norm_w, eps: float, residual) -> tuple:
    """(N out, K, norm or not, the arguments gemv and gemv_stream share); unused pointer
    arguments get x: a valid address the kernel never reads."""
    n_out, k = w.shape
    if epilogue == EPI_SWIGLU:
        n_out //= 2
    norm = norm_w is not None
    return n_out, k, norm, (w, x, norm_w if norm else x, np.float32(eps), residual if residual is not None else x,
                            out, np.int32(n_out))


def gemv(w, x, out, *, epilogue: int = EPI_STORE, norm_w=None, eps: float = 0.0, residual=None):
    """out = W @ x (fp16 or bf16 in, fp32 accumulate) with an optional RMSNorm prologue and an epilogue.

    w: [N, K] (EPI_SWIGLU: [2N, K], gate rows then up rows); x: [K]; out: [N]."""
    n_out, k, norm, args = _gemv_args(w, x, out, epilogue, norm_w, eps, residual)
    rows_per_block = GEMV_WARPS // gemv_split(k, epilogue)
    blocks = (n_out + rows_per_block - 1) // rows_per_block
    launch(gemv_name(w.dtype, k, norm, epilogue), (blocks,), (32 * GEMV_WARPS,), args, pdl=True)


# gemv_stream (kernels.cu): warps per block and bytes per piece as there; pieces in flight per
# warp; blocks per SM at most. A matrix of STREAM_MIN_BYTES or more takes it, a smaller one
# `gemv`: a small matrix is over before a ring fills, and `gemv`'s blocks (registers, little
# shared memory) fit beside a streaming block, so the launch after a big matrix starts loading
# its rows while the big one still streams (two streaming launches in a row would not fit
# together). The LM head streams only where `gemv` fits at most STREAM_HEAD_BLOCKS blocks on an
# SM for it (ops.FastOps._streams says why). Measured on whole decode steps
# (docs/benchmarks.md, "Streaming the big matrices").
STREAM_WARPS, STREAM_PIECE, STREAM_SLOTS, STREAM_PER_SM = 8, 4096, 2, 2
STREAM_MIN_BYTES = 32 * 2 ** 20
STREAM_HEAD_BLOCKS = 3
STREAM_SMEM = 227 * 1024  # the most dynamic shared memory a block may ask for
# On unless turned off (TINYLLM_GEMV_STREAM=0, or set_gemv_stream(False)): to compare, or to
# rule the kernel out when something goes wrong on a GPU it was not measured on.
_stream = {"enabled": os.environ.get("TINYLLM_GEMV_STREAM", "1") != "0"}


def set_gemv_stream(enabled: bool) -> None:
    """Let big matrices take gemv_stream (the default), or keep every one-token GEMV on
    `gemv`; re-capture graphs after a change."""
    _stream["enabled"] = enabled


def streams(nbytes: int) -> bool:
    """Whether a one-token GEMV over a matrix of this many bytes takes gemv_stream."""
    return _stream["enabled"] and nbytes >= STREAM_MIN_BYTES


def blocks_by_registers(name: str, threads: int) -> int:
    """How many blocks of `threads` threads of a compiled kernel fit on one SM by its registers
    (allocated 8 a thread at a time; 64K of them an SM on every GPU since Maxwell)."""
    regs = -(-kernel(name).num_regs // 8) * 8
    return 65536 // (regs * threads)


@functools.lru_cache(maxsize=None)
def gemv_blocks_per_sm(dtype, k: int, norm: bool, epilogue: int) -> int:
    """How many of `gemv`'s blocks fit on one SM by registers, as its launch shapes them."""
    return blocks_by_registers(gemv_name(dtype, k, norm, epilogue), 32 * GEMV_WARPS)


def gemv_stream_name(dtype, k: int, norm: bool, epilogue: int) -> str:
    return f"gemv_stream<{_ctype(dtype)}, {k}, {'true' if norm else 'false'}, {epilogue}>"


def stream_shared(k: int, epilogue: int, slots: int) -> int:
    """Dynamic shared memory of a gemv_stream block: x in fp32, the warps' mbarriers, their rings."""
    mats = 2 if epilogue == EPI_SWIGLU else 1
    return 4 * k + (8 * STREAM_WARPS * slots + 127) // 128 * 128 + STREAM_WARPS * slots * mats * STREAM_PIECE


def gemv_stream(w, x, out, *, epilogue: int = EPI_STORE, norm_w=None, eps: float = 0.0, residual=None,
                slots: int | None = None, blocks: int | None = None):
    """gemv's product and arguments, the weights streamed through shared memory (kernels.cu
    gemv_stream). slots: pieces in flight per warp (fewer where shared memory is short);
    blocks: the grid (default: what fits on the GPU at once). Neither changes a result's bits."""
    n_out, k, norm, args = _gemv_args(w, x, out, epilogue, norm_w, eps, residual)
    slots = STREAM_SLOTS if slots is None else slots
    while slots > 1 and stream_shared(k, epilogue, slots) > STREAM_SMEM:
        slots -= 1
    shared = stream_shared(k, epilogue, slots)
    if blocks is None:
        sms, smem = _sm_resources()
        blocks = min(sms * max(1, min(STREAM_PER_SM, smem // (shared + 1024))), -(-n_out // STREAM_WARPS))
    launch(gemv_stream_name(w.dtype, k, norm, epilogue), (max(1, blocks),), (32 * STREAM_WARPS,),
           args + (np.int32(slots),), pdl=True, shared=shared)


def decode_attention(q, k_new, v_new, cos, sin, pos, k_cache, v_cache, scale: float, rotate: bool,
                     scratch, out, n_rep: int, pdl: bool = True, *, slots, rows: int = 1, row_stride: int = 0,
                     write_only: bool = False, heads: int | None = None, table=None):
    """One new token's attention over the cache (see kernels.cu); q: [H, E] ... out: [H * E].

    `rows` sequences at once: sequence b's q, k_new, v_new start b * row_stride elements
    further, its position is pos[b], its output out[b], and its cache, one of two layouts:
      rows    row slots[b] of k_cache/v_cache [B_max, K, S_cap, E]. One sequence: rows=1, slots=[0].
      paged   `table` given (int32 [rows, W], contiguous): blocks table[b, c] of k_cache/v_cache
              [N, K, CHUNK, E] (a BlockPool's layer, CHUNK = attention_chunk), W * CHUNK positions.
    Rows may share a cache at consecutive positions (a prompt's tokens): `write_only`
    first writes every row's new k and v, then a second launch, not programmatic (its cache
    loads come before its wait), attends. heads: query heads per block (default
    heads_per_block); scratch: attention_scratch's, for this capacity and at least `rows` rows."""
    n_kv, s_cap, e = k_cache.shape[-3:]
    if table is not None:
        if s_cap != attention_chunk(e) or table.dtype != np.int32 or not table.flags.c_contiguous:
            raise ValueError(f"decode_attention: paged blocks hold {attention_chunk(e)} positions and the table is "
                             f"contiguous int32; got blocks of {s_cap}, a {table.dtype} table")
        s_cap = table.shape[-1] * s_cap  # the positions a table row names
    part_o, part_ml, counters = scratch
    heads = heads or heads_per_block(n_rep)
    if n_rep % heads:
        raise ValueError(f"decode_attention: {heads} query heads per block do not divide the group of {n_rep}")
    need = attention_scratch_sizes(n_kv, n_rep, e, s_cap, rows)
    if any(have < want for have, want in zip((part_o.size, part_ml.size, counters.size), need)):
        raise ValueError(f"decode_attention: the scratch holds {part_o.size}, {part_ml.size}, {counters.size} values; "
                         f"{rows} rows of a {s_cap}-position cache need {need}")
    chunk = attention_chunk(e)
    groups = n_rep // heads
    n_chunks = (s_cap + chunk - 1) // chunk
    x_blocks = attention_x_blocks(n_chunks, n_kv * groups * rows)
    launch(attention_name(k_cache.dtype, e, n_rep, heads, x_blocks < n_chunks), (x_blocks, n_kv, groups * rows), (chunk,), (
        q, k_new, v_new, cos, sin, pos, k_cache, v_cache, np.int32(s_cap), np.float32(scale),
        np.int32((1 if rotate else 0) | (2 if write_only else 0)), np.int32(n_rep), part_o, part_ml, counters, out,
        slots, np.int64(row_stride), np.int64(n_kv * k_cache.shape[-2] * e),
        table if table is not None else np.uint64(0), np.int32(table.shape[-1] if table is not None else 0)), pdl=pdl)


ATTENTION_BLOCKS_PER_SM = 8  # the attention grid's size, in blocks per multiprocessor (attention_x_blocks)


def attention_x_blocks(n_chunks: int, blocks_per_chunk: int) -> int:
    """The attention grid's x extent: blocks over the cache's chunks. A block takes chunks x,
    x + that extent, ... up to its sequence's position, so a cache of many chunks does not
    launch a block per chunk when the sequences and heads (blocks_per_chunk) already give
    the GPU ATTENTION_BLOCKS_PER_SM blocks per multiprocessor: most would be past the
    context and return at once. One sequence keeps a block per chunk. The result of a
    chunk does not depend on which block computes it."""
    want = ATTENTION_BLOCKS_PER_SM * _sm_resources()[0]
    return max(1, min(n_chunks, -(-want // blocks_per_chunk)))


def attention_scratch_sizes(n_kv: int, n_rep: int, head_dim: int, capacity: int, rows: int = 1) -> tuple:
    """Values of (partial outputs, softmax stats, arrival counters) for `rows` sequences, for
    any number R of query heads per block that divides the group: the partials are per query
    head and chunk (block groups x R = rows x n_kv x n_rep whatever R), and the counters, one
    per block group, are the most at R = 1."""
    n_chunks = (capacity + attention_chunk(head_dim) - 1) // attention_chunk(head_dim)
    heads = rows * n_kv * n_rep
    return heads * n_chunks * head_dim, heads * n_chunks * 2, heads


def attention_scratch(n_kv: int, n_rep: int, head_dim: int, capacity: int, rows: int = 1):
    """Per-chunk partial outputs and softmax stats, and one arrival counter per block group
    (zero between launches), flat: one scratch serves every heads-per-block count."""
    cp = _cupy()
    o, ml, counters = attention_scratch_sizes(n_kv, n_rep, head_dim, capacity, rows)
    return cp.empty(o, dtype=cp.float32), cp.empty(ml, dtype=cp.float32), cp.zeros(counters, dtype=cp.uint32)


# ---- B tokens at once (continuous batching) --------------------------------------------------
# Two tensor-core kernels compute out[b] = W @ x[b] for B <= 64 tokens (kernels.cu):
# gemv_rows (16 rows per block, its 8 warps splitting K) and gemm_rows (64 rows per block,
# weights and tokens pipelined through shared memory, K split over blocks). rows_kernel
# picks one from the matrix's shape, never from B, so a token's bits do not depend on its
# batch.
ROWS_WARPS, ROWS_PAD = 8, 32  # as in kernels.cu
ROWS_SMEM = 200 * 1024        # as in kernels.cu: the dynamic shared memory a block may take
MAX_ROWS = 64                 # tokens per call: up to eight 8-token tiles
TILE_GROUPS, TILE_HALVES, TILE_STAGES = 4, 2, 4  # as in kernels.cu (gemm_rows)
TILE_WARPS = TILE_GROUPS * TILE_HALVES
TILE_ROWS = 16 * TILE_GROUPS  # output rows per gemm_rows block
# matrices at least this big (gate and up counted together) take gemm_rows: every matrix of
# Llama-3-8B's shape but wo, and TinyLlama's LM head; TinyLlama's gate|up (23M) stays on
# gemv_rows, where a one-row step was slower with it on gemm_rows (docs/benchmarks.md)
TILE_MIN_WEIGHTS = 24_000_000
TILE_MAX_BLOCKS = 384         # gemm_rows splits K while the blocks stay within this many


def _tiles(rows: int) -> int:
    """8-token tiles of a call (NT), rounded up to a power of two: a row's result does not
    depend on NT, and fewer template instantiations are compiled."""
    need = (rows + 7) // 8
    return next(nt for nt in (1, 2, 4, 8, 16) if nt >= need)


def rows_kernel(n_out: int, k: int, epilogue: int) -> str:
    """'gemm_rows' for big matrices, where gemv_rows leaves the tensor cores waiting for
    weights (benchmarks/gpu_batch.py), else 'gemv_rows'."""
    mats = 2 if epilogue == EPI_SWIGLU else 1
    return "gemm_rows" if mats * n_out * k >= TILE_MIN_WEIGHTS else "gemv_rows"


def gemv_rows_name(dtype, n_out: int, k: int, norm: bool, epilogue: int, rows: int, kernel: str | None = None) -> str:
    """The instantiation that out = W @ x for B = rows tokens launches (kernel: 'gemv_rows' or
    'gemm_rows'; default rows_kernel's pick)."""
    which = kernel or rows_kernel(n_out, k, epilogue)
    return f"{which}<{_ctype(dtype)}, {k}, {'true' if norm else 'false'}, {epilogue}, {_tiles(rows)}>"


def gemv_rows_fits(n_out: int, k: int, rows: int = MAX_ROWS) -> bool:
    """Whether a batched kernel takes this shape: whole 64-wide k tiles, at most MAX_ROWS
    tokens, and (gemv_rows) one round of k tiles of `rows` tokens beside its partial sums
    in shared memory (K itself is staged in chunks)."""
    return (k % 64 == 0 and 1 <= rows <= MAX_ROWS and n_out > 0
            and _rows_chunk(k, rows, EPI_SWIGLU)[1] <= ROWS_SMEM)


def _rows_chunk(k: int, rows: int, epilogue: int) -> tuple[int, int]:
    """(KC, shared bytes) of gemv_rows, as RowsChunk in kernels.cu computes them."""
    nt = _tiles(rows)
    mats = 2 if epilogue == EPI_SWIGLU else 1
    per_warp = (k // 64 + ROWS_WARPS - 1) // ROWS_WARPS
    part = mats * ROWS_WARPS * 16 * nt * 8 * 4 + nt * 8 * 4
    fit = (ROWS_SMEM - part - nt * 8 * ROWS_PAD * 2) // (nt * 8 * ROWS_WARPS * 64 * 2)
    kc = max(1, min(fit, per_warp)) * ROWS_WARPS * 64
    return kc, nt * 8 * (kc + ROWS_PAD) * 2 + part


def row_tiles(n_out: int) -> int:
    """gemm_rows's blocks along N (64 output rows each), and the counters its K split uses."""
    return -(-n_out // TILE_ROWS)


def rows_split(n_out: int, k: int) -> int:
    """KS, the columns of K one gemm_rows block takes, from the matrix's shape alone (so a
    row's sum is added in the same order at every B): K is halved while the N / 64 row
    tiles times the parts stay within TILE_MAX_BLOCKS and a part keeps 256 columns."""
    tiles, splits = row_tiles(n_out), 1
    while tiles * splits * 2 <= TILE_MAX_BLOCKS and k // (splits * 2) >= 256:
        splits *= 2
    return -(-k // splits // 64) * 64


def tile_workspace(n_out: int, k: int, epilogue: int, rows: int = MAX_ROWS) -> int:
    """fp32 values of workspace gemm_rows needs for this matrix: S partial sums per output
    and S sums of squares per token and row tile (0 when K is not split)."""
    splits = -(-k // rows_split(n_out, k))
    mats = 2 if epilogue == EPI_SWIGLU else 1
    return 0 if splits == 1 else splits * rows * (mats * n_out + row_tiles(n_out))


def rows_workspace(n_out: int, k: int, epilogue: int, rows: int = MAX_ROWS) -> int:
    """fp32 values of workspace this matrix's batched kernel needs."""
    return tile_workspace(n_out, k, epilogue, rows) if rows_kernel(n_out, k, epilogue) == "gemm_rows" else 0


def gemv_rows(w, x, out, *, epilogue: int = EPI_STORE, norm_w=None, eps: float = 0.0, residual=None,
              workspace=None, counters=None, kernel_name: str | None = None):
    """out[b] = W @ x[b] for B <= 64 tokens on the tensor cores, with gemv's prologue and epilogues.

    w: [N, K] (EPI_SWIGLU: [2N, K]); x: [B, K]; out: [B, N]. workspace: fp32, at least
    rows_workspace(N, K, epilogue, B) values; counters: int32, N / 64 zeros (both reused by
    every launch on one stream; needed only where gemm_rows splits K). kernel_name
    ('gemv_rows' or 'gemm_rows') overrides rows_kernel (tests run both on every shape)."""
    n_out, k = w.shape
    if epilogue == EPI_SWIGLU:
        n_out //= 2
    rows = x.size // k
    norm = norm_w is not None
    which = kernel_name or rows_kernel(n_out, k, epilogue)
    name = gemv_rows_name(w.dtype, n_out, k, norm, epilogue, rows, which)
    common = (w, x, norm_w if norm else x, np.float32(eps), residual if residual is not None else x, out,
              np.int32(n_out), np.int32(rows))
    if which == "gemv_rows":
        launch(name, ((n_out + 15) // 16,), (32 * ROWS_WARPS,), common, pdl=True,
               shared=_rows_chunk(k, rows, epilogue)[1])
        return
    ks = rows_split(n_out, k)
    splits = -(-k // ks)
    mats = 2 if epilogue == EPI_SWIGLU else 1
    need = tile_workspace(n_out, k, epilogue, rows)
    if need and (workspace is None or workspace.size < need or counters is None
                 or counters.size < row_tiles(n_out)):
        raise ValueError(f"gemm_rows: a {n_out}x{k} matrix splits K in {splits}: it needs a workspace "
                         f"of {need} floats and {row_tiles(n_out)} counters")
    shared = TILE_STAGES * (mats * TILE_ROWS + _tiles(rows) * 8) * 64 * 2 + _tiles(rows) * 8 * 4 + 16
    launch(name, (row_tiles(n_out), splits), (32 * TILE_WARPS,), common + (
        np.int32(ks), workspace if workspace is not None else x, counters if counters is not None else x),
        pdl=True, shared=shared)


def sample_rows(logits, params, w_scratch, tokens, chosen, pos, live=None):
    """Choose B tokens on the device, row b of logits [B, V] with params[b]; see kernels.cu.
    live: int32 device array whose first value is how many rows advance their position
    (None: all B)."""
    b, v = logits.shape
    if live is None:
        live = _cupy().full(1, b, dtype=np.int32)
    kernel("sample_rows")((b,), (SAMPLE_THREADS,), (logits, np.int32(v), params, w_scratch, tokens, chosen, pos,
                                                    live))


def sample_token(logits, params, w_scratch, token, history, pos):
    v = logits.size
    kernel("sample_token")((1,), (SAMPLE_THREADS,), (logits, np.int32(v), params, w_scratch, token, history, pos))


def set_step(token, pos, params, tok: int | None, position: int, u: float):
    kernel("set_step")((1,), (1,), (token, pos, params, np.int64(tok or 0), np.int32(position), np.float32(u),
                                    np.int32(tok is not None)))


# ---- block-quantized weights (quant.cu) -----------------------------------------------------
QUANT_KINDS = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "q4_k": 3, "q6_k": 4}  # the KIND enum of quant.cu
Q_WARPS, Q_PAD, Q_TOKENS = 8, 8, 8  # as in quant.cu; tokens per gemv_q launch at most
# gemv_qs (quant.cu): the block's scale applied after the mma; as in quant.cu
QS_WARPS, QS_STAGES, QS_ROW, QS_XPAD = 8, 2, 144, 16
QS_META = {"q8_0": 8, "q4_0": 16, "q4_1": 32, "q4_k": 16}  # bytes of scales per row per stage


Q_KERNEL: str | None = None  # "gemv_q": every block-quantized matrix on gemv_q (benchmarks' --q-kernel)


def q_kernel(kind: str, k: int) -> str:
    """The kernel that multiplies a `kind` matrix with rows of K weights: gemv_qs where its
    stages (128 bytes of quants per row) tile the row, else gemv_q. A choice by format and
    K only, never by the number of tokens: a token's bits do not depend on its batch."""
    if Q_KERNEL is not None:
        return Q_KERNEL
    return "gemv_qs" if kind in QS_META and k % 256 == 0 else "gemv_q"


def gemv_q_name(kind: str, k: int, norm: bool, epilogue: int) -> str:
    return f"{q_kernel(kind, k)}<{QUANT_KINDS[kind]}, {k}, {'true' if norm else 'false'}, {epilogue}>"


def dequantize_q_name(kind: str, k: int) -> str:
    return f"dequantize_q<{QUANT_KINDS[kind]}, {k}>"


def q_shared(kind: str, k: int, tokens: int, epilogue: int) -> int:
    """Bytes of dynamic shared memory of one launch of q_kernel(kind, k) for `tokens` tokens."""
    mats = 2 if epilogue == EPI_SWIGLU else 1
    if q_kernel(kind, k) == "gemv_q":
        return (tokens * (k + Q_PAD) * 2 + 15) // 16 * 16 + mats * Q_WARPS * 16 * 8 * 4 + 8 * 4
    ring = QS_WARPS * QS_STAGES * mats * (16 * QS_ROW + 16 * QS_META[kind])
    return ring + tokens * (k + QS_XPAD) * 2 + (k // 32) * 8 * 4 + mats * QS_WARPS * 16 * 8 * 4 + 8 * 4


@functools.lru_cache(maxsize=None)
def _sm_resources() -> tuple[int, int]:
    """(multiprocessors, bytes of shared memory per multiprocessor) of the current device."""
    cp = _cupy()
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    return int(props["multiProcessorCount"]), int(props["sharedMemPerMultiprocessor"])


def qs_blocks(name: str, tiles: int, shared: int) -> int:
    """gemv_qs's grid: as many blocks as fit on the GPU at once, each looping over its tiles;
    never more than tiles. Per SM: by shared memory (1 KB of it reserved per block), by the
    kernel's registers (blocks_by_registers), and at most 3 (what was measured). A grid that
    did not fit would still be right, only run in a second wave."""
    sms, smem = _sm_resources()
    return min(tiles, sms * max(1, min(3, smem // (shared + 1024), blocks_by_registers(name, 32 * QS_WARPS))))


@functools.lru_cache(maxsize=None)
def q_tokens(kind: str, k: int, epilogue: int) -> int:
    """Tokens per launch: up to 8, fewer where their staged inputs would not fit beside the
    epilogue's matrices (SwiGLU's gate and up take twice the ring and partial sums)."""
    return next(b for b in range(Q_TOKENS, 0, -1) if b == 1 or q_shared(kind, k, b, epilogue) <= ROWS_SMEM)


def _planes(w):
    """The four plane pointers of quant.cu's Planes (absent planes: any valid address)."""
    p = w.planes
    return tuple(p.get(name, p["q"]) for name in ("q", "qh", "scale", "meta"))


def gemv_q(w, x, out, *, epilogue: int = EPI_STORE, norm_w=None, eps: float = 0.0, residual=None):
    """out[b] = W @ x[b] for a block-quantized W (tinyllm.quant.QuantizedMatrix), any number B
    of tokens, in launches of q_tokens(kind, K, epilogue) tokens: a token's result does not
    depend on its launch.

    w: [N, K] (EPI_SWIGLU: [2N, K]); x: [B, K]; out, residual: [B, N]."""
    n_out, k = w.shape
    if epilogue == EPI_SWIGLU:
        n_out //= 2
    rows = x.size // k
    x2, out2 = x.reshape(rows, k), out.reshape(rows, n_out)
    res2 = residual.reshape(rows, n_out) if residual is not None else None
    norm = norm_w is not None
    name = gemv_q_name(w.kind, k, norm, epilogue)
    staged = q_kernel(w.kind, k) == "gemv_qs"
    tiles, warps = (n_out + 15) // 16, QS_WARPS if staged else Q_WARPS
    step = q_tokens(w.kind, k, epilogue)
    for b0 in range(0, rows, step):
        b = min(step, rows - b0)
        xb = x2[b0:b0 + b]
        shared = q_shared(w.kind, k, b, epilogue)
        grid = qs_blocks(name, tiles, shared) if staged else tiles
        launch(name, (grid,), (32 * warps,), _planes(w) + (
            xb, norm_w if norm else xb, np.float32(eps), res2[b0:b0 + b] if res2 is not None else xb,
            out2[b0:b0 + b], np.int32(n_out), np.int32(b)), pdl=True, shared=shared)


def dequantize_q(w):
    """The fp16 weights [N, K] of a block-quantized matrix, rebuilt as gemv_q rebuilds them
    (a prompt's matmul runs on cuBLAS with them)."""
    n, k = w.shape
    out = _cupy().empty((n, k), dtype=np.float16)
    units = n * (k // (64 if w.kind == "q6_k" else 32))
    kernel(dequantize_q_name(w.kind, k))(((units + 255) // 256,), (256,), _planes(w) + (out, np.int32(n)))
    return out
