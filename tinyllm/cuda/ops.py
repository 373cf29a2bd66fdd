"""FastOps: model.py's named operations, replaced by fused CUDA kernels for one-token decode.

The model calls `ops.rms_norm`, `ops.linear`, `ops.rope`, `ops.attention`, `ops.swiglu`
and `ops.add` one after another. Run one kernel per call and a decode step costs about
eleven launches per layer; most of them move a few kilobytes, so their fixed cost
(launch, ramp-up, tail: a few microseconds each) would dominate. Fusing neighbours
halves that, but the model must stay one readable function. So FastOps *defers*:

    h   = ops.rms_norm(x, w)        -> returns an empty buffer h and a promise "h = norm(x)"
    qkv = ops.linear(h, wqkv)       -> sees the promise on its input: ONE kernel, norm + GEMV
    ...
    y   = ops.linear(a, wo)         -> returns an empty y and a promise "y = wo @ a"
    x   = ops.add(x, y)             -> ONE kernel: GEMV with the residual add as epilogue

A promise is kept by the next operation if it can fuse with it; otherwise that operation
first keeps the promise by launching the plain kernel, so every buffer holds its value
before anything reads it. model.py only reshapes and slices between calls (views, no
reads), which is what makes this safe. The result, per layer:

    1  rms_norm + QKV GEMV                 (wqkv stacked: one matrix)
    2  RoPE(q, k) + KV-cache write + split-K GQA attention + merge
    3  wo GEMV + residual add
    4  rms_norm + gate|up GEMV + SiLU(gate) * up
    5  down GEMV + residual add

plus the embedding, the final norm + LM head, and the fp32 cast of the logits.

Only the decode shape (one token per sequence, fp16) takes the fused path. A prompt
(prefill) runs the readable operations with cuBLAS for the matmuls, except that its
RMSNorm, RoPE, softmax and SiLU·mul are one kernel each (`*_rows` in kernels.cu: the
prefill is host-bound, and each readable one is 5-10 CuPy calls); float32 runs readable.
The position of the new token comes from `self.pos`, an int32 in device memory, so a
captured step can be replayed at any position (decoder.py writes it; eager calls write
it from the `pos` argument).

B sequences at once (`Model.decode_batch`, continuous batching) take the same fused path
when their caches are rows of one batched cache (KVCache.row): the GEMVs become
tensor-core GEMMs over the B tokens (`gemv_rows`), and one attention launch serves every
sequence, each with its own position (`self.positions[b]`) and cache row
(`self.slots[b]`), read from device memory like `pos` (batch.py writes them per step).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model import Model, Ops
from . import kernels as K


@dataclass
class _Norm:
    """Promise: out = rms_norm(x, w)."""
    x: object
    w: object
    eps: float
    out: object

    def keep(self, ops):
        K.rms_norm_rows(self.x, self.w, self.eps, self.out)


@dataclass
class _Linear:
    """Promise: out = W @ h, where h may itself be a pending norm."""
    h: object
    w: object
    norm: _Norm | None
    out: object

    def launch(self, ops, epilogue=K.EPI_STORE, out=None, residual=None):
        n = self.norm
        x = n.x if n else self.h
        # one token, or B on the tensor cores; a batched step always takes gemv_rows, so that
        # a sequence gets the same bits at every batch size, B = 1 included
        gemv = K.gemv if x.shape[0] == 1 and not ops.batched else K.gemv_rows
        gemv(self.w, x, self.out if out is None else out, epilogue=epilogue,
             norm_w=n.w if n else None, eps=n.eps if n else 0.0, residual=residual)

    def keep(self, ops):
        self.launch(ops)


@dataclass
class _Rope:
    """Promise: out = rope(qk) at the current position."""
    qk: object
    cos: object
    sin: object
    out: object

    def keep(self, ops):
        self.out[...] = Ops.rope(ops, self.qk, self.cos, self.sin)  # the readable op


class FastOps(Ops):
    """Ops for a CuPy model whose one-token decode runs fused kernels (see module docstring)."""

    def __init__(self, model: Model):
        import cupy as cp

        super().__init__(cp)
        c = model.config
        self.config = c
        self.cos, self.sin = model.cos, model.sin  # [S_max, E/2] fp32, the full tables
        self.pos = cp.zeros(1, dtype=cp.int32)     # the decode position, in device memory
        self.slot0 = cp.zeros(1, dtype=cp.int32)   # one sequence: its cache is "row 0" of itself
        self.positions = cp.zeros(K.MAX_ROWS, dtype=cp.int32)  # B sequences: each one's position
        self.slots = cp.zeros(K.MAX_ROWS, dtype=cp.int32)      # and its row of the batched cache
        self.host_writes_position = True           # False while a graph is captured: decoder.py / batch.py
                                                   # write pos / positions and slots
        self.batched = False                       # True while batch.py captures: every attention reads
                                                   # positions and cache rows from device memory
        self.pending = None                        # at most one promise, made by the last call
        self._scratch = {}                         # attention scratch by (cache capacity, rows)
        layers = model.weights.layers
        # linears whose result the next op can absorb (add or swiglu): those are deferred
        self._deferred = {id(layer.wo) for layer in layers} | {id(layer.w_down) for layer in layers} \
            | {id(layer.w_gate_up) for layer in layers}
        e, r = c.head_dim, K.heads_per_block(c.n_rep)  # the attention kernel's shared memory must fit in 48 KB
        chunk = K.attention_chunk(e)
        shared = chunk * e * 2 + (r + 1) * e * 4 + r * chunk * 4 + (chunk // 32) * r * 4
        self.fused_attention = e in (64, 128) and shared <= 47 * 1024
        self.stats = {"fused": 0, "kept": 0, "rows_attention": 0}  # fusions made, promises kept unfused,
                                                                    # batched attention launches

    # ---- which calls take the fast path ------------------------------------------------
    def kernel_names(self, weights) -> list[str]:
        """Every kernel this model's decode step launches (compiled together at warm-up)."""
        c = self.config
        names = list(K.PLAIN_KERNELS)
        for k, norm, epi in [(c.dim, True, K.EPI_STORE), (c.dim, False, K.EPI_STORE), (c.dim, True, K.EPI_SWIGLU),
                             (c.dim, False, K.EPI_SWIGLU), (c.n_heads * c.head_dim, False, K.EPI_RESIDUAL),
                             (c.n_heads * c.head_dim, False, K.EPI_STORE), (c.hidden_dim, False, K.EPI_RESIDUAL),
                             (c.hidden_dim, False, K.EPI_STORE)]:
            if k % 8 == 0:
                names.append(K.gemv_name(k, norm, epi))
        if self.fused_attention:
            names.append(K.attention_name(c.head_dim, c.n_rep))
        return sorted(set(names))

    def rows_kernel_names(self, max_rows: int) -> list[str]:
        """The gemv_rows instantiations a batched decode step of up to max_rows tokens launches."""
        c, names = self.config, []
        for rows in sorted({min(max_rows, 8), max_rows}):
            for k, norm, epi in [(c.dim, True, K.EPI_STORE), (c.dim, True, K.EPI_SWIGLU),
                                 (c.n_heads * c.head_dim, False, K.EPI_RESIDUAL), (c.hidden_dim, False, K.EPI_RESIDUAL),
                                 (c.dim, False, K.EPI_STORE), (c.dim, False, K.EPI_SWIGLU),
                                 (c.n_heads * c.head_dim, False, K.EPI_STORE), (c.hidden_dim, False, K.EPI_STORE)]:
                if k % 64 == 0:
                    names.append(K.gemv_rows_name(k, norm, epi, rows))
        return sorted(set(names))

    @staticmethod
    def _rows(x) -> int:
        """B for the decode shape [B, 1, ...] (one token per sequence, B <= 16), fp16,
        contiguous, 16-byte aligned; 0 for any other shape."""
        if (x.ndim >= 3 and x.shape[1] == 1 and 1 <= x.shape[0] <= K.MAX_ROWS and x.dtype == np.float16
                and x.flags.c_contiguous and x.data.ptr % 16 == 0):
            return x.shape[0]
        return 0

    def _take(self):
        p, self.pending = self.pending, None
        return p

    def _keep(self, p):
        if p is not None:
            self.stats["kept"] += 1
            p.keep(self)

    def flush(self):
        """Keep any promise still open (decoder.py calls this at the end of a step)."""
        self._keep(self._take())

    # ---- the operations ------------------------------------------------------------------
    def embedding(self, table, tokens):
        self.flush()
        if (tokens.ndim == 2 and tokens.shape[1] == 1 and tokens.shape[0] <= K.MAX_ROWS and tokens.dtype == np.int64
                and tokens.flags.c_contiguous and table.dtype == np.float16):
            out = self.xp.empty((tokens.shape[0], 1, table.shape[1]), dtype=table.dtype)
            K.embedding(table, tokens, out)
            return out
        return super().embedding(table, tokens)

    def rms_norm(self, x, weight, eps: float):
        self.flush()
        if not self._rows(x):
            if x.dtype == np.float16 and weight.dtype == np.float16 and x.flags.c_contiguous:
                out = self.xp.empty_like(x)  # a prompt: one kernel instead of ~10 CuPy calls
                K.rms_norm_rows(x, weight, eps, out)
                return out
            return super().rms_norm(x, weight, eps)
        out = self.xp.empty_like(x)
        self.pending = _Norm(x, weight, eps, out)
        return out

    def linear(self, x, w):
        p = self._take()
        norm = p if isinstance(p, _Norm) and p.out is x else None
        if norm is None:
            self._keep(p)
        k, b = w.shape[1], self._rows(x)
        fits = k % 8 == 0 and k <= 16384 if b == 1 and not self.batched else K.gemv_rows_fits(w.shape[0], k, b)
        if not (b and fits and w.dtype == np.float16 and w.flags.c_contiguous):
            self._keep(norm)
            return super().linear(x, w)
        out = self.xp.empty((b, 1, w.shape[0]), dtype=np.float16)
        promise = _Linear(x, w, norm, out)
        if norm is not None:
            self.stats["fused"] += 1
        if id(w) in self._deferred:
            self.pending = promise
        else:
            promise.launch(self)
        return out

    def add(self, x, y):
        p = self._take()
        if isinstance(p, _Linear) and p.out is y and self._rows(x) and x.shape == y.shape:
            self.stats["fused"] += 1
            out = self.xp.empty_like(x)
            p.launch(self, K.EPI_RESIDUAL, out=out, residual=x)
            return out
        self._keep(p)
        return super().add(x, y)

    def swiglu(self, gate_up):
        p = self._take()
        if isinstance(p, _Linear) and p.out is gate_up:
            self.stats["fused"] += 1
            out = self.xp.empty(gate_up.shape[:-1] + (gate_up.shape[-1] // 2,), dtype=np.float16)
            p.launch(self, K.EPI_SWIGLU, out=out)
            return out
        self._keep(p)
        if gate_up.dtype == np.float16 and gate_up.flags.c_contiguous:  # a prompt: one launch
            out = self.xp.empty(gate_up.shape[:-1] + (gate_up.shape[-1] // 2,), dtype=np.float16)
            K.swiglu_rows(gate_up, out)
            return out
        return super().swiglu(gate_up)

    def softmax(self, x):
        if x.dtype == np.float32 and x.flags.c_contiguous:  # a prompt's attention: one launch
            K.softmax_rows(x)
            return x
        return super().softmax(x)

    def rope_angles(self, cos, sin, positions, t):
        if self.batched:
            # a captured batched step: the fused attention rotates at each sequence's position,
            # read from device memory (gathering rows here would copy stale host positions)
            return cos, sin
        return super().rope_angles(cos, sin, positions, t)

    def rope(self, qk, cos, sin):
        self.flush()
        if not (self.fused_attention and qk.shape[1] == 1 and 1 <= qk.shape[0] <= K.MAX_ROWS and qk.dtype == np.float16):
            b, t, n, e = qk.shape
            if (qk.dtype == np.float16 and qk.strides[-1] == 2 and qk.strides[-2] == 2 * e
                    and qk.strides[0] == t * qk.strides[1] and cos.dtype == np.float32 and cos.flags.c_contiguous
                    and sin.flags.c_contiguous and cos.shape[-2:] == (t, e // 2) and cos.size in (t * e // 2, b * t * e // 2)):
                out = self.xp.empty(qk.shape, dtype=np.float16)  # a prompt: one launch
                K.rope_rows(qk, cos, sin, out)
                return out
            return super().rope(qk, cos, sin)
        out = self.xp.empty(qk.shape, dtype=qk.dtype)
        self.pending = _Rope(qk, cos, sin, out)
        return out

    def attention(self, q, k, v, cache, layer: int, pos: int, scale: float):
        if self.batched:  # a captured batch of one sequence
            return self.attention_rows(q, k, v, [cache], layer, scale)
        p = self._take()
        c = self.config
        shaped = (self.fused_attention and q.shape[:2] == (1, 1) and q.dtype == np.float16 and cache.k[layer].shape[0] == 1
                  and all(a.strides[-1] == 2 and a.strides[-2] == 2 * c.head_dim for a in (q, k, v)))
        rotate = (shaped and isinstance(p, _Rope) and q.data.ptr == p.out.data.ptr
                  and k.data.ptr == p.out.data.ptr + 2 * c.n_heads * c.head_dim)
        if not rotate:
            self._keep(p)
        if not shaped:
            return super().attention(q, k, v, cache, layer, pos, scale)
        if rotate:  # read q and k before rotation, straight from the QKV output
            self.stats["fused"] += 1
            q_src, k_src = p.qk[:, :, :c.n_heads], p.qk[:, :, c.n_heads:]
        else:
            q_src, k_src = q, k
        if self.host_writes_position:
            self.pos.fill(pos)
        out = self.xp.empty((1, 1, c.n_heads * c.head_dim), dtype=np.float16)
        # The kernel reads the position before waiting for the previous kernel: launched
        # right after the fill above it must not overlap it (no programmatic launch)
        K.decode_attention(q_src, k_src, v, self.cos, self.sin, self.pos, cache.k[layer], cache.v[layer],
                           scale, rotate, self.scratch(cache.capacity), out, c.n_rep,
                           pdl=not self.host_writes_position, slots=self.slot0)
        return out

    def attention_rows(self, q, k, v, caches, layer: int, scale: float):
        """B sequences in one launch when their caches are rows of one batched cache and RoPE
        is pending (q, k rotated inside the kernel, read straight from the QKV output)."""
        p = self._take()
        c, b = self.config, len(caches)
        pool = caches[0].pool
        fused = (self.fused_attention and pool is not None and b <= K.MAX_ROWS and all(x.pool is pool for x in caches)
                 and q.shape[:2] == (b, 1) and q.dtype == np.float16 and isinstance(p, _Rope)
                 and q.data.ptr == p.out.data.ptr and k.data.ptr == p.out.data.ptr + 2 * c.n_heads * c.head_dim
                 and p.qk.strides[0] == v.strides[0] and all(a.strides[-1] == 2 for a in (p.qk, v)))
        if not fused:
            if not self.host_writes_position:
                raise RuntimeError("a captured batched step needs the fused attention (rows of one batched cache)")
            self._keep(p)
            return super().attention_rows(q, k, v, caches, layer, scale)
        self.stats["fused"] += 1
        self.stats["rows_attention"] += 1
        if self.host_writes_position:
            self.positions[:b].set(np.asarray([x.length for x in caches], dtype=np.int32))
            self.slots[:b].set(np.asarray([x.pool_row for x in caches], dtype=np.int32))
        out = self.xp.empty((b, 1, c.n_heads * c.head_dim), dtype=np.float16)
        K.decode_attention(p.qk[:, :, :c.n_heads], p.qk[:, :, c.n_heads:], v, self.cos, self.sin, self.positions,
                           pool.k[layer], pool.v[layer], scale, True, self.scratch(pool.capacity, K.MAX_ROWS), out,
                           c.n_rep, pdl=not self.host_writes_position, slots=self.slots, rows=b,
                           row_stride=p.qk.strides[0] // 2)
        return out

    def scratch(self, capacity: int, rows: int = 1):
        """Attention scratch for a cache capacity and up to `rows` sequences; kept for the life of
        these ops (graphs use it). Allocated from the default memory pool, never from a graph's
        private pool (which is freed with its graph, while the scratch is shared by all graphs)."""
        if (capacity, rows) not in self._scratch:
            c = self.config
            with self.xp.cuda.using_allocator(self.xp.get_default_memory_pool().malloc):
                self._scratch[capacity, rows] = K.attention_scratch(c.n_kv_heads, c.n_rep, c.head_dim, capacity, rows)
        return self._scratch[capacity, rows]
