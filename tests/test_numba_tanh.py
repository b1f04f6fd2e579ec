"""numba_tanh.tanh_f32, the tanh of the whole-sequence LSTM loops (kernels/numba_rnn.py):
against float64 tanh on a dense grid and at special values, and ``tanh_of``'s choice by dtype."""

from __future__ import annotations

import numpy as np
import pytest

tanh_loops = pytest.importorskip("needle.kernels.numba_tanh")
numba = pytest.importorskip("numba")


@numba.njit
def _tanh_all(x, out):
    for i in range(x.shape[0]):
        out[i] = tanh_loops.tanh_of(x[i])


def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in float32 steps (same-sign values)."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def test_tanh_is_within_two_ulp_of_the_correctly_rounded_value():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-12, 12, 480_001), np.linspace(-0.7, 0.7, 140_001),
                        rng.standard_normal(100_000) * 3,
                        np.geomspace(1e-30, 1e-2, 2_001), -np.geomspace(1e-30, 1e-2, 2_001),
                        [0.625, -0.625, np.nextafter(0.625, 0), 9.0, 9.5, 10.0, 11.0]]
                       ).astype(np.float32)
    got = np.empty_like(x)
    _tanh_all(x, got)
    want = np.tanh(x.astype(np.float64)).astype(np.float32)
    assert _ulps(got, want).max() <= 2
    assert np.array_equal(np.sign(got), np.sign(x))


def test_tanh_of_special_values():
    x = np.float32([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45, 30.0, -30.0])
    got = np.empty_like(x)
    _tanh_all(x, got)
    assert got[0] == 1 and got[1] == -1 and np.isnan(got[2])
    assert got[3] == 0 and not np.signbit(got[3]) and got[4] == 0 and np.signbit(got[4])
    assert got[5] == np.float32(1e-45) and got[6] == 1 and got[7] == -1


def test_tanh_of_float64_is_libms():
    x = np.linspace(-5, 5, 10_001)
    got = np.empty_like(x)
    _tanh_all(x, got)
    np.testing.assert_allclose(got, np.tanh(x), rtol=1e-15, atol=1e-300)
