"""A large matrix product as blocks of output rows or columns in one numba ``prange`` region
on the TBB layer (backend/parallel_loops.py; imported only where it runs), each block one call
of NumPy's own OpenBLAS gemm (kernels/openblas_gemm.py, a ctypes function passed in).

Why: OpenBLAS's own threads spin ~0.1 s after each product they split and take the second
core from the numba loops that follow (the vocabulary head's softmax pass); here BLAS is held
on one thread and the TBB threads split the product. Each output element is the same dot
product over the same K values as in NumPy's one product (only the rows or columns per call
differ), so the same bits while every block stays a large product (kernels/gemm_blocks.py).
"""

from __future__ import annotations

import numba
from numba import prange

from ..backend.parallel_loops import njit_parallel
from . import numba_kernels


def _gemm_block(fn, trans_a, trans_b, a, b, c, i, count, by_columns, align):
    """Block ``i`` of ``_gemm_blocks``: its one gemm call; returns its lines (start, stop)."""
    rows, cols = c.shape
    k = a.shape[0] if trans_a == 112 else a.shape[1]
    item = c.itemsize
    lda, ldb, ldc = a.strides[0] // item, b.strides[0] // item, c.strides[0] // item
    if by_columns:
        units = -(-cols // align)
        s = min(cols, align * (units * i // count))
        e = min(cols, align * (units * (i + 1) // count))
        if trans_b == 112:
            fn(101, trans_a, trans_b, rows, e - s, k, 1.0, a.ctypes, lda,
               b[s:e].ctypes, ldb, 0.0, c[:, s:e].ctypes, ldc)
        else:
            fn(101, trans_a, trans_b, rows, e - s, k, 1.0, a.ctypes, lda,
               b[:, s:e].ctypes, ldb, 0.0, c[:, s:e].ctypes, ldc)
    else:
        units = -(-rows // align)
        s = min(rows, align * (units * i // count))
        e = min(rows, align * (units * (i + 1) // count))
        if trans_a == 112:
            fn(101, trans_a, trans_b, e - s, cols, k, 1.0, a[:, s:e].ctypes, lda,
               b.ctypes, ldb, 0.0, c[s:e].ctypes, ldc)
        else:
            fn(101, trans_a, trans_b, e - s, cols, k, 1.0, a[s:e].ctypes, lda,
               b.ctypes, ldb, 0.0, c[s:e].ctypes, ldc)
    return s, e


_gemm_block_jit = numba.njit(nogil=True, inline="always")(_gemm_block)


def _gemm_blocks(fn, trans_a, trans_b, a, b, c, count, by_columns, align):
    """c = op(a) @ op(b) (row major, each 2-d array with a unit inner stride; op transposes
    where its flag is 112, CblasTrans) by the ctypes cblas gemm ``fn``, in ``count`` blocks of
    c's rows (columns where ``by_columns``), each starting at a multiple of ``align`` lines:
    block ``i`` holds lines ``align * (u * i // count)`` to ``align * (u * (i + 1) // count)``
    (u: the lines in units of ``align``, rounded up; the last block ends at the last line)."""
    for i in prange(count):
        _gemm_block_jit(fn, trans_a, trans_b, a, b, c, i, count, by_columns, align)


def _gemm_blocks_epilogue(fn, trans_a, trans_b, a, b, c, count, by_columns, align, bias,
                          residual, relu):
    """``_gemm_blocks``, then numba_kernels.linear_epilogue on each block's lines by the
    thread that made them (while they are in its cache): a linear layer's bias, residual
    and ReLU in the product's region instead of passes of their own."""
    rows, cols = c.shape
    for i in prange(count):
        s, e = _gemm_block_jit(fn, trans_a, trans_b, a, b, c, i, count, by_columns, align)
        if by_columns:
            numba_kernels.linear_epilogue(c, 0, rows, s, e, bias, residual, relu)
        else:
            numba_kernels.linear_epilogue(c, s, e, 0, cols, bias, residual, relu)


gemm_blocks = njit_parallel(_gemm_blocks)
gemm_blocks_epilogue = njit_parallel(_gemm_blocks_epilogue)
