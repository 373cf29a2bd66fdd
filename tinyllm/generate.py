"""Generation: prefill the prompt, then decode one token at a time, as a Python generator.

    prompt ids ─► step.prefill(ids)               ─► logits ─► sampler ─► token 1
    token t    ─► step.decode(t, sampler, history) ─► token t+1                      (repeat)

The model is reached through a decode step (step.py): the readable one runs the forward
pass and the host sampler; the GPU's replays a CUDA graph and samples on the device. What
the tokens mean is `TokenStream`'s: it is fed token ids, one at a time, and owns the stop
rules, the streaming detokenizer, the penalties' history and the counts, so the same
object serves this loop and the scheduler's batched one.

Generation stops at the first of:
    "eos"     the model produced an end-of-sequence id (the tokenizer's and the config's);
    "stop"    the text contains a stop string (even one split across tokens); the stop
              string and what follows are not returned. Text that could be the start of a
              stop string is held back until it is clear that it is not;
    "length"  `max_new_tokens` new tokens were produced (prompt tokens never count);
    "context" the KV cache is full: the last token could not be fed back to the model.
When the token budget or the context cuts a character in half (a byte-level token holding
the first bytes of an emoji), the unfinished character is left out rather than shown as
U+FFFD: the text holds whole characters only.

With `SamplingParams.logprobs` set, every Token carries its `TokenLogprob` (sampler.py
says which distribution it comes from), and `prompt_logprobs` scores a prompt's own
tokens (the server's `echo`).

A `Context` (KV cache + the token ids it holds) can be kept between calls: the next call
prefills only the tokens after the longest prefix it shares with the cache, which is how a
chat keeps its cache between turns.

Timing counts only work done inside the generator (not the time a caller spends printing):
time to first token = prefill + first sample; prefill tok/s = prefilled tokens / prefill
time; decode tok/s = tokens made by decode steps / their time. Prompt tokens are never
counted as generated.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .detokenize import REPLACEMENT, StreamingDetokenizer
from .errors import ConfigError, ContextOverflowError, TinyLLMError
from .sampler import Sampler, TokenHistory, TokenLogprob, log_softmax, token_logprob
from .step import as_step


class PromptError(TinyLLMError, ValueError):
    """A prompt that cannot be run (e.g. empty, with no BOS token to start from)."""


@dataclass(frozen=True)
class StopRules:
    """When to stop: a token budget, stop strings, end-of-sequence ids (None: the checkpoint's)."""

    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    eos_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ConfigError(f"max_new_tokens: must be an integer >= 0, got {n!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"stop: every stop string must be a non-empty string, got {s!r}")
        object.__setattr__(self, "stop", stop)


@dataclass
class Token:
    """One generated token and the text it adds ('' while text is held back)."""

    id: int
    text: str
    logprob: TokenLogprob | None = None  # with SamplingParams.logprobs set


@dataclass
class Stats:
    prompt_tokens: int = 0      # prompt tokens run through the model in this call
    cached_tokens: int = 0      # prompt tokens reused from the KV cache (not recomputed)
    new_tokens: int = 0         # generated tokens (the end-of-sequence token included)
    ttft_s: float = 0.0         # time to first token
    prefill_s: float = 0.0
    decode_s: float = 0.0       # time of the decode steps (tokens 2..n)
    finish_reason: str | None = None

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        steps = max(self.new_tokens - 1, 0)  # token 1 comes from the prefill
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "new_tokens": self.new_tokens, "finish_reason": self.finish_reason,
                "ttft_s": round(self.ttft_s, 4), "prefill_s": round(self.prefill_s, 4),
                "decode_s": round(self.decode_s, 4), "prefill_tok_s": round(self.prefill_tps, 2),
                "decode_tok_s": round(self.decode_tps, 2)}

    def summary(self) -> str:
        """One line for the terminal."""
        cached = f" (+{self.cached_tokens} cached)" if self.cached_tokens else ""
        return (f"{self.new_tokens} tokens ({self.finish_reason}) | prompt {self.prompt_tokens} tokens{cached}, "
                f"{self.prefill_tps:.1f} tok/s | first token {self.ttft_s:.2f} s | decode {self.decode_tps:.1f} tok/s")


@dataclass
class Completion:
    """The result of a finished generation."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: Stats
    prompt_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per token id, with SamplingParams.logprobs set


class Context:
    """A KV cache and the token ids it holds (cache position i holds ids[i])."""

    def __init__(self, model, capacity: int | None = None, cache=None):
        self.model = model
        self.cache = cache if cache is not None else model.new_cache(capacity)
        self.ids: list[int] = []

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def full(self) -> bool:
        return self.cache.length >= self.cache.capacity

    def prepare(self, prompt_ids: list[int]) -> list[int]:
        """Keep the longest cached prefix of `prompt_ids`; return the ids still to prefill (>= 1)."""
        if len(prompt_ids) > self.cache.capacity:
            limit = self.model.config.max_seq_len
            raise ContextOverflowError(
                f"context overflow: the prompt has {len(prompt_ids)} tokens but the context holds "
                f"{self.cache.capacity} (--max-context; the model allows up to {limit})")
        keep = 0
        for a, b in zip(self.ids, prompt_ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(prompt_ids) - 1)  # the last prompt token must run to give logits
        self.cache.trim(self.cache.length - keep)
        self.ids = self.ids[:keep]
        return list(prompt_ids[keep:])

    def prefill(self, step, ids: list[int]) -> np.ndarray:
        """Run new ids through the step into the cache. -> float32 logits [V] (host)"""
        try:
            return step.prefill(ids, self.cache)
        finally:
            self._record(ids)

    def decode(self, step, token: int, sampler, history) -> int:
        """Feed one token; -> the next token id."""
        try:
            return step.decode(token, self.cache, sampler, history)
        finally:
            self._record([token])

    def _record(self, fed: list[int]) -> None:
        """Note the ids that reached the cache: all of `fed`, or, after an error, as many as
        the cache's position (its own count) says were written."""
        self.ids.extend(fed[:self.cache.length - len(self.ids)])


def start_ids(prompt_ids, tokenizer) -> list[int]:
    """The ids a generation starts from: the prompt's, or BOS for an empty prompt (as
    transformers does: there is nothing else to condition on)."""
    ids = [int(i) for i in prompt_ids]
    if ids:
        return ids
    if tokenizer.bos_id is None:
        raise PromptError("empty prompt: give some text (this tokenizer has no BOS token to start from)")
    return [tokenizer.bos_id]


class TokenStream:
    """Generated token ids in, text out: stop rules, detokenizer, penalties' history, counts.

        stream = TokenStream(tokenizer, config, prompt_ids, rules, uses_history=False)
        token = stream.add(token_id, context_full=False)    # -> Token; stream.finish_reason
    """

    def __init__(self, tokenizer, config, prompt_ids: list[int], rules: StopRules, uses_history: bool):
        self.rules = rules
        eos = rules.eos_ids
        if eos is None:
            eos = tuple(tokenizer.eos_ids) + tuple(config.eos_token_ids)
        self.eos_ids = frozenset(int(i) for i in eos)
        self.history = TokenHistory(config.vocab_size, prompt_ids) if uses_history else None
        self.detok = StreamingDetokenizer(tokenizer)
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # those handed to add()
        self.text = ""
        self.finish_reason: str | None = "length" if rules.max_new_tokens == 0 else None
        self._pending = ""  # decoded text not yet returned (may start a stop string)

    def add(self, token_id: int, context_full: bool, logprob: TokenLogprob | None = None) -> Token:
        """Take the next generated id (and its log-probability, if kept); -> the Token with
        the text it releases. Sets `finish_reason` when this token ends the generation."""
        self.token_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.history is not None:
            self.history.add_generated(token_id)
        n = len(self.token_ids)
        reason = ("eos" if token_id in self.eos_ids else
                  "length" if n == self.rules.max_new_tokens else
                  "context" if context_full else None)
        text, stopped = self._text(token_id, last=reason is not None, cut=reason in ("length", "context"))
        self.text += text
        self.finish_reason = "stop" if stopped else reason
        return Token(token_id, text, logprob)

    def _text(self, token_id: int, last: bool, cut: bool = False) -> tuple[str, bool]:
        """The text to return for this token, and whether a stop string was found. `cut`:
        the budget or the context ends the text here, maybe inside a character."""
        if token_id not in self.eos_ids:
            self._pending += self.detok.add(token_id)
        if last:
            held = self.detok.flush()
            # what the detokenizer still holds at the end ends in U+FFFD only when its
            # last character is unfinished: a cut one is dropped, not shown as U+FFFD
            self._pending += held.rstrip(REPLACEMENT) if cut else held
        text = self._pending
        if not self.rules.stop:
            self._pending = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self.rules.stop) if i >= 0]
        if hits:
            self._pending = ""
            return text[:min(hits)], True
        hold = 0 if last else _stop_prefix_len(text, self.rules.stop)
        self._pending = text[len(text) - hold:]
        return text[:len(text) - hold], False


class Generation:
    """An iterator of `Token`s for one prompt; afterwards holds `text`, `token_ids`, `stats`.

        gen = Generation(llm.step, tokenizer, prompt_ids, sampler=Sampler(temperature=0.7, seed=1))
        for tok in gen:
            print(tok.text, end="", flush=True)
        print(gen.stats.summary())

    The first argument is a decode step (step.py), or a model, which then runs its readable step.
    """

    def __init__(self, step, tokenizer, prompt_ids, *, sampler: Sampler | None = None,
                 rules: StopRules | None = None, context: Context | None = None, on_finish=None):
        self.step = as_step(step)
        self.model = self.step.model
        self.tokenizer = tokenizer
        self.rules = rules or StopRules()
        self.sampler = sampler or Sampler()
        self.prompt_ids = start_ids(prompt_ids, tokenizer)
        if context is None:  # a one-off cache just big enough for this request
            context = Context(self.model, len(self.prompt_ids) + max(self.rules.max_new_tokens, 1))
        self.context = context
        self.stream = TokenStream(tokenizer, self.model.config, self.prompt_ids, self.rules,
                                  self.sampler.params.uses_history)
        self.on_finish = on_finish
        self.stats = Stats()
        self._started = False

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def token_ids(self) -> list[int]:
        return self.stream.token_ids

    @property
    def eos_ids(self) -> frozenset:
        return self.stream.eos_ids

    def __iter__(self):
        if self._started:
            raise RuntimeError("a Generation can be iterated only once")
        self._started = True
        stats, stream, context, sampler = self.stats, self.stream, self.context, self.sampler
        try:
            start = time.perf_counter()
            new_ids = context.prepare(self.prompt_ids)
            stats.cached_tokens = len(self.prompt_ids) - len(new_ids)
            if stream.finish_reason is not None:  # a budget of 0 tokens
                stats.finish_reason = stream.finish_reason
                return
            logits = context.prefill(self.step, new_ids)
            stats.prompt_tokens = len(new_ids)
            stats.prefill_s = time.perf_counter() - start
            token = sampler(logits, stream.history)
            stats.ttft_s = time.perf_counter() - start
            while True:
                piece = stream.add(token, context_full=context.full, logprob=sampler.take_logprob())
                stats.new_tokens += 1
                stats.finish_reason = stream.finish_reason
                yield piece
                if stream.finish_reason:
                    return
                step_start = time.perf_counter()
                token = context.decode(self.step, token, sampler, stream.history)  # feed the token back
                stats.decode_s += time.perf_counter() - step_start
        finally:
            if self.on_finish is not None:
                self.on_finish(self)

    def run(self) -> Completion:
        """Generate to the end; the whole text at once."""
        for _ in self:
            pass
        return self.result()

    def result(self) -> Completion:
        logprobs = list(self.stream.logprobs) if self.sampler.params.logprobs is not None else None
        return Completion(self.text, list(self.token_ids), self.stats.finish_reason, self.stats, self.prompt_ids,
                          logprobs)


def prompt_logprobs(step, ids: list[int], n: int, chunk: int = 256) -> list[TokenLogprob | None]:
    """How likely the model finds each token of a prompt given the ones before it: entry t
    is token t's log-probability under the log-softmax of the logits at position t - 1,
    with its n most likely alternatives; entry 0 is None (nothing comes before it).

    The step gives the logits a block of positions at a time (`step.prompt_logits`), so
    those of a long prompt ([T, V]) are never all held at once."""
    out: list[TokenLogprob | None] = [None]
    start = 0
    for logits in step.prompt_logits(ids, chunk):  # [t, V]
        for row in range(len(logits)):
            t = start + row + 1  # the token these logits score
            if t < len(ids):
                out.append(token_logprob(log_softmax(logits[row]), ids[t], n))
        start += len(logits)
    return out


def _stop_prefix_len(text: str, stops) -> int:
    """Length of the longest end of `text` that is the start of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
