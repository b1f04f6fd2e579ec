"""The numba loops behind cpu_kernels.py (imported only where numba is installed).

Top-level functions so numba can cache their machine code on disk (``cache=True``): the
first process compiles them (about a second), later ones load them. See cpu_kernels.py for
what they compute and why.
"""

from __future__ import annotations

import numba
import numpy as np

from ..backend.numba_support import njit_cached


def _jit(fn):
    """needle's njit (backend/numba_support.py) for this file's loops."""
    return njit_cached(fn)


@numba.njit(inline="always")
def _float64_column_sums(xm):
    acc = np.zeros(xm.shape[1], np.float64)
    for i in range(xm.shape[0]):
        for j in range(xm.shape[1]):
            acc[j] += xm[i, j]
    return acc


@_jit
def moments(xm, mean, var):
    """Per-column mean and biased variance of xm (two passes, float64 sums)."""
    m, c = xm.shape
    acc = _float64_column_sums(xm)
    for j in range(c):
        mean[j] = acc[j] / m
        acc[j] = 0.0
    for i in range(m):
        for j in range(c):
            d = np.float64(xm[i, j] - mean[j])
            acc[j] += d * d
    for j in range(c):
        var[j] = acc[j] / m


@_jit
def shifted_sums(xm, shift, s1, s2):
    """Float64 column sums of d = xm - shift and of d * d over a row block (shift: the whole
    matrix's first row, in float64): one pass, the parts of ``one_pass_moments``."""
    m, c = xm.shape
    acc1 = np.zeros(c, np.float64)
    acc2 = np.zeros(c, np.float64)
    i = 0
    while i + 8 <= m:  # NOTE: 8 rows per column in registers, each added in row order (the
        for j in range(c):  # same sums as one row at a time, 1.3-1.45x faster in cache)
            sh = shift[j]
            a1 = acc1[j]
            a2 = acc2[j]
            for q in numba.literal_unroll((0, 1, 2, 3, 4, 5, 6, 7)):
                d = np.float64(xm[i + q, j]) - sh
                a1 += d
                a2 += d * d
            acc1[j] = a1
            acc2[j] = a2
        i += 8
    for row in range(i, m):
        for j in range(c):
            d = np.float64(xm[row, j]) - shift[j]
            acc1[j] += d
            acc2[j] += d * d
    for j in range(c):
        s1[j] = acc1[j]
        s2[j] = acc2[j]


@_jit
def one_pass_moments(xm, mean, var):
    """Per-column mean and biased variance of xm in one pass: float64 sums of x - x[0] and
    its square (shifted by the first row, so the subtraction below does not cancel for
    data far from 0); the same arithmetic as cpu_kernels.column_statistics' blocked path."""
    m, c = xm.shape
    shift = np.empty(c, np.float64)
    for j in range(c):
        shift[j] = xm[0, j]
    acc1 = np.empty(c, np.float64)
    acc2 = np.empty(c, np.float64)
    shifted_sums(xm, shift, acc1, acc2)
    for j in range(c):
        mean[j] = shift[j] + acc1[j] / m
        var[j] = max(acc2[j] - acc1[j] * (acc1[j] / m), 0.0) / m


@_jit
def column_sums(xm, out):
    """out[j] = sum of column j of xm (float64 sums; a float64 ``out`` keeps them whole: one
    row block's part of a threaded sum)."""
    acc = _float64_column_sums(xm)
    for j in range(xm.shape[1]):
        out[j] = acc[j]


#: elements per tile of per-column constants in BatchNorm's elementwise passes (``tile_rows``)
TILE_ELEMENTS = 256


@numba.njit(inline="always")
def tile_rows(c):
    """Rows per tile of an elementwise pass over (M, c) rows: as many whole rows as fit in
    TILE_ELEMENTS (at least one). NOTE: a loop over each row's c columns ran 2 vectors of 8
    float32 per row at 16 channels, with its setup and runtime alias checks each time: a
    pass over tiles of whole rows, the per-column constants repeated along a tile, runs the
    same float operations per value 1.2-1.8x faster (2**16 elements in cache, 16-32
    channels). (An if, not max(): numba 0.68's max of these ints crashed at run time.)"""
    rows = TILE_ELEMENTS // c
    if rows < 1:
        rows = 1
    return rows


@numba.njit(inline="always")
def tile_of(v, rows, out_row):
    """out_row[q * c + j] = v[j] for each of ``rows`` rows: v repeated along a tile."""
    c = v.shape[0]
    for q in range(rows):
        for j in range(c):
            out_row[q * c + j] = v[j]


@_jit
def affine_rows(xm, scale, shift, s, e, out):
    """out = xm * scale + shift per column over rows [s, e), in tiles of whole rows."""
    c = xm.shape[1]
    rows = tile_rows(c)
    size = rows * c
    tiles = np.empty((2, size), xm.dtype)
    tile_of(scale, rows, tiles[0])
    tile_of(shift, rows, tiles[1])
    xf = xm.reshape(-1)
    of = out.reshape(-1)
    i = s
    while i + rows <= e:
        xt = xf[i * c:i * c + size]
        ot = of[i * c:i * c + size]
        for t in range(size):
            ot[t] = xt[t] * tiles[0, t] + tiles[1, t]
        i += rows
    for row in range(i, e):
        for j in range(c):
            out[row, j] = xm[row, j] * scale[j] + shift[j]


@_jit
def affine(xm, scale, shift, out):
    """out = xm * scale + shift, per column."""
    affine_rows(xm, scale, shift, 0, xm.shape[0], out)


@_jit
def bn_grad(gm, xm, mean, inv, weight, dx, dweight, dbias):
    """BatchNorm's (dx, dweight, dbias) from the output gradient gm (two passes)."""
    m, c = xm.shape
    sum_g = np.empty(c, np.float64)
    sum_gc = np.empty(c, np.float64)
    bn_grad_sums(gm, xm, mean, sum_g, sum_gc)
    a = np.empty(c, xm.dtype)
    b = np.empty(c, xm.dtype)
    k = np.empty(c, xm.dtype)
    for j in range(c):
        scale = weight[j] * inv[j]
        a[j] = scale
        b[j] = -scale * inv[j] * inv[j] * (sum_gc[j] / m)
        k[j] = -scale * (sum_g[j] / m)
        dbias[j] = sum_g[j]
        dweight[j] = sum_gc[j] * inv[j]
    # dx = weight * inv * (g - dbias / n - xhat * dweight / n) = a g + b (x - mean) + k
    bn_grad_dx_rows(gm, xm, mean, a, b, k, 0, m, dx)


@_jit
def bn_forward(xm, weight, bias, mean, var, eps, out):
    """Training BatchNorm's y = x * alpha + beta with alpha = weight / sqrt(var + eps) and
    beta = bias - mean * alpha per column, in the arrays' dtype (eps has it too), so the same
    roundings as the NumPy formulas in core/ops_norm.py's BatchNorm.compute."""
    c = xm.shape[1]
    alpha = np.ones(c, xm.dtype)  # (ones: 1 in the arrays' dtype, not float64)
    beta = np.empty(c, xm.dtype)
    for j in range(c):
        alpha[j] = weight[j] * (alpha[j] / np.sqrt(var[j] + eps))
        beta[j] = bias[j] - mean[j] * alpha[j]
    affine(xm, alpha, beta, out)


@_jit
def bn_alpha_beta(weight, bias, mean, var, eps, alpha, beta):
    """``bn_forward``'s per-column alpha and beta (the same roundings), for its blocked path
    (cpu_kernels.batch_norm_forward: then ``affine`` over row blocks)."""
    for j in range(alpha.shape[0]):
        alpha[j] = 1.0
        alpha[j] = weight[j] * (alpha[j] / np.sqrt(var[j] + eps))
        beta[j] = bias[j] - mean[j] * alpha[j]


@_jit
def bn_grad_var(gm, xm, mean, var, eps, weight, dx, dweight, dbias):
    """``bn_grad`` given the variance: inv = 1 / sqrt(var + eps) in the arrays' dtype (as
    BatchNormGrad.compute's NumPy does), then bn_grad's sums and dx pass."""
    c = xm.shape[1]
    inv = np.ones(c, xm.dtype)  # (ones: 1 in the arrays' dtype, not float64)
    for j in range(c):
        inv[j] = inv[j] / np.sqrt(var[j] + eps)
    bn_grad(gm, xm, mean, inv, weight, dx, dweight, dbias)


@_jit
def centered_square_sums(xm, mean, out):
    """out[j] = sum over rows of (xm[i, j] - mean[j])**2 in float64 (moments' second pass)."""
    m, c = xm.shape
    acc = np.zeros(c, np.float64)
    for i in range(m):
        for j in range(c):
            d = np.float64(xm[i, j] - mean[j])
            acc[j] += d * d
    for j in range(c):
        out[j] = acc[j]


#: wide rows per chunk of BatchNorm's gradient sums (bn_grad_sums_rows; the tree in ``tree8``)
GRAD_SUM_CHUNK = 8

#: values per wide row of those chunks (whole rows of C channels: ``grad_sum_rows``)
GRAD_SUM_WIDTH = 64


@numba.njit(inline="always")
def tree8(v0, v1, v2, v3, v4, v5, v6, v7):
    """The sum of eight values as a fixed tree (in their dtype): one chunk of rows of
    BatchNorm's gradient sums."""
    return ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7))


@numba.njit(inline="always")
def grad_sum_rows(c):
    """Rows of c channels in a wide row of the gradient sums: as many whole rows as fit in
    GRAD_SUM_WIDTH values (at least one)."""
    sub = GRAD_SUM_WIDTH // c
    if sub < 1:
        sub = 1
    return sub


@numba.njit(inline="always")
def add_wide_parts(part_g, part_gc, sub, c, acc_g, acc_gc):
    """acc[j] += a chunk's sums (in float64) for each of its ``sub`` rows in turn."""
    for q in range(sub):
        for j in range(c):
            acc_g[j] += part_g[q * c + j]
            acc_gc[j] += part_gc[q * c + j]


@_jit
def bn_grad_sums_rows(gm, xm, mean, s, e, sum_g, sum_gc):
    """bn_grad's first pass over rows [s, e): column sums of g and g * (x - mean).

    The rows are cut, from row s, into spans of GRAD_SUM_CHUNK wide rows of ``sub =
    grad_sum_rows(C)`` rows each (8 rows where C >= 64, 32 at 16 channels); each value of a
    wide row is summed with the same position of the span's other 7 (``tree8``, in the
    arrays' dtype: rows q, q + sub, ..., q + 7 sub of a column), and the span's sums, sub
    row q after q, then the rows after the last whole span are added in float64 in row
    order. NOTE: the float64 sum of every value cost a float32 -> float64 conversion and a
    float64 add per value, and the float64 type held the vectorized loop to 4 lanes: the
    pass was bound by that arithmetic, not by memory; the wide rows give the vectorized
    loop 64 values at any C (2**16 elements in cache, one thread, 16-128 channels: 15-20 us
    -> 8.7-10.4; the fused BN+ReLU sums 25-39 -> 11.5-12.3).
    A float32 chunk sum's rounding, ~3 units of the last place of its absolute sum, is far
    below the tests' tolerances against PyTorch. numba_batchnorm_relu.bn_relu_grad_sums
    sums the same way (the same bits as relu_grad then this)."""
    c = xm.shape[1]
    sub = grad_sum_rows(c)
    w = sub * c
    span = GRAD_SUM_CHUNK * sub
    means = np.empty(w, xm.dtype)
    tile_of(mean, sub, means)
    acc_g = np.zeros(c, np.float64)
    acc_gc = np.zeros(c, np.float64)
    part_g = np.empty(w, gm.dtype)
    part_gc = np.empty(w, gm.dtype)
    gf = gm.reshape(-1)
    xf = xm.reshape(-1)
    i = s
    while i + span <= e:
        gt = gf[i * c:(i + span) * c]
        xt = xf[i * c:(i + span) * c]
        for t in range(w):  # (the chunk's sums in the arrays' dtype: 8 float32 lanes)
            mu = means[t]
            g0 = gt[t]
            g1 = gt[t + w]
            g2 = gt[t + 2 * w]
            g3 = gt[t + 3 * w]
            g4 = gt[t + 4 * w]
            g5 = gt[t + 5 * w]
            g6 = gt[t + 6 * w]
            g7 = gt[t + 7 * w]
            part_g[t] = tree8(g0, g1, g2, g3, g4, g5, g6, g7)
            part_gc[t] = tree8(g0 * (xt[t] - mu), g1 * (xt[t + w] - mu),
                               g2 * (xt[t + 2 * w] - mu), g3 * (xt[t + 3 * w] - mu),
                               g4 * (xt[t + 4 * w] - mu), g5 * (xt[t + 5 * w] - mu),
                               g6 * (xt[t + 6 * w] - mu), g7 * (xt[t + 7 * w] - mu))
        add_wide_parts(part_g, part_gc, sub, c, acc_g, acc_gc)  # (float64: a loop apart)
        i += span
    for row in range(i, e):
        for j in range(c):
            g = gm[row, j]
            acc_g[j] += g
            acc_gc[j] += g * (xm[row, j] - mean[j])
    for j in range(c):
        sum_g[j] = acc_g[j]
        sum_gc[j] = acc_gc[j]


@_jit
def bn_grad_sums(gm, xm, mean, sum_g, sum_gc):
    """bn_grad's first pass over a row block (``bn_grad_sums_rows`` over all its rows)."""
    bn_grad_sums_rows(gm, xm, mean, 0, xm.shape[0], sum_g, sum_gc)


@_jit
def bn_grad_dx_rows(gm, xm, mean, a, b, k, s, e, dx):
    """bn_grad's second pass over rows [s, e): dx = a g + b (x - mean) + k per column, in
    tiles of whole rows (``tile_rows``)."""
    c = xm.shape[1]
    rows = tile_rows(c)
    size = rows * c
    tiles = np.empty((4, size), xm.dtype)
    tile_of(mean, rows, tiles[0])
    tile_of(a, rows, tiles[1])
    tile_of(b, rows, tiles[2])
    tile_of(k, rows, tiles[3])
    gf = gm.reshape(-1)
    xf = xm.reshape(-1)
    df = dx.reshape(-1)
    i = s
    while i + rows <= e:
        gt = gf[i * c:i * c + size]
        xt = xf[i * c:i * c + size]
        dt = df[i * c:i * c + size]
        for t in range(size):
            dt[t] = gt[t] * tiles[1, t] + (xt[t] - tiles[0, t]) * tiles[2, t] + tiles[3, t]
        i += rows
    for row in range(i, e):
        for j in range(c):
            dx[row, j] = gm[row, j] * a[j] + (xm[row, j] - mean[j]) * b[j] + k[j]


@_jit
def bn_grad_dx(gm, xm, mean, a, b, k, dx):
    """bn_grad's second pass over a row block: dx = a g + b (x - mean) + k per column."""
    bn_grad_dx_rows(gm, xm, mean, a, b, k, 0, xm.shape[0], dx)


# -- row blocks: the passes above over rows bounds[b]:bounds[b + 1] for blocks b0 .. b1-1 (blocks
# fixed by the shape, cpu_kernels.row_blocks), block b's float64 sums in row b of the sums'
# arrays; numba_parallel_batchnorm.py runs the same loops per block under prange
@_jit
def block_order_sums(parts, out):
    """out[j] = parts[0, j] + parts[1, j] + ... (row blocks' float64 sums, added in block
    order: np.add.reduce(parts, axis=0) adds them so too, except for one column, pairwise)."""
    for j in range(parts.shape[1]):
        out[j] = parts[0, j]
    for b in range(1, parts.shape[0]):
        for j in range(parts.shape[1]):
            out[j] += parts[b, j]


@_jit
def shifted_moments(xm, s1, s2, mean, var):
    """``one_pass_moments``'s mean and variance from its sums over row blocks (``s1``, ``s2``:
    (blocks, C) float64 ``shifted_sums`` of x - x[0]), the blocks added in block order."""
    m, c = xm.shape
    acc1 = np.empty(c, np.float64)
    acc2 = np.empty(c, np.float64)
    block_order_sums(s1, acc1)
    block_order_sums(s2, acc2)
    for j in range(c):
        shift = np.float64(xm[0, j])
        mean[j] = shift + acc1[j] / m
        var[j] = max(acc2[j] - acc1[j] * (acc1[j] / m), 0.0) / m


@_jit
def bn_grad_constants(sum_g, sum_gc, inv, weight, m, a, b, k, dweight, dbias):
    """``bn_grad``'s per-column constants from its sums over row blocks (``sum_g``, ``sum_gc``:
    (blocks, C) float64, added in block order): dx = a g + b (x - mean) + k, dweight, dbias."""
    c = inv.shape[0]
    acc_g = np.empty(c, np.float64)
    acc_gc = np.empty(c, np.float64)
    block_order_sums(sum_g, acc_g)
    block_order_sums(sum_gc, acc_gc)
    for j in range(c):
        scale = weight[j] * inv[j]
        a[j] = scale
        b[j] = -scale * inv[j] * inv[j] * (acc_gc[j] / m)
        k[j] = -scale * (acc_g[j] / m)
        dbias[j] = acc_g[j]
        dweight[j] = acc_gc[j] * inv[j]


@_jit
def column_sums_blocks(xm, out, bounds, b0, b1):
    """``column_sums`` of each row block (``out``: (blocks, C) float64)."""
    for b in range(b0, b1):
        column_sums(xm[bounds[b]:bounds[b + 1]], out[b])


@_jit
def shifted_sums_blocks(xm, shift, s1, s2, bounds, b0, b1):
    """``shifted_sums`` of each row block (``s1``, ``s2``: (blocks, C) float64)."""
    for b in range(b0, b1):
        shifted_sums(xm[bounds[b]:bounds[b + 1]], shift, s1[b], s2[b])


@_jit
def centered_square_sums_blocks(xm, mean, out, bounds, b0, b1):
    """``centered_square_sums`` of each row block (``out``: (blocks, C) float64)."""
    for b in range(b0, b1):
        centered_square_sums(xm[bounds[b]:bounds[b + 1]], mean, out[b])


@_jit
def affine_blocks(xm, scale, shift, out, bounds, b0, b1):
    """``affine`` over each row block."""
    for b in range(b0, b1):
        affine_rows(xm, scale, shift, bounds[b], bounds[b + 1], out)


@_jit
def bn_grad_sums_blocks(gm, xm, mean, sum_g, sum_gc, bounds, b0, b1):
    """``bn_grad_sums`` of each row block (``sum_g``, ``sum_gc``: (blocks, C) float64)."""
    for b in range(b0, b1):
        bn_grad_sums_rows(gm, xm, mean, bounds[b], bounds[b + 1], sum_g[b], sum_gc[b])


@_jit
def bn_grad_dx_blocks(gm, xm, mean, a, b, k, dx, bounds, b0, b1):
    """``bn_grad_dx`` over each row block."""
    for q in range(b0, b1):
        bn_grad_dx_rows(gm, xm, mean, a, b, k, bounds[q], bounds[q + 1], dx)


@_jit
def col2im_add(t, ho, wo, kh, kw, stride, padding, out):
    """out[n, s*y+i-p, s*x+j-p, :] += t[(n, y, x), (i, j, :)] over every tap that lands inside
    out (the adjoint of im2col); out is zeroed first. t is (N*Ho*Wo, kh*kw*C), out (N, H, W, C).
    """
    n, h, w, c = out.shape
    out[:] = 0.0
    for b in range(n):
        for yo in range(ho):
            for xo in range(wo):
                row = (b * ho + yo) * wo + xo
                for i in range(kh):
                    y = stride * yo + i - padding
                    if y < 0 or y >= h:
                        continue
                    for j in range(kw):
                        x = stride * xo + j - padding
                        if x < 0 or x >= w:
                            continue
                        base = (i * kw + j) * c
                        for ch in range(c):
                            out[b, y, x, ch] += t[row, base + ch]


@_jit
def im2col_rows(a, kh, kw, stride, padding, ho, wo, cols):
    """cols[(n, y, x), (i, j, :)] = a[n, s*y+i-p, s*x+j-p, :], zeros where that falls in the
    padding: im2col read straight from the unpadded NHWC ``a`` (no padded copy first). cols
    is (N*Ho*Wo, kh*kw*C) or one column wider, that column set to ones (a bias's column)."""
    n, h, w, c = a.shape
    taps = kh * kw * c
    ones = cols.shape[1] > taps
    for b in range(n):
        for yo in range(ho):
            for xo in range(wo):
                row = (b * ho + yo) * wo + xo
                for i in range(kh):
                    y = stride * yo + i - padding
                    for j in range(kw):
                        x = stride * xo + j - padding
                        base = (i * kw + j) * c
                        if y < 0 or y >= h or x < 0 or x >= w:
                            for ch in range(c):
                                cols[row, base + ch] = 0.0
                        else:
                            for ch in range(c):
                                cols[row, base + ch] = a[b, y, x, ch]
                if ones:
                    cols[row, taps] = 1.0


@_jit
def im2col_channels_first(x, kh, kw, stride, padding, ho, wo, cols):
    """cols[n, (c, i, j), (y, x)] = x[n, c, s*y+i-p, s*x+j-p] for NCHW ``x``, zeros where that
    falls in the padding: the NCHW im2col read straight from the unpadded input (no padded
    copy first). cols is (N, C*kh*kw, Ho*Wo) or one row taller, that row set to ones.

    NOTE: the bounds test per element is faster here than valid column ranges worked out
    per row (0.33 vs 1.1 ms on 64 x 3 x 32 x 32, k3: LLVM vectorized only this form)."""
    n, c, h, w = x.shape
    taps = c * kh * kw
    for b in range(n):
        for ch in range(c):
            for i in range(kh):
                for j in range(kw):
                    row = (ch * kh + i) * kw + j
                    for yo in range(ho):
                        y = stride * yo + i - padding
                        base = yo * wo
                        if y < 0 or y >= h:
                            for xo in range(wo):
                                cols[b, row, base + xo] = 0.0
                            continue
                        for xo in range(wo):
                            xx = stride * xo + j - padding
                            if xx < 0 or xx >= w:
                                cols[b, row, base + xo] = 0.0
                            else:
                                cols[b, row, base + xo] = x[b, ch, y, xx]
        for row in range(taps, cols.shape[1]):
            for k in range(ho * wo):
                cols[b, row, k] = 1.0


@_jit
def max_pool_nhwc(x, k, stride, out):
    """out[n, i, j, c] = max of x[n, i*s: i*s+k, j*s: j*s+k, c] (NaN propagates, as
    np.maximum); channels innermost, so NHWC memory is read in order."""
    n_, ho, wo, c_ = out.shape
    for n in range(n_):
        for i in range(ho):
            for j in range(wo):
                for c in range(c_):
                    out[n, i, j, c] = x[n, i * stride, j * stride, c]
                for di in range(k):
                    for dj in range(k):
                        if di == 0 and dj == 0:
                            continue
                        for c in range(c_):
                            v = x[n, i * stride + di, j * stride + dj, c]
                            best = out[n, i, j, c]
                            if (v > best or v != v) and best == best:  # a NaN, once met, stays
                                out[n, i, j, c] = v


@_jit
def max_pool_scatter_nhwc(x, y, g, k, stride, dx):
    """dx (like x; zeroed unless the windows tile it exactly) gets g at each window's first
    position where x equals y (or is NaN: then y is NaN too, and torch sends the gradient to
    the NaN), 0 elsewhere in the window. Channels innermost (reads NHWC memory in order);
    ``pending`` marks the channels whose maximum is not found yet. Branch-free selects let
    LLVM vectorize the channel loop; overlapping windows (stride < k) add instead."""
    n_, ho, wo, c_ = y.shape
    overlapping = stride < k
    pending = np.empty(c_, np.bool_)
    for n in range(n_):
        for i in range(ho):
            for j in range(wo):
                pending[:] = True
                for di in range(k):
                    for dj in range(k):
                        r, q = i * stride + di, j * stride + dj
                        for c in range(c_):
                            v = x[n, r, q, c]
                            hit = pending[c] and (v == y[n, i, j, c] or v != v)
                            picked = g[n, i, j, c] if hit else 0.0
                            if overlapping:
                                dx[n, r, q, c] += picked
                            else:
                                dx[n, r, q, c] = picked
                            pending[c] = pending[c] and not hit


@_jit
def max_pool_blocks(x, k, stride, out, bounds, b0, b1):
    """``max_pool_nhwc`` over each block of images (bounds on the first axis)."""
    for b in range(b0, b1):
        s, e = bounds[b], bounds[b + 1]
        max_pool_nhwc(x[s:e], k, stride, out[s:e])


@_jit
def max_pool_scatter_blocks(x, y, g, k, stride, dx, bounds, b0, b1):
    """``max_pool_scatter_nhwc`` over each block of images (bounds on the first axis)."""
    for b in range(b0, b1):
        s, e = bounds[b], bounds[b + 1]
        max_pool_scatter_nhwc(x[s:e], y[s:e], g[s:e], k, stride, dx[s:e])


@_jit
def relu(a, out):
    """out = max(a, 0) over 1-D arrays, as np.maximum(a, 0) gives it: NaN kept (its sign
    too), -0.0 -> +0.0."""
    zero = a.dtype.type(0)
    for i in range(a.shape[0]):
        v = a[i]
        out[i] = v if (v > zero or v != v) else zero


@_jit
def relu_grad(a, g, out):
    """out = g * (1 if a > 0 else 0) over 1-D arrays: ReLU's adjoint exactly as NumPy's mask
    product gives it (0 * g keeps -0.0 and NaN from g)."""
    zero = a.dtype.type(0)
    one = g.dtype.type(1)
    gzero = g.dtype.type(0)
    for i in range(a.shape[0]):
        out[i] = g[i] * (one if a[i] > zero else gzero)


@_jit
def linear_epilogue(c, rs, re, cs, ce, bias, residual, relu):
    """c[rs:re, cs:ce] = relu(residual + (c + bias)) in place, element by element as the
    separate ops round it: ``c + bias`` (the bias a (cols,) row), then ``residual + that``
    where ``residual`` has rows (an (rows, cols) array; ``(0, 0)``: none), then
    ``np.maximum(v, 0)`` where ``relu`` (NaN kept, -0.0 -> +0.0). One branch-free inner loop
    per case, so each vectorizes."""
    zero = c.dtype.type(0)
    with_residual = residual.shape[0] > 0
    for i in range(rs, re):
        row = c[i, cs:ce]
        b = bias[cs:ce]
        if with_residual:
            r = residual[i, cs:ce]
            if relu:
                for j in range(row.shape[0]):
                    v = r[j] + (row[j] + b[j])
                    row[j] = v if (v > zero or v != v) else zero
            else:
                for j in range(row.shape[0]):
                    row[j] = r[j] + (row[j] + b[j])
        elif relu:
            for j in range(row.shape[0]):
                v = row[j] + b[j]
                row[j] = v if (v > zero or v != v) else zero
        else:
            for j in range(row.shape[0]):
                row[j] = row[j] + b[j]


@_jit
def add_row(xm, b, out):
    """out = xm + b for an (M, C) matrix and a (C,) row (a conv bias on NHWC activations)."""
    m, c = xm.shape
    for i in range(m):
        for j in range(c):
            out[i, j] = xm[i, j] + b[j]


@_jit
def relu_grad_rows(a, g, out):
    """relu_grad over 4-d C-contiguous arrays where ``g``'s leading three axes may have length
    1 (broadcast over them: the gradient of a global average pool); its last axis is a's.
    Each row of the last axis is a 1-d slice (indexing the flat arrays instead did not
    vectorize: 2.5x slower)."""
    zero = a.dtype.type(0)
    one = g.dtype.type(1)
    gzero = g.dtype.type(0)
    n0, n1, n2, n3 = a.shape
    g0, g1, g2 = g.shape[0], g.shape[1], g.shape[2]
    af = a.reshape(-1)
    gf = g.reshape(-1)
    of = out.reshape(-1)
    for r in range(n0 * n1 * n2):
        k = r % n2
        q = r // n2
        j = q % n1
        i = q // n1
        src = (((i if g0 > 1 else 0) * g1 + (j if g1 > 1 else 0)) * g2
               + (k if g2 > 1 else 0)) * n3
        arow = af[r * n3:(r + 1) * n3]
        grow = gf[src:src + n3]
        orow = of[r * n3:(r + 1) * n3]
        for m in range(n3):
            orow[m] = grow[m] * (one if arow[m] > zero else gzero)
