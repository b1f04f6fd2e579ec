"""One cblas gemm call on numba arrays (imported only where numba is installed): the loops that
multiply inside numba (numba_rnn.py's recurrences, numba_parallel_conv.py's blocks) call
NumPy's own OpenBLAS gemm (kernels/openblas_gemm.py, a ctypes function passed in) through it.
"""

from __future__ import annotations

import numba


@numba.njit(nogil=True, inline="always")
def gemm_call(fn, trans_a, a, b, c):  # type: ignore[no-untyped-def]
    """c = op(a) @ b by the ctypes cblas gemm ``fn`` (row major, each 2-d array with a unit
    inner stride and its rows at any stride, the leading dimension: the arguments NumPy's
    matmul passes, so its bits); op(a) is a where ``trans_a`` is 111 (NoTrans), a.T where
    112 (Trans). Nothing for an empty c (BLAS would refuse an empty array's leading
    dimension)."""
    m, n = c.shape
    if m == 0 or n == 0:
        return
    k = b.shape[0]
    item = c.itemsize
    fn(101, trans_a, 111, m, n, k, 1.0, a.ctypes, a.strides[0] // item, b.ctypes,
       b.strides[0] // item, 0.0, c.ctypes, c.strides[0] // item)
