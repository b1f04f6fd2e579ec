"""The vocabulary head's softmax pass (kernels/vocab_head.py) with its rows split over cores by
numba's ``prange`` on the TBB layer (backend/parallel_loops.py; imported only where it runs).

The rows go in blocks of ``rows_per_block`` (the caller's constant, never the thread
count), the threads drawing one block at a time; in a block each row prefetches the next
(numba_vocab_head.softmax_minus_onehot_row), which a block of one row per task could not
(the next row would go to whichever thread was free). Each row is the same row function as
in the one-thread loop, whose result depends on that row alone, so the bits do not depend on
the blocks, the thread count or on whether the rows ran in parallel.
"""

from __future__ import annotations

from numba import prange

from ..backend.parallel_loops import njit_parallel
from . import numba_intrinsics, numba_vocab_head


def _softmax_minus_onehot_rows(z, ids, one, peaks, totals, rows_per_block):
    """numba_vocab_head.softmax_minus_onehot_row over the rows of z, in blocks of
    ``rows_per_block`` rows split over threads."""
    rows = z.shape[0]
    for b in prange(-(-rows // rows_per_block)):
        numba_intrinsics.wide_vectors()  # (512-bit vectors in the loop body's function too)
        start = b * rows_per_block
        stop = min(rows, start + rows_per_block)
        for r in range(start, stop):
            numba_vocab_head.softmax_minus_onehot_row(z, r, ids, one, peaks, totals,
                                                      z[min(r + 1, stop - 1)])


softmax_minus_onehot_rows = njit_parallel(_softmax_minus_onehot_rows)
