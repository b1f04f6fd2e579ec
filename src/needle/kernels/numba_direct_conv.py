"""Direct convolution loops (no im2col matrix, no BLAS) for float32 NHWC convolutions whose
output channels come in multiples of 16: the forward and the kernel gradient (kernels/conv.py
chooses where they run and says why).

Each loop keeps a register tile of accumulators: 8 output positions x 16 or 32 output channels
(the forward), or 8 kernel taps x 16 or 32 output channels (the kernel gradient; a first
layer's 27 or 9 taps x 16 channels in one tile), one or two 512-bit vectors per row. A tap's
input value is broadcast against a row of the kernel (or of the output gradient): any
stride reads scalars only, so a stride-2 layer costs what a stride-1 layer does. The tile
lives in a stack array (``stack_f32``) indexed by constants only, so LLVM keeps it in
registers; the functions ask LLVM for 512-bit vectors (``wide_vectors``: on this
machine's AVX-512 LLVM prefers 256 bits, half the multiply-adds per instruction).

Sums run in a fixed order (the forward: taps in (i, j, c) order, then the bias, added where
the tile is stored; the first layer's loop starts from the bias, measured faster there; the
kernel gradient: images, then positions in order, per block of images), whatever thread runs
a block. A tile leaves its registers a row at a time through ``copy_tile_row`` /
``add_tile_row`` (numba_intrinsics): written as element loops, LLVM compiled each tile's
epilogue to 256 scalar loads, adds and stores (it could not tell the stack tile from the
output), 10-20% of a layer. With them and the scratch padded by whole rows (only its border
zeroed; a BatchNorm + ReLU input made by a branch-free select), one thread, 32 images, the
stride-2 layers' forward C16->32 32x32 0.625 -> 0.540 ms (oneDNN channels-last 0.50),
C32->64 16x16 0.595 -> 0.529 (0.46), kernel gradient C16->32 0.749 -> 0.631 (0.60), the
same bits.
Each image is copied into a zero-padded scratch (``xp``, (H + 2p, W + 2p, C)) first; a row's last
tile of positions overlaps the one before rather than sticking out (the forward needs Wo >= 8,
or 16), and ``off[t]`` is tap t's offset in the flat scratch (the kernel gradient).

NOTE: measured on one thread (thread CPU time, medians, machine shared with other jobs): batch
64, C16->32 32x32 stride 2 forward 2.50 ms (im2col + OpenBLAS) -> 1.28 ms (oneDNN channels-last
1.15 ms); C32->64 16x16 stride 2 1.59 -> 1.32 ms (oneDNN 1.04); the same loops at 256 bits
1.55 / 1.73 ms; vectorized over positions instead of channels with 512-bit vectors: no better.
Flat indices are unsigned (``np.uint64``): numba wraps negative signed indices around, and
LLVM then gathers element by element (8.6 ms instead of 0.9 on a first layer).

The 16- and 32-channel variants of each loop (``forward16`` / ``forward32``, ``input_grad16``
/ ``input_grad32``, the kernel gradients) are written out apart on purpose: a tile's width
must be a literal for the stack tile to stay in registers, and a factory making them from one
template would return closures, which numba's disk cache cannot keep (each would compile at
every process start).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange, types
from numba.extending import overload

from ..backend.numba_support import njit_cached
from ..backend.parallel_loops import njit_parallel
from .numba_intrinsics import (
    add_tile_row,
    copy_tile_row,
    stack_f32,
    store_tile_columns,
    wide_vectors,
)


def _jit(fn):  # type: ignore[no-untyped-def]
    """needle's njit (disk cache, numpy error model, nogil) with FMA contraction."""
    return njit_cached(fn, fastmath={"contract"})


def _copy_rows(a, b, top, left, xf, row):  # type: ignore[no-untyped-def]
    """xf[(top + y) * row + (left + x) * C + c] = a[b, y, x, c]: image b's rows into the flat
    padded scratch (numba's overload below picks the loop by a's layout)."""
    raise NotImplementedError("compiled only (numba)")


@overload(_copy_rows, inline="always", jit_options={"fastmath": {"contract"},
                                                     "error_model": "numpy"})
def _copy_rows_loops(a, b, top, left, xf, row):  # type: ignore[no-untyped-def]
    """A C-contiguous ``a`` (its type's layout): each row one flat run of W*C values (its
    flat view made once; made per row it cost 56 vs 26 us for 64 32x32x3 images). Any
    other layout (a first layer's NCHW view): value by value, a column's 3 channels at once
    where C is 3 (46 us vs 127 by a loop over C)."""
    if isinstance(a, types.Array) and a.layout == "C":
        def flat(a, b, top, left, xf, row):  # type: ignore[no-untyped-def]
            u = np.uint64
            h, w, c = a.shape[1], a.shape[2], a.shape[3]
            af = a.reshape(-1)
            run = w * c
            for y in range(h):
                start = u((top + y) * row + left * c)
                src = u((b * h + y) * run)
                for k in range(run):
                    xf[start + u(k)] = af[src + u(k)]
        return flat

    def strided(a, b, top, left, xf, row):  # type: ignore[no-untyped-def]
        u = np.uint64
        h, w, c = a.shape[1], a.shape[2], a.shape[3]
        ub = u(b)
        for y in range(h):
            start = u((top + y) * row + left * c)
            uy = u(y)
            if c == 3:
                for x in range(w):
                    ux = u(x)
                    xf[start + u(3) * ux] = a[ub, uy, ux, u(0)]
                    xf[start + u(3) * ux + u(1)] = a[ub, uy, ux, u(1)]
                    xf[start + u(3) * ux + u(2)] = a[ub, uy, ux, u(2)]
            else:
                for x in range(w):
                    for ch in range(c):
                        xf[start + u(x * c + ch)] = a[ub, uy, u(x), u(ch)]
    return strided


def _bn_relu_rows(a, b, top, left, xf, row, alpha, beta):  # type: ignore[no-untyped-def]
    """_copy_rows of relu(a * alpha + beta) per channel (``pad_image_bn_relu``'s values)."""
    raise NotImplementedError("compiled only (numba)")


# NOTE: no contraction here: inlined into a contracting loop, x * alpha + beta became one FMA
# (a rounding apart from BatchNorm's two: checked, a 4.8e-7 difference)
@overload(_bn_relu_rows, inline="always", jit_options={"fastmath": False,
                                                        "error_model": "numpy"})
def _bn_relu_rows_loops(a, b, top, left, xf, row, alpha, beta):  # type: ignore[no-untyped-def]
    """A C-contiguous ``a``: each row read as one flat run (1.4x the 4-d indexing's speed:
    90 vs 129 us for 32 images 32x32x16); any other layout value by value. ``|``, not
    ``or``: a branch-free select the loop vectorizes."""
    if isinstance(a, types.Array) and a.layout == "C":
        def flat(a, b, top, left, xf, row, alpha, beta):  # type: ignore[no-untyped-def]
            u = np.uint64
            h, w, c = a.shape[1], a.shape[2], a.shape[3]
            zero = a.dtype.type(0)
            af = a.reshape(-1)
            for y in range(h):
                start = u((top + y) * row + left * c)
                src = u((b * h + y) * w * c)
                for x in range(w):
                    for ch in range(c):
                        v = af[src + u(x * c + ch)] * alpha[u(ch)] + beta[u(ch)]
                        xf[start + u(x * c + ch)] = v if (v > zero) | (v != v) else zero
        return flat

    def strided(a, b, top, left, xf, row, alpha, beta):  # type: ignore[no-untyped-def]
        u = np.uint64
        h, w, c = a.shape[1], a.shape[2], a.shape[3]
        zero = a.dtype.type(0)
        for y in range(h):
            start = u((top + y) * row + left * c)
            for x in range(w):
                for ch in range(c):
                    v = a[u(b), u(y), u(x), u(ch)] * alpha[u(ch)] + beta[u(ch)]
                    xf[start + u(x * c + ch)] = v if (v > zero) | (v != v) else zero
    return strided


@_jit
def zero_border(xf, top, left, h, w, c, hp, wp):
    """Zero the border of a flat (hp, wp, c) scratch around an h x w image placed at row
    ``top``, column ``left``: the rows above and below it, the columns left and right of it
    (the image's own values are written next, so nothing else is zeroed)."""
    u = np.uint64
    row = wp * c
    for k in range(top * row):
        xf[u(k)] = 0.0
    for k in range((top + h) * row, hp * row):
        xf[u(k)] = 0.0
    for y in range(h):
        base = (top + y) * row
        for k in range(left * c):
            xf[u(base + k)] = 0.0
        for k in range((left + w) * c, row):
            xf[u(base + k)] = 0.0


@_jit
def pad_image(a, b, padding, xp):
    """xp[padding + y, padding + x, :] = a[b, y, x, :], zeros elsewhere in xp (C-contiguous,
    at least (H + padding, W + padding, C)): only the border is zeroed, then the rows copied
    (``_copy_rows``). One thread, thread CPU time, 64 images 32x32x3, us: 104-127 -> 26-32
    (NHWC), 112-122 -> 46-48 (an NCHW view); 32x32x16 219 -> 163 (memory-bound past L2)."""
    h, w, c = a.shape[1], a.shape[2], a.shape[3]
    xf = xp.reshape(-1)
    zero_border(xf, padding, padding, h, w, c, xp.shape[0], xp.shape[1])
    _copy_rows(a, b, padding, padding, xf, xp.shape[1] * c)


@njit_cached
def pad_image_bn_relu(a, b, padding, xp, alpha, beta):
    """pad_image of relu(a * alpha + beta) per channel: BatchNorm's forward (``x * alpha +
    beta``, two roundings, numba_kernels.affine's operations) then ReLU (numba_kernels.relu's:
    NaN kept, -0.0 -> +0.0), the values those ops store, made as the image is copied (a
    ``BatchNorm -> ReLU -> conv`` block's input is never stored: kernels/conv_bn_relu.py)."""
    h, w, c = a.shape[1], a.shape[2], a.shape[3]
    xf = xp.reshape(-1)
    zero_border(xf, padding, padding, h, w, c, xp.shape[0], xp.shape[1])
    _bn_relu_rows(a, b, padding, padding, xf, xp.shape[1] * c, alpha, beta)


@_jit
def pad_gradient(g, b, kh, kw, gp):
    """gp[kh + y, kw + x, :] = g[b, y, x, :], zeros elsewhere (the input gradient loops'
    scratch: taps past g's edges read zeros); the border zeroed, the rows copied as runs
    (this was a whole-scratch zeroing and a copy value by value)."""
    h, w, c = g.shape[1], g.shape[2], g.shape[3]
    gf = gp.reshape(-1)
    zero_border(gf, kh, kw, h, w, c, gp.shape[0], gp.shape[1])
    _copy_rows(g, b, kh, kw, gf, gp.shape[1] * c)


@_jit
def pad_input(a, b, padding, xp, alpha, beta):
    """pad_image, or where ``alpha`` has an entry per channel (size 0: none)
    pad_image_bn_relu: the loops' input is then relu(a * alpha + beta)."""
    if alpha.shape[0] == 0:
        pad_image(a, b, padding, xp)
    else:
        pad_image_bn_relu(a, b, padding, xp, alpha, beta)


@_jit
def forward32(a, w, bias, stride, padding, ho, wo, xp, out, alpha, beta):
    """out[n, y, x, k] = (sum over taps (i, j, c) of xpad[n, s*y + i, s*x + j, c] * w[i, j, c,
    k]) + bias[k] for NHWC ``a`` (images of one block), ``w`` (kh, kw, C, C_out), C_out % 32
    == 0, Wo >= 8; where ``alpha`` and ``beta`` hold C values (size 0: none), xpad is that of
    relu(a * alpha + beta) instead (``pad_input``)."""
    wide_vectors()
    tile = stack_f32(256)
    acc = numba.carray(tile, (8, 32))
    u = np.uint64
    kh, kw, c, co = w.shape
    for b in range(a.shape[0]):
        pad_input(a, b, padding, xp, alpha, beta)
        for y in range(ho):
            for xs in range(0, wo, 8):
                x0 = min(xs, wo - 8)  # the last tile overlaps the one before: no partial one
                for k0 in range(0, co, 32):
                    for p in range(8):
                        for q in range(32):
                            acc[p, q] = 0.0
                    for i in range(kh):
                        yy = u(y * stride + i)
                        for j in range(kw):
                            xb = x0 * stride + j
                            for ci in range(c):
                                uc = u(ci)
                                v0 = xp[yy, u(xb), uc]
                                v1 = xp[yy, u(xb + stride), uc]
                                v2 = xp[yy, u(xb + 2 * stride), uc]
                                v3 = xp[yy, u(xb + 3 * stride), uc]
                                v4 = xp[yy, u(xb + 4 * stride), uc]
                                v5 = xp[yy, u(xb + 5 * stride), uc]
                                v6 = xp[yy, u(xb + 6 * stride), uc]
                                v7 = xp[yy, u(xb + 7 * stride), uc]
                                for q in range(32):
                                    wq = w[u(i), u(j), uc, u(k0) + u(q)]
                                    acc[0, q] += v0 * wq
                                    acc[1, q] += v1 * wq
                                    acc[2, q] += v2 * wq
                                    acc[3, q] += v3 * wq
                                    acc[4, q] += v4 * wq
                                    acc[5, q] += v5 * wq
                                    acc[6, q] += v6 * wq
                                    acc[7, q] += v7 * wq
                    for p in range(8):
                        add_tile_row(out, (b, y, x0 + p, k0), tile, p * 32, 32, bias,
                                     (k0,))


@_jit
def forward16(a, w, bias, stride, padding, ho, wo, xp, out, alpha, beta):
    """forward32 for C_out % 16 == 0: tiles of 8 positions x 16 channels."""
    wide_vectors()
    tile = stack_f32(128)
    acc = numba.carray(tile, (8, 16))
    u = np.uint64
    kh, kw, c, co = w.shape
    for b in range(a.shape[0]):
        pad_input(a, b, padding, xp, alpha, beta)
        for y in range(ho):
            for xs in range(0, wo, 8):
                x0 = min(xs, wo - 8)  # the last tile overlaps the one before: no partial one
                for k0 in range(0, co, 16):
                    for p in range(8):
                        for q in range(16):
                            acc[p, q] = 0.0
                    for i in range(kh):
                        yy = u(y * stride + i)
                        for j in range(kw):
                            xb = x0 * stride + j
                            for ci in range(c):
                                uc = u(ci)
                                v0 = xp[yy, u(xb), uc]
                                v1 = xp[yy, u(xb + stride), uc]
                                v2 = xp[yy, u(xb + 2 * stride), uc]
                                v3 = xp[yy, u(xb + 3 * stride), uc]
                                v4 = xp[yy, u(xb + 4 * stride), uc]
                                v5 = xp[yy, u(xb + 5 * stride), uc]
                                v6 = xp[yy, u(xb + 6 * stride), uc]
                                v7 = xp[yy, u(xb + 7 * stride), uc]
                                for q in range(16):
                                    wq = w[u(i), u(j), uc, u(k0) + u(q)]
                                    acc[0, q] += v0 * wq
                                    acc[1, q] += v1 * wq
                                    acc[2, q] += v2 * wq
                                    acc[3, q] += v3 * wq
                                    acc[4, q] += v4 * wq
                                    acc[5, q] += v5 * wq
                                    acc[6, q] += v6 * wq
                                    acc[7, q] += v7 * wq
                    for p in range(8):
                        add_tile_row(out, (b, y, x0 + p, k0), tile, p * 16, 16, bias,
                                     (k0,))


@_jit
def weight_grad32(a, g, stride, padding, off, xp, xf, part, alpha, beta):
    """part[t, k] += sum over the images of ``a`` of (the sum over positions (y, x), in order,
    of xpad[n, (y, x) + tap t] * g[n, y, x, k]), image by image; ``part`` (len(off), C_out),
    C_out % 32 == 0, len(off) % 8 == 0 (taps past the kernel's read offset 0; the caller drops
    them); ``alpha``, ``beta``: as forward32's."""
    wide_vectors()
    tile = stack_f32(256)
    acc = numba.carray(tile, (8, 32))
    u = np.uint64
    ho, wo, co = g.shape[1], g.shape[2], g.shape[3]
    wp, c = xp.shape[1], xp.shape[2]
    for b in range(a.shape[0]):
        pad_input(a, b, padding, xp, alpha, beta)
        for t0 in range(0, off.shape[0], 8):
            o0, o1, o2, o3 = u(off[t0]), u(off[t0 + 1]), u(off[t0 + 2]), u(off[t0 + 3])
            o4, o5, o6, o7 = u(off[t0 + 4]), u(off[t0 + 5]), u(off[t0 + 6]), u(off[t0 + 7])
            for k0 in range(0, co, 32):
                for r in range(8):
                    for q in range(32):
                        acc[r, q] = 0.0
                for y in range(ho):
                    for x in range(wo):
                        base = u((y * stride * wp + x * stride) * c)
                        v0 = xf[base + o0]
                        v1 = xf[base + o1]
                        v2 = xf[base + o2]
                        v3 = xf[base + o3]
                        v4 = xf[base + o4]
                        v5 = xf[base + o5]
                        v6 = xf[base + o6]
                        v7 = xf[base + o7]
                        for q in range(32):
                            gq = g[u(b), u(y), u(x), u(k0) + u(q)]
                            acc[0, q] += v0 * gq
                            acc[1, q] += v1 * gq
                            acc[2, q] += v2 * gq
                            acc[3, q] += v3 * gq
                            acc[4, q] += v4 * gq
                            acc[5, q] += v5 * gq
                            acc[6, q] += v6 * gq
                            acc[7, q] += v7 * gq
                for r in range(8):
                    add_tile_row(part, (t0 + r, k0), tile, r * 32, 32, part, (t0 + r, k0))


@_jit
def weight_grad64(a, g, stride, padding, off, xp, xf, part, alpha, beta):
    """weight_grad32 for C_out % 64 == 0: tiles of 4 taps x 64 channels (4 broadcasts and 4
    loads a position for 16 multiply-adds, where 8 taps x 32 channels twice take 16 and 4:
    C32->64 16x16 stride 2, one thread, 1.85 -> 1.0 ms; im2col 1.2-1.5)."""
    wide_vectors()
    tile = stack_f32(256)
    acc = numba.carray(tile, (4, 64))
    u = np.uint64
    ho, wo, co = g.shape[1], g.shape[2], g.shape[3]
    wp, c = xp.shape[1], xp.shape[2]
    for b in range(a.shape[0]):
        pad_input(a, b, padding, xp, alpha, beta)
        for t0 in range(0, off.shape[0], 4):
            o0, o1, o2, o3 = u(off[t0]), u(off[t0 + 1]), u(off[t0 + 2]), u(off[t0 + 3])
            for k0 in range(0, co, 64):
                for r in range(4):
                    for q in range(64):
                        acc[r, q] = 0.0
                for y in range(ho):
                    for x in range(wo):
                        base = u((y * stride * wp + x * stride) * c)
                        v0 = xf[base + o0]
                        v1 = xf[base + o1]
                        v2 = xf[base + o2]
                        v3 = xf[base + o3]
                        for q in range(64):
                            gq = g[u(b), u(y), u(x), u(k0) + u(q)]
                            acc[0, q] += v0 * gq
                            acc[1, q] += v1 * gq
                            acc[2, q] += v2 * gq
                            acc[3, q] += v3 * gq
                for r in range(4):
                    add_tile_row(part, (t0 + r, k0), tile, r * 64, 64, part, (t0 + r, k0))


@_jit
def _first_layer_taps(off, wp, c):
    """Whether ``off`` is a 3x3 kernel's over 3 or 1 channels (a first layer's 27 or 9 taps,
    (i, j, c) order, padded to a multiple of 8) in a scratch ``wp`` columns wide."""
    if not ((c == 3 and off.shape[0] == 32) or (c == 1 and off.shape[0] == 16)):
        return False
    for i in range(3):
        for j in range(3):
            for ch in range(c):
                if off[(i * 3 + j) * c + ch] != (i * wp + j) * c + ch:
                    return False
    return True


@_jit
def weight_grad_first_layer(a, g, stride, padding, xp, xf, part):
    """weight_grad16 for a first layer (a 3x3 kernel over 3 input channels, any stride,
    C_out % 16 == 0): part[(i, j, c), k] += the same sums in the same order (per image, from
    zero, positions (y, x) in order, one multiply-add each), all 27 taps x 16 channels in
    one tile of 27 512-bit accumulators: a position costs one 16-channel load of g and 27
    multiply-adds, each input value broadcast from memory by the multiply-add itself (its
    assembly: no spills), where 8 x 16 tiles took 4 passes over the positions, 32 taps for 27.
    One thread, 64 images 32x32 to 16 channels, thread CPU time, us (oneDNN channels-last):
    quiet 556 -> 335 (390) NHWC, 539 -> 382 (414) an NCHW view; loaded 772-831 -> 436-453
    (438-475); the same bits. (T2's tile using each broadcast for 3 column taps spilled.)"""
    wide_vectors()
    acc = numba.carray(stack_f32(432), (27, 16))
    u = np.uint64
    ho, wo, co = g.shape[1], g.shape[2], g.shape[3]
    wp = xp.shape[1]
    row = u(wp * 3)
    for b in range(a.shape[0]):
        pad_image(a, b, padding, xp)
        for k0 in range(0, co, 16):
            for t in range(27):
                for q in range(16):
                    acc[t, q] = 0.0
            for y in range(ho):
                for x in range(wo):
                    p0 = u((y * stride * wp + x * stride) * 3)  # rows i = 0, 1, 2 of the taps
                    p1 = p0 + row
                    p2 = p1 + row
                    for q in range(16):
                        gq = g[u(b), u(y), u(x), u(k0) + u(q)]
                        acc[0, q] += xf[p0] * gq
                        acc[1, q] += xf[p0 + u(1)] * gq
                        acc[2, q] += xf[p0 + u(2)] * gq
                        acc[3, q] += xf[p0 + u(3)] * gq
                        acc[4, q] += xf[p0 + u(4)] * gq
                        acc[5, q] += xf[p0 + u(5)] * gq
                        acc[6, q] += xf[p0 + u(6)] * gq
                        acc[7, q] += xf[p0 + u(7)] * gq
                        acc[8, q] += xf[p0 + u(8)] * gq
                        acc[9, q] += xf[p1] * gq
                        acc[10, q] += xf[p1 + u(1)] * gq
                        acc[11, q] += xf[p1 + u(2)] * gq
                        acc[12, q] += xf[p1 + u(3)] * gq
                        acc[13, q] += xf[p1 + u(4)] * gq
                        acc[14, q] += xf[p1 + u(5)] * gq
                        acc[15, q] += xf[p1 + u(6)] * gq
                        acc[16, q] += xf[p1 + u(7)] * gq
                        acc[17, q] += xf[p1 + u(8)] * gq
                        acc[18, q] += xf[p2] * gq
                        acc[19, q] += xf[p2 + u(1)] * gq
                        acc[20, q] += xf[p2 + u(2)] * gq
                        acc[21, q] += xf[p2 + u(3)] * gq
                        acc[22, q] += xf[p2 + u(4)] * gq
                        acc[23, q] += xf[p2 + u(5)] * gq
                        acc[24, q] += xf[p2 + u(6)] * gq
                        acc[25, q] += xf[p2 + u(7)] * gq
                        acc[26, q] += xf[p2 + u(8)] * gq
            for t in range(27):
                for q in range(16):
                    part[u(t), u(k0) + u(q)] += acc[t, q]


@_jit
def weight_grad_one_channel(a, g, stride, padding, xp, xf, part):
    """weight_grad_first_layer for one input channel (MNIST-size first layers): 9 taps x 16
    channels in one tile, the same sums in the same order as weight_grad16 (which took 2
    passes of 8 taps, 16 for 9). One thread, 64 images 28x28 to 16 channels, thread CPU
    time, us: 251 -> 149 (oneDNN channels-last 218); the same bits."""
    wide_vectors()
    acc = numba.carray(stack_f32(144), (9, 16))
    u = np.uint64
    ho, wo, co = g.shape[1], g.shape[2], g.shape[3]
    wp = xp.shape[1]
    row = u(wp)
    for b in range(a.shape[0]):
        pad_image(a, b, padding, xp)
        for k0 in range(0, co, 16):
            for t in range(9):
                for q in range(16):
                    acc[t, q] = 0.0
            for y in range(ho):
                for x in range(wo):
                    p0 = u(y * stride * wp + x * stride)  # rows i = 0, 1, 2 of the taps
                    p1 = p0 + row
                    p2 = p1 + row
                    for q in range(16):
                        gq = g[u(b), u(y), u(x), u(k0) + u(q)]
                        acc[0, q] += xf[p0] * gq
                        acc[1, q] += xf[p0 + u(1)] * gq
                        acc[2, q] += xf[p0 + u(2)] * gq
                        acc[3, q] += xf[p1] * gq
                        acc[4, q] += xf[p1 + u(1)] * gq
                        acc[5, q] += xf[p1 + u(2)] * gq
                        acc[6, q] += xf[p2] * gq
                        acc[7, q] += xf[p2 + u(1)] * gq
                        acc[8, q] += xf[p2 + u(2)] * gq
            for t in range(9):
                for q in range(16):
                    part[u(t), u(k0) + u(q)] += acc[t, q]


@_jit
def weight_grad16(a, g, stride, padding, off, xp, xf, part, alpha, beta):
    """weight_grad32 for C_out % 16 == 0: tiles of 8 taps x 16 channels; a first layer's 27
    or 9 taps (a 3x3 kernel over 3 or 1 channels, its input plain: ``alpha`` of size 0) go
    to ``weight_grad_first_layer`` or ``weight_grad_one_channel`` (the same sums in one
    tile)."""
    wide_vectors()
    tile = stack_f32(128)
    acc = numba.carray(tile, (8, 16))
    u = np.uint64
    ho, wo, co = g.shape[1], g.shape[2], g.shape[3]
    wp, c = xp.shape[1], xp.shape[2]
    if alpha.shape[0] == 0 and _first_layer_taps(off, wp, c):
        if c == 3:
            weight_grad_first_layer(a, g, stride, padding, xp, xf, part)
        else:
            weight_grad_one_channel(a, g, stride, padding, xp, xf, part)
        return
    for b in range(a.shape[0]):
        pad_input(a, b, padding, xp, alpha, beta)
        for t0 in range(0, off.shape[0], 8):
            o0, o1, o2, o3 = u(off[t0]), u(off[t0 + 1]), u(off[t0 + 2]), u(off[t0 + 3])
            o4, o5, o6, o7 = u(off[t0 + 4]), u(off[t0 + 5]), u(off[t0 + 6]), u(off[t0 + 7])
            for k0 in range(0, co, 16):
                for r in range(8):
                    for q in range(16):
                        acc[r, q] = 0.0
                for y in range(ho):
                    for x in range(wo):
                        base = u((y * stride * wp + x * stride) * c)
                        v0 = xf[base + o0]
                        v1 = xf[base + o1]
                        v2 = xf[base + o2]
                        v3 = xf[base + o3]
                        v4 = xf[base + o4]
                        v5 = xf[base + o5]
                        v6 = xf[base + o6]
                        v7 = xf[base + o7]
                        for q in range(16):
                            gq = g[u(b), u(y), u(x), u(k0) + u(q)]
                            acc[0, q] += v0 * gq
                            acc[1, q] += v1 * gq
                            acc[2, q] += v2 * gq
                            acc[3, q] += v3 * gq
                            acc[4, q] += v4 * gq
                            acc[5, q] += v5 * gq
                            acc[6, q] += v6 * gq
                            acc[7, q] += v7 * gq
                for r in range(8):
                    add_tile_row(part, (t0 + r, k0), tile, r * 16, 16, part, (t0 + r, k0))


@_jit
def pad_planes(a, b, padding, xp):
    """xp[c, padding + y, padding + x] = a[b, y, x, c] (NHWC ``a``, any strides), zeros
    elsewhere in xp: one image as zero-padded channel planes."""
    u = np.uint64
    h, w, c = a.shape[1], a.shape[2], a.shape[3]
    xp[:] = 0.0
    for ch in range(c):
        for y in range(h):
            for x in range(w):
                xp[u(ch), u(padding + y), u(padding + x)] = a[u(b), u(y), u(x), u(ch)]


@numba.njit(inline="always", fastmath={"contract"}, error_model="numpy")
def _few_channels_tap(xp, wt, acc, ci, yy, xb, k0, t):
    """acc[q, p] += wt[k0 + q, t] * xp[ci, yy, xb + p] (16 positions x 4 channels)."""
    u = np.uint64
    w0 = wt[u(k0), u(t)]
    w1 = wt[u(k0 + 1), u(t)]
    w2 = wt[u(k0 + 2), u(t)]
    w3 = wt[u(k0 + 3), u(t)]
    for p in range(16):
        v = xp[u(ci), u(yy), u(xb) + u(p)]
        acc[0, p] += w0 * v
        acc[1, p] += w1 * v
        acc[2, p] += w2 * v
        acc[3, p] += w3 * v


@_jit
def forward_few_channels(a, wt, bias, kh, kw, padding, ho, wo, xp, out):
    """forward32 for a first layer (stride 1, a few input channels): tiles of positions x
    channels, vectorized over the positions (a row of a padded channel plane), the kernel's
    taps broadcast; ``wt`` is (C_out, C*kh*kw) in (c, i, j) order, ``xp`` a (C, Hp, Wp)
    scratch with Wp >= Wo + kw - 1, Wo >= 16, C_out % 4 == 0 (a last tile that would stick out
    overlaps the one before instead: a partial tile's stores took acc out of registers,
    1.28 vs 0.89 ms). Rows of 32 or more positions and C_out % 8 == 0 take
    ``forward_few_channels32``'s 32 x 8 tiles; the rest 16 x 4 tiles, 256-bit vectors (there
    0.79 ms vs 0.90 with 512 bits, C3->16 32x32, batch 64, one thread). Each output is the
    bias, then the taps in (c, i, j) order, one multiply-add each, whichever tile holds it."""
    if wo >= 32 and out.shape[3] % 8 == 0:
        forward_few_channels32(a, wt, bias, kh, kw, padding, ho, wo, xp, out)
        return
    acc = numba.carray(stack_f32(64), (4, 16))
    u = np.uint64
    co, c = out.shape[3], xp.shape[0]
    for b in range(a.shape[0]):
        pad_planes(a, b, padding, xp)
        for y in range(ho):
            for xs in range(0, wo, 16):
                x0 = min(xs, wo - 16)  # the last tile overlaps the one before: no partial one
                for k0 in range(0, co, 4):
                    for q in range(4):
                        bq = bias[u(k0) + u(q)]
                        for p in range(16):
                            acc[q, p] = bq
                    if kh == 3 and kw == 3:  # constant trip counts: LLVM unrolls the taps
                        for ci in range(c):
                            for i in range(3):
                                for j in range(3):
                                    _few_channels_tap(xp, wt, acc, ci, y + i, x0 + j, k0,
                                                      (ci * 3 + i) * 3 + j)
                    else:
                        for ci in range(c):
                            for i in range(kh):
                                for j in range(kw):
                                    _few_channels_tap(xp, wt, acc, ci, y + i, x0 + j, k0,
                                                      (ci * kh + i) * kw + j)
                    for p in range(16):
                        for q in range(4):
                            out[u(b), u(y), u(x0 + p), u(k0) + u(q)] = acc[q, p]


@numba.njit(inline="always", fastmath={"contract"}, error_model="numpy")
def _few_channels_tap32(xp, wt, acc, ci, yy, xb, k0, t):
    """acc[q, p] += wt[k0 + q, t] * xp[ci, yy, xb + p] (32 positions x 8 channels)."""
    u = np.uint64
    w0, w1 = wt[u(k0), u(t)], wt[u(k0 + 1), u(t)]
    w2, w3 = wt[u(k0 + 2), u(t)], wt[u(k0 + 3), u(t)]
    w4, w5 = wt[u(k0 + 4), u(t)], wt[u(k0 + 5), u(t)]
    w6, w7 = wt[u(k0 + 6), u(t)], wt[u(k0 + 7), u(t)]
    for p in range(32):
        v = xp[u(ci), u(yy), u(xb) + u(p)]
        acc[0, p] += w0 * v
        acc[1, p] += w1 * v
        acc[2, p] += w2 * v
        acc[3, p] += w3 * v
        acc[4, p] += w4 * v
        acc[5, p] += w5 * v
        acc[6, p] += w6 * v
        acc[7, p] += w7 * v


@_jit
def forward_few_channels32(a, wt, bias, kh, kw, padding, ho, wo, xp, out):
    """forward_few_channels in tiles of 32 positions x 8 channels (Wo >= 32, C_out % 8 == 0):
    16 512-bit accumulators, two loads and eight broadcasts a tap for 16 multiply-adds, the
    tile stored transposed by ``store_tile_columns``. C3->16 32x32, batch 64, one thread:
    0.66 ms by 16 x 4 tiles -> 0.46 (oneDNN channels-last 0.55-0.60); 16 x 8 tiles 0.50. The
    same sums in the same order, so the same bits."""
    wide_vectors()
    tile = stack_f32(256)
    acc = numba.carray(tile, (8, 32))
    u = np.uint64
    co, c = out.shape[3], xp.shape[0]
    for b in range(a.shape[0]):
        pad_planes(a, b, padding, xp)
        for y in range(ho):
            for xs in range(0, wo, 32):
                x0 = min(xs, wo - 32)  # the last tile overlaps the one before: no partial one
                for k0 in range(0, co, 8):
                    for q in range(8):
                        bq = bias[u(k0) + u(q)]
                        for p in range(32):
                            acc[q, p] = bq
                    if kh == 3 and kw == 3:  # constant trip counts: LLVM unrolls the taps
                        for ci in range(c):
                            for i in range(3):
                                for j in range(3):
                                    _few_channels_tap32(xp, wt, acc, ci, y + i, x0 + j, k0,
                                                        (ci * 3 + i) * 3 + j)
                    else:
                        for ci in range(c):
                            for i in range(kh):
                                for j in range(kw):
                                    _few_channels_tap32(xp, wt, acc, ci, y + i, x0 + j, k0,
                                                        (ci * kh + i) * kw + j)
                    store_tile_columns(out, (b, y, x0, k0), tile, 32)


@_jit
def column_taps(kw, stride, padding):
    """The kernel columns j that meet each column phase r of the input gradient (xi = r + s*m:
    r + p - j a multiple of s) and their offsets in the padded g (``(r + p - j) // s + kw``):
    (js, offsets, counts), js[r, :counts[r]] in increasing j. Made once per call: inside
    the tile loops the modulo and floor division ran per tile (a 64-bit division each)."""
    js = np.empty((stride, kw), np.int64)
    offsets = np.empty((stride, kw), np.int64)
    counts = np.zeros(stride, np.int64)
    for r in range(stride):
        for j in range(kw):
            dx = r + padding - j
            if dx % stride == 0:
                js[r, counts[r]] = j
                offsets[r, counts[r]] = dx // stride + kw
                counts[r] += 1
    return js, offsets, counts


@_jit
def row_taps(yi, kh, stride, padding, is_, rows):
    """The kernel rows i that meet input row ``yi`` (yi + p - i a multiple of s), in
    increasing i, into ``is_`` with their rows of the padded g (``(yi + p - i) // s + kh``)
    into ``rows``; returns how many."""
    count = 0
    for i in range(kh):
        dy = yi + padding - i
        if dy % stride == 0:
            is_[count] = i
            rows[count] = dy // stride + kh
            count += 1
    return count


@_jit
def input_grad32(g, wt, stride, padding, gp, out):
    """out[n, yi, xi, c] = sum over taps (i, j) with yi + p - i = s*y, xi + p - j = s*x and
    over k of g[n, y, x, k] * wt[i, j, k, c] (the input gradient; ``wt`` is the kernel as (kh,
    kw, C_out, C_in), C_in % 32 == 0). Positions are taken per column phase r (xi = r + s*m,
    which all meet the same taps), in tiles of 8 consecutive m, the last tile of a phase
    overlapping the one before (every phase needs W // s >= 8 positions); ``gp`` is a scratch
    for one image's g zero-padded by kh rows and kw columns on each side, so taps past g's
    edges read zeros."""
    wide_vectors()
    tile = stack_f32(256)
    acc = numba.carray(tile, (8, 32))
    u = np.uint64
    kh, kw, co, ci = wt.shape
    h, w = out.shape[1], out.shape[2]
    js, offsets, n_cols = column_taps(kw, stride, padding)
    is_ = np.empty(kh, np.int64)
    rows = np.empty(kh, np.int64)
    for b in range(g.shape[0]):
        pad_gradient(g, b, kh, kw, gp)
        for yi in range(h):
            n_rows = row_taps(yi, kh, stride, padding, is_, rows)
            for r in range(stride):
                count = (w - r + stride - 1) // stride
                for ms in range(0, count, 8):
                    m0 = min(ms, count - 8)
                    for c0 in range(0, ci, 32):
                        for p in range(8):
                            for q in range(32):
                                acc[p, q] = 0.0
                        for ti in range(n_rows):
                            i = is_[ti]
                            yy = u(rows[ti])
                            for tj in range(n_cols[r]):
                                j = js[r, tj]
                                xb = m0 + offsets[r, tj]
                                for k in range(co):
                                    uk = u(k)
                                    v0 = gp[yy, u(xb), uk]
                                    v1 = gp[yy, u(xb + 1), uk]
                                    v2 = gp[yy, u(xb + 2), uk]
                                    v3 = gp[yy, u(xb + 3), uk]
                                    v4 = gp[yy, u(xb + 4), uk]
                                    v5 = gp[yy, u(xb + 5), uk]
                                    v6 = gp[yy, u(xb + 6), uk]
                                    v7 = gp[yy, u(xb + 7), uk]
                                    for q in range(32):
                                        wq = wt[u(i), u(j), uk, u(c0) + u(q)]
                                        acc[0, q] += v0 * wq
                                        acc[1, q] += v1 * wq
                                        acc[2, q] += v2 * wq
                                        acc[3, q] += v3 * wq
                                        acc[4, q] += v4 * wq
                                        acc[5, q] += v5 * wq
                                        acc[6, q] += v6 * wq
                                        acc[7, q] += v7 * wq
                        for p in range(8):
                            copy_tile_row(out, (b, yi, r + stride * (m0 + p), c0), tile, p * 32,
                                          32)


@_jit
def input_grad16(g, wt, stride, padding, gp, out):
    """out[n, yi, xi, c] = sum over taps (i, j) with yi + p - i = s*y, xi + p - j = s*x and
    over k of g[n, y, x, k] * wt[i, j, k, c] (the input gradient; ``wt`` is the kernel as (kh,
    kw, C_out, C_in), C_in % 16 == 0). Positions are taken per column phase r (xi = r + s*m,
    which all meet the same taps), in tiles of 8 consecutive m, the last tile of a phase
    overlapping the one before (every phase needs W // s >= 8 positions); ``gp`` is a scratch
    for one image's g zero-padded by kh rows and kw columns on each side, so taps past g's
    edges read zeros."""
    wide_vectors()
    tile = stack_f32(128)
    acc = numba.carray(tile, (8, 16))
    u = np.uint64
    kh, kw, co, ci = wt.shape
    h, w = out.shape[1], out.shape[2]
    js, offsets, n_cols = column_taps(kw, stride, padding)
    is_ = np.empty(kh, np.int64)
    rows = np.empty(kh, np.int64)
    for b in range(g.shape[0]):
        pad_gradient(g, b, kh, kw, gp)
        for yi in range(h):
            n_rows = row_taps(yi, kh, stride, padding, is_, rows)
            for r in range(stride):
                count = (w - r + stride - 1) // stride
                for ms in range(0, count, 8):
                    m0 = min(ms, count - 8)
                    for c0 in range(0, ci, 16):
                        for p in range(8):
                            for q in range(16):
                                acc[p, q] = 0.0
                        for ti in range(n_rows):
                            i = is_[ti]
                            yy = u(rows[ti])
                            for tj in range(n_cols[r]):
                                j = js[r, tj]
                                xb = m0 + offsets[r, tj]
                                for k in range(co):
                                    uk = u(k)
                                    v0 = gp[yy, u(xb), uk]
                                    v1 = gp[yy, u(xb + 1), uk]
                                    v2 = gp[yy, u(xb + 2), uk]
                                    v3 = gp[yy, u(xb + 3), uk]
                                    v4 = gp[yy, u(xb + 4), uk]
                                    v5 = gp[yy, u(xb + 5), uk]
                                    v6 = gp[yy, u(xb + 6), uk]
                                    v7 = gp[yy, u(xb + 7), uk]
                                    for q in range(16):
                                        wq = wt[u(i), u(j), uk, u(c0) + u(q)]
                                        acc[0, q] += v0 * wq
                                        acc[1, q] += v1 * wq
                                        acc[2, q] += v2 * wq
                                        acc[3, q] += v3 * wq
                                        acc[4, q] += v4 * wq
                                        acc[5, q] += v5 * wq
                                        acc[6, q] += v6 * wq
                                        acc[7, q] += v7 * wq
                        for p in range(8):
                            copy_tile_row(out, (b, yi, r + stride * (m0 + p), c0), tile, p * 16,
                                          16)



@njit_cached
def sum_in_order(parts, out):
    """out = parts[0] + parts[1] + ... (float32, left to right: the block order the kernel
    gradient's partial sums are added in, whatever ran them); one loop where seven NumPy
    additions cost ~10 us."""
    flat = out.reshape(-1)
    count = parts.shape[0]
    size = flat.shape[0]
    source = parts.reshape(count, size)
    for k in range(size):
        flat[k] = source[0, k]
    for b in range(1, count):
        for k in range(size):
            flat[k] = flat[k] + source[b, k]

def _input_grad_blocks(g, wt, stride, padding, scratch, out, count):
    """input_grad32 / input_grad16 per block of images (as _forward_blocks)."""
    n = g.shape[0]
    wide = wt.shape[3] % 32 == 0
    for blk in prange(count):
        s = n * blk // count
        e = n * (blk + 1) // count
        gp = scratch[numba.get_thread_id()]
        if wide:
            input_grad32(g[s:e], wt, stride, padding, gp, out[s:e])
        else:
            input_grad16(g[s:e], wt, stride, padding, gp, out[s:e])


def _forward_blocks(a, w, bias, stride, padding, ho, wo, scratch, out, count, alpha, beta):
    """forward32 / forward16 per block of images (block b: images n*b//count to
    n*(b+1)//count), each on a TBB thread with its own padded-image scratch (``alpha``,
    ``beta``: the loops'; size 0 for none)."""
    n = a.shape[0]
    wide = w.shape[3] % 32 == 0
    for blk in prange(count):
        s = n * blk // count
        e = n * (blk + 1) // count
        xp = scratch[numba.get_thread_id()]
        if wide:
            forward32(a[s:e], w, bias, stride, padding, ho, wo, xp, out[s:e], alpha, beta)
        else:
            forward16(a[s:e], w, bias, stride, padding, ho, wo, xp, out[s:e], alpha, beta)


def _weight_grad_blocks(a, g, stride, padding, off, scratch, parts, count, alpha, beta):
    """parts[b] = weight_grad64 / 32 / 16 of block b of images (as _forward_blocks),
    each from zero; the caller adds the parts in block order."""
    n = a.shape[0]
    co = g.shape[3]
    for blk in prange(count):
        s = n * blk // count
        e = n * (blk + 1) // count
        xp = scratch[numba.get_thread_id()]
        parts[blk][:] = 0.0
        if co % 64 == 0:
            weight_grad64(a[s:e], g[s:e], stride, padding, off, xp, xp.reshape(-1), parts[blk],
                          alpha, beta)
        elif co % 32 == 0:
            weight_grad32(a[s:e], g[s:e], stride, padding, off, xp, xp.reshape(-1), parts[blk],
                          alpha, beta)
        else:
            weight_grad16(a[s:e], g[s:e], stride, padding, off, xp, xp.reshape(-1), parts[blk],
                          alpha, beta)


def _forward_few_channels_blocks(a, wt, bias, kh, kw, padding, ho, wo, scratch, out, count):
    """forward_few_channels per block of images (as _forward_blocks)."""
    n = a.shape[0]
    for blk in prange(count):
        s = n * blk // count
        e = n * (blk + 1) // count
        forward_few_channels(a[s:e], wt, bias, kh, kw, padding, ho, wo,
                             scratch[numba.get_thread_id()], out[s:e])


forward_blocks = njit_parallel(_forward_blocks)
forward_few_channels_blocks = njit_parallel(_forward_few_channels_blocks)
input_grad_blocks = njit_parallel(_input_grad_blocks)
weight_grad_blocks = njit_parallel(_weight_grad_blocks)
