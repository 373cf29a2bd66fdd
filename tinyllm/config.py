"""The model's shape, read from a checkpoint and checked before anything is allocated.

Shape letters used in comments across tinyllm:

    B  batch (sequences in one forward)       T  new tokens in this forward
    S  positions held in the KV cache         D  model width (hidden_size)
    H  query heads                            K  key/value heads (K < H: grouped-query attention)
    R  query heads per KV head (H // K)       E  head dimension (head_dim)
    F  MLP width (intermediate_size)          V  vocabulary size
    L  layers

A Config comes from a Hugging Face `config.json` (`Config.from_hf`) or from the
`llama.*` metadata of a GGUF file (`Config.from_gguf_fields`). Every field is checked
in `__post_init__`; a missing or inconsistent one raises a ConfigError naming it.
"""
from __future__ import annotations

import json
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
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"{self.source}: head_dim must be a positive even integer, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{self.source}: num_attention_heads ({self.n_heads}) must be a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})")
        if not self.norm_eps > 0:
            raise ConfigError(f"{self.source}: rms_norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"{self.source}: rope_theta must be > 0, got {self.rope_theta!r}")
        for tid in (*self.eos_token_ids, *([self.bos_token_id] if self.bos_token_id is not None else [])):
            if not 0 <= tid < self.vocab_size:
                raise ConfigError(f"{self.source}: token id {tid} is outside the vocabulary (size {self.vocab_size})")

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
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(raw, source=str(path))

    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config.json") -> "Config":
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
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
            return raw[key]

        # transformers 5 keeps rope settings under rope_parameters; older files use top-level keys.
        rope = dict(raw.get("rope_parameters") or {})
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        n_heads = need("num_attention_heads")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            dim=need("hidden_size"),
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=raw.get("num_key_value_heads") or n_heads,
            hidden_dim=need("intermediate_size"),
            vocab_size=need("vocab_size"),
            head_dim=raw.get("head_dim") or 0,
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=_rope_scaling(scaling, source),
            max_seq_len=raw.get("max_position_embeddings", 2048),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
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

        def need(key):
            if key not in fields:
                raise ConfigError(f"{source}: missing GGUF field {key!r}")
            return fields[key]

        n_heads = int(need("llama.attention.head_count"))
        dim = int(need("llama.embedding_length"))
        vocab = fields.get("llama.vocab_size") or len(fields.get("tokenizer.ggml.tokens") or [])
        scaling = None
        if fields.get("llama.rope.scaling.type") in ("linear",):
            scaling = {"rope_type": "linear", "factor": fields.get("llama.rope.scaling.factor", 1.0)}
        eos = fields.get("tokenizer.ggml.eos_token_id")
        eos_ids = [int(eos)] if eos is not None else []
        eot = fields.get("tokenizer.ggml.eot_token_id")  # end-of-turn, e.g. Llama 3's <|eot_id|>
        if eot is not None and int(eot) not in eos_ids:
            eos_ids.append(int(eot))
        bos = fields.get("tokenizer.ggml.bos_token_id")
        return cls(
            dim=dim,
            n_layers=int(need("llama.block_count")),
            n_heads=n_heads,
            n_kv_heads=int(fields.get("llama.attention.head_count_kv", n_heads)),
            hidden_dim=int(need("llama.feed_forward_length")),
            vocab_size=int(vocab) if vocab else need("llama.vocab_size"),
            head_dim=int(fields.get("llama.rope.dimension_count", 0)) or 0,
            norm_eps=float(fields.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(fields.get("llama.rope.freq_base", 10000.0)),
            rope_scaling=_rope_scaling(scaling, source),
            max_seq_len=int(fields.get("llama.context_length", 2048)),
            tie_embeddings=not has_output_tensor,
            bos_token_id=None if bos is None else int(bos),
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
    if "factor" not in raw:
        raise ConfigError(f"{source}: rope_scaling of type {kind!r} needs a 'factor'")
    factor = float(raw["factor"])
    if kind == "linear":
        return RopeScaling("linear", factor)
    return RopeScaling(
        "llama3", factor,
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
    )
