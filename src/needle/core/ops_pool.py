"""2-D max pooling of NCHW tensors and its adjoints (kernels/pool.py computes them).

    max_pool2d(x)              y[n, c, i, j] = max of x over window (i, j)       (N, C, Ho, Wo)
    max_pool2d_scatter(x, y, g)  g added at each window's first maximum          (N, C, H, W)
    max_pool2d_gather(x, y, a)   a read at each window's first maximum           (N, C, Ho, Wo)

The gradient goes to each window's first maximum (PyTorch's choice), so tied maxima do not
split it. Scatter and gather are each other's adjoint for a fixed ``x`` and get no gradient
through ``x`` or ``y`` (the argmax is piecewise constant), so second derivatives work.
"""

from __future__ import annotations

from ..kernels.pool import max_pool, max_pool_gather, max_pool_scatter, out_size
from .registry import Aval, F, Op, ShapeError, fmt_shape, register


class _PoolOp(Op):
    """Shared attributes and shape checks: a k x k window moved by ``stride``."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)

    def _check_input(self, x: Aval) -> None:
        k = self.kernel_size
        if len(x.shape) != 4:
            raise ShapeError(f"{self.name}: expected NCHW input, got {fmt_shape(x.shape)}")
        h, w = x.shape[2], x.shape[3]
        if h is None or w is None:
            raise ShapeError(f"{self.name}: height and width must be known, got "
                             f"{fmt_shape(x.shape)}")
        if h < k or w < k:
            raise ShapeError(f"{self.name}: kernel {k}x{k} is larger than the input {h}x{w}")

    def _pooled_shape(self, x: Aval) -> tuple:
        k, s = self.kernel_size, self.stride
        n, c, h, w = x.shape
        return (n, c, out_size(h, k, s), out_size(w, k, s))


@register("max_pool2d", inputs=("x",))
class MaxPool2d(_PoolOp):
    """The maximum of each k x k window of NCHW ``x`` (no padding, floor mode)."""

    def compute(self, x):
        return max_pool(x, self.kernel_size, self.stride)

    def gradient(self, out_grad, node):
        (x,) = node.inputs
        return (F.max_pool2d_scatter(x, node, out_grad, kernel_size=self.kernel_size,
                                     stride=self.stride),)

    def infer(self, x: Aval) -> Aval:
        self._check_input(x)
        return Aval(self._pooled_shape(x), x.dtype)


@register("max_pool2d_scatter", inputs=("x", "y", "g"))
class MaxPool2dScatter(_PoolOp):
    """``g`` added into zeros like ``x`` at each window's first maximum (``y`` = the pooled x)."""

    def compute(self, x, y, g):
        return max_pool_scatter(x, y, g, self.kernel_size, self.stride)

    def gradient(self, out_grad, node):
        x, y, _ = node.inputs
        return None, None, F.max_pool2d_gather(x, y, out_grad, kernel_size=self.kernel_size,
                                               stride=self.stride)

    def infer(self, x: Aval, y: Aval, g: Aval) -> Aval:
        self._check_input(x)
        return Aval(x.shape, g.dtype)


@register("max_pool2d_gather", inputs=("x", "y", "a"))
class MaxPool2dGather(_PoolOp):
    """``a`` (shaped like ``x``) read at each window's first maximum of ``x``."""

    def compute(self, x, y, a):
        return max_pool_gather(x, y, a, self.kernel_size, self.stride)

    def gradient(self, out_grad, node):
        x, y, _ = node.inputs
        return None, None, F.max_pool2d_scatter(x, y, out_grad, kernel_size=self.kernel_size,
                                                stride=self.stride)

    def infer(self, x: Aval, y: Aval, a: Aval) -> Aval:
        self._check_input(x)
        return Aval(self._pooled_shape(x), a.dtype)
