"""Random-weight models of real shapes, for the GPU tests and benchmarks.

Speed depends on shapes, not on values, so the GPU benchmarks use random fp16 weights
of TinyLlama-1.1B's and SmolLM2-135M's shapes (SHAPES, what the scripts run by default)
and, when named, of Llama 3's (LLAMA3_SHAPES: 1B, 3B and 8B, the big models that sit at
the bandwidth limit). No checkpoint travels to the GPU machine. The weights are drawn on the
device with CuPy, scaled so that activations stay O(1) through the layers and the logits
are spread out (greedy comparisons need clear winners), and can be copied into a
`transformers` LlamaForCausalLM for reference.
"""
from __future__ import annotations

import numpy as np

from tinyllm.config import Config
from tinyllm.model import LayerWeights, Model, Weights

SHAPES = {
    "tinyllama-1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, vocab_size=32000,
                           rope_theta=10000.0, norm_eps=1e-5, max_seq_len=2048, tie_embeddings=False),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152,
                         rope_theta=100000.0, norm_eps=1e-5, max_seq_len=8192, tie_embeddings=True),
}
# Run only when asked for by name, so that a script looping over SHAPES keeps its cost.
# Llama 3.2's checkpoint also scales its RoPE frequencies (rope_type llama3, factor 32):
# that changes the table's values, never the work of a step, so random weights leave it out.
LLAMA3_SHAPES = {
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, vocab_size=128256,
                         rope_theta=500000.0, norm_eps=1e-5, max_seq_len=131072, tie_embeddings=True),
    "llama-3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192, vocab_size=128256,
                         rope_theta=500000.0, norm_eps=1e-5, max_seq_len=131072, tie_embeddings=True),
    "llama-3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=128256,
                       rope_theta=500000.0, norm_eps=1e-5, max_seq_len=8192, tie_embeddings=False),
}
ALL_SHAPES = {**SHAPES, **LLAMA3_SHAPES}


def shape_config(name: str, **overrides) -> Config:
    if name not in ALL_SHAPES:
        raise ValueError(f"unknown shape {name!r}; expected one of {', '.join(ALL_SHAPES)}")
    return Config(**{**ALL_SHAPES[name], **overrides, "source": name})


def prompt_ids(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """n random token ids, [1, n]: every engine of a benchmark is given the same prompt."""
    return np.random.default_rng(seed).integers(0, vocab, n)[None, :]


def random_weights(c: Config, xp, dtype=np.float16, seed: int = 0) -> Weights:
    """Random weights on the array module xp (cupy: drawn on the GPU).

    Each matrix is drawn in float32 and converted before the next is drawn, so the
    temporaries are a few copies of the largest matrix (an 8B model's 2 GB LM head),
    never a float32 copy of the whole model."""
    rng = xp.random.default_rng(seed) if hasattr(xp.random, "default_rng") else xp.random.RandomState(seed)

    def normal(shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)

    def norm_weight():
        return (1.0 + 0.1 * rng.standard_normal((c.dim,), dtype=np.float32)).astype(dtype)

    e, d, f = c.head_dim, c.dim, c.hidden_dim
    layers = []
    for _ in range(c.n_layers):
        layers.append(LayerWeights(
            attn_norm=norm_weight(),
            wqkv=normal(((c.n_heads + 2 * c.n_kv_heads) * e, d), 1.0 / np.sqrt(d)),
            wo=normal((d, c.n_heads * e), 0.5 / np.sqrt(c.n_heads * e)),
            mlp_norm=norm_weight(),
            w_gate_up=normal((2 * f, d), 1.0 / np.sqrt(d)),
            w_down=normal((d, f), 0.5 / np.sqrt(f)),
        ))
    # logits with a spread of a few units: clear winners, and well inside fp16's precision
    head_std = 3.0 / np.sqrt(d)
    embed = normal((c.vocab_size, d), head_std if c.tie_embeddings else 1.0)
    output = embed if c.tie_embeddings else normal((c.vocab_size, d), head_std)
    return Weights(tok_embeddings=embed, layers=layers, norm=norm_weight(), output=output)


def random_model(name: str, device: str = "cuda", seed: int = 0, dtype=None, **overrides) -> Model:
    """A model of a named shape with random weights; dtype: float16 on a GPU, float32 on the
    CPU unless given (e.g. tinyllm.engine.bfloat16())."""
    from tinyllm.backend import get_device

    c = shape_config(name, **overrides)
    dev = get_device(device)
    dtype = dtype or (np.float16 if dev.is_cuda else np.float32)
    return Model(c, random_weights(c, dev.xp, dtype, seed), dev)


def host_copy(weights: Weights, dtype=np.float32) -> Weights:
    """The same weights as NumPy arrays (for the NumPy reference model)."""
    def h(a):
        return np.asarray(a.get() if hasattr(a, "get") else a, dtype=dtype)

    embed = h(weights.tok_embeddings)
    tied = weights.output is weights.tok_embeddings
    return Weights(
        tok_embeddings=embed,
        layers=[LayerWeights(**{k: h(v) for k, v in vars(layer).items()}) for layer in weights.layers],
        norm=h(weights.norm),
        output=embed if tied else h(weights.output),
    )


def as_torch(a):
    """A torch tensor sharing the memory of a CuPy (DLPack) or NumPy array; bfloat16 (an
    ml_dtypes type, which DLPack and torch.from_numpy may not carry) travels as its bits."""
    import torch

    if np.dtype(a.dtype).name == "bfloat16":
        return as_torch(a.view(np.int16)).view(torch.bfloat16)
    if hasattr(a, "__dlpack__") and not isinstance(a, np.ndarray):
        return torch.from_dlpack(a)
    return torch.from_numpy(np.asarray(a))


def to_transformers(model: Model, torch_device: str = "cuda", dtype=None):
    """A LlamaForCausalLM holding the same weights (q/k/v and gate/up split back apart)."""
    import torch
    import transformers

    c = model.config
    dtype = dtype or torch.float16
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False)
    with torch.device(torch_device):  # random init on the GPU: seconds, not minutes
        hf = transformers.LlamaForCausalLM(cfg)
    rotary = hf.model.rotary_emb
    inv_freq = rotary.inv_freq.clone()  # fp32; .to(fp16) below would round it
    hf = hf.to(dtype)
    rotary.inv_freq = inv_freq
    if hasattr(rotary, "original_inv_freq"):
        rotary.original_inv_freq = inv_freq

    t = as_torch
    w = model.weights
    q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(t(w.tok_embeddings))
        hf.model.norm.weight.copy_(t(w.norm))
        if not c.tie_embeddings:
            hf.lm_head.weight.copy_(t(w.output))
        for layer, mine in zip(hf.model.layers, w.layers):
            qkv = t(mine.wqkv)
            layer.self_attn.q_proj.weight.copy_(qkv[:q_rows])
            layer.self_attn.k_proj.weight.copy_(qkv[q_rows:q_rows + kv_rows])
            layer.self_attn.v_proj.weight.copy_(qkv[q_rows + kv_rows:])
            layer.self_attn.o_proj.weight.copy_(t(mine.wo))
            gu = t(mine.w_gate_up)
            layer.mlp.gate_proj.weight.copy_(gu[:c.hidden_dim])
            layer.mlp.up_proj.weight.copy_(gu[c.hidden_dim:])
            layer.mlp.down_proj.weight.copy_(t(mine.w_down))
            layer.input_layernorm.weight.copy_(t(mine.attn_norm))
            layer.post_attention_layernorm.weight.copy_(t(mine.mlp_norm))
    return hf.eval()
