"""Column sums of a matrix: the bias gradients (``sum_to``) of dense layers and convolutions.

Small matrices (a dense layer's (batch, features) gradient summed to its (1, features) bias):
``sum_rows`` adds the rows in order in the array's dtype, one compiled loop. NumPy reduces
an outer axis of a C-contiguous array row by row in the same order, so the result is
``np.add.reduce(a, axis=0)``'s, bit for bit; NumPy's call costs more than the work on these
sizes ((100, 100) float32: 3.2 -> 1.4 us alone; a jitted MLP-ResNet step has 8 of them and
calls the loop by name from its plan: SumTo.emit_helpers). Without numba, and for inputs the
loop does not take (not C-contiguous, not float32/float64, no rows, not a NumPy array) it is
NumPy's own reduction: the same bits.

Large channel matrices (a conv's bias gradient: the (N*H*W, C) matrix of its NHWC output
gradient; Mean over channels-last arrays): ``blocked_column_sums`` sums row blocks fixed by
the shape in float64 (one numba prange call on numba's TBB threads where they run:
backend/parallel_loops.py; else needle's threads draw the blocks) and adds the block sums in
block order, so the result is the same on any number of threads and either way (and within
one float32 step of the exact sum; NumPy's float32 sum is further off). Without numba
these sums are layout.column_sums's NumPy/BLAS ones, in another order: they differ at float32
rounding level (tests check both against a float64 reference).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from ..backend import cpu_threads, parallel_loops
from ..backend.numba_support import NumbaLoops

__all__ = ["BLOCK_ELEMENTS", "IN_ORDER_MAX_SIZE", "SPLIT_MIN_ELEMENTS", "THREADS_MIN_ELEMENTS",
           "blocked_column_sums", "in_order", "row_blocks", "sum_rows"]

#: matrices below this many elements take ``sum_rows`` (reduce.EINSUM_MIN_SIZE: from there
#: reduce_sum uses einsum, whose order differs)
IN_ORDER_MAX_SIZE = 16384

_loops = NumbaLoops(f"{__package__}.numba_column_sums")
#: the prange variant (latched apart: a failure there leaves needle's threads in use)
_parallel_loops = NumbaLoops(f"{__package__}.numba_parallel_elementwise")
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def in_order(shape: tuple, axes: tuple[int, ...]) -> bool:
    """Whether a sum over ``axes`` of an array of ``shape`` is ``sum_rows``'s case: every axis
    but the last, of a small array (what ``reduce.reduce_sum`` does with ``np.add.reduce``)."""
    return (2 <= len(shape) < len(_LEADING) and axes == _LEADING[len(shape)]
            and math.prod(shape) < IN_ORDER_MAX_SIZE)


#: the leading axes (all but the last) of an array of each number of dims
_LEADING = [tuple(range(ndim - 1)) for ndim in range(33)]


def sum_rows(a: Any, shape: tuple) -> Any:
    """The sum over every axis but the last (a (B, C) or (B, T, C) array's C column sums),
    shaped ``shape`` ((1, C), (C,), ...): the rows added in order, bit-identical to NumPy's
    ``np.sum`` (which reduces the leading axes of a C-contiguous array in the same order)."""
    if (type(a) is np.ndarray and a.dtype in _FLOATS and a.flags.c_contiguous
            and a.size > 0):
        module = _loops.module()
        if module is not None:
            out = np.empty(shape, a.dtype)
            rows = a if a.ndim == 2 else a.reshape(-1, a.shape[-1])
            if _loops.call(module.rows_in_order, rows, out):
                return out
    return np.sum(a, axis=_LEADING[a.ndim], keepdims=True).reshape(shape)


#: channel matrices from this many elements sum in row blocks fixed by the shape, which
#: needle's threads share (``blocked_column_sums``); smaller ones are one float64 loop
#: (cpu_kernels.column_sums, via layout.column_sums).
#: NOTE: splitting smaller matrices did not pay on the 2-core machine (loaded by other jobs):
#: the sums are memory-bound (a cold 4 MB matrix: 378 us, the same matrix hot: 185 us), two
#: threads summing halves of a 1-16 MB matrix took 1.05-1.3x one thread's time, and in the
#: CNN step the second core is often held by OpenBLAS's spinning worker. CNN step A/B
#: (ab_cnn_step.py --threads 2 --estimate, 6 rounds) with the split from 2**18 elements
#: (blocks of 2**17): strides 1,2,2 1.006x, 1,1,1 1.018x (ratio of medians). From 2**20
#: (as before: cpu_kernels.row_blocks) the blocks no longer depend on the thread count.
#: On numba's TBB threads (a region starts in ~1.5 us) the blocks start at 2**19 (2 blocks;
#: from 2**20 on the same blocks as before); needle's threads take them from
#: ``THREADS_MIN_ELEMENTS``, below it they run one after the other here.
SPLIT_MIN_ELEMENTS = 1 << 19

#: elements per row block (at least; a block holds whole rows)
BLOCK_ELEMENTS = 1 << 20

#: smallest matrix whose blocks needle's threads share where numba's prange does not run
THREADS_MIN_ELEMENTS = 1 << 20


def row_blocks(m: int, c: int) -> tuple[int, ...] | None:
    """Row bounds of the blocks of an (m, c) matrix (None below SPLIT_MIN_ELEMENTS): fixed by
    the shape alone, so the sums do not depend on how many threads run them."""
    return _row_blocks(m, c, SPLIT_MIN_ELEMENTS, BLOCK_ELEMENTS)


@functools.lru_cache(maxsize=256)
def _row_blocks(m: int, c: int, split_min: int, block: int) -> tuple[int, ...] | None:
    if m * c < split_min or m < 2:
        return None
    count = min(m, max(2, (m * c) // block))
    return tuple(m * i // count for i in range(count + 1))


def blocked_column_sums(matrix: Any) -> np.ndarray | None:
    """The (C,) column sums of a large C-contiguous (M, C) float matrix (a conv's bias
    gradient: its NHWC output gradient's channel matrix), or None where this does not apply
    (small, another layout or dtype, no numba). Each row block's float64 sums are one
    compiled loop; one prange call runs them on numba's TBB threads where they run, else
    needle's threads (backend/cpu_threads.run_chunks) draw the blocks (serial below
    ``THREADS_MIN_ELEMENTS``), and the block sums are added in block order: the same result
    on any number of threads and either way, and more accurate than NumPy's float32 sum."""
    if (type(matrix) is not np.ndarray or matrix.ndim != 2 or matrix.dtype not in _FLOATS
            or not matrix.flags.c_contiguous):
        return None
    m, c = matrix.shape
    bounds = row_blocks(m, c)
    module = _loops.module()
    if bounds is None or module is None:
        return None
    count = len(bounds) - 1
    parts = np.empty((count, c), np.float64)
    if not _in_prange_blocks(matrix, bounds, parts):
        loop = module.block_sums
        if not _loops.call(loop, matrix, 0, 0, parts[0]):  # compiled here first (or failed)
            return None
        threads = cpu_threads.NUM_THREADS if m * c >= THREADS_MIN_ELEMENTS else 1
        cpu_threads.run_chunks(lambda i: loop(matrix, bounds[i], bounds[i + 1], parts[i]),
                               count, threads)
    return np.add.reduce(parts, axis=0).astype(matrix.dtype)


def _in_prange_blocks(matrix: np.ndarray, bounds: tuple[int, ...], parts: np.ndarray) -> bool:
    """Each block's float64 sums into its row of ``parts``, from one prange call on numba's
    TBB threads; False where that does not run (no TBB, one thread, numba could not compile
    it) and needle's threads run the blocks instead."""
    if not parallel_loops.parallel_threads():
        return False
    parallel = _parallel_loops.module()
    if parallel is None:
        return False
    return _parallel_loops.call(parallel.column_block_sums, matrix,
                                np.array(bounds, np.int64), parts)
