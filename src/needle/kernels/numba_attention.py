"""The numba loops behind kernels/attention.py (imported only where numba is installed).

Attention's softmax rows are short (the source length, 64 in the LM benchmark) and many
(batch * heads * target): NumPy's row reductions pay a loop start-up per row (a max over
(4096, 64) float32 took as long as the exp), and scale, mask, max, subtract, exp, sum and
divide are seven passes. Here the passes before the exp are one visit per row, the exp
stays NumPy's (vectorized; numba's scalar exp was slower), and the sum and divide are
another. Measured on the LM's (16 * 4 * 64, 64) logits, one process, loaded 2-core
machine: softmax with causal mask 1.5-2.1 -> 1.0 ms, its adjoint 0.6-0.8 -> 0.28 ms.
"""

from __future__ import annotations

import numpy as np

from ..backend.numba_support import njit_cached
from .numba_exp import exp_f32

_FLAGS = {"reassoc", "contract"}


def _jit(fn):
    """needle's njit (backend/numba_support.py) for this file's loops."""
    return njit_cached(fn, fastmath=_FLAGS)


@_jit
def softmax_grad_rows(p, dp):
    """In place: dp (R, S) becomes p * (dp - rowsum(p * dp)), softmax's adjoint."""
    rows, width = p.shape
    box = np.empty(1, p.dtype)
    for r in range(rows):
        prow, drow = p[r], dp[r]
        total = 0.0
        for j in range(width):
            total += prow[j] * drow[j]
        box[0] = total
        weighted = box[0]
        for j in range(width):
            drow[j] = prow[j] * (drow[j] - weighted)


@_jit
def shifted_logits_rows(s, scale, mask, use_mask):
    """In place: each row r of s (R, S) becomes scale * s[r] + mask[r % T] minus its max
    (mask (T, S), read only when ``use_mask``): the exp's argument of a stable softmax."""
    rows, width = s.shape
    t = mask.shape[0]
    box = np.empty(2, s.dtype)  # values in s's dtype: float32 math stays float32
    box[0] = scale
    box[1] = -np.inf
    factor, lowest = box[0], box[1]
    for r in range(rows):
        row = s[r]
        peak = lowest
        if use_mask:
            mrow = mask[r % t]
            for j in range(width):
                val = row[j] * factor + mrow[j]
                row[j] = val
                peak = max(peak, val)
        else:
            for j in range(width):
                val = row[j] * factor
                row[j] = val
                peak = max(peak, val)
        for j in range(width):
            row[j] -= peak


@_jit
def normalize_rows(e):
    """In place: each row of e (R, S) divided by its sum (float64 sums)."""
    rows, width = e.shape
    box = np.empty(1, e.dtype)
    for r in range(rows):
        row = e[r]
        total = 0.0
        for j in range(width):
            total += row[j]
        box[0] = 1.0 / total
        inv = box[0]
        for j in range(width):
            row[j] *= inv


@njit_cached
def exp_rows_f32(e):
    """In place: e^x for every value of the float32 rows e (R, S) (numba_exp.exp_f32: a
    numba loop, so the whole softmax can run in numba_parallel_attention's prange)."""
    rows, width = e.shape
    for r in range(rows):
        row = e[r]
        for j in range(width):
            row[j] = exp_f32(row[j])


@njit_cached
def softmax_rows_f32(s, scale, mask, use_mask):
    """In place: softmax of scale * s[r] + mask[r % T] for every row of the float32 s (R, S)
    (the three loops above one after the other; mask as in shifted_logits_rows)."""
    shifted_logits_rows(s, scale, mask, use_mask)
    exp_rows_f32(s)
    normalize_rows(s)
