"""The numba loops of the Winograd F(4x4, 3x3) convolution (winograd.py says why and how).

Three tile transforms, each over one block of consecutive tiles (winograd.py hands blocks to
threads): a 6x6 input tile to B^T d B, a 6x6 product tile back to the 4x4 output A^T m A,
and a 4x4 output-gradient tile to A g A^T (the adjoint of the output transform, for the
kernel gradient). Each 2-D transform is the 1-D one applied to the tile's columns, then to
its rows. Every array is seen as a matrix of C-channel rows (an NHWC array as (N*H*W, C), a
block of (T, 36, C) tiles as (36*T, C)), and a 1-D transform maps rows
``first + i * step`` of one matrix to rows of another, one short loop per output row.
The input and gradient transforms lay a block out by tile ((T, 36, C), the forward's) or by
tile position ((36, T, C): the kernel gradient's ``weight_grad_chunk``, whose 36 products
then each read two contiguous matrices and add into the chunk's partial sums by gemm).

NOTE: the 1-D transforms' expressions live in numba_winograd_rows.py as intrinsics that load
six rows, compute and store, on 16 channels at once and then on the channels past the last run
of 16 one by one: no loop and no overlap check. They replaced element loops, one per output row
(one loop writing six rows stayed scalar: twelve pointers, more than LLVM checks for overlap at
run time), which ran scalar at 16 channels and at any count cost more in checks and set-up than
in arithmetic (one thread, 4096 tiles: input transform 1.55 -> 0.83 ms at 16 channels, 1.71 ->
1.09 at 32; output transform 1.14 -> 0.71 at 32, 1.93 -> 1.33 at 64). The loops' expressions in
their order, so the same values; only NaN payloads can differ (which NaN an operation keeps
when both operands are NaN depends on operand order). Rows are addressed by index rather than
through slices: a slice in numba is a reference-counted view, and at ~100 per tile their atomic
counts cost more than the arithmetic (both measured 2-3x slower). Longer loops over flat arrays
(a tile row's 6 C values at once) were 5x slower: numba wraps negative flat indices around, and
for an index ``offset + k`` LLVM then gathers element by element.
"""

from __future__ import annotations

import numba
import numpy as np

from ..backend.numba_support import njit_cached
from .numba_intrinsics import copy_tile_row, stack_f32, wide_vectors
from .numba_kernels import _jit
from .numba_winograd_rows import a1, a16, at1, at16, bt1, bt16


@numba.njit(inline="always")
def _bt(src, s0, ss, dst, d0, ds):
    """dst rows d0 + a*ds (a < 6) = B^T (src rows s0 + i*ss, i < 6); F(4, 3) with the points
    0, 1, -1, 2, -2 and infinity."""
    whole = dst.shape[1] // 16 * 16
    for k in range(0, whole, 16):  # 16 channels at once, as vectors
        bt16(src, s0, ss, dst, d0, ds, k)
    for k in range(whole, dst.shape[1]):
        bt1(src, s0, ss, dst, d0, ds, k)


@numba.njit(inline="always")
def _at(src, s0, ss, dst, d0, ds):
    """dst rows d0 + a*ds (a < 4) = A^T (src rows s0 + i*ss, i < 6)."""
    whole = dst.shape[1] // 16 * 16
    for k in range(0, whole, 16):  # 16 channels at once, as vectors
        at16(src, s0, ss, dst, d0, ds, k)
    for k in range(whole, dst.shape[1]):
        at1(src, s0, ss, dst, d0, ds, k)


@numba.njit(inline="always")
def _a(src, s0, ss, dst, d0, ds):
    """dst rows d0 + a*ds (a < 6) = A (src rows s0 + i*ss, i < 4): the adjoint of _at."""
    whole = dst.shape[1] // 16 * 16
    for k in range(0, whole, 16):  # 16 channels at once, as vectors
        a16(src, s0, ss, dst, d0, ds, k)
    for k in range(whole, dst.shape[1]):
        a1(src, s0, ss, dst, d0, ds, k)


@numba.njit(inline="always")
def _gather(rows, n, h, w, y0, x0, size, d):
    """d row size*i + j = the row of position (y0 + i, x0 + j) of image n (i, j < size) in
    rows, an (N*H*W, C) view of an NHWC array; zeros outside the image (a border tile)."""
    for i in range(size):
        for j in range(size):
            yy, xx = y0 + i, x0 + j
            dst = size * i + j
            if 0 <= yy < h and 0 <= xx < w:
                src = (n * h + yy) * w + xx
                for k in range(rows.shape[1]):
                    d[dst, k] = rows[src, k]
            else:
                for k in range(rows.shape[1]):
                    d[dst, k] = 0.0


@njit_cached
def _gather_bn_relu(rows, n, h, w, y0, x0, d, alpha, beta):
    """_gather (6x6) of relu(x * alpha + beta): BatchNorm's forward and ReLU as
    numba_kernels.affine and relu compute them (the values those ops would store), zeros
    outside the image (the padding of the activation, not of x)."""
    zero = rows.dtype.type(0)
    for i in range(6):
        for j in range(6):
            yy, xx = y0 + i, x0 + j
            dst = 6 * i + j
            if 0 <= yy < h and 0 <= xx < w:
                src = (n * h + yy) * w + xx
                for k in range(rows.shape[1]):
                    v = rows[src, k] * alpha[k] + beta[k]
                    d[dst, k] = v if (v > zero or v != v) else zero
            else:
                for k in range(rows.shape[1]):
                    d[dst, k] = 0.0


@numba.njit(inline="always")
def _input_tiles(x, padding, tiles_h, tiles_w, t0, count, tiles, tile_step, position_step,
                 alpha, beta):
    """tiles row ``t * tile_step + (6a + b) * position_step`` = (B^T d_t B)[a, b] for tiles
    t0 + t (t < count; numbered (n, ty, tx) in order), d_t being the 6x6 window of x (N, H,
    W, C) at (4 ty - padding, 4 tx - padding), zeros outside x. ``tiles`` is a matrix of C
    columns: (36, 1) lays a block out by tile, (1, count) by tile position. Where ``alpha``
    and ``beta`` hold C values (size 0: none) the tiles are those of relu(x * alpha + beta)
    (``_gather_bn_relu``; kernels/conv_bn_relu.py)."""
    n_img, h, w, c = x.shape
    rows = x.reshape(n_img * h * w, c)
    d = np.zeros((36, c), x.dtype)  # a border tile, zero-padded (row 6i + j)
    r = np.empty((36, c), x.dtype)  # B^T d (row 6a + j)
    for t in range(count):
        n, rem = divmod(t0 + t, tiles_h * tiles_w)
        ty, tx = divmod(rem, tiles_w)
        y0 = 4 * ty - padding
        x0 = 4 * tx - padding
        if alpha.shape[0] == 0 and y0 >= 0 and x0 >= 0 and y0 + 6 <= h and x0 + 6 <= w:
            base = (n * h + y0) * w + x0
            for j in range(6):  # columns, read in place: r = B^T d
                _bt(rows, base + j, w, r, j, 6)
        else:
            if alpha.shape[0] == 0:
                _gather(rows, n, h, w, y0, x0, 6, d)
            else:
                _gather_bn_relu(rows, n, h, w, y0, x0, d, alpha, beta)
            for j in range(6):
                _bt(d, j, 6, r, j, 6)
        for a in range(6):  # rows: tiles = r B
            _bt(r, 6 * a, 1, tiles, t * tile_step + 6 * a * position_step, position_step)


@_jit
def input_tiles(x, padding, tiles_h, tiles_w, t0, out, alpha, beta):
    """out[t, 6a + b] = (B^T d_t B)[a, b] for tiles t0 + t (``_input_tiles``, ``alpha`` and
    ``beta`` its), out being a block of (T, 36, C) tiles."""
    _input_tiles(x, padding, tiles_h, tiles_w, t0, out.shape[0], out.reshape(-1, x.shape[3]),
                 36, 1, alpha, beta)


@_jit
def output_tiles(m, tiles_h, tiles_w, t0, out, bias):
    """out[n, 4 ty + i, 4 tx + j, :] = (A^T m_t A)[i, j] (+ bias) for tiles t0 + t, whose 6x6
    products are m[t, 6a + b, :]; positions past the edge of out are dropped. ``bias`` is
    (C,) (the conv's bias, added while the tile's rows are in cache) or empty (none)."""
    n_img, h, w, c = out.shape
    biased = bias.shape[0] > 0
    tiles = m.reshape(-1, c)
    rows = out.reshape(n_img * h * w, c)
    r = np.empty((24, c), m.dtype)  # A^T m (row 6i + b)
    o = np.empty((16, c), m.dtype)  # a border tile's 4x4 outputs (row 4i + j)
    for t in range(m.shape[0]):
        n, rem = divmod(t0 + t, tiles_h * tiles_w)
        ty, tx = divmod(rem, tiles_w)
        for b in range(6):  # columns: r = A^T m
            _at(tiles, 36 * t + b, 6, r, b, 6)
        y0, x0 = 4 * ty, 4 * tx
        if y0 + 4 <= h and x0 + 4 <= w:
            for i in range(4):  # rows: out = r A, straight into place
                _at(r, 6 * i, 1, rows, (n * h + y0 + i) * w + x0, 1)
                if biased:
                    for j in range(4):
                        dst = (n * h + y0 + i) * w + x0 + j
                        for k in range(c):
                            rows[dst, k] += bias[k]
        else:
            for i in range(4):
                _at(r, 6 * i, 1, o, 4 * i, 1)
            for i in range(min(4, h - y0)):
                for j in range(min(4, w - x0)):
                    dst = (n * h + y0 + i) * w + x0 + j
                    for k in range(c):
                        rows[dst, k] = o[4 * i + j, k]
                    if biased:
                        for k in range(c):
                            rows[dst, k] += bias[k]


@numba.njit(inline="always")
def _gradient_tiles(g, tiles_h, tiles_w, t0, count, tiles, tile_step, position_step):
    """tiles row ``t * tile_step + (6a + b) * position_step`` = (A g_t A^T)[a, b] for tiles
    t0 + t (t < count), g_t being the 4x4 window of the output gradient g (N, Ho, Wo, C),
    zeros past its edge: the adjoint of output_tiles. Layouts as ``_input_tiles``."""
    n_img, h, w, c = g.shape
    rows = g.reshape(n_img * h * w, c)
    d = np.zeros((16, c), g.dtype)  # a border tile, zero-padded (row 4i + j)
    r = np.empty((24, c), g.dtype)  # A g (row 4a + j)
    for t in range(count):
        n, rem = divmod(t0 + t, tiles_h * tiles_w)
        ty, tx = divmod(rem, tiles_w)
        y0 = 4 * ty
        x0 = 4 * tx
        if y0 + 4 <= h and x0 + 4 <= w:
            base = (n * h + y0) * w + x0
            for j in range(4):  # columns, read in place: r = A g
                _a(rows, base + j, w, r, j, 4)
        else:
            _gather(rows, n, h, w, y0, x0, 4, d)
            for j in range(4):
                _a(d, j, 4, r, j, 4)
        for a in range(6):  # rows: tiles = r A^T
            _a(r, 4 * a, 1, tiles, t * tile_step + 6 * a * position_step, position_step)


@_jit
def gradient_tiles(g, tiles_h, tiles_w, t0, out):
    """out[t, 6a + b] = (A g_t A^T)[a, b] for tiles t0 + t (``_gradient_tiles``), out being a
    block of (T, 36, C) tiles."""
    _gradient_tiles(g, tiles_h, tiles_w, t0, out.shape[0], out.reshape(-1, g.shape[3]), 36, 1)


@numba.njit(inline="always")
def _gemm(fn, trans_a, beta, a, b, c):
    """c = op(a) @ b + beta c by the ctypes cblas gemm ``fn`` (kernels/openblas_gemm.py; row
    major, each 2-d array with a unit inner stride): op(a) is a where ``trans_a`` is 111
    (NoTrans), a.T where 112 (Trans)."""
    m, n = c.shape
    k = b.shape[0]
    item = c.itemsize
    fn(101, trans_a, 111, m, n, k, 1.0, a.ctypes, a.strides[0] // item, b.ctypes,
       b.strides[0] // item, beta, c.ctypes, c.strides[0] // item)


@_jit
def weight_grad_chunk(gemm, x, g, padding, tiles_h, tiles_w, t_start, t_end, block, du,
                      v_flat, g_flat, alpha, beta):
    """du (36, C_in, C_out) = sum over tiles [t_start, t_end) of V^T (A g A^T) per tile
    position: the kernel gradient's share of one chunk of tiles, in float32. Blocks of
    ``block`` tiles are transformed by position (``v_flat``, ``g_flat``: scratch for one
    block, (36, block, C) each) and each position's product V[p]^T @ G[p] is added into du[p]
    by the gemm ``gemm`` itself (beta 1 after the first block): the same sums in the same
    order whichever thread runs the chunk. ``alpha``, ``beta``: ``_input_tiles``'s."""
    c_in = x.shape[3]
    c_out = g.shape[3]
    gemm_beta = 0.0
    for t0 in range(t_start, t_end, block):
        count = min(block, t_end - t0)
        v = v_flat[:36 * count * c_in].reshape((36, count, c_in))
        gt = g_flat[:36 * count * c_out].reshape((36, count, c_out))
        _input_tiles(x, padding, tiles_h, tiles_w, t0, count, v.reshape((36 * count, c_in)),
                     1, count, alpha, beta)
        _gradient_tiles(g, tiles_h, tiles_w, t0, count, gt.reshape((36 * count, c_out)), 1,
                        count)
        for p in range(36):
            _gemm(gemm, 112, gemm_beta, v[p], gt[p], du[p])
        gemm_beta = 1.0


def _transform_columns(t, m, out, c0, c1):  # type: ignore[no-untyped-def]
    """out[:, c0:c1] = t @ m[:, c0:c1] for the kernel transform's (36, 9) matrix or its
    adjoint's (9, 36) (``t``; rows a multiple of 3) and a float32 (K, N) ``m``: each value
    the chain of multiply-adds from zero in k order that OpenBLAS's gemm makes of it (the
    same bits as NumPy's product; tests/test_winograd.py compares). Tiles of 3 rows x 32
    columns in 512-bit registers, the last columns (past a multiple of 32 from c0) one at a
    time. OpenBLAS took 250-280 us for the (36, 9) @ (9, 16384) product of a 128 x 128 layer
    on one thread (K = 9 is too thin for its packed kernel); this loop ~155."""
    wide_vectors()
    tile = stack_f32(96)
    acc = numba.carray(tile, (3, 32))
    u = np.uint64
    rows, depth = t.shape
    whole = c0 + (c1 - c0) // 32 * 32
    for c in range(c0, whole, 32):
        for r in range(0, rows, 3):
            for p in range(3):
                for q in range(32):
                    acc[p, q] = 0.0
            for k in range(depth):
                a0 = t[u(r), u(k)]
                a1 = t[u(r + 1), u(k)]
                a2 = t[u(r + 2), u(k)]
                for q in range(32):
                    mq = m[u(k), u(c) + u(q)]
                    acc[0, q] += a0 * mq
                    acc[1, q] += a1 * mq
                    acc[2, q] += a2 * mq
            for p in range(3):
                copy_tile_row(out, (r + p, c), tile, p * 32, 32)
    for c in range(whole, c1):
        for r in range(rows):
            total = np.float32(0.0)
            for k in range(depth):
                total += t[u(r), u(k)] * m[u(k), u(c)]
            out[u(r), u(c)] = total


transform_columns = njit_cached(_transform_columns, fastmath={"contract"})
