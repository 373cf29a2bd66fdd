"""Solutions to the exercises of docs/09-mlp-block-forward.md;
`python docs/solutions/09_mlp_block_forward.py`.

1. The parameters of one layer, from the config alone, against the loaded arrays.
2. A layer's MLP by hand (gate, up, SiLU, down) against Ops.norm_swiglu followed by
   Ops.linear_residual.
"""
import numpy as np

import tinyllm
from tinyllm.model import Ops


def main():
    llm = tinyllm.load()
    c, w = llm.config, llm.model.weights
    layer = w.layers[0]

    # 1. attention: q, k, v, o;  MLP: gate, up, down;  two norms
    d, e, f = c.dim, c.head_dim, c.hidden_dim
    by_hand = d * (c.n_heads * e) + 2 * d * (c.n_kv_heads * e) + (c.n_heads * e) * d + 3 * d * f + 2 * d
    loaded = sum(a.size for a in vars(layer).values())
    assert by_hand == loaded
    print(f"1. one layer: {by_hand:,} parameters, as loaded")

    # 2. the MLP half of a block
    x = np.random.default_rng(0).standard_normal((1, 3, d)).astype(np.float32)
    ops = Ops(np)
    fused = ops.linear_residual(ops.norm_swiglu(x, layer.mlp_norm, c.norm_eps, layer.w_gate_up), layer.w_down, x)
    h = x / np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_eps) * layer.mlp_norm
    gate, up = h @ layer.w_gate_up[:f].T, h @ layer.w_gate_up[f:].T
    by_formula = x + (gate / (1 + np.exp(-gate)) * up) @ layer.w_down.T
    assert np.allclose(fused, by_formula, rtol=1e-4, atol=1e-4)
    print("2. x + down(silu(gate(h)) * up(h)) equals the named fusions")


if __name__ == "__main__":
    main()
