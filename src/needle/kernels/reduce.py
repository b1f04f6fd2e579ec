"""Sums and statistics over axes: einsum for large partial sums, column sums for channels-last.

``reduce_sum`` is ``np.sum`` without its Python wrapper for float arrays, with two measured
faster paths (NumPy 2.4): a large sum over some axes but not all goes through ``np.einsum``
(``einsum_sum_spec``), and a large sum keeping only the channel axis of a channels-last array
sums the columns of its (M, C) channel matrix (layout.py). ``sum_expr`` is the NumPy expression
``reduce_sum`` evaluates, for compiled plans (JIT, Session) that inline it. ``moments`` are
the (mean, centered, variance) statistics in np.mean's arithmetic that the normalization ops
and BatchNorm's fallback use.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from . import column_sums, layout

__all__ = ["EINSUM_MIN_SIZE", "channel_matrix_of", "einsum_sum_spec", "moments", "reduce_sum",
           "reduce_sum_of_products", "stat_matrix", "subtract_per_channel", "sum_expr"]

#: float arrays from this many elements sum through ``np.einsum`` when some axes are kept;
#: below it ``np.add.reduce``, whose bits ``column_sums.sum_rows`` reproduces (one constant)
EINSUM_MIN_SIZE = column_sums.IN_ORDER_MAX_SIZE


@functools.lru_cache(maxsize=1024)
def einsum_sum_spec(ndim: int, axes: tuple[int, ...]) -> str | None:
    """The ``np.einsum`` subscripts that sum ``axes`` of an ``ndim``-d array, keeping the others
    (None for a full reduction, which stays with ``np.add.reduce``'s pairwise sum).

    NOTE: for a sum over some axes but not all (BatchNorm's (N, H, W), a bias gradient)
    einsum's unrolled accumulation is 3-4x faster than ``np.add.reduce`` (175 -> 56 us over a
    (64, 16, 32, 32) array's (0, 2, 3), 1.3 ms -> 0.28 ms over an NHWC array's (0, 1, 2)) with
    the same rounding error (2e-7 relative); on small arrays it is no faster.
    """
    if ndim > 26 or not axes or len(set(axes)) >= ndim:
        return None
    letters = "abcdefghijklmnopqrstuvwxyz"[:ndim]
    kept = "".join(c for i, c in enumerate(letters) if i not in axes)
    return f"{letters}->{kept}"


def _kept_shape(shape: tuple, axes: tuple[int, ...]) -> tuple:
    """``shape`` with the ``axes`` set to 1 (keepdims)."""
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


def _kept_axis(shape: tuple, axes: tuple) -> int | None:
    """The one axis a sum over ``axes`` keeps, for a large array of 3 or more dims (else None):
    where a channels-last layout, known only at run time, decides how to sum."""
    if len(shape) < 3 or len(axes) != len(shape) - 1 or math.prod(shape) < EINSUM_MIN_SIZE:
        return None
    kept = [i for i in range(len(shape)) if i not in axes]
    return kept[0] if len(kept) == 1 else None


def channel_matrix_of(a: Any, axes: tuple) -> tuple[int, np.ndarray] | None:
    """(channel axis, (M, C) channel matrix) when a sum over ``axes`` keeps one axis of a large
    channels-last array (see layout.py), else None."""
    axis = _kept_axis(a.shape, axes)
    if axis is None:
        return None
    matrix = layout.channel_matrix(a, axis)
    return None if matrix is None else (axis, matrix)


def stat_matrix(a: Any, axes: tuple) -> tuple[int, np.ndarray] | None:
    """(kept axis, (M, C) matrix of a's memory) when statistics over ``axes`` are column sums
    of that matrix: a C-contiguous 2-D array reduced over axis 0 (BatchNorm1d), or a large
    channels-last array (``channel_matrix_of``); else None."""
    if (a.ndim == 2 and tuple(axes) == (0,) and isinstance(a, np.ndarray)
            and a.flags.c_contiguous):
        return 1, a
    return channel_matrix_of(a, axes)


def _keepdims(out: Any, shape: tuple, axes: tuple, keepdims: bool) -> Any:
    """A sum without the reduced axes, given them back as size 1 with ``keepdims``."""
    return out.reshape(_kept_shape(shape, axes)) if keepdims else out


def reduce_sum(a: Any, axes: tuple, keepdims: bool) -> Any:
    """``np.sum`` without its Python wrapper for float arrays; large partial sums by einsum, or
    by ``layout.column_sums`` over every axis but the innermost one in memory."""
    if a.dtype.kind == "f" and isinstance(a, np.ndarray):
        found = channel_matrix_of(a, axes)
        if found is not None:
            sums = column_sums.blocked_column_sums(found[1])  # large: threads, fixed blocks
            if sums is None:
                sums = layout.column_sums(found[1])
            return _keepdims(sums, a.shape, axes, keepdims)
        if a.size >= EINSUM_MIN_SIZE:
            spec = einsum_sum_spec(a.ndim, axes)
            if spec is not None:
                return _keepdims(np.einsum(spec, a), a.shape, axes, keepdims)
        # (NumPy's stubs type keepdims only as a literal True or False)
        return np.add.reduce(a, axis=axes, keepdims=keepdims)  # type: ignore[call-overload]
    return np.sum(a, axis=axes, keepdims=keepdims)


def reduce_sum_of_products(a: Any, b: Any, axes: tuple, keepdims: bool) -> Any:
    """``(a * b).sum(axes)`` for arrays of one shape, without the product array where einsum
    can do it (CPU floats with some axes kept: one read of each input)."""
    if a.dtype.kind == "f" and isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        found_a, found_b = channel_matrix_of(a, axes), channel_matrix_of(b, axes)
        if found_a is not None and found_b is not None:
            out = layout.column_dots(found_a[1], found_b[1])
            return _keepdims(out, a.shape, axes, keepdims)
        spec = einsum_sum_spec(a.ndim, axes)
        if spec is not None:
            inputs = spec.split("->")[0]
            return _keepdims(np.einsum(f"{inputs},{spec}", a, b), a.shape, axes, keepdims)
    return reduce_sum(a * b, axes, keepdims)


def sum_expr(arg: str, shape: tuple, axes: tuple[int, ...], keepdims: bool) -> str | None:
    """The NumPy expression that ``reduce_sum`` evaluates for a float array of ``shape`` (for
    compiled plans, which inline it), or None where only the run-time layout can decide (a
    large sum keeping one axis: channels-last arrays take ``layout.column_sums``)."""
    if _kept_axis(shape, axes) is not None:
        return None
    spec = einsum_sum_spec(len(shape), axes) if math.prod(shape) >= EINSUM_MIN_SIZE else None
    if spec is None:
        return f"np.add.reduce({arg}, axis={axes!r}, keepdims={keepdims})"
    expr = f"np.einsum({spec!r}, {arg})"
    return f"{expr}.reshape({_kept_shape(shape, axes)!r})" if keepdims else expr


def subtract_per_channel(a: Any, stat: Any, axes: tuple[int, ...]) -> Any:
    """``a - stat`` for a keepdims statistic over ``axes``; channels-last arrays keep their
    layout and take the fast per-channel path (see layout.py)."""
    found = channel_matrix_of(a, axes)
    if found is None:
        return a - stat
    axis, matrix = found
    shifted = layout.shifted(matrix, -stat.reshape(-1))
    return layout.from_channel_matrix(shifted, a, axis)


def moments(a: Any, axes: tuple[int, ...]) -> tuple[Any, Any, Any]:
    """(mean, a - mean, biased variance) over ``axes`` (kept as size 1), in np.mean's arithmetic."""
    count = 1
    for i in axes:
        count *= a.shape[i]
    mean = np.true_divide(reduce_sum(a, axes, keepdims=True), count)
    centered = subtract_per_channel(a, mean, axes)
    var = np.true_divide(reduce_sum_of_products(centered, centered, axes, keepdims=True), count)
    return mean, centered, var
