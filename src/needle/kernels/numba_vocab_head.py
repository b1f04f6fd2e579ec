"""The numba loops behind kernels/vocab_head.py's softmax pass (imported only where numba is
installed).

Two of the pass's five NumPy calls per block of rows, measured on the (1,120 x 10,000)
float32 logits of benchmarks/lm_step.py, one thread (thread CPU time, whole array):
- the row sums of the exponentials: NumPy's float32 pairwise ``sum(axis=1)`` 3.7 ms; here a
  float64 accumulation that LLVM vectorizes, 1.7 ms (and more accurate);
- the scaling by the reciprocal of the sums and the one-hot subtraction: one visit per row
  instead of a broadcast multiply and a fancy-indexed subtraction.
The max stays NumPy's (a numba max over float32 rows did not vectorize: 13 ms vs 2.1) and
so does the exp (NumPy's is SIMD). The NumPy fallback in vocab_head.py sums in float64 too,
so both give the same sums up to float64 rounding (the same float32 results but for rare
ties).
"""

from __future__ import annotations

from ..backend.numba_support import njit_cached


def _jit_reassoc(fn):
    """needle's njit with reassociation (the float64 sum vectorizes; order is free)."""
    return njit_cached(fn, fastmath={"reassoc", "contract"})


@_jit_reassoc
def row_sums_f64(e, totals):
    """totals[r] = sum of row r of e (R, C), accumulated in float64."""
    rows, width = e.shape
    for r in range(rows):
        row = e[r]
        total = 0.0
        for j in range(width):
            total += row[j]
        totals[r] = total


@njit_cached
def scale_rows_minus_onehot(e, inverse, ids, one):
    """In place: row r of e (R, C) times inverse[r] (e's dtype, the product NumPy's
    broadcast multiply makes), then ``one`` (1 in e's dtype) subtracted at column ids[r]."""
    rows, width = e.shape
    for r in range(rows):
        row = e[r]
        factor = inverse[r]
        for j in range(width):
            row[j] *= factor
        row[ids[r]] -= one
