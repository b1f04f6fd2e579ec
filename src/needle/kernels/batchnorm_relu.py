"""BatchNorm's backward with ReLU's adjoint folded in: ``batch_norm_grad(g * (y > 0), ...)``
for ``y = batch_norm(x, ...)``, in two passes over g and x: neither the masked gradient nor
y is read or written.

Why: in a CNN's backward every ``conv -> BatchNorm -> ReLU`` block runs ``relu_grad`` (read
g and y, write r) and then BatchNorm's two passes (read r and x; read r and x, write dx):
eight array passes. Here the two passes read g and x and form y (``x * alpha + beta``, the
forward's two roundings) and r in registers: five. A gradient broadcast from a global
average pool is read from the small array it comes from (``per`` rows of x per row of it).
Measured alone (one thread, in cache and out): the passes are bound by memory traffic, so
time follows the arrays read and written.

Results are bit for bit those of ``batch_norm``, ``relu_grad`` and ``batch_norm_grad``'s
compiled path (core/ops_norm.py, kernels/batchnorm.py): y and r are the same float
operations, the float64 column sums run over the same row blocks (cpu_kernels' rule, fixed
by the shape) added in the same order, and the per-channel constants come from the same
NumPy formulas. Where that compiled path would not run (no numba, other dtypes or layouts,
CuPy arrays) ``backward`` returns None and the caller runs the ops.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import cpu_threads
from ..backend.numba_support import NumbaLoops
from . import cpu_kernels, threaded_elementwise
from .reduce import EINSUM_MIN_SIZE, stat_matrix

__all__ = ["backward"]

_loops = NumbaLoops("needle.kernels.numba_batchnorm_relu")
#: the dx loop's "no column sums wanted": an empty sums array (nothing is ever written to
#: it; writeable, as the loop's signature wants: a read-only one would not compile)
_NO_SUMS = np.empty(0, np.float64)

#: smallest (M, C) matrix (elements) whose dx pass is split across needle's threads where
#: its sums are not (cpu_kernels splits those from 2**20 elements), and the block size.
#: NOTE: the threaded relu_grad this pass replaces splits from 2**19 (threaded_elementwise),
#: so the fused op is never less parallel than the pair; from 2**18 it lost on a loaded
#: machine (CNN strides 1,2,2 step, CPU time median 17.7 vs 15.9 ms unsplit)
DX_SPLIT_MIN_ELEMENTS = threaded_elementwise.SPLIT_MIN_ELEMENTS
DX_BLOCK_ELEMENTS = 1 << 18


def _moved(v: np.ndarray, axis: int) -> np.ndarray:
    """``v`` with ``axis`` moved last (the order of layout.channel_matrix's rows)."""
    return v.transpose((*range(axis), *range(axis + 1, v.ndim), axis))


def _rows(v: np.ndarray, axis: int) -> np.ndarray:
    """``v``'s (M, C) channel matrix in the rows' order of x's matrix (a copy if ``v`` is
    stored in another layout)."""
    moved = _moved(v, axis)
    if not moved.flags.c_contiguous:
        moved = np.ascontiguousarray(moved)
    return moved.reshape(-1, v.shape[axis])


def _grad_rows(g: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    """(matrix, per): g's rows, matrix row ``i // per`` for row i of x's matrix. A g
    broadcast (zero strides) along the trailing non-channel axes is read from the small
    array it broadcasts (per = the product of those axes' lengths)."""
    moved = _moved(g, axis)
    if moved.flags.c_contiguous:
        return moved.reshape(-1, g.shape[axis]), 1
    q = moved.ndim - 1  # leading axes kept: the broadcast ones are q .. ndim-2
    while q > 0 and (moved.strides[q - 1] == 0 or moved.shape[q - 1] == 1):
        q -= 1
    per = 1
    for d in moved.shape[q:-1]:
        per *= d
    if per == 1:
        return _rows(g, axis), 1
    small = moved[(slice(None),) * q + (0,) * (moved.ndim - 1 - q)]
    return np.ascontiguousarray(small).reshape(-1, g.shape[axis]), per


def _elementwise_blocks(m: int, size: int) -> list[tuple[int, int]]:
    """Row blocks for the dx pass where the sums run whole: it is elementwise, so any split
    gives the same bits; split on needle's threads from DX_SPLIT_MIN_ELEMENTS elements."""
    if size < DX_SPLIT_MIN_ELEMENTS or m < 2 or cpu_threads.NUM_THREADS < 2:
        return [(0, m)]
    count = min(m, max(2, size // DX_BLOCK_ELEMENTS))
    bounds = [m * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _vectors(dtype: Any, *values: Any) -> list[np.ndarray] | None:
    out = []
    for v in values:
        if type(v) is not np.ndarray or v.dtype != dtype:
            return None
        out.append(np.ascontiguousarray(v).reshape(-1))
    return out


def backward(g: Any, x: Any, weight: Any, bias: Any, mean: Any, var: Any, eps: float,
             axes: tuple, channel_sums: bool = False) -> tuple | None:
    """``(dx, dweight, dbias)`` of training BatchNorm (input ``x``, batch ``mean`` and ``var``
    over ``axes``) for output gradient ``g * (y > 0)``, ``y = batch_norm(x, weight, bias,
    mean, var)`` recomputed in the loops, or None where they cannot take the arrays (the
    caller then runs batch_norm, relu_grad and batch_norm_grad).

    ``channel_sums``: a fourth item, dx summed over every axis but the channel one as a
    (C,) vector, taken in the dx pass where that gives the bits of summing dx afterwards
    (``cpu_kernels.column_sums`` over the same row blocks: a channels-last dx of 3+ dims and
    ``EINSUM_MIN_SIZE``+ elements, reduce.py's rule), else None (the caller sums dx)."""
    if (type(g) is not np.ndarray or type(x) is not np.ndarray or g.shape != x.shape
            or g.dtype != x.dtype or not cpu_kernels.enabled(x.dtype) or x.size == 0):
        return None
    vectors = _vectors(x.dtype, mean, var, weight, bias)
    found = stat_matrix(x, axes)
    if vectors is None or found is None or _loops.module() is None:
        return None
    axis, xm = found
    mean_v, var_v, weight_v, bias_v = vectors
    gm, per = _grad_rows(g, axis)
    m, c = xm.shape
    # the forward's constants, as every BatchNorm forward path rounds them (y = x a + b)
    inv = 1.0 / np.sqrt(var_v + eps)
    alpha = weight_v * inv
    beta = bias_v - mean_v * alpha
    # NOTE: cpu_kernels' own row blocks (shape-fixed, None below its split size or on one
    # thread), so the float64 sums are those of batch_norm_grad's compiled path
    blocks = cpu_kernels._row_blocks(xm) or [(0, m)]
    module = _loops.module()
    parts = np.empty((2, len(blocks), c), np.float64)
    if not _loops.call(module.bn_relu_grad_sums, gm, per, xm, alpha, beta, mean_v, 0, 0,
                       parts[0, 0], parts[1, 0]):
        return None  # (compiled here, on empty ranges, or failed: NumPy from now on)
    if not _loops.call(module.bn_relu_grad_dx, gm, per, xm, alpha, beta, mean_v, alpha, alpha,
                       alpha, 0, 0, xm[:0], _NO_SUMS):
        return None

    def sums(i: int) -> None:
        s, e = blocks[i]
        module.bn_relu_grad_sums(gm, per, xm, alpha, beta, mean_v, s, e, parts[0, i],
                                 parts[1, i])

    cpu_threads.run_chunks(sums, len(blocks), cpu_threads.NUM_THREADS)
    sum_g = np.add.reduce(parts[0], axis=0)
    sum_gc = np.add.reduce(parts[1], axis=0)
    # the coefficients as cpu_kernels.batch_norm_grad computes them, in x's dtype (its
    # scale = weight * inv is alpha)
    b = (-alpha * inv * inv * (sum_gc / m)).astype(x.dtype)
    k = (-alpha * (sum_g / m)).astype(x.dtype)
    dxm = np.empty_like(xm)

    dx_blocks = blocks if len(blocks) > 1 else _elementwise_blocks(m, xm.size)
    fold = (channel_sums and x.ndim >= 3 and x.size >= EINSUM_MIN_SIZE
            and dx_blocks == blocks)
    if fold:
        dx_parts = np.empty((len(blocks), c), np.float64)
        if not _loops.call(module.bn_relu_grad_dx, gm, per, xm, alpha, beta, mean_v,
                           alpha, alpha, alpha, 0, 0, xm[:0], dx_parts[0]):
            return None

    def dx_pass(i: int) -> None:
        s, e = dx_blocks[i]
        module.bn_relu_grad_dx(gm, per, xm, alpha, beta, mean_v, alpha, b, k, s, e, dxm,
                               dx_parts[i] if fold else _NO_SUMS)

    cpu_threads.run_chunks(dx_pass, len(dx_blocks), cpu_threads.NUM_THREADS)
    dweight = (sum_gc * inv).astype(x.dtype).reshape(weight.shape)
    dbias = sum_g.astype(x.dtype).reshape(weight.shape)
    dx = _from_rows(dxm, x, axis)
    if not channel_sums:
        return dx, dweight, dbias
    dx_sums = np.add.reduce(dx_parts, axis=0).astype(x.dtype) if fold else None
    return dx, dweight, dbias, dx_sums


def _from_rows(matrix: np.ndarray, like: np.ndarray, axis: int) -> np.ndarray:
    """The inverse of ``_rows``: an (M, C) matrix as an array shaped like ``like``."""
    ndim = like.ndim
    order = (*range(axis), *range(axis + 1, ndim), axis)
    moved = matrix.reshape([like.shape[i] for i in order])
    return moved.transpose(np.argsort(order))
