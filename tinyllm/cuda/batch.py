"""BatchDecoder: continuous batching on the GPU, one CUDA graph per batch size.

One sequence's decode step reads every weight for one token. B sequences decoded together
read each weight once for B tokens, so a step costs little more than a single one and
the throughput grows almost B-fold, until the arithmetic catches up with the memory. On
the GPU that needs the same three things as the single-sequence fast path (decoder.py):

- fused kernels for B tokens: FastOps (ops.py) in its "batched" mode turns each GEMV into
  a tensor-core GEMM over the B tokens (`gemv_rows` in kernels.cu) and runs one attention
  launch for all B sequences, each over its own cache at its own position;
- no host work inside the step: the step is captured once per batch size B into a CUDA
  graph and replayed;
- inputs in device memory: the graph for B reads, for row b, the token, the position,
  the block table and the sampling parameters from small device buffers that the host
  fills with one copy before each replay. So one graph serves any B sequences, whichever
  they are and wherever they stand.

The caches are paged (kv_cache.py BlockPool): one preallocated pool of blocks of the
attention's chunk size, from which each running sequence (`new_cache`) takes blocks as it
grows and to which it gives them back when it ends (`release`); the attention kernel reads
chunk c of row b from block table[b, c]. Nothing is allocated per request, and memory
follows the lengths sequences reach, not the longest they might: the pool may hold far
fewer positions than max_batch x capacity (the scheduler preempts a sequence when it runs
short). The pool's spare block is where padding rows and the captures write.

Sampling: each row's token is chosen on the device (kernels.cu `sample_rows`, the same
rules as the single-sequence sampler, each row with its own parameters and its own
uniform number from its sampler's seeded generator); only the B ids come back to the
host. A row whose sampler needs the token history (repetition/presence/frequency
penalties) gets its logits row instead and is sampled on the host.

A sequence's tokens do not depend on its neighbours: every row of the GEMM and of the
attention is computed on its own (the tensor cores compute each output element from its
own row and column), so a request gives the same tokens at any batch size.

    batch = BatchDecoder(decoder, max_batch=8)       # decode graphs for buckets up to 8 rows,
                                                     # prompt graphs up to max_rows
    caches = [batch.new_cache(n) for n in lengths]   # paged caches of up to n positions
    out = batch.step(tokens, caches, samplers)        # one step: B ids (or logits rows); a
                                                     # prompt's tokens are rows of one cache
"""
from __future__ import annotations

import collections
import os
import time

import numpy as np

from ..errors import ConfigError, DeviceError, TinyLLMError
from ..kv_cache import BlockPool, PagedKVCache
from . import kernels as K
from .driver import driver
from .decoder import CudaDecoder, capture_graph
from .ops import GEMMS, STEP_ROWS, FastOps

_HOST_TO_DEVICE, _DEVICE_TO_HOST = 1, 2

# Steps queued ahead of the one the host waits for (see BatchDecoder.step). One hides the
# host's work on a step's tokens behind the next step's GPU time on average; a second keeps
# the GPU busy through a round where the host is late (the event loop held the interpreter).
QUEUE_DEPTH = 2


class BatchDecoder:
    """Batched decode steps for up to `max_batch` sequences, their caches paged in one pool."""

    def __init__(self, decoder: CudaDecoder, max_batch: int = 16, capacity: int | None = None,
                 gemm: str | None = None, kv_bytes: int | None = None):
        c = decoder.model.config
        gemm = batch_gemm(gemm)
        most = max_batch_for(c, gemm)
        if not 1 <= max_batch <= most:
            raise ConfigError(f"--max-batch: the batched fast path takes 1 to {most} sequences "
                              f"per step for this model, got {max_batch}")
        if not decoder.graph_ops.fused_attention:
            raise DeviceError("the batched fast path needs the fused attention (head dim 64 or 128)")
        cp = decoder.cp
        self.cp = cp
        self.decoder = decoder
        self.model = decoder.model
        self.stream = decoder.stream
        self.max_batch = max_batch
        # rows per step: a prompt's rows ride beside the decoding sequences' up to what the
        # GEMMs take (on cuBLAS two tiles of 64), so a wave of arrivals is prefilled in fewer steps
        self.max_rows = most
        self.capacity_asked = min(capacity or c.max_seq_len, c.max_seq_len)
        self.kv_bytes_asked = kv_bytes
        self.pool = self._make_pool(self.capacity_asked, max_batch, kv_bytes)
        self.capacity = self.pool.capacity  # positions per sequence (the server's context limit)
        # The step's inputs, laid out the same in pinned host memory and in device memory,
        # so that one copy moves them all: tokens, positions, sampling params, block tables.
        # A host copy of the inputs and of the chosen ids per step in flight (the one waited
        # for and QUEUE_DEPTH queued behind it: see `step`): a copy is rewritten only once the
        # device has read it (`_wait_copied`), and its ids only after its step was waited for.
        # (A superseded step's writes sit past each cache's length, where the real step writes
        # again.)
        # A step queued ahead rewrites the inputs from "params" on: its block tables too (a
        # sequence may have taken a block since the inputs were written whole).
        m = self.max_rows
        layout = [("tokens", np.int64, (m, 1)), ("positions", np.int32, (m,)), ("live", np.int32, (1,)),
                  ("params", np.float32, (m, 5)), ("table", np.int32, (m, self.pool.table.shape[1]))]
        nbytes = sum(np.dtype(t).itemsize * int(np.prod(shape)) for _, t, shape in layout)
        self._inputs = cp.zeros(nbytes, dtype=cp.uint8)
        self.depth = QUEUE_DEPTH
        copies = self.depth + 1
        self._inputs_host = [cp.cuda.alloc_pinned_memory(nbytes) for _ in range(copies)]
        self.host, self.device, self._offset, offset = [{} for _ in range(copies)], {}, {}, 0
        for name, dtype, shape in layout:
            size = np.dtype(dtype).itemsize * int(np.prod(shape))
            for h, buf in zip(self.host, self._inputs_host):
                h[name] = np.frombuffer(buf, dtype=dtype, count=size // np.dtype(dtype).itemsize,
                                        offset=offset).reshape(shape)
            self.device[name] = self._inputs[offset:offset + size].view(dtype).reshape(shape)
            self._offset[name] = offset
            offset += size
        self._nbytes = nbytes
        self.ops = FastOps.for_model(self.model, "batched", positions=self.device["positions"],
                                     gemm=gemm, table=self.device["table"])
        self.batched_model = self.model.with_ops(self.ops)
        # steps whose rows include several tokens of one sequence (a prompt's, prefilled in
        # the step): each attention first writes every row's k and v (see FastOps)
        self.prompt_ops = FastOps.for_model(self.model, "batched", positions=self.device["positions"],
                                            shared_rows=True, gemm=gemm, table=self.device["table"])
        self.prompt_model = self.model.with_ops(self.prompt_ops)
        self.chosen = cp.zeros(m, dtype=cp.int64)                  # the ids chosen by the last step
        self._chosen_host = [cp.cuda.alloc_pinned_memory(8 * m) for _ in range(copies)]
        self._done = [cp.cuda.Event(disable_timing=True) for _ in range(copies)]  # per host copy: its step ended
        # per host copy: the device has read it. A superseded step's copy may still be queued
        # when the host comes to rewrite that copy (its step is never waited for), and a
        # copy read half old, half new would send a row's writes through another
        # sequence's block table.
        self._copied = [cp.cuda.Event(disable_timing=True) for _ in range(copies)]
        self._copy_queued = [False] * copies
        self._slot = 0         # which host copy the last queued step used
        self._ahead: collections.deque[_Queued] = collections.deque()  # the steps queued ahead by `step`, in order
        self.wait_seconds = 0.0  # of the last step, the host's wait for the device
        self.w_scratch = cp.empty((m, self.model.config.vocab_size), dtype=cp.float32)
        # One graph per bucket of batch sizes; a step of B rows runs the smallest bucket that
        # holds B, its extra rows padding (they compute on the spare block and are dropped).
        self.buckets = sorted({b for b in BUCKETS if b < self.max_rows} | {max_batch, self.max_rows})
        # bucket -> (graph, its memory pool, its logits [bucket, V]): one row per sequence (up to
        # max_batch), and rows that may share a sequence (up to max_rows)
        self.graphs: dict[int, tuple] = {}
        self.prompt_graphs: dict[int, tuple] = {}
        start = time.perf_counter()
        K.compile_kernels(self.ops.rows_kernel_names(self.max_rows))
        for b in self.buckets:
            if b <= max_batch:
                self.graphs[b] = self._capture(b, self.batched_model, self.ops)
            self.prompt_graphs[b] = self._capture(b, self.prompt_model, self.prompt_ops)
        self._last = self.graphs  # the set the last step ran
        self.capture_seconds = time.perf_counter() - start

    def __del__(self):
        # A step queued ahead may still be running when the last reference goes (a server
        # stopped, a test's decoder dropped): what it reads and writes (its graph's memory,
        # the inputs, the KV pool) is freed with this object, so let it end first.
        stream = getattr(self, "stream", None)
        if stream is not None:
            try:
                stream.synchronize()
            except Exception:  # noqa: BLE001 - at interpreter exit CUDA may be gone
                pass

    def bucket(self, b: int) -> int:
        """The batch size of the graph that runs a step of b rows."""
        return next(n for n in self.buckets if n >= b)

    def logits(self, b: int):
        """The logits [b, V] that the last step of b rows computed (on the device)."""
        return self._last[self.bucket(b)][2][:b]

    def _make_pool(self, capacity: int, rows: int, kv_bytes: int | None) -> BlockPool:
        """The paged cache: `kv_bytes` of blocks, or by default enough for `rows` sequences of
        `capacity` positions, as far as half of the GPU's free memory goes. Where that half
        cannot hold one sequence of `capacity` (a 128k context), the capacity is lowered to
        what it holds."""
        c, dtype = self.model.config, self.model.dtype
        block = K.attention_chunk(c.head_dim)
        per_block = BlockPool.blocks_for_bytes(c, dtype, block, 1 << 30)  # blocks per GiB
        free_blocks = int(self.cp.cuda.runtime.memGetInfo()[0] // 2 * per_block / (1 << 30))
        if kv_bytes is not None:
            n_blocks = BlockPool.blocks_for_bytes(c, dtype, block, kv_bytes)
        else:
            n_blocks = min(rows * -(-capacity // block), free_blocks)
            capacity = min(capacity, max(block, n_blocks * block))
        self.model.rope.ensure(capacity)
        return BlockPool(c, n_blocks, block, capacity, rows, dtype, self.cp)

    # ---- the paged cache ---------------------------------------------------------------------------
    @property
    def free_rows(self) -> int:
        return self.pool.free_rows

    def new_cache(self, positions: int | None = None) -> PagedKVCache:
        """A cache for a sequence of up to `positions` positions (default: `capacity`), holding no
        block yet: it takes them as it grows (`PagedKVCache.reserve`, or a step's check)."""
        if not self.pool.free_rows:
            raise TinyLLMError(f"all {self.max_batch} sequences of the batched cache are in use")
        # work on the current stream (e.g. a prefix copied into this cache) waits for any step
        # still queued, which may write to these blocks on behalf of their previous sequence
        self.cp.cuda.get_current_stream().wait_event(self.stream.record())
        return self.pool.new_cache(positions or self.capacity)

    def can_take(self, positions: int, spare_blocks: int = 0) -> bool:
        return self.pool.can_take(positions, spare_blocks)

    def release(self, cache: PagedKVCache) -> None:
        """Give a sequence's blocks back (it ended). The cache is cut off from the pool, so a second
        release, or a step fed this cache, cannot touch blocks another sequence now holds."""
        self.pool.release(cache)

    # ---- capture ---------------------------------------------------------------------------------
    def _run(self, b: int, caches, model):
        """One batched step as ordinary calls: the model's decode_batch, then the sampler kernel."""
        d = self.device
        logits = model.decode_batch(d["tokens"][:b], caches)  # [B, V] fp32
        K.sample_rows(logits, d["params"][:b], self.w_scratch, d["tokens"], self.chosen, d["positions"], d["live"])
        return logits

    def _capture(self, b: int, model, ops):
        caches = [self.pool.spare_cache() for _ in range(b)]  # every row writes to the spare block, at position 0
        self._ahead = collections.deque()
        self._write_inputs(0, [0] * b, [0] * b, caches, [None] * b)
        self._copy_inputs(0)
        before = ops.stats["rows_attention"]
        graph, pool, logits = capture_graph(self.stream, lambda: self._run(b, caches, model))
        if ops.stats["rows_attention"] - before != 2 * self.model.config.n_layers:
            raise DeviceError("the batched decode step did not take the fused attention")
        return graph, pool, logits

    # ---- one step --------------------------------------------------------------------------------
    def _write_params(self, slot: int, samplers, caches) -> list:
        """Each row's sampling parameters and block table into host copy `slot`; draws one uniform
        number per sampled row. Returns the (sampler, u) pairs drawn."""
        self._wait_copied(slot)
        h = self.host[slot]
        b, n = len(caches), self.bucket(len(caches))
        h["table"][:b] = self.pool.table[[c.row for c in caches]]
        h["table"][b:n] = self.pool.spare
        params, drawn = h["params"], []
        for i, sampler in enumerate(samplers):
            p = None if sampler is None else sampler.params
            if p is None or p.greedy or not CudaDecoder.supports(p):
                params[i] = (0.0, 0.0, 1.0, 0.0, 0.0)  # argmax (a penalised row is sampled on the host)
                continue
            u = sampler.uniform()
            params[i] = (p.temperature, p.top_k, p.top_p, p.min_p, u)
            drawn.append((sampler, u))
        return drawn

    def _write_inputs(self, slot: int, tokens, positions, caches, samplers) -> list:
        """The inputs of B sequences into host copy `slot`, and the padding rows up to their
        bucket: token 0 at position 0 of the spare block, greedy, never advanced (`live` = B).
        -> the (sampler, u) pairs drawn."""
        self._wait_copied(slot)
        h = self.host[slot]
        b, n = len(tokens), self.bucket(len(tokens))
        h["tokens"][:b, 0], h["tokens"][b:n, 0] = tokens, 0
        h["positions"][:b], h["positions"][b:n] = positions, 0
        h["live"][0] = b
        h["params"][b:n] = (0.0, 0.0, 1.0, 0.0, 0.0)
        return self._write_params(slot, samplers, caches)

    def _wait_copied(self, slot: int) -> None:
        """Before host copy `slot` is rewritten: the device has read it (nearly always long
        since: the copy runs as the step before it ends)."""
        if self._copy_queued[slot]:
            d = driver()
            if d is not None:
                d.synchronize(self._copied[slot].ptr)
            else:
                self._copied[slot].synchronize()
            self._copy_queued[slot] = False

    def _copy_inputs(self, slot: int, first: str = "tokens") -> None:
        """Host copy `slot` -> the device inputs, from field `first` on (params only: "params")."""
        offset = self._offset[first]
        self.cp.cuda.runtime.memcpyAsync(self._inputs.data.ptr + offset, self._inputs_host[slot].ptr + offset,
                                         self._nbytes - offset, _HOST_TO_DEVICE, self.stream.ptr)

    def _launch(self, b: int, slot: int, first: str, graphs=None):
        """Queue: inputs in, the graph for B, the chosen ids out to host copy `slot`. -> the
        event that marks its end. Through the driver where it can (driver.py: four calls that
        keep Python's lock), else the same four through CuPy."""
        self._last = graphs or self.graphs
        graph, event, stream = self._last[self.bucket(b)][0], self._done[slot], self.stream.ptr
        offset, d = self._offset[first], driver()
        if d is not None and graph.graphExec:  # (instantiated: the capture uploaded it)
            d.to_device(self._inputs.data.ptr + offset, self._inputs_host[slot].ptr + offset, self._nbytes - offset,
                        stream)
            d.record(self._copied[slot].ptr, stream)
            self._copy_queued[slot] = True
            d.launch(graph.graphExec, stream)
            d.to_host(self._chosen_host[slot].ptr, self.chosen.data.ptr, 8 * b, stream)
            d.record(event.ptr, stream)
            return event
        self._copy_inputs(slot, first)
        self._copied[slot].record(self.stream)
        self._copy_queued[slot] = True
        graph.launch(self.stream)
        self.cp.cuda.runtime.memcpyAsync(self._chosen_host[slot].ptr, self.chosen.data.ptr, 8 * b,
                                         _DEVICE_TO_HOST, self.stream.ptr)
        event.record(self.stream)
        return event

    def step(self, tokens, caches, samplers=None, queue_next: bool = True, ahead: int | None = None) -> list:
        """Feed tokens[b] to the sequence in caches[b] (rows of this decoder's cache) and choose
        each one's next token. Returns, per row, the chosen id (an int), or, for a sampler
        with penalties, that row's logits [V] (float32, host) to sample on the host.

        A cache may take several consecutive rows (a prompt's next tokens, prefilled in the
        step): they go in at its next positions, each attending to those before it; a row
        whose sampler is None chooses nothing that matters (greedy, no random number drawn).

        Before waiting for a step of one row per sequence, the next ones are queued
        (`queue_next`; up to `depth`, and no more than `ahead`, the steps the caller knows
        every row will still take): each feeds the device's own choices (the sampler kernel
        leaves them, and the advanced positions, in the device inputs), so the GPU runs them
        while the host handles this step's tokens. If the next call feeds exactly those
        tokens to the same caches, its step is already running; otherwise (a sequence joined
        or left, or a caller fed something else) every queued step is superseded: its K/V
        writes sit past each cache's length, where the real steps write again, and the
        uniform numbers it drew are used by the real steps instead."""
        b = len(caches)
        if not 1 <= b <= self.max_rows:
            raise ValueError(f"a batched step takes 1 to {self.max_rows} rows, got {b}")
        samplers = list(samplers) if samplers is not None else [None] * b
        if len(tokens) != b or len(samplers) != b:
            raise ValueError(f"a batched step needs one token and one sampler per row: "
                             f"{len(tokens)} tokens, {len(samplers)} samplers, {b} rows")
        counts: dict[int, int] = {}  # id(cache) -> its rows in this step
        positions = []
        for cache in caches:
            if cache.pool is not self.pool:
                raise ValueError("every cache of a batched step must be a row from BatchDecoder.new_cache(), "
                                 "not yet released")
            n = counts.get(id(cache), 0)
            positions.append(cache.length + n)
            counts[id(cache)] = n + 1
        distinct = list({id(c): c for c in caches}.values())
        for cache in distinct:
            cache.check_room(counts[id(cache)])
        shared = len(distinct) < b
        tokens = [int(t) for t in tokens]
        queued = self._ahead
        if queued and not shared and queued[0].matches(tokens, caches, samplers):
            head = queued.popleft()
            slot, event = head.slot, head.event
        else:
            # superseded: their numbers are drawn again by the steps that use them, the latest
            # drawn given back first (a sampler gives back last in, first out)
            for step in reversed(queued):
                for sampler, u in reversed(step.drawn):
                    sampler.give_back(u)
            queued.clear()
            slot = self._slot = (self._slot + 1) % len(self.host)
            self._write_inputs(slot, tokens, positions, caches, samplers)
            current = self.cp.cuda.get_current_stream()
            if current.ptr != self.stream.ptr:  # after any prefill or prefix copy queued elsewhere
                self.stream.wait_event(current.record())  # (the scheduler's thread uses this stream)
            event = self._launch(b, slot, "tokens", self.prompt_graphs if shared else self.graphs)
        on_host = [i for i, s in enumerate(samplers) if s is not None and not CudaDecoder.supports(s.params)]
        rows = None
        # the host waits for the device twice at most: in the copy of host-sampled rows (it
        # ends with the replay), and on the event; together, what the GPU did not hide
        self.wait_seconds = 0.0
        if on_host:  # the logits of the penalised rows, before anything else overwrites them
            began = time.perf_counter()
            with self.stream:
                rows = self.logits(b)[np.asarray(on_host)].get(stream=self.stream)
            self.wait_seconds += time.perf_counter() - began
        if queue_next and not shared and not on_host:
            # step k behind this one writes each cache's position length + k: it must be in a held block
            depth = self.depth if ahead is None else min(self.depth, ahead)
            while len(queued) < depth and all(c.length + len(queued) + 2 <= c.allocated for c in caches):
                nslot = self._slot = (self._slot + 1) % len(self.host)
                drawn = self._write_params(nslot, samplers, caches)
                queued.append(_Queued(nslot, self._launch(b, nslot, "params"), drawn, list(caches), samplers))
        began = time.perf_counter()
        event.synchronize()
        self.wait_seconds += time.perf_counter() - began
        for cache in distinct:
            cache.advance(counts[id(cache)])
        out = [int(i) for i in np.frombuffer(self._chosen_host[slot], dtype=np.int64, count=b)]
        if queued:
            queued[0].expect(out, caches)  # (the ones behind it learn theirs as the steps before them end)
        for j, i in enumerate(on_host):
            out[i] = rows[j]
        return out


class _Queued:
    """A step queued ahead: what it will feed, and what it used."""

    def __init__(self, slot, event, drawn, caches, samplers):
        self.slot, self.event, self.drawn = slot, event, drawn
        self.caches, self.samplers = caches, samplers  # held: their ids cannot be reused meanwhile
        self.tokens, self.lengths = None, None

    def expect(self, tokens, caches):
        self.tokens, self.lengths = list(tokens), [c.length for c in caches]

    def matches(self, tokens, caches, samplers) -> bool:
        return (len(caches) == len(self.caches) and tokens == self.tokens
                and all(a is b for a, b in zip(caches, self.caches))
                and [c.length for c in caches] == self.lengths
                and all(a is b for a, b in zip(samplers, self.samplers)))


def batch_gemm(gemm: str | None = None) -> str:
    """The batched step's GEMMs (ops.py GEMMS): `gemm`, else TINYLLM_BATCH_GEMM, else auto:
    cuBLAS at one M (faster from a few rows up: docs/benchmarks.md), our own kernels where
    cuBLAS cannot be loaded."""
    gemm = gemm or os.environ.get("TINYLLM_BATCH_GEMM") or "auto"
    if gemm not in GEMMS + ("auto",):
        raise ConfigError(f"TINYLLM_BATCH_GEMM: expected auto or one of {', '.join(GEMMS)}, got {gemm!r}")
    if gemm == "auto":
        gemm = "cublas" if cublas_available() else "kernels"
    return gemm


def cublas_available() -> bool:
    """Whether this process can call cuBLAS through ctypes (tinyllm/cuda/cublas.py)."""
    from . import cublas

    try:
        cublas.handle()
    except (OSError, RuntimeError, AttributeError):
        return False
    return True


BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)  # batch sizes with a graph of their own


def max_batch_for(config, gemm: str = "kernels") -> int:
    """The most sequences per batched step for this model's shapes: on cuBLAS, STEP_ROWS; on
    our kernels 64, fewer, or 0 when gemv_rows cannot take some GEMM (a K that is not a
    multiple of 64: a round of the GEMM's inputs must fit in shared memory)."""
    if gemm == "cublas":
        return STEP_ROWS
    widths = (config.dim, config.n_heads * config.head_dim, config.hidden_dim)  # every GEMM's K
    return next((r for r in (K.MAX_ROWS, 32, 16, 8) if all(K.gemv_rows_fits(1, k, r) for k in widths)), 0)
