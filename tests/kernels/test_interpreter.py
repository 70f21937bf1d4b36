"""The GPU arithmetic `sageflash.kernels.interpreter` gives Triton's CPU interpreter."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from sageflash.kernels.interpreter import fused_multiply_add


def correctly_rounded(exact: Fraction) -> np.float32:
    """The float32 nearest to ``exact`` (ties to even), from its neighbours."""
    guess = np.float32(float(exact))
    neighbours = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return min(neighbours, key=lambda f: (abs(Fraction(float(f)) - exact), int(f.view(np.int32)) & 1))


@pytest.mark.parametrize("case", ["random", "cancelling"])
def test_fused_multiply_add_rounds_once(case):
    rng = np.random.default_rng(7)
    n = 3000
    x = rng.standard_normal(n).astype(np.float32)
    y = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    if case == "random":
        z = (rng.standard_normal(n) * 2.0 ** rng.integers(-60, 60, n)).astype(np.float32)
    else:  # z = -x*y to a few ulps: the residuals of a division, where one rounding matters
        z = (-(x.astype(np.float64) * y) * (1 + rng.standard_normal(n) * 1e-7)).astype(np.float32)
    got = fused_multiply_add(x, y, z)
    assert got.dtype == np.float32
    want = [correctly_rounded(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))
            for a, b, c in zip(x, y, z)]
    assert np.array_equal(got, np.array(want, dtype=np.float32))
    unfused = x * y + z  # what the interpreter computes without it: two roundings
    assert case == "random" or not np.array_equal(unfused, got)


def test_fused_multiply_add_passes_infinities_through():
    inf = np.float32(np.inf)
    x = np.array([-inf, inf, 1.0, 2.0], dtype=np.float32)
    y = np.array([0.5, 0.5, inf, 3.0], dtype=np.float32)
    z = np.array([-1.0, 4.0, -1.0, -inf], dtype=np.float32)
    with np.errstate(all="raise"):  # no floating-point warning escapes
        got = fused_multiply_add(x, y, z)
    assert np.array_equal(got, np.array([-inf, inf, inf, -inf], dtype=np.float32))
