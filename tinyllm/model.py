"""The Llama network: the one definition of the forward pass.

    tokens ─► embedding ─► L x [ x + attention(rms_norm(x)) ; x + mlp(rms_norm(x)) ] ─► rms_norm ─► LM head ─► logits

Prefill (T prompt tokens) and decode (T = 1) run through the same `forward`; the KV
cache is what makes decode cheap. Shapes use the letters defined in config.py.

The arithmetic lives in `Ops`, a small set of named operations (`rms_norm`, `linear`,
`rope`, `attention`, `swiglu`, ...). Where a fast path runs several of them as one kernel,
the model calls that group by a name of its own, whose readable default is the one line
that chains the plain operations:

    norm_linear(x, g, eps, w)      = linear(rms_norm(x, g, eps), w)
    norm_swiglu(x, g, eps, w)      = swiglu(linear(rms_norm(x, g, eps), w))
    linear_residual(x, w, r)       = add(r, linear(x, w))
    rope_attention(qkv, ...)       = attention(rope(q), rope(k), v, ...)

so the forward pass shows where fusion happens. A fast path (tinyllm/cuda) subclasses Ops
and overrides exactly those names; the model itself is never forked, so these readable
operations stay the reference every fast kernel is tested against.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np

from .backend import Device, get_device
from .config import Config
from .kv_cache import PREFILL_CHUNK, KVCache
from .quant import QuantizedMatrix
from .rope import INITIAL_POSITIONS, RopeTables, apply_rope

DEFAULT_CONTEXT = INITIAL_POSITIONS  # positions of a cache made without a capacity


@dataclass
class LayerWeights:
    attn_norm: object  # [D]
    wqkv: object       # [(H + 2K) * E, D]  q, k and v projections stacked: one matmul instead of three
    wo: object         # [D, H * E]
    mlp_norm: object   # [D]
    w_gate_up: object  # [2F, D]  gate and up projections stacked
    w_down: object     # [D, F]


@dataclass
class Weights:
    """All parameters, linear layers stored (out, in) as in the checkpoints: arrays, or
    QuantizedMatrix objects where a GGUF's blocks are kept (tinyllm/quant.py)."""

    tok_embeddings: object  # [V, D]
    layers: list[LayerWeights]
    norm: object            # [D]
    output: object          # [V, D]; the same array as tok_embeddings when tied (kept quantized: its blocks)
    rope_freq_factors: object = None  # [E/2] from GGUF 'rope_freqs', or None

    def arrays(self):
        yield self.tok_embeddings
        yield self.norm
        if self.output is not self.tok_embeddings:
            yield self.output
        for layer in self.layers:
            yield from vars(layer).values()

    @property
    def nbytes(self) -> int:
        """Bytes on the device; a QuantizedMatrix counts its planes."""
        return sum(a.nbytes for a in self.arrays())


class Ops:
    """The readable operations, written once for NumPy and CuPy (`self.xp`)."""

    def __init__(self, xp):
        self.xp = xp

    def embedding(self, table, tokens):
        return table[tokens]  # [B, T] -> [B, T, D]

    def rms_norm(self, x, weight, eps: float):
        """x / sqrt(mean(x^2) + eps) * weight, computed in float32 whatever x is."""
        xf = x.astype(self.xp.float32, copy=False)
        mean_sq = (xf * xf).sum(axis=-1, keepdims=True) * (1.0 / x.shape[-1])  # [B, T, 1]
        return (xf * (1.0 / self.xp.sqrt(mean_sq + eps))).astype(x.dtype, copy=False) * weight

    def linear(self, x, w):
        """x @ w.T for w stored (out, in).  [..., in] -> [..., out]"""
        if isinstance(w, QuantizedMatrix):  # the readable path expands a block-quantized matrix right before it multiplies
            w = w.dequantize()
        lead = x.shape[:-1]
        return (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*lead, w.shape[0])

    def rope_angles(self, cos, sin, positions: list[int], t: int):
        """The rows of the RoPE tables that T new tokens of each sequence need: [T, E/2] for one
        sequence (a slice), [B, T, E/2] for B sequences at their own positions (a gather)."""
        if len(positions) == 1:
            return cos[positions[0]:positions[0] + t], sin[positions[0]:positions[0] + t]
        rows = self.xp.asarray(positions)[:, None] + self.xp.arange(t)  # [B, T]
        return cos[rows], sin[rows]

    def rope(self, qk, cos, sin):
        return apply_rope(qk, cos, sin)  # [B, T, H + K, E]

    def attention(self, q, k, v, cache: KVCache, layer: int, pos: int, scale: float):
        """Causal grouped-query attention over the cache.  q: [B, T, H, E]; k, v: [B, T, K, E] -> [B, T, H*E]

        GQA by reshape: the R query heads that share a KV head are stacked along the
        query axis, so each KV head is read once and never copied R times."""
        b, t, h, e = q.shape
        n_kv = k.shape[2]
        keys, values = cache.update(layer, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), pos)  # [B, K, S, E]
        q = q.transpose(0, 2, 1, 3).reshape(b, n_kv, (h // n_kv) * t, e)  # [B, T, H, E] -> [B, K, R*T, E]
        # scale q, not the scores: S/E times fewer multiplications for a long block. (The cast
        # keeps q's type: CuPy lifts a bfloat16 array times a Python float to float32.)
        q = (q * scale).astype(q.dtype, copy=False)
        scores = self.matmul(q, keys.transpose(0, 1, 3, 2))  # [B, K, R*T, S]
        probs = self.attention_weights(scores, cache.mask(t), pos, values.dtype)
        out = self.matmul(probs, values)  # [B, K, R*T, S] @ [B, K, S, E] -> [B, K, R*T, E]
        return out.reshape(b, h, t, e).transpose(0, 2, 1, 3).reshape(b, t, h * e)

    def attention_weights(self, scores, mask, pos: int, dtype):
        """The scores [B, K, R*T, S] (rows: R query heads x T new tokens) -> each row's softmax
        over the keys it may see, in float32, as `dtype`. mask: the causal mask of the T new
        tokens [T, T] (None for one token, which sees every key): only the last T columns,
        this block's own tokens from position `pos` on, need masking."""
        scores = scores.astype(self.xp.float32, copy=False)
        if mask is not None:
            b, n_kv, rows, s = scores.shape
            t = mask.shape[0]
            scores.reshape(b, n_kv, rows // t, t, s)[..., pos:] += mask
        return self.softmax(scores).astype(dtype, copy=False)

    def matmul(self, a, b):
        """a @ b, batched over the leading axes. CuPy multiplies 2-D bfloat16 arrays but not
        batched ones: those go through float32, the product rounded back to bfloat16 as a
        bfloat16 matmul rounds its float32 sums."""
        if a.ndim > 2 and a.dtype.name == "bfloat16" and self.xp is not np:
            return (a.astype(np.float32) @ b.astype(np.float32)).astype(a.dtype)
        return a @ b

    def attention_rows(self, q, k, v, caches: list[KVCache], layer: int, scale: float):
        """Attention of B sequences, row b over caches[b] at its own position (continuous
        batching). Here one `attention` call per row; a fast path may do all rows at once."""
        rows = [self.attention(q[r:r + 1], k[r:r + 1], v[r:r + 1], cache, layer, cache.length, scale)
                for r, cache in enumerate(caches)]
        return self.xp.concatenate(rows, axis=0)  # [B, 1, H*E]

    def softmax(self, x):
        """Softmax over the last axis, in place: x is the attention's own fresh scores, and a
        512-token block's scores are ~10 MB that three temporary copies would each pass over."""
        x -= x.max(axis=-1, keepdims=True)
        self.xp.exp(x, out=x)
        x /= x.sum(axis=-1, keepdims=True)
        return x

    def swiglu(self, gate_up):
        """silu(gate) * up.  [..., 2F] -> [..., F]"""
        f = gate_up.shape[-1] // 2
        gate, up = gate_up[..., :f], gate_up[..., f:]
        silu = (gate / (1.0 + self.xp.exp(-gate))).astype(gate.dtype, copy=False)  # (bfloat16 on CuPy: see attention)
        return silu * up

    def add(self, x, y):
        return x + y

    # ---- fusions: named groups of the operations above (a fast path overrides these) ----------
    def norm_linear(self, x, norm_weight, eps: float, w):
        return self.linear(self.rms_norm(x, norm_weight, eps), w)

    def norm_swiglu(self, x, norm_weight, eps: float, w_gate_up):
        return self.swiglu(self.linear(self.rms_norm(x, norm_weight, eps), w_gate_up))

    def linear_residual(self, x, w, residual):
        return self.add(residual, self.linear(x, w))

    def rope_attention(self, qkv, n_heads: int, cos, sin, caches: list[KVCache], layer: int, scale: float):
        """Rotate q and k, then attend, each sequence over its own cache.
        qkv: [B, T, H + 2K, E] -> [B, T, H*E]"""
        n_kv = (qkv.shape[2] - n_heads) // 2
        qk = self.rope(qkv[:, :, :n_heads + n_kv], cos, sin)  # q and k sit side by side: rotate both at once
        q, k, v = qk[:, :, :n_heads], qk[:, :, n_heads:], qkv[:, :, n_heads + n_kv:]
        if len(caches) == 1:
            return self.attention(q, k, v, caches[0], layer, caches[0].length, scale)
        return self.attention_rows(q, k, v, caches, layer, scale)


class Model:
    """A Llama model on one device: config, weights, RoPE tables and the forward pass."""

    def __init__(self, config: Config, weights: Weights, device: Device | str = "cpu", ops: Ops | None = None):
        self.config = config
        self.weights = weights
        self.device = get_device(device)
        self.xp = self.device.xp
        self.dtype = weights.tok_embeddings.dtype
        self.ops = ops or Ops(self.xp)
        self.scale = 1.0 / math.sqrt(config.head_dim)  # a Python float: a NumPy scalar would upcast to float64
        # RoPE tables, built once and grown only when a cache holds more positions.  [S, E/2] each
        factors = weights.rope_freq_factors
        self.rope = RopeTables(config, self.xp, None if factors is None else np.asarray(factors))

    @property
    def cos(self):
        return self.rope.cos

    @property
    def sin(self):
        return self.rope.sin

    def with_ops(self, ops: Ops) -> "Model":
        """The same model (weights, tables) computing with other operations: how a fast path
        is injected without touching the model others hold."""
        twin = copy.copy(self)
        twin.ops = ops
        return twin

    def new_cache(self, capacity: int | None = None, batch: int = 1) -> KVCache:
        """A cache of `capacity` positions (default: the model's context, at most DEFAULT_CONTEXT,
        so that a checkpoint's huge context length is not allocated unasked)."""
        capacity = min(capacity or DEFAULT_CONTEXT, self.config.max_seq_len)
        self.rope.ensure(capacity)
        return KVCache(self.config, capacity, self.dtype, self.xp, batch)

    def forward(self, tokens, cache: KVCache, last_only: bool = True):
        """Run T new tokens ([B, T] ints) through the model, appending to the cache.

        Returns float32 logits [B, 1, V] for the last position (`last_only`) or [B, T, V].
        Long prompts are prefilled in blocks of PREFILL_CHUNK tokens, which bounds the
        attention scores' memory and keeps one cached causal mask."""
        tokens = self.xp.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None, :]
        t = tokens.shape[1]
        cache.check_room(t)
        if t > PREFILL_CHUNK:
            chunks = [self.forward(tokens[:, i:i + PREFILL_CHUNK], cache, last_only)
                      for i in range(0, t, PREFILL_CHUNK)]
            return chunks[-1] if last_only else self.xp.concatenate(chunks, axis=1)
        logits = self.forward_block(tokens, [cache], last_only)
        cache.advance(t)
        return logits

    def decode_batch(self, tokens, caches: list[KVCache]):
        """One decode step for B independent sequences, each with its own cache and position
        (continuous batching: sequences join and leave between steps). The matrices are read
        once for all B tokens; attention runs per sequence over its own cache.
        tokens: B ints -> float32 logits [B, V]"""
        for cache in caches:
            cache.check_room(1)
        tokens = self.xp.asarray(tokens).reshape(len(caches), 1)  # [B, 1]
        logits = self.forward_block(tokens, caches, last_only=True)
        for cache in caches:
            cache.advance(1)
        return logits[:, 0]

    def forward_block(self, tokens, caches: list[KVCache], last_only: bool):
        """tokens [B, T]; row b continues the sequence held in caches[b] at its own position."""
        c, w, ops = self.config, self.weights, self.ops
        b, t = tokens.shape
        cos, sin = ops.rope_angles(self.cos, self.sin, [cache.length for cache in caches], t)  # [(B,) T, E/2]
        x = ops.embedding(w.tok_embeddings, tokens)  # [B, T, D]
        for i, layer in enumerate(w.layers):
            # attention
            qkv = ops.norm_linear(x, layer.attn_norm, c.norm_eps, layer.wqkv)  # [B, T, (H+2K)*E]
            qkv = qkv.reshape(b, t, c.n_heads + 2 * c.n_kv_heads, c.head_dim)  # [B, T, H+2K, E]
            attn = ops.rope_attention(qkv, c.n_heads, cos, sin, caches, i, self.scale)  # [B, T, H*E]
            x = ops.linear_residual(attn, layer.wo, x)
            # MLP
            h = ops.norm_swiglu(x, layer.mlp_norm, c.norm_eps, layer.w_gate_up)  # [B, T, F]
            x = ops.linear_residual(h, layer.w_down, x)
        if last_only:
            x = x[:, -1:]  # only the positions asked for are projected to the vocabulary
        return ops.norm_linear(x, w.norm, c.norm_eps, w.output).astype(self.xp.float32)  # [B, T, V]
