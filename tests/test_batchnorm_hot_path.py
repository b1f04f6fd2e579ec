"""BatchNorm's hot case (a small C-contiguous (B, C) matrix: BatchNorm1d in an MLP) calls its
compiled loops directly (kernels/batchnorm.py): the same bits as the ladder it skips, and
every other input still takes the ladder."""

from __future__ import annotations

import numpy as np
import pytest

from needle.kernels import batchnorm, cpu_kernels

pytest.importorskip("numba")


def _ladder_only(monkeypatch):
    """The hot case turned off: every key resolves to None, as without numba."""
    monkeypatch.setattr(batchnorm, "_hot_loops", {}, raising=True)
    monkeypatch.setattr(batchnorm, "_resolve_hot_loop", lambda key: None)


def _inputs(dtype, rows=100, cols=50, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 3 + 5).astype(dtype)
    g = rng.standard_normal((rows, cols)).astype(dtype)
    weight = rng.uniform(0.5, 1.5, (cols,)).astype(dtype)
    return x, g, weight


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hot_statistics_and_backward_give_the_ladders_bits(dtype, monkeypatch):
    x, g, weight = _inputs(dtype)
    mean, var = batchnorm.statistics(x, (0,))
    grads = batchnorm.backward_given_var(g, x, weight, mean, var, 1e-5, (0,))
    assert batchnorm._hot_loops, "the hot case did not run"
    _ladder_only(monkeypatch)
    mean_ref, var_ref = batchnorm.statistics(x, (0,))
    grads_ref = batchnorm.backward_given_var(g, x, weight, mean_ref, var_ref, 1e-5, (0,))
    for got, want in zip((mean, var, *grads), (mean_ref, var_ref, *grads_ref)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    # and the values are BatchNorm's (float64 reference)
    np.testing.assert_allclose(mean[0], x.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(var[0], x.astype(np.float64).var(0), rtol=1e-5)


def test_inputs_outside_the_hot_case_take_the_ladder():
    x, g, weight = _inputs(np.float32)
    mean, var = batchnorm.statistics(x, (0,))
    want = batchnorm.backward_given_var(g, x, weight, mean, var, 1e-5, (0,))
    cases = {
        "strided x": (g, np.asfortranarray(x), weight),
        "float64 weight": (g, x, weight.astype(np.float64)),
        "strided g": (np.asfortranarray(g), x, weight),
    }
    for name, (gi, xi, wi) in cases.items():
        got = batchnorm.backward_given_var(gi, xi, wi, mean, var, 1e-5, (0,))
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6, err_msg=name)
        assert got[1].shape == weight.shape, name
    half = x.astype(np.float16)  # no compiled loop for float16: NumPy's formulas
    mean16, var16 = batchnorm.statistics(half, (0,))
    assert mean16.dtype == np.float16 and mean16.shape == (1, 50)
    assert all(key[1] != np.float16 for key in batchnorm._hot_loops)  # (kept small)
    mean_t, var_t = batchnorm.statistics(np.ascontiguousarray(x.T).T, (0,))
    np.testing.assert_allclose(mean_t, mean, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hot_forward_gives_the_ladders_bits(dtype, monkeypatch):
    if not cpu_kernels.enabled(np.dtype(dtype)):
        pytest.skip("needle's numba loops are off here (NEEDLE_NUMBA=0)")
    x, _, weight = _inputs(dtype, rows=100, cols=100, seed=1)
    bias = np.linspace(-1, 1, 100).astype(dtype)
    mean, var = batchnorm.statistics(x, (0,))
    y = batchnorm.forward(x, weight, bias, mean, var, 1e-5, (0,))
    assert ("bn_forward", np.dtype(dtype)) in batchnorm._hot_loops, "the hot case did not run"
    assert batchnorm._hot_loops[("bn_forward", np.dtype(dtype))].signatures
    monkeypatch.setattr(batchnorm, "HOT_FORWARD", False)
    want = batchnorm.forward(x, weight, bias, mean, var, 1e-5, (0,))
    assert y.shape == want.shape and y.dtype == want.dtype
    np.testing.assert_array_equal(y, want)
    _ladder_only(monkeypatch)  # and the NumPy formulas (no compiled loop at all)
    monkeypatch.setattr(batchnorm.cpu_kernels, "enabled", lambda dtype: False)
    numpy_y = batchnorm.forward(x, weight, bias, mean, var, 1e-5, (0,))
    np.testing.assert_array_equal(y, numpy_y)


def test_forward_inputs_outside_the_hot_case_take_the_ladder():
    x, _, weight = _inputs(np.float32, seed=2)
    bias = np.full(50, 0.25, np.float32)
    mean, var = batchnorm.statistics(x, (0,))
    want = batchnorm.forward(x, weight, bias, mean, var, 1e-5, (0,))
    cases = {
        "strided x": (np.asfortranarray(x), weight, bias),
        "float64 weight": (x, weight.astype(np.float64), bias),
        "strided weight": (x, np.repeat(weight, 2)[::2], bias),
        "one row": (x[:1], weight, bias),
    }
    for name, (xi, wi, bi) in cases.items():
        mi, vi = (mean, var) if name != "one row" else batchnorm.statistics(xi, (0,))
        got = batchnorm.forward(xi, wi, bi, mi, vi, 1e-5, (0,))
        assert got.shape == xi.shape, name
        if name != "one row":
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
        else:  # a single row normalizes to the bias
            np.testing.assert_allclose(got[0], bi, atol=1e-2, err_msg=name)
