"""Eager CNN blocks run BatchNorm2d and the ReLU after it as one ``batch_norm_relu`` node
(nn.Sequential, apps.models.ConvBN): the same values, gradients and running statistics, bit
for bit, as the two modules called one after the other."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
from needle import nn
from needle.apps.models import ConvBN


def _cnn() -> nn.Sequential:
    np.random.seed(0)
    return nn.Sequential(nn.Conv(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU())


def _step(model, forward, images: np.ndarray, seed: np.ndarray) -> list[np.ndarray]:
    """One forward and backward: the output, every gradient and buffer afterwards."""
    out = forward(ndl.Tensor(images))
    (out * ndl.Tensor(seed)).sum().backward()
    return [out.numpy(), *(p.grad.numpy() for p in model.parameters()),
            *(b.numpy().copy() for b in model.buffers())], out


def _one_by_one(model: nn.Sequential):
    def forward(x):
        for module in model.modules:
            x = module(x)
        return x
    return forward


def _assert_same_bits(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert np.array_equal(np.ascontiguousarray(u).view(np.uint8),
                              np.ascontiguousarray(v).view(np.uint8))


def test_sequential_runs_batchnorm2d_relu_as_one_node_with_the_same_bits():
    rng = np.random.default_rng(1)
    images = rng.standard_normal((4, 3, 12, 12)).astype(np.float32)
    fused_model, plain_model = _cnn(), _cnn()
    seed = rng.standard_normal((4, 16, 6, 6)).astype(np.float32)
    fused, out = _step(fused_model, fused_model, images, seed)
    plain, plain_out = _step(plain_model, _one_by_one(plain_model), images, seed)
    assert out.op.name == "batch_norm_relu"
    assert plain_out.op.name == "relu"
    _assert_same_bits(fused, plain)


def test_conv_bn_block_fuses_its_pair_with_the_same_bits():
    rng = np.random.default_rng(2)
    images = rng.standard_normal((3, 4, 9, 9)).astype(np.float32)
    seed = rng.standard_normal((3, 6, 9, 9)).astype(np.float32)
    np.random.seed(3)
    fused_block = ConvBN(4, 6)
    np.random.seed(3)
    plain_block = ConvBN(4, 6)
    fused, out = _step(fused_block, fused_block, images, seed)
    plain, _ = _step(plain_block, lambda x: plain_block.relu(plain_block.bn(plain_block.conv(x))),
                     images, seed)
    assert out.op.name == "batch_norm_relu"
    _assert_same_bits(fused, plain)


@pytest.mark.parametrize("case", ["eval", "batchnorm1d", "other_activation"])
def test_the_pair_runs_as_two_modules_where_fusion_does_not_apply(case):
    np.random.seed(0)
    if case == "batchnorm1d":
        model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU())
        x = ndl.Tensor(np.random.randn(6, 5).astype(np.float32))
    else:
        last = nn.Tanh() if case == "other_activation" else nn.ReLU()
        model = nn.Sequential(nn.Conv(3, 4, 3), nn.BatchNorm2d(4), last)
        x = ndl.Tensor(np.random.randn(2, 3, 6, 6).astype(np.float32))
    if case == "eval":
        model.eval()
    out = model(x)
    assert out.op.name == ("tanh" if case == "other_activation" else "relu")


def test_a_jit_trace_sees_batch_norm_and_relu_and_matches_eager():
    """Under ndl.jit the pair stays two ops (the compiler's rewrites fuse them there); the
    jitted step computes what the eager one does."""
    rng = np.random.default_rng(4)
    images = rng.standard_normal((4, 3, 12, 12)).astype(np.float32)
    seen: list[str] = []
    eager_model, jit_model = _cnn(), _cnn()

    def step(model):
        def run(x):
            out = model(x)
            seen.append(out.op.name)
            return (out * out).sum()
        return run

    eager = step(eager_model)(ndl.Tensor(images))
    traced = ndl.jit(step(jit_model))(ndl.Tensor(images))
    assert seen == ["batch_norm_relu", "relu"]
    np.testing.assert_allclose(traced.numpy(), eager.numpy(), rtol=1e-5)


def test_a_non_tensor_input_gets_the_modules_own_error():
    """An array where a Tensor belongs fails as it does without the fused path: one clear
    TypeError naming the op, not an AttributeError from the fusion's checks."""
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    with pytest.raises(TypeError, match="batch_stats: expected Tensor inputs, got ndarray"):
        model(np.ones((2, 3, 4, 4), np.float32))
