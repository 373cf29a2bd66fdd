"""The sampler's steps against direct formulas on hand-made vectors, and seeded draws
against the filtered distribution (a statistical test with a stated tolerance)."""
import math

import numpy as np
import pytest

from tinyllm.sampler import (
    Sampler, SamplingError, SamplingParams, TokenHistory, apply_presence_frequency_penalty,
    apply_repetition_penalty, apply_temperature, draw, min_p_filter, softmax, top_k_filter, top_p_filter)

NEG = -math.inf


def probs_of(logits):
    """Direct softmax written here, independent of tinyllm: exp(l) / sum exp(l)."""
    e = [0.0 if l == NEG else math.exp(l) for l in logits]
    return [x / sum(e) for x in e]


def f32(*values):
    return np.array(values, dtype=np.float32)


# ---- penalties -----------------------------------------------------------------------------

def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = f32(2.0, -1.0, 3.0, -4.0, 0.5)
    seen = np.array([True, True, False, False, False])
    out = apply_repetition_penalty(logits, seen, 2.0)
    np.testing.assert_allclose(out, [1.0, -2.0, 3.0, -4.0, 0.5])
    assert logits[0] == 2.0  # input untouched


def test_repetition_penalty_matches_transformers_processor():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(1)
    logits = rng.normal(size=50).astype(np.float32)
    ids = [3, 7, 7, 20, 49, 0]
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([ids]), torch.tensor(logits[None]))[0].numpy()
    history = TokenHistory(50, ids)
    np.testing.assert_allclose(apply_repetition_penalty(logits, history.seen, 1.3), ref, rtol=1e-6)


def test_presence_and_frequency_penalty_openai_formula():
    logits = f32(1.0, 1.0, 1.0, 1.0)
    counts = np.array([0, 1, 3, 0])
    out = apply_presence_frequency_penalty(logits, counts, presence=0.5, frequency=0.25)
    # logit - presence * (c > 0) - frequency * c
    np.testing.assert_allclose(out, [1.0, 1.0 - 0.5 - 0.25, 1.0 - 0.5 - 0.75, 1.0], rtol=1e-6)
    assert out.dtype == np.float32


def test_history_counts_generated_only_and_marks_prompt_as_seen():
    h = TokenHistory(6, [1, 1, 4])
    h.add_generated(2)
    h.add_generated(2)
    h.add_generated(4)
    assert h.seen.tolist() == [False, True, True, False, True, False]
    assert h.counts.tolist() == [0, 0, 2, 0, 1, 0]


# ---- temperature and filters ---------------------------------------------------------------

def test_temperature_divides_logits():
    np.testing.assert_allclose(apply_temperature(f32(1.0, -2.0, 4.0), 0.5), [2.0, -4.0, 8.0])


def test_top_k_keeps_k_highest_and_ties():
    logits = f32(0.1, 3.0, 2.0, -1.0, 2.0, 0.5)
    assert np.isfinite(top_k_filter(logits, 2)).tolist() == [False, True, True, False, True, False]  # tie at 2.0 kept
    assert np.isfinite(top_k_filter(logits, 1)).tolist() == [False, True, False, False, False, False]
    assert top_k_filter(logits, 0) is logits
    assert np.isfinite(top_k_filter(logits, 6)).all()


def test_top_p_smallest_set_reaching_p():
    probs = [0.5, 0.05, 0.25, 0.15, 0.05]
    logits = np.log(np.array(probs, dtype=np.float32))
    # sorted: 0.5, 0.25, 0.15, 0.05, 0.05 -> cumulative 0.5, 0.75, 0.9, ...
    assert np.isfinite(top_p_filter(logits, 0.5)).tolist() == [True, False, False, False, False]
    assert np.isfinite(top_p_filter(logits, 0.6)).tolist() == [True, False, True, False, False]
    assert np.isfinite(top_p_filter(logits, 0.85)).tolist() == [True, False, True, True, False]
    assert np.isfinite(top_p_filter(logits, 0.01)).tolist() == [True, False, False, False, False]  # >= 1 kept


def test_top_p_matches_transformers_warper():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopPLogitsWarper

    rng = np.random.default_rng(2)
    for p, size, scale in [(0.3, 200, 2), (0.7, 200, 2), (0.95, 200, 2), (0.9, 20000, 1), (0.9, 20000, 6)]:
        logits = (rng.normal(size=size) * scale).astype(np.float32)  # large sizes: flat and peaked
        ref = TopPLogitsWarper(p)(None, torch.tensor(logits[None]))[0].numpy()
        assert (np.isfinite(top_p_filter(logits, p)) == np.isfinite(ref)).all()


def test_min_p_keeps_tokens_above_fraction_of_max():
    probs = [0.6, 0.2, 0.1, 0.06, 0.04]
    logits = np.log(np.array(probs, dtype=np.float32))
    # threshold 0.25 * 0.6 = 0.15
    assert np.isfinite(min_p_filter(logits, 0.25)).tolist() == [True, True, False, False, False]
    # threshold 0.09 * 0.6 = 0.054
    assert np.isfinite(min_p_filter(logits, 0.09)).tolist() == [True, True, True, True, False]


def test_softmax_zero_for_removed():
    p = softmax(f32(0.0, NEG, math.log(3.0)))
    np.testing.assert_allclose(p, [0.25, 0.0, 0.75])


# ---- the draw --------------------------------------------------------------------------------

def test_draw_inverse_cdf_over_sorted_distribution():
    probs = np.array([0.1, 0.0, 0.6, 0.3])
    # sorted: token 2 (0.6), token 3 (0.3), token 0 (0.1); cdf 0.6, 0.9, 1.0
    assert draw(probs, 0.0) == 2
    assert draw(probs, 0.59) == 2
    assert draw(probs, 0.61) == 3
    assert draw(probs, 0.89) == 3
    assert draw(probs, 0.95) == 0
    assert draw(probs, 0.999999999) == 0
    assert draw(np.array([0.0, 0.5, 0.5]), 0.4) == 1  # ties: lower id first


def test_draw_on_a_large_vocabulary_matches_a_plain_inverse_cdf():
    """The fast path (the top 256 tokens first) gives what a full sort gives."""
    rng = np.random.default_rng(4)
    for scale in (0.5, 3.0, 8.0):
        probs = softmax((rng.normal(size=5000) * scale).astype(np.float32))
        probs[rng.integers(0, 5000, 500)] = 0.0  # some filtered out
        probs /= probs.sum()
        ranked = sorted(np.flatnonzero(probs), key=lambda i: (-probs[i], i))
        running = np.cumsum([probs[i] for i in ranked])
        for u in rng.random(40):
            expected = ranked[min(int(np.searchsorted(running, u, side="right")), len(ranked) - 1)]
            assert draw(probs, u) == expected


def test_greedy_is_argmax():
    rng = np.random.default_rng(3)
    sampler = Sampler(SamplingParams(temperature=0.0, top_k=3, top_p=0.5))
    for _ in range(20):
        logits = rng.normal(size=100).astype(np.float32)
        assert sampler(logits) == int(np.argmax(logits))


def test_greedy_with_repetition_penalty_is_argmax_of_penalised():
    logits = f32(5.0, 4.0, 1.0)
    sampler = Sampler(temperature=0.0, repetition_penalty=2.0)
    assert sampler(logits, TokenHistory(3, [0])) == 1  # 5/2 < 4


def expected_filtered(logits, temperature, top_k, top_p, min_p):
    """The filtered distribution written directly from the definitions, in plain Python."""
    scaled = [l / temperature for l in logits]
    kth = sorted(scaled, reverse=True)[top_k - 1]
    scaled = [l if l >= kth else NEG for l in scaled]
    p = probs_of(scaled)
    order = sorted(range(len(p)), key=lambda i: -p[i])
    kept, mass = set(), 0.0
    for i in order:
        if mass < top_p:
            kept.add(i)
        mass += p[i]
    scaled = [l if i in kept else NEG for i, l in enumerate(scaled)]
    p = probs_of(scaled)
    scaled = [l if p[i] >= min_p * max(p) else NEG for i, l in enumerate(scaled)]
    return probs_of(scaled)


def test_filtered_probs_match_direct_formula():
    logits = [2.0, 1.5, 0.2, -0.5, 1.0, 3.0, 0.0, -2.0, 0.7, 1.1]
    sampler = Sampler(temperature=0.8, top_k=7, top_p=0.9, min_p=0.05, seed=0)
    np.testing.assert_allclose(sampler.filtered_probs(np.array(logits, dtype=np.float32)),
                               expected_filtered(logits, 0.8, 7, 0.9, 0.05), atol=1e-6)


def test_seeded_draws_follow_filtered_distribution():
    """50,000 seeded draws; tolerance: total variation distance < 0.01 from the expected
    distribution (the sampling error alone is ~0.003 for this many draws), and every
    filtered-out token never drawn."""
    logits = [2.0, 1.5, 0.2, -0.5, 1.0, 3.0, 0.0, -2.0, 0.7, 1.1]
    expected = np.array(expected_filtered(logits, 0.8, 7, 0.9, 0.05))
    sampler = Sampler(temperature=0.8, top_k=7, top_p=0.9, min_p=0.05, seed=1234)
    x = np.array(logits, dtype=np.float32)
    n = 50_000
    counts = np.bincount([sampler(x) for _ in range(n)], minlength=len(logits))
    tv = 0.5 * np.abs(counts / n - expected).sum()
    assert tv < 0.01, (tv, counts / n, expected)
    assert (counts[expected == 0] == 0).all()


def test_same_seed_same_tokens_different_seed_different():
    rng = np.random.default_rng(5)
    logits = [rng.normal(size=1000).astype(np.float32) for _ in range(50)]

    def run(seed):
        s = Sampler(temperature=1.0, seed=seed)
        return [s(x) for x in logits]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_one_uniform_per_token_from_the_seeded_generator():
    """A GPU sampler that draws u from the same generator and applies `draw` agrees."""
    logits = np.random.default_rng(6).normal(size=300).astype(np.float32)
    a = Sampler(temperature=0.9, top_p=0.8, seed=11)
    rng = np.random.default_rng(11)
    probs = a.filtered_probs(logits)
    for _ in range(30):
        assert a(logits) == draw(probs, rng.random())


# ---- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": 1.1}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"seed": -1}, "seed"),
])
def test_invalid_parameters_name_parameter_and_value(kwargs, param):
    with pytest.raises(SamplingError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param
    message = str(err.value)
    assert param in message and repr(next(iter(kwargs.values()))) in message
    assert "\n" not in message
    assert isinstance(err.value, ValueError)
