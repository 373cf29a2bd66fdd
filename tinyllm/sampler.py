"""Choosing the next token from the logits: the sampler, as small composable steps.

The model gives one score (logit) per vocabulary entry. Turning scores into a token is
a short pipeline; each step takes a float32 logits vector [V] and returns a new one,
so each can be checked on its own with a hand-made vector:

    logits ─► check                                                  (NaN, +-inf: name a token?)
           ─► constraint                                            (tokens a grammar forbids: -inf)
           ─► logit bias                                            (the caller's per-token nudges)
           ─► repetition penalty ─► presence/frequency penalty      (look at past tokens)
           ─► temperature                                           (sharpen or flatten)
           ─► top-k ─► top-p ─► min-p                               (drop unlikely tokens: -inf)
           ─► softmax ─► draw with one uniform number u             (inverse CDF)

Temperature 0 means greedy decoding: the argmax of the penalised logits, no randomness.

A constraint (`SamplingParams.grammar`, constrain.py: JSON by llguidance) is the one
step with state: each Sampler starts its own from the grammar, masks the logits with it
before the other steps, and feeds it every token it chooses.

Every setting SamplingParams accepts gives a token for any logits that name one, the
extremes included; where float32 cannot hold a step's result, the step takes the limit:
- Logits are checked first (`check_logits`). NaN names no token, and neither do logits
  that are all -inf: both raise a SamplingError on 'logits' (one request's sampler fails,
  not the process). A +inf logit outranks every finite one: when some are +inf, they
  alone stay, as equals (logit 0).
- A penalty never makes a finite logit infinite: past float32's range it saturates at
  the largest float32, so it can neither forbid a token nor force one.
- A temperature too small to be a float32 (below about 1e-45) is the limit T -> 0:
  greedy, and it draws no random number. A larger one whose quotients overflow divides
  the logits shifted so that the largest is 0 (softmax does not change): only tokens
  whose probability is 0 anyway can overflow, to -inf.

The draw is kept apart from the filters on purpose. `filtered_probs` gives the final
distribution and `draw(probs, u)` turns one uniform number u in [0, 1) into a token:
the kept tokens are sorted by probability (highest first, ties by lower id), their
probabilities summed in that order, and the first token whose running sum exceeds u
is taken (the last kept token if rounding keeps the sum below u). A GPU sampler that receives the same u (drawn on the host from the
same seeded `np.random.Generator`) and follows the same rule picks the same token.
Each sampled token consumes exactly one number from the generator; greedy tokens none.

Log-probabilities (`SamplingParams.logprobs = N`): after each token the sampler keeps a
`TokenLogprob` (`take_logprob()`): the chosen token's log-probability and the N most
likely tokens with theirs, most likely first (ties: lower id first), all from the
distribution the token was drawn from:
- sampled (temperature > 0): the log-softmax of the filtered logits, i.e. after logit
  bias, penalties, temperature, top-k, top-p and min-p: `log(filtered_probs)`. Tokens the
  filters removed have probability 0 and are never listed, so fewer than N may come back;
- greedy (temperature 0): the log-softmax of the logits after logit bias and penalties,
  at temperature 1 and unfiltered: with neither set, the model's own distribution.
A constraint's mask comes first in both: tokens it forbids have probability 0.
Computed in float64 from the float32 logits.

Definitions (so results match other tools):
- logit bias, as in the OpenAI API: a number in [-100, 100] added to a token's logit
  (-100 in practice forbids the token, +100 all but forces it).
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

from dataclasses import dataclass

import numpy as np

from .errors import TinyLLMError

NEG_INF = -np.inf
FLOAT32_MAX = float(np.finfo(np.float32).max)    # about 3.4e38
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32, about 1.2e-38
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs allows


class SamplingError(TinyLLMError, ValueError):
    """A sampling parameter outside its range, or logits that name no token (NaN, all
    -inf). `param` names the culprit (e.g. 'top_p', or 'logits')."""

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
    logit_bias: tuple = ()            # ((token id, bias), ...), or a dict {id: bias}; () : off
    logprobs: int | None = None       # None: off; N: keep each token's log-probability and N alternatives
    grammar: object = None            # None: off; a constrain.Grammar: only tokens it allows

    def __post_init__(self):
        # The ranges are what the steps can honour in float32 (the logits' type, on the host
        # and on the GPU); top_k and seed are bounded so that the GPU's int32 and NumPy's
        # seed take them as they are.
        def check(name, ok, allowed, integer=False):
            value = getattr(self, name)
            kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise SamplingError(name, f"expected {'an integer' if integer else 'a number'}, got {_shown(value)}")
            if not ok(value):  # NaN fails every comparison
                raise SamplingError(name, f"must be {allowed}, got {_shown(value)}")

        check("temperature", lambda t: 0 <= t <= FLOAT32_MAX, ">= 0 and <= 3.4e38, float32's largest (0 means greedy)")
        check("top_k", lambda k: 0 <= k < 2**31, "in [0, 2**31) (0 turns it off)", integer=True)
        check("top_p", lambda p: 0 < p <= 1, "in (0, 1] (1 turns it off)")
        check("min_p", lambda p: 0 <= p <= 1, "in [0, 1] (0 turns it off)")
        check("repetition_penalty", lambda r: FLOAT32_TINY <= r <= FLOAT32_MAX,
              "> 0, in float32's normal range [1.2e-38, 3.4e38] (1 turns it off)")
        for name in ("presence_penalty", "frequency_penalty"):
            check(name, lambda v: -2 <= v <= 2, "in [-2, 2] (0 turns it off)")
        if self.seed is not None:
            check("seed", lambda s: 0 <= s < 2**64, "in [0, 2**64) or None (a fresh seed)", integer=True)
        if self.logprobs is not None:
            check("logprobs", lambda n: 0 <= n <= MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}] or None (off)", integer=True)
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if self.grammar is not None and not callable(getattr(self.grammar, "start", None)):
            raise SamplingError("grammar", f"expected a constrain.Grammar or None, got {_shown(self.grammar)}")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one that is 0 as a float32: the limit T -> 0 is the argmax."""
        return np.float32(self.temperature) == 0.0

    @property
    def uses_history(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def needs_host(self) -> bool:
        """Whether only the host sampler can honour these settings: the token history, logit
        bias, log-probabilities and a grammar's matcher live on the host (a GPU sampler hands
        such rows back)."""
        return self.uses_history or bool(self.logit_bias) or self.logprobs is not None or self.grammar is not None


def _logit_bias(bias) -> tuple:
    """{id: bias} or ((id, bias), ...) -> ((id, bias), ...) sorted by id, each checked."""
    if isinstance(bias, dict):
        bias = bias.items()
    try:
        pairs = [(i, b) for i, b in bias]
    except (TypeError, ValueError):
        raise SamplingError("logit_bias", f"expected {{token id: bias}}, got {_shown(bias)}") from None
    out = {}
    for i, b in pairs:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < 2**31:
            raise SamplingError("logit_bias", f"a token id must be an integer in [0, 2**31), got {_shown(i)}")
        if isinstance(b, bool) or not isinstance(b, (int, float, np.integer, np.floating)) or not -100 <= b <= 100:
            raise SamplingError("logit_bias", f"token {int(i)}: a bias must be a number in [-100, 100], got {_shown(b)}")
        out[int(i)] = float(b)
    return tuple(sorted(out.items()))


def _shown(value) -> str:
    """The value as the user wrote it, cut short (a 400-digit integer is still one line)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---- the first step: logits that name a token ---------------------------------------------------

def check_logits(logits) -> np.ndarray:
    """float32 logits [V] that the steps below can rely on: no NaN, no +inf, not all -inf.

    NaN and all -inf name no token: a SamplingError. +inf is the limit of a logit that
    outgrows every other: the +inf tokens share the draw as equals (logit 0), the rest go."""
    with np.errstate(over="ignore"):  # float64 logits past float32's range become +-inf, handled here
        logits = np.asarray(logits, dtype=np.float32)
    top = logits.max()  # NaN if any is NaN
    if np.isnan(top):
        raise SamplingError("logits", f"{int(np.isnan(logits).sum())} of {logits.size} are NaN: "
                                      "the model's output for this sequence is broken")
    if top == NEG_INF:
        raise SamplingError("logits", f"all {logits.size} are -inf: every token is forbidden")
    if top == np.inf:
        return np.where(logits == np.inf, np.float32(0.0), np.float32(NEG_INF))
    return logits


# ---- the steps: logits [V] -> logits [V] ----------------------------------------------------

def apply_logit_bias(logits: np.ndarray, bias) -> np.ndarray:
    """OpenAI's logit bias: ((token id, bias), ...) added to those logits (saturating in float32)."""
    if not bias:
        return logits
    ids = np.asarray([i for i, _ in bias], dtype=np.int64)
    if ids[-1] >= logits.shape[-1]:
        raise SamplingError("logit_bias", f"token {int(ids[-1])} is outside the vocabulary of {logits.shape[-1]}")
    out = logits.copy()
    with np.errstate(over="ignore"):
        biased = out[ids] + np.asarray([b for _, b in bias], dtype=np.float32)
    out[ids] = np.where(np.isfinite(out[ids]), np.clip(biased, -FLOAT32_MAX, FLOAT32_MAX), out[ids])
    return out


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' repetition penalty over the tokens marked in `seen` (bool [V])."""
    if penalty == 1.0:
        return logits
    scores = logits[seen]
    with np.errstate(over="ignore"):  # saturated on the next line
        penalised = np.where(scores < 0, scores * penalty, scores / penalty)
    out = logits.copy()
    out[seen] = np.where(np.isfinite(scores), np.clip(penalised, -FLOAT32_MAX, FLOAT32_MAX), scores)
    return out


def apply_presence_frequency_penalty(logits: np.ndarray, counts: np.ndarray,
                                     presence: float, frequency: float) -> np.ndarray:
    """OpenAI's penalties: logit[j] -= presence * (c[j] > 0) + frequency * c[j]  (counts: int [V])."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    penalty = presence * (counts > 0) + frequency * counts  # float64 [V]
    return (logits - penalty).astype(np.float32)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Divide by the temperature: < 1 sharpens the distribution, > 1 flattens it.

    When the largest quotient leaves float32's range, the same distribution comes from the
    logits shifted to a maximum of 0: then only tokens of probability 0 can overflow."""
    if temperature == 1.0:
        return logits
    with np.errstate(over="ignore"):
        scaled = logits / np.float32(temperature)
        if not np.isfinite(scaled.max()):
            scaled = (logits - logits.max()) / np.float32(temperature)
    return scaled


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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities [V] (float64) from logits [V]; -inf logits stay -inf."""
    x = logits.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the `top` alternatives ((id, logprob), ...), most likely first."""

    id: int
    logprob: float
    top: tuple = ()


def token_logprob(logprobs: np.ndarray, token: int, n: int) -> TokenLogprob:
    """The entry for `token` from log-probabilities [V], with its n most likely tokens
    (ties: lower id first; tokens of probability 0 never listed)."""
    top = ()
    if n > 0:
        kept = np.flatnonzero(logprobs > NEG_INF)
        if len(kept) > n:
            cut = np.partition(logprobs[kept], -n)[-n]
            kept = kept[logprobs[kept] >= cut]
        order = kept[np.lexsort((kept, -logprobs[kept]))][:n]
        top = tuple((int(i), float(logprobs[i])) for i in order)
    return TokenLogprob(int(token), float(logprobs[token]), top)


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
        self._rng: np.random.Generator | None = None  # made at the first draw: see `rng`
        self._given_back: list[float] = []  # numbers drawn and not used (give_back), drawn again first
        self.last_logprob: TokenLogprob | None = None  # the last token's, when params.logprobs is set
        self.constraint = None if params.grammar is None else params.grammar.start()  # this sequence's matcher

    def penalize(self, logits: np.ndarray, history: TokenHistory | None) -> np.ndarray:
        p = self.params
        if history is None or not p.uses_history:
            return logits
        logits = apply_repetition_penalty(logits, history.seen, p.repetition_penalty)
        return apply_presence_frequency_penalty(logits, history.counts, p.presence_penalty, p.frequency_penalty)

    def adjusted_logits(self, logits: np.ndarray, history: TokenHistory | None = None) -> np.ndarray:
        """Checked, constrained, biased and penalised: what greedy decoding takes the argmax of."""
        logits = check_logits(logits)
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        return self.penalize(apply_logit_bias(logits, self.params.logit_bias), history)

    def filtered_logits(self, logits: np.ndarray, history: TokenHistory | None = None) -> np.ndarray:
        """Bias, penalties, temperature and filters: the logits the draw sees (removed tokens: -inf)."""
        p = self.params
        logits = self.adjusted_logits(logits, history)
        logits = apply_temperature(logits, p.temperature)
        logits = top_k_filter(logits, p.top_k)
        logits = top_p_filter(logits, p.top_p)
        return min_p_filter(logits, p.min_p)

    def filtered_probs(self, logits: np.ndarray, history: TokenHistory | None = None) -> np.ndarray:
        """The distribution the next token is drawn from: float64 [V], zeros for removed tokens."""
        return softmax(self.filtered_logits(logits, history))

    @property
    def rng(self) -> np.random.Generator:
        """The seeded generator. Made when first drawn from: a greedy request never draws, and
        making one (seeding from the OS when no seed is given) is a server's per-request cost."""
        if self._rng is None:
            self._rng = np.random.default_rng(self.params.seed)
        return self._rng

    def uniform(self) -> float:
        """The one random number a (non-greedy) token consumes."""
        if self._given_back:
            return self._given_back.pop()
        return float(self.rng.random())

    def give_back(self, u: float) -> None:
        """Return a number drawn for a token that was never chosen with it (a GPU step queued
        ahead and then not used): the next `uniform` gives it again, so the tokens follow the
        seed whatever was queued."""
        self._given_back.append(u)

    def __call__(self, logits: np.ndarray, history: TokenHistory | None = None) -> int:
        """logits [V] (float32, on the host) -> the next token id."""
        p = self.params
        if p.greedy:
            scores = self.adjusted_logits(logits, history)
            token = int(np.argmax(scores))
        else:
            scores = self.filtered_logits(logits, history)
            token = draw(softmax(scores), self.uniform())
        if p.logprobs is not None:
            self.last_logprob = token_logprob(log_softmax(scores), token, p.logprobs)
        if self.constraint is not None:
            self.constraint.advance(token)
        return token

    def take_logprob(self) -> TokenLogprob | None:
        """The last token's TokenLogprob (None when not asked for), handed over once."""
        entry, self.last_logprob = self.last_logprob, None
        return entry
