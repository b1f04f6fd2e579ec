"""A vocabulary head and its softmax cross-entropy on arrays: one logits-sized array in all.

A language model ends in ``z = x W + b`` (tokens x vocabulary: 1,120 x 10,000 in
benchmarks/lm_step.py) and the loss ``logsumexp(z_i) - z_i[id_i]``. As separate ops that is
the product, a pass adding the bias, the loss's max and exp passes, then in the backward a
second softmax (max and exp again) into a second logits-sized array, a pass scaling it by the
loss's adjoint g, a pass summing it for the bias, and the two products.

Here the forward writes ``S = softmax(z) - onehot(ids)`` over the logits in place, block by
block of rows while each block is in the CPU cache (bias, max, exp, sum, scale: the
exponentials are computed once), together with the per-row losses. The row sums accumulate in
float64 (a vectorized numba loop, kernels/numba_vocab_head.py, where numba is installed: 1.7
vs 3.7 ms for NumPy's float32 sums of 1,120 x 10,000; NumPy's float64 sum without it), and
numba scales each row and subtracts its one-hot in one visit. The backward needs only
S: with ``G = diag(g) S`` the gradient of the logits,

    dx = G W^T = diag(g) (S W^T),   dW = x^T G = (diag(g) x)^T S,   db = g^T S,

so g scales the small (tokens x 128) arrays and never the logits-sized one: two matrix
products read S (db is one more row of dW's: ``[diag(g) x, g]^T S``), nothing else; the bias
is likewise one more row of the forward's product. The logits array comes from
kernels/recycle.py (no page faults from step to step).

float32 logits (with numba) run the whole pass per row in numba instead
(numba_vocab_head.softmax_minus_onehot_row: numba_exp's max and exp, so its exps differ from
NumPy's in the last bit or two; each row prefetches the next into L2 during its exp loop),
the rows split over cores by numba's ``prange`` in blocks of ``PRANGE_ROWS_PER_BLOCK`` from
``PRANGE_MIN_SIZE`` logits (numba_parallel_vocab_head.py; the same bits on any thread count).

NOTE tried (session 12) and not kept: the product by blocks of rows, each block's softmax
pass run at once while its logits are in cache (one prange region, each block one OpenBLAS
gemm over the whole K: the same bits). Every gemm call packs the whole of ``w`` again (129 x
10,000, ~0.4 ms of one core a call), while the pass gains ~2.4 us a row in cache: per block
of R rows that pays only from R ~170, and 170 rows of logits (6.8 MB) do not fit a 2 MB L2.
Measured (BLAS held, two threads, loaded machine, process CPU time of the forward): today's
35.7 ms, row blocks of 32 / 64 / 128 rows 50.1 / 42.6 / 38.6. Prefetching the next row
(above) gets most of the cache's gain without it. Also measured and not kept (session 12):
rows whose exps are all normal (every z - peak >= -87, found in the peak pass) through an
exp with 2^n as one factor and no range or NaN selects (the same bits: the two-factor
scaling is exact there) saved 3-3.5% of the pass in the LM steps (8% in cache); the bias
added in the row pass instead of as row 129 of ``w`` (the same bits: OpenBLAS adds the K
terms in order, the bias last) would save the 0.4 ms copy of ``[w; b]`` but cost the peak
pass 0.034 ns a value (0.38 ms of CPU).

``forward`` returns None for rows with a non-finite maximum (inf or nan logits); the op then
runs the separate ops' careful formulas.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import cpu_threads, parallel_loops
from ..backend.device import array_module
from ..backend.numba_support import NumbaLoops
from . import blas_policy, recycle
from .softmax import BLOCK_BYTES

__all__ = ["backward", "forward", "weight_and_bias_rows"]

#: smaller logits run their row blocks on this thread only (thread hand-off costs more)
PARALLEL_MIN_SIZE = 1 << 20
#: float32 logits of at least this many elements split their rows over numba's prange
#: threads (backend/parallel_loops.py); smaller ones run the same row loop on this thread
PRANGE_MIN_SIZE = 1 << 17
#: rows per prange task (each row prefetches the next one of its block; any count gives the
#: same bits).
#: NOTE measured (session 12, the (1,120 x 10,000) pass, process CPU time, two threads,
#: machine loaded): alone, out of cache, one row per task without prefetch or 512-bit vectors
#: 11.3 ms, blocks of 16 rows with both 8.2; inside the jitted LM steps (the pass timed per
#: call, old and new alternating per round, 50 calls each) LSTM 10.6-10.8 -> 8.0 ms,
#: Transformer 9.7-10.0 -> 7.2-7.4; blocks of 8 and 16 rows within noise
PRANGE_ROWS_PER_BLOCK = 16


def weight_and_bias_rows(w: Any, b: Any) -> Any:
    """``[w; b]`` (K + 1, C) as a read-only view of the parameters' own memory where b's C
    values follow w's in memory, else None (the caller copies them together).

    They follow each other where an optimizer laid the parameters end to end
    (optim/optimizer.py's flat buffers: a Linear's weight, then its bias), so the forward's
    product reads them in place instead of copying 5 MB of a (128, 10,000) head each step.
    NOTE measured (session 18, the copy alone, BLAS held, LM shapes): 0.70-0.74 ms of one
    thread for the (129, 10,000) copy and x's (1,120, 129); the same bits either way."""
    if not (type(w) is np.ndarray and type(b) is np.ndarray and w.ndim == 2
            and w.dtype == b.dtype and b.size == w.shape[1]
            and w.flags.c_contiguous and b.flags.c_contiguous):
        return None
    if b.__array_interface__["data"][0] != w.__array_interface__["data"][0] + w.nbytes:
        return None
    # the view spans w's memory and then b's, both alive while the caller holds w and b
    item = w.itemsize
    return np.lib.stride_tricks.as_strided(w, (w.shape[0] + 1, w.shape[1]),
                                           (w.shape[1] * item, item), writeable=False)


def _logits(x: Any, w: Any, b: Any, dtype: Any) -> tuple[Any, bool]:
    """``(z, with_bias)``: ``x @ w`` (+ b where ``with_bias``) as a new, or recycled when
    vocabulary-sized, array of ``dtype``.

    NumPy arrays: the bias goes into the product as one more inner dimension,
    ``[x, 1] @ [w; b]`` (a copy of the small x; of w too unless ``weight_and_bias_rows``
    finds b right after w), which costs less than a pass adding it to the logits-sized
    product."""
    xp = array_module(x)
    rows, (inner, cols) = x.shape[0], w.shape
    if xp is np and x.dtype == dtype and w.dtype == dtype:
        x_one = np.empty((rows, inner + 1), dtype)
        x_one[:, :inner] = x
        x_one[:, inner] = 1
        w_b = weight_and_bias_rows(w, b)
        if w_b is None:
            w_b = np.empty((inner + 1, cols), dtype)
            w_b[:inner] = w
            w_b[inner] = b.reshape(cols)
        return blas_policy.matmul(x_one, w_b, out=recycle.empty((rows, cols), dtype)), True
    return xp.matmul(x.astype(dtype, copy=False), w.astype(dtype, copy=False)), False


#: kernels/numba_vocab_head.py on first use (NumPy runs where numba cannot)
LOOPS = NumbaLoops(f"{__package__}.numba_vocab_head")
#: kernels/numba_parallel_vocab_head.py, where prange runs (the one-thread loop where it cannot)
PARALLEL_LOOPS = NumbaLoops(f"{__package__}.numba_parallel_vocab_head")


def _one_pass_rows(z: Any, loops: Any, ids: Any, peaks: Any, totals: Any) -> bool:
    """The whole softmax pass of the float32 logits ``z`` in numba (numba_vocab_head's
    softmax_minus_onehot_row on every row), the rows split over numba's threads where
    prange runs and z is large; False where the loop does not compile (nothing ran)."""
    one = np.float32(1)
    if z.size >= PRANGE_MIN_SIZE and parallel_loops.parallel_threads():
        parallel = PARALLEL_LOOPS.module()
        if parallel is not None and PARALLEL_LOOPS.call(
                parallel.softmax_minus_onehot_rows, z, ids, one, peaks, totals,
                PRANGE_ROWS_PER_BLOCK):
            return True
    return LOOPS.call(loops.softmax_minus_onehot_rows, z, ids, one, peaks, totals)


def _row_loops(z: Any) -> Any:
    """The numba loops for the logits ``z`` (a C-contiguous float32/float64 NumPy array),
    compiled here (on this thread, before any block runs), or None: NumPy's formulas."""
    if type(z) is not np.ndarray or z.dtype not in (np.float32, np.float64) or not (
            z.flags.c_contiguous and z.size):
        return None
    loops = LOOPS.module()
    if loops is None:
        return None
    probe = np.zeros((1, 1), z.dtype)
    if not (LOOPS.call(loops.row_sums_f64, probe, np.empty(1, np.float64))
            and LOOPS.call(loops.scale_rows_minus_onehot, probe, probe[0],
                           np.zeros(1, np.intp), z.dtype.type(1))):
        return None
    return loops


def forward(x: Any, w: Any, b: Any, ids: Any) -> tuple[Any, Any] | None:
    """``(losses, S)``: ``losses_i = logsumexp(z_i) - z_i[ids_i]`` (N,) and
    ``S = softmax(z) - onehot(ids)`` (N, C) for ``z = x @ w + b``; x (N, K), w (K, C), b
    (C,) or (1, C), ids (N,) integers in range (checked by the caller). None where a row's
    maximum is not finite."""
    xp = array_module(x)
    dtype = np.result_type(x.dtype, w.dtype, b.dtype)
    z, with_bias = _logits(x, w, b, dtype)
    rows, cols = z.shape
    bias = None if with_bias else b.reshape(1, cols).astype(dtype, copy=False)
    losses = xp.empty(rows, dtype)
    step = max(1, BLOCK_BYTES // (cols * z.itemsize))
    starts = range(0, rows, step)
    finite = [True]
    loops = _row_loops(z)
    if loops is not None:
        ids = ids.astype(np.intp, copy=False)  # the dtype the loops were compiled for
    one = z.dtype.type(1)
    # z_i[id_i] for every row at once (one fancy index instead of one per block: 1 vs ~4 us
    # a block); each block subtracts its peaks from them, the same float ops as before
    picks = z[xp.arange(rows), ids]
    if bias is not None:
        picks += bias[0, ids]
    if loops is not None and bias is None and z.dtype == np.float32:
        # one numba visit per row: max, exp, float64 sum, scale, one-hot
        peaks, totals = np.empty(rows, z.dtype), np.empty(rows, z.dtype)
        if _one_pass_rows(z, loops, ids, peaks, totals):
            if not (np.isfinite(peaks).all() and np.isfinite(totals).all()):
                return None
            return np.log(totals) - (picks - peaks), z

    def block(k: int) -> None:
        start = starts[k]
        stop = min(start + step, rows)
        blk, block_ids = z[start:stop], ids[start:stop]
        if bias is not None:
            blk += bias
        peak = xp.max(blk, axis=1, keepdims=True)
        if not bool(xp.isfinite(peak).all()):
            finite[0] = False
            return
        blk -= peak
        picked = picks[start:stop] - peak[:, 0]        # z_i[id_i] - peak_i
        xp.exp(blk, out=blk)
        # the sums in float64 (numba's vectorized loop, or NumPy's), rounded to the dtype
        if loops is not None:
            sums = np.empty(stop - start, np.float64)
            loops.row_sums_f64(blk, sums)
            total = sums.astype(blk.dtype)
        else:
            total = xp.sum(blk, axis=1, dtype=np.float64).astype(blk.dtype)
        losses[start:stop] = xp.log(total) - picked
        xp.reciprocal(total, out=total)                # (a product: cheaper than a quotient)
        if loops is not None:
            loops.scale_rows_minus_onehot(blk, total, block_ids, one)
        else:
            blk *= total[:, None]
            blk[xp.arange(stop - start), block_ids] -= 1

    if xp is np and z.size >= PARALLEL_MIN_SIZE and cpu_threads.NUM_THREADS > 1:
        cpu_threads.run_chunks(block, len(starts), cpu_threads.NUM_THREADS)
    else:
        for k in range(len(starts)):
            block(k)
    return (losses, z) if finite[0] else None


def backward(x: Any, w: Any, s: Any, g: Any, parts: str) -> tuple:
    """The adjoints named in ``parts`` (a subset of "xwb", in that order) of ``x``, ``w`` and
    the bias (as (C,)) for the losses' adjoint ``g`` (N,), from the forward's ``S``."""
    dtype = s.dtype
    g_col = g.reshape(-1, 1).astype(dtype, copy=False)
    out = []
    if "x" in parts:
        dx = blas_policy.matmul(s, w.astype(dtype, copy=False).T)
        dx *= g_col
        out.append(dx)
    if "w" in parts and "b" in parts:
        # both from one product: [diag(g) x, g]^T S, whose last row is db (a matrix-vector
        # product on its own would read S once more)
        inner = x.shape[1]
        x_g = array_module(s).empty((x.shape[0], inner + 1), dtype)
        x_g[:, :inner] = x * g_col
        x_g[:, inner] = g
        both = blas_policy.matmul(x_g.T, s)
        out += [both[:inner], both[inner]]
    elif "w" in parts:
        out.append(blas_policy.matmul((x * g_col).astype(dtype, copy=False).T, s))
    elif "b" in parts:
        out.append(g.astype(dtype, copy=False) @ s)
    return tuple(out)
