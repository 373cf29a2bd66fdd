"""How tests/data/tiny-q4_k_m.gguf was made (needs llama-cpp-python: pip install '.[bench]').

The gguf package can read and dequantize K-quants (Q4_K, Q6_K, ...) but not write them,
so the test file comes from llama.cpp's own quantizer: a tiny random Llama (dims multiples
of 256, the K-quant block size) is written as an F32 GGUF by the tests' `write_gguf`, then
quantized with llama.cpp's Q4_K_M recipe, which stores most matrices as Q4_K and some as
Q6_K. tests/test_model_hf.py loads it with tinyllm and with transformers.

    python tests/data/make_tiny_kquant.py
"""
import ctypes
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import llama_cpp  # noqa: E402

from conftest import make_hf_model, write_gguf  # noqa: E402


def main() -> None:
    model = make_hf_model(seed=20, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256, num_hidden_layers=2)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "f32.gguf"
        write_gguf(model, src)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        out = HERE / "tiny-q4_k_m.gguf"
        if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise SystemExit("llama.cpp could not quantize the model")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
