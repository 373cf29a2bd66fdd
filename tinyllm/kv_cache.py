"""The KV cache: keys and values of every position seen so far, per layer.

Decoding one token needs the keys and values of all earlier tokens. Recomputing them
would make each step cost as much as the whole prompt, so each layer writes its new
K and V into preallocated arrays at slots [pos, pos+T) and attention reads [0, pos+T).

Memory: 2 (K and V) x L x K x E x bytes per element, per position. SmolLM2-135M in
float32: 2 x 30 x 3 x 64 x 4 = 46 KB per token; TinyLlama-1.1B in float16:
2 x 22 x 4 x 64 x 2 = 22.5 KB per token.

Two layouts, one interface (the model cannot tell them apart):

    KVCache       contiguous: [2, L, B, K, S_max, E], all S_max positions held from the start
                  (one sequence, or B rows of one array for a batch)
    PagedKVCache  paged: a sequence's positions in blocks of a BlockPool shared by many
                  sequences, [2, L, N, K, BLOCK, E], taken as the sequence grows and listed
                  by its row of a block table; what a server with many sequences uses on the
                  GPU, where memory would otherwise be held for lengths never reached
"""
from __future__ import annotations

import numpy as np

from .config import Config
from .errors import ContextOverflowError

# Causal masks are built once for prompts up to this many tokens at a time; the model
# prefills longer prompts in chunks of this size.
PREFILL_CHUNK = 512


def page_size(head_dim: int) -> int:
    """Positions per block of a paged cache (BlockPool): the GPU attention's chunk (256 positions
    for a head dim up to 64, 128 above: a chunk's values must fit in a block's shared memory),
    so that each chunk the kernel reads is one block, found through the table once."""
    return 256 if head_dim <= 64 else 128


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

    def reserve(self, n: int) -> bool:
        """Hold memory for n positions past the length; False when there is none to take. A
        contiguous cache holds its whole capacity from the start (a paged one grows)."""
        return True

    def read_positions(self, start: int, n: int):
        """Positions [start, start + n) of every layer's keys and values: [2, L, K, n, E] (of
        batch row 0; a view here, a copy for a paged cache). prefix.py copies spans this way."""
        return self.kv[:, :, 0, :, start:start + n]

    def write_positions(self, start: int, kv) -> None:
        """Write [2, L, K, n, E] at positions [start, start + n) of every layer (batch row 0)."""
        self.kv[:, :, 0, :, start:start + kv.shape[3]] = kv

    def mask(self, t: int):
        """The causal mask of a block of t new tokens, [T, T]; None for one token (it sees everything)."""
        return None if t == 1 else self.block_mask[:t, :t]

    def trim(self, n: int) -> None:
        """Forget the last n positions (the next write overwrites them)."""
        self._length = max(0, self._length - n)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)  # a row: its share only


class PagedKVCache(KVCache):
    """One sequence's keys and values in blocks of a BlockPool, listed by its row of the pool's
    block table. The interface is KVCache's (the model cannot tell them apart): `update`
    scatters the new positions into their blocks and gathers the sequence's keys and values
    into one array, which is what attention reads on the readable path; the GPU's attention
    kernel reads the blocks in place through the table instead.

    `capacity` is the most positions the sequence may reach; blocks are taken only as it
    grows (`reserve`), so `allocated` may be far less."""

    def __init__(self, pool: "BlockPool", row: int, capacity: int):
        if capacity <= 0:
            raise ContextOverflowError(f"KV cache capacity must be positive, got {capacity}")
        self.pool, self.row = pool, row
        self.capacity = capacity
        self._length = 0
        self.blocks: list[int] = []  # this sequence's blocks, in order: pool.table[row, :len(blocks)]

    @property
    def block_mask(self):
        # looked up when the readable forward pass asks (the GPU's step reads none): a cache is
        # made as a request joins, where each device call can cost the scheduler a turn
        return _block_mask(min(self.capacity, PREFILL_CHUNK), self.pool.xp)

    @property
    def allocated(self) -> int:
        """Positions the blocks held so far can take."""
        return len(self.blocks) * self.pool.block

    def reserve(self, n: int) -> bool:
        """Hold blocks for n positions past the length (at most up to `capacity`); False when the
        pool has too few free blocks (nothing is taken then)."""
        self._check_live()
        want = -(-min(self._length + n, self.capacity) // self.pool.block)
        return self.pool._grow(self, want)

    def check_room(self, n_new: int) -> None:
        super().check_room(n_new)
        if self._length + n_new > self.allocated and not self.reserve(n_new):
            raise ContextOverflowError(
                f"KV cache pool full: {self.pool.free_blocks} free blocks of {self.pool.block} positions, "
                f"{n_new} more positions asked (raise --kv-cache-mb, or lower --max-batch)")

    def _check_live(self) -> None:
        if self.pool is None:
            raise ValueError("this paged cache was released: its blocks belong to other sequences now")

    def _spans(self, start: int, n: int):
        """(block, offset in it, offset in the run, length) of each piece of positions [start, start + n)."""
        b = self.pool.block
        pos = start
        while pos < start + n:
            m = min(b - pos % b, start + n - pos)
            yield self.blocks[pos // b], pos % b, pos - start, m
            pos += m

    def update(self, layer: int, k, v, pos: int):
        """Write k, v ([1, K, T, E]) at [pos, pos+T) of their blocks and return the keys/values of
        [0, pos+T) gathered into [1, K, pos+T, E] (a copy: attention reads them as one array)."""
        self._check_live()
        t = k.shape[2]
        keys, values = self.pool.k[layer], self.pool.v[layer]  # [N + 1, K, BLOCK, E]
        for block, offset, at, m in self._spans(pos, t):
            keys[block, :, offset:offset + m] = k[0, :, at:at + m]
            values[block, :, offset:offset + m] = v[0, :, at:at + m]
        return self._gather(keys, pos + t), self._gather(values, pos + t)

    def _gather(self, blocks, n: int):
        """Positions [0, n) of one layer's keys or values: [N + 1, K, BLOCK, E] -> [1, K, n, E]."""
        used = blocks[self.blocks[:-(-n // self.pool.block)]]  # [nb, K, BLOCK, E]
        nb, n_kv, block, e = used.shape
        return used.transpose(1, 0, 2, 3).reshape(1, n_kv, nb * block, e)[:, :, :n]

    def read_positions(self, start: int, n: int):
        """Positions [start, start + n) of every layer: [2, L, K, n, E] (a copy)."""
        self._check_live()
        kv = self.pool.kv
        return self.pool.xp.concatenate([kv[:, :, block, :, offset:offset + m]
                                         for block, offset, _, m in self._spans(start, n)], axis=3)

    def write_positions(self, start: int, kv) -> None:
        """Write [2, L, K, n, E] at positions [start, start + n) of every layer (blocks held already)."""
        self._check_live()
        for block, offset, at, m in self._spans(start, kv.shape[3]):
            self.pool.kv[:, :, block, :, offset:offset + m] = kv[:, :, :, at:at + m]

    def row(self, i: int):
        raise TypeError("a paged cache has no rows: sequences take caches from their BlockPool")

    def view(self):
        raise TypeError("a paged cache is not captured into a graph: the batched step reads the block table")

    @property
    def nbytes(self) -> int:
        return len(self.blocks) * self.pool.block_bytes


class BlockPool:
    """The keys and values of many sequences, in blocks of `block` positions (a paged cache).

    A cache per sequence, allocated for the most positions the sequence may reach, holds
    memory for lengths most sequences never reach. Here the sequences share one pool: a
    sequence takes a block when its length crosses into it (`PagedKVCache.reserve`) and
    gives all of them back when it ends (`release`), so memory follows the lengths actually
    reached and more sequences fit. Each sequence has a row of the block table, which lists
    its blocks in order: position s of the sequence in row r is position s % block of block
    table[r, s // block]; the order of the blocks in the pool means nothing.

        kv     [2, L, N + 1, K, BLOCK, E]  one array (as KVCache's); block N is the spare,
                                           which the GPU's padding rows and its graph
                                           captures write into
        table  [rows + 1, W] int32, host   W: blocks of a sequence of `capacity` positions;
                                           entries past a row's blocks, and all of the
                                           last row (the spare row), name the spare block

    config, dtype, xp: the model's. n_blocks: the pool's size (at least one sequence of
    `capacity` positions); rows: the most sequences at once."""

    def __init__(self, config: Config, n_blocks: int, block: int, capacity: int, rows: int, dtype, xp=np):
        if block < 1 or capacity < 1 or rows < 1:
            raise ValueError(f"a block pool needs block, capacity and rows >= 1, got {block}, {capacity}, {rows}")
        width = -(-capacity // block)
        if n_blocks < width:
            raise ContextOverflowError(f"KV cache pool of {n_blocks} blocks of {block} positions cannot hold one "
                                       f"sequence of {capacity} positions (raise --kv-cache-mb or lower --max-context)")
        self.config, self.xp, self.dtype = config, xp, dtype
        self.block, self.capacity, self.n_blocks = block, capacity, n_blocks
        self.spare = n_blocks
        self.kv = xp.zeros((2, config.n_layers, n_blocks + 1, config.n_kv_heads, block, config.head_dim), dtype=dtype)
        self.k = [self.kv[0, layer] for layer in range(config.n_layers)]  # [N + 1, K, BLOCK, E] views
        self.v = [self.kv[1, layer] for layer in range(config.n_layers)]
        self.block_bytes = self.kv[:, :, 0].nbytes
        self.table = np.full((rows + 1, width), self.spare, dtype=np.int32)
        self._free_blocks = list(range(n_blocks - 1, -1, -1))  # a stack: block 0 is taken first
        self._free_rows = list(range(rows - 1, -1, -1))

    @classmethod
    def blocks_for_bytes(cls, config, dtype, block: int, nbytes: int) -> int:
        """How many blocks `nbytes` hold."""
        return int(nbytes // (2 * config.n_layers * config.n_kv_heads * block * config.head_dim
                              * np.dtype(dtype).itemsize))

    @property
    def free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    @property
    def rows(self) -> int:
        return self.table.shape[0] - 1

    def blocks_for(self, positions: int) -> int:
        return -(-min(positions, self.capacity) // self.block)

    def can_take(self, positions: int, spare_blocks: int = 0) -> bool:
        """Whether a new sequence could hold `positions` positions now and leave `spare_blocks`
        free (at most an eighth of the pool: a pool of a few blocks still takes them all)."""
        spare = min(spare_blocks, self.n_blocks // 8)
        return bool(self._free_rows) and self.blocks_for(positions) + spare <= len(self._free_blocks)

    def new_cache(self, capacity: int) -> PagedKVCache:
        """A cache for a sequence of at most `capacity` positions (at most the pool's); it holds no
        block yet (`reserve` takes them)."""
        if not self._free_rows:
            raise ContextOverflowError(f"all {self.rows} rows of the KV cache pool are in use")
        return PagedKVCache(self, self._free_rows.pop(), min(capacity, self.capacity))

    def spare_cache(self) -> PagedKVCache:
        """A cache of the spare row, every position of it in the spare block: what a padding row or
        a graph capture writes to, taking nothing from the pool."""
        cache = PagedKVCache(self, self.rows, self.table.shape[1] * self.block)
        cache.blocks = [self.spare] * self.table.shape[1]
        return cache

    def release(self, cache: PagedKVCache) -> None:
        """A sequence ended: its blocks and its row go back. Cuts the cache off from the pool, so a
        second release, or a later write through it, cannot touch what others hold now."""
        if cache.pool is not self or cache.row == self.rows:  # (the spare row holds nothing)
            return
        self._free_blocks += reversed(cache.blocks)
        self.table[cache.row] = self.spare
        self._free_rows.append(cache.row)
        cache.blocks, cache.pool = [], None

    def _grow(self, cache: PagedKVCache, want: int) -> bool:
        more = want - len(cache.blocks)
        if more <= 0:
            return True
        if more > len(self._free_blocks):
            return False
        for _ in range(more):
            block = self._free_blocks.pop()
            self.table[cache.row, len(cache.blocks)] = block
            cache.blocks.append(block)
        return True
