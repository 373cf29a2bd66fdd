"""Each readable operation against the matching transformers module or a direct formula."""
import numpy as np
import pytest
import torch
from transformers.models.llama import modeling_llama as hf

from tinyllm.config import Config
from tinyllm.kv_cache import KVCache
from tinyllm.model import Ops
from tinyllm.rope import apply_rope, rope_tables

ops = Ops(np)
rng = np.random.default_rng(0)


def rand(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_rms_norm_matches_transformers():
    x, w = rand(2, 5, 64), 1 + 0.1 * rand(64)
    ref_mod = hf.LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ref_mod.weight.copy_(torch.from_numpy(w))
        ref = ref_mod(torch.from_numpy(x)).numpy()
    out = ops.rms_norm(x, w, 1e-5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_rms_norm_float16_input_normalises_in_float32():
    x = (100 * rand(3, 64)).astype(np.float16)  # x^2 overflows float16; float32 statistics must not
    w = np.ones(64, np.float16)
    ref = x.astype(np.float64) / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5)
    out = ops.rms_norm(x, w, 1e-5)
    assert out.dtype == np.float16 and np.isfinite(out).all()
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=2e-3, atol=2e-3)


ROPE_CASES = {
    "default": {},
    "llama3": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}},
    "linear": {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_matches_transformers(case):
    from transformers import LlamaConfig

    hf_cfg = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=512, **ROPE_CASES[case])
    cfg = Config.from_hf_dict(hf_cfg.to_dict())
    t, pos = 7, 300  # positions 300..306: far enough out that scaled frequencies matter
    q, k = rand(1, t, 4, 32), rand(1, t, 2, 32)
    rot = hf.LlamaRotaryEmbedding(hf_cfg)
    positions = torch.arange(pos, pos + t)[None]
    with torch.no_grad():
        cos, sin = rot(torch.from_numpy(q), positions)
        ref_q, ref_k = hf.apply_rotary_pos_emb(torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2), cos, sin)
    tcos, tsin = rope_tables(cfg, 512)
    np.testing.assert_allclose(apply_rope(q, tcos[pos:pos + t], tsin[pos:pos + t]), ref_q.transpose(1, 2).numpy(), atol=2e-4)
    np.testing.assert_allclose(apply_rope(k, tcos[pos:pos + t], tsin[pos:pos + t]), ref_k.transpose(1, 2).numpy(), atol=2e-4)


def test_rope_is_a_rotation_by_position_difference():
    """q·k after RoPE depends only on the distance between the two positions (a direct property)."""
    cfg = Config(dim=64, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=8, vocab_size=4)
    cos, sin = rope_tables(cfg, 64)
    q, k = rand(1, 1, 1, 32), rand(1, 1, 1, 32)
    dots = [float((apply_rope(q, cos[a:a + 1], sin[a:a + 1]) * apply_rope(k, cos[a - 5:a - 4], sin[a - 5:a - 4])).sum())
            for a in (5, 17, 40)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)


def reference_attention(q, k, v, pos_q0):
    """Direct formula in float64: K/V repeated per query head, causal by absolute position."""
    b, t, h, e = q.shape
    s, n_kv = k.shape[1], k.shape[2]
    rep = h // n_kv
    kk, vv = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)  # [B, S, H, E]
    scores = np.einsum("bthe,bshe->bhts", q.astype(np.float64), kk.astype(np.float64)) / np.sqrt(e)
    qpos = pos_q0 + np.arange(t)[:, None]
    scores = np.where(np.arange(s)[None, :] <= qpos, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshe->bthe", p, vv.astype(np.float64)).reshape(b, t, h * e)


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (6, 1)])
def test_attention_prefill_then_decode_matches_formula(n_heads, n_kv):
    cfg = Config(dim=16 * n_heads, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv, hidden_dim=8, vocab_size=4)
    cache = KVCache(cfg, 32, np.float32, np)
    e = cfg.head_dim
    q, k, v = rand(1, 20, n_heads, e), rand(1, 20, n_kv, e), rand(1, 20, n_kv, e)
    scale = 1.0 / np.sqrt(e).item()
    # prefill 13 tokens, then decode 1, then a block of 6 on top of the cache
    outs, pos = [], 0
    for t in (13, 1, 6):
        outs.append(ops.attention(q[:, pos:pos + t], k[:, pos:pos + t], v[:, pos:pos + t], cache, 0, pos, scale))
        pos += t
    out = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(out, reference_attention(q, k, v, 0), atol=1e-5)
    assert out.dtype == np.float32


def test_mlp_matches_transformers():
    from transformers import LlamaConfig

    hf_cfg = LlamaConfig(hidden_size=32, intermediate_size=48)
    mlp = hf.LlamaMLP(hf_cfg)
    x = rand(2, 3, 32)
    gate_up = np.concatenate([mlp.gate_proj.weight.detach().numpy(), mlp.up_proj.weight.detach().numpy()])
    down = mlp.down_proj.weight.detach().numpy()
    out = ops.linear(ops.swiglu(ops.linear(x, gate_up)), down)
    with torch.no_grad():
        ref = mlp(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_kv_cache_dtype_capacity_and_nbytes():
    from tinyllm.errors import ContextOverflowError

    cfg = Config(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=8, vocab_size=4)
    cache = KVCache(cfg, 10, np.float16, np)
    assert cache.k[0].dtype == np.float16
    assert cache.nbytes == 2 * 3 * 2 * 10 * 16 * 2  # K and V, layers, KV heads, positions, head_dim, bytes
    cache.advance(8)
    with pytest.raises(ContextOverflowError, match="capacity 10"):
        cache.check_room(3)
    assert cache.mask(1) is None
    m = cache.mask(3)
    assert (m == np.array([[0, -np.inf, -np.inf], [0, 0, -np.inf], [0, 0, 0]], np.float32)).all()


def test_bf16_decoding_matches_torch(tmp_path):
    from safetensors.torch import save_file

    from tinyllm.loaders.safetensors import read_safetensors

    t = torch.randn(5, 7, dtype=torch.bfloat16)
    save_file({"w": t, "h": t.half()}, str(tmp_path / "x.safetensors"))
    got = read_safetensors(tmp_path / "x.safetensors")
    assert got["w"].dtype == np.float32
    np.testing.assert_array_equal(got["w"], t.float().numpy())
    np.testing.assert_array_equal(got["h"], t.half().numpy())


@pytest.mark.parametrize("n_kv, n_rep, head_dim", [(4, 8, 64), (3, 3, 64), (8, 4, 128), (2, 1, 64), (8, 16, 128)])
def test_attention_scratch_holds_every_block_of_any_heads_per_block(n_kv, n_rep, head_dim):
    """The GPU attention's scratch (tinyllm/cuda/kernels.py) against the kernel's own indexing
    (kernels.cu decode_attention): block group gi = (seq * n_kv + j) * groups + z of
    groups = n_rep / R writes partials at ((gi * chunks + c) * R + r) * E + e and (..) * 2 + 1,
    and counts arrivals at counters[gi]. One scratch must hold the largest index for every R
    the batched step may launch (one sequence's count and the batch's, rows_heads)."""
    from tinyllm.cuda import kernels as K

    capacity, rows = 1000, 5
    chunks = -(-capacity // K.attention_chunk(head_dim))
    o, ml, counters = K.attention_scratch_sizes(n_kv, n_rep, head_dim, capacity, rows)
    used = {K.heads_per_block(n_rep), K.rows_heads(n_rep, head_dim, K.MAX_ROWS)}
    assert all(n_rep % r == 0 and K.attention_shared(head_dim, r) <= K.ATTENTION_SMEM for r in used)
    for r in used | {1}:
        groups = n_rep // r
        gi = ((rows - 1) * n_kv + n_kv - 1) * groups + groups - 1  # the last block group
        assert gi < counters
        assert ((gi * chunks + chunks - 1) * r + r - 1) * head_dim + head_dim - 1 < o
        assert ((gi * chunks + chunks - 1) * r + r - 1) * 2 + 1 < ml


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1", "q4_k", "q6_k"])
def test_quantized_gemv_launches_fit_in_shared_memory(kind):
    """Every launch the quantized GEMV makes (tinyllm/cuda/kernels.py gemv_q: q_tokens tokens
    at a time, on q_kernel's kernel) asks for no more dynamic shared memory than a block may
    take, for the row lengths of real models and every epilogue, and takes as many tokens as
    fit; gemv_qs only gets rows its stages tile. The layout constants are read from quant.cu,
    whose kernels index by them."""
    import re
    from pathlib import Path

    from tinyllm.cuda import kernels as K

    source = (Path(K.__file__).with_name("quant.cu")).read_text()
    consts = dict(re.findall(r"(QS_WARPS|QS_STAGES|QS_ROW|QS_XPAD) = (\d+)", source))
    assert {k: int(v) for k, v in consts.items()} == dict(QS_WARPS=K.QS_WARPS, QS_STAGES=K.QS_STAGES,
                                                          QS_ROW=K.QS_ROW, QS_XPAD=K.QS_XPAD)
    block = 256 if kind in ("q4_k", "q6_k") else 32
    for k in (576, 960, 1536, 2048, 3072, 4096, 5632, 8192, 11008, 14336, 28672):
        if k % block:
            continue
        name = K.q_kernel(kind, k)
        assert name == "gemv_q" or k % 256 == 0
        for epi in (K.EPI_STORE, K.EPI_RESIDUAL, K.EPI_SWIGLU):
            tokens = K.q_tokens(kind, k, epi)
            assert 1 <= tokens <= K.Q_TOKENS
            for b in range(1, tokens + 1):
                assert K.q_shared(kind, k, b, epi) <= K.ROWS_SMEM, (kind, k, epi, b)
            # and as many as fit: one more token would not
            assert tokens == K.Q_TOKENS or K.q_shared(kind, k, tokens + 1, epi) > K.ROWS_SMEM, (kind, k, epi)
