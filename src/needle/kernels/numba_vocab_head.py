"""The numba loops behind kernels/vocab_head.py's softmax pass (imported only where numba is
installed).

float32 logits (the language models'): ``softmax_minus_onehot_row`` does the whole pass on
a row in one visit (max, exp, float64 sum, scale, one-hot) with numba_exp.py's vectorized
max and exp, so numba_parallel_vocab_head.py can split the rows over cores: on the (1,120 x
10,000) logits, one thread, thread CPU time, 10.1 -> 8.5 ms for the pass; 5.3 ms on two
threads (quiet machine, the kernel alone). Two things make it faster without changing a
bit (each element's arithmetic is the same): it asks LLVM for 512-bit vectors (LLVM prefers
256 bits on AVX-512 CPUs; the exp loop then costs 0.32 instead of 0.46 ns a value), and
while the exp loop runs (compute-bound) it prefetches the NEXT row of its block into L2, so
that row's maximum pass finds it there instead of waiting on memory (the logits, 45 MB,
have left the cache since the product wrote them).

Other dtypes keep NumPy's max and exp per block of rows with two numba loops, measured on
the (1,120 x 10,000) float32 logits, one thread (thread CPU time, whole array):
- the row sums of the exponentials: NumPy's float32 pairwise ``sum(axis=1)`` 3.7 ms; here a
  float64 accumulation that LLVM vectorizes, 1.7 ms (and more accurate);
- the scaling by the reciprocal of the sums and the one-hot subtraction: one visit per row
  instead of a broadcast multiply and a fancy-indexed subtraction.
There the max stays NumPy's (numba's float max over float32 rows did not vectorize: 13 ms vs
2.1; numba_exp's integer form does) and so does the exp (NumPy's is SIMD). The NumPy
fallback in vocab_head.py sums in float64 too, so both give the same sums up to float64
rounding (the same float32 results but for rare ties).
"""

from __future__ import annotations

import numpy as np

from ..backend.numba_support import njit_cached
from .numba_exp import exp_f32, row_peak_f32
from .numba_intrinsics import prefetch_to_l2, wide_vectors

#: float32 values per 64-byte cache line, and per chunk of the exp loop (the lines of the next
#: row prefetched before each chunk: a loop of 256 values still vectorizes; a prefetch per
#: 16 values inside it did not, 8x slower)
_LINE_VALUES = 16
_CHUNK_VALUES = 256

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


@_jit_reassoc
def softmax_minus_onehot_row(z, r, ids, one, peaks, totals, following):
    """Row r of the float32 logits z (R, C), in place: softmax(z_r) minus the one-hot of
    ids[r], with the row's maximum in peaks[r] and its sum of exponentials (float64, rounded
    to float32) in totals[r]; a row whose maximum is not finite is left alone and its total
    set to NaN. The whole pass in one visit (numba_exp's vectorized max and exp), so the
    rows can be split over cores (numba_parallel_vocab_head.py). ``following`` (a row of C
    values: the next row this thread will take, or this row) is prefetched into L2 during
    the exp loop; it changes no value."""
    wide_vectors()
    row = z[r]
    width = row.shape[0]
    peak = row_peak_f32(row)
    peaks[r] = peak
    if not np.isfinite(peak):
        totals[r] = np.nan
        return
    whole = width - width % _CHUNK_VALUES
    for c in range(0, whole, _CHUNK_VALUES):
        for q in range(c, c + _CHUNK_VALUES, _LINE_VALUES):
            prefetch_to_l2(following, q)
        for j in range(c, c + _CHUNK_VALUES):
            row[j] = exp_f32(row[j] - peak)
    for j in range(whole, width):
        row[j] = exp_f32(row[j] - peak)
    total = 0.0                                # (a loop of its own: 0.44 vs 0.74 ns a value)
    for j in range(width):
        total += row[j]
    rounded = np.float32(total)
    totals[r] = rounded
    inverse = one / rounded                    # NumPy's float32 reciprocal
    for j in range(width):
        row[j] *= inverse
    row[ids[r]] -= one


@_jit_reassoc
def softmax_minus_onehot_rows(z, ids, one, peaks, totals):
    """softmax_minus_onehot_row over every row of z, on this thread (each row prefetching
    the next)."""
    wide_vectors()
    last = z.shape[0] - 1
    for r in range(z.shape[0]):
        softmax_minus_onehot_row(z, r, ids, one, peaks, totals, z[min(r + 1, last)])
