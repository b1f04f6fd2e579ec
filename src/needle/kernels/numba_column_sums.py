"""The numba loops behind kernels/column_sums.py (imported only where numba is installed).

No fast-math flags: ``rows_in_order`` must add in NumPy's order, in the array's dtype, to give
its bits; ``block_sums`` accumulates in float64, column by column in row order.
"""

from __future__ import annotations

import numpy as np

from ..backend.numba_support import njit_cached


def _rows_in_order(a, out):
    """out = a[0] + a[1] + ... (the rows of the (M, C) matrix ``a``, M >= 1, added in order
    in its dtype: ``np.add.reduce(a, axis=0)``'s arithmetic); ``out`` holds C values in any
    C-contiguous shape."""
    flat = out.reshape(out.size)
    m, c = a.shape
    for j in range(c):
        flat[j] = a[0, j]
    for i in range(1, m):
        for j in range(c):
            flat[j] += a[i, j]


def _block_sums(a, start, stop, out):
    """out[j] = the float64 sum of a[start:stop, j], rows added in order."""
    c = a.shape[1]
    acc = np.zeros(c, np.float64)
    for i in range(start, stop):
        for j in range(c):
            acc[j] += a[i, j]
    for j in range(c):
        out[j] = acc[j]


rows_in_order = njit_cached(_rows_in_order)
block_sums = njit_cached(_block_sums)
