"""Make the tutorial's figures (docs/figures/*.png) from tinyllm's own code.

    python docs/figures/make_figures.py                 # every figure
    python docs/figures/make_figures.py rope attention  # some of them

Figures: rope (frequencies and rotations), attention (the default model's attention
probabilities on a sentence), kv_cache (KV-cache memory against context length),
decode_time (one decode step against context length, CPU; measured into decode_time.json,
`decode_time --measure [--random]` measures again, --random with random weights of the
default model's shape, for a machine without the checkpoint),
gpu_bandwidth (from benchmarks/results/gpu_bench_h100.json, the run docs/benchmarks.md quotes),
and the diagrams: llama_block (the forward pass), gqa (grouped-query attention by reshape),
kv_cache_layout (one layer's cache) and cuda_graph (what a graph replaces, schematic).
Needs matplotlib (pip install matplotlib).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

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


def pyplot():
    """matplotlib, imported only for drawing (measuring needs NumPy alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, name: str) -> None:
    path = HERE / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    pyplot().close(fig)
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
    plt = pyplot()
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
    plt = pyplot()
    llm = default_llm()
    probs, tokens = attention_probs(llm, SENTENCE)
    picks = [(0, 0), (2, 3), (10, 1), (20, 4), (29, 7), (29, 8)]
    fig, axes = plt.subplots(2, 3, figsize=(14, 9.5))
    labels = [repr(t)[1:-1] for t in tokens]
    for ax, (layer, head) in zip(axes.ravel(), picks):
        image = ax.imshow(probs[layer][head], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer}, head {head} (KV head {head // llm.config.n_rep})", fontsize=10)
        ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(tokens)), labels, fontsize=7)
    fig.suptitle("SmolLM2-135M attention probabilities: row = query token, column = key token "
                 "(upper triangle masked: a token never sees the future)", fontsize=11)
    fig.tight_layout()
    fig.colorbar(image, ax=axes, shrink=0.6, label="probability (each row sums to 1)")
    save(fig, "attention")


# ---- KV cache memory -----------------------------------------------------------------------------------
def kv_bytes_per_token(c: Config, bytes_per_element: int) -> int:
    return 2 * c.n_layers * c.n_kv_heads * c.head_dim * bytes_per_element  # K and V, every layer


def kv_cache() -> None:
    plt = pyplot()
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
DECODE_JSON = HERE / "decode_time.json"


def random_smollm2():
    """A Model of SmolLM2-135M's shape with random float32 weights (speed depends on shapes, not values)."""
    from tinyllm.model import LayerWeights, Weights

    c = Config.from_hf_dict({**CONFIGS["SmolLM2-135M"], "tie_word_embeddings": True})
    rng = np.random.default_rng(0)

    def w(*shape):
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    e, f = c.head_dim, c.hidden_dim
    layers = [LayerWeights(attn_norm=np.ones(c.dim, np.float32), wqkv=w((c.n_heads + 2 * c.n_kv_heads) * e, c.dim),
                           wo=w(c.dim, c.n_heads * e), mlp_norm=np.ones(c.dim, np.float32),
                           w_gate_up=w(2 * f, c.dim), w_down=w(c.dim, f)) for _ in range(c.n_layers)]
    embed = w(c.vocab_size, c.dim)
    return Model(c, Weights(embed, layers, np.ones(c.dim, np.float32), embed))


def measure_decode_time(lengths=(16, 512, 1024, 2048, 4096, 8000), rounds: int = 15, random_weights=False) -> dict:
    """ms of one greedy decode step with n positions already cached, for each n.

    One cache per length, prefilled once; then `rounds` rounds of one decode step per
    cache, lengths interleaved (a busy moment on the machine hits every length alike),
    each step trimmed off again so the cache stays at n."""
    import platform

    model = random_smollm2() if random_weights else default_llm().model
    rng = np.random.default_rng(0)
    caches = {}
    for n in lengths:
        caches[n] = model.new_cache(n + 1)
        model.forward(rng.integers(100, 40000, size=(1, n)), caches[n])  # prefilled in chunks of 512
    for n in lengths:  # warm-up
        model.forward(np.array([[42]]), caches[n])
        caches[n].trim(1)
    times = {n: [] for n in lengths}
    for _ in range(rounds):
        for n in lengths:
            start = time.perf_counter()
            model.forward(np.array([[42]]), caches[n])
            times[n].append((time.perf_counter() - start) * 1e3)
            caches[n].trim(1)
    result = {"model": "SmolLM2-135M shape, float32, " + ("random weights" if random_weights else "the default model"),
              "machine": f"{platform.machine()}, {platform.processor() or platform.platform()}",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": rounds,
              "context": list(lengths),
              "median_ms": [round(statistics.median(times[n]), 2) for n in lengths],
              "min_ms": [round(min(times[n]), 2) for n in lengths]}
    for n, med, best in zip(lengths, result["median_ms"], result["min_ms"]):
        print(f"context {n:5}: median {med:.1f} ms, min {best:.1f} ms per decode step")
    return result


def decode_time() -> None:
    """The figure from decode_time.json (measured here when absent; `--measure` measures again)."""
    if not DECODE_JSON.exists() or "--measure" in sys.argv:
        DECODE_JSON.write_text(json.dumps(measure_decode_time(random_weights="--random" in sys.argv), indent=1) + "\n")
    run = json.loads(DECODE_JSON.read_text())
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(run["context"], run["median_ms"], marker="o", label="median")
    ax.plot(run["context"], run["min_ms"], marker=".", ls=":", label="fastest")
    ax.set_ylim(0, max(run["median_ms"]) * 1.15)
    ax.set(xlabel="positions already in the KV cache", ylabel=f"ms per decoded token ({run['rounds']} steps each)",
           title=f"Decode time per token against context length: tinyllm on NumPy\n{run['model']}\n"
                 f"{run['machine']}, {run['date']}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "decode_time")


# ---- the GPU benchmark: tok/s of peers and tinyllm against the bandwidth limit ----------------------------
GPU_RESULTS = ROOT / "benchmarks" / "results" / "gpu_bench_h100.json"


def gpu_bandwidth(path: Path = GPU_RESULTS) -> None:
    """Batch-1 decode on the GPU, from the JSON that docs/benchmarks.md quotes (nothing measured here)."""
    if not path.exists():
        print(f"skipped gpu_bandwidth: {path.relative_to(ROOT)} is not there (run benchmarks/gpu_decode.py on a GPU)")
        return
    run = json.loads(path.read_text())
    plt = pyplot()
    shapes = [("tinyllama-1.1b", "TinyLlama-1.1B"), ("smollm2-135m", "SmolLM2-135M")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, (key, title) in zip(axes, shapes):
        r = run["shapes"][key]
        bars = [("transformers, eager", r["transformers_eager"]["decode_tok_s"], "#999999"),
                ("transformers, static cache (compiled)", r["transformers_static"]["decode_tok_s"], "#777777"),
                ("tinyllm, readable CuPy path", r["readable_eager_tok_s"], "#9ecae1"),
                ("tinyllm, fused kernels, eager", r["fast_eager_tok_s"], "#4292c6"),
                ("tinyllm, fused kernels + CUDA graph", r["decode_tok_s"], "#08519c")]
        names = [b[0] for b in bars][::-1]
        values = [b[1] for b in bars][::-1]
        ax.barh(names, values, color=[b[2] for b in bars][::-1])
        limit = r["limit_tok_s"]
        ax.axvline(limit, color="crimson", ls="--")
        ax.text(limit, len(bars) - 0.45, f" bandwidth limit\n {limit:.0f} tok/s", color="crimson", fontsize=8, va="top",
                ha="left")
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
        ax.set_xscale("log")  # 14 and 10 000 tok/s on one axis: a linear one hides the small bars
        ax.set_xlim(5, limit * 3)
        ax.set_xlabel("decoded tokens per second (batch 1, fp16; log scale)")
        ax.set_title(f"{title}: {r['bytes_per_step'] / 1e9:.2f} GB read per token; "
                     f"graph step at {100 * r['bandwidth_fraction']:.0f} % of copy bandwidth", fontsize=10)
    fig.suptitle(f"{run['device']}, copy bandwidth {run['copy_bandwidth_GBs']:.0f} GB/s "
                 f"(limit = copy bandwidth / bytes per token); {run['date'][:10]}, commit {run['commit']}", fontsize=10)
    fig.tight_layout()
    save(fig, "gpu_bandwidth")


# ---- diagrams: boxes and arrows, nothing measured ----------------------------------------------------------
def box(ax, x, y, w, h, text, color="#deebf7", fontsize=9, **kw):
    """A rounded box centred at (x, y) with its label."""
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=color, edgecolor="#555555", lw=1, **kw))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)


def arrow(ax, x0, y0, x1, y1, color="#333333", **kw):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="-|>", color=color, lw=1.2, **kw))


def llama_block() -> None:
    """The forward pass of chapter 0 and model.py: the residual stream and one block."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 10.5))
    ax.set(xlim=(0, 10), ylim=(1.6, 21))
    ax.axis("off")
    stream_x, branch_x = 2.2, 6.2
    box(ax, stream_x, 20.2, 3.2, 0.8, "token ids  [T]", "#f0f0f0")
    box(ax, stream_x, 18.9, 3.2, 0.8, "embedding: table[ids]  [T, D]", "#fdd0a2")
    steps = [  # (y, label, colour)
        (17.0, "RMSNorm (input_layernorm)", "#c7e9c0"),
        (15.9, "q, k, v = h @ wqᵀ, h @ wkᵀ, h @ wvᵀ\n[T, H, E], [T, K, E], [T, K, E]", "#deebf7"),
        (14.6, "RoPE on q and k (rotate by position)", "#deebf7"),
        (13.4, "attention: softmax(q kᵀ / √E + causal mask) v\nR = H / K query heads share each KV head", "#deebf7"),
        (12.2, "@ woᵀ   [T, H·E] → [T, D]", "#deebf7"),
        (10.2, "RMSNorm (post_attention_layernorm)", "#c7e9c0"),
        (9.1, "gate, up = h @ w_gateᵀ, h @ w_upᵀ   [T, F] each", "#fee0d2"),
        (8.0, "silu(gate) · up", "#fee0d2"),
        (6.9, "@ w_downᵀ   [T, F] → [T, D]", "#fee0d2"),
    ]
    ax.add_patch(plt.Rectangle((0.4, 5.6), 9.3, 12.2, fill=False, ls="--", ec="#888888"))
    ax.text(9.7, 17.9, "× L layers (30 in SmolLM2)", ha="right", va="bottom", fontsize=9, color="#555555")
    ax.plot([stream_x, stream_x], [18.5, 5.0], color="#d94801", lw=3, zorder=0)
    ax.text(stream_x - 0.3, 15.0, "residual stream x  [T, D]", rotation=90, ha="right", va="center", color="#d94801",
            fontsize=9)
    for y, label, color in steps:
        box(ax, branch_x, y, 6.2, 0.85 if "\n" in label else 0.7, label, color, fontsize=8)
    for (y0, *_), (y1, *_) in zip(steps, steps[1:]):
        if y0 - y1 < 1.5:
            arrow(ax, branch_x, y0 - 0.42, branch_x, y1 + 0.42)
    for top, bottom in ((17.0, 12.2), (10.2, 6.9)):  # branch out of the stream, back in with an add
        arrow(ax, stream_x, top, branch_x - 3.1, top)
        ax.plot([branch_x, branch_x], [bottom - 0.35, bottom - 0.9], color="#333333", lw=1.2)
        arrow(ax, branch_x, bottom - 0.9, stream_x + 0.25, bottom - 0.9)
        ax.add_patch(plt.Circle((stream_x, bottom - 0.9), 0.25, facecolor="white", edgecolor="#d94801", lw=2, zorder=3))
        ax.text(stream_x, bottom - 0.9, "+", ha="center", va="center", fontsize=12, zorder=4)
    box(ax, stream_x, 4.7, 3.2, 0.7, "RMSNorm (final)", "#c7e9c0")
    box(ax, stream_x, 3.5, 3.2, 0.8, "LM head: x @ outputᵀ\n[T, D] → [T, V]", "#fdd0a2", fontsize=8)
    box(ax, stream_x, 2.3, 3.2, 0.7, "logits  [T, V]", "#f0f0f0")
    arrow(ax, stream_x, 19.8, stream_x, 19.3)
    arrow(ax, stream_x, 4.35, stream_x, 3.9)
    arrow(ax, stream_x, 3.1, stream_x, 2.65)
    ax.text(4.3, 3.5, "greedy decoding: append argmax(logits[-1]),\nrun again (the KV cache keeps k and v\n"
            "so only the new token is computed)", fontsize=8, va="center", color="#555555")
    ax.set_title("A Llama forward pass: every block reads a normalised copy of the stream\n"
                 "and adds its result back (pre-norm residuals)", fontsize=10)
    save(fig, "llama_block")


def gqa() -> None:
    """Grouped-query attention for SmolLM2's shape: 9 query heads, 3 KV heads, by reshape."""
    plt = pyplot()
    h, k = 9, 3
    r = h // k
    colors = ["#6baed6", "#fd8d3c", "#74c476"]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    ax.set(xlim=(-0.5, 10.5), ylim=(-0.6, 4.6))
    ax.axis("off")
    for i in range(h):
        box(ax, 0.3 + i * 1.1, 3.6, 0.9, 0.6, f"q{i}", colors[i // r])
        arrow(ax, 0.3 + i * 1.1, 3.28, 1.4 + (i // r) * 3.3, 2.12, color=colors[i // r])
    for j in range(k):
        box(ax, 1.4 + j * 3.3, 1.8, 3.0, 0.6, f"k{j}, v{j}  (one KV head, read once)", colors[j], fontsize=8)
    ax.text(-0.4, 4.3, "queries [T, H = 9, E]", fontsize=9)
    ax.text(-0.4, 1.0, "keys and values [S, K = 3, E]: a third of the cache that 9 KV heads would need", fontsize=9)
    ax.text(-0.4, 0.2, "reshape q [T, H, E] → [K, R·T, E]: the R = 3 query heads of a group become rows of one matrix,\n"
            "so scores = q @ kᵀ is one batched matmul per KV head; nothing is copied R times (no np.repeat)",
            fontsize=9, va="center")
    ax.set_title("Grouped-query attention (SmolLM2: H = 9 query heads, K = 3 KV heads, R = 3)", fontsize=10)
    save(fig, "gqa")


def kv_cache_layout() -> None:
    """One layer's cache: slots filled, the block written this step, what attention reads."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.set(xlim=(-0.5, 16.8), ylim=(-1.6, 3.4))
    ax.axis("off")
    s_max, pos, t = 16, 9, 3
    for row, name in ((2, "keys   [B, K, S_max, E]"), (1, "values [B, K, S_max, E]")):
        for i in range(s_max):
            color = "#9ecae1" if i < pos else ("#fd8d3c" if i < pos + t else "#f0f0f0")
            ax.add_patch(plt.Rectangle((i, row - 0.4), 0.95, 0.8, facecolor=color, edgecolor="#777777"))
        ax.text(-0.3, row, name, ha="right", va="center", fontsize=8)
    ax.set_xlim(-4.5, 16.8)
    for i in (0, pos, pos + t, s_max):
        ax.text(i, 2.6, str(i), ha="center", fontsize=8)
    ax.text(pos / 2, 3.1, "already cached: [0, pos)", ha="center", fontsize=9, color="#2171b5")
    ax.text(pos + t / 2, 3.1, "written now\n[pos, pos+T)", ha="center", fontsize=8, color="#d94801")
    ax.text(13.5, 3.1, "free, preallocated", ha="center", fontsize=9, color="#777777")
    ax.annotate("", xy=(0, 0.3), xytext=(pos + t, 0.3), arrowprops=dict(arrowstyle="<->", color="#333333"))
    ax.text((pos + t) / 2, -0.1, "attention reads [0, pos+T): views, no copy", ha="center", fontsize=9)
    ax.text(-4.3, -1.2, "pos = cache.length (9 here), T new tokens (3 in a prefill block, 1 in a decode step); "
            "\neach of the L layers has its own pair of arrays; the step that writes them advances length", fontsize=8)
    ax.set_title("The KV cache of one layer: allocated once at full capacity, written in place", fontsize=10, pad=24)
    save(fig, "kv_cache_layout")


def cuda_graph() -> None:
    """What a CUDA graph replaces: per-kernel launches from Python against one replay (schematic)."""
    plt = pyplot()
    fig, (eager, graph) = plt.subplots(2, 1, figsize=(10, 4.4), sharex=True)
    n, launch, run = 6, 1.0, 0.35  # schematic units: the host's launch of a small kernel outlasts the kernel
    for i in range(n):
        eager.broken_barh([(i * launch, launch * 0.9)], (1.1, 0.7), facecolors="#bdbdbd")
        eager.broken_barh([((i + 1) * launch - 0.05, run)], (0.1, 0.7), facecolors="#2171b5")
    eager.text(0, 2.0, "eager: the host launches every kernel from Python; the GPU idles between them", fontsize=9)
    graph.broken_barh([(0, launch * 0.9)], (1.1, 0.7), facecolors="#bdbdbd")
    for i in range(n):
        graph.broken_barh([(launch + i * (run + 0.03), run)], (0.1, 0.7), facecolors="#2171b5")
    graph.text(0, 2.0, "graph: one replay launches the recorded kernels back to back; "
               "the host is free to queue the next step", fontsize=9)
    for ax in (eager, graph):
        ax.set_yticks([0.45, 1.45], ["GPU", "host"])
        ax.set_ylim(0, 2.5)
        ax.spines[["top", "right"]].set_visible(False)
    graph.set_xticks([])
    graph.set_xlabel("time (schematic: a decode step has 114 to 154 kernels, not 6)")
    fig.suptitle("What a CUDA graph replaces (grey: host work, blue: kernels)", fontsize=10)
    fig.tight_layout()
    save(fig, "cuda_graph")


FIGURES = {"rope": rope, "attention": attention, "kv_cache": kv_cache, "decode_time": decode_time,
           "gpu_bandwidth": gpu_bandwidth, "llama_block": llama_block, "gqa": gqa,
           "kv_cache_layout": kv_cache_layout, "cuda_graph": cuda_graph}


if __name__ == "__main__":
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or list(FIGURES)
    for name in names:
        FIGURES[name]()
