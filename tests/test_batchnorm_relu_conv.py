"""batch_norm_relu_conv_bias / batch_norm_relu_conv_weight_grad (core/ops_batchnorm_relu_conv.py)
and the JIT pass that uses them (compiler/batchnorm_relu_conv_rewrite.py): the direct loops
make relu(batch_norm(x)) per block of images and must give the bits of the separate ops, on
TBB's threads and serially; the rewritten jitted step must train bit for bit as the plain one.
(Values against PyTorch, finite differences and second order: tests/op_table.py's rows.)"""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
from needle import nn, ops
from needle.backend import parallel_loops
from needle.compiler import batchnorm_relu_conv_rewrite, fusion
from needle.kernels import conv, conv_bn_relu

from .helpers import loops_that_ran

pytestmark = pytest.mark.skipif(conv._direct_loops.module() is None,
                                reason="the direct loops need numba")


def _case(rng, shape, c_out):
    c = shape[3]
    x = (rng.standard_normal(shape) * 2 + 0.3).astype(np.float32)
    xn = x.transpose(0, 3, 1, 2)
    stats = [xn.mean(axis=(0, 2, 3), keepdims=True).astype(np.float32),
             xn.var(axis=(0, 2, 3), keepdims=True).astype(np.float32)]
    weight = (rng.standard_normal((1, c, 1, 1)) + 1).astype(np.float32)
    bias = rng.standard_normal((1, c, 1, 1)).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, c, c_out)) * 0.1).astype(np.float32)
    conv_bias = rng.standard_normal(c_out).astype(np.float32)
    return x, weight, bias, stats[0], stats[1], kernel, conv_bias


def _unfused(x, weight, bias, mean, var, kernel, conv_bias, g, stride=2):
    t = ndl.Tensor
    y = ops.relu(ops.batch_norm(ops.permute(t(x), (0, 3, 1, 2)), t(weight), t(bias), t(mean),
                                t(var), axes=(0, 2, 3), eps=1e-5))
    y = ops.permute(y, (0, 2, 3, 1))
    out = ops.conv_bias(y, t(kernel), t(conv_bias), stride=stride, padding=1).numpy()
    dw = ops.conv_weight_grad(y, t(g), kernel_hw=(3, 3), stride=stride, padding=1).numpy()
    return out, dw


def _fused(x, weight, bias, mean, var, kernel, conv_bias, g, stride=2):
    t = ndl.Tensor
    out = ops.batch_norm_relu_conv_bias(t(x), t(weight), t(bias), t(mean), t(var), t(kernel),
                                        t(conv_bias), eps=1e-5, stride=stride,
                                        padding=1).numpy()
    dw = ops.batch_norm_relu_conv_weight_grad(t(x), t(weight), t(bias), t(mean), t(var), t(g),
                                              kernel_hw=(3, 3), eps=1e-5, stride=stride,
                                              padding=1).numpy()
    return out, dw


@pytest.mark.parametrize("serial", [False, True])
@pytest.mark.parametrize("shape,c_out", [((8, 16, 16, 16), 32), ((5, 16, 18, 32), 64),
                                         ((3, 16, 20, 48), 16)])
def test_fused_ops_give_the_separate_ops_bits(monkeypatch, serial, shape, c_out):
    rng = np.random.default_rng(sum(shape) + c_out)
    x, weight, bias, mean, var, kernel, conv_bias = _case(rng, shape, c_out)
    ho, wo = (shape[1] + 1) // 2, (shape[2] + 1) // 2
    g = rng.standard_normal((shape[0], ho, wo, c_out)).astype(np.float32)
    want_out, want_dw = _unfused(x, weight, bias, mean, var, kernel, conv_bias, g)
    if serial:
        monkeypatch.setattr(parallel_loops, "tbb_layer", lambda: False)
    ran = loops_that_ran(monkeypatch, conv._direct_loops)
    out, dw = _fused(x, weight, bias, mean, var, kernel, conv_bias, g)
    ran = [name for name in ran if name != "sum_in_order"]  # (the kernel gradient's parts)
    assert np.array_equal(out, want_out) and np.array_equal(dw, want_dw)
    # the direct loops ran both (with numba's wrong input, x itself, the bits would differ)
    if serial or parallel_loops.parallel_threads() == 0:
        assert ran[0] in ("forward32", "forward16") and ran[-1].startswith("weight_grad")
    else:
        assert ran == ["_forward_blocks", "_weight_grad_blocks"]


@pytest.mark.parametrize("serial", [False, True])
@pytest.mark.parametrize("shape,c_out", [((4, 16, 16, 16), 32), ((2, 8, 8, 64), 128),
                                         ((3, 12, 10, 32), 64)])
def test_winograd_layers_give_the_separate_ops_bits(monkeypatch, serial, shape, c_out):
    """Stride 1: Winograd's transforms make the activation as they read the input tiles
    (the forward's blocks, and the kernel gradient's whole, chunked or float64 paths)."""
    rng = np.random.default_rng(sum(shape) + c_out)
    x, weight, bias, mean, var, kernel, conv_bias = _case(rng, shape, c_out)
    g = rng.standard_normal((*shape[:3], c_out)).astype(np.float32)
    want = _unfused(x, weight, bias, mean, var, kernel, conv_bias, g, stride=1)
    if serial:
        monkeypatch.setattr(parallel_loops, "tbb_layer", lambda: False)
    assert not conv_bn_relu.takes(x.shape, kernel.shape, 1, 1)  # (off by default)
    monkeypatch.setattr(conv_bn_relu, "WINOGRAD", True)
    assert conv_bn_relu.takes(x.shape, kernel.shape, 1, 1)
    assert conv_bn_relu.conv2d_bn_relu(x, weight, bias, mean, var, 1e-5, kernel, 1, 1,
                                       conv_bias) is not None
    got = _fused(x, weight, bias, mean, var, kernel, conv_bias, g, stride=1)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_kernels_decline_what_they_do_not_take():
    rng = np.random.default_rng(3)
    x, weight, bias, mean, var, kernel, conv_bias = _case(rng, (4, 16, 16, 16), 32)
    assert conv_bn_relu.takes(x.shape, kernel.shape, 2, 1)
    # float64, a non-contiguous x: None (the op then runs the separate computations)
    assert conv_bn_relu.conv2d_bn_relu(x.astype(np.float64), weight, bias, mean, var, 1e-5,
                                       kernel, 2, 1, conv_bias) is None
    assert conv_bn_relu.conv2d_bn_relu(x.transpose(0, 2, 1, 3), weight, bias, mean, var, 1e-5,
                                       kernel, 2, 1, conv_bias) is None
    # a stride-2 layer the direct loops do not take (80 output channels), a small map
    assert not conv_bn_relu.takes((4, 16, 16, 16), (3, 3, 16, 80), 2, 1)
    assert not conv_bn_relu.takes((4, 16, 8, 16), (3, 3, 16, 32), 2, 1)


class _StridedCNN(nn.Module):
    """conv(3->16), conv(16->32, stride 2), conv(32->64, stride 2), each BN + ReLU; mean;
    linear (benchmarks/cnn_step.py's strided model)."""

    def __init__(self, strides=(1, 2, 2)) -> None:
        super().__init__()
        layers = []
        for c_in, c_out, s in zip((3, 16, 32), (16, 32, 64), strides):
            layers += [nn.Conv(c_in, c_out, 3, stride=s), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(ops.mean(self.features(x), axes=(2, 3)))


def _train(monkeypatch, enabled: bool, strides=(1, 2, 2), calls: int = 3):
    monkeypatch.setattr(batchnorm_relu_conv_rewrite, "ENABLED", enabled)
    monkeypatch.setattr(fusion, "FUSE_AFTER_CALLS", 2)  # the hot plan (fused regions) too
    rng = np.random.default_rng(0)
    x = ndl.Tensor(rng.standard_normal((4, 3, 32, 32)).astype(np.float32))
    y = ndl.Tensor(rng.integers(0, 10, 4))
    np.random.seed(0)
    model = _StridedCNN(strides)
    opt = ndl.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.SoftmaxLoss()
    step = ndl.jit(lambda x, y: opt.minimize(loss_fn(model(x), y)))
    for _ in range(calls):
        step(x, y)
    passes = [p for p in step.lower(x, y).passes if p.startswith("batchnorm_relu_conv")]
    state = [np.asarray(v.numpy() if hasattr(v, "numpy") else v)
             for v in model.state_dict().values()]  # (running statistics too)
    return passes, state


@pytest.mark.parametrize("strides", [(1, 2, 2), (1, 1, 1)])
def test_jitted_cnn_trains_bit_for_bit_as_without_the_rewrite(monkeypatch, strides):
    monkeypatch.setattr(conv_bn_relu, "WINOGRAD", True)  # (strides 1,1,1: Winograd's layers)
    passes_off, plain = _train(monkeypatch, False, strides)
    passes_on, fused = _train(monkeypatch, True, strides)
    assert passes_off[0].startswith("batchnorm_relu_conv_rewrite (0 ")
    assert passes_on[0].startswith("batchnorm_relu_conv_rewrite (2 ")
    assert len(plain) == len(fused)
    for a, b in zip(plain, fused):
        assert np.array_equal(a, b)


def test_rewrite_leaves_winograd_layers_alone_by_default(monkeypatch):
    passes, _ = _train(monkeypatch, True, strides=(1, 1, 1), calls=1)
    assert passes[0].startswith("batchnorm_relu_conv_rewrite (0 ")


def test_rewrite_leaves_an_activation_read_by_a_pool_alone(monkeypatch):
    from needle.apps.models import ResidualCNN

    rng = np.random.default_rng(0)
    x = ndl.Tensor(rng.standard_normal((2, 16, 16, 3)).astype(np.float32))
    y = ndl.Tensor(rng.integers(0, 10, 2))
    model = ResidualCNN(3)
    opt = ndl.optim.Adam(model.parameters(), lr=1e-3)
    step = ndl.jit(lambda x, y: opt.minimize(nn.SoftmaxLoss()(model(x), y)))
    passes = [p for p in step.lower(x, y).passes if p.startswith("batchnorm_relu_conv")]
    assert passes[0].startswith("batchnorm_relu_conv_rewrite (0 ")
