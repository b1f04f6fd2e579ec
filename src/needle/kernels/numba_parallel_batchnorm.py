"""BatchNorm's passes and max pooling as numba ``prange`` loops over row blocks (imported only
where numba is installed; run only where backend/parallel_loops.parallel_threads() is nonzero).

Each function runs block b of ``bounds`` (row bounds fixed by the shape: cpu_kernels.row_blocks,
or column_sums.row_blocks for the fused dx pass that also sums a conv bias's gradient) with the
serial block loop of numba_kernels.py / numba_batchnorm_relu.py (``*_blocks`` over the one
block b), on numba's TBB threads: the same float operations per block as the serial path,
each block's float64 sums in its own row of the sums' arrays, which the caller adds in block
order. So the results do not depend on the thread count or on whether these ran. The names
are those of cpu_kernels' passes (``cpu_kernels._run_blocks``).
"""

from __future__ import annotations

from numba import prange

from ..backend.parallel_loops import njit_parallel
from . import numba_batchnorm_relu, numba_bn_relu_pool, numba_kernels

_column_sums_blocks = numba_kernels.column_sums_blocks
_shifted_sums_blocks = numba_kernels.shifted_sums_blocks
_centered_square_sums_blocks = numba_kernels.centered_square_sums_blocks
_affine_blocks = numba_kernels.affine_blocks
_bn_grad_sums_blocks = numba_kernels.bn_grad_sums_blocks
_bn_grad_dx_blocks = numba_kernels.bn_grad_dx_blocks
_max_pool_blocks = numba_kernels.max_pool_blocks
_max_pool_scatter_blocks = numba_kernels.max_pool_scatter_blocks
_bn_relu_grad_sums_blocks = numba_batchnorm_relu.bn_relu_grad_sums_blocks
_bn_relu_grad_dx_blocks = numba_batchnorm_relu.bn_relu_grad_dx_blocks
_bn_relu_pool_grad_sums_blocks = numba_bn_relu_pool.bn_relu_pool_grad_sums_blocks
_bn_relu_max_pool_blocks = numba_bn_relu_pool.bn_relu_max_pool_blocks


def _column_sums(xm, out, bounds):
    for b in prange(bounds.shape[0] - 1):
        _column_sums_blocks(xm, out, bounds, b, b + 1)


def _shifted_sums(xm, shift, s1, s2, bounds):
    for b in prange(bounds.shape[0] - 1):
        _shifted_sums_blocks(xm, shift, s1, s2, bounds, b, b + 1)


def _centered_square_sums(xm, mean, out, bounds):
    for b in prange(bounds.shape[0] - 1):
        _centered_square_sums_blocks(xm, mean, out, bounds, b, b + 1)


def _affine(xm, scale, shift, out, bounds):
    for b in prange(bounds.shape[0] - 1):
        _affine_blocks(xm, scale, shift, out, bounds, b, b + 1)


def _bn_grad_sums(gm, xm, mean, sum_g, sum_gc, bounds):
    for b in prange(bounds.shape[0] - 1):
        _bn_grad_sums_blocks(gm, xm, mean, sum_g, sum_gc, bounds, b, b + 1)


def _bn_grad_dx(gm, xm, mean, a, b, k, dx, bounds):
    for q in prange(bounds.shape[0] - 1):
        _bn_grad_dx_blocks(gm, xm, mean, a, b, k, dx, bounds, q, q + 1)


def _max_pool(x, k, stride, out, bounds):
    for b in prange(bounds.shape[0] - 1):
        _max_pool_blocks(x, k, stride, out, bounds, b, b + 1)


def _max_pool_scatter(x, y, g, k, stride, dx, bounds):
    for b in prange(bounds.shape[0] - 1):
        _max_pool_scatter_blocks(x, y, g, k, stride, dx, bounds, b, b + 1)


def _bn_relu_grad_sums(g, per, xm, alpha, beta, mean, sum_g, sum_gc, bounds):
    for q in prange(bounds.shape[0] - 1):
        _bn_relu_grad_sums_blocks(g, per, xm, alpha, beta, mean, sum_g, sum_gc, bounds, q,
                                  q + 1)


def _bn_relu_grad_dx(g, per, xm, alpha, beta, mean, a, b, k, dx, sum_dx, bounds):
    for q in prange(bounds.shape[0] - 1):
        _bn_relu_grad_dx_blocks(g, per, xm, alpha, beta, mean, a, b, k, dx, sum_dx, bounds, q,
                                q + 1)


def _bn_relu_pool_grad_sums(g, y, x4, xm, alpha, beta, mean, k, stride, s4, sm, sum_g, sum_gc,
                            bounds):
    for q in prange(bounds.shape[0] - 1):
        _bn_relu_pool_grad_sums_blocks(g, y, x4, xm, alpha, beta, mean, k, stride, s4, sm,
                                       sum_g, sum_gc, bounds, q, q + 1)


def _bn_relu_max_pool(x, alpha, beta, k, stride, out, bounds):
    for b in prange(bounds.shape[0] - 1):
        _bn_relu_max_pool_blocks(x, alpha, beta, k, stride, out, bounds, b, b + 1)


column_sums = njit_parallel(_column_sums)
shifted_sums = njit_parallel(_shifted_sums)
centered_square_sums = njit_parallel(_centered_square_sums)
affine = njit_parallel(_affine)
bn_grad_sums = njit_parallel(_bn_grad_sums)
bn_grad_dx = njit_parallel(_bn_grad_dx)
max_pool = njit_parallel(_max_pool)
max_pool_scatter = njit_parallel(_max_pool_scatter)
bn_relu_grad_sums = njit_parallel(_bn_relu_grad_sums)
bn_relu_grad_dx = njit_parallel(_bn_relu_grad_dx)
bn_relu_pool_grad_sums = njit_parallel(_bn_relu_pool_grad_sums)
bn_relu_max_pool = njit_parallel(_bn_relu_max_pool)
