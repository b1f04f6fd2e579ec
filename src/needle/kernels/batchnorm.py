"""BatchNorm's kernels: batch statistics, the affine map and the backward, compiled or in NumPy.

Each runs down one ladder, written once here:

1. compiled loops (cpu_kernels, numba) over the (M, C) matrix of x's memory, where the
   statistics are its column sums (``_compiled_matrix``): one or two passes instead of five
   to a dozen NumPy calls (MLP-ResNet step -5% eager, -7% jitted; CNN step -8%);
2. channels-last x (NHWC memory behind an NCHW view): the NumPy formulas on (M, C) channel
   matrices viewed as long rows (layout.py), which keep x's layout;
3. the NumPy formulas as written (the reference: CuPy, float16, no numba, other layouts).

The compiled loops sum in float64, so they agree with the NumPy paths to float32 rounding.
The hot case, a small C-contiguous (B, C) matrix (BatchNorm1d in an MLP), is recognized first
in a few checks (``_whole_matrix``) and runs as one kernel call per op: batch statistics in
one pass, the forward with its per-channel alpha and beta, the backward with its inv (jitted
MLP-ResNet step -9%, eager -4%, measured in alternating processes on a loaded machine).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend.numba_support import numba_module
from . import cpu_kernels, layout
from .reduce import (
    channel_matrix_of,
    moments,
    reduce_sum,
    reduce_sum_of_products,
    stat_matrix,
)

__all__ = ["affine", "backward", "backward_given_var", "forward", "statistics", "variance"]


def _compiled_matrix(x: Any, axes: tuple, *operands: Any) -> tuple[int, np.ndarray] | None:
    """(kept axis, (M, C) matrix of x's memory) where the compiled loops can take statistics of
    x over ``axes`` (``operands`` of x's dtype, numba present): the ladder's first rung."""
    for operand in operands:
        if operand.dtype != x.dtype:
            return None
    if not cpu_kernels.enabled(x.dtype):
        return None
    return stat_matrix(x, axes)


def variance(a: Any, axes: tuple, keepdims: bool) -> Any:
    """The biased variance of ``a`` over ``axes`` (kept as size 1 with ``keepdims``)."""
    found = _compiled_matrix(a, axes)
    stats = cpu_kernels.column_moments(found[1]) if found is not None else None
    if stats is not None:  # one compiled loop instead of five NumPy passes
        var = stats[1]
        if keepdims:
            var = var.reshape(tuple(1 if i in axes else d for i, d in enumerate(a.shape)))
        return var
    var = moments(a, axes)[2]
    return var if keepdims else np.squeeze(var, axis=axes)


def _whole_matrix(x: Any, axes: tuple) -> np.ndarray | None:
    """x itself in the compiled loops' hot case, checked in few steps: a C-contiguous
    float32/float64 NumPy (B, C) matrix reduced over its rows and small enough to run whole
    (BatchNorm1d in an MLP, where each microsecond of Python shows: inside a jitted step
    these checks and calls run ~2.5x slower than in a loop of their own)."""
    if (type(x) is np.ndarray and x.ndim == 2 and axes == (0,) and x.flags.c_contiguous
            and 0 < x.shape[0] and x.size < cpu_kernels.SPLIT_MIN_ELEMENTS
            and cpu_kernels.enabled(x.dtype)):
        return x
    return None


#: the compiled loops of the hottest case, (name, dtype) -> the loop, resolved on first use;
#: None where numba is absent or the loop failed to compile (the ladder then runs)
_hot_loops: dict[tuple, Any] = {}
_UNRESOLVED = object()
#: ``forward``'s direct call of its loop in the hot case (off: the ladder; for A/B runs and tests)
HOT_FORWARD = True


def _resolve_hot_loop(key: tuple) -> Any:
    """The numba loop ``key[0]`` for arrays of dtype ``key[1]``, or None; kept for the float
    dtypes (so the table stays small), looked up again for others (they take the ladder)."""
    if key[1] not in (np.float32, np.float64):
        return None
    loop = None
    if cpu_kernels.enabled(key[1]):
        from . import numba_kernels

        loop = getattr(numba_kernels, key[0])
    _hot_loops[key] = loop
    return loop


def statistics(x: Any, axes: tuple) -> tuple[Any, Any]:
    """(mean, biased variance) of ``x`` over ``axes``, kept as size 1: one compiled pass over
    x where it can run (cpu_kernels.column_statistics), else np.mean's arithmetic (the mean,
    then the mean of the centered squares: what ``mean`` and ``variance`` compute).

    NOTE: the hot case calls its loop directly, with the checks inline: inside a jitted
    MLP-ResNet step each Python call on the way costs ~1 us (2.5x its cost in a loop of its
    own), and the chain through cpu_kernels made six (step -2.6% with the backward's)."""
    if (type(x) is np.ndarray and x.ndim == 2 and axes == (0,) and x.flags.c_contiguous
            and 0 < x.shape[0] and x.size < cpu_kernels.SPLIT_MIN_ELEMENTS):
        dtype = x.dtype
        key = ("one_pass_moments" if dtype == np.float32 else "moments", dtype)
        loop = _hot_loops.get(key, _UNRESOLVED)
        if loop is _UNRESOLVED:
            loop = _resolve_hot_loop(key)
        if loop is not None:
            c = x.shape[1]
            mean, var = np.empty((1, c), dtype), np.empty((1, c), dtype)
            try:
                loop(x, mean[0], var[0])
                return mean, var
            except numba_module().core.errors.NumbaError:  # before anything was written
                _hot_loops[key] = None
    xm = _whole_matrix(x, axes)
    if xm is not None:
        whole = cpu_kernels.whole_column_statistics(xm)
        if whole is not None:
            row = (1, xm.shape[1])
            return whole[0].reshape(row), whole[1].reshape(row)
    found = _compiled_matrix(x, axes)
    stats = cpu_kernels.column_statistics(found[1]) if found is not None else None
    if stats is not None:
        kept = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        return stats[0].reshape(kept), stats[1].reshape(kept)
    mean, _, var = moments(x, axes)
    return mean, var


def forward(x: Any, weight: Any, bias: Any, mean: Any, var: Any, eps: float, axes: tuple) -> Any:
    """Training BatchNorm: ``x * alpha + beta`` with ``alpha = weight / sqrt(var + eps)`` and
    ``beta = bias - mean * alpha`` (per-channel arrays of keepdims shapes over ``axes``):
    one compiled call where it runs, else alpha and beta in NumPy and ``affine``. The hot
    case calls its loop directly (see ``statistics``: eager BatchNorm1d went through six
    Python calls to reach it)."""
    if (HOT_FORWARD and type(x) is np.ndarray and x.ndim == 2 and axes == (0,)
            and x.flags.c_contiguous and 0 < x.shape[0]
            and x.size < cpu_kernels.SPLIT_MIN_ELEMENTS and type(weight) is np.ndarray
            and type(bias) is np.ndarray and type(mean) is np.ndarray
            and type(var) is np.ndarray and weight.dtype is x.dtype and bias.dtype is x.dtype
            and mean.dtype is x.dtype and var.dtype is x.dtype and weight.flags.c_contiguous
            and bias.flags.c_contiguous and mean.flags.c_contiguous
            and var.flags.c_contiguous
            and weight.size == bias.size == mean.size == var.size == x.shape[1]):
        dtype = x.dtype
        key = ("bn_forward", dtype)
        loop = _hot_loops.get(key, _UNRESOLVED)
        if loop is _UNRESOLVED:
            loop = _resolve_hot_loop(key)
        if loop is not None:
            out = np.empty(x.shape, dtype)
            try:
                loop(x, weight.reshape(-1), bias.reshape(-1), mean.reshape(-1),
                     var.reshape(-1), dtype.type(eps), out)
                return out
            except numba_module().core.errors.NumbaError:  # before anything was written
                _hot_loops[key] = None
    xm = _whole_matrix(x, axes)
    if xm is not None:
        y = cpu_kernels.whole_batch_norm_forward(xm, weight, bias, mean, var, eps)
        if y is not None:
            return y
    found = _compiled_matrix(x, axes)
    if found is not None:
        y = cpu_kernels.batch_norm_forward(found[1], weight, bias, mean, var, eps)
        if y is not None:
            return layout.from_channel_matrix(y, x, found[0])
    alpha = weight * (1.0 / np.sqrt(var + eps))
    beta = bias - mean * alpha
    return affine(x, alpha, beta, axes)


def affine(x: Any, alpha: Any, beta: Any, axes: tuple) -> Any:
    """``x * alpha + beta`` with per-channel ``alpha`` and ``beta`` (keepdims shapes over
    ``axes``), in x's memory layout."""
    found = _compiled_matrix(x, axes, alpha)
    if found is not None:
        y = cpu_kernels.column_affine(found[1], alpha, beta)
        if y is not None:  # one compiled pass
            return layout.from_channel_matrix(y, x, found[0])
    found = channel_matrix_of(x, axes)
    if found is not None:  # channels-last memory: per-channel rows, same layout out
        axis, matrix = found
        y = layout.scaled(matrix, alpha.reshape(-1), beta.reshape(-1))
        return layout.from_channel_matrix(y, x, axis)
    y = x * alpha
    y += beta
    return y


def backward(g: Any, x: Any, weight: Any, mean: Any, inv: Any, axes: tuple) -> tuple:
    """BatchNorm's ``(dx, dweight, dbias)`` for output gradient ``g``, input ``x``, batch
    ``mean`` and ``inv = 1 / sqrt(var + eps)`` over ``axes`` (core/ops_norm.py, batch_norm_grad,
    has the formulas); dweight and dbias have the weight's shape."""
    count = 1
    for i in axes:
        count *= x.shape[i]
    if g.shape == x.shape:
        done = _backward_compiled(g, x, weight, mean, inv, _compiled_matrix(x, axes, inv))
        if done is not None:
            return done
    found = channel_matrix_of(x, axes)
    if found is not None:
        return _backward_channels_last(g, x, found, weight, mean, inv, count)
    centered = x - mean
    dbias = reduce_sum(g, axes, keepdims=True)
    dot = reduce_sum_of_products(g, centered, axes, keepdims=True)
    scale = weight * inv
    dx = g * scale
    centered *= scale * (inv * inv) * dot * (-1.0 / count)
    dx += centered
    dx += scale * dbias * (-1.0 / count)
    return dx, (dot * inv).reshape(weight.shape), dbias.reshape(weight.shape)


def backward_given_var(g: Any, x: Any, weight: Any, mean: Any, var: Any, eps: float,
                       axes: tuple) -> tuple:
    """``backward`` given the batch variance: one compiled call (inv included) where it runs,
    else ``backward`` with ``inv = 1 / sqrt(var + eps)``. The hot case calls its loop directly
    (see ``statistics``)."""
    if (type(x) is np.ndarray and type(g) is np.ndarray and x.ndim == 2 and axes == (0,)
            and g.shape == x.shape and g.dtype is x.dtype and x.flags.c_contiguous
            and g.flags.c_contiguous and 0 < x.shape[0]
            and x.size < cpu_kernels.SPLIT_MIN_ELEMENTS and type(weight) is np.ndarray
            and type(mean) is np.ndarray and type(var) is np.ndarray
            and weight.dtype is x.dtype and mean.dtype is x.dtype and var.dtype is x.dtype):
        dtype = x.dtype
        key = ("bn_grad_var", dtype)
        loop = _hot_loops.get(key, _UNRESOLVED)
        if loop is _UNRESOLVED:
            loop = _resolve_hot_loop(key)
        if loop is not None:
            c = x.shape[1]
            # (np.empty: np.empty_like is a Python-level wrapper, one more call per step)
            dx, dweight, dbias = np.empty(x.shape, dtype), np.empty(c, dtype), np.empty(c, dtype)
            try:
                loop(g, x, mean.reshape(-1), var.reshape(-1), dtype.type(eps),
                     weight.reshape(-1), dx, dweight, dbias)
                return dx, dweight.reshape(weight.shape), dbias.reshape(weight.shape)
            except numba_module().core.errors.NumbaError:  # before anything was written
                _hot_loops[key] = None
    xm = _whole_matrix(x, axes)
    if xm is not None and type(g) is np.ndarray and g.shape == x.shape and g.dtype == x.dtype:
        gm = g if g.flags.c_contiguous else np.ascontiguousarray(g)
        grads = cpu_kernels.whole_batch_norm_grad(gm, xm, mean, var, eps, weight)
        if grads is not None:
            return grads[0], grads[1].reshape(weight.shape), grads[2].reshape(weight.shape)
    if g.shape == x.shape and g.dtype == x.dtype:
        found = _compiled_matrix(x, axes)
        if found is not None:  # (one kernel call, or its blocked passes on a large matrix)
            axis, xm = found
            grads = cpu_kernels.batch_norm_grad_given_var(_matrix_like(g, axis, xm), xm, mean,
                                                          var, eps, weight)
            if grads is not None:
                dx, dweight, dbias = grads
                return (layout.from_channel_matrix(dx, x, axis), dweight.reshape(weight.shape),
                        dbias.reshape(weight.shape))
    return backward(g, x, weight, mean, 1.0 / np.sqrt(var + eps), axes)


def _matrix_like(g: Any, axis: int, xm: np.ndarray) -> np.ndarray:
    """g's (M, C) channel matrix in the row order of x's matrix ``xm`` (a copy when g is
    stored in another layout)."""
    gm = layout.channel_matrix(g, axis) if g.ndim > 2 else g
    if gm is None or not gm.flags.c_contiguous:
        gm = np.ascontiguousarray(np.moveaxis(g, axis, -1)).reshape(xm.shape)
    return gm


def _backward_compiled(g, x, weight, mean, inv, found: tuple | None) -> tuple | None:
    """``backward`` as two compiled passes where x's statistics are column sums of its
    memory (``found``: its kept axis and matrix); None where they cannot run."""
    if found is None:
        return None
    axis, xm = found
    grads = cpu_kernels.batch_norm_grad(_matrix_like(g, axis, xm), xm, mean, inv, weight)
    if grads is None:
        return None
    dx, dweight, dbias = grads
    return (layout.from_channel_matrix(dx, x, axis), dweight.reshape(weight.shape),
            dbias.reshape(weight.shape))


def _backward_channels_last(g, x, found: tuple, weight, mean, inv, count: int) -> tuple:
    """``backward`` for channels-last x (``found``: its channel axis and matrix): the same
    arithmetic on (M, C) channel matrices (g is brought to x's layout if it differs)."""
    axis, xm = found
    gm = layout.channel_matrix(g, axis)
    if gm is None:
        gm = np.ascontiguousarray(np.moveaxis(g, axis, -1)).reshape(xm.shape)
    inv = inv.reshape(-1)
    centered = layout.shifted(xm, -mean.reshape(-1))
    dbias = layout.column_sums(gm)
    dot = layout.column_dots(gm, centered)
    scale = weight.reshape(-1) * inv
    dx = layout.scaled(gm, scale)
    layout.multiply_(centered, scale * (inv * inv) * dot * (-1.0 / count))
    dx += centered
    layout.add_(dx, scale * dbias * (-1.0 / count))
    return (layout.from_channel_matrix(dx, x, axis), (dot * inv).reshape(weight.shape),
            dbias.reshape(weight.shape))
