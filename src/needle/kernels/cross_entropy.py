"""Softmax cross-entropy of small (B, C) logits, and its gradient, as one compiled pass each.

A classifier's loss (MNIST: 100 x 10 logits) costs a dozen NumPy calls each way (max, the
finiteness check, subtract, exp, sum, log, the pick; the softmax and the scatter back), about
40 us of call overhead for a few hundred flops. One loop over the rows does it in a few
microseconds. Large float32 logits (a language model's 1,120 x 10,000) run
kernels/numba_loss_rows.py's row loops (numba_exp.py's vectorized max and exp, float64 sums),
their rows split over cores by numba's ``prange`` (numba_parallel_loss_rows.py; the same
bits on any thread count): one thread, thread CPU time, forward 12.2 -> 9.1 ms, gradient
19.1 -> 11.8 ms; about half that on two threads. Other large logits keep the cache-blocked
NumPy formulas of kernels/softmax.py.

The gradient of large logits (``loss_rows_grad_blocked``) is written into an array recycled
between steps (kernels/recycle.py): no page faults for a vocabulary-sized gradient. Without
the numba loops it runs the blocked softmax's NumPy calls, the same bits as
``softmax_last_axis(z, g) - onehot * g``.

The compiled loops check the class ids lie in [0, C) before they read (the caller's
``checked_ids`` then raises its error): the ops need no separate min/max pass over the ids.

Each row's sum of exponentials accumulates in float64, so the results agree with the NumPy
formulas to float rounding (not bit for bit). numba is optional (``needle[fast]``): without
it, for rows with a non-finite maximum, or for other dtypes or layouts, both functions return
None and the caller runs its NumPy formula.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ..backend import parallel_loops
from ..backend.numba_support import NumbaLoops, numba_module
from . import recycle
from .softmax import BLOCK_BYTES
from .softmax import MIN_SIZE as BLOCKED_MIN_SIZE

__all__ = ["MAX_SIZE", "ids_within", "loss_rows", "loss_rows_grad", "loss_rows_grad_blocked"]

#: larger logits keep NumPy's vectorized passes (kernels/softmax.py), or, float32 ones
#: where numba is installed, the row loops of kernels/numba_loss_rows.py
MAX_SIZE = 1 << 16
#: float32 logits of at least this many elements split their rows over numba's prange
#: threads (backend/parallel_loops.py), in blocks of about ``ROW_BLOCK_ELEMENTS``
PRANGE_MIN_SIZE = 1 << 17
ROW_BLOCK_ELEMENTS = 1 << 16

#: kernels/numba_loss_rows.py and its prange twin on first use
LARGE_LOOPS = NumbaLoops(f"{__package__}.numba_loss_rows")
PARALLEL_LOOPS = NumbaLoops(f"{__package__}.numba_parallel_loss_rows")


def _large_f32(z: Any, ids: Any) -> Any:
    """numba_loss_rows where it takes these large logits (2-D C-contiguous float32 NumPy,
    1-D integer ids of its rows), else None."""
    if not (type(z) is np.ndarray and z.ndim == 2 and z.dtype == np.float32
            and z.size > MAX_SIZE and z.flags.c_contiguous and type(ids) is np.ndarray
            and ids.shape == z.shape[:1] and ids.dtype.kind in "iu"):
        return None
    return LARGE_LOOPS.module()


def _rows_in_blocks(z: Any, serial: Any, parallel_name: str, head: tuple, tail: tuple
                    ) -> bool:
    """``serial(z, *head, 0, rows, *tail)``'s work on every row, the rows in blocks fixed by
    the shape over numba's prange threads where that runs (``parallel_name`` of
    numba_parallel_loss_rows, taking ``(z, *head, *tail, count)``); False where the loop does
    not compile (nothing ran)."""
    rows = z.shape[0]
    if z.size >= PRANGE_MIN_SIZE and parallel_loops.parallel_threads():
        count = min(rows, max(1, z.size // ROW_BLOCK_ELEMENTS))
        parallel = PARALLEL_LOOPS.module()
        if count > 1 and parallel is not None and PARALLEL_LOOPS.call(
                getattr(parallel, parallel_name), z, *head, *tail, count):
            return True
    return LARGE_LOOPS.call(serial, z, *head, 0, rows, *tail)


@functools.lru_cache(maxsize=1)
def _loops() -> Any:
    numba = numba_module()
    if numba is None:
        return None

    def row_peak_and_total(z, i):  # pragma: no cover - compiled by numba
        peak = z[i, 0]
        for j in range(1, z.shape[1]):
            if z[i, j] > peak:
                peak = z[i, j]
        total = 0.0
        if np.isfinite(peak):
            for j in range(z.shape[1]):
                total += np.exp(z[i, j] - peak)
        return peak, total

    def ids_in_range(ids, width):  # pragma: no cover - compiled by numba
        for i in range(ids.shape[0]):  # noqa: SIM110 - numba compiles loops, not all(...)
            if ids[i] < 0 or ids[i] >= width:
                return False
        return True

    def loss(z, ids, out):  # pragma: no cover - compiled by numba
        if not ids_fit(ids, z.shape[1]):
            return False
        for i in range(z.shape[0]):
            peak, total = peak_and_total(z, i)
            if not np.isfinite(peak):
                return False
            out[i] = np.log(total) + peak - z[i, ids[i]]
        return True

    def grad(z, ids, g, out):  # pragma: no cover - compiled by numba
        if not ids_fit(ids, z.shape[1]):
            return False
        for i in range(z.shape[0]):
            peak = z[i, 0]
            for j in range(1, z.shape[1]):
                if z[i, j] > peak:
                    peak = z[i, j]
            if not np.isfinite(peak):
                return False
            total = 0.0
            for j in range(z.shape[1]):  # each exponential once: kept in out, then scaled
                e = np.exp(z[i, j] - peak)
                out[i, j] = e
                total += e
            scale = g[i] / total
            for j in range(z.shape[1]):
                out[i, j] = out[i, j] * scale
            out[i, ids[i]] -= g[i]
        return True

    jit = numba.njit(error_model="numpy", nogil=True)
    peak_and_total = jit(row_peak_and_total)
    ids_fit = jit(ids_in_range)
    return jit(loss), jit(grad), ids_fit


def _applies(z: Any, ids: Any) -> bool:
    return (type(z) is np.ndarray and z.ndim == 2 and 0 < z.size <= MAX_SIZE
            and z.dtype in (np.float32, np.float64) and z.flags.c_contiguous
            and ids.shape == z.shape[:1] and ids.dtype.kind in "iu")


def ids_within(ids: Any, classes: int) -> bool | None:
    """Whether every class id in the 1-D integer array ``ids`` lies in [0, classes), in one
    compiled pass (``check_class_ids`` on every step: NumPy's min and max are two calls and
    two passes); None where the loop does not apply (no numba, other arrays), and the caller
    checks in NumPy."""
    if type(ids) is not np.ndarray or ids.ndim != 1 or ids.dtype.kind not in "iu":
        return None
    loops = _loops()
    return None if loops is None else bool(loops[2](ids, classes))


def loss_rows(z: Any, ids: Any) -> Any:
    """``logsumexp(z_i) - z_i[ids_i]`` for each row of ``z``, a new (B,) array; or None where
    the compiled loop does not apply, and for ids outside [0, C) (the loop checks them
    before it reads: the caller's ``checked_ids`` then raises its error)."""
    if not _applies(z, ids):
        return _large_loss_rows(z, ids)
    loops = _loops()
    if loops is None:
        return None
    out = np.empty(z.shape[0], dtype=z.dtype)
    return out if loops[0](z, ids, out) else None


def _large_loss_rows(z: Any, ids: Any) -> Any:
    """``loss_rows`` of large float32 logits through numba_loss_rows (rows split over
    threads), or None (no numba, ids out of range, a loss that is not finite: the caller's
    formulas then run, the careful ones for inf and NaN rows)."""
    large = _large_f32(z, ids)
    if large is None or not ids_within(ids, z.shape[1]):
        return None
    losses = np.empty(z.shape[0], np.float32)
    if not _rows_in_blocks(z, large.loss_rows_f32, "loss_blocks", (ids,), (losses,)):
        return None
    return losses if np.isfinite(losses).all() else None


def loss_rows_grad(z: Any, ids: Any, g: Any) -> Any:
    """``g_i * (softmax(z_i) - onehot(ids_i))`` as a new array shaped like ``z``; or None
    where the compiled loop does not apply (``g`` must be (B,) of z's dtype) and for ids
    outside [0, C), as ``loss_rows``."""
    if not _applies(z, ids) or type(g) is not np.ndarray or g.dtype != z.dtype \
            or g.shape != z.shape[:1]:
        return None
    loops = _loops()
    if loops is None:
        return None
    out = np.empty(z.shape, z.dtype)  # (C-contiguous as z; np.empty_like is a Python wrapper)
    return out if loops[1](z, ids, g, out) else None


def loss_rows_grad_blocked(z: Any, ids: Any, g: Any) -> Any:
    """``loss_rows_grad`` for large logits: kernels/softmax.py's blocked softmax times g (the
    same NumPy calls, so the same bits), written into a recycled array, then ``g`` taken off
    at each row's id; None where it does not apply (the caller's formula then runs)."""
    if not (type(z) is np.ndarray and z.ndim == 2 and z.size >= BLOCKED_MIN_SIZE
            and z.dtype.kind == "f" and z.flags.c_contiguous and type(g) is np.ndarray
            and g.dtype == z.dtype and g.shape == z.shape[:1] and ids.shape == g.shape):
        return None
    rows, width = z.shape
    out = recycle.empty(z.shape, z.dtype)
    large = _large_f32(z, ids)
    if large is not None and g.dtype == np.float32 and \
            _rows_in_blocks(z, large.loss_grad_rows_f32, "loss_grad_blocks", (ids, g),
                            (out,)):
        return out
    scale = g.reshape(-1, 1)
    step = max(1, BLOCK_BYTES // (width * z.itemsize))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        block, dest = z[start:stop], out[start:stop]
        np.subtract(block, np.maximum.reduce(block, axis=1, keepdims=True), out=dest)
        np.exp(dest, out=dest)
        dest /= np.add.reduce(dest, axis=1, keepdims=True)
        dest *= scale[start:stop]
    out[np.arange(rows), ids] -= g
    return out
