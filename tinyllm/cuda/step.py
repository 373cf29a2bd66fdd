"""CudaStep: the decode step (tinyllm/step.py's interface) on the GPU's fast path.

`tinyllm.load` picks it, once, for a float16 or bfloat16 model on a GPU; generation and the scheduler
then call it exactly as they call the readable step:

    prefill(ids, cache)                     the prompt through FastOps called from Python:
                                            fused row kernels, cuBLAS for the matmuls
    decode(token, cache, sampler, history)  one replay of the captured graph (decoder.py),
                                            the next token chosen on the device; a sampler
                                            with penalties gets the logits on the host
    batch(max_batch, capacity, kv_bytes)    the batched graphs (batch.py) and their paged
                                            KV cache (a pool of kv_bytes, or fitted to memory)
"""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from ..errors import TinyLLMError
from ..kv_cache import KVCache
from ..sampler import SamplingError
from ..step import DecodeStep, ReadableBatch, paged_pool, sample_rows
from .batch import BatchDecoder, batch_gemm, max_batch_for
from .decoder import CudaDecoder


class CudaStep(DecodeStep):
    name = "the GPU fast path"

    def __init__(self, model, warmup: bool = True, decoder: CudaDecoder | None = None):
        self.model = model
        self.decoder = decoder or CudaDecoder(model, warmup=warmup)
        self.gemm = batch_gemm()  # resolved once: the limit below and the BatchDecoder it bounds agree
        most = max_batch_for(model.config, self.gemm) if self.decoder.graph_ops.fused_attention else 0
        self.max_batch = most or None  # 0: no batched graphs for this model, the eager batched step serves
        self.batch_decoder: BatchDecoder | None = None  # made by the first batch() that needs it

    @property
    def prompt_model(self):
        return self.decoder.eager

    def prefill(self, ids: list[int], cache: KVCache) -> np.ndarray:
        return to_numpy(self.decoder.eager.forward(np.asarray([ids], dtype=np.int64), cache))[0, -1]

    def decode(self, token: int, cache: KVCache, sampler, history) -> int:
        if CudaDecoder.supports(sampler.params):
            return self.checked(self.decoder.step(cache, token, sampler))
        return sampler(self.prefill([token], cache), history)  # penalties need the history: on the host

    def checked(self, chosen: int) -> int:
        """A device-chosen id, or the error the host sampler gives for logits that name no token:
        the sampling kernel's argmax finds none in a row of NaN (or all -inf) and leaves V."""
        if not 0 <= chosen < self.model.config.vocab_size:
            raise SamplingError("logits", "the device found no token to choose (NaN or all -inf logits)")
        return chosen

    def batch(self, max_batch: int, capacity: int, kv_bytes: int | None = None):
        if self.max_batch is None:
            return ReadableBatch(self.decoder.eager, capacity, paged_pool(self.model, max_batch, capacity, kv_bytes))
        held = self.batch_decoder
        if held is not None and held.free_rows < held.max_batch:
            raise TinyLLMError("the model's batched GPU decoder is in use by another scheduler")
        # compared with the capacity it was asked for: one fitted to GPU memory is not remade
        if (held is None or held.max_batch < max_batch or held.capacity_asked < capacity
                or held.kv_bytes_asked != kv_bytes):
            self.batch_decoder = None  # its graphs and cache go before the new ones are made
            self.batch_decoder = BatchDecoder(self.decoder, max_batch, capacity, gemm=self.gemm, kv_bytes=kv_bytes)
        return CudaBatch(self, self.batch_decoder)


class CudaBatch:
    """The scheduler's view of a BatchDecoder: rows of its cache, and one graph replay per step."""

    def __init__(self, step: CudaStep, decoder: BatchDecoder):
        self.step_of = step
        self.decoder = decoder
        self.capacity = decoder.capacity

    def enter_thread(self) -> None:
        self.decoder.stream.use()  # prefills and batched steps of this thread: one stream, in order

    def new_cache(self, positions: int) -> KVCache:
        return self.decoder.new_cache(positions)  # paged: blocks are taken as it grows

    @property
    def pool(self):
        return self.decoder.pool  # the paged cache (kv_cache.py BlockPool)

    def can_take(self, positions: int, spare_blocks: int = 0) -> bool:
        return self.decoder.can_take(positions, spare_blocks)

    def release(self, cache: KVCache) -> None:
        self.decoder.release(cache)

    @property
    def max_rows(self) -> int:
        return self.decoder.max_rows  # decode rows and prompt chunks together

    @property
    def model_seconds(self) -> float:
        """Of the last step, the time the host waited for the GPU's replay. With the next step
        queued ahead, the GPU works while the host handles tokens: a wait near zero means the
        host, not the GPU, set the pace."""
        return self.decoder.wait_seconds

    def step(self, tokens, caches, samplers, histories, n_decode: int | None = None,
             horizon: int | None = None) -> list:
        """One replay for every row (a prompt's rows share their cache: see BatchDecoder.step),
        with up to `horizon` steps queued behind it; -> per row the next id, that row's error,
        or None where the row has no sampler."""
        out = self.decoder.step(tokens, caches, samplers, ahead=horizon)  # ids, or logits rows for penalised samplers
        for i, chosen in enumerate(out):
            if samplers[i] is None:
                out[i] = None
            elif isinstance(chosen, int):
                try:
                    out[i] = self.step_of.checked(chosen)
                except SamplingError as e:  # this row alone ends
                    out[i] = e
        on_host = [i for i, o in enumerate(out) if o is not None and not isinstance(o, (int, Exception))]
        for i, chosen in zip(on_host, sample_rows([out[i] for i in on_host], [samplers[i] for i in on_host],
                                                  [histories[i] for i in on_host])):
            out[i] = chosen
        return out
