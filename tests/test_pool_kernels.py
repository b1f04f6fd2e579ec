"""Max pooling's kernels: the compiled channels-last loops against the NumPy reference
(kernels/pool.py), and the op's gradient against torch at ties, NaNs and both layouts."""

import numpy as np
import pytest
import torch

import needle as ndl
from needle import nn
from needle.kernels import cpu_kernels, pool

CASES = [(2, 2), (3, 2), (3, 1), (2, 1)]


def _channels_last(rng, shape, dtype):
    n, c, h, w = shape
    return rng.standard_normal((n, h, w, c)).astype(dtype).transpose(0, 3, 1, 2)


def _numpy_path(fn, *args):
    """``fn`` with the compiled loops switched off (the NumPy views run)."""
    cpu_kernels._disabled.append("test")
    try:
        return fn(*args)
    finally:
        cpu_kernels._disabled.remove("test")


@pytest.mark.skipif(not cpu_kernels.enabled(np.dtype(np.float32)), reason="needs numba")
@pytest.mark.parametrize("k,s", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 5, 9, 8), (2, 4, 8, 6)])  # a rim left over; tiled
def test_compiled_loops_equal_the_numpy_views(k, s, dtype, shape):
    rng = np.random.default_rng(k * 10 + s)
    x = _channels_last(rng, shape, dtype)
    x[0, 0, 0, 0] = x[0, 0, 0, 1]  # a tie
    x[1, 2, 3, 3] = np.nan         # a NaN window
    y = pool.max_pool(x, k, s)
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous  # channels-last in, channels-last out
    np.testing.assert_array_equal(y, _numpy_path(pool.max_pool, x, k, s))
    g = rng.standard_normal(y.shape).astype(dtype)
    dx = pool.max_pool_scatter(x, y, g, k, s)
    dx_ref = _numpy_path(pool.max_pool_scatter, x, y, g, k, s)
    if s == k:  # each input in one window: the same single additions
        np.testing.assert_array_equal(dx, dx_ref)
    else:  # overlapping windows add in another order
        np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=4 * np.finfo(dtype).eps * 10)


@pytest.mark.parametrize("k,s", CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_pool_and_gradient_match_torch_with_ties_and_nan(k, s, layout):
    rng = np.random.default_rng(7)
    x = (_channels_last(rng, (2, 3, 7, 6), np.float32) if layout == "channels_last"
         else rng.standard_normal((2, 3, 7, 6)).astype(np.float32))
    x[0, 0, :2, :2] = 1.5  # a window of four equal maxima
    x[1, 1, 4, 4] = np.nan
    X = ndl.Tensor(x)
    out = nn.MaxPool2d(k, s)(X)
    tx = torch.tensor(np.ascontiguousarray(x), requires_grad=True)
    tout = torch.nn.functional.max_pool2d(tx, k, s)
    np.testing.assert_array_equal(out.numpy(), tout.detach().numpy())
    g = rng.standard_normal(out.shape).astype(np.float32)
    out.backward(ndl.Tensor(g))
    tout.backward(torch.tensor(g))
    np.testing.assert_allclose(X.grad.numpy(), tx.grad.numpy(), rtol=1e-6, atol=1e-6)
