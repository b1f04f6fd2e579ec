"""Compiled BatchNorm kernels (kernels/cpu_kernels.py) against NumPy and PyTorch, and their use.

The kernels accumulate in float64, so they agree with the NumPy paths to float32 rounding;
the NumPy paths stay the reference and run wherever the kernels cannot (checked here too).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needle as ndl
import needle.nn as nn
from needle.core.ops_norm import BatchNorm, BatchNormGrad
from needle.core.ops_reduce import Variance
from needle.kernels import cpu_kernels

needs_kernels = pytest.mark.skipif(cpu_kernels._kernels() is None,
                                   reason="numba is not installed or NEEDLE_NUMBA=0")

SHAPES = [(100, 50), (7, 3), (4096, 16)]


@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_kernels", lambda: None)


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_column_moments_match_float64_statistics(shape, dtype):
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype) * 3 + 5
    mean, var = cpu_kernels.column_moments(x)
    assert mean.dtype == var.dtype == dtype
    exact = x.astype(np.float64)
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(mean, exact.mean(0), rtol=tol)
    np.testing.assert_allclose(var, exact.var(0), rtol=tol * 10)


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_column_sums_match_float64_sums(shape, dtype):
    x = np.random.default_rng(7).standard_normal(shape).astype(dtype) + 2
    sums = cpu_kernels.column_sums(x)
    assert sums.dtype == dtype and sums.shape == (shape[1],)
    np.testing.assert_allclose(sums, x.astype(np.float64).sum(0),
                               rtol=1e-6 if dtype == np.float32 else 1e-12)


@needs_kernels
def test_channels_last_sums_take_the_kernel_and_match_the_numpy_path(monkeypatch):
    from needle.kernels import layout as channels_last

    x = np.random.default_rng(8).standard_normal((64, 8, 8, 16)).astype(np.float32)
    matrix = x.reshape(-1, 16)
    compiled = channels_last.column_sums(matrix)
    monkeypatch.setattr(cpu_kernels, "_kernels", lambda: None)
    # float32 sums of 4096 values near zero: compare with an absolute bound
    np.testing.assert_allclose(compiled, channels_last.column_sums(matrix), atol=1e-3)


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
def test_column_affine_is_numpys_product_and_sum(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    scale, shift = (rng.standard_normal(shape[1]).astype(np.float32) for _ in range(2))
    expected = x * scale
    expected += shift
    np.testing.assert_array_equal(cpu_kernels.column_affine(x, scale, shift), expected)


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_grad_matches_the_numpy_path(shape, dtype, monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    weight = rng.standard_normal(shape[1]).astype(dtype)
    mean, var = x.mean(0, keepdims=True), x.var(0, keepdims=True)
    op = BatchNormGrad((0,), 1e-5)
    compiled = op.compute(g, x, weight, mean, var)
    monkeypatch.setattr(cpu_kernels, "_kernels", lambda: None)
    reference = op.compute(g, x, weight, mean, var)
    for a, b in zip(compiled, reference):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * np.abs(b).max())


def test_kernels_refuse_what_they_do_not_cover():
    half = np.ones((4, 3), np.float16)
    assert cpu_kernels.column_moments(half) is None
    assert cpu_kernels.column_affine(np.ones((4, 3), np.float32).T, 1.0, 0.0) is None
    assert cpu_kernels.batch_norm_grad(np.ones((4, 3), np.float32), np.ones((4, 3)), 0, 1, 1) \
        is None  # float32 gradient, float64 input


def _train_batchnorm_layers(steps=3):
    """BatchNorm1d and BatchNorm2d (channels-last input) in training mode, with gradients."""
    np.random.seed(0)
    rng = np.random.default_rng(0)
    bn1, bn2 = nn.BatchNorm1d(50), nn.BatchNorm2d(16)
    x1 = ndl.Tensor(rng.standard_normal((100, 50)).astype(np.float32), requires_grad=True)
    nhwc = rng.standard_normal((8, 16, 16, 16)).astype(np.float32)
    x2 = ndl.Tensor(nhwc, requires_grad=True)
    for _ in range(steps):
        out1 = bn1(x1)
        out2 = bn2(ndl.ops.permute(x2, (0, 3, 1, 2)))
        ((out1 * out1).sum() + (out2 * out2 * out2).sum()).backward()
    params = [p.numpy().copy() for p in (*bn1.parameters(), *bn2.parameters())]
    grads = [p.grad.numpy().copy() for p in (*bn1.parameters(), *bn2.parameters())]
    stats = [bn1.running_mean.numpy(), bn1.running_var.numpy(), bn2.running_mean.numpy(),
             bn2.running_var.numpy()]
    return [out1.numpy(), out2.numpy(), x1.grad.numpy(), x2.grad.numpy(), *params, *grads,
            *stats]


@needs_kernels
def test_batchnorm_layers_use_the_kernels_and_agree_with_numpy(monkeypatch):
    calls = []
    for name in ("column_statistics", "batch_norm_forward", "batch_norm_grad_given_var"):
        original = getattr(cpu_kernels, name)

        def spy(*args, _original=original, _name=name):
            result = _original(*args)
            calls.append((_name, result is not None))
            return result

        monkeypatch.setattr(cpu_kernels, name, spy)
    compiled = _train_batchnorm_layers()
    assert {name for name, ran in calls if ran} == {"column_statistics", "batch_norm_forward",
                                                      "batch_norm_grad_given_var"}
    monkeypatch.setattr(cpu_kernels, "_kernels", lambda: None)
    reference = _train_batchnorm_layers()
    for a, b in zip(compiled, reference):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("kernels", [True, False])
def test_batchnorm1d_training_matches_torch_either_way(kernels, monkeypatch):
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "_kernels", lambda: None)
    elif cpu_kernels._kernels() is None:
        pytest.skip("numba is not installed or NEEDLE_NUMBA=0")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 20)).astype(np.float32) * 2 + 1
    g = rng.standard_normal((64, 20)).astype(np.float32)
    bn = nn.BatchNorm1d(20)
    nx = ndl.Tensor(x, requires_grad=True)
    out = bn(nx)
    (out * ndl.Tensor(g)).sum().backward()
    tbn = torch.nn.BatchNorm1d(20)
    tx = torch.tensor(x, requires_grad=True)
    tout = tbn(tx)
    (tout * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nx.grad.numpy(), tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.weight.grad.numpy(), tbn.weight.grad.numpy(), rtol=1e-4,
                               atol=1e-4)
    # needle's running variance uses the biased batch variance (torch's the unbiased one)
    np.testing.assert_allclose(bn.running_var.numpy(), 0.9 + 0.1 * x.astype(np.float64).var(0),
                               rtol=1e-5)


@needs_kernels
def test_variance_and_batch_norm_ops_keep_shapes_and_dtypes():
    x = np.random.default_rng(4).standard_normal((6, 5)).astype(np.float32)
    assert Variance((0,), keepdims=True).compute(x).shape == (1, 5)
    assert Variance((0,), keepdims=False).compute(x).shape == (5,)
    w, b = np.ones(5, np.float32), np.zeros(5, np.float32)
    y = BatchNorm((0,), 1e-5).compute(x, w, b, x.mean(0), x.var(0))
    assert y.dtype == np.float32 and y.shape == x.shape
    # a float64 weight promotes, as NumPy does: the kernel steps aside
    y64 = BatchNorm((0,), 1e-5).compute(x, w.astype(np.float64), b, x.mean(0), x.var(0))
    assert y64.dtype == np.float64


@needs_kernels
def test_kernels_compile_where_numba_cannot_cache_them():
    """A read-only install has no place for numba's disk cache: the loops still compile."""
    from needle.kernels import numba_kernels

    namespace: dict = {}
    exec("def double(x):\n    return x * 2\n", namespace)  # no source file: nothing to cache to
    double = numba_kernels._jit(namespace["double"])
    assert double(np.float32(3)) == 6


@needs_kernels
def test_a_kernel_numba_cannot_compile_falls_back_to_numpy(monkeypatch):
    from numba.core.errors import TypingError

    def broken(*args):
        raise TypingError("cannot compile here")

    monkeypatch.setattr(cpu_kernels, "_disabled", [])
    monkeypatch.setattr(cpu_kernels, "_kernels", lambda: {"moments": broken})
    x = np.random.default_rng(5).standard_normal((10, 4)).astype(np.float32)
    assert cpu_kernels.column_moments(x) is None
    assert cpu_kernels._disabled == ["moments"]
    np.testing.assert_allclose(Variance((0,), keepdims=False).compute(x), x.var(0), rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("stride, padding, k, in_hw", [(1, 1, 3, (9, 7)), (2, 1, 3, (10, 9)),
                                                       (2, 0, 1, (8, 8)), (3, 2, 5, (11, 12)),
                                                       (1, 0, 2, (5, 6))])
@pytest.mark.parametrize("channels_first_g", [False, True])
def test_conv_input_grad_by_col2im_matches_the_numpy_path(stride, padding, k, in_hw,
                                                          channels_first_g, monkeypatch):
    from needle.core.ops_conv import ConvInputGrad, _out_size

    rng = np.random.default_rng(6)
    ho, wo = (_out_size(n, k, stride, padding) for n in in_hw)
    g = rng.standard_normal((4, ho, wo, 6)).astype(np.float32)
    if channels_first_g:  # NCHW memory seen as NHWC, as nn.Conv's adjoints can be
        g = np.ascontiguousarray(g.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    b = rng.standard_normal((k, k, 5, 6)).astype(np.float32)
    op = ConvInputGrad(stride=stride, padding=padding, in_hw=in_hw)
    calls = []
    original = cpu_kernels.col2im
    monkeypatch.setattr(cpu_kernels, "col2im",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    compiled = op.compute(g, b)
    assert calls == [1]
    monkeypatch.setattr(cpu_kernels, "col2im", lambda *a, **k: None)
    reference = op.compute(g, b)
    assert compiled.shape == reference.shape == (4, *in_hw, 5)
    np.testing.assert_allclose(compiled, reference, rtol=1e-5, atol=1e-5)
