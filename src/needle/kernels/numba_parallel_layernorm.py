"""LayerNorm's row loops (kernels/numba_layernorm.py) split over cores by numba's ``prange``
on the TBB layer (backend/parallel_loops.py; imported only where it runs).

Rows are normalized on their own, so the forward's blocks of rows give the one-thread bits
whatever the blocks. The backward's weight and bias sums are float64 sums per block of
``numba_layernorm.GRAD_BLOCK_ROWS`` rows (fixed by the shape), added in block order after
the prange region, as the one-thread loop adds them: the same bits on any thread count.
"""

from __future__ import annotations

from numba import prange

from ..backend.parallel_loops import njit_parallel
from . import numba_layernorm


def _layer_norm_blocks(xm, weight, bias, eps, out, count):
    """numba_layernorm.layer_norm_rows over ``count`` blocks of the rows."""
    m, d = xm.shape
    for b in prange(count):
        s = m * b // count
        e = m * (b + 1) // count
        # (reshape: C-contiguous blocks typed as such, so the row loops vectorize)
        numba_layernorm.layer_norm_rows(xm[s:e].reshape((e - s, d)), weight, bias, eps,
                                        out[s:e].reshape((e - s, d)))


def _layer_norm_grad_blocks(gm, xm, weight, eps, dx, dweight, dbias, partial_w, partial_b):
    """numba_layernorm.layer_norm_grad_rows with its blocks of rows run in one prange region;
    partial_w, partial_b: (blocks, D) float64 zeros (made by the caller: numba's own np.zeros
    here made the region 2.6x slower)."""
    m, d = xm.shape
    rows = numba_layernorm.GRAD_BLOCK_ROWS
    for k in prange(partial_w.shape[0]):
        s = k * rows
        e = min(m, s + rows)
        # (reshape: C-contiguous blocks typed as such, so the row loops vectorize)
        shape = (e - s, d)
        numba_layernorm.layer_norm_grad_block(gm[s:e].reshape(shape), xm[s:e].reshape(shape),
                                              weight, eps, dx[s:e].reshape(shape),
                                              partial_w[k], partial_b[k])
    numba_layernorm.add_block_sums(partial_w, partial_b, dweight, dbias)


layer_norm_blocks = njit_parallel(_layer_norm_blocks)
layer_norm_grad_blocks = njit_parallel(_layer_norm_grad_blocks)
