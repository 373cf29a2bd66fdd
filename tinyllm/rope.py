"""Rotary position embeddings (RoPE), built once and sliced by position.

Each pair of channels (i, i + E/2) of a query or key head is rotated by the angle
`position * inv_freq[i]`. Rotating q and k by their own positions makes the dot
product q·k depend only on the distance between them.

tinyllm uses one convention everywhere: the *half-split* pairing (channel i with
channel i + E/2), as Hugging Face checkpoints are laid out. GGUF files store Llama's
Q/K rows permuted for the *interleaved* pairing (2i with 2i+1); the GGUF loader
undoes that permutation once at load, so this module never needs a second variant.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import array_module
from .config import Config, RopeScaling


def inverse_frequencies(config: Config, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """inv_freq[i] = theta^(-2i/E), with the checkpoint's frequency scaling. [E/2] float64."""
    e = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, e, 2, dtype=np.float64) / e))
    if config.rope_scaling is not None:
        inv_freq = _scale(inv_freq, config.rope_scaling)
    if freq_factors is not None:  # GGUF stores Llama 3 scaling as per-frequency divisors
        inv_freq = inv_freq / freq_factors.astype(np.float64)
    return inv_freq


def _scale(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    if s.kind == "linear":
        return inv_freq / s.factor
    # llama3: wavelengths longer than the original context are stretched by `factor`,
    # shorter than original/high_freq_factor are kept, the band between is blended.
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, out)


def rope_tables(config: Config, n_positions: int, xp=np, freq_factors=None):
    """cos and sin for every position, computed in float64 and stored float32. [S, E/2] each."""
    angles = np.outer(np.arange(n_positions, dtype=np.float64), inverse_frequencies(config, freq_factors))
    return xp.asarray(np.cos(angles), dtype=np.float32), xp.asarray(np.sin(angles), dtype=np.float32)


# Positions a model's tables cover when it is built. A checkpoint may claim any context
# length; the tables grow to what a cache actually holds, so a huge claim allocates nothing.
INITIAL_POSITIONS = 32768


class RopeTables:
    """cos and sin [S, E/2] for positions [0, S), grown when a cache needs more positions.

    A captured CUDA graph keeps the address of the tables it was captured with, so tables
    that have been replaced are kept alive (growth doubles, so they add at most as much
    again); every cache is made after `ensure` covered its capacity, so the graph of any
    cache reads tables that cover it."""

    def __init__(self, config: Config, xp=np, freq_factors=None):
        self.config, self.xp, self.freq_factors = config, xp, freq_factors
        self.cos = self.sin = None
        self._retired = []
        self.ensure(min(config.max_seq_len, INITIAL_POSITIONS))

    @property
    def positions(self) -> int:
        return 0 if self.cos is None else self.cos.shape[0]

    def ensure(self, n: int) -> None:
        """Cover positions [0, n) (n at most the model's context length)."""
        if n <= self.positions:
            return
        n = min(max(n, 2 * self.positions), self.config.max_seq_len)
        if self.cos is not None:
            self._retired.append((self.cos, self.sin))
        self.cos, self.sin = rope_tables(self.config, n, self.xp, self.freq_factors)


def apply_rope(x, cos, sin):
    """Rotate channel pairs (i, i + E/2) of every head.
    x: [B, T, N, E]; cos, sin: [T, E/2] (one position per token) or [B, T, E/2] (per sequence)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos[..., None, :]  # [..., T, E/2] -> [..., T, 1, E/2], broadcast over heads
    sin = sin[..., None, :]
    xp = array_module(x)
    return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype, copy=False)
