"""numba ``prange`` loops for the im2col convolutions (kernels/conv.py) on numba's TBB layer
(backend/parallel_loops.py; imported only where it runs): conv's forward and its two
gradients as patches and product per block of images, all blocks in one region.

Each loop cuts the images into ``count`` blocks, block ``b`` holding images ``n * b // count``
to ``n * (b + 1) // count`` (``count`` is the caller's, computed from the shape alone), and
runs the same serial njit loop as the one-call path on each block (numba_kernels.im2col_rows,
im2col_channels_first). A patch matrix is a copy, so it is the same bit for bit however it
is cut or run. The forward loops multiply each block's patches by the kernel matrix with
NumPy's own OpenBLAS gemm (kernels/openblas_gemm.py, a ctypes function passed in), on the
thread that built them: each output row is the same product over the same K values as in
NumPy's one product (only the rows per call differ), so the same bits.
"""

from __future__ import annotations

import numba
from numba import prange

from ..backend.parallel_loops import njit_parallel
from . import numba_kernels, numba_winograd
from .numba_gemm import gemm_call


def _conv_rows_blocks(gemm, a, weight, kh, kw, stride, padding, ho, wo, out, count, buffers):
    """out[(n, y, x), :] = patches @ weight per block of images of NHWC ``a``: each block's
    patches (numba_kernels.im2col_rows) in its thread's buffer (``buffers[thread id]``), then
    one gemm into its rows of ``out`` (N*Ho*Wo, C_out)."""
    n = a.shape[0]
    rows = ho * wo
    for b in prange(count):
        s = n * b // count
        e = n * (b + 1) // count
        cols = buffers[numba.get_thread_id()][:(e - s) * rows]
        numba_kernels.im2col_rows(a[s:e], kh, kw, stride, padding, ho, wo, cols)
        gemm_call(gemm, 111, cols, weight, out[s * rows:e * rows])


def _conv_channels_first_blocks(gemm, x, weight, kh, kw, stride, padding, ho, wo, out, count,
                                buffers):
    """out[n] = patches[n].T @ weight per block of images of NCHW ``x``: each block's patches
    (numba_kernels.im2col_channels_first, (images, C*kh*kw [+ 1], Ho*Wo)) in its thread's
    buffer, then one gemm per image into ``out`` (N, Ho*Wo, C_out)."""
    n = x.shape[0]
    for b in prange(count):
        s = n * b // count
        e = n * (b + 1) // count
        cols = buffers[numba.get_thread_id()][:e - s]
        numba_kernels.im2col_channels_first(x[s:e], kh, kw, stride, padding, ho, wo, cols)
        for i in range(e - s):
            gemm_call(gemm, 112, cols[i], weight, out[s + i])


def _weight_grad_rows_blocks(gemm, a, g2, kh, kw, stride, padding, ho, wo, parts, count,
                             buffers):
    """parts[b] = patches.T @ g per block of images of NHWC ``a``: each block's patches
    (numba_kernels.im2col_rows) in its thread's buffer, then one gemm into its partial sum
    (C*kh*kw, C_out); ``g2`` is the output gradient as (N*Ho*Wo, C_out). The caller adds the
    partials in block order."""
    n = a.shape[0]
    rows = ho * wo
    for b in prange(count):
        s = n * b // count
        e = n * (b + 1) // count
        cols = buffers[numba.get_thread_id()][:(e - s) * rows]
        numba_kernels.im2col_rows(a[s:e], kh, kw, stride, padding, ho, wo, cols)
        gemm_call(gemm, 112, cols, g2[s * rows:e * rows], parts[b])


def _weight_grad_channels_first_blocks(gemm, x, g3, kh, kw, stride, padding, ho, wo,
                                       products, count, buffers):
    """products[n] = patches[n] @ g[n] per block of images of NCHW ``x``: each block's patches
    (numba_kernels.im2col_channels_first, (images, C*kh*kw, Ho*Wo)) in its thread's buffer,
    then one gemm per image into ``products`` (N, C*kh*kw, C_out); ``g3`` is the output
    gradient as (N, Ho*Wo, C_out). The caller sums the products over the images."""
    n = x.shape[0]
    for b in prange(count):
        s = n * b // count
        e = n * (b + 1) // count
        cols = buffers[numba.get_thread_id()][:e - s]
        numba_kernels.im2col_channels_first(x[s:e], kh, kw, stride, padding, ho, wo, cols)
        for i in range(e - s):
            gemm_call(gemm, 111, cols[i], g3[s + i], products[s + i])


def _input_grad_blocks(gemm, g2, weights, ho, wo, kh, kw, stride, padding, out, count,
                       buffers):
    """conv_input_grad per block of images: the block's taps = g @ weights (one gemm into its
    thread's buffer, (rows, kh*kw*C)), then numba_kernels.col2im_add into its images of
    ``out`` (N, H, W, C); ``g2`` is the output gradient as (N*Ho*Wo, C_out)."""
    n = out.shape[0]
    rows = ho * wo
    for b in prange(count):
        s = n * b // count
        e = n * (b + 1) // count
        taps = buffers[numba.get_thread_id()][:(e - s) * rows]
        gemm_call(gemm, 111, g2[s * rows:e * rows], weights, taps)
        numba_kernels.col2im_add(taps, ho, wo, kh, kw, stride, padding, out[s:e])


def _winograd_blocks(gemm, x, padding, tiles_h, tiles_w, u, out, shift, block, n_tiles,
                     v_buffers, m_buffers, alpha, beta):
    """winograd.conv3x3 per block of ``block`` tiles: the block's input tiles
    (numba_winograd.input_tiles) in its thread's ``v_buffers`` row, the 36 products
    V[:, p] @ U[p] (one gemm each, strided rows as NumPy's matmul passes them) into its
    ``m_buffers`` row, then numba_winograd.output_tiles into ``out``."""
    for b in prange(-(-n_tiles // block)):
        t0 = b * block
        count = min(block, n_tiles - t0)
        thread = numba.get_thread_id()
        v = v_buffers[thread][:count]
        m = m_buffers[thread][:count]
        numba_winograd.input_tiles(x, padding, tiles_h, tiles_w, t0, v, alpha, beta)
        for p in range(36):
            gemm_call(gemm, 111, v[:, p], u[p], m[:, p])
        numba_winograd.output_tiles(m, tiles_h, tiles_w, t0, out, shift)



def _transform_columns_blocks(t, m, out, count):
    """numba_winograd.transform_columns over ``count`` blocks of m's columns (cut at
    multiples of 32, the last block ending at N), each on a TBB thread: columns never
    meet, so the bits of one call."""
    n = m.shape[1]
    chunks = -(-n // 32)
    for b in prange(count):
        c0 = min(n, chunks * b // count * 32)
        c1 = min(n, chunks * (b + 1) // count * 32)
        numba_winograd.transform_columns(t, m, out, c0, c1)

conv_rows = njit_parallel(_conv_rows_blocks)
winograd = njit_parallel(_winograd_blocks)
transform_columns = njit_parallel(_transform_columns_blocks)
weight_grad_rows = njit_parallel(_weight_grad_rows_blocks)
weight_grad_channels_first = njit_parallel(_weight_grad_channels_first_blocks)
input_grad = njit_parallel(_input_grad_blocks)
conv_channels_first = njit_parallel(_conv_channels_first_blocks)
