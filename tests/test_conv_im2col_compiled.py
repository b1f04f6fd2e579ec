"""The compiled im2col (cpu_kernels.im2col, numba): patches read straight from the unpadded
NHWC input, where NumPy pads a copy first.

It must build the NumPy path's patch matrix bit for bit (with and without the bias's column of
ones, for strides 1-3, paddings 0-2, contiguous and permuted inputs), so the convolutions built
on it give the NumPy path's results bit for bit on 1 and 2 threads, and agree with PyTorch.
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


class _NoCompiledIm2col:
    """cpu_kernels as conv.py sees it, with the compiled im2col unavailable (the NumPy path)."""

    def __getattr__(self, name):
        return getattr(cpu_kernels, name)

    @staticmethod
    def im2col(*args):
        return None


def _numpy_path(monkeypatch):
    monkeypatch.setattr(conv_kernels, "cpu_kernels", _NoCompiledIm2col())


# (N, H, W, C, kh, kw, stride, padding)
SHAPES = [(2, 9, 9, 5, 3, 3, 2, 1), (1, 8, 7, 4, 3, 3, 1, 1), (2, 10, 11, 3, 3, 2, 3, 2),
          (3, 6, 6, 2, 1, 1, 2, 0), (1, 7, 9, 6, 5, 5, 2, 2), (2, 5, 5, 3, 3, 3, 1, 0)]


@needs_numba
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("ones", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_patch_matrix_is_numpys_bit_for_bit(shape, ones, dtype, monkeypatch):
    n, h, w, c, kh, kw, s, p = shape
    x = np.random.default_rng(0).standard_normal((n, h, w, c)).astype(dtype)
    ho, wo = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
    compiled = cpu_kernels.im2col(x, kh, kw, s, p, ho, wo, ones)
    _numpy_path(monkeypatch)
    reference, dims = conv_kernels._im2col(x, kh, kw, s, p, ones)
    assert dims == (n, ho, wo) and compiled is not None and compiled.dtype == reference.dtype
    np.testing.assert_array_equal(compiled, reference)


@needs_numba
def test_permuted_input(monkeypatch):
    """An NCHW array seen as NHWC (nn.Conv's permute) with many channels takes the NHWC
    im2col: the compiled one copies it to C order first."""
    x = np.random.default_rng(1).standard_normal((2, 8, 9, 9)).astype(np.float32)
    nhwc = x.transpose(0, 2, 3, 1)
    compiled, _ = conv_kernels._im2col(nhwc, 3, 3, 2, 1, True)
    _numpy_path(monkeypatch)
    np.testing.assert_array_equal(compiled, conv_kernels._im2col(nhwc, 3, 3, 2, 1, True)[0])


def _torch_conv(x, w, c, stride, padding):
    out = torch.nn.functional.conv2d(torch.tensor(x).permute(0, 3, 1, 2),
                                     torch.tensor(w).permute(3, 2, 0, 1),
                                     None if c is None else torch.tensor(c),
                                     stride=stride, padding=padding)
    return out.permute(0, 2, 3, 1).numpy()


@needs_numba
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("block_bytes", [1, conv_kernels.IM2COL_BLOCK_BYTES])
def test_stride2_conv_and_kernel_gradient_bit_for_bit_and_torch(threads, bias, block_bytes,
                                                                 monkeypatch):
    """The stride-2 convolution (the CNN benchmark's 32->64 layer, fewer images) and its
    kernel gradient, with patches built and multiplied in blocks (of one image; of all six):
    the NumPy im2col's results bit for bit, on 1 and 2 threads (the convolution's also with
    one product per chunk of images; the kernel gradient's partial sums follow the blocks,
    which depend on the shapes only, so it is also the same on 1 and 2 threads)."""
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", threads)
    monkeypatch.setattr(conv_kernels, "SPLIT_MIN_MACS", 1)  # the split by images, too
    monkeypatch.setattr(conv_kernels, "IM2COL_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 16, 16, 32)).astype(np.float32)
    w = (rng.standard_normal((3, 3, 32, 64)) * 0.05).astype(np.float32)
    c = rng.standard_normal(64).astype(np.float32) if bias else None
    g = rng.standard_normal((6, 8, 8, 64)).astype(np.float32)
    out = conv_kernels.conv2d(x, w, 2, 1, c)
    grad = conv_kernels.conv2d_weight_grad(x, g, (3, 3), 2, 1)
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 3 - threads)
    np.testing.assert_array_equal(grad, conv_kernels.conv2d_weight_grad(x, g, (3, 3), 2, 1))
    _numpy_path(monkeypatch)
    np.testing.assert_array_equal(grad, conv_kernels.conv2d_weight_grad(x, g, (3, 3), 2, 1))
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", threads)
    monkeypatch.setattr(conv_kernels, "IM2COL_BLOCK_BYTES", 1 << 40)  # one block per chunk
    np.testing.assert_array_equal(out, conv_kernels.conv2d(x, w, 2, 1, c))
    np.testing.assert_allclose(out, _torch_conv(x, w, c, 2, 1), rtol=1e-4, atol=1e-4)
    tx = torch.tensor(x).permute(0, 3, 1, 2)
    tw = torch.tensor(w).permute(3, 2, 0, 1).requires_grad_()
    torch.nn.functional.conv2d(tx, tw, stride=2, padding=1).backward(
        torch.tensor(g).permute(0, 3, 1, 2))
    np.testing.assert_allclose(grad, tw.grad.permute(2, 3, 1, 0).numpy(), rtol=1e-4, atol=1e-3)


def test_numpy_fallback_without_numba(monkeypatch):
    """Where the kernels cannot run (no numba, NEEDLE_NUMBA=0), im2col pads and copies in
    NumPy: cpu_kernels.im2col says so with None, and the convolution still matches PyTorch."""
    monkeypatch.setattr(cpu_kernels, "enabled", lambda dtype: False)
    x = np.random.default_rng(3).standard_normal((2, 9, 9, 8)).astype(np.float32)
    w = np.random.default_rng(4).standard_normal((3, 3, 8, 4)).astype(np.float32)
    assert cpu_kernels.im2col(x, 3, 3, 2, 1, 5, 5) is None
    np.testing.assert_allclose(conv_kernels.conv2d(x, w, 2, 1), _torch_conv(x, w, None, 2, 1),
                               rtol=1e-4, atol=1e-4)
