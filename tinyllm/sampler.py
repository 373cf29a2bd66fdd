"""Choosing the next token from the logits: the sampler, as small composable steps.

The model gives one score (logit) per vocabulary entry. Turning scores into a token is
a short pipeline; each step takes a float32 logits vector [V] and returns a new one,
so each can be checked on its own with a hand-made vector:

    logits ─► repetition penalty ─► presence/frequency penalty      (look at past tokens)
           ─► temperature                                             (sharpen or flatten)
           ─► top-k ─► top-p ─► min-p                                 (drop unlikely tokens: -inf)
           ─► softmax ─► draw with one uniform number u               (inverse CDF)

Temperature 0 means greedy decoding: the argmax of the penalised logits, no randomness.

The draw is kept apart from the filters on purpose. `filtered_probs` gives the final
distribution and `draw(probs, u)` turns one uniform number u in [0, 1) into a token:
the kept tokens are sorted by probability (highest first, ties by lower id), their
probabilities summed in that order, and the first token whose running sum exceeds u
is taken (the last kept token if rounding keeps the sum below u). A GPU sampler that receives the same u (drawn on the host from the
same seeded `np.random.Generator`) and follows the same rule picks the same token.
Each sampled token consumes exactly one number from the generator; greedy tokens none.

Definitions (so results match other tools):
- repetition penalty, as in `transformers`: for every token seen in the prompt or the
  output so far, a positive logit is divided by the penalty and a negative one multiplied.
- presence / frequency penalty, as in the OpenAI API: logit[j] -= presence * (c[j] > 0)
  + frequency * c[j], where c[j] counts how often token j was generated so far (the
  prompt does not count, as in vLLM).
- top-k keeps the k highest logits (and any tied with the k-th); top-p keeps the smallest
  set of most likely tokens whose probability adds up to at least p; min-p keeps tokens
  whose probability is at least min_p x the highest probability. Each keeps >= 1 token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import TinyLLMError

NEG_INF = -np.inf


class SamplingError(TinyLLMError, ValueError):
    """A sampling parameter outside its range. `param` names it (e.g. 'top_p')."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.detail = message


# ---- parameters ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingParams:
    """Everything that decides how a token is chosen. The defaults change nothing but
    temperature, which is 0 (greedy) so that a run without options is reproducible."""

    temperature: float = 0.0
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    min_p: float = 0.0                # 0: off
    repetition_penalty: float = 1.0   # 1: off
    presence_penalty: float = 0.0     # 0: off
    frequency_penalty: float = 0.0    # 0: off
    seed: int | None = None           # None: a fresh random seed

    def __post_init__(self):
        def number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise SamplingError(name, f"expected a number, got {value!r}")
            if not math.isfinite(value):
                raise SamplingError(name, f"expected a finite number, got {value!r}")
            return float(value)

        if number("temperature") < 0:
            raise SamplingError("temperature", f"must be >= 0 (0 means greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise SamplingError("top_k", f"must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not 0.0 < number("top_p") <= 1.0:
            raise SamplingError("top_p", f"must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        if not 0.0 <= number("min_p") <= 1.0:
            raise SamplingError("min_p", f"must be in [0, 1] (0 turns it off), got {self.min_p!r}")
        if not number("repetition_penalty") > 0:
            raise SamplingError("repetition_penalty", f"must be > 0 (1 turns it off), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= number(name) <= 2.0:
                raise SamplingError(name, f"must be in [-2, 2] (0 turns it off), got {getattr(self, name)!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise SamplingError("seed", f"must be an integer >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_history(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


# ---- the steps: logits [V] -> logits [V] ----------------------------------------------------

def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' repetition penalty over the tokens marked in `seen` (bool [V])."""
    if penalty == 1.0:
        return logits
    scores = logits[seen]
    out = logits.copy()
    out[seen] = np.where(scores < 0, scores * penalty, scores / penalty)
    return out


def apply_presence_frequency_penalty(logits: np.ndarray, counts: np.ndarray,
                                     presence: float, frequency: float) -> np.ndarray:
    """OpenAI's penalties: logit[j] -= presence * (c[j] > 0) + frequency * c[j]  (counts: int [V])."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    penalty = presence * (counts > 0) + frequency * counts  # float64 [V]
    return (logits - penalty).astype(np.float32)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Divide by the temperature: < 1 sharpens the distribution, > 1 flattens it."""
    if temperature == 1.0:
        return logits
    return logits / np.float32(temperature)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k highest logits (and any tied with the k-th); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]  # the k-th highest value, without a full sort
    return np.where(logits >= kth, logits, NEG_INF).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities [V] from logits [V]; -inf logits get probability 0."""
    x = logits.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probabilities add up to >= p."""
    if p >= 1.0:
        return logits
    probs = softmax(logits)
    for order in _most_likely_first(probs):
        before = np.cumsum(probs[order]) - probs[order]  # mass of the tokens ranked above each one
        if before[-1] + probs[order[-1]] >= p:
            break  # the set reaching p lies inside this prefix of the ranking
    keep = np.zeros(logits.shape, dtype=bool)
    keep[order[before < p]] = True                      # the first token always has before = 0
    return np.where(keep, logits, NEG_INF).astype(np.float32)


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep tokens whose probability is at least min_p times the highest probability."""
    if min_p <= 0.0:
        return logits
    probs = softmax(logits)
    return np.where(probs >= min_p * probs.max(), logits, NEG_INF).astype(np.float32)


# ---- the draw -------------------------------------------------------------------------------

def draw(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF draw with one uniform number u in [0, 1) from a normalised distribution.

    Kept tokens (probability > 0) in order of probability, highest first (ties: lower id
    first); the first whose running sum exceeds u is drawn (the last kept token if
    rounding keeps the sum below u)."""
    for order in _most_likely_first(probs):
        cdf = np.cumsum(probs[order])  # float64 [N]
        if cdf[-1] > u:
            return int(order[np.searchsorted(cdf, u, side="right")])
    return int(order[-1])


def _most_likely_first(probs: np.ndarray, head: int = 256):
    """Token ids with probability > 0, most likely first (ties: lower id first).

    Sorting a whole vocabulary costs milliseconds per token, and the answer almost always
    lies among the few most likely tokens; so this yields the top `head` (plus any tied
    with the last of them) first, then, only if the caller needs more, the full ranking.
    Both are prefixes of the same ranking, so the result does not depend on `head`."""
    kept = np.flatnonzero(probs > 0)  # ascending ids: a stable sort keeps lower ids first among ties
    if len(kept) > head:
        cut = np.partition(probs[kept], -head)[-head]
        top = kept[probs[kept] >= cut]
        yield top[np.argsort(-probs[top], kind="stable")]
    yield kept[np.argsort(-probs[kept], kind="stable")]


# ---- history: what the penalties look at ------------------------------------------------------

class TokenHistory:
    """The tokens a penalty can see: `seen` marks prompt + generated tokens (repetition
    penalty), `counts` counts generated tokens only (presence/frequency penalties)."""

    def __init__(self, vocab_size: int, context_ids=()):
        self.seen = np.zeros(vocab_size, dtype=bool)         # [V]
        self.counts = np.zeros(vocab_size, dtype=np.int64)   # [V]
        self.add_context(context_ids)

    def add_context(self, ids) -> None:
        ids = np.asarray(list(ids), dtype=np.int64)
        self.seen[ids[(ids >= 0) & (ids < len(self.seen))]] = True

    def add_generated(self, token_id: int) -> None:
        if 0 <= token_id < len(self.seen):
            self.seen[token_id] = True
            self.counts[token_id] += 1


# ---- the sampler: the steps in order ----------------------------------------------------------

class Sampler:
    """Applies the steps in order and draws with a seeded generator.

        sampler = Sampler(SamplingParams(temperature=0.7, top_p=0.9, seed=0))
        token = sampler(logits, history)
    """

    def __init__(self, params: SamplingParams | None = None, **kwargs):
        if params is None:
            params = SamplingParams(**kwargs)
        elif kwargs:
            raise TypeError("pass either SamplingParams or keyword arguments, not both")
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def penalize(self, logits: np.ndarray, history: TokenHistory | None) -> np.ndarray:
        p = self.params
        if history is None or not p.uses_history:
            return logits
        logits = apply_repetition_penalty(logits, history.seen, p.repetition_penalty)
        return apply_presence_frequency_penalty(logits, history.counts, p.presence_penalty, p.frequency_penalty)

    def filtered_logits(self, logits: np.ndarray, history: TokenHistory | None = None) -> np.ndarray:
        """Penalties, temperature and filters: the logits the draw sees (removed tokens: -inf)."""
        p = self.params
        logits = self.penalize(np.asarray(logits, dtype=np.float32), history)
        logits = apply_temperature(logits, p.temperature)
        logits = top_k_filter(logits, p.top_k)
        logits = top_p_filter(logits, p.top_p)
        return min_p_filter(logits, p.min_p)

    def filtered_probs(self, logits: np.ndarray, history: TokenHistory | None = None) -> np.ndarray:
        """The distribution the next token is drawn from: float64 [V], zeros for removed tokens."""
        return softmax(self.filtered_logits(logits, history))

    def uniform(self) -> float:
        """The one random number a (non-greedy) token consumes."""
        return float(self.rng.random())

    def __call__(self, logits: np.ndarray, history: TokenHistory | None = None) -> int:
        """logits [V] (float32, on the host) -> the next token id."""
        if self.params.greedy:
            return int(np.argmax(self.penalize(np.asarray(logits, dtype=np.float32), history)))
        return draw(self.filtered_probs(logits, history), self.uniform())
