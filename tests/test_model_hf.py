"""Whole tiny models: tinyllm's logits against transformers for the prompt and every decode step,
loaded from safetensors (single, sharded, bf16) and from GGUF (F32, F16, Q8_0, Q4_1, and Q4_K/Q6_K made by llama.cpp)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import hf_logits, hf_model_with, load_tiny, make_hf_model, write_gguf

import gguf

PROMPT = [1, 17, 99, 5, 42, 42, 8, 120, 3, 64, 77]
STEPS = [11, 25, 7, 90, 2, 33]

VARIANTS = {
    "gqa_untied": {},
    "tied": {"tie_word_embeddings": True},
    "llama3_scaling": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 16}},
    "mha_linear_scaling": {"num_key_value_heads": 4, "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
}


def load_model(path, dtype="float32"):
    return load_tiny(path, np.float32 if dtype == "float32" else np.float16)


def check_against(model, ref_model, atol):
    """Prefill PROMPT, then decode STEPS one by one; every logit row against a full HF forward."""
    ref = hf_logits(ref_model, PROMPT + STEPS)  # [T, V]
    cache = model.new_cache(64)
    got = [model.forward(np.array([PROMPT]), cache, last_only=False)[0]]
    for tok in STEPS:
        got.append(model.forward(np.array([[tok]]), cache)[0])
    got = np.concatenate(got)
    assert got.dtype == np.float32
    err = np.abs(got - ref).max()
    assert err < atol, f"max abs diff {err:.3g} >= {atol}"
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    return err


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_safetensors_matches_transformers(tmp_path, variant):
    hf_model = make_hf_model(**VARIANTS[variant])
    hf_model.save_pretrained(tmp_path)
    check_against(load_model(tmp_path), hf_model, atol=1e-4)


def test_sharded_checkpoint(tmp_path):
    hf_model = make_hf_model(seed=1)
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    check_against(load_model(tmp_path), hf_model, atol=1e-4)


def test_bf16_checkpoint_matches_transformers_bf16_weights(tmp_path):
    hf_model = make_hf_model(seed=2)
    bf16 = {k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items() if "rotary" not in k}
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path)
    # the same bf16-rounded weights in a float32 model (whose RoPE buffer stayed float32)
    ref = hf_model_with(make_hf_model(seed=2), {k: v.float().numpy() for k, v in bf16.items()})
    check_against(load_model(tmp_path), ref, atol=1e-4)


def test_single_safetensors_file(tmp_path):
    hf_model = make_hf_model(seed=3)
    hf_model.save_pretrained(tmp_path)
    check_against(load_model(tmp_path / "model.safetensors"), hf_model, atol=1e-4)


Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize("variant", ["gqa_untied", "tied"])
def test_gguf_matches_transformers(tmp_path, qtype, variant):
    """The reference model carries exactly the weights the gguf package dequantizes from the file."""
    hf_model = make_hf_model(seed=4, **VARIANTS[variant])
    recovered = write_gguf(hf_model, tmp_path / "m.gguf", qtype)
    check_against(load_model(tmp_path / "m.gguf"), hf_model_with(hf_model, recovered), atol=1e-4)


def test_kquant_gguf_matches_transformers():
    """K-quants (Q4_K and Q6_K, llama.cpp's Q4_K_M recipe; tests/data/make_tiny_kquant.py made
    the file with llama.cpp's quantizer): tinyllm against transformers reading the same file
    with its own GGUF loader."""
    path = Path(__file__).parent / "data" / "tiny-q4_k_m.gguf"
    types = {t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert {Q.Q4_K, Q.Q6_K} <= types
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    check_against(load_model(path), ref, atol=1e-4)


def test_gguf_f32_equals_original_weights(tmp_path):
    """Unquantized GGUF: the Q/K permutation undone gives back the original model exactly."""
    hf_model = make_hf_model(seed=5)
    write_gguf(hf_model, tmp_path / "m.gguf")
    check_against(load_model(tmp_path / "m.gguf"), hf_model, atol=1e-4)


def test_gguf_rope_freqs_tensor_is_llama3_scaling(tmp_path):
    """Llama 3 GGUFs carry rope scaling as a 'rope_freqs' tensor of per-frequency divisors."""
    scaling = VARIANTS["llama3_scaling"]["rope_parameters"]
    hf_model = make_hf_model(seed=6, **VARIANTS["llama3_scaling"])
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_model.config, "cpu")
    plain = 1.0 / (scaling["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))
    factors = (plain / scaled).numpy().astype(np.float32)

    # the model with the plain theta, and the scaling as a rope_freqs tensor
    path = tmp_path / "m.gguf"
    recovered = write_gguf(hf_model, path, extra_tensors={"rope_freqs.weight": (factors, None)})
    check_against(load_model(path), hf_model_with(hf_model, recovered), atol=1e-4)


def test_cached_decode_equals_full_forward(tmp_path):
    """Token by token with the cache gives the logits of one uncached pass over all tokens."""
    hf_model = make_hf_model(seed=7)
    hf_model.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = PROMPT + STEPS
    full = model.forward(np.array([ids]), model.new_cache(64), last_only=False)[0]
    cache = model.new_cache(64)
    stepwise = np.concatenate([model.forward(np.array([[t]]), cache)[0] for t in ids])
    np.testing.assert_allclose(stepwise, full, atol=1e-5)


def test_long_prompt_is_prefilled_in_chunks(tmp_path, monkeypatch):
    """Prompts longer than the mask block run in chunks and still match transformers."""
    import tinyllm.kv_cache as kvc
    import tinyllm.model as model_mod

    monkeypatch.setattr(model_mod, "PREFILL_CHUNK", 8)
    monkeypatch.setattr(kvc, "PREFILL_CHUNK", 8)
    hf_model = make_hf_model(seed=8)
    hf_model.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = (PROMPT + STEPS) * 2  # 34 tokens: 5 chunks of 8
    got = model.forward(np.array([ids]), model.new_cache(64), last_only=False)[0]
    np.testing.assert_allclose(got, hf_logits(hf_model, ids), atol=1e-4)


def test_activations_and_cache_stay_float32(tmp_path):
    """NumPy 2 keeps float64 scalars: one stray np.float64 would silently upcast the whole pass."""
    hf_model = make_hf_model(seed=9)
    hf_model.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    seen = []
    orig = model.ops.linear

    def spy(x, w):
        seen.append(x.dtype)
        return orig(x, w)

    model.ops.linear = spy
    cache = model.new_cache(32)
    model.forward(np.array([PROMPT]), cache)
    model.forward(np.array([[5]]), cache)
    assert set(seen) == {np.dtype(np.float32)}
    assert all(k.dtype == np.float32 for k in cache.k + cache.v)


def test_float16_on_cpu_close_to_float32(tmp_path):
    hf_model = make_hf_model(seed=10)
    hf_model.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="float16")
    assert model.new_cache(8).k[0].dtype == np.float16
    check_against(model, hf_model, atol=0.05)


@pytest.mark.parametrize("layout", ["own caches", "rows of one cache"])
def test_decode_batch_matches_each_sequence_alone(tmp_path, layout):
    """Three sequences at different positions decoded in one batched step: each row's logits
    equal transformers' logits for that sequence alone. Either each has its own cache, or
    each is a row (out of order, one left unused) of one preallocated batched cache."""
    hf_model = make_hf_model(seed=11)
    hf_model.save_pretrained(tmp_path)
    model = load_tiny(tmp_path)
    prompts = [PROMPT, PROMPT[:4], STEPS + PROMPT[:2]]
    if layout == "own caches":
        caches = [model.new_cache(32) for _ in prompts]
    else:
        pool = model.new_cache(32, batch=4)
        caches = [pool.row(i) for i in (2, 0, 3)]
    first = [int(model.forward(np.array([p]), c)[0, -1].argmax()) for p, c in zip(prompts, caches)]
    seqs = [p + [f] for p, f in zip(prompts, first)]
    tokens = first
    for _ in range(3):
        logits = model.decode_batch(tokens, caches)  # [B, V]
        assert logits.shape == (3, 128) and logits.dtype == np.float32
        for row, seq in zip(logits, seqs):
            np.testing.assert_allclose(row, hf_logits(hf_model, seq)[-1], atol=1e-4)
        tokens = [int(r.argmax()) for r in logits]
        seqs = [s + [t] for s, t in zip(seqs, tokens)]
    assert [c.length for c in caches] == [len(s) - 1 for s in seqs]
    if layout != "own caches":
        assert not pool.k[0][1].any() and pool.k[0][2].any()  # row 1 untouched; the rows hold the sequences
