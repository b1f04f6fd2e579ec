"""The vocabulary head's softmax pass (kernels/vocab_head.py) with its rows split over cores by
numba's ``prange`` on the TBB layer (backend/parallel_loops.py; imported only where it runs).

Each row is one block: the same row function as the one-thread loop
(numba_vocab_head.softmax_minus_onehot_row), whose result depends on that row alone, so the
bits do not depend on the thread count or on whether the rows ran in parallel.
"""

from __future__ import annotations

from numba import prange

from ..backend.parallel_loops import njit_parallel
from . import numba_vocab_head


def _softmax_minus_onehot_rows(z, ids, one, peaks, totals):
    """numba_vocab_head.softmax_minus_onehot_row over the rows of z, split over threads."""
    for r in prange(z.shape[0]):
        numba_vocab_head.softmax_minus_onehot_row(z, r, ids, one, peaks, totals)


softmax_minus_onehot_rows = njit_parallel(_softmax_minus_onehot_rows)
