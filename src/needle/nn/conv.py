"""Convolution and pooling layers (NCHW)."""

from __future__ import annotations

import math
from typing import Any

from .. import init, ops
from ..autograd import Tensor
from .module import Module, Parameter

__all__ = ["AvgPool2d", "Conv", "MaxPool2d"]


def _single(value: Any, what: str) -> int:
    """An int from an int or a square (k, k) pair (only square kernels and strides)."""
    if isinstance(value, tuple | list):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{what} must be an int or a square pair (k, k), got {value}")
        value = value[0]
    value = int(value)
    if value < 1:
        raise ValueError(f"{what} must be positive, got {value}")
    return value


class Conv(Module):
    """2-D convolution over NCHW input with 'same'-style padding ``kernel_size // 2``.

    ``y[n, o] = b[o] + sum_{c, i, j} x_pad[n, c, s*h + i, s*w + j] * W[i, j, c, o]``;
    input (N, C_in, H, W), output (N, C_out, (H + 2p - k) // s + 1, (W + 2p - k) // s + 1).
    The weight is stored as (k, k, C_in, C_out) (needle's layout, torch's is (C_out, C_in, k, k)).
    The output is an NCHW view of channels-last (NHWC) memory, as ``ops.conv`` stores its
    results: later convolutions and BatchNorm run fastest on it (see docs/design.md).

    >>> conv = Conv(3, 8, 3)
    >>> conv(init.rand(2, 3, 5, 5)).shape
    (2, 8, 5, 5)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple,
                 stride: int | tuple = 1, bias: bool = True, device: Any = None,
                 dtype: str = "float32") -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _single(kernel_size, "Conv: kernel_size")
        self.stride = _single(stride, "Conv: stride")
        self.padding = self.kernel_size // 2
        k = self.kernel_size
        fan_in, fan_out = self.in_channels * k * k, self.out_channels * k * k
        # draw order is part of the contract: weight first, then bias
        self.weight = Parameter(init.kaiming_uniform(
            fan_in, fan_out, shape=(k, k, self.in_channels, self.out_channels),
            device=device, dtype=dtype))
        if bias:
            bound = 1.0 / math.sqrt(fan_in)
            self.bias: Parameter | None = Parameter(init.rand(
                self.out_channels, low=-bound, high=bound, device=device, dtype=dtype))
        else:
            self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        if len(x.shape) != 4 or (x.shape[1] is not None and x.shape[1] != self.in_channels):
            raise ValueError(f"Conv: expected NCHW input with {self.in_channels} channels, got "
                             f"shape {tuple(x.shape)}")
        nhwc = ops.permute(x, (0, 2, 3, 1))
        if self.bias is None:
            out = ops.conv(nhwc, self.weight, stride=self.stride, padding=self.padding)
        else:  # the bias added where the conv writes its output (no pass, no array of its own)
            out = ops.conv_bias(nhwc, self.weight, self.bias, stride=self.stride,
                                padding=self.padding)
        return ops.permute(out, (0, 3, 1, 2))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, bias={self.bias is not None}")


class _Pool2d(Module):
    """Shared window logic of the 2-D pools: NCHW in and out, no padding, floor mode.

    By default the k*k window offsets are k*k strided slices of the input (each (N, C, Ho,
    Wo)) combined elementwise by ``_combine`` (AvgPool2d); MaxPool2d is one op of its own.
    NOTE: slices are ~10x faster in NumPy than reducing a (..., k, ..., k) view over its small
    strided axes.
    """

    def __init__(self, kernel_size: int | tuple, stride: int | tuple | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        self.kernel_size = _single(kernel_size, f"{name}: kernel_size")
        self.stride = self.kernel_size if stride is None else _single(stride, f"{name}: stride")

    def _combine(self, windows: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def _check(self, x: Tensor) -> None:
        """One line naming the module for input the pool cannot take."""
        name = type(self).__name__
        if len(x.shape) != 4:
            raise ValueError(f"{name}: expected NCHW input, got shape {tuple(x.shape)}")
        h, w = x.shape[2], x.shape[3]
        k = self.kernel_size
        if h is None or w is None:
            raise ValueError(f"{name}: height and width must be known, got {tuple(x.shape)}")
        if h < k or w < k:
            raise ValueError(f"{name}: kernel {k}x{k} is larger than the input {h}x{w}")

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        k, s = self.kernel_size, self.stride
        h, w = x.shape[2], x.shape[3]
        ho, wo = (h - k) // s + 1, (w - k) // s + 1
        windows = [x[:, :, i: i + s * (ho - 1) + 1: s, j: j + s * (wo - 1) + 1: s]
                   for i in range(k) for j in range(k)]
        return self._combine(windows)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class MaxPool2d(_Pool2d):
    """Max over k x k windows with stride s (default k): (N, C, H, W) -> (N, C, Ho, Wo),
    Ho = (H - k) // s + 1. The gradient goes to each window's first maximum, as in PyTorch
    (one op, ``max_pool2d``, with its own adjoint: no k*k slices and scatters)."""

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return ops.max_pool2d(x, kernel_size=self.kernel_size, stride=self.stride)


class AvgPool2d(_Pool2d):
    """Mean over k x k windows with stride s (default k): (N, C, H, W) -> (N, C, Ho, Wo),
    Ho = (H - k) // s + 1."""

    def _combine(self, windows: list[Tensor]) -> Tensor:
        total = windows[0]
        for window in windows[1:]:
            total = total + window
        return total / float(self.kernel_size * self.kernel_size)
