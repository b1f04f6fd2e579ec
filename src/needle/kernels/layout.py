"""Per-channel sums and affine maps for arrays whose channel axis is innermost in memory.

A CNN kept channels-last (NHWC memory, seen through an NCHW permute) reduces over every axis
but the channel one and scales each channel by its own constant (BatchNorm). NumPy does both
poorly on such memory: its inner loop runs over the C channels only (16 to 64 elements), so a
(64, 32, 32, 16) array takes 3-5x longer than the same work on NCHW memory. Seen as rows of a
few thousand elements (a multiple of C), with the per-channel constants tiled to that length,
the same work runs at full speed: ``column_sums``, ``column_dots``, ``scaled``, ``shifted``,
``add_`` and ``multiply_`` below. The reductions (reduce.py) and the BatchNorm kernels
(batchnorm.py) use them when ``channel_matrix`` finds such memory; ``add`` (the ``add`` op on
large arrays) adds a bias to NHWC activations as such rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import cpu_kernels, threaded_elementwise

#: the longest rows the channel matrix is viewed as (a multiple of C); the per-channel
#: constants tiled to that length stay in the L2 cache
ROW = 16384


def _to_last(ndim: int, axis: int) -> tuple[int, ...]:
    """The transpose that moves ``axis`` last (np.moveaxis without its argument checks, which
    cost more than the rest of a small op)."""
    return (*range(axis), *range(axis + 1, ndim), axis)


def channel_matrix(x: Any, axis: int) -> np.ndarray | None:
    """x's memory as an (M, C) matrix with C = x.shape[axis], when ``axis`` is innermost in
    memory and the rest is C-contiguous (a channels-last array of 3 or more dims), else None."""
    if not isinstance(x, np.ndarray) or x.ndim < 3:
        return None
    moved = x.transpose(_to_last(x.ndim, axis % x.ndim))
    if not moved.flags.c_contiguous:
        return None
    return moved.reshape(-1, x.shape[axis])


def from_channel_matrix(matrix: np.ndarray, like: Any, axis: int) -> np.ndarray:
    """The inverse of ``channel_matrix``: an (M, C) matrix as an array shaped like ``like``."""
    ndim = like.ndim
    axis %= ndim
    if axis == ndim - 1:
        return matrix.reshape(like.shape)
    order = _to_last(ndim, axis)
    moved = matrix.reshape([like.shape[i] for i in order])
    return moved.transpose((*range(axis), ndim - 1, *range(axis, ndim - 1)))  # axis back


def _rows(matrix: np.ndarray) -> np.ndarray | None:
    """An (M, C) matrix as rows of C * k elements, k the largest power of two up to ROW / C that
    divides M (None when that is 1: no better than the matrix itself)."""
    m, c = matrix.shape
    k = 1
    while k * 2 * c <= ROW and m % (k * 2) == 0:
        k *= 2
    if k == 1:
        return None
    return matrix.reshape(-1, k * c)


def _tiled(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per-channel ``values`` (C,) repeated along a row of ``rows``."""
    return np.broadcast_to(values, (rows.shape[1] // values.shape[0], values.shape[0])).reshape(-1)


def column_sums(matrix: np.ndarray) -> np.ndarray:
    """The (C,) sums of an (M, C) channel matrix (a compiled loop where numba is installed)."""
    compiled = cpu_kernels.column_sums(matrix)
    if compiled is not None:
        return compiled
    rows = _rows(matrix)
    if rows is None:
        return np.einsum("mc->c", matrix)
    # a BLAS matrix-vector product sums the rows 3x faster than einsum or np.add.reduce
    ones = np.ones(rows.shape[0], dtype=rows.dtype)
    return (ones @ rows).reshape(-1, matrix.shape[1]).sum(axis=0)


def column_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The (C,) sums of the products of two (M, C) channel matrices."""
    rows_a, rows_b = _rows(a), _rows(b)
    if rows_a is None or rows_b is None:  # (both or neither: a and b have one shape)
        return np.einsum("mc,mc->c", a, b)
    return np.einsum("mb,mb->b", rows_a, rows_b).reshape(-1, a.shape[1]).sum(axis=0)


def scaled(matrix: np.ndarray, scale: np.ndarray, shift: np.ndarray | None = None
           ) -> np.ndarray:
    """A new (M, C) matrix ``matrix * scale + shift`` with per-channel (C,) constants."""
    rows = _rows(matrix)
    if rows is None:
        out = matrix * scale
        if shift is not None:
            out += shift
        return out
    out = rows * _tiled(scale, rows)
    if shift is not None:
        out += _tiled(shift, rows)
    return out.reshape(matrix.shape)


def shifted(matrix: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """A new (M, C) matrix ``matrix + shift`` with a per-channel (C,) shift."""
    rows = _rows(matrix)
    if rows is None:
        return matrix + shift
    return (rows + _tiled(shift, rows)).reshape(matrix.shape)


def add_(matrix: np.ndarray, values: np.ndarray) -> None:
    """``matrix += values`` per channel, in place (``matrix`` C-contiguous)."""
    rows = _rows(matrix)
    if rows is None:
        matrix += values
    else:
        rows += _tiled(values, rows)


def multiply_(matrix: np.ndarray, values: np.ndarray) -> None:
    """``matrix *= values`` per channel, in place (``matrix`` C-contiguous)."""
    rows = _rows(matrix)
    if rows is None:
        matrix *= values
    else:
        rows *= _tiled(values, rows)


#: row-vector additions take the tiled-rows path from this many elements, for rows of at most
#: ``SHORT_ROW`` values (NumPy's own broadcast is fine for longer rows)
ADD_ROWS_MIN_SIZE = 16384
SHORT_ROW = 64


def add_row_vector(a: Any, b: Any) -> np.ndarray | None:
    """``a + b`` for a large C-contiguous array ``a`` and a 1-d ``b`` along its last axis (a
    conv bias on NHWC activations, 3.5x faster than NumPy's broadcast at 16 channels), or
    None when that does not apply. Bit-identical to ``a + b``. With numba, one compiled
    pass split across needle's threads (threaded_elementwise.add_row; 64 x 32 x 32 x 64:
    1.68 -> 1.08 ms); without, NumPy on tiled rows."""
    if (type(a) is not np.ndarray or type(b) is not np.ndarray or b.ndim != 1
            or a.size < ADD_ROWS_MIN_SIZE or a.shape[-1] != b.shape[0]
            or b.shape[0] > SHORT_ROW or a.dtype != b.dtype or not a.flags.c_contiguous):
        return None
    matrix = a.reshape(-1, b.shape[0])
    out = threaded_elementwise.add_row(matrix, b)  # one compiled pass on needle's threads
    return (shifted(matrix, b) if out is None else out).reshape(a.shape)


def add(a: Any, b: Any) -> Any:
    """``a + b``, where a large array plus a short row vector along its last axis (a conv bias
    on NHWC activations) is added as tiled rows (``add_row_vector``); bit-identical to
    ``a + b``. The ``add`` op calls it for arrays of ``ADD_ROWS_MIN_SIZE`` or more elements."""
    out = add_row_vector(a, b) if a.size >= b.size else add_row_vector(b, a)
    return a + b if out is None else out
