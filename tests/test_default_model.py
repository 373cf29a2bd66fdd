"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the same file."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, a baker had a",
]


def hf_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_last_logits_match_transformers(tiny_llm, hf_default, prompt):
    hf_model, hf_tok = hf_default
    ids = hf_ids(hf_tok, prompt)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0, -1].numpy()
    got = tiny_llm.model.forward(np.array([ids]), tiny_llm.model.new_cache(256))[0, -1]
    err = float(np.abs(got - ref).max())
    print(f"max abs logit diff {err:.2e} (logit range {ref.min():.1f}..{ref.max():.1f})")
    assert err < 5e-4
    assert got.argmax() == ref.argmax()


def test_greedy_continuation_matches_transformers_for_64_tokens(tiny_llm, hf_default):
    hf_model, hf_tok = hf_default
    ids = hf_ids(hf_tok, PROMPTS[2])
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                eos_token_id=None, pad_token_id=hf_tok.eos_token_id)[0, len(ids):].tolist()
    model = tiny_llm.model
    cache = model.new_cache(256)
    logits = model.forward(np.array([ids]), cache)
    got = []
    for _ in range(64):
        nxt = int(logits[0, -1].argmax())
        got.append(nxt)
        logits = model.forward(np.array([[nxt]]), cache)
    assert got == ref, f"first difference at {next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)}"


def test_config_read_from_gguf_matches_transformers(tiny_llm, hf_default):
    hc, c = hf_default[0].config, tiny_llm.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size) == (
        hc.hidden_size, hc.num_hidden_layers, hc.num_attention_heads, hc.num_key_value_heads,
        hc.intermediate_size, hc.vocab_size)
    assert c.tie_embeddings == hc.tie_word_embeddings
    assert c.rope_theta == hc.rope_parameters["rope_theta"]
    assert c.max_seq_len == hc.max_position_embeddings
    assert c.bos_token_id == hc.bos_token_id and hc.eos_token_id in c.eos_token_ids


def test_load_reports_progress_from_0_to_1():
    """`tinyllm.load(progress=...)`: a fraction that starts at 0, never goes back, moves once per
    tensor of the file while it is dequantized, and ends at 1 when the model is ready."""
    import gguf

    import tinyllm
    from tinyllm.loaders import default_model_path

    seen = []
    llm = tinyllm.load(progress=seen.append)
    n_tensors = len(gguf.GGUFReader(default_model_path()).tensors)
    assert llm.model is not None
    assert seen[0] == 0.0 and seen[-1] == 1.0
    assert all(a <= b for a, b in zip(seen, seen[1:]))
    assert len(set(seen)) >= n_tensors
