"""GPU check of the command line end to end: `python -m tinyllm.run --device cuda` on a
random SmolLM2-shaped checkpoint written to disk (safetensors + a small trained tokenizer),
with the fast path (fused kernels + CUDA graph) and with `--no-fast-path` (readable CuPy).

Greedy token ids of the two paths must agree; each run's stats line is printed.
Run on a machine with an NVIDIA GPU:  python benchmarks/gpu_cli_check.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def write_checkpoint(d: Path, seed: int = 0, embed_std: float = 0.5) -> None:
    """A random SmolLM2-shaped checkpoint with a small trained tokenizer. `embed_std` sets
    how peaked the (tied) output logits are: 0.5 gives one clear winner nearly everywhere."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    vocab = 512
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
           "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": vocab, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
           "bos_token_id": 0, "eos_token_id": 1}
    (d / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": rng.normal(0, embed_std, (vocab, 576)), "model.norm.weight": 1 + 0.1 * rng.normal(size=576)}
    for i in range(30):
        p = f"model.layers.{i}."
        for name, shape in {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
                            "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
                            "mlp.down_proj": (576, 1536)}.items():
            w[p + name + ".weight"] = rng.normal(0, 1 / np.sqrt(shape[1]), shape)
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=576)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=576)
    save_file({k: v.astype(np.float16) for k, v in w.items()}, str(d / "model.safetensors"))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog " * 3, "a baker had a bakery in the town", "hello world"] * 50
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(d / "tokenizer.json"))


def run_cli(model: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "tinyllm.run", "--model", str(model), "--device", "cuda", "--raw",
           "--prompt", "the quick brown fox", "--max-new-tokens", "200", "--json", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(extra) or 'fast path'} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_checkpoint(d)
        fast = run_cli(d)
        readable = run_cli(d, "--no-fast-path")
    same = fast["token_ids"] == readable["token_ids"]
    first_diff = next((i for i, (a, b) in enumerate(zip(fast["token_ids"], readable["token_ids"])) if a != b), None)
    rows = [("fast path", fast), ("readable CuPy", readable)]
    lines = ["| path | new tokens | finish | TTFT s | prefill tok/s | decode tok/s | load s |", "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        s = r["stats"]
        lines.append(f"| {name} | {s['new_tokens']} | {s['finish_reason']} | {s['ttft_s']} | {s['prefill_tok_s']} | "
                     f"{s['decode_tok_s']} | {r.get('load_s')} |")
    lines.append(f"greedy ids identical: {same}" + ("" if same else f" (first difference at token {first_diff})"))
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_cli_check.md").write_text(report + "\n")
        (args.out / "gpu_cli_check.json").write_text(json.dumps({"fast": fast, "readable": readable}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
