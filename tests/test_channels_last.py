"""kernels/layout.py and the channels-last paths of the reductions, BatchNorm and conv.

An NCHW model keeps its activations channels-last (NHWC memory behind NCHW views); these paths
must give what the plain NumPy formulas give on any layout.
"""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
from needle.core.ops_norm import BatchNorm, BatchNormGrad
from needle.kernels import layout as cl
from needle.kernels.reduce import reduce_sum, reduce_sum_of_products


def _channels_last(shape, seed=0):
    """A random NCHW-shaped float32 array stored NHWC."""
    n, c, h, w = shape
    data = np.random.default_rng(seed).standard_normal((n, h, w, c)).astype(np.float32)
    return data.transpose(0, 3, 1, 2)


# (N, C, H, W): rows of a multiple of C; an odd count of positions (no row view); C = 3
SHAPES = [(16, 16, 16, 16), (3, 5, 7, 9), (8, 3, 32, 32), (64, 64, 8, 8)]


@pytest.mark.parametrize("shape", SHAPES)
def test_channel_matrix_helpers_match_numpy(shape):
    x = _channels_last(shape)
    matrix = cl.channel_matrix(x, 1)
    assert matrix is not None and matrix.shape == (shape[0] * shape[2] * shape[3], shape[1])
    assert np.shares_memory(matrix, x)
    assert cl.channel_matrix(np.ascontiguousarray(x), 1) is None  # NCHW memory: no matrix
    ref = matrix.astype(np.float64)
    v = np.random.default_rng(1).standard_normal(shape[1]).astype(np.float32)
    np.testing.assert_allclose(cl.column_sums(matrix), ref.sum(0), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(cl.column_dots(matrix, matrix), (ref * ref).sum(0), rtol=1e-5)
    np.testing.assert_allclose(cl.scaled(matrix, v, v), ref * v + v, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cl.shifted(matrix, v), ref + v, rtol=1e-6, atol=1e-6)
    work = matrix.copy()
    cl.multiply_(work, v)
    cl.add_(work, v)
    np.testing.assert_allclose(work, ref * v + v, rtol=1e-6, atol=1e-6)
    back = cl.from_channel_matrix(matrix, x, 1)
    assert back.shape == x.shape and np.shares_memory(back, x)
    np.testing.assert_array_equal(back, x)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keepdims", [False, True])
def test_reductions_on_channels_last_arrays(shape, keepdims):
    x, y = _channels_last(shape, 0), _channels_last(shape, 1)
    axes = (0, 2, 3)
    want = x.astype(np.float64).sum(axis=axes, keepdims=keepdims)
    np.testing.assert_allclose(reduce_sum(x, axes, keepdims), want, rtol=1e-5, atol=1e-3)
    dots = (x.astype(np.float64) * y).sum(axis=axes, keepdims=keepdims)
    np.testing.assert_allclose(reduce_sum_of_products(x, y, axes, keepdims), dots, rtol=1e-4,
                               atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("g_layout", ["channels_last", "nchw"])
def test_batch_norm_ops_give_the_same_on_either_layout(shape, g_layout):
    axes, eps = (0, 2, 3), 1e-5
    x = _channels_last(shape, 0)
    g = _channels_last(shape, 1)
    if g_layout == "nchw":
        g = np.ascontiguousarray(g)
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((1, shape[1], 1, 1)).astype(np.float32)
    bias = rng.standard_normal((1, shape[1], 1, 1)).astype(np.float32)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    xn, gn = np.ascontiguousarray(x), np.ascontiguousarray(g)  # NCHW memory: the plain path
    y = BatchNorm(axes, eps).compute(x, weight, bias, mean, var)
    np.testing.assert_allclose(y, BatchNorm(axes, eps).compute(xn, weight, bias, mean, var),
                               rtol=1e-5, atol=1e-5)
    assert cl.channel_matrix(y, 1) is not None  # the output stays channels-last
    got = BatchNormGrad(axes, eps).compute(g, x, weight, mean, var)
    want = BatchNormGrad(axes, eps).compute(gn, xn, weight, mean, var)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_results_are_stored_channels_last():
    """The conv primitives return C-contiguous NHWC arrays whatever the input layout, so an
    NCHW model's activations stay channels-last behind its NCHW views."""
    rng = np.random.default_rng(3)
    for nchw in (False, True):
        a = rng.standard_normal((2, 3, 20, 20) if nchw else (2, 20, 20, 3)).astype(np.float32)
        a = a.transpose(0, 2, 3, 1) if nchw else a
        w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
        y = ndl.ops.conv(ndl.Tensor(a), ndl.Tensor(w), stride=2, padding=1)
        g = ndl.Tensor(rng.standard_normal(y.shape).astype(np.float32))
        xg = ndl.ops.conv_input_grad(g, ndl.Tensor(w), stride=2, padding=1, in_hw=(20, 20))
        wg = ndl.ops.conv_weight_grad(ndl.Tensor(a), g, kernel_hw=(3, 3), stride=2, padding=1)
        for t in (y, xg, wg):
            assert t.numpy().flags.c_contiguous


@pytest.mark.parametrize("shape", [(64, 16, 16, 16), (4096, 10), (8, 9, 9, 64), (300, 100)])
def test_row_vector_add_is_numpys_add(shape):
    """A bias added to large activations with short rows takes the tiled-rows path; the result
    is bit for bit NumPy's, in either operand order, eagerly through ops.add too."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal(shape).astype(np.float32)
    b = rng.standard_normal(shape[-1]).astype(np.float32)
    applies = shape[-1] <= cl.SHORT_ROW
    assert (cl.add_row_vector(a, b) is not None) == applies
    np.testing.assert_array_equal((ndl.Tensor(a) + ndl.Tensor(b)).numpy(), a + b)
    np.testing.assert_array_equal((ndl.Tensor(b) + ndl.Tensor(a)).numpy(), b + a)
    # not applicable: a non-contiguous array, another dtype, a 2-d second operand
    assert cl.add_row_vector(a[..., ::-1], b) is None
    assert cl.add_row_vector(a, b.astype(np.float64)) is None
    assert cl.add_row_vector(a, b[None]) is None


def test_global_mean_pool_gradient_keeps_channels_last_layout():
    """The adjoint of a mean is divided before it is broadcast: it reaches a channels-last
    activation as a broadcast view, so the ReLU product keeps the activation's layout (an NCHW
    copy met channels-last memory in a mixed-layout product, 4x slower) with torch's values."""
    import torch

    rng = np.random.default_rng(0)
    nhwc = rng.standard_normal((4, 6, 5, 8)).astype(np.float32)
    x = ndl.Tensor(nhwc, requires_grad=True)
    activation = ndl.ops.relu(ndl.ops.permute(x, (0, 3, 1, 2)))  # NCHW view, NHWC memory
    ndl.ops.mean(activation, axes=(2, 3)).sum().backward()
    grad = x.grad.numpy()
    assert grad.strides[3] == grad.itemsize  # channels innermost, as x is stored

    tx = torch.tensor(nhwc, requires_grad=True)
    torch.relu(tx.permute(0, 3, 1, 2)).mean(dim=(2, 3)).sum().backward()
    np.testing.assert_allclose(grad, tx.grad.numpy(), rtol=1e-6, atol=0)
