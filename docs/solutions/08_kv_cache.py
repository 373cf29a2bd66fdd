"""Solutions to the exercises of docs/08-kv-cache.md; `python docs/solutions/08_kv_cache.py`.

1. How many positions fit in 1 GiB of KV cache, for three models.
2. KVCache.trim rewinds a sequence: decoding again from the same point gives the same logits.
"""
import numpy as np

import tinyllm
from tinyllm.config import Config

MODELS = {
    "SmolLM2-135M, float32": ({"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                               "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152}, 4),
    "TinyLlama-1.1B, float16": ({"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                                 "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000}, 2),
    "Llama-3-8B, float16": ({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}, 2),
}


def main():
    # 1. 2 (K and V) x L x K x E x bytes per position
    for name, (fields, size) in MODELS.items():
        c = Config.from_hf_dict(fields)
        per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * size
        print(f"1. {name:24} {per_token // 1024:4} KiB per position: {2**30 // per_token:6} positions in 1 GiB")

    # 2. rewind with trim, decode again
    llm = tinyllm.load()
    model = llm.model
    cache = model.new_cache(32)
    ids = llm.tokenizer.encode("Rewinding a cache")
    model.forward(np.array([ids]), cache)
    first = model.forward(np.array([[42]]), cache)[0, -1]
    cache.trim(1)                                      # forget the decoded position; the next write overwrites it
    again = model.forward(np.array([[42]]), cache)[0, -1]
    assert cache.length == len(ids) + 1 and np.array_equal(first, again)
    print("2. after trim(1), the same step gives the same logits, bit for bit")


if __name__ == "__main__":
    main()
