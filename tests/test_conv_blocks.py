"""The convolution kernels' blocks and splits (kernels/conv.py): results that do not depend on
how the images are cut up.

- the compiled NCHW im2col (cpu_kernels.im2col_channels_first) builds NumPy's NCHW patch
  matrix bit for bit, so a first layer (NCHW memory, 3 channels) convolves and takes its
  kernel gradient as the NumPy path does;
- conv_weight_grad gives the same bits on 1, 2 and 3 threads (its partial sums follow blocks
  fixed by the shapes), with and without numba, and agrees with PyTorch;
- conv_input_grad's product + scatter in blocks of images gives one product's bits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from needle.backend import cpu_threads
from needle.kernels import conv as conv_kernels
from needle.kernels import cpu_kernels


@pytest.fixture(autouse=True)
def _im2col_paths(monkeypatch):
    """The im2col paths under test, not the direct loops (tests/test_conv_direct.py)."""
    monkeypatch.setattr(conv_kernels, "DIRECT_ENABLED", False)

needs_numba = pytest.mark.skipif(not cpu_kernels.enabled(np.float32),
                                 reason="numba is not installed or NEEDLE_NUMBA=0")


class _NumPyKernels:
    """cpu_kernels as conv.py sees it with both compiled im2cols unavailable."""

    def __getattr__(self, name):
        return getattr(cpu_kernels, name)

    @staticmethod
    def im2col(*args):
        return None

    @staticmethod
    def im2col_channels_first(*args):
        return None


def _numpy_im2col(monkeypatch):
    monkeypatch.setattr(conv_kernels, "cpu_kernels", _NumPyKernels())


# (N, C, H, W, k, stride, padding)
NCHW_SHAPES = [(2, 3, 9, 9, 3, 1, 1), (2, 2, 7, 9, 3, 2, 1), (3, 4, 8, 8, 3, 2, 0),
               (2, 1, 12, 12, 5, 1, 2), (3, 2, 6, 7, 3, 3, 2), (2, 3, 5, 5, 3, 1, 3)]


@needs_numba
@pytest.mark.parametrize("shape", NCHW_SHAPES, ids=[str(s) for s in NCHW_SHAPES])
@pytest.mark.parametrize("ones", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nchw_patches_are_numpys_bit_for_bit(shape, ones, dtype, monkeypatch):
    n, c, h, w, k, s, p = shape
    x = np.random.default_rng(0).standard_normal((n, c, h, w)).astype(dtype)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    compiled = cpu_kernels.im2col_channels_first(x, k, k, s, p, ho, wo, ones)
    buffer = np.full(compiled.shape, np.nan, dtype)
    assert cpu_kernels.im2col_channels_first(x, k, k, s, p, ho, wo, ones, buffer) is buffer
    through_conv, dims = conv_kernels._im2col_nchw(x.transpose(0, 2, 3, 1), k, k, s, p, ones)
    _numpy_im2col(monkeypatch)
    reference, _ = conv_kernels._im2col_nchw(x.transpose(0, 2, 3, 1), k, k, s, p, ones)
    assert compiled is not None and dims == (ho, wo) and compiled.dtype == reference.dtype
    np.testing.assert_array_equal(compiled, reference)
    np.testing.assert_array_equal(buffer, reference)
    np.testing.assert_array_equal(through_conv, reference)


@needs_numba
def test_nchw_patches_refuse_strided_input():
    """NHWC memory seen as NCHW is left to NumPy (read through its strides the loop was
    slower than NumPy's copies)."""
    x = np.zeros((2, 5, 5, 3), np.float32).transpose(0, 3, 1, 2)
    assert cpu_kernels.im2col_channels_first(x, 3, 3, 1, 1, 5, 5) is None


def _torch_grads(x, w, g, stride, padding):
    """PyTorch's kernel and input gradients of conv2d for NHWC x, g and (kh, kw, C, C_out) w."""
    tx = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
    tw = torch.tensor(w).permute(3, 2, 0, 1).requires_grad_()
    torch.nn.functional.conv2d(tx, tw, stride=stride, padding=padding).backward(
        torch.tensor(g).permute(0, 3, 1, 2))
    return tw.grad.permute(2, 3, 1, 0).numpy(), tx.grad.permute(0, 2, 3, 1).numpy()


@needs_numba
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block_bytes", [1, 1 << 16, conv_kernels.IM2COL_BLOCK_BYTES])
def test_first_layer_compiled_patches_bit_for_bit(threads, block_bytes, monkeypatch):
    """A first layer on NCHW images (nn.Conv's permute, 3 channels): conv and its kernel
    gradient with the compiled NCHW im2col, in blocks of 1, 2 or all 6 images that reuse one
    patch buffer, give the NumPy path's bits (all images at once)."""
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", threads)
    monkeypatch.setattr(conv_kernels, "SPLIT_MIN_MACS", 1)
    monkeypatch.setattr(conv_kernels, "IM2COL_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3, 16, 16)).astype(np.float32).transpose(0, 2, 3, 1)
    w = rng.standard_normal((3, 3, 3, 8)).astype(np.float32)
    c = rng.standard_normal(8).astype(np.float32)
    g = rng.standard_normal((6, 16, 16, 8)).astype(np.float32)
    out = conv_kernels.conv2d(x, w, 1, 1, c)
    grad = conv_kernels.conv2d_weight_grad(x, g, (3, 3), 1, 1)
    _numpy_im2col(monkeypatch)
    np.testing.assert_array_equal(out, conv_kernels.conv2d(x, w, 1, 1, c))
    np.testing.assert_array_equal(grad, conv_kernels.conv2d_weight_grad(x, g, (3, 3), 1, 1))


# (N, H, W, C_in, C_out, stride, NCHW memory)
WEIGHT_CASES = [(10, 16, 16, 16, 32, 2, False), (9, 8, 8, 32, 16, 2, False),
                (7, 11, 11, 5, 8, 1, False), (10, 32, 32, 3, 16, 1, True)]


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=[str(c) for c in WEIGHT_CASES])
def test_weight_grad_same_bits_on_any_thread_count(case, monkeypatch):
    """conv_weight_grad's result does not depend on needle's thread count (before, each
    thread count summed its own chunks of images: different roundings), nor on numba."""
    n, h, w_, c_in, c_out, s, nchw = case
    monkeypatch.setattr(conv_kernels, "SPLIT_MIN_MACS", 1)
    monkeypatch.setattr(conv_kernels, "IM2COL_BLOCK_BYTES", 1 << 14)  # several blocks
    rng = np.random.default_rng(2)
    if nchw:
        x = rng.standard_normal((n, c_in, h, w_)).astype(np.float32).transpose(0, 2, 3, 1)
    else:
        x = rng.standard_normal((n, h, w_, c_in)).astype(np.float32)
    w = rng.standard_normal((3, 3, c_in, c_out)).astype(np.float32)
    ho, wo = (h + 2 - 3) // s + 1, (w_ + 2 - 3) // s + 1
    g = rng.standard_normal((n, ho, wo, c_out)).astype(np.float32)
    grads = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(cpu_threads, "NUM_THREADS", threads)
        grads.append(conv_kernels.conv2d_weight_grad(x, g, (3, 3), s, 1))
    _numpy_im2col(monkeypatch)
    grads.append(conv_kernels.conv2d_weight_grad(x, g, (3, 3), s, 1))
    for other in grads[1:]:
        np.testing.assert_array_equal(grads[0], other)
    np.testing.assert_allclose(grads[0], _torch_grads(x, w, g, s, 1)[0], rtol=1e-4, atol=1e-3)


@needs_numba
@pytest.mark.parametrize("threads", [1, 2])
def test_input_grad_blocks_bit_for_bit(threads, monkeypatch):
    """conv_input_grad's product and scatter in blocks of one image each give the bits of
    one product per chunk of images, and PyTorch's values."""
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", threads)
    monkeypatch.setattr(conv_kernels, "SPLIT_MIN_MACS", 1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 16, 16, 16)).astype(np.float32)
    w = rng.standard_normal((3, 3, 16, 32)).astype(np.float32)
    g = rng.standard_normal((5, 8, 8, 32)).astype(np.float32)
    monkeypatch.setattr(conv_kernels, "IM2COL_BLOCK_BYTES", 1)
    blocks = conv_kernels.conv2d_input_grad(g, w, 2, 1, (16, 16))
    monkeypatch.setattr(conv_kernels, "IM2COL_BLOCK_BYTES", 1 << 40)
    np.testing.assert_array_equal(blocks, conv_kernels.conv2d_input_grad(g, w, 2, 1, (16, 16)))
    np.testing.assert_allclose(blocks, _torch_grads(x, w, g, 2, 1)[1], rtol=1e-4, atol=1e-4)


def test_empty_batch():
    """No images: empty outputs and a zero kernel gradient (the blocks' bounds divide by
    their count, which must not be 0)."""
    x = np.zeros((0, 8, 8, 16), np.float32)
    w = np.ones((3, 3, 16, 32), np.float32)
    g = np.zeros((0, 4, 4, 32), np.float32)
    assert conv_kernels.conv2d(x, w, 2, 1, np.zeros(32, np.float32)).shape == (0, 4, 4, 32)
    assert conv_kernels.conv2d_input_grad(g, w, 2, 1, (8, 8)).shape == (0, 8, 8, 16)
    grad = conv_kernels.conv2d_weight_grad(x, g, (3, 3), 2, 1)
    assert grad.shape == (3, 3, 16, 32) and not grad.any()
