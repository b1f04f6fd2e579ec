"""Gather and scatter-add by integer ids: take (rows of a table), take_along_axis (one pick
per row), and their adjoints index_add and scatter_add.

The ids are an input of the graph (a placeholder, a traced argument), not a constant baked
into an attribute as getitem's index is, so one compiled plan serves every batch of ids.
They carry no gradient. Out-of-range ids raise :class:`IdsOutOfRangeError` (a CheckError,
and an IndexError) with the same message in every mode; negative ids are out of range (no
wrap-around, as ``torch.index_select``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import array_module
from ..kernels.index_add import add_rows
from .ops_shape import normalize_axes
from .registry import Aval, CheckError, F, Op, ShapeError, fmt_shape, register


class IdsOutOfRangeError(CheckError, IndexError):
    """Ids outside [0, size) (or non-integral float ids) given to a gather or scatter op."""


def checked_ids(op: str, ids: Any, size: int) -> Any:
    """``ids`` as an integer array after checking every id lies in [0, ``size``).

    Whole-valued float ids (labels stored as floats) become integers; one min and one max
    over the ids is the cost of the check when it passes.
    """
    kind = ids.dtype.kind
    if kind == "f":
        xp = array_module(ids)
        if not bool(xp.all(ids == xp.round(ids))):
            raise IdsOutOfRangeError(f"{op}: float ids must be whole numbers")
        ids = ids.astype(np.intp)
    elif kind not in "iu":  # (the shape rule refuses these dtypes in a declared graph)
        raise ShapeError(f"{op}: ids must be integers, got dtype {ids.dtype}")
    if ids.size and (bool(ids.min() < 0) or bool(ids.max() >= size)):
        bad = ids[(ids < 0) | (ids >= size)]
        raise IdsOutOfRangeError(f"{op}: ids must lie in [0, {size}), got "
                                 f"{bad.ravel()[:5].tolist()}")
    return ids


def _check_ids_aval(op: str, ids: Aval) -> None:
    if np.dtype(ids.dtype).kind not in "iuf":
        raise ShapeError(f"{op}: ids must be integers, got dtype {ids.dtype}")


def _dims_agree(a: tuple, b: tuple) -> bool:
    """Equal shapes where both dims are known (None agrees with anything)."""
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _merged(a: tuple, b: tuple) -> tuple:
    """Two agreeing shapes as one, each dim known where either knows it."""
    return tuple(y if x is None else x for x, y in zip(a, b))


def _axis_size(op: str, shape: tuple, axis: int) -> int:
    size = shape[axis]
    if size is None:
        raise ShapeError(f"{op}: the gradient needs the size of axis {axis} of the input, "
                         f"unknown in shape {fmt_shape(shape)}")
    return int(size)


def _add_at(out: Any, index: tuple, values: Any) -> None:
    """``out[index] += values`` with repeated indices accumulating (NumPy or CuPy)."""
    if isinstance(out, np.ndarray):
        np.add.at(out, index, values)
    else:  # CuPy: ufunc.at is spelled cupyx.scatter_add
        import cupyx

        cupyx.scatter_add(out, index, values)


# -- rows of a table ---------------------------------------------------------------------------
@register("take", inputs=("a", "ids"))
class Take(Op):
    """The slices of ``a`` at integer ``ids`` along ``axis``: ``out.shape = a.shape[:axis] +
    ids.shape + a.shape[axis + 1:]`` (an embedding lookup: ``take(weight, ids)``).

    The gradient of ``a`` adds the output adjoint of every position back into the slice it
    came from (``index_add``); repeated ids accumulate.
    """

    def __init__(self, axis: int = 0) -> None:
        self.axis = int(axis)

    def compute(self, a, ids):
        axis = self.axis % a.ndim
        ids = checked_ids(self.name, ids, a.shape[axis])
        return array_module(a).take(a, ids, axis=axis)

    def gradient(self, out_grad, node):
        a, ids = node.inputs
        axis = normalize_axes(self.name, self.axis, len(a.shape))[0]
        return F.index_add(out_grad, ids, _axis_size(self.name, a.shape, axis), axis), None

    def infer(self, a: Aval, ids: Aval) -> Aval:
        _check_ids_aval(self.name, ids)
        axis = normalize_axes(self.name, self.axis, len(a.shape))[0]
        return Aval((*a.shape[:axis], *ids.shape, *a.shape[axis + 1:]), a.dtype)


@register("index_add", inputs=("values", "ids"))
class IndexAdd(Op):
    """Zeros with ``size`` slices along ``axis``, each ``values`` slice added at its id
    (repeats accumulate): the adjoint of ``take``. ``values`` has ``take``'s output shape,
    ``values.shape[axis:axis + ids.ndim] == ids.shape``."""

    def __init__(self, size: int, axis: int = 0) -> None:
        self.size = int(size)
        self.axis = int(axis)

    def compute(self, values, ids):
        ids = checked_ids(self.name, ids, self.size)
        axis = self.axis
        shape = (*values.shape[:axis], self.size, *values.shape[axis + ids.ndim:])
        out = array_module(values).zeros(shape, dtype=values.dtype)
        if ids.ndim != 1:  # the ids' dims as one, so the index is one 1-d array
            values = values.reshape((*values.shape[:axis], ids.size,
                                     *values.shape[axis + ids.ndim:]))
            ids = ids.reshape(-1)
        if axis == 0 and add_rows(out, ids, values):  # an Embedding's rows: a compiled loop
            return out
        _add_at(out, (slice(None),) * axis + (ids,), values)
        return out

    def gradient(self, out_grad, node):
        return F.take(out_grad, node.inputs[1], self.axis), None

    def infer(self, values: Aval, ids: Aval) -> Aval:
        _check_ids_aval(self.name, ids)
        axis, k = self.axis, len(ids.shape)
        if axis < 0 or len(values.shape) < axis + k or not _dims_agree(
                values.shape[axis:axis + k], ids.shape):
            raise ShapeError(f"{self.name}: values of shape {fmt_shape(values.shape)} do not "
                             f"hold ids of shape {fmt_shape(ids.shape)} at axis {axis}")
        return Aval((*values.shape[:axis], self.size, *values.shape[axis + k:]), values.dtype)


# -- one pick per row --------------------------------------------------------------------------
def _row_index(ids: Any, axis: int) -> tuple:
    """The full index of ``out[..., ids[...], ...]`` along ``axis``: open ranges elsewhere."""
    xp = array_module(ids)
    index: list[Any] = []
    for d, n in enumerate(ids.shape):
        if d == axis:
            index.append(ids)
        else:
            shape = [1] * ids.ndim
            shape[d] = n
            index.append(xp.arange(n).reshape(shape))
    return tuple(index)


def _along_axis_shapes(op: str, a: Aval, ids: Aval, axis: int) -> tuple:
    """The output shape of a pick along ``axis``: ``ids``'s, with unknown dims from ``a``."""
    _check_ids_aval(op, ids)
    if len(a.shape) != len(ids.shape):
        raise ShapeError(f"{op}: ids of shape {fmt_shape(ids.shape)} need as many dims as "
                         f"the input {fmt_shape(a.shape)}")
    others_a = a.shape[:axis] + a.shape[axis + 1:]
    others_ids = ids.shape[:axis] + ids.shape[axis + 1:]
    if not _dims_agree(others_a, others_ids):
        raise ShapeError(f"{op}: ids of shape {fmt_shape(ids.shape)} do not fit the input "
                         f"{fmt_shape(a.shape)} outside axis {axis}")
    merged = _merged(others_ids, others_a)
    return (*merged[:axis], ids.shape[axis], *merged[axis:])


@register("take_along_axis", inputs=("a", "ids"))
class TakeAlongAxis(Op):
    """``out[i, j] = a[i, ids[i, j]]`` for ``axis=-1`` (any rank: ``np.take_along_axis``,
    ``torch.gather``): ids has a's shape except along ``axis``. The gradient adds the output
    adjoint back at the picked positions (``scatter_add``). A loss picks each row's label
    logit with it: ``take_along_axis(logits, labels[:, None])``."""

    def __init__(self, axis: int = -1) -> None:
        self.axis = int(axis)

    def compute(self, a, ids):
        axis = self.axis % a.ndim
        ids = checked_ids(self.name, ids, a.shape[axis])
        if a.ndim == 2 and isinstance(a, np.ndarray):  # one fancy index: no broadcast setup
            return a[_row_index(ids, axis)]
        return array_module(a).take_along_axis(a, ids, axis)

    def gradient(self, out_grad, node):
        a, ids = node.inputs
        axis = normalize_axes(self.name, self.axis, len(a.shape))[0]
        return F.scatter_add(out_grad, ids, _axis_size(self.name, a.shape, axis), axis), None

    def infer(self, a: Aval, ids: Aval) -> Aval:
        axis = normalize_axes(self.name, self.axis, len(a.shape))[0]
        return Aval(_along_axis_shapes(self.name, a, ids, axis), a.dtype)


@register("scatter_add", inputs=("values", "ids"))
class ScatterAdd(Op):
    """Zeros of ``values``'s shape with ``size`` along ``axis``, each value added at its id
    along that axis (``torch.scatter_add`` into zeros; repeats accumulate): the adjoint of
    ``take_along_axis``. ``ids`` has ``values``'s shape."""

    def __init__(self, size: int, axis: int = -1) -> None:
        self.size = int(size)
        self.axis = int(axis)

    def compute(self, values, ids):
        axis = self.axis % values.ndim
        ids = checked_ids(self.name, ids, self.size)
        shape = (*values.shape[:axis], self.size, *values.shape[axis + 1:])
        xp = array_module(values)
        out = xp.zeros(shape, dtype=values.dtype)
        values = xp.broadcast_to(values, ids.shape)
        if ids.shape[axis] == 1:  # one id per row: no repeats, a plain assignment
            out[_row_index(ids, axis)] = values
        else:
            _add_at(out, _row_index(ids, axis), values)
        return out

    def gradient(self, out_grad, node):
        return F.take_along_axis(out_grad, node.inputs[1], self.axis), None

    def infer(self, values: Aval, ids: Aval) -> Aval:
        axis = normalize_axes(self.name, self.axis, len(values.shape))[0]
        _check_ids_aval(self.name, ids)
        if not _dims_agree(values.shape, ids.shape):
            raise ShapeError(f"{self.name}: values of shape {fmt_shape(values.shape)} and ids "
                             f"of shape {fmt_shape(ids.shape)} differ")
        merged = _merged(values.shape, ids.shape)
        return Aval((*merged[:axis], self.size, *merged[axis + 1:]), values.dtype)
