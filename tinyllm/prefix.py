"""Prefix reuse: the keys and values of a prompt's beginning, computed once, copied many times.

Requests often begin with the same tokens: a system prompt, an earlier turn of a chat, the
n choices of one request. The keys and values a layer stores for a position depend only on
the tokens up to that position, so two prompts that begin alike have the same K/V there,
and a second request can copy them instead of running those tokens through the model.

    prompt ids   [ block 0 (32 ids) | block 1 (32 ids) | block 2 ... | the rest ]
    chain hash    h0 = H(root, ids 0..31)   h1 = H(h0, ids 32..63)   ...

The cache keeps whole blocks of BLOCK tokens. A block's identity is a chain hash of its
parent's hash and its own tokens, so a block means "these tokens after exactly that
prefix"; matching a prompt walks its blocks from the first and stops at the first one not
held. Each block holds its own copy of the K/V of all layers, `[2L, K, BLOCK, E]` (the L
layers' keys, then their values) in the KV cache's dtype and on its device.

    match(ids)         -> (n, blocks): the longest run of held blocks, at most len(ids) - 1
                          tokens (the last prompt token must run through the model: its
                          logits choose the first new token); the blocks are pinned
    load(blocks, cache, n)   copies their first n positions into the cache at [0, n) and
                          advances it (KVCache.advance is what moves a position); unpins
    store(ids, cache)  once a prompt is in a cache: its whole blocks not yet held become
                          blocks, evicting least recently used ones to stay in the budget
    can_hold(keys)     whether a chain of blocks could be held at once (the scheduler holds a
                          request back for a block only if it can)

Both copies go a block at a time, straight between a block and the cache's layers: the
temporaries of one copy never exceed one block, however long the prompt, and room is made
before a block is allocated, so the budget bounds the memory the cache takes. Storing only
saves later prompts work: a block that cannot be allocated or copied (the device out of
memory) is not stored, and counted, and the request whose prompt it came from goes on.

Reference counts protect what is still needed: a block is pinned by each sequence between
match and load (its K/V are about to be copied) and by each child block (a child is found
only through its parent, so a parent evicted first would strand it). Only a block that
nothing holds, a leaf of the tree, is evicted, least recently used first.

Memory is copied into each sequence's own cache rather than shared in place, through the
cache's `read_positions` / `write_positions` (a contiguous cache, or a paged one whose
blocks of the attention's size hold several of these). Sharing blocks in place would take
prefix blocks of the paged cache's size, so that a sequence's block table could name them.
"""
from __future__ import annotations

import collections
import hashlib

import numpy as np

# Tokens per block: the unit of matching, hashing and storage. A prompt that leaves a
# shared prefix mid-block reuses nothing of that block, so smaller blocks reuse more; each
# block costs a hash, an array and one copy of all its layers (on the GPU a few microseconds of host
# time each), so larger blocks cost less per token. 32 keeps both small: at most 31 tokens of
# a prefix go unused, and a prompt of a few thousand tokens is about a hundred blocks.
BLOCK = 32

# The server's default budget (`--prefix-cache-mb`): a few thousand tokens of a small model's
# keys and values, a few hundred of an 8B model's.
BUDGET_MB = 256

_ROOT = b"tinyllm-prefix"  # the parent hash of a prompt's first block


def block_bytes(config, dtype, block: int = BLOCK) -> int:
    """The bytes of one block: the keys and values of `block` positions, all layers."""
    return 2 * config.n_layers * config.n_kv_heads * block * config.head_dim * np.dtype(dtype).itemsize


def block_hashes(ids, block: int = BLOCK) -> list[bytes]:
    """The chain hash of each whole block of `ids`: hash i names ids[:(i + 1) * block]."""
    hashes, parent = [], _ROOT
    for start in range(0, len(ids) - block + 1, block):
        tokens = np.asarray(ids[start:start + block], dtype=np.int64)
        parent = hashlib.blake2b(parent + tokens.tobytes(), digest_size=16).digest()
        hashes.append(parent)
    return hashes


class Block:
    """One block of a prefix: its tokens, its parent, its keys and values, who holds it."""

    def __init__(self, key: bytes, tokens: tuple, parent: "Block | None", kv):
        self.key = key
        self.tokens = tokens    # kept to compare: a hash collision must never give wrong K/V
        self.parent = parent
        self.kv = kv            # [2L, K, BLOCK, E]: the layers' keys, then their values
        self.refs = 0           # pins (sequences about to copy it) + child blocks

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


class PrefixCache:
    """Blocks of prompt prefixes' keys and values, within a budget of `budget_bytes`.

    config, xp, dtype: the model's (a block is stored as the KV cache stores it). Used from
    the scheduler's thread only; its counters may be read from any thread."""

    def __init__(self, config, xp, dtype, budget_bytes: int, block: int = BLOCK):
        if budget_bytes < 0 or block < 1:
            raise ValueError(f"a prefix cache needs budget_bytes >= 0 and block >= 1, got {budget_bytes}, {block}")
        self.config, self.xp, self.dtype = config, xp, dtype
        self.budget = int(budget_bytes)
        self.block = block
        self.block_bytes = block_bytes(config, dtype, block)
        self.blocks: collections.OrderedDict[bytes, Block] = collections.OrderedDict()  # least recently used first
        self.bytes = 0
        # the keys of the blocks sequences pin between match and load, with how many pins each;
        # a matched run begins at a prompt's first block, so a pinned block's ancestors are here too
        self.pinned: collections.Counter[bytes] = collections.Counter()
        # counters (only ever go up)
        self.lookups = 0        # prompts looked up
        self.hit_tokens = 0     # prompt tokens copied from blocks
        self.miss_tokens = 0    # prompt tokens left to compute
        self.stored = 0         # blocks made
        self.evicted = 0        # blocks dropped for room
        self.store_failures = 0  # blocks not stored because allocating or copying one failed

    @classmethod
    def for_model(cls, model, budget_bytes: int, block: int = BLOCK) -> "PrefixCache":
        return cls(model.config, model.xp, model.dtype, budget_bytes, block)

    def __len__(self) -> int:
        return len(self.blocks)

    # ---- reading ------------------------------------------------------------------------------
    def match(self, ids) -> tuple[int, list[Block]]:
        """The longest chain of held blocks that begins `ids` -> (tokens to copy, the blocks),
        the blocks pinned until `load` (or `release`). At most len(ids) - 1 tokens: the last
        prompt token is always computed. Counts the lookup, its hit and missed tokens."""
        blocks = []
        usable = len(ids) - 1
        for key, start in zip(block_hashes(ids, self.block), range(0, usable, self.block)):
            b = self.blocks.get(key)
            if b is None or b.tokens != tuple(ids[start:start + self.block]) or b.parent is not (
                    blocks[-1] if blocks else None):  # (a hash collision)
                break
            blocks.append(b)
        n = min(len(blocks) * self.block, max(usable, 0))
        blocks = blocks[:(n + self.block - 1) // self.block]
        for b in blocks:
            b.refs += 1
            self.pinned[b.key] += 1
            self.blocks.move_to_end(b.key)  # a parent before its child: leaves stay the more recent
        self.lookups += 1
        self.hit_tokens += n
        self.miss_tokens += len(ids) - n
        return n, blocks

    def load(self, blocks: list[Block], cache, n: int | None = None) -> None:
        """Copy the first n positions (default: all) of the matched blocks into an empty cache
        at [0, n), advance it by n, and unpin the blocks."""
        try:
            n = len(blocks) * self.block if n is None else n
            if not 0 <= n <= len(blocks) * self.block:
                raise ValueError(f"{n} positions asked of {len(blocks)} blocks of {self.block}")
            if cache.length != 0:
                raise ValueError(f"a prefix is loaded into an empty cache, this one holds {cache.length} positions")
            if n == 0:
                return
            cache.check_room(n)
            for start, b in zip(range(0, n, self.block), blocks):
                m = min(self.block, n - start)  # the last block may be copied in part
                cache.write_positions(start, self._layers(b.kv)[:, :, :, :m])  # every layer at once
            cache.advance(n)
        finally:
            self.release(blocks)

    def release(self, blocks: list[Block]) -> None:
        """Unpin matched blocks (load does this itself)."""
        for b in blocks:
            b.refs -= 1
            self.pinned[b.key] -= 1
            if not self.pinned[b.key]:
                del self.pinned[b.key]

    def reuse(self, ids, cache) -> int:
        """match + load: copy the longest held prefix of `ids` into an empty cache -> its length."""
        n, blocks = self.match(ids)
        self.load(blocks, cache, n)
        return n

    # ---- writing ------------------------------------------------------------------------------
    def store(self, ids, cache) -> int:
        """Keep the whole blocks of `ids` that `cache` holds (its positions [0, length) are the
        K/V of ids[:length]) and that are not held yet. -> the blocks made. Stops at the first
        block that does not fit the budget, or that cannot be allocated or copied (counted in
        store_failures, never raised): a later block is reachable only through it."""
        if self.budget < self.block_bytes:
            return 0
        whole = min(len(ids), cache.length) // self.block  # blocks of ids whose K/V the cache holds
        keys = block_hashes(ids[:whole * self.block], self.block)
        parent, first = None, len(keys)  # first: the index of the first block to make
        for i, key in enumerate(keys):
            b = self.blocks.get(key)
            if b is None:
                first = i
                break
            if b.tokens != tuple(ids[i * self.block:(i + 1) * self.block]) or b.parent is not parent:
                return 0  # a hash collision: keep what is held, add nothing after it
            self.blocks.move_to_end(key)
            parent = b
        made = 0
        for i in range(first, len(keys)):
            if parent is not None:
                parent.refs += 1  # held while it is evicted for room: it is this block's parent
            try:
                room = self._make_room(self.block_bytes)
            finally:
                if parent is not None:
                    parent.refs -= 1
            if not room:
                break
            try:
                kv = self._copy_block(cache, i * self.block)
            except Exception:  # out of memory, most likely: the request goes on without this block
                self.store_failures += 1
                break
            b = Block(keys[i], tuple(ids[i * self.block:(i + 1) * self.block]), parent, kv)
            if parent is not None:
                parent.refs += 1
            self.blocks[b.key] = b
            self.bytes += b.nbytes
            self.stored += 1
            made += 1
            parent = b
        return made

    def _copy_block(self, cache, start: int):
        """A new block's array holding positions [start, start + BLOCK) of every layer of `cache`."""
        c = self.config
        kv = self.xp.empty((2 * c.n_layers, c.n_kv_heads, self.block, c.head_dim), self.dtype)  # [2L, K, BLOCK, E]
        self._layers(kv)[...] = cache.read_positions(start, self.block)  # one copy for every layer
        return kv

    def _layers(self, kv):
        """A block's [2L, K, BLOCK, E] seen as [2, L, K, BLOCK, E], the cache's own order."""
        return kv.reshape(2, self.config.n_layers, *kv.shape[1:])

    def can_hold(self, keys) -> bool:
        """Whether the blocks named by `keys`, a chain from a prompt's first block, could all be
        held at once: a block is made while its ancestors are held, and beside the blocks that
        sequences pin, which cannot be evicted."""
        return len(set(keys) | self.pinned.keys()) * self.block_bytes <= self.budget

    def _make_room(self, nbytes: int) -> bool:
        """Evict least recently used blocks that nothing holds until `nbytes` more fit the
        budget. -> False when they cannot (everything left is held)."""
        while self.bytes + nbytes > self.budget:
            victim = self._least_recent_leaf()
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _least_recent_leaf(self) -> Block | None:
        return next((b for b in self.blocks.values() if b.refs == 0), None)

    def _evict(self, b: Block) -> None:
        del self.blocks[b.key]
        self.bytes -= b.nbytes
        self.evicted += 1
        if b.parent is not None:
            b.parent.refs -= 1  # the parent may now be a leaf, evictable in turn
        b.kv = None

    def clear(self) -> None:
        """Drop every block that nothing pins (all of them, between requests)."""
        while (victim := self._least_recent_leaf()) is not None:
            self._evict(victim)
