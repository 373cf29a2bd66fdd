"""Tiny random Llama models made by `transformers` (conftest.py re-exports these): what the
tests compare tinyllm against. Only torch and transformers are needed here, so a GPU run
that lacks the `gguf` package (which conftest.py requires) can still import them."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)


def make_hf_model(seed: int = 0, **overrides):
    """A random LlamaForCausalLM, float32, eval mode. Weights are drawn larger than the
    default init so that the logits are far from uniform and differences show."""
    cfg = transformers.LlamaConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model


def tiny_checkpoint_dir(path: Path, *, seed: int = 0, eos: bool = True, bos_first: bool = False,
                        chat_template: str | None = None, tokenizer_class: str | None = None, **overrides):
    """Write a tiny random Llama as a Hugging Face directory with a trained tokenizer:
    model.safetensors + config.json, tokenizer.json, tokenizer_config.json.

    `seed` and `overrides` go to `make_hf_model`; the vocabulary is the tokenizer's.
    `eos=False` leaves out the end-of-sequence token in both config.json and
    tokenizer_config.json, so that generation runs for as many tokens as asked.
    `bos_first` makes the tokenizer itself prepend `<s>` (as Llama 2's does), for the tests
    that check who adds BOS. `tokenizer_class` names the class transformers' AutoTokenizer
    builds, for the tests that read the directory with it as well.
    Returns (transformers' model, the `tokenizers.Tokenizer`), the references for the files."""
    import json

    from helpers_generate import SentencePieceStyle
    from tokenizers import processors

    tk = SentencePieceStyle.llama2()
    if bos_first:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    if not eos:
        overrides["eos_token_id"] = None
    model = make_hf_model(seed, vocab_size=tk.get_vocab_size(), **overrides)
    model.save_pretrained(path)
    tk.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>"}
    if eos:
        config["eos_token"] = "</s>"
    if chat_template is not None:
        config["chat_template"] = chat_template
    if tokenizer_class is not None:
        config["tokenizer_class"] = tokenizer_class
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return model, tk
