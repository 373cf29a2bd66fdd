"""Solutions to the exercises of docs/02-arrays-and-backend.md;
`python docs/solutions/02_arrays_and_backend.py`.

1. A function written once for NumPy and CuPy through `array_module`.
2. NumPy 2 keeps the type of NumPy scalars: multiplying float32 activations by
   `1 / np.sqrt(64)` (a float64 scalar) gives float64; a Python float keeps float32.
"""
import math

import numpy as np

from tinyllm.backend import array_module


def l2_normalize(x, eps=1e-6):
    """x / |x| along the last axis, for NumPy or CuPy arrays alike."""
    xp = array_module(x)
    return x / xp.sqrt((x * x).sum(axis=-1, keepdims=True) + eps)


def main():
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    y = l2_normalize(x)
    assert y.dtype == np.float32 and np.allclose(np.linalg.norm(y, axis=-1), 1, atol=1e-5)
    print("1. l2_normalize works on NumPy arrays and keeps float32")

    numpy_scalar = x * (1 / np.sqrt(64))          # np.sqrt of an int is a float64 NumPy scalar
    python_float = x * (1 / math.sqrt(64))        # a Python float adapts to the array
    assert numpy_scalar.dtype == np.float64 and python_float.dtype == np.float32
    print("2. x * (1 / np.sqrt(64)) is", numpy_scalar.dtype, "| x * (1 / math.sqrt(64)) is", python_float.dtype)


if __name__ == "__main__":
    main()
