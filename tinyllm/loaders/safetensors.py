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
MAX_HEADER = 100_000_000  # the format's own limit on the JSON header


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32: bfloat16 is the top half of a float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Map every tensor of one file; F16 stays float16, BF16 becomes float32."""
    path = Path(path)
    entries, data_start = read_header(path)
    end = max((stop for _, _, _, _, stop in entries), default=0)
    if end == 0:  # nothing to map (np.memmap refuses an empty map)
        return {name: np.zeros(shape, DTYPES[dtype]) for name, dtype, shape, _, _ in entries}
    buf = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(end,))
    tensors = {}
    for name, dtype, shape, begin, stop in entries:
        arr = buf[begin:stop].view(DTYPES[dtype]).reshape(shape)
        tensors[name] = bf16_to_f32(arr) if dtype == "BF16" else arr
    return tensors


STORED = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors' and GGML's names alike


def shared_type(kinds) -> str | None:
    """The dtype name ("float32", "float16" or "bfloat16") of a checkpoint's matrices, given
    the set of their file types, when they share one of those; None otherwise."""
    return STORED.get(next(iter(kinds))) if len(kinds) == 1 else None


def stored_dtype(files) -> str | None:
    """shared_type of the files' matrices, read from their headers alone."""
    return shared_type({dtype for path in files for _, dtype, shape, _, _ in read_header(Path(path))[0]
                        if len(shape) == 2})


def read_header(path: Path) -> tuple[list[tuple], int]:
    """(check_header's entries, the offset of the data section) of one file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated or not safetensors (header of {n} bytes, file of {size})")
        if n > MAX_HEADER:
            raise CheckpointError(f"{path}: not a safetensors file (header of {n} bytes, the format allows {MAX_HEADER})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):  # not JSON, not UTF-8, too deep, a number too long
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    return check_header(path, header, size - (8 + n)), 8 + n


def check_header(path: Path, header, data_size: int) -> list[tuple]:
    """The header's tensors as (name, dtype, shape, begin, end), once the schema is checked:
    a JSON object whose entries each have a known `dtype`, a `shape` of non-negative ints and
    `data_offsets` [begin, end] inside the data section, holding exactly dtype x shape bytes,
    with no two tensors sharing a byte."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is a JSON {type(header).__name__}, expected an object")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise CheckpointError(f"{path}: the header's __metadata__ is not an object")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: expected an object with dtype, shape and data_offsets, got {_kind(info)}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{where} has dtype {dtype!r}; expected F32, F16 or BF16")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {_kind(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {_kind(offsets)}")
        begin, end = offsets
        if end > data_size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data, "
                                  f"which has {data_size} bytes")
        n_bytes = int(np.prod(shape, dtype=object)) * np.dtype(DTYPES[dtype]).itemsize  # Python ints: no overflow
        if end - begin != n_bytes:
            raise CheckpointError(f"{where}: {end - begin} bytes do not hold shape {shape} of {dtype} ({n_bytes} bytes)")
        entries.append((name, dtype, tuple(shape), begin, end))
    spans = sorted((begin, end, name) for name, _, _, begin, end in entries if end > begin)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {first!r} and {second!r} overlap in the data")
    return entries


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value) -> str:
    """A short description of a JSON value for an error message (never the whole value)."""
    text = json.dumps(value)
    return text if len(text) <= 40 else f"a JSON {type(value).__name__}"


def checkpoint_files(directory: Path) -> tuple[dict | None, list[Path]]:
    """(the index's weight map or None, the safetensors files) of a Hugging Face directory."""
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return None, sorted(directory.glob("*.safetensors"))
    weight_map = read_weight_map(index)
    files = [directory / shard for shard in sorted(set(weight_map.values()))]
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{index}: shard {file.name} is listed but missing from {directory}")
    return weight_map, files


def read_checkpoint_dir(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of a Hugging Face directory: sharded (with an index) or single-file."""
    index = directory / "model.safetensors.index.json"
    weight_map, files = checkpoint_files(directory)
    tensors, found_in = {}, {}
    for file in files:
        for name, arr in read_safetensors(file).items():
            if name in found_in:
                raise CheckpointError(f"{file}: tensor {name!r} is also in {found_in[name]}")
            tensors[name], found_in[name] = arr, file.name
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index}: tensors listed but not found in the shards: {', '.join(missing[:5])}")
    return tensors


def read_weight_map(index: Path) -> dict[str, str]:
    """The index's `weight_map`: tensor name -> the shard file (beside the index) holding it."""
    try:
        raw = json.loads(index.read_bytes())
    except (ValueError, RecursionError):
        raise CheckpointError(f"{index}: not valid JSON") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map' object")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{index}: weight_map[{name!r}] must be the file name of a shard beside "
                                  f"the index, got {_kind(shard)}")
    return weight_map
