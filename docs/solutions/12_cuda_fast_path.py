"""Solutions to the exercises of docs/12-cuda-fast-path.md (arithmetic only: no GPU needed);
`python docs/solutions/12_cuda_fast_path.py`.

1. Llama-3-8B in float16 on the H100 of docs/benchmarks.md (2967 GB/s copy bandwidth): the
   bandwidth limit of batch-1 decode.
2. Its fused decode step's kernel count, and what launching them one by one from Python
   would cost at ~20 us per launch (docs/benchmarks.md), against the weight-reading time;
   the same for SmolLM2 (0.27 GB, 92 us of reading at that bandwidth).
"""
import numpy as np

from tinyllm.config import Config
from tinyllm.loaders import expected_shapes

COPY_BANDWIDTH = 2967e9   # bytes/s, H100, docs/benchmarks.md (2026-11-22, commit 12ec4b6)
LAUNCH = 20e-6            # s of host time per launch from Python, docs/benchmarks.md


def main():
    llama3 = Config.from_hf_dict({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                                  "max_position_embeddings": 8192, "rope_theta": 500000.0})
    sizes = {name: int(np.prod(shape)) for name, shape in expected_shapes(llama3).items()}
    read = 2 * (sum(sizes.values()) - sizes["model.embed_tokens.weight"])   # float16, the embedding is a lookup
    step = read / COPY_BANDWIDTH
    print(f"1. {read / 1e9:.1f} GB per token: at least {step * 1e3:.2f} ms, at most {1 / step:.0f} tok/s")

    kernels = 5 * llama3.n_layers + 4
    print(f"2. {kernels} kernels: {kernels * LAUNCH * 1e3:.2f} ms of launches from Python against "
          f"{step * 1e3:.2f} ms of weight reading: the GPU's work could hide them. SmolLM2's 154 kernels "
          f"({154 * LAUNCH * 1e3:.2f} ms) against 0.09 ms of reading: there the launches set the pace")


if __name__ == "__main__":
    main()
