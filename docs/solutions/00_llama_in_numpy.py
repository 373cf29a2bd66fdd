"""Solutions to the exercises of docs/00-llama-in-numpy.md; `python docs/solutions/00_llama_in_numpy.py`.

1. A KV cache for the one-screen model: prefill, then one token per step, the same logits
   as running the whole text again.
2. Grouped-query attention the obvious way (np.repeat of K and V) gives the same output.
3. Multiply-adds per token against the parameter count.
"""
import numpy as np

import tinyllm


def rms_norm(x, weight, eps):                      # [T, D] -> [T, D]
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def rope(x, positions, theta):                     # [T, N, E]; positions [T]: where these tokens sit
    e = x.shape[-1]
    angle = positions[:, None, None] * theta ** (-np.arange(0, e, 2) / e)   # [T, 1, E/2]
    x1, x2 = x[..., :e // 2], x[..., e // 2:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                           x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1).astype(x.dtype)


def attention(q, k, v):                            # q [T, H, E]; k, v [S, K, E], the last T of S are new
    t, h, e = q.shape
    s, n_kv = k.shape[:2]
    q = q.reshape(t, n_kv, h // n_kv, e)
    scores = np.einsum("tkre,ske->krts", q, k) * e ** -0.5                 # [K, R, T, S]
    scores += np.triu(np.full((t, s), -np.inf, np.float32), k=s - t + 1)   # new token i sees keys 0 .. s-t+i
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("krts,ske->tkre", probs, v).reshape(t, h * e)


def forward(p, tokens, cache, n_heads, n_kv_heads, eps, theta):
    """tokens [T] continuing the sequence whose keys and values `cache` holds (a list per layer
    of (k, v) arrays [S, K, E]; empty lists for a new sequence). Returns logits [T, V]."""
    t, start = len(tokens), len(cache[0][0]) if cache[0] else 0
    positions = np.arange(start, start + t)
    x = p["embed"][tokens]
    for w, layer_cache in zip(p["layers"], cache):
        h = rms_norm(x, w["attn_norm"], eps)
        q = rope((h @ w["q"].T).reshape(t, n_heads, -1), positions, theta)
        k = rope((h @ w["k"].T).reshape(t, n_kv_heads, -1), positions, theta)
        v = (h @ w["v"].T).reshape(t, n_kv_heads, -1)
        if layer_cache:                                           # append this block to the cached keys and values
            k, v = np.concatenate([layer_cache[0], k]), np.concatenate([layer_cache[1], v])
        layer_cache[:] = [k, v]
        x = x + attention(q, k, v) @ w["o"].T
        h = rms_norm(x, w["mlp_norm"], eps)
        gate, up = h @ w["gate"].T, h @ w["up"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w["down"].T
    return rms_norm(x, p["norm"], eps) @ p["head"].T


def params_of(llm):
    c, w = llm.config, llm.model.weights
    n_q, n_kv, f = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.hidden_dim
    return {"embed": w.tok_embeddings, "norm": w.norm, "head": w.output, "layers": [
        {"attn_norm": l.attn_norm, "q": l.wqkv[:n_q], "k": l.wqkv[n_q:n_q + n_kv], "v": l.wqkv[n_q + n_kv:],
         "o": l.wo, "mlp_norm": l.mlp_norm, "gate": l.w_gate_up[:f], "up": l.w_gate_up[f:], "down": l.w_down}
        for l in w.layers]}


def main():
    llm = tinyllm.load()
    c = llm.config
    p = params_of(llm)
    hp = dict(n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, eps=c.norm_eps, theta=c.rope_theta)

    # 1. cached decoding equals the full forward
    ids = llm.tokenizer.encode("The capital of France is")
    cache = [[] for _ in p["layers"]]
    logits = [forward(p, np.array(ids), cache, **hp)[-1]]
    tokens = list(ids)
    for _ in range(3):
        tokens.append(int(logits[-1].argmax()))
        logits.append(forward(p, np.array(tokens[-1:]), cache, **hp)[-1])
    full = forward(p, np.array(tokens), [[] for _ in p["layers"]], **hp)          # no reuse
    assert all(np.allclose(step, full[len(ids) - 1 + i], atol=1e-3) for i, step in enumerate(logits))
    assert tokens[len(ids):] == llm.generate("The capital of France is", max_new_tokens=3).token_ids
    print("1. cached steps equal the full forward:", repr(llm.tokenizer.decode(tokens[len(ids):])))

    # 2. GQA by np.repeat (copies K and V R times) gives the same output as the grouped reshape
    rng = np.random.default_rng(0)
    q = rng.standard_normal((5, c.n_heads, c.head_dim)).astype(np.float32)
    k, v = rng.standard_normal((2, 5, c.n_kv_heads, c.head_dim)).astype(np.float32)
    kr, vr = np.repeat(k, c.n_rep, axis=1), np.repeat(v, c.n_rep, axis=1)    # [T, H, E]: head i uses KV head i // R
    per_head = np.stack([attention(q[:, i:i + 1], kr[:, i:i + 1], vr[:, i:i + 1]) for i in range(c.n_heads)], axis=1)
    assert np.allclose(attention(q, k, v), per_head.reshape(5, -1), atol=1e-5)
    print("2. np.repeat gives the same attention")

    # 3. each weight of a matrix is one multiply-add per token; the embedding is a lookup, but the
    #    tied LM head multiplies by the same table in full
    macs = sum(a.size for layer in p["layers"] for a in layer.values() if a.ndim == 2) + p["head"].size
    params = llm.model.weights.nbytes // 4
    print(f"3. {macs / 1e6:.1f} M multiply-adds per token, for {params / 1e6:.1f} M parameters "
          f"(plus attention over the context)")

if __name__ == "__main__":
    main()
