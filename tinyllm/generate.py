"""Generation: prefill the prompt, then decode one token at a time, as a Python generator.

    prompt ids ─► prefill: forward(all new prompt ids) ─► logits ─► sampler ─► token 1
    token t    ─► decode:  forward([t])                 ─► logits ─► sampler ─► token t+1   (repeat)

Each step is two small methods, so a fast path can replace either one:
    `Generation.logits(ids)`      token ids -> float32 logits [V] on the host (the model + KV cache)
    `Generation.next_token(logits)`  logits [V] -> token id (the sampler)

Generation stops at the first of:
    "eos"     the model produced an end-of-sequence id (the tokenizer's and the config's);
    "stop"    the text contains a stop string (even one split across tokens); the stop
              string and what follows are not returned. Text that could be the start of a
              stop string is held back until it is clear that it is not;
    "length"  `max_new_tokens` new tokens were produced (prompt tokens never count);
    "context" the KV cache is full: the last token could not be fed back to the model.

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

from .backend import to_numpy
from .detokenize import StreamingDetokenizer
from .errors import ConfigError, ContextOverflowError, TinyLLMError
from .sampler import Sampler, TokenHistory

FINISH_REASONS = ("eos", "stop", "length", "context")


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
        return len(self.ids) >= self.cache.capacity

    def prepare(self, prompt_ids: list[int]) -> list[int]:
        """Keep the longest cached prefix of `prompt_ids`; return the ids still to prefill (>= 1)."""
        if len(prompt_ids) > self.cache.capacity:
            limit = self.model.config.max_seq_len
            raise ContextOverflowError(
                f"context overflow: the prompt has {len(prompt_ids)} tokens but the context holds "
                f"{self.cache.capacity} (--max-context; the model allows up to {limit})")
        # After an interrupted forward the cache may hold more than `ids` says: trust `ids`.
        self.ids = self.ids[:self.cache.length]
        keep = 0
        for a, b in zip(self.ids, prompt_ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(prompt_ids) - 1)  # the last prompt token must run to give logits
        self.cache.trim(self.cache.length - keep)
        self.ids = self.ids[:keep]
        return list(prompt_ids[keep:])

    def forward(self, ids: list[int]):
        """Run new ids through the model, appending them to the cache. -> logits [1, 1, V] (device)"""
        logits = self.model.forward(np.asarray([ids], dtype=np.int64), self.cache)  # [1, T] -> [1, 1, V]
        self.ids.extend(ids)
        return logits


class Generation:
    """An iterator of `Token`s for one prompt; afterwards holds `text`, `token_ids`, `stats`.

        gen = Generation(model, tokenizer, prompt_ids, sampler=Sampler(temperature=0.7, seed=1))
        for tok in gen:
            print(tok.text, end="", flush=True)
        print(gen.stats.summary())
    """

    def __init__(self, model, tokenizer, prompt_ids, *, sampler: Sampler | None = None,
                 rules: StopRules | None = None, context: Context | None = None, on_finish=None):
        self.model = model
        self.tokenizer = tokenizer
        self.rules = rules or StopRules()
        self.sampler = sampler or Sampler()
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:  # nothing to condition on: start from BOS, as transformers does
            if tokenizer.bos_id is None:
                raise PromptError("empty prompt: give some text (this tokenizer has no BOS token to start from)")
            prompt_ids = [tokenizer.bos_id]
        self.prompt_ids = prompt_ids
        if context is None:  # a one-off cache just big enough for this request
            context = Context(model, len(prompt_ids) + max(self.rules.max_new_tokens, 1))
        self.context = context
        eos = self.rules.eos_ids
        if eos is None:
            eos = tuple(tokenizer.eos_ids) + tuple(model.config.eos_token_ids)
        self.eos_ids = frozenset(int(i) for i in eos)
        self.history = TokenHistory(model.config.vocab_size, prompt_ids) if self.sampler.params.uses_history else None
        self.detok = StreamingDetokenizer(tokenizer)
        self.on_finish = on_finish
        self.token_ids: list[int] = []
        self.text = ""
        self.stats = Stats()
        self._pending = ""  # decoded text not yet returned (may start a stop string)
        self._started = False

    # ---- the two per-token steps ----------------------------------------------------------
    def logits(self, ids: list[int]) -> np.ndarray:
        """Token ids -> float32 logits [V] of the last position, on the host.

        With the CUDA fast path on the model (tinyllm.cuda.enable_fast_path), a one-token
        decode step is a replayed CUDA graph that also chooses the next token on the
        device: it returns that token id (an int) instead of logits."""
        decoder = getattr(self.model, "cuda_decoder", None)
        if (decoder is not None and len(ids) == 1 and self.context.cache.length > 0
                and decoder.supports(self.sampler.params)):
            self.context.ids.extend(ids)
            return decoder.step(self.context.cache, ids[0], self.sampler)
        return to_numpy(self.context.forward(ids))[0, -1]

    def next_token(self, logits: np.ndarray) -> int:
        """Logits [V] -> the next token id."""
        if isinstance(logits, int):  # already chosen on the device (CUDA fast path)
            return logits
        return self.sampler(logits, self.history)

    # ---- text with stop strings ---------------------------------------------------------
    def _text(self, token_id: int, last: bool) -> tuple[str, bool]:
        """The text to return for this token, and whether a stop string was found."""
        if token_id not in self.eos_ids:
            self._pending += self.detok.add(token_id)
        if last:
            self._pending += self.detok.flush()
        text = self._pending
        hits = [i for i in (text.find(s) for s in self.rules.stop) if i >= 0]
        if hits:
            self._pending = ""
            return text[:min(hits)], True
        hold = 0 if last else _stop_prefix_len(text, self.rules.stop)
        self._pending = text[len(text) - hold:]
        return text[:len(text) - hold], False

    # ---- the loop -------------------------------------------------------------------------
    def __iter__(self):
        if self._started:
            raise RuntimeError("a Generation can be iterated only once")
        self._started = True
        stats, rules = self.stats, self.rules
        try:
            start = time.perf_counter()
            new_ids = self.context.prepare(self.prompt_ids)
            stats.cached_tokens = len(self.prompt_ids) - len(new_ids)
            if rules.max_new_tokens == 0:
                stats.finish_reason = "length"
                return
            logits = self.logits(new_ids)  # prefill
            stats.prompt_tokens = len(new_ids)
            stats.prefill_s = time.perf_counter() - start
            for i in range(rules.max_new_tokens):
                step_start = time.perf_counter()
                token = self.next_token(logits)
                if i == 0:
                    stats.ttft_s = time.perf_counter() - start
                self.token_ids.append(token)
                stats.new_tokens += 1
                if self.history is not None:
                    self.history.add_generated(token)
                reason = ("eos" if token in self.eos_ids else
                          "length" if i + 1 == rules.max_new_tokens else
                          "context" if self.context.full else None)
                text, stopped = self._text(token, last=reason is not None)
                if stopped:
                    reason = "stop"
                self.text += text
                if i > 0:
                    stats.decode_s += time.perf_counter() - step_start
                stats.finish_reason = reason
                yield Token(token, text)
                if reason:
                    return
                step_start = time.perf_counter()
                logits = self.logits([token])  # decode: feed the token back
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
        return Completion(self.text, list(self.token_ids), self.stats.finish_reason, self.stats, self.prompt_ids)


def _stop_prefix_len(text: str, stops) -> int:
    """Length of the longest end of `text` that is the start of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
