"""rnn.py's whole-sequence LSTM loops over blocks of the batch in one numba ``prange`` region on
the TBB layer (backend/parallel_loops.py; imported only where it runs).

The batch rows of an LSTM never meet: each block of rows runs the whole recurrence
(numba_rnn.forward_rows, backward_rows) with no synchronisation between steps, its products
on its own TBB thread. ``count`` blocks, block ``i`` holding rows ``n * i // count`` to
``n * (i + 1) // count``, with ``count`` from the shape alone (rnn.py): the serial path runs
the very same blocks one after another, so the bits do not depend on the thread count.
"""

from __future__ import annotations

from numba import prange

from ..backend.parallel_loops import njit_parallel
from . import numba_rnn


def _forward_blocks(gemm, x_proj, w_hh, h0, c0, h_all, c_all, acts, scale, shift, count):
    """numba_rnn.forward_rows over ``count`` blocks of the batch, in parallel."""
    n = x_proj.shape[1]
    for i in prange(count):
        numba_rnn.forward_rows(gemm, x_proj, w_hh, h0, c0, h_all, c_all, acts, scale, shift,
                               n * i // count, n * (i + 1) // count)


def _backward_blocks(gemm, dh_all, dc_all, dacts, has_dacts, w_hh_t, c_all, acts, c0, tanh_c,
                     dpre, dh, dc_next, one, count):
    """numba_rnn.backward_rows over ``count`` blocks of the batch, in parallel."""
    n = acts.shape[1]
    for i in prange(count):
        numba_rnn.backward_rows(gemm, dh_all, dc_all, dacts, has_dacts, w_hh_t, c_all, acts,
                                c0, tanh_c, dpre, dh, dc_next, one, n * i // count,
                                n * (i + 1) // count)


forward_blocks = njit_parallel(_forward_blocks)
backward_blocks = njit_parallel(_backward_blocks)
