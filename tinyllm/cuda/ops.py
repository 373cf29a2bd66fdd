"""FastOps: model.py's named operations, as fused CUDA kernels for one-token decode.

The model calls its operations by name, and where several run as one kernel the model
calls that group by its own name (model.py: `norm_linear`, `norm_swiglu`,
`linear_residual`, `rope_attention`). FastOps overrides exactly those, so per layer a
decode step launches:

    1  norm_linear      rms_norm + QKV GEMV                 (wqkv stacked: one matrix)
    2  rope_attention   RoPE(q, k) + KV-cache write + split-K GQA attention + merge
    3  linear_residual  wo GEMV + residual add
    4  norm_swiglu      rms_norm + gate|up GEMV + SiLU(gate) * up
    5  linear_residual  down GEMV + residual add

plus the embedding, the final norm + LM head (norm_linear), and the fp32 cast of the logits.
A GEMV holds its rows in registers (`gemv`), or, where the matrix has
kernels.STREAM_MIN_BYTES or more (the LM head: see FastOps._streams), streams them through
shared memory (`gemv_stream`; kernels.set_gemv_stream turns that off): the same sums, more
bytes in flight.

Only the decode shape (one token per sequence, fp16 or bf16) takes the fused kernels. A prompt
(prefill) runs each group's readable default, with its matmuls on cuBLAS called through ctypes
(cublas.py: the prefill is host-bound, and a CuPy matmul costs tens of microseconds of the
host's time) and its RMSNorm, RoPE, softmax and SiLU·mul one kernel each (`*_rows` in
kernels.cu: each readable one is 5-10 CuPy calls); float32 runs readable.

A FastOps is made for one mode and keeps it:

    "eager"    calls from Python: the host writes each sequence's position (and cache
               row) into device memory before the attention kernel;
    "graph"    one sequence inside a captured CUDA graph (decoder.py): the position is read
               from `positions`, device memory that the host or the graph's own sampling
               kernel writes before a replay;
    "batched"  B sequences inside a captured graph (batch.py): every GEMV is the
               tensor-core GEMM over B tokens (`gemv_rows`, the same kernel whatever B, so a
               sequence gets the same bits at any batch size) and the attention reads each
               sequence's position from `positions` and its block table from `table` (the
               caches are paged: kv_cache.py BlockPool), or its cache row from `slots`.
               With gemm="cublas" the GEMMs are cuBLAS's instead (cublas.py), always over
               tiles of GEMM_M rows, the B rows padded: one M, so one algorithm and the same
               bits whatever B; a step then takes up to STEP_ROWS rows (two tiles: a prompt's
               rows beside 64 decoding sequences, or 128 sequences); the norms and the SwiGLU
               are launches of their own, and wo and down add into the residual stream in
               place (`_cublas`).

A block-quantized matrix (tinyllm/quant.py) takes `kernels.gemv_q` in every mode, for one token
or B (quant.cu's gemv_qs or gemv_q, by format and row length: `kernels.q_kernel`); a prompt's
matmul by one runs on cuBLAS with the matrix rebuilt in fp16 by `dequantize_q`.
"""
from __future__ import annotations

import numpy as np

from ..kv_cache import BlockPool, PagedKVCache
from ..model import Ops
from ..quant import QuantizedMatrix
from . import kernels as K

MODES = ("eager", "graph", "batched")
GEMMS = ("kernels", "cublas")  # the batched mode's GEMMs: gemv_rows / gemm_rows, or cuBLAS at a fixed M
GEMM_M = K.MAX_ROWS            # rows of every cuBLAS call of a batched step: the fixed M
STEP_ROWS = 2 * GEMM_M         # the most rows of a batched step on cuBLAS (gemv_rows takes K.MAX_ROWS)


class FastOps(Ops):
    """Ops for a CuPy fp16 or bf16 model whose one-token decode runs fused kernels (see module
    docstring).

    config, rope: the model's (rope.RopeTables: the whole tables, [S, E/2] fp32, read at each
    call because they grow; the attention kernel rotates at the position it reads from
    device memory). dtype: the model's (its weights, activations and cache). positions,
    slots: int32 device buffers the graph modes read; the eager mode makes and writes its own.
    table: int32 [rows, W] device buffer, each row's block table (paged caches; batched mode)."""

    def __init__(self, config, rope, mode: str = "eager", positions=None, slots=None, shared_rows: bool = False,
                 quantized=(), dtype=np.float16, gemm: str = "kernels", table=None):
        import cupy as cp

        if mode not in MODES:
            raise ValueError(f"FastOps mode: expected one of {', '.join(MODES)}, got {mode!r}")
        if gemm not in GEMMS:
            raise ValueError(f"FastOps gemm: expected one of {', '.join(GEMMS)}, got {gemm!r}")
        if K.element_type(dtype) is None:
            raise ValueError(f"FastOps: the kernels take float16 or bfloat16, got {np.dtype(dtype).name}")
        super().__init__(cp)
        c = self.config = config
        self.dtype = np.dtype(dtype)
        self.mode = mode
        self.tables = rope
        self.shared_rows = shared_rows  # batched rows may share a cache (a prompt's tokens, one per row)
        self.gemm = gemm if mode == "batched" else "kernels"
        self.max_rows = STEP_ROWS if self.gemm == "cublas" else K.MAX_ROWS  # tokens per call
        self.positions = positions if positions is not None else cp.zeros(self.max_rows, dtype=cp.int32)
        self.slots = slots if slots is not None else cp.zeros(self.max_rows, dtype=cp.int32)
        self.table = table
        self._scratch = {}                         # attention scratch by (cache capacity, rows)
        self._rows_scratch = []                    # gemv_rows workspaces and counters, the last the largest
        e = c.head_dim  # the attention kernel's shared memory must fit in 48 KB
        self.fused_attention = e in (64, 128) and K.attention_shared(e, K.heads_per_block(c.n_rep)) <= K.ATTENTION_SMEM
        self.stats = {"fused": 0, "rows_attention": 0}  # fused launches, batched attention launches
        self.quantized = tuple(quantized)  # (kind, K, norm, epilogue) of each block-quantized GEMV
        self.blas = None
        self._padded = {}  # (role, width) -> [max_rows, width]: the cuBLAS mode's rows (`_rows_buffer`)
        if self.gemm == "cublas":
            from . import cublas

            self.blas = cublas.handle()  # made now: a capture must not allocate its workspace

    @classmethod
    def for_model(cls, model, mode: str = "eager", positions=None, slots=None, shared_rows: bool = False,
                  gemm: str = "kernels", table=None) -> "FastOps":
        return cls(model.config, model.rope, mode, positions, slots, shared_rows, quantized_gemvs(model.weights),
                   model.dtype, gemm, table)

    # ---- which calls take the fast path ------------------------------------------------
    def kernel_names(self) -> list[str]:
        """Every kernel this model's decode step launches (compiled together at warm-up)."""
        c = self.config
        names = K.plain_kernel_names(self.dtype)
        for k, norm, epi in [(c.dim, True, K.EPI_STORE), (c.dim, False, K.EPI_STORE), (c.dim, True, K.EPI_SWIGLU),
                             (c.dim, False, K.EPI_SWIGLU), (c.n_heads * c.head_dim, False, K.EPI_RESIDUAL),
                             (c.n_heads * c.head_dim, False, K.EPI_STORE), (c.hidden_dim, False, K.EPI_RESIDUAL),
                             (c.hidden_dim, False, K.EPI_STORE)]:
            if k % 8 == 0:
                names.append(K.gemv_name(self.dtype, k, norm, epi))
        # the big matrices' streaming GEMV (the LM head's wherever it may stream: whether it does
        # is read off the compiled `gemv`, after this list is compiled)
        for n, k, norm, epi in step_gemms(c):
            rows = 2 * n if epi == K.EPI_SWIGLU else n
            if k % 8 == 0 and self._streams(rows, rows * k * self.dtype.itemsize):
                names.append(K.gemv_stream_name(self.dtype, k, norm, epi))
        if self.fused_attention:
            names += [K.attention_name(self.dtype, c.head_dim, c.n_rep, loop=loop) for loop in (False, True)]
        for kind, k, norm, epi in self.quantized:
            names += [K.gemv_q_name(kind, k, norm, epi), K.dequantize_q_name(kind, k)]
        return sorted(set(names))

    def rows_kernel_names(self, max_rows: int) -> list[str]:
        """The gemv_rows instantiations a batched decode step of up to max_rows tokens launches."""
        c = self.config
        names = [K.attention_name(self.dtype, c.head_dim, c.n_rep, K.rows_heads(c.n_rep, c.head_dim, b), loop)
                 for b in (1, self.max_rows) for loop in (False, True)
                 if self.fused_attention]  # the two counts a batch may take, a grid as wide as the cache or not
        if self.gemm == "cublas":
            return sorted(set(names + K.plain_kernel_names(self.dtype)))
        for rows in sorted({8 * K._tiles(b) for b in range(1, max_rows + 1)}):
            for n, k, norm, epi in step_gemms(self.config):
                if k % 64 == 0:
                    names.append(K.gemv_rows_name(self.dtype, n, k, norm, epi, rows))
        return sorted(set(names))

    def _rows(self, x) -> int:
        """B for the decode shape [B, 1, ...] (one token per sequence, B <= max_rows), in the
        model's dtype, contiguous, 16-byte aligned; 0 for any other shape."""
        if (x.ndim >= 3 and x.shape[1] == 1 and 1 <= x.shape[0] <= self.max_rows and x.dtype == self.dtype
                and x.flags.c_contiguous and x.data.ptr % 16 == 0):
            return x.shape[0]
        return 0

    def _gemv(self, x, w, epilogue=K.EPI_STORE, norm=None, residual=None):
        """The fused GEMV for the decode shape, or None when this call must run readable.
        One token runs `gemv`, B tokens (and every call of the batched mode, B = 1 included)
        the tensor-core `gemv_rows`; a block-quantized matrix, at any B, `kernels.gemv_q`.
        norm: (weight, eps) of an RMSNorm prologue."""
        b, k = self._rows(x), w.shape[1]
        if isinstance(w, QuantizedMatrix):
            if not (b and w.dtype == np.float16 and x.shape[-1] == k):
                return None
            n_out = w.shape[0] // 2 if epilogue == K.EPI_SWIGLU else w.shape[0]
            out = self.xp.empty((b, 1, n_out), dtype=np.float16)
            norm_w, eps = norm if norm is not None else (None, 0.0)
            K.gemv_q(w, x, out, epilogue=epilogue, norm_w=norm_w, eps=eps, residual=residual)
            self.stats["fused"] += 1
            return out
        if self.gemm == "cublas":
            if not (b and w.dtype == self.dtype and w.flags.c_contiguous and x.shape[-1] == k):
                return None
            return self._cublas(x, w, b, epilogue, norm, residual)
        single = b == 1 and self.mode != "batched"
        fits = k % 8 == 0 and k <= 16384 if single else K.gemv_rows_fits(w.shape[0], k, b)
        if not (b and fits and w.dtype == self.dtype and w.flags.c_contiguous):
            return None
        n_out = w.shape[0] // 2 if epilogue == K.EPI_SWIGLU else w.shape[0]
        out = self.xp.empty((b, 1, n_out), dtype=self.dtype)
        norm_w, eps = norm if norm is not None else (None, 0.0)
        if single:
            run = K.gemv_stream if self._streams(w.shape[0], w.nbytes, (k, norm_w is not None, epilogue)) else K.gemv
            run(w, x, out, epilogue=epilogue, norm_w=norm_w, eps=eps, residual=residual)
        else:
            workspace, counters = self.rows_scratch(K.rows_workspace(n_out, k, epilogue), K.row_tiles(n_out))
            K.gemv_rows(w, x, out, epilogue=epilogue, norm_w=norm_w, eps=eps, residual=residual,
                        workspace=workspace, counters=counters)
        self.stats["fused"] += 1
        return out

    def _streams(self, rows: int, nbytes: int, gemv: tuple | None = None) -> bool:
        """Whether a one-token GEMV takes gemv_stream: a matrix of kernels.STREAM_MIN_BYTES or
        more; the LM head (rows = the vocabulary) only where `gemv` fits at most
        kernels.STREAM_HEAD_BLOCKS blocks on an SM for it (gemv: its (K, norm, epilogue); without
        it, whether the head may stream). Where 4 fit (K = 2048), their loads overlap each
        other's sums and the streamed head made the whole step no faster or slower; where 2 or 3
        fit (K = 4096, 3072), it made the step faster (docs/benchmarks.md)."""
        if not K.streams(nbytes):
            return False
        if rows != self.config.vocab_size or gemv is None:
            return True
        return K.gemv_blocks_per_sm(self.dtype, *gemv) <= K.STREAM_HEAD_BLOCKS

    def _cublas(self, x, w, b: int, epilogue, norm, residual):
        """B rows through cuBLAS in calls of M = GEMM_M rows whatever B (one call up to GEMM_M
        rows, two up to STEP_ROWS: a row gets the bits of the same M wherever it sits). Per
        layer that is eight launches (norm, q|k|v, attention, wo, norm, gate|up, SwiGLU,
        down; the GEMMs once per tile), not twelve, because each operation writes where the
        next one reads:

        - a GEMM's input rows live in a padded [max_rows, K] buffer (`_rows_buffer`), written
          by the norm in front of it, the attention (wo's input) or the SwiGLU (down's);
        - the residual stream lives in one [max_rows, D] buffer, written by the embedding,
          and wo and down add into it in place (`accumulate`: the residual is added to the
          fp32 sums, then rounded once).

        The padding rows hold whatever earlier steps left there; each output row is computed
        from its own input row only, so they touch nothing that is kept."""
        xp, k, n = self.xp, w.shape[1], w.shape[0]
        tiles = -(-b // GEMM_M)
        padded = self._rows_buffer("in", k)
        h = x.reshape(b, k)
        if norm is not None:
            K.rms_norm_rows(h, norm[0], norm[1], padded[:b], pdl=True)
        elif h.data.ptr != padded.data.ptr:
            padded[:b] = h
        self.stats["fused"] += 1
        if epilogue == K.EPI_RESIDUAL:
            stream = self._rows_buffer("residual", n)
            if residual.data.ptr != stream.data.ptr:
                stream[:b] = residual.reshape(b, n)
            self._gemm_tiles(padded, w, stream, tiles, accumulate=True)
            return stream[:b].reshape(b, 1, n)
        y = xp.empty((tiles * GEMM_M, n), dtype=self.dtype)
        self._gemm_tiles(padded, w, y, tiles)
        if epilogue == K.EPI_SWIGLU:
            out = self._rows_buffer("in", n // 2)[:b].reshape(b, 1, n // 2)  # the down projection's input
            K.swiglu_rows(y[:b], out)
            return out
        return y[:b].reshape(b, 1, n)

    def _gemm_tiles(self, x, w, out, tiles: int, accumulate: bool = False) -> None:
        """out[:tiles * GEMM_M] (+)= x[:tiles * GEMM_M] @ w.T, one cuBLAS call per GEMM_M rows."""
        for t in range(tiles):
            rows = slice(t * GEMM_M, (t + 1) * GEMM_M)
            self.blas.gemm_nt(x[rows], w, out[rows], accumulate=accumulate)

    def _rows_buffer(self, role: str, width: int):
        """The cuBLAS mode's [max_rows, width] buffer for a role ("in": a GEMM's input of K =
        width; "residual": the residual stream), kept for the life of these ops (graphs hold
        its address)."""
        buf = self._padded.get((role, width))
        if buf is None:
            with self.xp.cuda.using_allocator(self.xp.get_default_memory_pool().malloc):
                buf = self._padded[role, width] = self.xp.zeros((self.max_rows, width), dtype=self.dtype)
        return buf

    # ---- the fusions (model.py names them) ------------------------------------------------
    def norm_linear(self, x, norm_weight, eps: float, w):
        out = self._gemv(x, w, norm=(norm_weight, eps))
        return out if out is not None else super().norm_linear(x, norm_weight, eps, w)

    def norm_swiglu(self, x, norm_weight, eps: float, w_gate_up):
        out = self._gemv(x, w_gate_up, K.EPI_SWIGLU, norm=(norm_weight, eps))
        return out if out is not None else super().norm_swiglu(x, norm_weight, eps, w_gate_up)

    def linear_residual(self, x, w, residual):
        out = None
        if self._rows(residual) and residual.shape[:-1] == x.shape[:-1] and residual.shape[-1] == w.shape[0]:
            out = self._gemv(x, w, K.EPI_RESIDUAL, residual=residual)
        return out if out is not None else super().linear_residual(x, w, residual)

    def rope_attention(self, qkv, n_heads: int, cos, sin, caches, layer: int, scale: float):
        """One launch for every sequence: q and k rotated inside the kernel, read straight from
        the QKV output, the new k and v written to the cache, attention over it."""
        c, b = self.config, len(caches)
        shaped = (self.fused_attention and qkv.shape[:2] == (b, 1) and b <= self.max_rows and qkv.dtype == self.dtype
                  and qkv.strides[-1] == 2 and qkv.strides[-2] == 2 * c.head_dim)
        pool, paged = None, False
        if b == 1 and self.mode != "batched":  # one sequence, its own contiguous cache
            shaped = shaped and not isinstance(caches[0], PagedKVCache) and caches[0].k[layer].shape[0] == 1
        else:  # B sequences: rows of one batched cache, or paged caches of one pool
            pool = caches[0].pool
            shaped = shaped and pool is not None and all(x.pool is pool for x in caches)
            paged = isinstance(pool, BlockPool)
            shaped = shaped and (not paged or self.mode == "eager" or self.table is not None)
        if not shaped:
            if self.mode != "eager":
                raise RuntimeError("a captured decode step needs the fused attention")
            return super().rope_attention(qkv, n_heads, cos, sin, caches, layer, scale)
        n_kv = c.n_kv_heads
        q, k, v = qkv[:, :, :n_heads], qkv[:, :, n_heads:n_heads + n_kv], qkv[:, :, n_heads + n_kv:]
        width = n_heads * c.head_dim
        if self.gemm == "cublas":  # straight into wo's padded input
            out = self._rows_buffer("in", width)[:b].reshape(b, 1, width)
        else:
            out = self.xp.empty((b, 1, width), dtype=self.dtype)
        self.stats["fused"] += 1
        if pool is None:
            if self.mode == "eager":
                self.positions[:1].fill(caches[0].length)
            # An eager kernel reads the position before waiting for the previous kernel: launched
            # right after the fill above it must not overlap it (no programmatic launch)
            K.decode_attention(q, k, v, self.tables.cos, self.tables.sin, self.positions, caches[0].k[layer], caches[0].v[layer],
                               scale, True, self.scratch(caches[0].capacity), out, c.n_rep,
                               pdl=self.mode != "eager", slots=self.slots)
            return out
        self.stats["rows_attention"] += 1
        table = self.table[:b] if paged and self.table is not None else None
        if self.mode == "eager":
            self.positions[:b].set(np.asarray([x.length for x in caches], dtype=np.int32))
            if paged:
                table = self.xp.asarray(pool.table[[x.row for x in caches]])
            else:
                self.slots[:b].set(np.asarray([x.pool_row for x in caches], dtype=np.int32))
        heads = K.rows_heads(c.n_rep, c.head_dim, b)  # the bits do not depend on it (tests/test_cuda.py)
        args = (q, k, v, self.tables.cos, self.tables.sin, self.positions, pool.k[layer], pool.v[layer], scale, True,
                self.scratch(pool.capacity, self.max_rows), out, c.n_rep)
        rows = dict(slots=self.slots, rows=b, row_stride=qkv.strides[0] // 2, heads=heads, table=table)
        if self.shared_rows:  # every row's k and v into the cache first, where later rows of its sequence read them
            K.decode_attention(*args, pdl=self.mode != "eager", write_only=True, **rows)
            K.decode_attention(*args, pdl=False, **rows)
            return out
        K.decode_attention(*args, pdl=self.mode != "eager", **rows)
        return out

    # ---- single operations: a prompt's rows, one launch each --------------------------------
    def linear(self, x, w):
        """A prompt's matmul: cuBLAS through ctypes (cublas.py: a few µs of the host's time where
        CuPy's matmul takes tens). A block-quantized matrix first has its fp16 weights rebuilt by
        one kernel (into a temporary), instead of the readable dequantization's many calls."""
        if isinstance(w, QuantizedMatrix) and w.dtype == np.float16 and x.dtype == np.float16:
            w = K.dequantize_q(w)
        blas = self._prompt_blas()
        if (blas is not None and not isinstance(w, QuantizedMatrix) and x.dtype == w.dtype == self.dtype
                and x.flags.c_contiguous and w.flags.c_contiguous and x.shape[-1] == w.shape[1]):
            out = self.xp.empty(x.shape[:-1] + (w.shape[0],), dtype=self.dtype)
            blas.gemm_nt(x.reshape(-1, w.shape[1]), w, out.reshape(-1, w.shape[0]))
            return out
        return super().linear(x, w)

    def matmul(self, a, b):
        """A prompt's attention products (scores, weighted values): one strided-batched cuBLAS
        call in the model's type, where CuPy goes through float32 copies of both operands."""
        blas = self._prompt_blas()
        if blas is not None and a.dtype == self.dtype:
            out = blas.matmul(a, b)
            if out is not None:
                return out
        return super().matmul(a, b)

    def _prompt_blas(self):
        """The cuBLAS handle for a prompt's calls from Python (the eager mode only: nothing here
        runs inside a capture), or None where cuBLAS cannot be loaded. A handle of these ops'
        own: its workspace must not be shared with the captured steps, which may run on another
        stream at the same time."""
        if self.mode != "eager":
            return None
        if self.blas is None:
            from . import cublas

            try:
                self.blas = cublas.Handle()
            except (OSError, RuntimeError, AttributeError):
                self.blas = False
        return self.blas or None

    def embedding(self, table, tokens):
        if (tokens.ndim == 2 and tokens.shape[1] == 1 and tokens.shape[0] <= self.max_rows and tokens.dtype == np.int64
                and tokens.flags.c_contiguous and table.dtype == self.dtype):
            b, d = tokens.shape[0], table.shape[1]
            if self.gemm == "cublas":  # the residual stream's buffer, which wo and down add into
                out = self._rows_buffer("residual", d)[:b].reshape(b, 1, d)
            else:
                out = self.xp.empty((b, 1, d), dtype=table.dtype)
            K.embedding(table, tokens, out)
            return out
        return super().embedding(table, tokens)

    def rms_norm(self, x, weight, eps: float):
        if x.dtype == self.dtype and weight.dtype == self.dtype and x.flags.c_contiguous:
            out = self.xp.empty_like(x)  # one kernel instead of ~10 CuPy calls
            K.rms_norm_rows(x, weight, eps, out)
            return out
        return super().rms_norm(x, weight, eps)

    def swiglu(self, gate_up):
        if gate_up.dtype == self.dtype and gate_up.flags.c_contiguous:  # one launch
            out = self.xp.empty(gate_up.shape[:-1] + (gate_up.shape[-1] // 2,), dtype=self.dtype)
            K.swiglu_rows(gate_up, out)
            return out
        return super().swiglu(gate_up)

    def attention_weights(self, scores, mask, pos: int, dtype):
        """A prompt block's scores, masked and normalised in one launch, in place, in the
        model's type (the readable op lifts them to float32 and passes over them five times)."""
        if (mask is not None and scores.dtype == self.dtype == np.dtype(dtype) and scores.flags.c_contiguous
                and scores.shape[-2] % mask.shape[0] == 0):
            K.causal_softmax_rows(scores, mask.shape[0], pos)
            return scores
        return super().attention_weights(scores, mask, pos, dtype)

    def softmax(self, x):
        if x.dtype == np.float32 and x.flags.c_contiguous:  # a prompt's attention: one launch
            K.softmax_rows(x)
            return x
        return super().softmax(x)

    def rope_angles(self, cos, sin, positions, t):
        if self.mode == "batched":
            # the fused attention rotates at each sequence's position, read from device memory
            # (gathering rows here would copy the host's positions at capture time)
            return cos, sin
        return super().rope_angles(cos, sin, positions, t)

    def rope(self, qk, cos, sin):
        b, t, n, e = qk.shape
        if (qk.dtype == self.dtype and qk.strides[-1] == 2 and qk.strides[-2] == 2 * e
                and qk.strides[0] == t * qk.strides[1] and cos.dtype == np.float32 and cos.flags.c_contiguous
                and sin.flags.c_contiguous and cos.shape[-2:] == (t, e // 2) and cos.size in (t * e // 2, b * t * e // 2)):
            out = self.xp.empty(qk.shape, dtype=self.dtype)  # a prompt: one launch
            K.rope_rows(qk, cos, sin, out)
            return out
        return super().rope(qk, cos, sin)

    def rows_scratch(self, values: int, tiles: int):
        """A gemv_rows workspace of at least `values` floats and `tiles` zeroed counters, shared by
        every launch of these ops (they run one after another on one stream). A larger one
        replaces it when a call needs more; the old ones stay allocated, since captured
        graphs hold their addresses."""
        if not self._rows_scratch or self._rows_scratch[-1][0].size < values or self._rows_scratch[-1][1].size < tiles:
            shapes = step_gemms(self.config)
            values = max([values] + [K.rows_workspace(n, k, e) for n, k, _, e in shapes if k % 64 == 0])
            tiles = max([tiles] + [K.row_tiles(n) for n, _, _, _ in shapes])
            with self.xp.cuda.using_allocator(self.xp.get_default_memory_pool().malloc):
                self._rows_scratch.append((self.xp.empty(max(values, 1), dtype=np.float32),
                                           self.xp.zeros(tiles, dtype=np.int32)))
        return self._rows_scratch[-1]

    def scratch(self, capacity: int, rows: int = 1):
        """Attention scratch for a cache capacity and up to `rows` sequences; kept for the life of
        these ops (graphs use it). Allocated from the default memory pool, never from a graph's
        private pool (which is freed with its graph, while the scratch is shared by all graphs)."""
        if (capacity, rows) not in self._scratch:
            c = self.config
            with self.xp.cuda.using_allocator(self.xp.get_default_memory_pool().malloc):
                self._scratch[capacity, rows] = K.attention_scratch(c.n_kv_heads, c.n_rep, c.head_dim, capacity, rows)
        return self._scratch[capacity, rows]


def step_gemms(config) -> list[tuple]:
    """(N, K, norm folded in, epilogue) of each GEMM of a decode step: q|k|v, the LM head,
    gate|up (N per matrix), wo and down."""
    c = config
    return [((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.dim, True, K.EPI_STORE),
            (c.vocab_size, c.dim, True, K.EPI_STORE), (c.hidden_dim, c.dim, True, K.EPI_SWIGLU),
            (c.dim, c.n_heads * c.head_dim, False, K.EPI_RESIDUAL), (c.dim, c.hidden_dim, False, K.EPI_RESIDUAL)]


def quantized_gemvs(weights) -> list[tuple]:
    """(kind, K, norm, epilogue) of every GEMV a decode step runs on a block-quantized matrix."""
    uses = []
    for layer in weights.layers:
        uses += [(layer.wqkv, True, K.EPI_STORE), (layer.wo, False, K.EPI_RESIDUAL),
                 (layer.w_gate_up, True, K.EPI_SWIGLU), (layer.w_down, False, K.EPI_RESIDUAL)]
    uses.append((weights.output, True, K.EPI_STORE))
    return sorted({(w.kind, w.shape[1], norm, epi) for w, norm, epi in uses if isinstance(w, QuantizedMatrix)})
