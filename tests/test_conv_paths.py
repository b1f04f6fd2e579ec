"""Which im2col path kernels/conv.py takes, and that each gives the float64 result.

A first layer's input has 1 or 3 channels. Stored NHWC (ResidualCNN's images), its NHWC
im2col would copy runs of only kw * C values, so it is read by the NCHW im2col instead
(``_use_nchw``); these tests pin that choice and check the results against float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from needle.backend import cpu_threads
from needle.core.ops_conv import Conv, ConvInputGrad, ConvWeightGrad
from needle.kernels import conv as conv_kernels


@pytest.fixture(autouse=True)
def _im2col_paths(monkeypatch):
    """The im2col paths under test, not the direct loops (tests/test_conv_direct.py)."""
    monkeypatch.setattr(conv_kernels, "DIRECT_ENABLED", False)


def _problem(n, hw, c_in, c_out, stride, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, hw, hw, c_in)).astype(np.float32)  # NHWC memory
    kernel = (rng.standard_normal((3, 3, c_in, c_out)) / np.sqrt(9 * c_in)).astype(np.float32)
    ho = conv_kernels._out_size(hw, 3, stride, 1)
    g = rng.standard_normal((n, ho, ho, c_out)).astype(np.float32)
    return x, kernel, g


def _torch_reference(x, kernel, g, stride):
    """conv, conv_input_grad and conv_weight_grad from PyTorch in float64, NHWC out."""
    tx = torch.from_numpy(x.astype(np.float64).transpose(0, 3, 1, 2).copy()).requires_grad_()
    tw = torch.from_numpy(kernel.astype(np.float64).transpose(3, 2, 0, 1).copy())
    tw.requires_grad_()
    out = torch.nn.functional.conv2d(tx, tw, stride=stride, padding=1)
    out.backward(torch.from_numpy(g.astype(np.float64).transpose(0, 3, 1, 2).copy()))
    return (out.detach().numpy().transpose(0, 2, 3, 1), tx.grad.numpy().transpose(0, 2, 3, 1),
            tw.grad.numpy().transpose(2, 3, 1, 0))


def _ours(x, kernel, g, stride):
    return (Conv(stride, 1).compute(x, kernel),
            ConvInputGrad(stride, 1, x.shape[1:3]).compute(g, kernel),
            ConvWeightGrad((3, 3), stride, 1).compute(x, g))


@pytest.mark.parametrize("c_in, stride", [(1, 1), (3, 1), (3, 2), (4, 1)])
def test_few_channel_nhwc_input_takes_the_nchw_im2col_and_matches_torch(c_in, stride,
                                                                         monkeypatch):
    x, kernel, g = _problem(3, 33, c_in, 8, stride)
    calls = []
    original = conv_kernels._im2col_nchw
    monkeypatch.setattr(conv_kernels, "_im2col_nchw",
                        lambda *a: calls.append(a[0].shape) or original(*a))
    got = _ours(x, kernel, g, stride)
    assert len(calls) == 2  # conv and conv_weight_grad (conv_input_grad scatters, no im2col)
    for ours, exact in zip(got, _torch_reference(x, kernel, g, stride)):
        assert ours.dtype == np.float32 and ours.shape == exact.shape
        np.testing.assert_allclose(ours, exact, rtol=0, atol=2e-6 * np.abs(exact).max())


def test_more_channels_keep_the_nhwc_im2col(monkeypatch):
    x, kernel, g = _problem(2, 20, conv_kernels.NCHW_MAX_CHANNELS + 1, 6, 2)
    monkeypatch.setattr(conv_kernels, "_im2col_nchw", lambda *a: pytest.fail("NCHW path"))
    for ours, exact in zip(_ours(x, kernel, g, 2), _torch_reference(x, kernel, g, 2)):
        np.testing.assert_allclose(ours, exact, rtol=0, atol=2e-6 * np.abs(exact).max())


@pytest.mark.skipif(cpu_threads.blas_control() is None, reason="threadpoolctl is not installed")
def test_few_channel_path_split_by_images_matches_the_whole(monkeypatch):
    x, kernel, g = _problem(7, 20, 3, 8, 1)
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 1)
    whole = _ours(x, kernel, g, 1)
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 3)
    monkeypatch.setattr(conv_kernels, "SPLIT_MIN_MACS", 0)
    split = _ours(x, kernel, g, 1)
    np.testing.assert_array_equal(split[0], whole[0])  # rows of the same product
    np.testing.assert_allclose(split[2], whole[2], rtol=1e-5, atol=1e-5)  # summed per chunk
