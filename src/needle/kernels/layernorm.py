"""LayerNorm over the last axis, forward and backward, each in one call.

``layer_norm(x, weight, bias, eps)`` is ``(x - mean) / sqrt(var + eps) * weight + bias``
with each row's own (biased) statistics; ``layer_norm_grad(g, x, weight, eps)`` returns
``(dx, dweight, dbias)``. With numba (the ``fast`` extra) each row is visited once while it
is in cache (kernels/numba_layernorm.py); otherwise, and for CuPy arrays or other dtypes,
the NumPy formulas below run (five to seven passes over the activations). Both paths
compute the same formulas; numba's sums run in float64, so they agree with NumPy's float32
sums to rounding, not bit for bit.

Measured on the LM benchmark's (16, 64, 128) float32 activations (one process, loaded
2-core machine, medians): forward 0.90 -> 0.06 ms, backward 2.2 -> 0.57 ms, numba vs NumPy.
From ``PRANGE_MIN_ELEMENTS`` (the forward from ``FORWARD_PRANGE_MIN_ELEMENTS``) the rows
split over numba's prange threads (numba_parallel_layernorm.py); the backward's weight and
bias sums run in float64 per block of 128 rows, the blocks added in order, on one thread
too (session 12; may differ from the one row-order float64 sum before in the float32
result's last place: none of 7,110 sums checked did).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import parallel_loops
from ..backend.numba_support import NumbaLoops

__all__ = ["layer_norm", "layer_norm_grad"]


#: kernels/numba_layernorm.py on first use (NumPy runs where numba cannot)
LOOPS = NumbaLoops(f"{__package__}.numba_layernorm")
#: kernels/numba_parallel_layernorm.py, where prange runs (the one-thread loops where not)
PARALLEL_LOOPS = NumbaLoops(f"{__package__}.numba_parallel_layernorm")
#: activations of at least this many elements split their rows over numba's prange threads
#: (the same bits: rows on their own, the backward's sums in blocks fixed by the shape)
PRANGE_MIN_ELEMENTS = 1 << 16
#: ... for the forward (one visit a row, a third of the backward's work).
#: NOTE measured (session 12, the jitted Transformer LM step, 2^17-element activations,
#: ndl.profile alternating rounds, the 2-core machine near quiet): the backward split 1.10 ->
#: 0.79-0.84 ms a step (5 calls), the forward split 0.38 -> 0.41 (slower in the step although
#: 42 -> 32 us a call alone): the forward splits from 2^18 only (not measured there)
FORWARD_PRANGE_MIN_ELEMENTS = 1 << 18
#: rows per block of the forward's prange region (any split gives the same bits)
FORWARD_BLOCK_ROWS = 128


def _parallel(xm: Any, smallest: int) -> Any:
    """The prange loops for the (M, D) matrix xm, or None: fewer than ``smallest`` elements,
    or prange not running."""
    if xm.size < smallest or xm.shape[0] < 2 or not parallel_loops.parallel_threads():
        return None
    return PARALLEL_LOOPS.module()


def _compiled(*arrays: Any) -> Any:
    """The numba loops if they can take these arrays (C-contiguous NumPy float32/float64 of
    one dtype, at least one row), else None."""
    first = arrays[0]
    if first.dtype not in (np.float32, np.float64) or first.ndim == 0 or first.size == 0:
        return None
    for a in arrays:
        if type(a) is not np.ndarray or a.dtype != first.dtype or not a.flags.c_contiguous:
            return None
    return LOOPS.module()


def _contiguous(a: Any) -> Any:
    """A C-contiguous copy of a strided NumPy array (the loops index rows of a matrix);
    other arrays as they are."""
    return np.ascontiguousarray(a) if type(a) is np.ndarray and not a.flags.c_contiguous else a


def _check_vectors(x: Any, *vectors: Any) -> None:
    """A ValueError unless each vector has x's last dim (the loops do not check bounds)."""
    if x.ndim == 0 or any(v.shape != (x.shape[-1],) for v in vectors):
        raise ValueError(f"layer_norm: weight and bias must be ({x.shape[-1:]},) vectors "
                         f"for x {x.shape}")


def _row_stats(x: Any, eps: float) -> tuple[Any, Any]:
    """(x - mean, 1 / sqrt(var + eps)) over the last axis, kept dims, np.mean's arithmetic."""
    d = x.shape[-1]
    # (array methods, not np.add.reduce: CuPy arrays run the NumPy path too)
    centered = x - x.sum(axis=-1, keepdims=True) / d
    var = (centered * centered).sum(axis=-1, keepdims=True) / d
    return centered, (1.0 / np.sqrt(var + eps)).astype(x.dtype, copy=False)


def layer_norm(x: Any, weight: Any, bias: Any, eps: float) -> Any:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis of ``x``;
    ``weight`` and ``bias`` are (D,) arrays."""
    dtype = np.result_type(x.dtype, weight.dtype, bias.dtype)
    weight = _contiguous(weight.astype(dtype, copy=False).reshape(-1))
    bias = _contiguous(bias.astype(dtype, copy=False).reshape(-1))
    x = _contiguous(x.astype(dtype, copy=False))
    _check_vectors(x, weight, bias)
    loops = _compiled(x, weight, bias)
    if loops is not None:
        d = x.shape[-1]
        xm = x.reshape(-1, d)
        out = np.empty_like(xm)
        parallel = _parallel(xm, FORWARD_PRANGE_MIN_ELEMENTS)
        if parallel is not None and PARALLEL_LOOPS.call(
                parallel.layer_norm_blocks, xm, weight, bias, float(eps), out,
                -(-xm.shape[0] // FORWARD_BLOCK_ROWS)):
            return out.reshape(x.shape)
        if LOOPS.call(loops.layer_norm_rows, xm, weight, bias, float(eps), out):
            return out.reshape(x.shape)
    centered, inv = _row_stats(x, eps)
    centered *= inv
    centered *= weight
    centered += bias
    return centered


def layer_norm_grad(g: Any, x: Any, weight: Any, eps: float) -> tuple[Any, Any, Any]:
    """``(dx, dweight, dbias)`` of :func:`layer_norm` for the output gradient ``g``::

        xhat = (x - mean) * inv,  gw = g * weight
        dx = inv * (gw - mean(gw) - xhat * mean(gw * xhat))      (row means)
        dweight = sum over rows of g * xhat,  dbias = sum over rows of g
    """
    dtype = np.result_type(g.dtype, x.dtype, weight.dtype)
    g = g.astype(dtype, copy=False)
    x = x.astype(dtype, copy=False)
    weight = _contiguous(weight.astype(dtype, copy=False).reshape(-1))
    g, x = _contiguous(g), _contiguous(x)
    _check_vectors(x, weight)
    if g.shape != x.shape:
        raise ValueError(f"layer_norm_grad: g {g.shape} does not match x {x.shape}")
    d = x.shape[-1]
    loops = _compiled(g, x, weight)
    if loops is not None:
        gm, xm = g.reshape(-1, d), x.reshape(-1, d)
        dx = np.empty_like(xm)
        dweight = np.empty(d, dtype)
        dbias = np.empty(d, dtype)
        parallel = _parallel(xm, PRANGE_MIN_ELEMENTS)
        blocks = -(-xm.shape[0] // loops.GRAD_BLOCK_ROWS)
        if parallel is not None and PARALLEL_LOOPS.call(
                parallel.layer_norm_grad_blocks, gm, xm, weight, float(eps), dx, dweight,
                dbias, np.zeros((blocks, d)), np.zeros((blocks, d))):
            return dx.reshape(x.shape), dweight, dbias
        if LOOPS.call(loops.layer_norm_grad_rows, gm, xm, weight, float(eps), dx, dweight, dbias):
            return dx.reshape(x.shape), dweight, dbias
    centered, inv = _row_stats(x, eps)
    xhat = centered
    xhat *= inv
    rows = tuple(range(x.ndim - 1))
    dweight = (g * xhat).sum(axis=rows) if rows else g * xhat
    dbias = g.sum(axis=rows) if rows else g.copy()
    gw = g * weight
    dx = gw - gw.sum(axis=-1, keepdims=True) / d
    gw *= xhat
    dx -= xhat * (gw.sum(axis=-1, keepdims=True) / d)
    dx *= inv
    return dx, dweight.astype(dtype, copy=False), dbias.astype(dtype, copy=False)
