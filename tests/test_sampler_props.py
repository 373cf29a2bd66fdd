"""Property tests of the sampler: every setting SamplingParams accepts, on any logits a
model could hand over (huge, +-inf, the float32 extremes), gives a token id in range
without an exception or a numerical warning; the limits behave as limits (a vanishing
temperature is greedy); and what cannot be honoured is refused with the field's name."""
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tinyllm.sampler import Sampler, SamplingError, SamplingParams, TokenHistory

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)
INF = math.inf

SETTINGS = settings(max_examples=200, deadline=None, database=None,  # no .hypothesis/ folder in the repository
                    suppress_health_check=[HealthCheck.too_slow])

# ---- strategies ------------------------------------------------------------------------------

EXTREMES = [0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, F32_TINY, 1e38, -1e38, F32_MAX, -F32_MAX, INF, -INF]
logit_values = st.one_of(st.floats(-100, 100, width=32), st.sampled_from(EXTREMES),
                         st.floats(width=32, allow_nan=False))


@st.composite
def logit_rows(draw, min_size=1, max_size=40):
    """float32 [V] with at least one token that is not -inf; sometimes V > 256, so the
    draw's fast path (the top 256 first) is crossed."""
    size = draw(st.one_of(st.integers(min_size, max_size), st.sampled_from([300, 600])))
    row = draw(hnp.arrays(np.float32, size, elements=logit_values))
    if np.all(row == -INF):
        row[draw(st.integers(0, size - 1))] = draw(st.floats(-100, 100, width=32))
    return row


def tempers():
    return st.one_of(st.just(0.0), st.floats(0.05, 5.0), st.sampled_from([1e-50, 1e-46, 1e-40, 1e-30, 1e-8, 1e30, F32_MAX]),
                     st.floats(0.0, F32_MAX))


def penalties():
    return st.one_of(st.just(1.0), st.floats(0.5, 2.0), st.sampled_from([F32_TINY, 1e-30, 1e30, F32_MAX]),
                     st.floats(F32_TINY, F32_MAX))


@st.composite
def valid_params(draw):
    return SamplingParams(
        temperature=draw(tempers()),
        top_k=draw(st.one_of(st.just(0), st.integers(1, 10), st.sampled_from([2**31 - 1]))),
        top_p=draw(st.one_of(st.just(1.0), st.floats(0.0, 1.0, exclude_min=True), st.sampled_from([5e-324, 1e-300]))),
        min_p=draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0), st.sampled_from([1.0, 5e-324]))),
        repetition_penalty=draw(penalties()),
        presence_penalty=draw(st.one_of(st.just(0.0), st.floats(-2.0, 2.0))),
        frequency_penalty=draw(st.one_of(st.just(0.0), st.floats(-2.0, 2.0))),
        seed=draw(st.integers(0, 2**64 - 1)),
    )


@st.composite
def histories(draw, size):
    """A TokenHistory over [size]: some prompt tokens, some generated ones (or none at all)."""
    if draw(st.booleans()):
        return None
    ids = st.integers(0, size - 1)
    history = TokenHistory(size, draw(st.lists(ids, max_size=8)))
    for token in draw(st.lists(ids, max_size=8)):
        history.add_generated(token)
    return history


def sample(params, logits, history=None):
    """One token with every numerical warning raised as an error (underflow to 0 is exact
    enough for probabilities and is not one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="warn", divide="warn", invalid="warn", under="ignore"):
            return Sampler(params)(logits, history)


# ---- any valid setting, any logits -> a token ---------------------------------------------------

@SETTINGS
@given(data=st.data(), params=valid_params())
def test_any_valid_setting_gives_an_allowed_token(data, params):
    logits = data.draw(logit_rows())
    token = sample(params, logits, data.draw(histories(len(logits))))
    assert isinstance(token, int) and 0 <= token < len(logits)
    assert logits[token] > -INF  # a banned token (-inf) is never drawn
    if np.isposinf(logits).any():
        assert logits[token] == INF  # +inf outranks every finite logit


@SETTINGS
@given(data=st.data(), params=valid_params())
def test_filtered_distribution_is_a_distribution(data, params):
    assume(not params.greedy)
    logits = data.draw(logit_rows())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs = Sampler(params).filtered_probs(logits, data.draw(histories(len(logits))))
    assert np.isfinite(probs).all() and (probs >= 0).all()
    assert abs(probs.sum() - 1.0) < 1e-9
    assert (probs[logits == -INF] == 0).all()


@SETTINGS
@given(logits=logit_rows(), penalty=st.sampled_from([F32_TINY, 1e-30, 1e30, F32_MAX]),
       temperature=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 2**32))
def test_huge_penalties_on_every_token_still_give_a_token(logits, penalty, temperature, seed):
    """Every token seen and generated: the penalties reach every logit (a product past
    float32 saturates there instead of becoming infinite)."""
    history = TokenHistory(len(logits), range(len(logits)))
    for token in range(len(logits)):
        history.add_generated(token)
    params = SamplingParams(temperature=temperature, repetition_penalty=penalty, presence_penalty=2.0,
                            frequency_penalty=-2.0, seed=seed)
    token = sample(params, logits, history)
    assert 0 <= token < len(logits) and logits[token] > -INF


# ---- limits ------------------------------------------------------------------------------------

@SETTINGS
@given(logits=logit_rows(), temperature=st.sampled_from([1e-50, 1e-46, 5e-46]), seed=st.integers(0, 2**32))
def test_a_temperature_that_is_zero_in_float32_is_greedy(logits, temperature, seed):
    """T -> 0 is greedy: the argmax (first of ties), and no random number is consumed."""
    params = SamplingParams(temperature=temperature, seed=seed)
    assert params.greedy
    sampler = Sampler(params)
    before = sampler.rng.bit_generator.state
    assert sampler(logits) == int(np.argmax(logits))
    assert sampler.rng.bit_generator.state == before


# only rows whose maximum stands clear qualify: many drawn rows are set aside, by design
@settings(SETTINGS, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(logits=logit_rows(min_size=2), temperature=st.sampled_from([1e-45, 1e-40, F32_TINY, 1e-30, 1e-20]),
       seed=st.integers(0, 2**32))
def test_a_tiny_temperature_draws_the_maximum(logits, temperature, seed):
    """A tiny positive temperature: the draw lands on the maximum once it stands clear of
    the runner-up by far more than the temperature (exp(-gap / T) is 0 in float64)."""
    finite = logits[np.isfinite(logits)]
    assume(not np.isposinf(logits).any() and len(finite) >= 1)
    top = int(np.argmax(logits))
    rest = np.delete(logits, top)
    gap = float(logits[top]) - float(rest.max())
    assume(gap > 0 and gap / temperature > 1e4 and abs(float(logits[top])) < 1e30)
    assert sample(SamplingParams(temperature=temperature, seed=seed), logits) == top


def test_tiny_temperature_on_ordinary_logits_is_greedy():
    rng = np.random.default_rng(0)
    for temperature in (1e-50, 1e-40, 1e-30, 1e-12):
        for seed in range(20):
            logits = rng.normal(size=500).astype(np.float32) * 5
            assert sample(SamplingParams(temperature=temperature, seed=seed), logits) == int(np.argmax(logits))


@SETTINGS
@given(logits=logit_rows(), seed=st.integers(0, 2**32))
def test_a_huge_temperature_keeps_every_finite_token_possible(logits, seed):
    probs = Sampler(SamplingParams(temperature=F32_MAX, seed=seed)).filtered_probs(logits)
    if not np.isposinf(logits).any():
        assert (probs[np.isfinite(logits)] > 0).all()


# ---- logits that name no token -------------------------------------------------------------------

@SETTINGS
@given(data=st.data(), params=valid_params())
def test_nan_logits_are_refused_with_the_cause(data, params):
    logits = data.draw(logit_rows())
    logits[data.draw(st.integers(0, len(logits) - 1))] = np.nan
    with pytest.raises(SamplingError) as err:
        sample(params, logits)
    assert err.value.param == "logits" and "NaN" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_all_minus_inf_logits_are_refused(temperature):
    """No token is allowed: nothing honest can be drawn (an argmax would pick token 0)."""
    with pytest.raises(SamplingError, match="-inf") as err:
        sample(SamplingParams(temperature=temperature, seed=0), np.full(7, -INF, dtype=np.float32))
    assert err.value.param == "logits"


def test_plus_inf_tokens_share_the_draw():
    logits = np.array([1.0, INF, 3.0, INF, -INF], dtype=np.float32)
    probs = Sampler(temperature=0.7, seed=0).filtered_probs(logits)
    np.testing.assert_array_equal(probs, [0.0, 0.5, 0.0, 0.5, 0.0])
    assert Sampler(temperature=0.0)(logits) == 1


# ---- the boundary: what validation accepts, the sampler honours -----------------------------------

ANY_VALUE = st.one_of(
    st.floats(), st.integers(-2**70, 2**70), st.sampled_from([10**400, -10**400, True, None, "1", [1]]),
    st.sampled_from([0, 1, 2, 1e-50, 1e-300, F32_MAX, 3.5e38, 1e39, 2**31 - 1, 2**31, 2**64 - 1, 2**64]))
FIELDS = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
          "frequency_penalty", "seed"]


@SETTINGS
@given(field=st.sampled_from(FIELDS), value=ANY_VALUE, logits=logit_rows())
def test_validation_refuses_by_name_or_the_sampler_honours(field, value, logits):
    kwargs = {field: value}
    if field != "temperature":
        kwargs["temperature"] = 1.0
    try:
        params = SamplingParams(**kwargs)
    except SamplingError as err:
        message = str(err)
        assert err.param == field and message.startswith(field + ":") and "\n" not in message
        assert "must be" in message or "expected" in message
        return
    token = sample(params, logits, TokenHistory(len(logits), range(0, len(logits), 2)))
    assert 0 <= token < len(logits)
