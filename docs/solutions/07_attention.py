"""Solutions to the exercises of docs/07-attention.md; `python docs/solutions/07_attention.py`.

1. Attention one head at a time, in plain loops over heads, equals Ops.attention.
2. Scaling a query up sharpens its attention towards a hard choice (the softmax's temperature).
"""
import numpy as np

from tinyllm.config import Config
from tinyllm.kv_cache import KVCache
from tinyllm.model import Ops


def softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def main():
    # 1. one head at a time
    rng = np.random.default_rng(0)
    c = Config(dim=96, n_layers=1, n_heads=6, n_kv_heads=2, hidden_dim=64, vocab_size=16)   # E = 16, R = 3
    t, e = 7, c.head_dim
    q = rng.standard_normal((1, t, c.n_heads, e)).astype(np.float32)
    k, v = rng.standard_normal((2, 1, t, c.n_kv_heads, e)).astype(np.float32)
    out = Ops(np).attention(q, k, v, KVCache(c, 16, np.float32), layer=0, pos=0, scale=e ** -0.5)
    heads = []
    for h in range(c.n_heads):
        kv = h // c.n_rep                                          # the KV head this query head shares
        scores = q[0, :, h] @ k[0, :, kv].T / np.sqrt(e)           # [T, T]
        scores[np.triu_indices(t, 1)] = -np.inf
        heads.append(softmax(scores) @ v[0, :, kv])                # [T, E]
    assert np.allclose(out[0], np.concatenate(heads, axis=-1), atol=1e-5)
    print("1. a loop over heads equals Ops.attention")

    # 2. the same direction, longer and longer: the probabilities harden
    keys = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    for length in (1, 4, 16):
        print(f"2. query length {length:2}: probabilities {softmax(keys @ np.array([length, 0.0])).round(3)}")


if __name__ == "__main__":
    main()
