"""The decode step: the one seam where a fast path plugs in.

Generation (generate.py) and the scheduler (scheduler.py) never call the model directly.
They are handed a step object, chosen once by `tinyllm.load`, that turns token ids into
the next token ids:

    step.prefill(ids, cache)                      prompt ids -> float32 logits [V] on the host
    step.decode(token, cache, sampler, history)   one token fed back -> the next token id
    batch = step.batch(max_batch, capacity, kv_bytes)  caches for many sequences, and one step for all:
    batch.step(tokens, caches, samplers, histories) -> per row, the next id (or that row's error)
                                                  (horizon=k: no row's token budget or context ends its
                                                  sequence within k steps after this one, so a step may
                                                  queue that many ahead)
    step.prompt_logits(ids)                       every prompt position's logits, for scoring a prompt

`ReadableStep`, here, is the model's forward pass followed by the host sampler, for one
sequence or a batch. tinyllm/cuda provides the same interface with fused kernels, replayed
CUDA graphs and sampling on the device. Whatever writes a cache's keys and values advances
its position (`KVCache.advance`); nothing else moves it.
"""
from __future__ import annotations

import time

import numpy as np

from .backend import to_numpy
from .kv_cache import BlockPool, KVCache, page_size


def sample_rows(logits, samplers, histories) -> list:
    """Each row's next id from its own sampler, or the exception its sampling raised, so that
    one request's bad row (NaN logits, a sampler error) ends that request alone."""
    out = []
    for row, sampler, history in zip(logits, samplers, histories):
        try:
            out.append(sampler(row, history))
        except Exception as e:
            out.append(e)
    return out


class DecodeStep:
    """What generation and the scheduler call (see the module docstring); fast paths subclass it."""

    name = "a decode step"
    max_batch: int | None = None  # the most sequences one batched step takes (None: no limit)

    @property
    def prompt_model(self):
        """The model as this step runs a prompt (every position's logits): for scoring text.
        A fast path gives its own (on the GPU, block-quantized weights are rebuilt by a kernel
        where the readable path would expand each matrix with array calls)."""
        return self.model

    def prompt_logits(self, ids: list[int], chunk: int = 256):
        """float32 logits [t, V] (host) of every prompt position, `chunk` positions at a time,
        from `prompt_model`'s forward pass in a cache of its own: row t scores token t + 1.
        For scoring a prompt (its log-probabilities), not for generating."""
        model = self.prompt_model
        cache = model.new_cache(len(ids))
        for start in range(0, len(ids), chunk):
            block = np.asarray([ids[start:start + chunk]], dtype=np.int64)
            yield to_numpy(model.forward(block, cache, last_only=False))[0]


class ReadableStep(DecodeStep):
    """Model forward + host sampler: the reference every fast step is tested against."""

    name = "the readable path"

    def __init__(self, model):
        self.model = model

    def prefill(self, ids: list[int], cache: KVCache) -> np.ndarray:
        """Run prompt ids through the model into the cache; -> float32 logits [V] of the last one."""
        return to_numpy(self.model.forward(np.asarray([ids], dtype=np.int64), cache))[0, -1]

    def decode(self, token: int, cache: KVCache, sampler, history) -> int:
        """Feed one token at the cache's position; -> the next token id."""
        return sampler(self.prefill([token], cache), history)

    def batch(self, max_batch: int, capacity: int, kv_bytes: int | None = None) -> "ReadableBatch":
        return ReadableBatch(self.model, capacity, paged_pool(self.model, max_batch, capacity, kv_bytes))


def paged_pool(model, rows: int, capacity: int, kv_bytes: int | None, block: int | None = None) -> BlockPool | None:
    """A BlockPool of `kv_bytes` for `rows` sequences of up to `capacity` positions each, in
    blocks of `block` positions (default: the GPU's, page_size). None without kv_bytes: no
    pool, each sequence a contiguous cache of its own, sized to what it may reach."""
    if kv_bytes is None:
        return None
    c = model.config
    block = block or page_size(c.head_dim)
    model.rope.ensure(capacity)
    return BlockPool(c, BlockPool.blocks_for_bytes(c, model.dtype, block, kv_bytes), block, capacity, rows,
                     model.dtype, model.xp)


class ReadableBatch:
    """Many sequences decoded by one `Model.decode_batch`, each with a cache of its own, or with
    its positions in blocks of one shared BlockPool (`pool`: paged, as the GPU's batch holds them)."""

    max_rows = None  # rows per step: no limit, and a prompt is prefilled whole

    def __init__(self, model, capacity: int, pool: BlockPool | None = None):
        self.model = model
        self.readable = ReadableStep(model)
        self.capacity = capacity  # the most positions a sequence may hold
        self.pool = pool
        self.model_seconds = 0.0  # of the last step, the time inside the model's forward passes

    def enter_thread(self) -> None:
        """Called once by the thread that will run the steps (the GPU's binds its stream)."""

    def new_cache(self, positions: int) -> KVCache:
        """A cache for a sequence that needs at most this many positions (at most `capacity`):
        contiguous and whole, or paged, taking blocks as it grows (`KVCache.reserve`)."""
        if self.pool is not None:
            return self.pool.new_cache(min(positions, self.capacity))
        return self.model.new_cache(min(positions, self.capacity))

    def can_take(self, positions: int, spare_blocks: int = 0) -> bool:
        """Whether a new sequence could hold `positions` positions now and leave `spare_blocks`
        blocks free (always, without a pool: each cache is allocated on its own)."""
        return self.pool is None or self.pool.can_take(positions, spare_blocks)

    def release(self, cache: KVCache) -> None:
        """A sequence ended: its blocks go back to the pool (a cache of its own is simply dropped)."""
        if self.pool is not None:
            self.pool.release(cache)

    def step(self, tokens, caches, samplers, histories, n_decode: int | None = None,
             horizon: int | None = None) -> list:
        """Feed tokens[b] to the sequence in caches[b]; -> per row, the next id, an exception
        (that row's sampling, or its prompt's prefill, failed), or None (a row with no sampler).
        (`horizon` tells a step that queues steps ahead how far it may; this one queues none.)

        Rows [0, n_decode) are one token per sequence, decoded together by decode_batch; the
        rest are prompts, each a run of consecutive rows of one cache, each run through the
        model's forward pass (as `ReadableStep.prefill`), its last row sampled."""
        n_decode = len(caches) if n_decode is None else n_decode
        out: list = [None] * len(caches)
        self.model_seconds = 0.0
        if n_decode:
            began = time.perf_counter()
            logits = to_numpy(self.model.decode_batch(tokens[:n_decode], caches[:n_decode]))  # [B, V]
            self.model_seconds += time.perf_counter() - began
            out[:n_decode] = sample_rows(logits, samplers[:n_decode], histories[:n_decode])
        start = n_decode
        while start < len(caches):
            end = start + 1
            while end < len(caches) and caches[end] is caches[start]:
                end += 1
            last = end - 1
            try:
                began = time.perf_counter()
                logits = self.readable.prefill(list(tokens[start:end]), caches[start])
                self.model_seconds += time.perf_counter() - began
                if samplers[last] is not None:
                    out[last] = sample_rows([logits], [samplers[last]], [histories[last]])[0]
            except Exception as e:  # this prompt alone fails
                out[last] = e
            start = end
        return out


def as_step(model_or_step):
    """A step object: given a model, its readable step (the CPU, or a GPU without the fast path)."""
    return model_or_step if isinstance(model_or_step, DecodeStep) else ReadableStep(model_or_step)
