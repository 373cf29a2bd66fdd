"""Reading safetensors files: a JSON header, then raw little-endian tensor bytes.

    [8 bytes: header length N][N bytes: JSON {name: {dtype, shape, data_offsets}}][data]

The `safetensors` package's NumPy API cannot return bfloat16 (NumPy has no such type),
and most Llama checkpoints are bfloat16. The format is simple enough to map directly:
each tensor becomes a read-only view into a memory-mapped file, and bfloat16 is widened
to float32 by shifting its 16 bits into the top half of a float32.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32: bfloat16 is the top half of a float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Map every tensor of one file; F16 stays float16, BF16 becomes float32."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated or not safetensors (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if data_start + end > size:
        raise CheckpointError(f"{path}: truncated: tensors need {data_start + end} bytes, file has {size}")
    if not header:
        return {}
    buf = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(end,))
    tensors = {}
    for name, info in header.items():
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']}; expected F32, F16 or BF16")
        begin, stop = info["data_offsets"]
        shape = tuple(info["shape"])
        if stop - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise CheckpointError(f"{path}: tensor {name!r}: {stop - begin} bytes do not hold shape {list(shape)} of {info['dtype']}")
        arr = buf[begin:stop].view(dtype).reshape(shape)
        tensors[name] = bf16_to_f32(arr) if info["dtype"] == "BF16" else arr
    return tensors


def read_checkpoint_dir(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of a Hugging Face directory: sharded (with an index) or single-file."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map'") from None
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).exists():
                raise CheckpointError(f"{index}: shard {shard} is listed but missing from {directory}")
            tensors.update(read_safetensors(directory / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index}: tensors listed but not found in the shards: {', '.join(missing[:5])}")
        return tensors
    files = sorted(directory.glob("*.safetensors"))
    tensors = {}
    for file in files:
        tensors.update(read_safetensors(file))
    return tensors
