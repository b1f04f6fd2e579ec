"""The numba loops behind kernels/cross_entropy.py's large softmax cross-entropy (a language
model's 1,120 x 10,000 float32 logits; imported only where numba is installed).

One visit per row while it is in cache, all in numba (numba_exp's vectorized row maximum
and exp; the sum of the exponentials in float64), so numba_parallel_loss_rows.py can split
the rows over cores with ``prange`` (NumPy's passes run on one thread). Each function takes
a range of rows ``[start, stop)``; the one-thread path calls it once for all rows, the prange
path once per block, and a row's result depends on that row alone (the same bits).
"""

from __future__ import annotations

import numpy as np

from ..backend.numba_support import njit_cached
from .numba_exp import exp_f32, row_peak_f32


def _jit_reassoc(fn):
    """needle's njit with reassociation (the float64 sums vectorize; order is free)."""
    return njit_cached(fn, fastmath={"reassoc", "contract"})


@_jit_reassoc
def loss_rows_f32(z, ids, start, stop, losses):
    """losses[r] = logsumexp(z[r]) - z[r, ids[r]] for rows start..stop of the float32 logits
    z (R, C) (ids checked by the caller); NaN where a row's maximum is not finite."""
    width = z.shape[1]
    buffer = np.empty(width, np.float32)
    for r in range(start, stop):
        row = z[r]
        peak = row_peak_f32(row)
        if not np.isfinite(peak):
            losses[r] = np.nan
            continue
        for j in range(width):
            buffer[j] = exp_f32(row[j] - peak)
        total = 0.0                            # (a loop of its own: it vectorizes)
        for j in range(width):
            total += buffer[j]
        losses[r] = np.log(np.float32(total)) + peak - row[ids[r]]


@_jit_reassoc
def loss_grad_rows_f32(z, ids, g, start, stop, out):
    """out[r] = g[r] (softmax(z[r]) - onehot(ids[r])) for rows start..stop of the float32
    logits z (R, C); rows with inf or NaN logits come out NaN, as in NumPy's formula."""
    width = z.shape[1]
    for r in range(start, stop):
        row, dest = z[r], out[r]
        peak = row_peak_f32(row)
        for j in range(width):
            dest[j] = exp_f32(row[j] - peak)
        total = 0.0
        for j in range(width):
            total += dest[j]
        rounded = np.float32(total)
        scale = g[r]
        for j in range(width):
            dest[j] = dest[j] / rounded * scale
        dest[ids[r]] -= scale
