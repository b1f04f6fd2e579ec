"""The numba loops behind bn_relu_pool.py (imported only where numba is installed).

Each recomputes a BatchNorm2d + ReLU activation from NHWC ``x`` as the forward rounds it,
``v = relu(x * alpha + beta)`` (two roundings, no fused multiply-add: fastmath off; NaN
kept, as np.maximum keeps it), where numba_kernels' max pooling loops read the stored
activation: ``bn_relu_max_pool`` is max_pool_nhwc on v, ``relu_pool_scatter`` is
max_pool_scatter_nhwc on v (the same comparisons in the same order, so the same first
maxima and the same bits). ``bn_relu_pool_grad_sums_blocks`` scatters each row block's
images and runs numba_batchnorm_relu.bn_relu_grad_sums over the block's rows right after:
over rows [s, e) of a slice, the same float operations as over rows [s, e) of the whole
matrix (its spans start at s).
"""

from __future__ import annotations

import numpy as np

from ..backend.numba_support import njit_cached
from .numba_batchnorm_relu import bn_relu_grad_sums


@njit_cached
def relu_pool_scatter(x, alpha, beta, y, g, k, stride, dx):
    """dx (N, H, W, C like x; zeroed by the caller unless the windows tile it) gets g at
    each window's first position where the activation ``v = relu(x alpha + beta)`` equals y
    (or is NaN), 0 elsewhere in the window, as numba_kernels.max_pool_scatter_nhwc gives it
    for x = v. ``v``: two roundings (no fused multiply-add), NaN kept, as the forward's
    BatchNorm and ReLU compute it. Overlapping windows (stride < k) add.

    NOTE: the channel loop is branch-free (``&``, ``|``, selects; unsigned indices): written
    with ``and`` / ``or`` it branched per value, 1.03 -> 0.58 ms for 64 images 32x32x16 (one
    thread; the same bits); at 64 and 128 channels both run at memory speed."""
    u = np.uint64
    n_, ho, wo, c_ = y.shape
    overlapping = stride < k
    zero = x.dtype.type(0)
    g_zero = g.dtype.type(0)
    pending = np.empty(c_, np.bool_)
    for n in range(n_):
        un = u(n)
        for i in range(ho):
            for j in range(wo):
                ui, uj = u(i), u(j)
                for c in range(c_):
                    pending[c] = True
                for di in range(k):
                    r = u(i * stride + di)
                    for dj in range(k):
                        q = u(j * stride + dj)
                        for c in range(c_):
                            uc = u(c)
                            t = x[un, r, q, uc] * alpha[uc] + beta[uc]
                            v = t if (t > zero) | (t != t) else zero
                            hit = pending[uc] & ((v == y[un, ui, uj, uc]) | (v != v))
                            picked = g[un, ui, uj, uc] if hit else g_zero
                            if overlapping:
                                dx[un, r, q, uc] += picked
                            else:
                                dx[un, r, q, uc] = picked
                            pending[uc] = pending[uc] & (not hit)


@njit_cached
def bn_relu_pool_grad_sums_blocks(g, y, x4, xm, alpha, beta, mean, k, stride, s4, sm, sum_g,
                                  sum_gc, bounds, b0, b1):
    """For each row block q of ``bounds`` (whole images: rows n0*H*W .. n1*H*W), the
    scattered gradient of its images into ``s4`` (N, H, W, C; ``sm`` its (M, C) matrix) and
    then, while that is in cache, bn_relu_grad_sums of its rows (rows q of ``sum_g``,
    ``sum_gc``)."""
    hw = x4.shape[1] * x4.shape[2]
    for q in range(b0, b1):
        s, e = bounds[q], bounds[q + 1]
        n0, n1 = s // hw, e // hw
        relu_pool_scatter(x4[n0:n1], alpha, beta, y[n0:n1], g[n0:n1], k, stride, s4[n0:n1])
        bn_relu_grad_sums(sm[s:e], 1, xm[s:e], alpha, beta, mean, 0, e - s, sum_g[q],
                          sum_gc[q])


@njit_cached
def bn_relu_max_pool(x, alpha, beta, k, stride, out):
    """out[n, i, j, c] = max over window (i, j) of relu(x alpha + beta) (N, H, W, C ``x``),
    as numba_kernels.max_pool_nhwc pools the activation: the first position's value, then
    each larger one or NaN (a NaN, once met, stays). The activation as ``relu_pool_scatter``
    recomputes it (the forward's roundings), never stored."""
    n_, ho, wo, c_ = out.shape
    zero = x.dtype.type(0)
    for n in range(n_):
        for i in range(ho):
            for j in range(wo):
                for c in range(c_):
                    t = x[n, i * stride, j * stride, c] * alpha[c] + beta[c]
                    out[n, i, j, c] = t if (t > zero or t != t) else zero
                for di in range(k):
                    for dj in range(k):
                        if di == 0 and dj == 0:
                            continue
                        for c in range(c_):
                            t = x[n, i * stride + di, j * stride + dj, c] * alpha[c] + beta[c]
                            v = t if (t > zero or t != t) else zero
                            best = out[n, i, j, c]
                            if (v > best or v != v) and best == best:
                                out[n, i, j, c] = v


@njit_cached
def bn_relu_max_pool_blocks(x, alpha, beta, k, stride, out, bounds, b0, b1):
    """``bn_relu_max_pool`` over each block of images (bounds on the first axis)."""
    for b in range(b0, b1):
        s, e = bounds[b], bounds[b + 1]
        bn_relu_max_pool(x[s:e], alpha, beta, k, stride, out[s:e])
