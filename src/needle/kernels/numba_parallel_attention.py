"""Attention's softmax and softmax-adjoint row loops (kernels/attention.py) split over cores by
numba's ``prange`` on the TBB layer (backend/parallel_loops.py; imported only where it runs).

The (B, H, T, S) logits are cut into ``count`` blocks of whole (batch, head) slabs of T rows,
block ``b`` holding slabs ``n * b // count`` to ``n * (b + 1) // count`` (``count`` from the
shape alone), and each block runs the one-thread loops of numba_attention.py on its rows (a
slab starts at a multiple of T, so the causal mask's row ``r % T`` is the same). Each row's
result depends on that row alone: the bits do not depend on the thread count or on whether
the blocks ran in parallel.
"""

from __future__ import annotations

from numba import prange

from ..backend.parallel_loops import njit_parallel
from . import numba_attention


def _softmax_slabs(s, scale, mask, use_mask, count):
    """numba_attention.softmax_rows_f32 over ``count`` blocks of the (N, T, S) slabs."""
    n, t, width = s.shape
    for b in prange(count):
        start = n * b // count
        stop = n * (b + 1) // count
        numba_attention.softmax_rows_f32(s[start:stop].reshape(((stop - start) * t, width)),
                                         scale, mask, use_mask)


def _softmax_grad_slabs(p, dp, count):
    """numba_attention.softmax_grad_rows over ``count`` blocks of the (N, T, S) slabs."""
    n, t, width = p.shape
    for b in prange(count):
        start = n * b // count
        stop = n * (b + 1) // count
        rows = (stop - start) * t
        numba_attention.softmax_grad_rows(p[start:stop].reshape((rows, width)),
                                          dp[start:stop].reshape((rows, width)))


softmax_slabs = njit_parallel(_softmax_slabs)
softmax_grad_slabs = njit_parallel(_softmax_grad_slabs)
