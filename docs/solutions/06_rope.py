"""Solutions to the exercises of docs/06-rope.md; `python docs/solutions/06_rope.py`.

1. RoPE with complex numbers: pair (x1, x2) as x1 + i*x2, multiplied by e^(i*angle), equals
   tinyllm's apply_rope.
2. Every pair's wavelength: how often the fastest pair's angle repeats, and how many pairs
   never complete a turn within the trained context.
"""
import numpy as np

import tinyllm
from tinyllm.rope import apply_rope, inverse_frequencies


def main():
    llm = tinyllm.load()
    c, m = llm.config, llm.model
    e = c.head_dim

    # 1. a rotation of a pair is a multiplication by a unit complex number
    x = np.random.default_rng(0).standard_normal((1, 4, 2, e)).astype(np.float32)    # [B, T, N, E]
    positions = np.array([0, 1, 500, 8000])
    z = x[..., :e // 2] + 1j * x[..., e // 2:]                                         # [B, T, N, E/2] complex
    angle = positions[:, None] * inverse_frequencies(c)                                # [T, E/2]
    turned = z * np.exp(1j * angle)[None, :, None, :]
    by_complex = np.concatenate([turned.real, turned.imag], axis=-1)
    assert np.allclose(by_complex, apply_rope(x, m.cos[positions], m.sin[positions]), atol=1e-4)
    print("1. complex multiplication equals apply_rope")

    # 2. a pair's angle repeats every wavelength: distances d and d + wavelength look the same to it
    wavelength = 2 * np.pi / inverse_frequencies(c)
    never = np.sum(wavelength > c.max_seq_len)
    print(f"2. the fastest pair repeats every {wavelength[0]:.1f} positions; {never} of {e // 2} pairs never complete "
          f"a turn within {c.max_seq_len} positions")


if __name__ == "__main__":
    main()
