"""Solutions to the exercises of docs/05-embeddings-and-rmsnorm.md;
`python docs/solutions/05_embeddings_and_rmsnorm.py`.

1. RMSNorm does not care about the scale of its input: rms_norm(c * x) = rms_norm(x) for any c > 0
   (up to eps), which is why the stream may grow layer after layer.
2. LayerNorm subtracts the mean first; on a vector whose mean is zero, the two agree.
"""
import numpy as np

import tinyllm
from tinyllm.model import Ops


def main():
    llm = tinyllm.load()
    c, w = llm.config, llm.model.weights
    ops = Ops(np)
    ids = np.array([llm.tokenizer.encode("The cat sat on the mat")])
    x = ops.embedding(w.tok_embeddings, ids) * 100                     # well above eps, like a deep layer's stream
    g = w.layers[3].attn_norm

    # 1. scale invariance
    for scale in (0.5, 30.0):
        assert np.allclose(ops.rms_norm(scale * x, g, c.norm_eps), ops.rms_norm(x, g, c.norm_eps), rtol=1e-4, atol=1e-5)
    print("1. rms_norm(c * x) = rms_norm(x) for c = 0.5 and 30")

    # 2. LayerNorm (no bias, same weight) on a centred vector equals RMSNorm
    centred = x - x.mean(-1, keepdims=True)
    layer_norm = (centred - centred.mean(-1, keepdims=True)) / np.sqrt(centred.var(-1, keepdims=True) + c.norm_eps) * g
    assert np.allclose(layer_norm, ops.rms_norm(centred, g, c.norm_eps), rtol=1e-4, atol=1e-5)
    print("2. on a zero-mean vector LayerNorm and RMSNorm agree")


if __name__ == "__main__":
    main()
