"""batch_norm_relu_mean (core/ops_batchnorm_relu_mean.py) and the JIT pass that uses it
(compiler/batchnorm_relu_mean_rewrite.py): the kernel makes relu(batch_norm(x)) where it
averages it and must give the bits of batch_norm, relu and mean, on TBB's threads and
serially; the rewritten jitted step must train bit for bit as the plain one. (Values against
PyTorch, finite differences and second order: tests/op_table.py's row.)"""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
from needle import nn, ops
from needle.backend import parallel_loops
from needle.compiler import batchnorm_relu_mean_rewrite, fusion
from needle.kernels import bn_relu_mean

from .helpers import loops_that_ran

pytestmark = pytest.mark.skipif(not bn_relu_mean.takes((64, 8, 8, 64)),
                                reason="the kernel needs numba")


def _case(rng, shape):
    c = shape[3]
    x = (rng.standard_normal(shape) * 2 + 0.3).astype(np.float32)
    xn = x.transpose(0, 3, 1, 2)
    mean = xn.mean(axis=(0, 2, 3), keepdims=True).astype(np.float32)
    var = xn.var(axis=(0, 2, 3), keepdims=True).astype(np.float32)
    weight = (rng.standard_normal((1, c, 1, 1)) + 1).astype(np.float32)
    bias = rng.standard_normal((1, c, 1, 1)).astype(np.float32)
    return x, weight, bias, mean, var


def _unfused(x, weight, bias, mean, var):
    t = ndl.Tensor
    y = ops.batch_norm(ops.permute(t(x), (0, 3, 1, 2)), t(weight), t(bias), t(mean), t(var),
                       axes=(0, 2, 3), eps=1e-5)
    return ops.mean(ops.relu(y), (2, 3)).numpy()


def _fused(x, weight, bias, mean, var):
    t = ndl.Tensor
    return ops.batch_norm_relu_mean(t(x), t(weight), t(bias), t(mean), t(var),
                                    eps=1e-5).numpy()


@pytest.mark.parametrize("serial", [False, True])
@pytest.mark.parametrize("shape", [(64, 8, 8, 64), (5, 9, 7, 80), (3, 32, 32, 20),
                                   (17, 32, 31, 64)])
def test_fused_op_gives_the_separate_ops_bits(monkeypatch, serial, shape):
    rng = np.random.default_rng(sum(shape))
    args = _case(rng, shape)
    args[0][0, 0, 0, :3] = (np.nan, 0.0, -0.0)  # (NaN kept by ReLU, as np.maximum keeps it)
    want = _unfused(*args)
    if serial:
        monkeypatch.setattr(parallel_loops, "tbb_layer", lambda: False)
    ran = loops_that_ran(monkeypatch, bn_relu_mean._loops)
    got = _fused(*args)
    assert got.shape == (shape[0], shape[3]) and got.dtype == np.float32
    assert np.array_equal(got, want, equal_nan=True)
    if (serial or parallel_loops.parallel_threads() == 0
            or np.prod(shape) < bn_relu_mean.PRANGE_MIN_ELEMENTS):
        assert ran == ["bn_relu_mean_rows"]
    else:
        assert ran == ["_bn_relu_mean_images"]


def test_small_arrays_take_the_ops_own_computations(monkeypatch):
    # below reduce.EINSUM_MIN_SIZE the unfused mean is np.add.reduce: the kernel declines
    args = _case(np.random.default_rng(1), (2, 4, 4, 8))
    assert not bn_relu_mean.takes((2, 4, 4, 8))
    ran = loops_that_ran(monkeypatch, bn_relu_mean._loops)
    assert np.array_equal(_fused(*args), _unfused(*args)) and ran == []


class _CNN(nn.Module):
    """benchmarks/cnn_step.py's model: three conv + BN + ReLU layers, mean over H, W, linear."""

    def __init__(self, strides) -> None:
        super().__init__()
        layers = []
        for c_in, c_out, s in zip((3, 16, 32), (16, 32, 64), strides):
            layers += [nn.Conv(c_in, c_out, 3, stride=s), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(ops.mean(self.features(x), axes=(2, 3)))


def _train(monkeypatch, enabled: bool, strides, batch: int, calls: int = 3):
    monkeypatch.setattr(batchnorm_relu_mean_rewrite, "ENABLED", enabled)
    monkeypatch.setattr(fusion, "FUSE_AFTER_CALLS", 2)  # the hot plan (fused regions) too
    rng = np.random.default_rng(0)
    x = ndl.Tensor(rng.standard_normal((batch, 3, 16, 16)).astype(np.float32))
    y = ndl.Tensor(rng.integers(0, 10, batch))
    np.random.seed(0)
    model = _CNN(strides)
    opt = ndl.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.SoftmaxLoss()
    step = ndl.jit(lambda x, y: opt.minimize(loss_fn(model(x), y)))
    losses = [float(step(x, y).numpy()) for _ in range(calls)]
    passes = [p for p in step.lower(x, y).passes if p.startswith("batchnorm_relu_mean")]
    state = [np.asarray(v.numpy() if hasattr(v, "numpy") else v)
             for v in model.state_dict().values()]  # (running statistics too)
    return passes, losses, state


# the last layer's activation must be large enough for batchnorm_relu_rewrite (MIN_ELEMENTS)
@pytest.mark.parametrize("strides,batch", [((1, 2, 1), 32), ((1, 1, 1), 4)])
def test_jitted_cnn_trains_bit_for_bit_as_without_the_rewrite(monkeypatch, strides, batch):
    passes_off, losses_off, plain = _train(monkeypatch, False, strides, batch)
    passes_on, losses_on, fused = _train(monkeypatch, True, strides, batch)
    assert passes_off == ["batchnorm_relu_mean_rewrite (0 BatchNorm + ReLU outputs averaged "
                          "where they are made)"]
    assert passes_on[0].startswith("batchnorm_relu_mean_rewrite (1 ")
    assert losses_on == losses_off
    assert len(plain) == len(fused)
    for a, b in zip(plain, fused):
        assert np.array_equal(a, b)
