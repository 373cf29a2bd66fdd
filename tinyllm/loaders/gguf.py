"""Reading GGUF files: a header of metadata and a tensor directory, then aligned tensor data.

    magic "GGUF" | version u32 | tensor count u64 | metadata count u64
    metadata:  key (string) | value type u32 | value            (strings: u64 length + bytes)
    tensors:   name (string) | n_dims u32 | dims u64 x n_dims | ggml type u32 | offset u64
    padding to `general.alignment` | tensor data (each tensor at its offset)

The header is read here, by a small parser that checks every count and length against
the bytes left in the file before it reads or allocates anything: a damaged or hostile
file ends in one CheckpointError, never in a loop over a length nobody checked. The
`gguf` package (the format's reference reader, used by the tests as the oracle of this
parser) dequantizes the tensors: every block type it knows (tested: F32, F16, Q8_0, Q4_1,
and the K-quants Q4_K and Q6_K); tinyllm dequantizes to float32 once at load.

A GGUF file holds metadata (architecture, shapes, tokenizer) and tensors, many of them
quantized in blocks (Q4_1: 32 weights share a scale and a minimum). Asked to
(`keep_quantized`), the loader keeps the linear layers' weights in the five block formats
tinyllm.quant knows (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) as QuantizedMatrix objects, the file's
bits split into planes, and never expands them here; norms, the embedding table and every
other type are dequantized as above.

Llama GGUF files store the Q and K projection rows permuted: the converter reorders
each head's rows so that RoPE can rotate *adjacent* channel pairs (2i, 2i+1). tinyllm
rotates channel i with i + E/2 (the Hugging Face layout), so the permutation is undone
here, per head — with the KV-head count for K, which has fewer heads under GQA.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import CheckpointError
from ..quant import BLOCKS, QuantizedMatrix
from .safetensors import shared_type

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

# Metadata value types (gguf.GGUFValueType) -> struct code of their fixed-size values.
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY, UINT32 = 8, 9, 4
VERSIONS = (2, 3)
MAX_DIMS = 4                # ggml tensors have at most four dimensions
DEFAULT_ALIGNMENT = 32
# Parsed metadata becomes Python objects, many times larger than their bytes in the file:
# a file may claim a million-entry array in a few megabytes. The largest vocabularies in
# use (about a quarter of a million tokens, with their merges, scores and types) stay well
# below these limits.
MAX_METADATA_VALUES = 1 << 22
MAX_TENSORS = 1 << 16


@dataclass
class TensorInfo:
    """One entry of the tensor directory; `data` is a read-only view of its bytes."""
    name: str
    tensor_type: object     # gguf.GGMLQuantizationType
    shape: tuple            # GGUF order: innermost dimension first
    n_bytes: int
    data_offset: int        # from the start of the file
    data: np.ndarray        # uint8, [*outer dims, bytes of one row]


class GGUFFile:
    """A GGUF file's metadata (`fields`: key -> Python value) and tensor directory
    (`tensors`), read with every length checked against the bytes that exist."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        if self.size < 24:
            raise self.error(f"not a readable GGUF file (only {self.size} bytes)")
        with open(self.path, "rb") as f:
            self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.pos = 0
        if self.buf[:4] != b"GGUF":
            raise self.error(f"not a readable GGUF file (starts with {bytes(self.buf[:4])!r}, expected b'GGUF')")
        self.pos = 4
        version = self.scalar(UINT32, "the version")
        if version not in VERSIONS:
            big_endian = version & 0xFFFF == 0
            raise self.error(f"GGUF version {version} is not supported (expected 2 or 3)"
                             + (", and big-endian files are not read" if big_endian else ""))
        n_tensors = self.scalar(10, "the tensor count")
        n_fields = self.scalar(10, "the metadata count")
        # The smallest entry: an empty key, its type and a one-byte value.
        self.check_count(n_fields, 13, "metadata count")
        if n_fields > MAX_METADATA_VALUES:
            raise self.error(f"metadata count {n_fields} is more than {MAX_METADATA_VALUES}")
        self.values_left = MAX_METADATA_VALUES - n_fields
        self.fields = {}
        for _ in range(n_fields):
            key = self.string("a metadata key")
            if key in self.fields:
                raise self.error(f"metadata key {key!r} appears twice")
            self.fields[key] = self.value(self.scalar(UINT32, f"the type of {key!r}"), key)
        alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self.error(f"general.alignment is {alignment!r}, expected a power of two")
        # The smallest tensor entry: an empty name, one dimension, its type and offset.
        self.check_count(n_tensors, 32, "tensor count")
        if n_tensors > MAX_TENSORS:
            raise self.error(f"tensor count {n_tensors} is more than {MAX_TENSORS}")
        entries = [self.tensor_entry() for _ in range(n_tensors)]
        data_start = -(-self.pos // alignment) * alignment
        self.tensors = [self.tensor(*entry, data_start, alignment) for entry in entries]
        self.check_overlaps()

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def take(self, n: int, what: str) -> int:
        """The offset of the next `n` bytes, which must exist; advances past them."""
        if n > self.size - self.pos:
            raise self.error(f"truncated or damaged: {what} needs {n} bytes at offset {self.pos}, "
                             f"the file has {self.size - self.pos} left")
        start, self.pos = self.pos, self.pos + n
        return start

    def check_count(self, count: int, min_size: int, what: str) -> None:
        if count * min_size > self.size - self.pos:
            raise self.error(f"{what} {count} cannot fit in the {self.size - self.pos} bytes left at offset {self.pos}")

    def scalar(self, value_type: int, what: str):
        code = "<" + SCALARS[value_type]
        return struct.unpack_from(code, self.buf, self.take(struct.calcsize(code), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar(10, f"the length of {what}")
        start = self.take(n, what)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} at offset {start} is not UTF-8") from None

    def value(self, value_type: int, key: str):
        """One metadata value; arrays hold scalars or strings (as llama.cpp reads them)."""
        if value_type in SCALARS:
            return self.scalar(value_type, f"the value of {key!r}")
        if value_type == STRING:
            return self.string(f"the value of {key!r}")
        if value_type != ARRAY:
            raise self.error(f"metadata {key!r} has unknown value type {value_type}")
        item_type = self.scalar(UINT32, f"the item type of {key!r}")
        n = self.scalar(10, f"the length of {key!r}")
        if item_type not in SCALARS and item_type != STRING:
            raise self.error(f"metadata array {key!r} has item type {item_type}, expected a number, bool or string type")
        self.values_left -= n
        if self.values_left < 0:
            raise self.error(f"metadata array {key!r} of {n} items takes the metadata past {MAX_METADATA_VALUES} values")
        if item_type == STRING:
            self.check_count(n, 8, f"array {key!r}: length")
            return [self.string(f"item {i} of {key!r}") for i in range(n)]
        dtype = np.dtype("<" + SCALARS[item_type].replace("?", "B"))
        start = self.take(n * dtype.itemsize, f"array {key!r} of {n} items")
        items = np.frombuffer(self.buf, dtype, n, start)
        return (items != 0).tolist() if SCALARS[item_type] == "?" else items.tolist()

    def tensor_entry(self):
        name = self.string("a tensor name")
        n_dims = self.scalar(UINT32, f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self.error(f"tensor {name!r} has {n_dims} dimensions, expected 1 to {MAX_DIMS}")
        dims = tuple(self.scalar(10, f"the dimensions of tensor {name!r}") for _ in range(n_dims))
        return name, dims, self.scalar(UINT32, f"the type of tensor {name!r}"), self.scalar(10, f"the offset of tensor {name!r}")

    def tensor(self, name: str, dims: tuple, raw_type: int, offset: int, data_start: int, alignment: int) -> TensorInfo:
        """A tensor's view, once its type, shape and place in the data section are checked."""
        import gguf

        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise self.error(f"tensor {name!r} has unknown ggml type {raw_type}") from None
        if dims[0] % block:
            raise self.error(f"tensor {name!r}: row length {dims[0]} is not a multiple of the {qtype.name} block ({block})")
        n_bytes = int(np.prod(dims, dtype=object)) // block * type_size  # Python ints: no overflow
        if offset % alignment:
            raise self.error(f"tensor {name!r}: offset {offset} is not a multiple of the alignment ({alignment})")
        start = data_start + offset
        if start + n_bytes > self.size:
            raise self.error(f"truncated or damaged: tensor {name!r} ({list(dims)}, {qtype.name}) ends at byte "
                             f"{start + n_bytes}, the file has {self.size}")
        rows = tuple(reversed(dims[1:]))
        data = np.frombuffer(self.buf, np.uint8, n_bytes, start).reshape(*rows, dims[0] // block * type_size)
        return TensorInfo(name, qtype, dims, n_bytes, start, data)

    def check_overlaps(self) -> None:
        seen = set()
        for t in self.tensors:
            if t.name in seen:
                raise self.error(f"tensor {t.name!r} appears twice")
            seen.add(t.name)
        spans = sorted((t.data_offset, t.data_offset + t.n_bytes, t.name) for t in self.tensors if t.n_bytes)
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            if start < end:
                raise self.error(f"tensors {first!r} and {second!r} overlap in the file")


def open_gguf(path: Path) -> GGUFFile:
    return GGUFFile(path)


def field_values(reader: GGUFFile) -> dict:
    """GGUF metadata as plain Python values (strings, numbers, lists)."""
    return reader.fields


def unpermute(w, n_heads: int):
    """Undo the converter's per-head row order (pairs interleaved) -> halves split.  [N*E, D]
    Rows are whole, so a QuantizedMatrix is reordered plane by plane, without expanding it."""
    rows = w.shape[0]
    # per head, rows are (E/2 pairs, 2) in the file; tinyllm wants (2 halves, E/2)
    order = np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).swapaxes(1, 2).reshape(rows)
    return w.take_rows(order) if isinstance(w, QuantizedMatrix) else w[order]


def dequantize(tensor: TensorInfo, path: Path) -> np.ndarray:
    import gguf

    try:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} uses quantization {tensor.tensor_type.name}, "
            "which the gguf package cannot dequantize") from None


def keeps_blocks(tensor: TensorInfo, hf_name: str, config: Config) -> bool:
    """Whether a tensor may stay block-quantized: a linear layer's weight (the q/k/v/o and
    gate/up/down projections, the LM head, and the embedding when it is also the LM head)
    in a format tinyllm.quant knows."""
    linear = hf_name.endswith("_proj.weight") or hf_name == "lm_head.weight" or (
        hf_name == "model.embed_tokens.weight" and config.tie_embeddings)
    return linear and len(tensor.shape) == 2 and tensor.tensor_type.name.lower() in BLOCKS


def read_gguf(path: str | Path, progress=None, keep_quantized: bool = False):
    """Config, Hugging Face-named float32 tensors, the metadata fields of a GGUF file, and the
    type its matrices are stored in ("float32", "float16", "bfloat16"; None when they do not
    share one of those: block-quantized files).
    `keep_quantized`: linear weights in a block format tinyllm.quant knows stay as they are,
    as QuantizedMatrix objects (see `keeps_blocks`).
    `progress(fraction)`, if given, is called after each tensor is read."""
    path = Path(path)
    reader = open_gguf(path)
    fields = field_values(reader)
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
        heads = {"q_proj": config.n_heads, "k_proj": config.n_kv_heads}.get(hf_name.split(".")[-2])
        if heads is not None and t.shape[1:] != (heads * config.head_dim,):
            # checked here, before unpermute reshapes the rows head by head
            raise CheckpointError(f"{path}: tensor {t.name!r} has shape {list(reversed(t.shape))}, "
                                  f"expected [{heads * config.head_dim}, {config.dim}]")
        if keep_quantized and keeps_blocks(t, hf_name, config):
            w = QuantizedMatrix.from_gguf(t.data, t.tensor_type.name.lower(), t.shape[1], t.shape[0])
        else:
            w = dequantize(t, path)
        tensors[hf_name] = w if heads is None else unpermute(w, heads)
    return config, tensors, fields, shared_type({t.tensor_type.name for t in reader.tensors if len(t.shape) == 2})


def hf_tensor_name(name: str) -> str | None:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".")  # blk.{i}.{kind}.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None
