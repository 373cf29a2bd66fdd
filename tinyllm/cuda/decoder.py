"""CudaDecoder: the whole decode step captured once into a CUDA graph, replayed per token.

Even with fused kernels, a decode step is ~150 launches. Launched one by one from
Python each costs ~10 µs of host time, more than the GPU needs to run it, so the step
would be host-bound. A CUDA graph records the launches once and replays them with one
call. What makes the readable `Model.forward` capturable:

- no host sync, no host<->device copy, no cuBLAS inside the step: FastOps (ops.py), made
  in its "graph" mode, runs its own kernels for every operation of a one-token step;
- the inputs that change per token live in device memory: the token id (`self.token`)
  and the position (`self.pos`), written by a tiny kernel before a replay, or advanced by
  the graph itself: its last kernel samples the next token, writes it where the next
  step reads its input and increments the position. That device position is the graph's
  input, not a second owner: the host writes it from `cache.length`, and a step queued
  ahead is used only if the cache's position is the one it assumed;
- every buffer the graph touches stays alive with it: temporaries come from a private
  memory pool that lives as long as the graph, so no later allocation can reuse them.

Because each replay feeds itself, the host can queue step i+1 before it reads token i:
the GPU never waits for Python. The host reads each token through a small asynchronous
copy into pinned memory and an event. Two ways in: `decode()` yields many tokens with the
next step always queued; `step()` serves a caller that feeds one token at a time
(tinyllm.generate) and queues the following step before it waits. All work of this
thread goes to the decoder's stream (made current at construction), so a prefill, a
replay and a step queued ahead never overlap.

Within a step, kernels are launched with programmatic dependent launch (kernels.py):
each one starts while the previous one finishes, loading its weights early.

Sampling: greedy or temperature / top-k / top-p / min-p on the device (kernels.cu);
the one uniform number per token is drawn on the host from the sampler's seeded
generator, so a seeded run is reproducible. Repetition/presence/frequency penalties
need the token history on the host: `supports(params)` is False for them, and the
caller (CudaStep.decode) runs the step eagerly and samples the logits on the host.

    decoder = CudaDecoder(llm.model)          # compiles kernels, captures a warm-up graph
    cache = decoder.new_cache(4096)           # a cache and its captured step
    logits = decoder.eager.forward(prompt_ids, cache)   # the prompt: fused row kernels + cuBLAS
    first = sampler(to_numpy(logits[0, -1]))
    for tok in decoder.decode(cache, first, max_new_tokens - 1, sampler):
        ...
"""
from __future__ import annotations

import time
import weakref

import numpy as np

from ..errors import DeviceError
from ..model import Model
from . import kernels as K
from .ops import FastOps

_DEVICE_TO_HOST = 2  # cudaMemcpyDeviceToHost


class _CapturedStep:
    """A captured decode step for one KV cache, with everything it must keep alive."""

    def __init__(self, graph, pool, logits, history, cache):
        self.graph = graph
        self.pool = pool          # the graph's temporaries live here
        self.logits = logits      # [1, 1, V] fp32, written by every replay
        self.history = history    # [S_cap + 1] int64: history[p + 1] = token sampled at position p
        self.cache = weakref.ref(cache)

    @property
    def n_nodes(self) -> int:
        """Nodes in the graph (node definitions in its DOT description)."""
        import re

        return len(set(re.findall(r'"(\w*node_\d+)"\s*\[', self.graph.debug_dot_str())))


class CudaDecoder:
    """The captured single-sequence decode step of a model (fp16 or bf16, on a GPU).

    `eager` is the same model computing with FastOps called from Python (a prompt, or a
    step outside a graph); the model handed in keeps its readable operations."""

    def __init__(self, model: Model, warmup: bool = True):
        if not model.device.is_cuda:
            raise DeviceError(f"the CUDA fast path needs a model on a GPU, this one is on {model.device.name}")
        if K.element_type(model.dtype) is None:
            raise DeviceError(f"the CUDA fast path needs float16 or bfloat16 weights, got {np.dtype(model.dtype).name} "
                              "(use --dtype float16 or bfloat16)")
        import cupy as cp

        self.cp = cp
        self.model = model
        c = model.config
        self.pos = cp.zeros(1, dtype=cp.int32)          # the step's position, in device memory
        self.eager = model.with_ops(FastOps.for_model(model, "eager"))
        self.graph_ops = FastOps.for_model(model, "graph", positions=self.pos)
        self.graph_model = model.with_ops(self.graph_ops)
        self.token = cp.zeros((1, 1), dtype=cp.int64)   # the step's input token
        self.params = cp.zeros(5, dtype=cp.float32)     # temperature, top_k, top_p, min_p, u
        self.w_scratch = cp.empty(c.vocab_size, dtype=cp.float32)
        # The weights may still be being written (a load's conversions, a random model's
        # numbers) on the stream that was current until now, which a non-blocking stream does
        # not wait for: the warm-up below would read them half made (NaN logits, a sampled id
        # out of range, an illegal address in the next step's embedding lookup).
        cp.cuda.Device().synchronize()
        # One stream for everything on this thread from now on (prefill, replays, copies):
        # work queued by the decoder and by the readable path can then never overlap.
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.stream.use()
        self._steps: dict[int, _CapturedStep] = {}
        self._pinned = None  # host buffer the sampled ids are copied into (pinned: async copies)
        self._ahead = None   # the step queued ahead by step(): (cache id, position, token fed, event)
        self._step_host = cp.cuda.alloc_pinned_memory(8 * 2)
        self.warmup_seconds = 0.0
        if warmup:
            self.warmup()

    # ---- load time ---------------------------------------------------------------------
    def warmup(self) -> None:
        """Compile every kernel and capture + replay one step, so the first request is warm."""
        start = time.perf_counter()
        K.compile_kernels(self.graph_ops.kernel_names())
        cache = self.model.new_cache(2 * K.attention_chunk(self.model.config.head_dim) + 1)
        self.step_logits(cache, 0)
        self._steps.pop(id(cache), None)
        self.stream.synchronize()
        self.warmup_seconds = time.perf_counter() - start

    def new_cache(self, capacity: int | None = None):
        """A KV cache with its decode step already captured."""
        cache = self.model.new_cache(capacity)
        self.captured(cache)
        return cache

    # ---- capture -------------------------------------------------------------------------
    def captured(self, cache) -> _CapturedStep:
        step = self._steps.get(id(cache))
        if step is None or step.cache() is not cache:
            step = self._steps[id(cache)] = self._capture(cache)
        return step

    def _step(self, cache, history):
        """One decode step as ordinary calls: the model's forward, then the sampler kernel."""
        logits = self.graph_model.forward(self.token, cache)  # [1, 1, V] fp32
        K.sample_token(logits, self.params, self.w_scratch, self.token, history, self.pos)
        return logits

    def _capture(self, cache) -> _CapturedStep:
        cp = self.cp
        cache.check_room(1)
        history = cp.zeros(cache.capacity + 1, dtype=cp.int64)
        with self.stream:
            K.set_step(self.token, self.pos, self.params, 0, cache.length, 0.0)
        # each run writes K/V at the cache's position (the first real step overwrites them)
        # through a view, whose position moves instead of the cache's
        graph, pool, logits = capture_graph(self.stream, lambda: self._step(cache.view(), history))
        return _CapturedStep(graph, pool, logits, history, cache)

    # ---- replay ----------------------------------------------------------------------------
    def _set_params(self, params) -> None:
        if params is None or params.greedy:
            values = [0.0, 0.0, 1.0, 0.0, 0.0]
        else:
            values = [params.temperature, params.top_k, params.top_p, params.min_p, 0.0]
        self.params.set(np.asarray(values, dtype=np.float32), stream=self.stream)

    @staticmethod
    def supports(params) -> bool:
        """Whether decode() can sample with these SamplingParams on the device."""
        return params is None or not params.needs_host

    def step_logits(self, cache, token: int):
        """Replay one step with `token` at position cache.length; returns the logits [V] (a copy)."""
        self._ahead = None
        step = self.captured(cache)
        self._set_params(None)
        self.stream.wait_event(self.cp.cuda.get_current_stream().record())
        with self.stream:
            K.set_step(self.token, self.pos, self.params, int(token), cache.length, 0.0)
            step.graph.launch(self.stream)
            out = step.logits.reshape(-1).copy()
        self.stream.synchronize()
        cache.advance(1)
        return out

    def step(self, cache, token: int, sampler=None) -> int:
        """Feed `token` at position cache.length and return the next token, chosen on the device.

        For a caller that handles one token at a time (tinyllm.generate). Before waiting for
        this step, the following one is queued too (it feeds whatever the device chooses
        now), so the GPU never waits for the caller: when the caller then feeds that token,
        its step is already running. A different token, or any other work, is queued after
        it on the same stream (its K/V write past cache.length is overwritten later). One
        uniform number per queued step is drawn from the sampler's generator, so a stopped
        generation has drawn one more than it used."""
        params = None if sampler is None else sampler.params
        if not self.supports(params):
            raise ValueError("repetition/presence/frequency penalties need host sampling: use step_logits")
        captured = self.captured(cache)
        greedy = params is None or params.greedy
        position = cache.length
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead[:3] != (id(cache), position, int(token)):
            cache.check_room(1)
            self._set_params(params)
            ahead = (id(cache), position, int(token), self._queue_step(captured, position, int(token), sampler, greedy))
        following = None
        if position + 2 <= cache.capacity:  # queue the next step now: it feeds the device's choice
            following = self._queue_step(captured, position + 1, None, sampler, greedy)
        ahead[3].synchronize()
        cache.advance(1)
        chosen = int(np.frombuffer(self._step_host, dtype=np.int64, count=2)[position % 2])
        if following is not None:
            self._ahead = (id(cache), position + 1, chosen, following)
        return chosen

    def _queue_step(self, captured, position: int, token, sampler, greedy: bool):
        """Queue one replay at `position` (token None: the one the device chose last) and the
        copy of its choice into slot position % 2 of the pinned buffer; returns its event."""
        with self.stream:
            if token is not None or not greedy:
                u = 0.0 if greedy else sampler.uniform()
                K.set_step(self.token, self.pos, self.params, token, position, u)
        captured.graph.launch(self.stream)
        self.cp.cuda.runtime.memcpyAsync(self._step_host.ptr + 8 * (position % 2),
                                         captured.history.data.ptr + 8 * (position + 1), 8,
                                         _DEVICE_TO_HOST, self.stream.ptr)
        return self.stream.record()

    def decode(self, cache, token: int, max_new_tokens: int, sampler=None):
        """Yield up to max_new_tokens ids, each the model's choice after the previous one;
        `token` (e.g. sampled from the prefill logits) is the first input.

        `sampler`: a tinyllm.sampler.Sampler (its params and seeded generator), or None
        for greedy. Stop early by closing the generator (break out of the loop): the
        cache then holds exactly the tokens consumed."""
        params = None if sampler is None else sampler.params
        if not self.supports(params):
            raise ValueError("repetition/presence/frequency penalties need host sampling: use step_logits")
        if max_new_tokens <= 0:
            return
        cp = self.cp
        self._ahead = None
        step = self.captured(cache)
        cache.check_room(max_new_tokens)
        start = cache.length
        self._set_params(params)
        greedy = params is None or params.greedy
        if self._pinned is None or self._pinned.size() < 8 * max_new_tokens:  # allocating pinned memory is slow
            self._pinned = cp.cuda.alloc_pinned_memory(8 * max(max_new_tokens, 4096))
        host = self._pinned
        out = np.frombuffer(host, dtype=np.int64, count=max_new_tokens)
        events = []
        self.stream.wait_event(cp.cuda.get_current_stream().record())  # after the prefill

        def launch(i):
            if i == 0 or not greedy:  # greedy steps after the first need no input from the host
                u = 0.0 if greedy else sampler.uniform()
                with self.stream:
                    K.set_step(self.token, self.pos, self.params, int(token) if i == 0 else None, start, u)
            step.graph.launch(self.stream)
            cp.cuda.runtime.memcpyAsync(host.ptr + 8 * i, step.history.data.ptr + 8 * (start + i + 1), 8,
                                        _DEVICE_TO_HOST, self.stream.ptr)
            events.append(self.stream.record())

        try:
            launch(0)
            for i in range(max_new_tokens):
                if i + 1 < max_new_tokens:
                    launch(i + 1)  # queue the next step before waiting for this one
                events[i].synchronize()
                cache.advance(1)
                yield int(out[i])
        finally:
            self.stream.synchronize()


def capture_graph(stream, run):
    """Run `run()` once eagerly, then capture a second run into a CUDA graph; -> (graph, pool,
    what the captured run returned). The eager run loads the kernels and fills a private
    memory pool, so the capture allocates nothing new; the graph's temporaries live in that
    pool, which must be kept as long as the graph."""
    import cupy as cp

    pool = cp.cuda.MemoryPool()
    with cp.cuda.using_allocator(pool.malloc), stream:
        run()
        stream.synchronize()
        stream.begin_capture()
        try:
            result = run()
        finally:
            graph = stream.end_capture()
        graph.upload(stream)
        stream.synchronize()
    return graph, pool, result
