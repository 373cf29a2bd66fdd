"""Log-probabilities and logit bias in the sampler, on hand-made logits: every expected
value is a formula written here (log-softmax by hand, the filters' definitions)."""
import math

import numpy as np
import pytest

from tinyllm.sampler import Sampler, SamplingError, SamplingParams, token_logprob


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    return x - x.max() - math.log(np.exp(x - x.max()).sum())


LOGITS = np.array([1.0, 3.0, 2.0, 3.0, -1.0, 0.5], dtype=np.float32)


def test_greedy_logprob_is_the_log_softmax_of_the_logits():
    s = Sampler(SamplingParams(logprobs=3))
    token = s(LOGITS)
    entry = s.take_logprob()
    ref = log_softmax(LOGITS)
    assert token == entry.id == 1  # the tie 1 = 3 goes to the lower id, as argmax does
    assert entry.logprob == pytest.approx(ref[1], abs=1e-12)
    assert [i for i, _ in entry.top] == [1, 3, 2]  # most likely first, ties by lower id
    assert [lp for _, lp in entry.top] == pytest.approx([ref[1], ref[3], ref[2]], abs=1e-12)
    assert s.take_logprob() is None  # handed over once
    assert Sampler(SamplingParams())(LOGITS) == 1 and Sampler(SamplingParams()).last_logprob is None


def test_sampled_logprob_is_that_of_the_filtered_distribution():
    """temperature 0.5, top-k 3: the draw sees exp(l/T) over the three best, renormalised."""
    s = Sampler(SamplingParams(temperature=0.5, top_k=3, seed=0, logprobs=5))
    token = s(LOGITS)
    entry = s.take_logprob()
    kept = [1, 3, 2]
    z = sum(math.exp(LOGITS[i] / 0.5) for i in kept)
    expected = {i: LOGITS[i] / 0.5 - math.log(z) for i in kept}
    assert token in kept and entry.logprob == pytest.approx(expected[token], abs=1e-6)
    assert len(entry.top) == 3  # tokens the filter removed have probability 0: never listed
    assert dict(entry.top) == pytest.approx(expected, abs=1e-6)
    # the same draws as a sampler that keeps no log-probabilities
    a = Sampler(SamplingParams(temperature=0.9, seed=4, logprobs=2))
    b = Sampler(SamplingParams(temperature=0.9, seed=4))
    assert [a(LOGITS) for _ in range(20)] == [b(LOGITS) for _ in range(20)]


def test_token_logprob_lists_at_most_n_and_the_chosen_may_be_outside():
    lp = log_softmax(LOGITS)
    entry = token_logprob(lp, 4, 2)
    assert entry.id == 4 and entry.logprob == lp[4] and [i for i, _ in entry.top] == [1, 3]
    assert token_logprob(lp, 4, 0).top == ()


def test_logit_bias_is_added_before_choosing():
    ref = LOGITS.astype(np.float64).copy()
    ref[5] += 10
    s = Sampler(SamplingParams(logit_bias={5: 10}, logprobs=1))
    assert s(LOGITS) == 5 == int(np.argmax(ref))
    assert s.take_logprob().logprob == pytest.approx(log_softmax(ref)[5], abs=1e-6)
    assert Sampler(SamplingParams(logit_bias={1: -100, 3: -100}))(LOGITS) == 2
    assert SamplingParams(logit_bias={3: 1, 1: 2}).logit_bias == ((1, 2.0), (3, 1.0))  # a dict, normalised
    with pytest.raises(SamplingError, match="logit_bias: token 99 is outside the vocabulary of 6"):
        Sampler(SamplingParams(logit_bias={99: 1}))(LOGITS)


@pytest.mark.parametrize("bias, message", [({1: 101}, "in [-100, 100]"), ({-1: 1}, "[0, 2**31)"),
                                           ({True: 1}, "[0, 2**31)"), ({1: float("nan")}, "in [-100, 100]"),
                                           ("x", "expected {token id: bias}")])
def test_bad_logit_bias_names_the_field(bias, message):
    with pytest.raises(SamplingError, match="logit_bias") as e:
        SamplingParams(logit_bias=bias)
    assert message in str(e.value)


def test_bad_logprobs_and_what_needs_the_host():
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(SamplingError, match="logprobs"):
            SamplingParams(logprobs=bad)
    assert not SamplingParams(temperature=0.7, top_k=5, seed=1).needs_host
    for params in (SamplingParams(logprobs=0), SamplingParams(logit_bias={1: 1}),
                   SamplingParams(repetition_penalty=1.1)):
        assert params.needs_host  # a GPU sampler hands these rows to the host
