"""The numba loops behind bn_relu_mean.py (imported only where numba is installed).

``out[n, c] = sum over p of relu(x[n, p, c] * alpha[c] + beta[c]) / count`` for an (N, P, C)
float32 array (an NHWC activation with P = H * W): BatchNorm2d + ReLU + a global average
pool in one read of x, the activation never written. Float operations as the unfused ops
round them: y = x * alpha + beta (two roundings, no fused multiply-add: fastmath off), ReLU
as ``np.maximum(y, 0)`` (NaN kept), and the sum of each (n, c) in float32 from 0 in position
order p = 0, 1, ..., P - 1, the order np.einsum("abcd->ab") adds an NHWC activation's NCHW
view (its inner loop runs along C, contiguous, and adds each position's row to the output
row), then one float32 division by ``count``. Images are independent, so the prange loop
over them gives the serial loop's bits on any thread count.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ..backend.numba_support import njit_cached
from ..backend.parallel_loops import njit_parallel


@njit_cached
def bn_relu_mean_rows(x, alpha, beta, count, out, s, e):
    """Images [s, e) of ``out`` (see the module docstring)."""
    p_size, c_size = x.shape[1], x.shape[2]
    zero = np.float32(0.0)
    acc = np.empty(c_size, np.float32)
    for n in range(s, e):
        for c in range(c_size):
            acc[c] = zero
        for p in range(p_size):
            for c in range(c_size):
                acc[c] += np.maximum(x[n, p, c] * alpha[c] + beta[c], zero)
        for c in range(c_size):
            out[n, c] = acc[c] / count


def _bn_relu_mean_images(x, alpha, beta, count, out):
    for n in prange(x.shape[0]):
        bn_relu_mean_rows(x, alpha, beta, count, out, n, n + 1)


bn_relu_mean_images = njit_parallel(_bn_relu_mean_images)
