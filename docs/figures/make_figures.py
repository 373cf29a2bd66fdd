"""Make the tutorial's figures (docs/figures/*.png) from tinyllm's own code.

    python docs/figures/make_figures.py                 # every figure
    python docs/figures/make_figures.py rope attention  # some of them

Figures: rope (frequencies and rotations), attention (the default model's attention
probabilities on a sentence), kv_cache (KV-cache memory against context length),
decode_time (measured here: one decode step against context length, CPU),
gpu_bandwidth (from the GPU benchmark's JSON, when it has been committed).
Needs matplotlib (pip install matplotlib).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from tinyllm.config import Config  # noqa: E402
from tinyllm.model import Model, Ops  # noqa: E402
from tinyllm.rope import inverse_frequencies  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog because the dog was asleep."

# The configs the KV-cache arithmetic is about (config.json fields, as Config.from_hf_dict reads them).
CONFIGS = {
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0),
    "TinyLlama-1.1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
}


def save(fig, name: str) -> None:
    path = HERE / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    print("wrote", path.relative_to(ROOT))


_llm = None


def default_llm():
    global _llm
    if _llm is None:
        import tinyllm

        _llm = tinyllm.load()
    return _llm


# ---- RoPE ----------------------------------------------------------------------------------------
def rope() -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, theta, scaling in [("theta = 10 000 (Llama 2, TinyLlama)", 10000.0, None),
                                 ("theta = 100 000 (SmolLM2)", 100000.0, None),
                                 ("theta = 500 000 + llama3 scaling x8 (Llama 3.1)", 500000.0,
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})]:
        c = Config.from_hf_dict(dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                                     vocab_size=8, rope_theta=theta, rope_scaling=scaling))
        left.semilogy(2 * np.pi / inverse_frequencies(c), marker=".", label=name)
    left.axhline(8192, color="gray", ls=":", lw=1)
    left.text(0, 8192 * 1.3, "8192 positions", color="gray", fontsize=8)
    left.set(xlabel="channel pair i (of E/2 = 32)", ylabel="wavelength 2π / inv_freq (positions)",
             title="RoPE: one frequency per channel pair (E = 64)")
    left.legend(fontsize=8)

    c = Config.from_hf_dict(dict(hidden_size=576, intermediate_size=64, num_hidden_layers=1, num_attention_heads=9,
                                 vocab_size=8, rope_theta=100000.0))
    inv = inverse_frequencies(c)
    pos = np.arange(0, 64)
    for i in (0, 4, 8, 16):
        right.plot(pos, np.cos(pos * inv[i]), label=f"pair {i}: wavelength {2 * np.pi / inv[i]:.0f}")
    right.set(xlabel="position", ylabel="cos(position x inv_freq[i])",
              title="SmolLM2: the rotation of four pairs as the position grows")
    right.legend(fontsize=8, loc="lower left")
    save(fig, "rope")


# ---- attention ---------------------------------------------------------------------------------------
class RecordingOps(Ops):
    """The readable ops, keeping every attention probability matrix softmax makes."""

    def __init__(self, xp):
        super().__init__(xp)
        self.probs = []

    def softmax(self, x):
        p = super().softmax(x)
        self.probs.append(p.copy())  # [B, K, R*T, S]
        return p


def attention_probs(llm, text: str):
    """Per layer [H, T, T] attention probabilities of the default model on `text`, and the tokens."""
    c = llm.config
    ops = RecordingOps(np)
    model = Model(c, llm.model.weights, llm.model.device, ops=ops)
    ids = llm.tokenizer.encode(text)
    model.forward(np.array([ids]), model.new_cache(len(ids)))
    t = len(ids)
    probs = [p.reshape(c.n_kv_heads, c.n_rep, t, t).reshape(c.n_heads, t, t) for p in ops.probs]
    tokens = [llm.tokenizer.decode([i]) for i in ids]
    return probs, tokens


def attention() -> None:
    llm = default_llm()
    probs, tokens = attention_probs(llm, SENTENCE)
    picks = [(0, 0), (2, 3), (10, 1), (20, 4), (29, 7), (29, 8)]
    fig, axes = plt.subplots(2, 3, figsize=(14, 9.5))
    labels = [repr(t)[1:-1] for t in tokens]
    for ax, (layer, head) in zip(axes.ravel(), picks):
        ax.imshow(probs[layer][head], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer}, head {head} (KV head {head // llm.config.n_rep})", fontsize=10)
        ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(tokens)), labels, fontsize=7)
    fig.suptitle("SmolLM2-135M attention probabilities: row = query token, column = key token "
                 "(upper triangle masked: a token never sees the future)", fontsize=11)
    fig.tight_layout()
    save(fig, "attention")


# ---- KV cache memory -----------------------------------------------------------------------------------
def kv_bytes_per_token(c: Config, bytes_per_element: int) -> int:
    return 2 * c.n_layers * c.n_kv_heads * c.head_dim * bytes_per_element  # K and V, every layer


def kv_cache() -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (name, raw), dtype, size in [(("SmolLM2-135M", CONFIGS["SmolLM2-135M"]), "float32", 4),
                                     (("TinyLlama-1.1B", CONFIGS["TinyLlama-1.1B"]), "float16", 2),
                                     (("Llama-3-8B", CONFIGS["Llama-3-8B"]), "float16", 2)]:
        c = Config.from_hf_dict(raw)
        per_token = kv_bytes_per_token(c, size)
        ctx = np.arange(0, c.max_seq_len + 1, 64)
        ax.plot(ctx, ctx * per_token / 2**20, label=f"{name}, {dtype}: {per_token / 1024:g} KiB per token")
        color = ax.lines[-1].get_color()
        ax.plot(ctx[-1], ctx[-1] * per_token / 2**20, "o", color=color)
        ax.plot(ctx, ctx * per_token * c.n_rep / 2**20, ls="--", lw=1, color=color,
                label=f"{name} without GQA (K = H = {c.n_heads}): {per_token * c.n_rep / 1024:g} KiB per token")
    ax.set_ylim(0, 1100)
    ax.set(xlabel="context length (positions)", ylabel="KV cache (MiB)",
           title="KV-cache memory = 2 x L x K x E x bytes x positions\n(dot: the model's trained context; dashed: one KV head per query head)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "kv_cache")


# ---- decode time against context length -------------------------------------------------------------------
def decode_time(lengths=(16, 256, 512, 1024, 2048, 4096), steps: int = 12) -> None:
    """Median time of one greedy decode step after the cache holds n positions, on this CPU."""
    llm = default_llm()
    model = llm.model
    rng = np.random.default_rng(0)
    cache = model.new_cache(max(lengths) + steps + 1)
    times = []
    for n in lengths:
        cache.trim(cache.length)  # start empty; prefill n positions (in chunks of PREFILL_CHUNK)
        model.forward(rng.integers(100, 40000, size=(1, n)), cache)
        tok, step = np.array([[42]]), []
        for _ in range(steps):
            start = time.perf_counter()
            logits = model.forward(tok, cache)
            step.append(time.perf_counter() - start)
            tok = logits[:, :, :].argmax(-1)
        times.append(statistics.median(step[2:]) * 1e3)
        print(f"context {n:5}: {times[-1]:.1f} ms per decode step")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(lengths, times, marker="o", label="tinyllm, SmolLM2-135M float32 (NumPy, this CPU)")
    ax.set_ylim(0, max(times) * 1.15)
    ax.set(xlabel="positions already in the KV cache", ylabel="ms per decoded token (median)",
           title="Decode time per token against context length\n"
                 "(flat part: reading 538 MB of weights; slope: attention over the cache)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "decode_time")
    (HERE / "decode_time.json").write_text(json.dumps(
        {"model": "SmolLM2-135M-Instruct Q4_1 -> float32", "steps": steps,
         "context": list(lengths), "ms_per_token": [round(t, 2) for t in times]}, indent=1) + "\n")


FIGURES = {"rope": rope, "attention": attention, "kv_cache": kv_cache, "decode_time": decode_time}


if __name__ == "__main__":
    names = sys.argv[1:] or list(FIGURES)
    for name in names:
        FIGURES[name]()
