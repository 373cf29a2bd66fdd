"""Continuous batching: many requests share the model, one decode step at a time.

A single request decodes one token per forward pass, and on both the CPU and the GPU that
pass is bound by reading the weights, not by arithmetic. B requests decoded together read
the weights once for B tokens: `Model.decode_batch(tokens, caches)` runs one step for B
independent sequences, each with its own KV cache and position. Continuous batching keeps
that batch full while requests come and go:

    submit() ─► waiting (bounded; full -> QueueFull, the server's 503)
                   │  at a step boundary, while the batch has room:
                   ▼
               prefill the prompt (one request at a time) ─► first token
                   │
    ┌──────────────▼──────────────────────────────────────────────────────┐
    │ running batch: one decode_batch([last token of each], [their caches]) │  ◄─ one step
    │ each sequence samples its own token with its own sampler (own seed)   │
    │ finished (eos / stop / length) or cancelled sequences leave the batch  │
    └─────────────────────────────────────────────────────────────────────────┘

A sequence that joins or leaves changes nothing for the others: every row of the batch
attends only to its own cache, so a request decoded in a batch gives the same tokens as
the same request decoded alone (the tests check exactly that).

One thread, the scheduler, owns the model; nothing else touches it. Requests talk to the
thread through `submit` and `cancel` (thread-safe) and receive `Piece`, `Finished` or
`Failed` events through the `emit` callback they bring (the HTTP server passes one that
hands the event to its event loop).

On a GPU with the fast path, the steps run through tinyllm/cuda/batch.py instead: every
running sequence holds a row of one preallocated KV cache, a step is a replayed CUDA graph
for that batch size, and the next tokens are chosen on the device (only rows with
penalties come back as logits). Prefill is the same model.forward either way.

Everything that decides *what* to generate is generate.py's, reused unchanged: a
`Generation` per request (sampler and its seeded generator, penalties' history, streaming
detokenizer, stop strings, end-of-sequence ids, token budget). Generation asks its
`logits(ids)` method for the next logits; here that method is overridden so that decode
steps return this sequence's row of the batched step instead of running the model alone.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .backend import to_numpy
from .errors import ConfigError, TinyLLMError
from .generate import Context, Generation, StopRules
from .sampler import Sampler, SamplingParams


class QueueFull(TinyLLMError, RuntimeError):
    """The scheduler already holds as many requests as it accepts (the server answers 503)."""


class SchedulerStopped(TinyLLMError, RuntimeError):
    """The scheduler is shutting down and takes no new requests."""


# ---- what a request receives ----------------------------------------------------------------

@dataclass
class Piece:
    """One generated token and the text it adds ('' while the detokenizer or a possible stop
    string holds text back)."""

    token_id: int
    text: str


@dataclass
class Finished:
    """The end of a request. reason: 'eos', 'stop', 'length', 'context' (generate.py's) or
    'cancelled'; the token counts are what `usage` reports."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]


@dataclass
class Failed:
    """The request could not run (shutdown, or an error in the model)."""

    message: str


@dataclass(eq=False)
class Request:
    """A prompt and how to continue it. `emit(event)` is called from the scheduler thread."""

    prompt_ids: list[int]
    sampling: SamplingParams
    rules: StopRules
    emit: Callable[[object], None]
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False


class Observer:
    """What the scheduler reports for metrics; the server's Prometheus metrics subclass it."""

    def first_token(self, seconds: float) -> None: ...   # time from arrival to the first token
    def token_gap(self, seconds: float) -> None: ...     # time between two tokens of one sequence
    def step(self, batch_size: int) -> None: ...         # one decode step ran for this many sequences
    def finished(self, event: Finished) -> None: ...


# ---- one sequence of the batch --------------------------------------------------------------

class BatchedGeneration(Generation):
    """A Generation whose decode steps take their logits from the batched step.

    The prefill (the first call of `logits`) runs through the model alone, as in
    generate.py; afterwards the scheduler puts this sequence's result of the batched step
    in `step_logits` before asking for the next token: its row of `decode_batch` (logits
    [V]), or on the GPU the id already chosen on the device (an int; logits for a sampler
    with penalties). The step has already appended the fed-back token to the cache; here
    it is recorded in the context's ids."""

    step_logits = None

    def logits(self, ids):
        if self.step_logits is None:
            return super().logits(ids)  # prefill: [T] ids -> logits [V]
        logits, self.step_logits = self.step_logits, None
        self.context.ids.extend(ids)
        return logits


class Sequence:
    """A running request: its Generation, driven one token at a time by the scheduler."""

    def __init__(self, request: Request, model, tokenizer, rows=None):
        self.request = request
        self.rows = rows  # the GPU's BatchDecoder, whose cache rows sequences borrow; or None
        context = Context(model, cache=rows.new_cache()) if rows is not None else None
        try:
            self.generation = BatchedGeneration(model, tokenizer, request.prompt_ids, sampler=Sampler(request.sampling),
                                                rules=request.rules, context=context)
        except Exception:
            if context is not None:
                rows.release(context.cache)
            raise
        self.tokens = iter(self.generation)
        self.last_token: int | None = None
        self.last_time = 0.0

    @property
    def cache(self):
        return self.generation.context.cache

    @property
    def finish_reason(self) -> str | None:
        return self.generation.stats.finish_reason

    def advance(self):
        """Sample the next token (running the prefill first on the first call) -> Piece or None."""
        token = next(self.tokens, None)
        if token is None:  # a budget of 0 tokens: the generator ends before producing any
            return None
        self.last_token = token.id
        return Piece(token.id, token.text)

    def finished_event(self, reason: str | None = None) -> Finished:
        g = self.generation
        return Finished(reason or g.stats.finish_reason or "length", len(g.prompt_ids),
                        len(g.token_ids), list(g.token_ids))

    def close(self) -> None:
        self.tokens.close()  # runs the generator's cleanup
        if self.rows is not None:
            self.rows.release(self.cache)  # the row goes back to the batched cache (else the cache is freed)


# ---- the scheduler ----------------------------------------------------------------------------

class Scheduler:
    """Owns the model in one thread; batches all running requests into one decode step.

    max_batch: how many sequences decode together; max_queue: how many more may wait.
    A request beyond both is refused at once with QueueFull."""

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64,
                 observer: Observer | None = None, max_context: int | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.rows = None  # on the GPU fast path: the BatchDecoder (captured here, before any request)
        decoder = getattr(model, "cuda_decoder", None)
        if decoder is not None and decoder.ops.fused_attention:
            from .cuda.batch import enable_batching, max_batch_for

            most = max_batch_for(model.config)  # 16, 8 for very wide MLPs, 0: the readable decode_batch
            if max_batch > most > 0:
                raise ConfigError(f"--max-batch: the GPU fast path decodes up to {most} sequences per step "
                                  f"for this model, got {max_batch}")
            if most:
                self.rows = enable_batching(model, max_batch, max_context)
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.observer = observer or Observer()
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Sequence] = []
        self.n_admitting = 0            # popped from `waiting`, being prefilled
        self.steps = 0                  # decode steps run so far
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- called from other threads ----------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request; QueueFull when max_batch + max_queue requests are already held."""
        with self._lock:
            if self._stopping:
                raise SchedulerStopped("the server is shutting down")
            held = len(self.waiting) + len(self.running) + self.n_admitting
            if held >= self.max_batch + self.max_queue:
                raise QueueFull(f"server busy: {held} requests running or waiting "
                                f"(--max-batch {self.max_batch} + --max-queue {self.max_queue}); retry later")
            self.waiting.append(request)
            self._lock.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away). A waiting request leaves the queue now; a
        running one leaves the batch at the next step boundary, freeing its cache."""
        with self._lock:
            request.cancelled = True
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
            self._lock.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="tinyllm-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests, fail the waiting ones, cancel the running ones, join the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the scheduler thread -----------------------------------------------------------------
    def _loop(self) -> None:
        if self.rows is not None:
            self.rows.stream.use()  # prefills and batched steps of this thread: one stream, in order
        while True:
            with self._lock:
                while not self._stopping and not self.waiting and not self.running:
                    self._lock.wait()
                if self._stopping:
                    break
            self.run_once()
        self.close()

    def run_once(self) -> None:
        """One step boundary: cancelled sequences leave, waiting ones join, one decode step.
        (The thread calls this in a loop; tests call it directly to control the timing.)"""
        self._drop_cancelled()
        self._admit()
        if self.running:
            try:
                self._step()
            except Exception as e:  # the model failed: fail the batch, keep serving
                for seq in self.running:
                    seq.close()
                    seq.request.emit(Failed(f"{type(e).__name__}: {e}"))
                self.running = []

    def _admit(self) -> None:
        """Prefill waiting requests while the batch has room; each joins with its first token."""
        while len(self.running) < self.max_batch:
            with self._lock:
                if not self.waiting or self._stopping:
                    return
                request = self.waiting.popleft()
                self.n_admitting += 1
            seq = None
            try:
                seq = Sequence(request, self.model, self.tokenizer, self.rows)
                self._emit_next(seq)  # prefill + first token
                if seq.finish_reason is None and not request.cancelled:
                    self.running.append(seq)
                elif seq.finish_reason is None:
                    self._finish(seq, "cancelled")
            except Exception as e:  # one bad request must not stop the server
                if seq is not None:
                    seq.close()
                request.emit(Failed(f"{type(e).__name__}: {e}"))
            finally:
                with self._lock:
                    self.n_admitting -= 1

    def _step(self) -> None:
        """One decode step for every running sequence, then each samples its next token."""
        batch = self.running
        tokens = [seq.last_token for seq in batch]                                   # B ids
        if self.rows is not None:  # the GPU: next ids chosen on the device (logits rows for penalties)
            logits = self.rows.step(tokens, [seq.cache for seq in batch], [seq.generation.sampler for seq in batch])
        else:
            logits = to_numpy(self.model.decode_batch(tokens, [seq.cache for seq in batch]))  # [B, V]
        self.steps += 1
        self.observer.step(len(batch))
        for seq, row in zip(batch, logits):
            seq.generation.step_logits = row
            self._emit_next(seq)
        self.running = [seq for seq in batch if seq.finish_reason is None]

    def _emit_next(self, seq: Sequence) -> None:
        piece = seq.advance()
        now = time.perf_counter()
        if piece is not None:
            if seq.last_time == 0.0:
                self.observer.first_token(now - seq.request.arrived)
            else:
                self.observer.token_gap(now - seq.last_time)
            seq.last_time = now
            seq.request.emit(piece)
        if seq.finish_reason is not None or piece is None:
            self._finish(seq)

    def _finish(self, seq: Sequence, reason: str | None = None) -> None:
        event = seq.finished_event(reason)
        seq.close()
        self.observer.finished(event)
        seq.request.emit(event)

    def _drop_cancelled(self) -> None:
        keep = []
        for seq in self.running:
            if seq.request.cancelled:
                self._finish(seq, "cancelled")
            else:
                keep.append(seq)
        self.running = keep

    def close(self) -> None:
        """End every waiting and running request now (their cache rows go back): the thread's
        last act, and what a caller that drives `run_once` itself (generate_batch) calls."""
        with self._lock:
            waiting, self.waiting = list(self.waiting), collections.deque()
        for request in waiting:
            request.emit(Failed("the server is shutting down"))
        for seq in self.running:
            self._finish(seq, "cancelled")
        self.running = []
