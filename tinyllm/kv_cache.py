"""The KV cache: keys and values of every position seen so far, per layer.

Decoding one token needs the keys and values of all earlier tokens. Recomputing them
would make each step cost as much as the whole prompt, so each layer writes its new
K and V into preallocated arrays at slots [pos, pos+T) and attention reads [0, pos+T).

Memory: 2 (K and V) x L x K x E x bytes per element, per position. SmolLM2-135M in
float32: 2 x 30 x 3 x 64 x 4 = 46 KB per token; TinyLlama-1.1B in float16:
2 x 22 x 4 x 64 x 2 = 22.5 KB per token.
"""
from __future__ import annotations

import numpy as np

from .config import Config
from .errors import ContextOverflowError

# Causal masks are built once for prompts up to this many tokens at a time; the model
# prefills longer prompts in chunks of this size.
PREFILL_CHUNK = 512


_masks: dict = {}


def _block_mask(n: int, xp):
    """-inf above the diagonal: query i of a block may not see key j > i of the same block.
    Built once per size and device (a server makes a cache per request; 1 MB each otherwise)."""
    device = None if xp is np else xp.cuda.Device().id
    key = (xp.__name__, device, n)
    if key not in _masks:
        _masks[key] = xp.asarray(np.triu(np.full((n, n), -np.inf, dtype=np.float32), k=1))
    return _masks[key]


class KVCache:
    def __init__(self, config: Config, capacity: int, dtype, xp=np, batch: int = 1):
        if capacity <= 0:
            raise ContextOverflowError(f"KV cache capacity must be positive, got {capacity}")
        self.capacity = capacity  # S_max
        self._length = 0          # positions filled so far: moved only by advance() and trim()
        shape = (batch, config.n_kv_heads, capacity, config.head_dim)  # [B, K, S_max, E]
        # one array for all of it, [2, L, B, K, S_max, E], so that a span of positions of every
        # layer moves in one copy (prefix.py); each layer's k and v are views into it
        self.kv = xp.zeros((2, config.n_layers) + shape, dtype=dtype)
        self.k = [self.kv[0, layer] for layer in range(config.n_layers)]
        self.v = [self.kv[1, layer] for layer in range(config.n_layers)]
        self.block_mask = _block_mask(min(capacity, PREFILL_CHUNK), xp)  # [T, T], shared by every cache
        self.pool, self.pool_row = None, 0  # set on the views that row() returns

    def row(self, i: int) -> "KVCache":
        """Row i of a batched cache as a cache of its own (length 0) that shares its memory.

        A server preallocates one cache of B rows and gives each running request a row: no
        allocation per request, and a fused kernel can reach every row from one base address
        (tinyllm/cuda/batch.py). Everything else treats the row as an ordinary cache."""
        view = KVCache.__new__(KVCache)
        view.capacity, view._length = self.capacity, 0
        view.kv = self.kv[:, :, i:i + 1]       # [2, L, 1, K, S_max, E]
        view.k = [a[i:i + 1] for a in self.k]  # [1, K, S_max, E] views
        view.v = [a[i:i + 1] for a in self.v]
        view.block_mask = self.block_mask
        view.pool, view.pool_row = self, i
        return view

    def view(self) -> "KVCache":
        """The same memory with a position of its own: a CUDA graph is captured on a view, so
        the capture's own writes never move the position of the cache it serves."""
        view = KVCache.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        return view

    @property
    def length(self) -> int:
        """The next token's position: how many positions hold keys and values."""
        return self._length

    def advance(self, n: int) -> None:
        """Count n positions written at [length, length + n): called by whatever wrote them
        (the forward pass, or a replayed decode step), once the write is done."""
        self.check_room(n)
        self._length += n

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.capacity:
            raise ContextOverflowError(
                f"context overflow: {self.length} cached + {n_new} new tokens > capacity {self.capacity} "
                "(raise --max-context, up to the model's context length)")

    def update(self, layer: int, k, v, pos: int):
        """Write k, v ([B, K, T, E]) at [pos, pos+T) and return all keys/values [B, K, pos+T, E]."""
        t = k.shape[2]
        self.k[layer][:, :, pos:pos + t] = k
        self.v[layer][:, :, pos:pos + t] = v
        return self.k[layer][:, :, :pos + t], self.v[layer][:, :, :pos + t]

    def mask(self, t: int):
        """The causal mask of a block of t new tokens, [T, T]; None for one token (it sees everything)."""
        return None if t == 1 else self.block_mask[:t, :t]

    def trim(self, n: int) -> None:
        """Forget the last n positions (the next write overwrites them)."""
        self._length = max(0, self._length - n)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)  # a row: its share only
