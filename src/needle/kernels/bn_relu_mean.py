"""``mean(relu(batch_norm(x)), axes=(2, 3))`` of an NHWC ``x`` in one pass (a CNN's last
BatchNorm2d + ReLU + global average pool): numba_bn_relu_mean.py's loops make each value of
the activation where they sum it, so the activation is neither written nor read back.

The same bits as the unfused ops where the kernel runs: BatchNorm's per-channel alpha and
beta by the kernel every compiled BatchNorm forward uses (conv_bn_relu.alpha_beta), and the
sum in the order np.einsum adds the activation's NCHW view, stored NHWC, as Mean.compute does
(reduce.reduce_sum) for arrays of at least ``reduce.EINSUM_MIN_SIZE`` elements. Elsewhere
(smaller arrays, which np.add.reduce sums, other dtypes or layouts, no numba) it returns None
and the caller computes the ops themselves.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import parallel_loops
from ..backend.numba_support import NumbaLoops
from . import conv_bn_relu, cpu_kernels
from .reduce import EINSUM_MIN_SIZE

__all__ = ["PRANGE_MIN_ELEMENTS", "bn_relu_mean", "takes"]

_loops = NumbaLoops("needle.kernels.numba_bn_relu_mean")

#: activations from this many elements run on TBB's threads, one image a block (measured,
#: loaded 2-core machine, one op alone: (64, 8, 8, 64) 61 us serially, 108 us on the threads;
#: (64, 32, 32, 64) 1617 serially, 1527 on the threads). The bits are the same either way.
PRANGE_MIN_ELEMENTS = 1 << 20


def takes(x_shape: tuple) -> bool:
    """Whether the kernel computes a float32 NHWC activation of ``x_shape`` (its size: the
    unfused mean sums it by np.einsum, whose order the kernel reproduces)."""
    return (len(x_shape) == 4 and None not in x_shape
            and int(np.prod(x_shape)) >= EINSUM_MIN_SIZE
            and cpu_kernels.enabled(np.float32) and _loops.module() is not None)


def bn_relu_mean(x: Any, weight: Any, bias: Any, mean: Any, var: Any, eps: float
                 ) -> np.ndarray | None:
    """(N, C) ``mean(relu(batch_norm(x)))`` over H and W of float32 NHWC ``x`` (the statistics:
    C values each, any shape), or None where the kernel does not run (see the docstring)."""
    if (type(x) is not np.ndarray or x.ndim != 4 or x.dtype != np.float32
            or not x.flags.c_contiguous or not takes(x.shape)):
        return None
    constants = conv_bn_relu.alpha_beta(x, weight, bias, mean, var, eps)
    module = _loops.module()
    if constants is None or module is None:
        return None
    n, h, w, c = x.shape
    x3 = x.reshape(n, h * w, c)
    out = np.empty((n, c), np.float32)
    count = np.float32(h * w)
    if n > 1 and x.size >= PRANGE_MIN_ELEMENTS and parallel_loops.parallel_threads():
        loop = module.bn_relu_mean_images
        if _loops.call(loop, x3, *constants, count, out):
            return out
    if not _loops.call(module.bn_relu_mean_rows, x3, *constants, count, out, 0, n):
        return None
    return out
