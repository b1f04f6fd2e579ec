"""numba ``prange`` loops over blocks fixed by the shape: ReLU, its adjoint, the bias add and
blocked column sums (kernels/threaded_elementwise.py, kernels/column_sums.py), on numba's TBB
layer (backend/parallel_loops.py; imported only where it runs).

Each loop cuts its arrays' first axis into ``count`` blocks, block ``b`` holding rows
``n * b // count`` to ``n * (b + 1) // count`` (``count`` is the caller's, computed from the
shape alone), and runs the same serial njit loop as the one-call path on each block
(numba_kernels.relu, relu_grad, add_row, relu_grad_rows; numba_column_sums.block_sums). The
elementwise results are those of the one-call loop element by element; the column sums write
one float64 row per block, which the caller adds in block order: the bits do not depend on
the thread count or on whether the blocks ran in parallel.
"""

from __future__ import annotations

from numba import prange

from ..backend.parallel_loops import njit_parallel
from . import numba_column_sums, numba_kernels


def _relu_blocks(a, out, count):
    """numba_kernels.relu over ``count`` blocks of the 1-d arrays."""
    n = a.shape[0]
    for b in prange(count):
        s = n * b // count
        e = n * (b + 1) // count
        numba_kernels.relu(a[s:e], out[s:e])


def _relu_grad_blocks(a, g, out, count):
    """numba_kernels.relu_grad over ``count`` blocks of the 1-d arrays."""
    n = a.shape[0]
    for b in prange(count):
        s = n * b // count
        e = n * (b + 1) // count
        numba_kernels.relu_grad(a[s:e], g[s:e], out[s:e])


def _add_row_blocks(xm, row, out, count):
    """numba_kernels.add_row over ``count`` blocks of the (M, C) matrix's rows."""
    n = xm.shape[0]
    for b in prange(count):
        s = n * b // count
        e = n * (b + 1) // count
        numba_kernels.add_row(xm[s:e], row, out[s:e])


def _relu_grad_rows_blocks(a, g, out, count):
    """numba_kernels.relu_grad_rows over ``count`` blocks of the 4-d arrays' first axis (``g``
    has that axis whole, or of length 1: broadcast along it, each block reads all of it)."""
    n = a.shape[0]
    whole = g.shape[0] == 1
    for b in prange(count):
        s = n * b // count
        e = n * (b + 1) // count
        numba_kernels.relu_grad_rows(a[s:e], g[0:1] if whole else g[s:e], out[s:e])


def _column_block_sums(matrix, bounds, parts):
    """parts[b] = numba_column_sums.block_sums of rows bounds[b]:bounds[b + 1] (float64)."""
    for b in prange(parts.shape[0]):
        numba_column_sums.block_sums(matrix, bounds[b], bounds[b + 1], parts[b])


relu = njit_parallel(_relu_blocks)
relu_grad = njit_parallel(_relu_grad_blocks)
add_row = njit_parallel(_add_row_blocks)
relu_grad_rows = njit_parallel(_relu_grad_rows_blocks)
column_block_sums = njit_parallel(_column_block_sums)
