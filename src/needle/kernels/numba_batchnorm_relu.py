"""The numba loops behind batchnorm_relu.py (imported only where numba is installed).

BatchNorm's backward with the ReLU adjoint after it computed on the fly: ``r = g * (y > 0)``
is never written, and y, BatchNorm's output, is not read either: ``y = x * alpha + beta`` is
recomputed from x with the forward's per-channel constants (two roundings, as every
BatchNorm forward path computes it). Each loop is numba_kernels.bn_grad_sums / bn_grad_dx
with ``gm[i, j]`` replaced by that product (the same float operations in the same order, so
the same bits as relu_grad followed by batch_norm_grad). ``g`` is an (R, C) matrix read at
row ``i // per``: ``per`` is 1 for a gradient of x's shape, H*W for one broadcast from a
global average pool. Rows [s, e) of the (M, C) matrices are one block of the pass
(cpu_kernels' row blocks).
"""

from __future__ import annotations

import numpy as np

from ..backend.numba_support import njit_cached


@njit_cached
def bn_relu_grad_sums(g, per, xm, alpha, beta, mean, s, e, sum_g, sum_gc):
    """float64 column sums over rows [s, e) of r = g * (x alpha + beta > 0) and
    r * (x - mean)."""
    c = xm.shape[1]
    zero = xm.dtype.type(0)
    one = g.dtype.type(1)
    gzero = g.dtype.type(0)
    acc_g = np.zeros(c, np.float64)
    acc_gc = np.zeros(c, np.float64)
    gi = s // per  # g's row, advanced every ``per`` rows (no division per row)
    left = per - (s - gi * per)
    for i in range(s, e):
        for j in range(c):
            xv = xm[i, j]
            r = g[gi, j] * (one if xv * alpha[j] + beta[j] > zero else gzero)
            acc_g[j] += r
            acc_gc[j] += r * (xv - mean[j])
        left -= 1
        if left == 0:
            left = per
            gi += 1
    for j in range(c):
        sum_g[j] = acc_g[j]
        sum_gc[j] = acc_gc[j]


@njit_cached
def bn_relu_grad_dx(g, per, xm, alpha, beta, mean, a, b, k, s, e, dx, sum_dx):
    """dx = a r + b (x - mean) + k per column over rows [s, e), r = g * (x alpha + beta > 0);
    where ``sum_dx`` has an entry per column (size 0: none wanted), also the float64 column
    sums of the dx it writes (a conv bias's gradient, as numba_kernels.column_sums would sum
    dx afterwards)."""
    c = xm.shape[1]
    zero = xm.dtype.type(0)
    one = g.dtype.type(1)
    gzero = g.dtype.type(0)
    summing = sum_dx.shape[0] > 0
    acc = np.zeros(c if summing else 0, np.float64)
    gi = s // per
    left = per - (s - gi * per)
    for i in range(s, e):
        for j in range(c):
            xv = xm[i, j]
            r = g[gi, j] * (one if xv * alpha[j] + beta[j] > zero else gzero)
            dx[i, j] = r * a[j] + (xv - mean[j]) * b[j] + k[j]
        if summing:  # (a second loop over the row just written: summing in the first one
            for j in range(c):  # was 20% slower at 16 channels)
                acc[j] += dx[i, j]
        left -= 1
        if left == 0:
            left = per
            gi += 1
    for j in range(acc.shape[0]):
        sum_dx[j] = acc[j]


# -- row blocks: the loops above over rows bounds[q]:bounds[q + 1] for blocks b0 .. b1-1, block
# q's float64 sums in row q of the sums' arrays (numba_parallel_batchnorm.py runs the same
# loops per block under prange)
@njit_cached
def bn_relu_grad_sums_blocks(g, per, xm, alpha, beta, mean, sum_g, sum_gc, bounds, b0, b1):
    """``bn_relu_grad_sums`` of each row block (``sum_g``, ``sum_gc``: (blocks, C))."""
    for q in range(b0, b1):
        bn_relu_grad_sums(g, per, xm, alpha, beta, mean, bounds[q], bounds[q + 1], sum_g[q],
                          sum_gc[q])


@njit_cached
def bn_relu_grad_dx_blocks(g, per, xm, alpha, beta, mean, a, b, k, dx, sum_dx, bounds, b0, b1):
    """``bn_relu_grad_dx`` over each row block; ``sum_dx`` is (blocks, C) for the blocks'
    column sums of dx, (blocks, 0) for none."""
    for q in range(b0, b1):
        bn_relu_grad_dx(g, per, xm, alpha, beta, mean, a, b, k, bounds[q], bounds[q + 1], dx,
                        sum_dx[q])
