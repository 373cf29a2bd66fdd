"""The model's shape, read from a checkpoint and checked before anything is allocated.

Shape letters used in comments across tinyllm:

    B  batch (sequences in one forward)       T  new tokens in this forward
    S  positions held in the KV cache         D  model width (hidden_size)
    H  query heads                            K  key/value heads (K < H: grouped-query attention)
    R  query heads per KV head (H // K)       E  head dimension (head_dim)
    F  MLP width (intermediate_size)          V  vocabulary size
    L  layers

A Config comes from a Hugging Face `config.json` (`Config.from_hf`) or from the
`llama.*` metadata of a GGUF file (`Config.from_gguf_fields`). Each value is checked for
its type as it is read (a file may hold a string where a number belongs) and every field
again in `__post_init__`; a missing, mistyped or inconsistent one raises a ConfigError naming it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

SUPPORTED_ROPE_SCALING = ("llama3", "linear")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. 'linear' divides every frequency by `factor`; 'llama3'
    (Llama 3.1+) leaves high frequencies alone, divides low ones by `factor` and blends
    the band between `low_freq_factor` and `high_freq_factor`."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class Config:
    dim: int                      # D
    n_layers: int                 # L
    n_heads: int                  # H
    n_kv_heads: int               # K
    hidden_dim: int               # F
    vocab_size: int               # V
    head_dim: int = 0             # E; 0 means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048       # the model's trained context
    tie_embeddings: bool = False  # LM head shares the token embedding matrix
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    source: str = "config"        # where the fields came from, for error messages

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{self.source}: {name} must be a positive integer, got {value!r}")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ConfigError(f"{self.source}: hidden size {self.dim} is not divisible by {self.n_heads} heads")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if not _is_int(self.head_dim) or self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"{self.source}: head_dim must be a positive even integer, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{self.source}: num_attention_heads ({self.n_heads}) must be a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})")
        if not _is_number(self.norm_eps) or not self.norm_eps > 0:
            raise ConfigError(f"{self.source}: rms_norm_eps must be > 0, got {self.norm_eps!r}")
        if not _is_number(self.rope_theta) or not self.rope_theta > 0:
            raise ConfigError(f"{self.source}: rope_theta must be > 0, got {self.rope_theta!r}")
        for tid in (*self.eos_token_ids, *([self.bos_token_id] if self.bos_token_id is not None else [])):
            if not _is_int(tid) or not 0 <= tid < self.vocab_size:
                raise ConfigError(f"{self.source}: token id {tid!r} is outside the vocabulary (size {self.vocab_size})")

    @property
    def n_rep(self) -> int:
        """R: how many query heads share one key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    # ---- from a Hugging Face config.json -------------------------------------------
    @classmethod
    def from_hf(cls, path: str | Path) -> "Config":
        path = Path(path)
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep, a number too long
            raise ConfigError(f"{path}: not valid JSON ({' '.join(str(e).split())[:200]})") from None
        return cls.from_hf_dict(raw, source=str(path))

    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config.json") -> "Config":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {_json_type(raw)}")

        def get(key, kind, default=None):
            value = raw.get(key)
            return _typed(default if value is None else value, kind, key, source)

        archs = get("architectures", "list") or []
        model_type = get("model_type", "string")
        if model_type not in (None, "llama") or any(a != "LlamaForCausalLM" for a in archs):
            raise ConfigError(
                f"{source}: unsupported architecture {model_type or archs!r}; tinyllm runs Llama models "
                "(model_type 'llama', LlamaForCausalLM)")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act must be 'silu', got {raw['hidden_act']!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise ConfigError(f"{source}: {flag}=true is not supported")

        def need(key):
            if key not in raw:
                raise ConfigError(f"{source}: missing field {key!r}")
            return get(key, "integer")

        # transformers 5 keeps rope settings under rope_parameters; older files use top-level keys.
        rope = dict(get("rope_parameters", "object") or {})
        theta = next((v for v in (rope.get("rope_theta"), raw.get("rope_theta")) if v is not None), 10000.0)
        theta = _typed(theta, "number", "rope_theta", source)
        scaling = get("rope_scaling", "object") or (rope if rope.get("rope_type", "default") != "default" else None)
        n_heads = need("num_attention_heads")
        eos = raw.get("eos_token_id")  # one id or a list of them
        eos_ids = tuple(_typed(e, "integer", "eos_token_id", source)
                        for e in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
        return cls(
            dim=need("hidden_size"),
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=get("num_key_value_heads", "integer") or n_heads,
            hidden_dim=need("intermediate_size"),
            vocab_size=need("vocab_size"),
            head_dim=get("head_dim", "integer") or 0,
            norm_eps=float(get("rms_norm_eps", "number", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=_rope_scaling(scaling, source),
            max_seq_len=get("max_position_embeddings", "integer", 2048),
            tie_embeddings=get("tie_word_embeddings", "boolean", False),
            bos_token_id=get("bos_token_id", "integer"),
            eos_token_ids=eos_ids,
            source=source,
        )

    # ---- from GGUF metadata ------------------------------------------------------------
    @classmethod
    def from_gguf_fields(cls, fields: dict, source: str, has_output_tensor: bool) -> "Config":
        """`fields` maps GGUF keys to plain Python values (see loaders.gguf)."""
        arch = fields.get("general.architecture")
        if arch != "llama":
            raise ConfigError(
                f"{source}: unsupported architecture {arch!r} (general.architecture); tinyllm runs 'llama' GGUF files")

        def get(key, kind, default=None):
            value = fields.get(key)
            return _typed(default if value is None else value, kind, key, source)

        def need(key):
            if key not in fields:
                raise ConfigError(f"{source}: missing GGUF field {key!r}")
            return get(key, "integer")

        n_heads = need("llama.attention.head_count")
        tokens = get("tokenizer.ggml.tokens", "list") or []
        vocab = get("llama.vocab_size", "integer") or len(tokens) or need("llama.vocab_size")
        if len(tokens) > vocab:
            raise ConfigError(f"{source}: tokenizer.ggml.tokens has {len(tokens)} tokens, more than "
                              f"llama.vocab_size ({vocab}) rows of the embedding")
        scaling = None
        if get("llama.rope.scaling.type", "string") in ("linear",):
            scaling = {"rope_type": "linear", "factor": get("llama.rope.scaling.factor", "number", 1.0)}
        eos = get("tokenizer.ggml.eos_token_id", "integer")
        eos_ids = [eos] if eos is not None else []
        eot = get("tokenizer.ggml.eot_token_id", "integer")  # end-of-turn, e.g. Llama 3's <|eot_id|>
        if eot is not None and eot not in eos_ids:
            eos_ids.append(eot)
        return cls(
            dim=need("llama.embedding_length"),
            n_layers=need("llama.block_count"),
            n_heads=n_heads,
            n_kv_heads=get("llama.attention.head_count_kv", "integer", n_heads),
            hidden_dim=need("llama.feed_forward_length"),
            vocab_size=vocab,
            head_dim=get("llama.rope.dimension_count", "integer", 0) or 0,
            norm_eps=float(get("llama.attention.layer_norm_rms_epsilon", "number", 1e-5)),
            rope_theta=float(get("llama.rope.freq_base", "number", 10000.0)),
            rope_scaling=_rope_scaling(scaling, source),
            max_seq_len=get("llama.context_length", "integer", 2048),
            tie_embeddings=not has_output_tensor,
            bos_token_id=get("tokenizer.ggml.bos_token_id", "integer"),
            eos_token_ids=tuple(eos_ids),
            source=source,
        )


def _rope_scaling(raw: dict | None, source: str) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in SUPPORTED_ROPE_SCALING:
        raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_SCALING)})")
    if raw.get("factor") is None:
        raise ConfigError(f"{source}: rope_scaling of type {kind!r} needs a 'factor'")

    def get(key, kind, default):
        value = raw.get(key)
        value = _typed(default if value is None else value, kind, f"rope_scaling.{key}", source)
        if not value > 0:
            raise ConfigError(f"{source}: rope_scaling.{key} must be > 0, got {value!r}")
        return value

    factor = float(get("factor", "number", None))
    if kind == "linear":
        return RopeScaling("linear", factor)
    low, high = float(get("low_freq_factor", "number", 1.0)), float(get("high_freq_factor", "number", 4.0))
    if not high > low:  # the band between them is blended by dividing by their difference
        raise ConfigError(f"{source}: rope_scaling.high_freq_factor ({high}) must be greater than low_freq_factor ({low})")
    return RopeScaling("llama3", factor, low_freq_factor=low, high_freq_factor=high,
                       original_max_position_embeddings=get("original_max_position_embeddings", "integer", 8192))


# ---- checking the types of values read from files ----------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def _is_number(value) -> bool:
    try:
        return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


_KINDS = {
    "integer": _is_int,
    "number": _is_number,
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "list": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def _typed(value, kind: str, key: str, source: str):
    """`value` if it is absent (None) or of the JSON type `kind`, else a ConfigError naming `key`."""
    if value is not None and not _KINDS[kind](value):
        article = "an" if kind[0] in "aeiou" else "a"
        raise ConfigError(f"{source}: {key} must be {article} {kind}, got {_json_type(value)} {_short(value)}")
    return value


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
