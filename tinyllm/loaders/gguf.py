"""Reading GGUF files through the `gguf` package (the format's reference reader).

A GGUF file holds metadata (key/value fields: architecture, shapes, tokenizer) and
tensors, many of them quantized in blocks (Q4_1: 32 weights share a scale and a
minimum). The `gguf` package parses the file and dequantizes every block type it
knows (tested: F32, F16, Q8_0, Q4_1, and the K-quants Q4_K and Q6_K); tinyllm dequantizes
to float32 once at load.

Llama GGUF files store the Q and K projection rows permuted: the converter reorders
each head's rows so that RoPE can rotate *adjacent* channel pairs (2i, 2i+1). tinyllm
rotates channel i with i + E/2 (the Hugging Face layout), so the permutation is undone
here, per head — with the KV-head count for K, which has fewer heads under GQA.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import CheckpointError

# GGUF tensor names -> Hugging Face names (the names tinyllm assembles weights from).
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def open_gguf(path: Path):
    import gguf

    class Reader(gguf.GGUFReader):
        """The package's reader over a plain ndarray view of its memory map. Same bytes, but
        slicing skips np.memmap's per-slice Python hooks: parsing the 49k-token vocabulary
        and dequantizing took twice as long through them."""

        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray)

    try:
        return Reader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/... on damaged files
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def field_values(reader) -> dict:
    """GGUF metadata as plain Python values (strings, numbers, lists)."""
    out = {}
    for key, f in reader.fields.items():
        try:
            out[key] = f.contents()
        except Exception:  # a field type this gguf version cannot decode; tinyllm does not need it
            continue
    return out


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the converter's per-head row order (pairs interleaved) -> halves split.  [N*E, D]"""
    rows = w.shape[0]
    # per head, rows are (E/2 pairs, 2) in the file; tinyllm wants (2 halves, E/2)
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor, path: Path) -> np.ndarray:
    import gguf

    try:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} uses quantization {tensor.tensor_type.name}, "
            "which the gguf package cannot dequantize") from None


def read_gguf(path: str | Path, progress=None):
    """Config, Hugging Face-named float32 tensors, and the metadata fields of a GGUF file.
    `progress(fraction)`, if given, is called after each tensor is dequantized."""
    path = Path(path)
    reader = open_gguf(path)
    fields = field_values(reader)
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(f"{path}: truncated: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes}, file has {size}")
    names = {t.name for t in reader.tensors}
    config = Config.from_gguf_fields(fields, str(path), has_output_tensor="output.weight" in names)
    tensors = {}
    for i, t in enumerate(reader.tensors):
        if progress is not None:
            progress(i / len(reader.tensors))
        if t.name == "rope_freqs.weight":
            tensors["rope_freqs"] = dequantize(t, path)
            continue
        hf_name = hf_tensor_name(t.name)
        if hf_name is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a llama model")
        w = dequantize(t, path)
        if hf_name.endswith("q_proj.weight"):
            w = unpermute(w, config.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = unpermute(w, config.n_kv_heads)
        tensors[hf_name] = w
    return config, tensors, fields


def hf_tensor_name(name: str) -> str | None:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".")  # blk.{i}.{kind}.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None
