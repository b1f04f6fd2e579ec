"""nn.Conv, nn.MaxPool2d, nn.AvgPool2d against PyTorch; ops.conv against finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import needle as ndl
import needle.nn as nn

from .helpers import check_gradient_fd

ATOL, RTOL = 2e-5, 1e-4


def _close(ours, theirs, atol=ATOL, rtol=RTOL) -> None:
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    np.testing.assert_allclose(ours.numpy(), theirs, atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    "c_in, c_out, k, stride, bias, h, w",
    [
        (3, 4, 3, 1, True, 6, 6),
        (3, 4, 3, 2, True, 7, 7),   # odd size, stride 2
        (2, 3, 3, 2, False, 8, 5),  # even/odd sizes, no bias
        (2, 3, 4, 1, True, 6, 5),   # even kernel: output grows by one
        (2, 3, 4, 2, False, 7, 6),
        (3, 2, 1, 1, True, 4, 4),   # 1x1 kernel, no padding
    ],
)
def test_conv_matches_torch(c_in, c_out, k, stride, bias, h, w):
    rng = np.random.default_rng(0)
    conv = nn.Conv(c_in, c_out, k, stride=stride, bias=bias)
    x = rng.standard_normal((2, c_in, h, w)).astype(np.float32)
    X = ndl.Tensor(x)
    out = conv(X)

    tx = torch.tensor(x, requires_grad=True)
    # needle (k, k, in, out) -> torch (out, in, k, k)
    tw = torch.tensor(conv.weight.numpy().transpose(3, 2, 0, 1).copy(), requires_grad=True)
    tb = torch.tensor(conv.bias.numpy(), requires_grad=True) if bias else None
    tout = TF.conv2d(tx, tw, tb, stride=stride, padding=k // 2)
    assert out.shape == tuple(tout.shape)
    _close(out, tout)

    g = rng.standard_normal(out.shape).astype(np.float32)
    (out * ndl.Tensor(g)).sum().backward()
    (tout * torch.tensor(g)).sum().backward()
    _close(X.grad, tx.grad)
    _close(conv.weight.grad, tw.grad.numpy().transpose(2, 3, 1, 0))
    if bias:
        _close(conv.bias.grad, tb.grad)
    assert conv.weight.grad.shape == conv.weight.shape


def test_conv_init_draw_order_and_bounds():
    c_in, c_out, k = 3, 5, 3
    np.random.seed(4)
    conv = nn.Conv(c_in, c_out, k)
    np.random.seed(4)
    fan_in = c_in * k * k
    w_bound = math.sqrt(2) * math.sqrt(3 / fan_in)
    weight = np.random.rand(k, k, c_in, c_out) * 2 * w_bound - w_bound
    b_bound = 1 / math.sqrt(fan_in)
    bias = np.random.rand(c_out) * 2 * b_bound - b_bound
    assert conv.weight.dtype == np.float32 and conv.bias.dtype == np.float32
    np.testing.assert_allclose(conv.weight.numpy(), weight, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(conv.bias.numpy(), bias, rtol=1e-6, atol=1e-7)
    assert [name for name, _ in conv.named_parameters()] == ["weight", "bias"]
    assert nn.Conv(c_in, c_out, k, bias=False).parameters()[0].shape == (k, k, c_in, c_out)


def test_conv_rejects_wrong_channels():
    conv = nn.Conv(3, 4, 3)
    with pytest.raises(ValueError, match="3 channels"):
        conv(ndl.Tensor(np.zeros((1, 2, 5, 5), dtype=np.float32)))


@pytest.mark.parametrize("stride, padding, k", [(2, 1, 3), (2, 2, 4), (3, 1, 2)])
def test_conv_op_gradient_finite_differences(stride, padding, k):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 7, 6, 3))
    b = rng.standard_normal((k, k, 3, 2))
    check_gradient_fd(lambda x, w: ndl.conv(x, w, stride=stride, padding=padding), [a, b], rng)


@pytest.mark.parametrize("hw", [5, 1, 16])  # NHWC product; a 1x1 map; per-image NCHW products
@pytest.mark.parametrize("stride, padding, k", [(1, 1, 3), (2, 1, 3), (2, 0, 1), (1, 0, 1)])
@pytest.mark.parametrize("channels_first", [False, True])
def test_conv_primitives_on_every_layout_path(hw, stride, padding, k, channels_first):
    """Each primitive's result matches torch on every path (NHWC, an NCHW array seen through
    a permute, small and large maps) and stays as it is when the op runs again: no result may
    share memory with the op's internals or with a later call."""
    shape = (2, 3, hw, hw) if channels_first else (2, hw, hw, 3)

    def nhwc(array):  # the NHWC view nn.Conv passes, or a plain NHWC array
        return array.transpose(0, 2, 3, 1) if channels_first else array

    def results(seed):
        r = np.random.default_rng(seed)
        a = nhwc(r.standard_normal(shape).astype(np.float32))
        b = r.standard_normal((k, k, 3, 4)).astype(np.float32)
        y = ndl.ops.conv(ndl.Tensor(a), ndl.Tensor(b), stride=stride, padding=padding).numpy()
        g = nhwc(r.standard_normal((2, 4) + y.shape[1:3]).astype(np.float32)) \
            if channels_first else r.standard_normal(y.shape).astype(np.float32)
        wg = ndl.ops.conv_weight_grad(ndl.Tensor(a), ndl.Tensor(g), kernel_hw=(k, k),
                                      stride=stride, padding=padding).numpy()
        xg = ndl.ops.conv_input_grad(ndl.Tensor(g), ndl.Tensor(b), stride=stride,
                                     padding=padding, in_hw=(hw, hw)).numpy()
        ta = torch.tensor(np.ascontiguousarray(a.transpose(0, 3, 1, 2)), requires_grad=True)
        tb = torch.tensor(np.ascontiguousarray(b.transpose(3, 2, 0, 1)), requires_grad=True)
        ty = TF.conv2d(ta, tb, stride=stride, padding=padding)
        ty.backward(torch.tensor(np.ascontiguousarray(g.transpose(0, 3, 1, 2))))
        expected = [ty.detach().numpy().transpose(0, 2, 3, 1),
                    tb.grad.numpy().transpose(2, 3, 1, 0), ta.grad.numpy().transpose(0, 2, 3, 1)]
        return [y, wg, xg], expected

    first, expected = results(1)
    kept = [x.copy() for x in first]
    results(2)  # the same shapes again, other values
    for got, copy, want in zip(first, kept, expected):
        np.testing.assert_array_equal(got, copy)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel, stride", [(2, None), (3, None), (3, 2), (2, 1), (3, 1)])
@pytest.mark.parametrize("pool, reference", [(nn.MaxPool2d, TF.max_pool2d),
                                             (nn.AvgPool2d, TF.avg_pool2d)])
def test_pool_matches_torch(pool, reference, kernel, stride):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 7, 8)).astype(np.float32)  # 7 and 8: windows leave a rim
    X = ndl.Tensor(x)
    out = pool(kernel, stride)(X)
    tx = torch.tensor(x, requires_grad=True)
    tout = reference(tx, kernel, stride)
    assert out.shape == tuple(tout.shape)
    _close(out, tout)
    g = rng.standard_normal(out.shape).astype(np.float32)
    (out * ndl.Tensor(g)).sum().backward()
    (tout * torch.tensor(g)).sum().backward()
    _close(X.grad, tx.grad)


def test_max_pool_ties_give_the_gradient_to_the_first_maximum_as_torch():
    """Equal values in a window: all of its gradient goes to the first (row-major), as in
    torch (needle's old pairwise-maximum pool split it among them)."""
    x = np.ones((1, 1, 2, 4), dtype=np.float32)
    x[0, 0, 1, 3] = 0.5
    g = np.array([[[[4.0, 8.0]]]], dtype=np.float32)
    X = ndl.Tensor(x)
    out = nn.MaxPool2d(2)(X)
    out.backward(ndl.Tensor(g))
    tx = torch.tensor(x, requires_grad=True)
    torch.nn.functional.max_pool2d(tx, 2).backward(torch.tensor(g))
    np.testing.assert_array_equal(out.numpy(), np.ones((1, 1, 1, 2)))
    np.testing.assert_array_equal(X.grad.numpy(), tx.grad.numpy())
    np.testing.assert_array_equal(X.grad.numpy(), [[[[4, 0, 8, 0], [0, 0, 0, 0]]]])


def test_pool_rejects_small_input():
    with pytest.raises(ValueError, match="larger than the input"):
        nn.MaxPool2d(3)(ndl.Tensor(np.zeros((1, 1, 2, 2), dtype=np.float32)))


def test_small_cnn_trains_end_to_end():
    """Conv -> ReLU -> MaxPool -> global mean pool: gradients reach every parameter."""
    np.random.seed(0)
    conv1, conv2 = nn.Conv(1, 4, 3), nn.Conv(4, 6, 3, stride=2)
    x = ndl.Tensor(np.random.randn(2, 1, 8, 8).astype(np.float32))
    y = nn.MaxPool2d(2)(ndl.relu(conv1(x)))
    y = ndl.mean(conv2(y), axes=(2, 3))
    assert y.shape == (2, 6)
    y.sum().backward()
    for p in [*conv1.parameters(), *conv2.parameters()]:
        assert p.grad is not None and p.grad.shape == p.shape
        assert np.abs(p.grad.numpy()).sum() > 0


def test_conv_and_pools_run_on_a_declared_graph():
    """Only ops are used, so the layers build lazy graphs (batch size unknown) too."""
    st = pytest.importorskip("needle.static")
    np.random.seed(1)
    conv, max_pool, avg_pool = nn.Conv(2, 3, 3, stride=2), nn.MaxPool2d(2), nn.AvgPool2d(3, 2)
    x = np.random.randn(2, 2, 9, 9).astype(np.float32)
    expected = [f(ndl.Tensor(x)).numpy() for f in (conv, max_pool, avg_pool)]
    with st.Graph():
        X = st.placeholder((None, 2, 9, 9))
        got = st.Session().run([conv(X), max_pool(X), avg_pool(X)], feed_dict={X: x})
    for value, reference in zip(got, expected):
        np.testing.assert_allclose(value, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_cnn_at_full_size_matches_torch(train):
    """A CNN large enough for the channels-last fast paths (conv results stored NHWC, BatchNorm
    statistics and adjoints on channel matrices, the bias add as rows): loss, input gradient
    and every parameter gradient against torch with the same weights."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, 8)
    np.random.seed(3)
    layers = [nn.Conv(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
              nn.Conv(16, 32, 3, stride=2), nn.BatchNorm2d(32), nn.ReLU()]
    features, head = nn.Sequential(*layers), nn.Linear(32, 10)
    t_layers = [torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.BatchNorm2d(32),
                torch.nn.ReLU()]
    for ours, theirs in zip(layers, t_layers):
        if isinstance(ours, nn.Conv):
            theirs.weight.data = torch.tensor(ours.weight.numpy().transpose(3, 2, 0, 1).copy())
            theirs.bias.data = torch.tensor(ours.bias.numpy().copy())
    t_head = torch.nn.Linear(32, 10)
    t_head.weight.data = torch.tensor(head.weight.numpy().T.copy())
    t_head.bias.data = torch.tensor(head.bias.numpy().reshape(-1).copy())
    for m in (*layers, head):
        m.train(train)
    for m in (*t_layers, t_head):
        m.train(train)

    X = ndl.Tensor(x)
    loss = nn.SoftmaxLoss()(head(ndl.ops.mean(features(X), axes=(2, 3))), ndl.Tensor(labels))
    loss.backward()
    tx = torch.tensor(x, requires_grad=True)
    t_feat = torch.nn.Sequential(*t_layers)(tx)
    t_loss = TF.cross_entropy(t_head(t_feat.mean(dim=(2, 3))), torch.tensor(labels))
    t_loss.backward()
    np.testing.assert_allclose(loss.numpy(), t_loss.item(), rtol=1e-5)
    _close(X.grad, tx.grad, atol=1e-6, rtol=1e-3)
    for ours, theirs in zip(layers, t_layers):
        if isinstance(ours, nn.Conv):
            _close(ours.weight.grad, theirs.weight.grad.permute(2, 3, 1, 0), atol=1e-5,
                   rtol=1e-3)
            _close(ours.bias.grad, theirs.bias.grad, atol=1e-5, rtol=1e-3)
        if isinstance(ours, nn.BatchNorm2d):
            _close(ours.weight.grad, theirs.weight.grad, atol=1e-5, rtol=1e-3)
            _close(ours.bias.grad, theirs.bias.grad, atol=1e-5, rtol=1e-3)
