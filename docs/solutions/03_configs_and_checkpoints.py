"""Solutions to the exercises of docs/03-configs-and-checkpoints.md;
`python docs/solutions/03_configs_and_checkpoints.py`.

1. Quantization error of Q4_1 against Q8_0 on the same random row, and bytes per weight.
2. Where the bytes of the default model's GGUF file go: tensor data against everything else
   (metadata, the tokenizer's vocabulary and merges, alignment).
"""
import gguf
import numpy as np

from tinyllm.loaders import default_model_path
from tinyllm.loaders.gguf import open_gguf


def main():
    row = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    for kind in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1):
        raw = gguf.quants.quantize(row, kind)
        err = np.abs(gguf.quants.dequantize(raw, kind) - row)
        print(f"1. {kind.name}: {8 * raw.nbytes / row.size:.1f} bits per weight, "
              f"mean error {err.mean():.4f}, largest {err.max():.4f}")

    path = default_model_path()
    reader = open_gguf(path)
    tensors = sum(int(t.n_bytes) for t in reader.tensors)
    size = path.stat().st_size
    assert tensors < size
    print(f"2. {size / 1e6:.1f} MB file: {tensors / 1e6:.1f} MB of tensors, {(size - tensors) / 1e6:.1f} MB of "
          "metadata (tokenizer included) and padding")


if __name__ == "__main__":
    main()
