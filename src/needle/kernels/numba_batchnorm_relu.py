"""The numba loops behind batchnorm_relu.py (imported only where numba is installed).

BatchNorm's backward with the ReLU adjoint after it computed on the fly: ``r = g * (y > 0)``
is never written, and y, BatchNorm's output, is not read either: ``y = x * alpha + beta`` is
recomputed from x with the forward's per-channel constants (two roundings, as every
BatchNorm forward path computes it). Each loop is numba_kernels.bn_grad_sums / bn_grad_dx
with ``gm[i, j]`` replaced by that product (the same float operations in the same order, the
sums in the same chunks of rows, so the same bits as relu_grad followed by
batch_norm_grad). ``g`` is an (R, C) matrix read at row ``i // per``: ``per`` is 1 for a
gradient of x's shape, H*W for one broadcast from a global average pool. Rows [s, e) of
the (M, C) matrices are one block of the pass (cpu_kernels' row blocks).
"""

from __future__ import annotations

import numba
import numpy as np

from ..backend.numba_support import njit_cached
from .numba_kernels import (
    GRAD_SUM_CHUNK,
    add_wide_parts,
    grad_sum_rows,
    tile_of,
    tile_rows,
    tree8,
)


@numba.njit(inline="always")
def _next_g_row(gi, left, per):
    """(g's row, rows left on it) for the next row of x's matrix."""
    if left == 1:
        return gi + 1, per
    return gi, left - 1


@numba.njit(inline="always")
def _masked(gv, xv, a, b, zero, one, gzero):
    """r = g * (x a + b > 0): ReLU's adjoint at y = x a + b, as relu_grad computes it."""
    return gv * (one if xv * a + b > zero else gzero)


@numba.njit(inline="always")
def _span_sums(gt, xt, tiles, w, zero, one, gzero, part_g, part_gc):
    """One span's sums (numba_kernels.bn_grad_sums_rows) of r = g * (x alpha + beta > 0) and
    r * (x - mean): ``gt``, ``xt`` the span's 8 wide rows of ``w`` values, ``tiles`` alpha,
    beta and mean along a wide row."""
    for t in range(w):
        a = tiles[0, t]
        b = tiles[1, t]
        mu = tiles[2, t]
        x0 = xt[t]
        x1 = xt[t + w]
        x2 = xt[t + 2 * w]
        x3 = xt[t + 3 * w]
        x4 = xt[t + 4 * w]
        x5 = xt[t + 5 * w]
        x6 = xt[t + 6 * w]
        x7 = xt[t + 7 * w]
        r0 = _masked(gt[t], x0, a, b, zero, one, gzero)
        r1 = _masked(gt[t + w], x1, a, b, zero, one, gzero)
        r2 = _masked(gt[t + 2 * w], x2, a, b, zero, one, gzero)
        r3 = _masked(gt[t + 3 * w], x3, a, b, zero, one, gzero)
        r4 = _masked(gt[t + 4 * w], x4, a, b, zero, one, gzero)
        r5 = _masked(gt[t + 5 * w], x5, a, b, zero, one, gzero)
        r6 = _masked(gt[t + 6 * w], x6, a, b, zero, one, gzero)
        r7 = _masked(gt[t + 7 * w], x7, a, b, zero, one, gzero)
        part_g[t] = tree8(r0, r1, r2, r3, r4, r5, r6, r7)
        part_gc[t] = tree8(r0 * (x0 - mu), r1 * (x1 - mu), r2 * (x2 - mu), r3 * (x3 - mu),
                           r4 * (x4 - mu), r5 * (x5 - mu), r6 * (x6 - mu), r7 * (x7 - mu))


@njit_cached
def bn_relu_grad_sums(g, per, xm, alpha, beta, mean, s, e, sum_g, sum_gc):
    """Column sums over rows [s, e) of r = g * (x alpha + beta > 0) and r * (x - mean),
    summed as numba_kernels.bn_grad_sums_rows sums g and g * (x - mean) (spans of 8 wide
    rows from row s in the arrays' dtype, then float64: see its NOTE). A broadcast g (per >
    1) is copied span by span to a buffer of x's rows."""
    c = xm.shape[1]
    zero = xm.dtype.type(0)
    one = g.dtype.type(1)
    gzero = g.dtype.type(0)
    sub = grad_sum_rows(c)
    w = sub * c
    span = GRAD_SUM_CHUNK * sub
    tiles = np.empty((3, w), xm.dtype)
    tile_of(alpha, sub, tiles[0])
    tile_of(beta, sub, tiles[1])
    tile_of(mean, sub, tiles[2])
    acc_g = np.zeros(c, np.float64)
    acc_gc = np.zeros(c, np.float64)
    part_g = np.empty(w, g.dtype)
    part_gc = np.empty(w, g.dtype)
    rows_g = np.empty(0 if per == 1 else span * c, g.dtype)
    gf = g.reshape(-1)
    xf = xm.reshape(-1)
    gi = s // per  # g's row, advanced every ``per`` rows (no division per row)
    left = per - (s - gi * per)
    i = s
    # NOTE: two loops: with the per test inside one, the span's loop ran 1.2-1.5x slower
    while per == 1 and i + span <= e:
        _span_sums(gf[i * c:(i + span) * c], xf[i * c:(i + span) * c], tiles, w, zero, one,
                   gzero, part_g, part_gc)
        add_wide_parts(part_g, part_gc, sub, c, acc_g, acc_gc)  # (float64: a loop apart)
        i += span
    while per != 1 and i + span <= e:
        for q in range(span):
            for j in range(c):
                rows_g[q * c + j] = g[gi, j]
            gi, left = _next_g_row(gi, left, per)
        _span_sums(rows_g, xf[i * c:(i + span) * c], tiles, w, zero, one, gzero, part_g,
                   part_gc)
        add_wide_parts(part_g, part_gc, sub, c, acc_g, acc_gc)
        i += span
    gi = i // per
    left = per - (i - gi * per)
    for row in range(i, e):
        for j in range(c):
            xv = xm[row, j]
            r = _masked(g[gi, j], xv, alpha[j], beta[j], zero, one, gzero)
            acc_g[j] += r
            acc_gc[j] += r * (xv - mean[j])
        gi, left = _next_g_row(gi, left, per)
    for j in range(c):
        sum_g[j] = acc_g[j]
        sum_gc[j] = acc_gc[j]


@numba.njit(inline="always")
def _add_rows(dx, s, e, acc):
    """acc[j] += dx[i, j] (in float64) for the rows i of [s, e) in row order: 8 rows of a
    column added in registers, each in turn (the same sums as row by row, fewer loads and
    stores of acc)."""
    i = s
    while i + 8 <= e:
        for j in range(acc.shape[0]):
            v = acc[j]
            for q in numba.literal_unroll((0, 1, 2, 3, 4, 5, 6, 7)):
                v += dx[i + q, j]
            acc[j] = v
        i += 8
    for row in range(i, e):
        for j in range(acc.shape[0]):
            acc[j] += dx[row, j]


@njit_cached
def bn_relu_grad_dx(g, per, xm, alpha, beta, mean, a, b, k, s, e, dx, sum_dx):
    """dx = a r + b (x - mean) + k per column over rows [s, e), r = g * (x alpha + beta > 0);
    where ``sum_dx`` has an entry per column (size 0: none wanted), also the float64 column
    sums of the dx it writes (a conv bias's gradient, as numba_kernels.column_sums would sum
    dx afterwards). A gradient of x's shape (per 1) is run in tiles of whole rows
    (numba_kernels.tile_rows: the same float operations per value)."""
    c = xm.shape[1]
    zero = xm.dtype.type(0)
    one = g.dtype.type(1)
    gzero = g.dtype.type(0)
    summing = sum_dx.shape[0] > 0
    acc = np.zeros(c if summing else 0, np.float64)
    i = s
    if per == 1:
        rows = tile_rows(c)
        size = rows * c
        tiles = np.empty((6, size), xm.dtype)
        tile_of(alpha, rows, tiles[0])
        tile_of(beta, rows, tiles[1])
        tile_of(mean, rows, tiles[2])
        tile_of(a, rows, tiles[3])
        tile_of(b, rows, tiles[4])
        tile_of(k, rows, tiles[5])
        gf = g.reshape(-1)
        xf = xm.reshape(-1)
        df = dx.reshape(-1)
        summed = i
        while i + rows <= e:
            gt = gf[i * c:i * c + size]
            xt = xf[i * c:i * c + size]
            dt = df[i * c:i * c + size]
            for t in range(size):
                xv = xt[t]
                r = _masked(gt[t], xv, tiles[0, t], tiles[1, t], zero, one, gzero)
                dt[t] = r * tiles[3, t] + (xv - tiles[2, t]) * tiles[4, t] + tiles[5, t]
            i += rows
            if summing and i - summed >= 32:  # the rows just written (in cache), in order
                _add_rows(dx, summed, i, acc)
                summed = i
        if summing:
            _add_rows(dx, summed, i, acc)
    gi = i // per  # g's row, advanced every ``per`` rows (no division per row)
    left = per - (i - gi * per)
    for row in range(i, e):
        for j in range(c):
            xv = xm[row, j]
            r = _masked(g[gi, j], xv, alpha[j], beta[j], zero, one, gzero)
            dx[row, j] = r * a[j] + (xv - mean[j]) * b[j] + k[j]
        if summing:  # (a second loop over the row just written: summing in the first one
            for j in range(c):  # was 20% slower at 16 channels)
                acc[j] += dx[row, j]
        gi, left = _next_g_row(gi, left, per)
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
