"""A ``BatchNorm2d -> ReLU -> max pool`` block's fused ops (core/ops_batchnorm_relu_pool.py)
and the JIT pass that uses them (compiler/batchnorm_relu_pool_rewrite.py).

The kernels (kernels/bn_relu_pool.py) recompute the activation from x where the pool's loops
read it: the forward must give the bits of batch_norm, relu and max_pool2d; the backward
those of max_pool2d_scatter and batch_norm_relu_grad, on ties, NaN and signed zeros, whole,
in row blocks and on TBB's threads; a jitted ResidualCNN must train bit for bit as without
the pass. (Values against PyTorch, finite differences and second order: tests/op_table.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
from needle import nn
from needle.apps.models import ResidualCNN
from needle.backend import parallel_loops
from needle.compiler import batchnorm_relu_pool_rewrite, fusion
from needle.core.ops_batchnorm_relu import BatchNormReluGrad
from needle.core.ops_batchnorm_relu_pool import BatchNormReluMaxPool2d, BatchNormReluMaxPool2dGrad
from needle.core.ops_elementwise import ReLU
from needle.core.ops_norm import BatchNorm
from needle.core.ops_pool import MaxPool2d, MaxPool2dScatter
from needle.kernels import batchnorm, bn_relu_pool, cpu_kernels

from .helpers import loops_that_ran

pytestmark = pytest.mark.skipif(not bn_relu_pool.takes((2, 8, 4, 4)),
                                reason="the kernels need numba")

AXES = (0, 2, 3)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


@pytest.fixture(params=["whole", "blocks", "prange"])
def path(request, monkeypatch):
    """How the passes run: one call (below the split size), serial row blocks of whole
    images, or those blocks on TBB's threads (sizes lowered so small arrays take them)."""
    if request.param != "whole":
        monkeypatch.setattr(cpu_kernels, "SPLIT_MIN_ELEMENTS", 1 << 14)
        monkeypatch.setattr(cpu_kernels, "BLOCK_ELEMENTS", 1 << 13)
    if request.param == "prange":
        if not parallel_loops.parallel_threads():
            pytest.skip("numba's parallel loops do not run here")
        monkeypatch.setattr(cpu_kernels, "PRANGE_MIN_ELEMENTS", 1 << 14)
    else:
        monkeypatch.setattr(cpu_kernels, "PRANGE_MIN_ELEMENTS", 1 << 40)
    return request.param


def _arrays(shape_nhwc: tuple, seed: int = 0):
    """(x, weight, bias, mean, var): NCHW views of NHWC memory as a conv makes them, with
    ties inside windows (column 1 repeats column 0), a NaN, signed zeros, and a channel
    whose weight and bias are 0 (its activation all zeros: every window tied)."""
    rng = np.random.default_rng(seed)
    n, h, w, c = shape_nhwc
    xh = (rng.standard_normal(shape_nhwc) * 2 + 0.3).astype(np.float32)
    xh[:, :, 1, :] = xh[:, :, 0, :]
    xh[0, 0, 0, :3] = (np.nan, 0.0, -0.0)
    x = xh.transpose(0, 3, 1, 2)
    weight = rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32)
    bias = rng.uniform(-1.0, 1.0, (1, c, 1, 1)).astype(np.float32)
    weight[0, 3] = bias[0, 3] = 0.0
    mean, var = batchnorm.statistics(x, AXES)
    return x, weight, bias, mean, var


def _activation(x, weight, bias, mean, var):
    return ReLU().compute(BatchNorm(AXES).compute(x, weight, bias, mean, var))


def _pool_gradient(rng, y):
    """A gradient for the pooled y, channels-last as the plans hand it over, with -0.0s."""
    g = rng.standard_normal(y.shape).astype(np.float32)
    g.reshape(-1)[:7] = -0.0
    return np.ascontiguousarray(g.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


# (8, 16, 16, 32): the blocks of 2**13 values are whole images (so are the four blocks of
# the others); (4, 17, 15, 33) leaves a row and a column out of the windows (the scatter
# zeroes them); (4, 17, 17, 30) with 3 x 3 windows at stride 2 overlaps them (it adds)
CASES = [((8, 16, 16, 32), 2, 2), ((4, 17, 15, 33), 2, 2), ((4, 17, 17, 30), 3, 2)]


@pytest.mark.parametrize("shape,k,stride", CASES)
def test_forward_gives_the_separate_ops_bits(monkeypatch, path, shape, k, stride):
    x, weight, bias, mean, var = _arrays(shape)
    want = MaxPool2d(k, stride).compute(_activation(x, weight, bias, mean, var))
    ran = loops_that_ran(monkeypatch, bn_relu_pool._loops, cpu_kernels._parallel)
    got = BatchNormReluMaxPool2d(k, stride).compute(x, weight, bias, mean, var)
    assert got.shape == want.shape and _bits(got) == _bits(want)
    assert got.transpose(0, 2, 3, 1).flags.c_contiguous  # (NHWC memory, as max_pool2d's)
    big = x.size >= cpu_kernels.SPLIT_MIN_ELEMENTS
    assert ran == (["_bn_relu_max_pool"] if path == "prange" and big else
                   ["bn_relu_max_pool_blocks"] if big else ["bn_relu_max_pool"])


@pytest.mark.parametrize("shape,k,stride", CASES)
def test_backward_gives_the_separate_ops_bits(monkeypatch, path, shape, k, stride):
    x, weight, bias, mean, var = _arrays(shape)
    y = MaxPool2d(k, stride).compute(_activation(x, weight, bias, mean, var))
    g = _pool_gradient(np.random.default_rng(1), y)
    scattered = MaxPool2dScatter(k, stride).compute(_activation(x, weight, bias, mean, var), y, g)
    want = BatchNormReluGrad(AXES).compute(scattered, x, weight, bias, mean, var)
    ran = loops_that_ran(monkeypatch, bn_relu_pool._loops, cpu_kernels._parallel)
    got = BatchNormReluMaxPool2dGrad(k, stride).compute(g, y, x, weight, bias, mean, var)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and _bits(a) == _bits(b)
    assert ran[:1] == (["_bn_relu_pool_grad_sums"]
                       if path == "prange" and x.size >= cpu_kernels.SPLIT_MIN_ELEMENTS
                       else ["bn_relu_pool_grad_sums_blocks"])


def test_backward_declines_blocks_that_split_an_image(monkeypatch, path):
    # 2**13-value blocks of (5, 12, 12, 24) rows cut images: the op runs the pair instead
    x, weight, bias, mean, var = _arrays((5, 12, 12, 24), seed=2)
    y = MaxPool2d(2, 2).compute(_activation(x, weight, bias, mean, var))
    g = _pool_gradient(np.random.default_rng(3), y)
    scattered = MaxPool2dScatter(2, 2).compute(_activation(x, weight, bias, mean, var), y, g)
    want = BatchNormReluGrad(AXES).compute(scattered, x, weight, bias, mean, var)
    ran = loops_that_ran(monkeypatch, bn_relu_pool._loops, cpu_kernels._parallel)
    got = BatchNormReluMaxPool2dGrad(2, 2).compute(g, y, x, weight, bias, mean, var)
    assert all(_bits(a) == _bits(b) for a, b in zip(got, want, strict=True))
    blocks = cpu_kernels.row_blocks(x.transpose(0, 2, 3, 1).reshape(-1, 24))
    if blocks is not None:
        assert not [name for name in ran if "bn_relu_pool" in name]


def _train(monkeypatch, enabled: bool, calls: int = 3):
    monkeypatch.setattr(batchnorm_relu_pool_rewrite, "ENABLED", enabled)
    monkeypatch.setattr(fusion, "FUSE_AFTER_CALLS", 2)  # the hot plan (fused regions) too
    rng = np.random.default_rng(0)
    x = ndl.Tensor(rng.standard_normal((16, 16, 16, 3)).astype(np.float32))
    y = ndl.Tensor(rng.integers(0, 10, 16))
    np.random.seed(0)
    model = ResidualCNN(3)
    opt = ndl.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.SoftmaxLoss()
    step = ndl.jit(lambda x, y: opt.minimize(loss_fn(model(x), y)))
    losses = [float(step(x, y).numpy()) for _ in range(calls)]
    passes = [p for p in step.lower(x, y).passes if p.startswith("batchnorm_relu_pool")]
    state = [np.asarray(v.numpy() if hasattr(v, "numpy") else v)
             for v in model.state_dict().values()]  # (running statistics too)
    return passes, losses, state


def test_jitted_residual_cnn_trains_bit_for_bit_as_without_the_rewrite(monkeypatch):
    # 16 images of 16 x 16: its three pooled layers' activations (16 x 16 x 16 x 16 ...
    # 16 x 128 x 4 x 4) are large enough for batchnorm_relu_rewrite (MIN_ELEMENTS)
    passes_off, losses_off, plain = _train(monkeypatch, False)
    ran = loops_that_ran(monkeypatch, bn_relu_pool._loops, cpu_kernels._parallel)
    passes_on, losses_on, fused = _train(monkeypatch, True)
    assert passes_off == ["batchnorm_relu_pool_rewrite (0 max_pool2d_scatter + "
                          "batch_norm_relu_grad pairs fused, 0 BatchNorm + ReLU outputs pooled "
                          "where they are made)"]
    assert passes_on == [passes_off[0].replace("(0", "(3").replace(", 0", ", 3")]
    assert {"bn_relu_max_pool", "bn_relu_pool_grad_sums_blocks"} <= set(ran)
    assert losses_on == losses_off
    assert len(plain) == len(fused)
    for a, b in zip(plain, fused, strict=True):
        assert _bits(a) == _bits(b)
