"""Solutions to the exercises of docs/10-sampling.md; `python docs/solutions/10_sampling.py`.

1. The draw is a sample from the distribution: many uniform numbers give each token about
   its probability.
2. As the temperature falls towards 0, sampling becomes greedy: the seeded sampler picks
   the argmax more and more often.
"""
import numpy as np

from tinyllm.sampler import Sampler, SamplingParams, apply_temperature, draw, softmax


def main():
    logits = np.array([3.0, 2.0, 1.0, 0.5, 0.0, -1.0], dtype=np.float32)
    probs = softmax(logits)
    u = np.random.default_rng(0).random(20000)
    freq = np.bincount([draw(probs, x) for x in u], minlength=6) / len(u)
    assert np.allclose(freq, probs, atol=0.01)
    print("1. probabilities", probs.round(3), "\n   drawn shares ", freq.round(3))

    for t in (2.0, 1.0, 0.3, 0.05):
        sampler = Sampler(SamplingParams(temperature=t, seed=0))
        share = np.mean([sampler(logits) == 0 for _ in range(500)])
        print(f"2. temperature {t:4}: token 0 (the argmax) drawn {share:.0%} of the time, "
              f"its probability {softmax(apply_temperature(logits, t))[0]:.0%}")


if __name__ == "__main__":
    main()
