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
operations, the column sums (chunks of 8 rows in x's dtype, then float64:
numba_kernels.bn_grad_sums) run over the same row blocks (cpu_kernels' rule, fixed by the
shape) added in the same order, and the per-channel constants come from the same loop
(numba_kernels.bn_grad_constants). Large passes run as numba prange loops on TBB
(cpu_kernels.run_in_blocks), with the same bits. Where that compiled path would not run
(no numba, other dtypes or layouts, CuPy arrays) ``backward`` returns None and the caller
runs the ops.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import cpu_threads
from ..backend.numba_support import NumbaLoops
from . import column_sums, cpu_kernels, threaded_elementwise
from .axes import inverse_permutation
from .reduce import EINSUM_MIN_SIZE, stat_matrix

__all__ = ["backward", "dx_pass", "forward_constants", "grad_constants"]

_loops = NumbaLoops("needle.kernels.numba_batchnorm_relu")

#: smallest (M, C) matrix (elements) whose dx pass is split across needle's threads where
#: its sums run whole (below cpu_kernels.SPLIT_MIN_ELEMENTS, 2**17 since session 10: so only
#: where that is raised), and the block size. Larger matrices run the dx pass in the sums'
#: blocks, or in column_sums.py's where it takes the conv bias sums, on numba's prange.
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


def forward_constants(mean: np.ndarray, var: np.ndarray, weight: np.ndarray,
                      bias: np.ndarray, eps: float) -> tuple[np.ndarray, ...]:
    """``(inv, alpha, beta)`` of the forward ``y = x alpha + beta`` (``inv = 1 / sqrt(var +
    eps)``), rounded as every BatchNorm forward path rounds them: the activation the fused
    backward passes recompute from x is then the forward's, bit for bit."""
    inv = 1.0 / np.sqrt(var + eps)
    alpha = weight * inv
    return inv, alpha, bias - mean * alpha


def grad_constants(parts: np.ndarray, inv: np.ndarray, weight: np.ndarray, m: int,
                   dtype: Any) -> tuple[np.ndarray, ...] | None:
    """``(b, k, dweight, dbias)`` from the float64 column sums ``parts`` (2, blocks, C) of a
    BatchNorm gradient's first pass, as cpu_kernels.batch_norm_grad computes them, in
    ``dtype`` (its scale ``weight * inv`` is alpha); None where numba cannot run it."""
    c = inv.shape[0]
    a, b, k, dweight, dbias = (np.empty(c, dtype) for _ in range(5))
    if not cpu_kernels.run_kernel("bn_grad_constants", parts[0], parts[1], inv, weight, m, a, b,
                                  k, dweight, dbias):
        return None
    return b, k, dweight, dbias


def backward(g: Any, x: Any, weight: Any, bias: Any, mean: Any, var: Any, eps: float,
             axes: tuple, channel_sums: bool = False) -> tuple | None:
    """``(dx, dweight, dbias)`` of training BatchNorm (input ``x``, batch ``mean`` and ``var``
    over ``axes``) for output gradient ``g * (y > 0)``, ``y = batch_norm(x, weight, bias,
    mean, var)`` recomputed in the loops, or None where they cannot take the arrays (the
    caller then runs batch_norm, relu_grad and batch_norm_grad).

    ``channel_sums``: a fourth item, dx summed over every axis but the channel one as a
    (C,) vector, taken in the dx pass where that gives the bits of summing dx afterwards (a
    channels-last dx of 3+ dims and ``EINSUM_MIN_SIZE``+ elements, reduce.py's rule: the dx
    pass then runs in the row blocks of column_sums.row_blocks, or whole where those sums
    are one loop), else None (the caller sums dx)."""
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
    inv, alpha, beta = forward_constants(mean_v, var_v, weight_v, bias_v, eps)
    # NOTE: cpu_kernels' own row blocks (fixed by the shape; None below its split size), so
    # the float64 sums are those of batch_norm_grad's compiled path
    bounds = cpu_kernels.row_blocks(xm)
    module = _loops.module()
    if bounds is None:
        parts = np.empty((2, 1, c), np.float64)
        if not _loops.call(module.bn_relu_grad_sums, gm, per, xm, alpha, beta, mean_v, 0, m,
                           parts[0, 0], parts[1, 0]):
            return None  # (numba failed to compile it: NumPy from now on)
    else:
        parts = np.empty((2, len(bounds) - 1, c), np.float64)
        if not _blocks("bn_relu_grad_sums", bounds, gm, per, xm, alpha, beta, mean_v,
                       parts[0], parts[1]):
            return None
    constants = grad_constants(parts, inv, weight_v, m, x.dtype)
    if constants is None:
        return None
    b, k, dweight, dbias = constants
    dxm = np.empty_like(xm)
    fold = channel_sums and x.ndim >= 3 and x.size >= EINSUM_MIN_SIZE
    dx_bounds = bounds
    if fold:  # dx's column sums over the blocks that summing dx afterwards would take
        sum_bounds = column_sums.row_blocks(m, c)
        dx_bounds = None if sum_bounds is None else np.array(sum_bounds, np.int64)
    dx_parts = dx_pass(gm, per, xm, alpha, beta, mean_v, b, k, dx_bounds, dxm, fold)
    if dx_parts is None:
        return None
    dweight, dbias = dweight.reshape(weight.shape), dbias.reshape(weight.shape)
    dx = _from_rows(dxm, x, axis)
    if not channel_sums:
        return dx, dweight, dbias
    dx_sums = np.add.reduce(dx_parts, axis=0).astype(x.dtype) if fold else None
    return dx, dweight, dbias, dx_sums


def dx_pass(gm: np.ndarray, per: int, xm: np.ndarray, alpha: np.ndarray, beta: np.ndarray,
            mean: np.ndarray, b: np.ndarray, k: np.ndarray, bounds: np.ndarray | None,
            dxm: np.ndarray, fold: bool = False) -> np.ndarray | None:
    """``backward``'s second pass: dxm = alpha r + b (x - mean) + k, r = g * (x alpha + beta
    > 0) (bn_grad_constants' ``a`` is alpha), over the row blocks ``bounds`` (None: whole,
    or split on needle's threads); with ``fold``, dx's float64 column sums per block (rows
    of the array returned; no columns without). None where numba could not run it."""
    c = xm.shape[1]
    module = _loops.module()
    if module is None:
        return None
    if bounds is not None:
        dx_parts = np.empty((len(bounds) - 1, c if fold else 0), np.float64)
        if not _blocks("bn_relu_grad_dx", bounds, gm, per, xm, alpha, beta, mean, alpha, b, k,
                       dxm, dx_parts):
            return None
    else:
        dx_parts = np.empty((1, c if fold else 0), np.float64)
        if not _dx_whole(module, gm, per, xm, alpha, beta, mean, b, k, dxm, dx_parts[0]):
            return None
    return dx_parts


def _blocks(name: str, bounds: np.ndarray, *args: Any) -> bool:
    """Loop ``name`` over every row block of ``bounds`` (``args``: the loop's, its sums' arrays
    with a row per block; ``args[2]`` is x's matrix) as cpu_kernels runs its passes
    (``cpu_kernels.run_in_blocks``: prange, needle's threads or one call; the same bits)."""
    return cpu_kernels.run_in_blocks(name, bounds, args[2].size, args,
                                     getattr(_loops.module(), name + "_blocks"), _loops.call)


def _dx_whole(module: Any, gm: np.ndarray, per: int, xm: np.ndarray, alpha: np.ndarray,
              beta: np.ndarray, mean: np.ndarray, b: np.ndarray, k: np.ndarray,
              dxm: np.ndarray, sums: np.ndarray) -> bool:
    """The dx pass where the sums ran whole: one call, or (elementwise, so any split gives the
    same bits) row blocks that needle's threads share from DX_SPLIT_MIN_ELEMENTS (where the
    sums' blocks start later than that) when no column sums are taken."""
    m = xm.shape[0]
    loop = module.bn_relu_grad_dx
    blocks = _elementwise_blocks(m, xm.size) if sums.shape[0] == 0 else [(0, m)]
    if len(blocks) == 1:
        return _loops.call(loop, gm, per, xm, alpha, beta, mean, alpha, b, k, 0, m, dxm, sums)
    if not _loops.call(loop, gm, per, xm, alpha, beta, mean, alpha, b, k, 0, 0, dxm, sums):
        return False

    def dx_pass(i: int) -> None:
        s, e = blocks[i]
        loop(gm, per, xm, alpha, beta, mean, alpha, b, k, s, e, dxm, sums)

    cpu_threads.run_chunks(dx_pass, len(blocks), cpu_threads.NUM_THREADS)
    return True


def _from_rows(matrix: np.ndarray, like: np.ndarray, axis: int) -> np.ndarray:
    """The inverse of ``_rows``: an (M, C) matrix as an array shaped like ``like``."""
    ndim = like.ndim
    order = (*range(axis), *range(axis + 1, ndim), axis)
    moved = matrix.reshape([like.shape[i] for i in order])
    return moved.transpose(inverse_permutation(order))
