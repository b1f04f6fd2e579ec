"""The numba loops behind kernels/layernorm.py (imported only where numba is installed).

Each row of an (M, D) matrix is normalized on its own, so one loop over rows keeps the row
in cache: the statistics, the normalized row and the affine map in one visit (the NumPy
path makes five to seven passes over the whole matrix). Row sums accumulate in float64;
the elementwise passes run in the arrays' dtype (``_as_dtype``), which lets LLVM vectorize
them. ``reassoc`` (only that fast-math flag: NaN and inf keep their IEEE meaning) lets it
vectorize the sums as well.
"""

from __future__ import annotations

import numba
import numpy as np

from ..backend.numba_support import njit_cached

_FLAGS = {"reassoc", "contract"}


def _jit(fn):
    """needle's njit (backend/numba_support.py) for this file's loops."""
    return njit_cached(fn, fastmath=_FLAGS)


@numba.njit(inline="always", fastmath=_FLAGS)
def _row_mean_inv(row, eps, box):
    """(mean, 1 / sqrt(var + eps)) of one row, as values of the row's dtype (via ``box``)."""
    d = row.shape[0]
    total = 0.0
    for j in range(d):
        total += row[j]
    mean = total / d
    sq = 0.0
    for j in range(d):
        c = row[j] - mean
        sq += c * c
    box[0] = mean
    box[1] = 1.0 / np.sqrt(sq / d + eps)
    return box[0], box[1]


@_jit
def layer_norm_rows(xm, weight, bias, eps, out):
    """out = (x - mean) * inv * weight + bias per row, inv = 1 / sqrt(var + eps)."""
    m, d = xm.shape
    box = np.empty(2, xm.dtype)
    for i in range(m):
        row = xm[i]
        mean, inv = _row_mean_inv(row, eps, box)
        dest = out[i]
        for j in range(d):
            dest[j] = (row[j] - mean) * inv * weight[j] + bias[j]


#: rows per block of the backward's weight and bias sums: each block's float64 sums run in
#: row order, the blocks' sums are then added in block order (fixed by the shape, so the bits
#: are the same on one thread or split over numba's prange threads,
#: numba_parallel_layernorm.py)
GRAD_BLOCK_ROWS = 128


@_jit
def layer_norm_grad_block(gm, xm, weight, eps, dx, acc_w, acc_b):
    """LayerNorm's dx for the rows of gm, xm, and their float64 sums of g * xhat and g added
    into acc_w and acc_b, in row order:
    xhat = (x - mean) * inv, gw = g * weight,
    dx = inv * (gw - mean(gw) - xhat * mean(gw * xhat))."""
    m, d = xm.shape
    xhat = np.empty(d, xm.dtype)
    box = np.empty(2, xm.dtype)
    for i in range(m):
        row, grow, dest = xm[i], gm[i], dx[i]
        mean, inv = _row_mean_inv(row, eps, box)
        sum_gw = 0.0
        sum_gwx = 0.0
        for j in range(d):
            h = (row[j] - mean) * inv
            xhat[j] = h
            g = grow[j]
            gw = g * weight[j]
            sum_gw += gw
            sum_gwx += gw * h
            acc_w[j] += g * h
            acc_b[j] += g
        box[0] = sum_gw / d
        box[1] = sum_gwx / d
        mean_gw, mean_gwx = box[0], box[1]
        for j in range(d):
            dest[j] = inv * (grow[j] * weight[j] - mean_gw - xhat[j] * mean_gwx)


@_jit
def add_block_sums(partial_w, partial_b, dweight, dbias):
    """dweight, dbias = the (blocks, D) float64 partial sums added in block order."""
    count, d = partial_w.shape
    for j in range(d):
        total_w = 0.0
        total_b = 0.0
        for k in range(count):
            total_w += partial_w[k, j]
            total_b += partial_b[k, j]
        dweight[j] = total_w
        dbias[j] = total_b


@_jit
def layer_norm_grad_rows(gm, xm, weight, eps, dx, dweight, dbias):
    """LayerNorm's (dx, dweight, dbias) from the output gradient gm, row by row
    (``layer_norm_grad_block``), dweight = sum over rows of g * xhat, dbias = sum over rows
    of g: in float64 per block of ``GRAD_BLOCK_ROWS`` rows, the blocks added in order."""
    m, d = xm.shape
    count = (m + GRAD_BLOCK_ROWS - 1) // GRAD_BLOCK_ROWS
    partial_w = np.zeros((count, d), np.float64)
    partial_b = np.zeros((count, d), np.float64)
    for k in range(count):
        s = k * GRAD_BLOCK_ROWS
        e = min(m, s + GRAD_BLOCK_ROWS)
        layer_norm_grad_block(gm[s:e], xm[s:e], weight, eps, dx[s:e], partial_w[k],
                              partial_b[k])
    add_block_sums(partial_w, partial_b, dweight, dbias)
