"""Continuous batching: many requests share the model, one decode step at a time.

A single request decodes one token per forward pass, and on both the CPU and the GPU that
pass is bound by reading the weights, not by arithmetic. B requests decoded together read
the weights once for B tokens: `Model.decode_batch(tokens, caches)` runs one step for B
independent sequences, each with its own KV cache and position. Continuous batching keeps
that batch full while requests come and go:

    submit() ─► waiting (bounded; full -> QueueFull, the server's 503)
                   │  at a step boundary, while the batch has room: joins, its prompt pending
    ┌──────────────▼──────────────────────────────────────────────────────────┐
    │ one step: a row per decoding sequence (its last token), then the next     │  ◄─ one step
    │ chunk of each pending prompt (as many rows as the step takes)             │
    │ the row that ends a sequence's input gives its next token: the first one  │
    │ after the prompt, or the next while decoding, from its own sampler        │
    │ finished (eos / stop / length) or cancelled sequences leave the batch     │
    └─────────────────────────────────────────────────────────────────────────────┘

A sequence that joins or leaves changes nothing for the others: every row of the batch
attends only to its own cache, so a request decoded in a batch gives the same tokens as
the same request decoded alone (the tests check exactly that). Prompts waiting to be
prefilled never stall the running sequences for more than a step: their chunks ride in the
same steps (the readable batch runs each prompt whole, through the model's forward pass).

One thread, the scheduler, owns the model; nothing else touches it. Requests talk to the
thread through `submit` and `cancel` (thread-safe) and receive `Piece`, `Finished` or
`Failed` events through the `emit` callback they bring (the HTTP server passes one that
hands the event to its event loop).

The model is reached through a decode step (step.py), chosen once by `tinyllm.load`:
`step.batch(max_batch, capacity)` gives the caches the sequences borrow and the batched
step itself. The readable one gives each sequence a cache of its own and runs
`Model.decode_batch`; on a GPU with the fast path (tinyllm/cuda) every running sequence
holds blocks of one paged KV cache, a step is a replayed CUDA graph for that batch size,
and the next tokens are chosen on the device.

A paged cache (kv_cache.py BlockPool, on the GPU, or on the CPU with kv_cache_bytes) is
shared: sequences take blocks as they grow. A request joins only when the pool has blocks
for its prompt (`_fits`); before each step every sequence is given room for its rows
(`_reserve`), and when the pool is short the sequence that joined last is preempted: it
gives its blocks back and rejoins first, computing its prompt and tokens so far again. On the
GPU's batched step that gives it the same keys and values bit for bit (a row's numbers do
not depend on the rows beside it, nor on being a prompt's row or a decode row), so the same
next tokens; on the readable path tokens computed again as one prompt block may differ from
their decode-step values in the last bits.

Prefix reuse (prefix.py): with a `PrefixCache`, a sequence that joins first copies the
keys and values of the longest cached beginning of its prompt into its cache, and only the
rest is pending; once its prompt is prefilled, the prompt's whole blocks are stored for the
requests after it (a block that cannot be stored is skipped: storing never fails a request).
A request whose prompt continues a prefix that a running sequence is still prefilling waits
for it in the queue, if the cache has room for it (a burst of requests with one system
prompt computes that prompt once, not once per request).

What a token means is generate.py's, reused unchanged: each request's `TokenStream` is fed
its ids (stop strings, end-of-sequence ids, token budget, streaming detokenizer, penalties'
history), and its own `Sampler` (own seed) samples whatever the step leaves to the host.

One request never takes another down: an error while handling one sequence (its prompt,
its sampler, NaN logits in its row, its detokenizer, its client's callback) ends that
request with a `Failed` event and the others carry on with exactly the tokens they would
have had alone. Only a failure of the batched step itself ends every running request.
"""
from __future__ import annotations

import collections
import math
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

from .errors import ConfigError, ContextOverflowError, TinyLLMError
from .generate import StopRules, TokenStream, prompt_logprobs, start_ids
from .prefix import PrefixCache, block_hashes
from .sampler import Sampler, SamplingParams, TokenLogprob
from .step import as_step


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
    logprob: TokenLogprob | None = None  # with SamplingParams.logprobs set


@dataclass
class PromptLogprobs:
    """Sent first, to a request that asked for them: each prompt token's TokenLogprob (the
    first is None), as generate.prompt_logprobs gives them."""

    logprobs: list


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
    prompt_logprobs: int | None = None  # N: score the prompt first (PromptLogprobs, N alternatives)


class Observer:
    """What the scheduler reports for metrics; the server's Prometheus metrics subclass it."""

    def first_token(self, seconds: float) -> None: ...   # time from arrival to the first token
    def token_gaps(self, seconds: list) -> None: ...     # per step: time between two tokens of each sequence
    def step(self, batch_size: int) -> None: ...         # one decode step ran for this many sequences
    def step_time(self, host: float, model: float) -> None: ...  # one scheduler round's seconds: on the
    # host (admission, inputs, host sampling, detokenizing, events) and in or waiting for the model
    def prompt(self, reused: int, computed: int) -> None: ...  # a sequence joined: its prompt tokens
    # copied from the prefix cache (prefix.py), and those left to compute
    def preempted(self) -> None: ...                     # a sequence left the batch for KV blocks
    def finished(self, event: Finished) -> None: ...


# ---- one sequence of the batch --------------------------------------------------------------

class Sequence:
    """A running request: its cache, its sampler and the TokenStream its tokens go to."""

    def __init__(self, request: Request, tokenizer, config, rows):
        self.request = request
        self.prompt_ids = start_ids(request.prompt_ids, tokenizer)
        self.sampler = Sampler(request.sampling)
        self.stream = TokenStream(tokenizer, config, self.prompt_ids, request.rules, self.sampler.params.uses_history)
        self.rows = rows
        self.cache = None     # borrowed from `rows` when the sequence joins the batch
        self.pending: list[int] = []  # prompt ids not yet in the cache: prefilled by the next steps
        self.reused = 0       # prompt positions copied from the prefix cache
        self.prefix_keys: list[bytes] = []  # the prompt's block hashes, while a prefix cache is used
        self.last_token: int | None = None
        self.last_time = 0.0

    @property
    def finish_reason(self) -> str | None:
        return self.stream.finish_reason

    def start(self, prefix: PrefixCache | None = None) -> None:
        """Borrow a cache and copy into it the longest beginning of the prompt that `prefix`
        holds; the rest of the prompt is pending, for the steps to prefill. A sequence that
        was preempted starts again the same way from everything it had: its prompt and the
        tokens it has generated, the last of them not yet fed (`ids`)."""
        if len(self.prompt_ids) > self.rows.capacity:
            raise ContextOverflowError(f"context overflow: the prompt has {len(self.prompt_ids)} tokens but the "
                                       f"context holds {self.rows.capacity}")
        self.cache = self.rows.new_cache(len(self.prompt_ids) + max(self.stream.rules.max_new_tokens, 1))
        ids = self.ids
        if prefix is not None:
            self.prefix_keys = block_hashes(self.prompt_ids, prefix.block)
            self.reused = prefix.reuse(ids, self.cache)
        self.pending = ids[self.reused:]
        # a paged cache takes the blocks of its prompt and first token now, so that the next
        # request to join sees them taken (the scheduler's _fits found them free)
        self.cache.reserve(len(self.pending) + 1)

    @property
    def ids(self) -> list[int]:
        """The ids to feed to run this sequence from scratch: the prompt's and the tokens so far
        (the last of which, once decoding, is the next one to feed)."""
        return self.prompt_ids + self.stream.token_ids

    def steps_left(self) -> int:
        """After the step that gives its next token, the most steps this sequence can still take
        part in: its token budget and its context bound it (an end-of-sequence id or a stop
        string may end it sooner)."""
        s, cache = self.stream, self.cache
        return max(0, min(s.rules.max_new_tokens - len(s.token_ids), cache.capacity - cache.length) - 1)

    def suspend(self) -> None:
        """Leave the batch without ending (preempted: the KV cache pool is short). The cache goes
        back; `start` later computes everything again (on the GPU the same keys and values bit
        for bit: see the module docstring)."""
        self.close()
        self.pending, self.reused = [], 0

    def add(self, token: int) -> Piece:
        """Take this sequence's next id -> the Piece to send."""
        self.last_token = token
        piece = self.stream.add(token, context_full=self.cache.length >= self.cache.capacity,
                                logprob=self.sampler.take_logprob())
        return Piece(piece.id, piece.text, piece.logprob)

    def finished_event(self, reason: str | None = None) -> Finished:
        s = self.stream
        return Finished(reason or s.finish_reason or "length", len(self.prompt_ids), len(s.token_ids),
                        list(s.token_ids))

    def close(self) -> None:
        if self.cache is not None:
            self.rows.release(self.cache)  # a row goes back to the batched cache (else the cache is freed)
            self.cache = None


# ---- the scheduler ----------------------------------------------------------------------------

class Scheduler:
    """Owns the model in one thread; batches all running requests into one decode step.

    step: the decode step chosen at load (`llm.step`; a bare Model runs its readable one).
    max_batch: how many sequences decode together; max_queue: how many more may wait.
    A request beyond both is refused at once with QueueFull.
    prefix_cache: prompt prefixes' keys and values to reuse (prefix.py); None: none kept."""

    def __init__(self, step, tokenizer, max_batch: int = 16, max_queue: int = 64,
                 observer: Observer | None = None, max_context: int | None = None,
                 prefix_cache: PrefixCache | None = None, kv_cache_bytes: int | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        step = as_step(step)
        if step.max_batch is not None and max_batch > step.max_batch:
            raise ConfigError(f"--max-batch: {step.name} decodes up to {step.max_batch} sequences per step "
                              f"for this model, got {max_batch}")
        self.step = step
        self.config = step.model.config
        capacity = min(max_context or self.config.max_seq_len, self.config.max_seq_len)
        # the caches sequences borrow (paged, in a pool of kv_cache_bytes, where the step takes
        # one: see `_reserve`), and the batched step
        self.rows = step.batch(max_batch, capacity, kv_cache_bytes)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.observer = observer or Observer()
        self.prefix = prefix_cache
        self._keys = weakref.WeakKeyDictionary()  # waiting request -> its prompt's block hashes
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Sequence] = []  # in the order they joined
        self.preempted: collections.deque[Sequence] = collections.deque()  # rejoin first, oldest first
        self.preemptions = 0            # sequences preempted so far
        self.n_admitting = 0            # popped from `waiting`, being prefilled
        self.steps = 0                  # decode steps run so far
        self._gaps: list[float] = []    # this step's times between tokens, for the observer
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- called from other threads ----------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request; QueueFull when max_batch + max_queue requests are already held."""
        with self._lock:
            if self._stopping:
                raise SchedulerStopped("the server is shutting down")
            held = len(self.waiting) + len(self.running) + len(self.preempted) + self.n_admitting
            if held >= self.max_batch + self.max_queue:
                raise QueueFull(f"server busy: {held} requests running or waiting "
                                f"(--max-batch {self.max_batch} + --max-queue {self.max_queue}); retry later")
            self.waiting.append(request)
            self._lock.notify()

    def cancel(self, request: Request) -> bool:
        """Stop a request (its client went away). A waiting request leaves the queue now (True:
        it gets no more events); a running one leaves the batch at the next step boundary,
        freeing its cache, and gets its Finished event."""
        with self._lock:
            request.cancelled = True
            self._lock.notify()
            try:
                self.waiting.remove(request)
                return True
            except ValueError:
                return False

    @property
    def queue_depth(self) -> int:
        return len(self.waiting) + len(self.preempted)

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
        self.rows.enter_thread()
        while True:
            with self._lock:
                while not self._stopping and not self.waiting and not self.running and not self.preempted:
                    self._lock.wait()
                if self._stopping:
                    break
            self.run_once()
        self.close()

    def run_once(self) -> None:
        """One step boundary: cancelled sequences leave, waiting ones join, one decode step.
        (The thread calls this in a loop; tests call it directly to control the timing.)"""
        began = time.perf_counter()
        self._drop_cancelled()
        self._admit()
        if self.running:
            try:
                self._step()
            except Exception as e:  # the batched step itself failed: every running request ends
                for seq in self.running:
                    self._fail(seq, e)
                self.running = []
                return
            # where a round's time goes: if the host's share outgrows the model's, more rows per
            # step cannot help; only less host work per token can
            model = self.rows.model_seconds
            self.observer.step_time(max(0.0, time.perf_counter() - began - model), model)

    def _admit(self) -> None:
        """Preempted sequences, then waiting requests, join while the batch has room and the KV
        cache pool (if paged) has blocks for their prompts; the prompts are prefilled by the
        steps that follow (in chunks that ride beside the running sequences' decode rows). In
        order: a request that does not fit yet holds back those behind it.

        A round admits only as many as the next step has rows for: every row beyond those
        would wait for a later step anyway, and a joining sequence costs host time (its
        sampler, its detokenizer, its prefix copied), so while a wave of requests arrives
        faster than they join, admitting all of them first would hold back every step, and
        with it the first token of those already in."""
        rows, budget = self._rows_planned(), self.rows.max_rows or math.inf  # (no limit: prompts run whole)
        while (self.preempted and len(self.running) < self.max_batch and rows < budget
               and self._fits(len(self.preempted[0].ids))):
            seq = self.preempted.popleft()
            try:
                seq.start(self.prefix)
                self.running.append(seq)
                rows += len(seq.pending)
            except Exception as e:
                self._fail(seq, e)
        if self.preempted:
            return
        while len(self.running) < self.max_batch and rows < budget:
            with self._lock:
                request = None if self._stopping else self._next_request()
                if request is None or not self._fits(len(request.prompt_ids) or 1):
                    return
                self.waiting.remove(request)
                self.n_admitting += 1
            seq = None
            try:
                seq = Sequence(request, self.tokenizer, self.config, self.rows)
                if request.prompt_logprobs is not None:
                    request.emit(PromptLogprobs(prompt_logprobs(self.step, seq.prompt_ids, request.prompt_logprobs)))
                if seq.finish_reason is not None:  # a budget of 0 tokens: nothing to run
                    self._finish(seq)
                    continue
                seq.start(self.prefix)
                self.observer.prompt(seq.reused, len(seq.pending))
                self.running.append(seq)  # last: a sequence that failed must not be left running
                rows += len(seq.pending)
            except Exception as e:  # one bad request must not stop the server
                self._fail(seq, e, request)
            finally:
                with self._lock:
                    self.n_admitting -= 1

    def _rows_planned(self) -> int:
        """The rows the running sequences ask of the next step: one for each decoding sequence,
        its pending ids for each prompt not yet in its cache."""
        return sum(len(seq.pending) or 1 for seq in self.running)

    def _fits(self, n_ids: int) -> bool:
        """Whether a sequence with n_ids ids to prefill may join: the paged pool has blocks for
        them and the first new token, and one more for each running sequence (each may cross
        into a new block soon; BlockPool.can_take caps these), so a join seldom forces a
        preemption. Always, without a pool."""
        return self.rows.can_take(n_ids + 1, spare_blocks=len(self.running))

    def _next_request(self) -> Request | None:
        """The first waiting request that need not wait for a prefix: one waits while the next
        block of its prompt that the prefix cache lacks is being prefilled by a running
        sequence, which stores it when its prompt is done, and only if the cache can hold that
        block (a budget too small for it would make the request wait for nothing). (Called with
        the lock held.)"""
        if self.prefix is None or not self.waiting:
            return self.waiting[0] if self.waiting else None
        coming = {key for seq in self.running if seq.pending for key in seq.prefix_keys}
        for request in self.waiting:
            keys = self._keys.get(request)
            if keys is None:
                try:
                    keys = block_hashes(start_ids(request.prompt_ids, self.tokenizer), self.prefix.block)
                except Exception:  # a bad prompt: it fails when it joins, not here
                    keys = []
                self._keys[request] = keys
            missing = next((i for i, key in enumerate(keys) if key not in self.prefix.blocks), None)
            if missing is None or keys[missing] not in coming or not self.prefix.can_hold(keys[:missing + 1]):
                return request
        return None

    def _reserve(self) -> None:
        """Room in each running sequence's cache for its rows of the next step, and one position
        more (where the GPU's step queued ahead writes; a second one queued behind it only where
        its position is in a held block already). When a paged pool is short, the sequence
        that joined last is preempted (`Sequence.suspend`) until the others fit: it rejoins
        first, when blocks are free again, and computes its ids again. A contiguous cache
        always has room (it holds its capacity from the start)."""
        while self.running:
            decoding, chunks = self._plan()
            if all(seq.cache.reserve(n + 1) for seq, n in [(seq, 1) for seq in decoding] + chunks):
                return
            victim = self.running.pop()
            victim.suspend()
            self.preempted.appendleft(victim)  # those preempted later joined earlier: they rejoin first
            self.preemptions += 1
            self.observer.preempted()

    def _plan(self) -> tuple[list, list]:
        """The next step's rows: every decoding sequence, then (sequence, n) for the next n ids of
        each pending prompt, as many as the step takes."""
        decoding = [seq for seq in self.running if not seq.pending]
        room = self.rows.max_rows - len(decoding) if self.rows.max_rows else None
        chunks = []
        for seq in self.running:
            if not seq.pending or (room is not None and room <= 0):
                continue
            n = len(seq.pending) if room is None else min(len(seq.pending), room)
            chunks.append((seq, n))
            if room is not None:
                room -= n
        return decoding, chunks

    def _step(self) -> None:
        """One step: a row for each decoding sequence (its last token), then the next chunk of
        each prompt still pending, as many rows as the step takes; then every row that ends
        a sequence's input so far gives it its next token."""
        self._reserve()
        if not self.running:
            return
        decoding, planned = self._plan()
        tokens = [seq.last_token for seq in decoding]                              # one row each
        caches = [seq.cache for seq in decoding]
        samplers = [seq.sampler for seq in decoding]
        owners = list(decoding)  # per row: the sequence whose next token it gives, or None
        chunks = []
        for seq, n in planned:
            last = n == len(seq.pending)
            tokens += seq.pending[:n]                                               # a row per prompt token
            caches += [seq.cache] * n
            samplers += [None] * (n - 1) + [seq.sampler if last else None]
            owners += [None] * (n - 1) + [seq if last else None]
            chunks.append((seq, n))
        # the GPU's step queues the steps after this one; it need not queue one that a sequence,
        # ending by its budget, would not be fed (it would be computed, then thrown away)
        horizon = min((seq.steps_left() for seq in decoding), default=0)
        chosen = self.rows.step(tokens, caches, samplers, [None if o is None else o.stream.history for o in owners],
                                n_decode=len(decoding), horizon=horizon)
        for seq, n in chunks:
            del seq.pending[:n]
        prefilled = {seq for seq, n in chunks if not seq.pending}  # their prompts are whole in the cache
        self.steps += 1
        self.observer.step(len(decoding) + len(chunks))
        for seq, token in zip(owners, chosen):
            if seq is None:
                continue
            try:
                if isinstance(token, Exception):  # this row's sampling failed (see step.sample_rows)
                    raise token
                if seq in prefilled and self.prefix is not None:
                    self.prefix.store(seq.prompt_ids, seq.cache)
                self._emit(seq, token)
            except Exception as e:
                self._fail(seq, e)
        self.running = [seq for seq in self.running if seq.finish_reason is None and seq.cache is not None]
        if self._gaps:
            self.observer.token_gaps(self._gaps)
            self._gaps = []

    def _emit(self, seq: Sequence, token: int) -> None:
        piece = seq.add(token)
        now = time.perf_counter()
        if seq.last_time == 0.0:
            self.observer.first_token(now - seq.request.arrived)
        else:
            self._gaps.append(now - seq.last_time)  # reported once per step
        seq.last_time = now
        seq.request.emit(piece)
        if seq.finish_reason is not None:
            self._finish(seq)

    def _finish(self, seq: Sequence, reason: str | None = None) -> None:
        event = seq.finished_event(reason)
        seq.close()
        self.observer.finished(event)
        seq.request.emit(event)

    def _fail(self, seq: Sequence | None, error: Exception, request: Request | None = None) -> None:
        """End one request with its error; its row goes back. The error event is best effort:
        a client callback that itself fails must not take the scheduler down."""
        if seq is not None:
            seq.close()
            request = seq.request
        try:
            request.emit(Failed(f"{type(error).__name__}: {error}"))
        except Exception:
            pass

    def _drop_cancelled(self) -> None:
        for seq in [seq for seq in self.preempted if seq.request.cancelled]:
            self.preempted.remove(seq)
            self._finish(seq, "cancelled")
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
        for seq in self.running + list(self.preempted):
            self._finish(seq, "cancelled")
        self.running = []
        self.preempted.clear()
