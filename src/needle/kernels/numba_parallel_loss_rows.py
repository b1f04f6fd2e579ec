"""kernels/numba_loss_rows.py's row loops split over cores by numba's ``prange`` on the TBB
layer (backend/parallel_loops.py; imported only where it runs): ``count`` blocks of rows,
block ``b`` holding rows ``n * b // count`` to ``n * (b + 1) // count`` (``count`` from the
shape alone), each the same one-thread loop; a row's result depends on that row alone, so
the bits do not depend on the thread count or on whether the blocks ran in parallel.
"""

from __future__ import annotations

from numba import prange

from ..backend.parallel_loops import njit_parallel
from . import numba_loss_rows


def _loss_blocks(z, ids, losses, count):
    """numba_loss_rows.loss_rows_f32 over ``count`` blocks of rows."""
    n = z.shape[0]
    for b in prange(count):
        numba_loss_rows.loss_rows_f32(z, ids, n * b // count, n * (b + 1) // count, losses)


def _loss_grad_blocks(z, ids, g, out, count):
    """numba_loss_rows.loss_grad_rows_f32 over ``count`` blocks of rows."""
    n = z.shape[0]
    for b in prange(count):
        numba_loss_rows.loss_grad_rows_f32(z, ids, g, n * b // count, n * (b + 1) // count,
                                           out)


loss_blocks = njit_parallel(_loss_blocks)
loss_grad_blocks = njit_parallel(_loss_grad_blocks)
