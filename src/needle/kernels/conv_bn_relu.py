"""A convolution (or its kernel gradient) that reads a BatchNorm + ReLU output it never stores:
the kernels of core/ops_batchnorm_relu_conv.py.

In a ``conv -> BatchNorm2d -> ReLU -> conv`` network the BatchNorm + ReLU output is written
by one pass (a fused region under the JIT) and read by the next convolution's forward and its
kernel gradient. Where the direct loops (kernels/numba_direct_conv.py) run those two, they
read the BatchNorm's input instead and make ``relu(x * alpha + beta)`` as they copy each image
into their zero-padded scratch (``pad_image_bn_relu``: BatchNorm's and ReLU's own float
operations, so the same values): the activation is never written to memory, and the pass
that wrote it is gone. Winograd's layers (stride 1) can make it the same way as their input
tiles are read (numba_winograd ``_gather_bn_relu``; off by default: ``WINOGRAD``). Elsewhere
(im2col, the first layer's few-channel loop, other dtypes, no numba) these return None and
the caller runs the ops one after the other.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import conv, cpu_kernels, winograd
from .conv import _direct_conv, _direct_loops, _direct_weight_grad, _out_size

__all__ = ["ENABLED", "alpha_beta", "conv2d_bn_relu", "conv2d_weight_grad_bn_relu", "takes"]

#: whether the direct loops make the BatchNorm + ReLU input themselves (False: the callers
#: run the ops; for A/B measurements and tests)
ENABLED = True

#: whether Winograd's layers (stride 1) take it too. Off: measured about level. Strides
#: 1,1,1 jitted, alternating in one process (2 cores loaded by other work): wall 0.956-0.997
#: median (q10 0.969-0.988) but process CPU 1.015-1.054; the 32->64 layer alone (process
#: CPU, one needle thread) 22.76 -> 22.65 ms for the fused region + forward + kernel
#: gradient, the 16->32 layer 10.04 -> 10.30: gathering every input tile through the affine
#: map costs about what the region's pass did. Quiet machine (session 12, 13:41, 8 rounds x 10
#: steps): wall 1.023 (q10 1.042), process CPU 1.016: stays off.
WINOGRAD = False


def alpha_beta(x: Any, weight: Any, bias: Any, mean: Any, var: Any, eps: float
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """BatchNorm's per-channel ``(alpha, beta)``, ``y = x * alpha + beta``, by the kernel its
    compiled forward uses (numba_kernels.bn_alpha_beta), for float32 NHWC ``x`` and (C,)-sized
    statistics of any shape; None where that kernel cannot run."""
    c = x.shape[-1]
    vectors = []
    for v in (weight, bias, mean, var):
        if type(v) is not np.ndarray or v.dtype != np.float32 or v.size != c:
            return None
        vectors.append(np.ascontiguousarray(v).reshape(-1))
    alpha, beta = np.empty(c, np.float32), np.empty(c, np.float32)
    if not cpu_kernels.run_kernel("bn_alpha_beta", *vectors, np.float32(eps), alpha, beta):
        return None
    return alpha, beta


def _winograd_takes(x_shape: tuple, kernel_hw: tuple, stride: int, padding: int, c_in: int,
                    c_out: int) -> bool:
    """winograd.applies judged from the shapes (float32 NumPy operands)."""
    probe = np.empty((1, x_shape[1], x_shape[2], 1), np.float32)
    return winograd.applies(probe, probe, kernel_hw, stride, padding, c_in, c_out)


def takes(x_shape: tuple, kernel_shape: tuple, stride: int, padding: int) -> bool:
    """Whether both kernels here would run a convolution of float32 NHWC ``x_shape`` with a
    (kh, kw, C_in, C_out) kernel (and its kernel gradient), judged from the shapes: Winograd
    takes both, or the direct loops do (strided, a shape they take), numba loaded. A plan
    rewritten where they would not run would make the activation twice (compiler/
    batchnorm_relu_conv_rewrite.py asks this first)."""
    if None in x_shape or None in kernel_shape or len(x_shape) != 4 or len(kernel_shape) != 4:
        return False
    n, h, w, c_in = x_shape
    kh, kw, k_in, c_out = kernel_shape
    wo = _out_size(w, kw, stride, padding)
    ho = _out_size(h, kh, stride, padding)
    if not (ENABLED and k_in == c_in and n > 0 and ho >= 1 and wo >= 1
            and cpu_kernels.enabled(np.float32)):
        return False
    if _winograd_takes(x_shape, (kh, kw), stride, padding, c_in, c_out):
        return WINOGRAD
    return (conv.DIRECT_ENABLED and stride != 1 and wo >= 8
            and c_in > conv.NCHW_MAX_CHANNELS and conv._direct_applies(c_in, c_out, kh, kw)
            and c_out <= conv.DIRECT_WEIGHT_GRAD_MAX_COUT and _direct_loops.module() is not None)


def _usable(x: Any, other: Any) -> bool:
    return (ENABLED and type(x) is np.ndarray and type(other) is np.ndarray and x.ndim == 4
            and x.dtype == np.float32 and other.dtype == np.float32
            and x.flags.c_contiguous and cpu_kernels.enabled(np.float32))


def conv2d_bn_relu(x: Any, weight: Any, bias: Any, mean: Any, var: Any, eps: float, b: Any,
                   stride: int, padding: int, conv_bias: Any = None) -> Any:
    """``conv2d(relu(bn(x)), b, stride, padding, conv_bias)`` for NHWC ``x`` (bn: BatchNorm's
    training forward per channel with these statistics), by the direct loops, or None where
    they would not run that convolution (the caller then runs the ops)."""
    kh, kw, c_in, c_out = b.shape
    if (not _usable(x, b) or x.shape[3] != c_in
            or (conv_bias is not None and (type(conv_bias) is not np.ndarray
                                           or conv_bias.dtype != np.float32))):
        return None
    constants = alpha_beta(x, weight, bias, mean, var, eps)
    if constants is None:
        return None
    if winograd.applies(x, b, (kh, kw), stride, padding, c_in, c_out):
        return winograd.conv3x3(x, b, padding, conv_bias, bn_relu=constants) if WINOGRAD \
            else None
    ho = _out_size(x.shape[1], kh, stride, padding)
    wo = _out_size(x.shape[2], kw, stride, padding)
    if ho < 1 or wo < 1:
        return None
    return _direct_conv(x, b, stride, padding, conv_bias, ho, wo, bn_relu=constants)


def conv2d_weight_grad_bn_relu(x: Any, weight: Any, bias: Any, mean: Any, var: Any,
                               eps: float, g: Any, kernel_hw: tuple, stride: int,
                               padding: int) -> Any:
    """``conv2d_weight_grad(relu(bn(x)), g, kernel_hw, stride, padding)`` by the direct loops
    (as ``conv2d_bn_relu``), or None."""
    c_in, c_out = x.shape[-1], g.shape[-1]
    if not _usable(x, g) or g.ndim != 4:
        return None
    constants = alpha_beta(x, weight, bias, mean, var, eps)
    if constants is None:
        return None
    if winograd.applies(x, g, kernel_hw, stride, padding, c_in, c_out):
        return winograd.conv3x3_weight_grad(x, g, padding, bn_relu=constants) if WINOGRAD \
            else None
    return _direct_weight_grad(x, g, kernel_hw, stride, padding, bn_relu=constants)
