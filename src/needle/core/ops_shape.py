"""Shape primitives: reshape, broadcast, transpose, stack/split, flip, dilate, indexing, padding."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ..kernels import column_sums
from ..kernels.axes import inverse_permutation
from ..kernels.reduce import reduce_sum, sum_expr
from .registry import Aval, F, Op, ShapeError, fmt_shape, register


def normalize_axis(op_name: str, axis: int, ndim: int) -> int:
    """A non-negative axis, or a ShapeError naming the op."""
    if not -ndim <= axis < max(ndim, 1):
        raise ShapeError(f"{op_name}: axis {axis} is out of range for a {ndim}-d input")
    return axis % max(ndim, 1)


def normalize_axes(op_name: str, axes: Any, ndim: int) -> tuple[int, ...]:
    """Sorted non-negative axes from None (all), an int or a sequence."""
    try:
        return _normalize_axes_cached(op_name, axes, ndim)
    except TypeError:  # unhashable axes (a list): not worth caching
        return _normalize_axes(op_name, axes, ndim)


def _normalize_axes(op_name: str, axes: Any, ndim: int) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(ndim))
    if isinstance(axes, int | np.integer):
        axes = (int(axes),)
    out = tuple(sorted({normalize_axis(op_name, int(a), ndim) for a in axes}))
    if len(out) != len(tuple(axes)):
        raise ShapeError(f"{op_name}: repeated axis in {tuple(axes)}")
    return out


# ops normalize their axes on every call: cache it (a few distinct (axes, ndim) per model)
_normalize_axes_cached = functools.lru_cache(maxsize=4096)(_normalize_axes)


def as_axes(axes: Any) -> tuple | None:
    """An op attribute for axes: None, or a tuple of ints."""
    if axes is None:
        return None
    if isinstance(axes, int | np.integer):
        return (int(axes),)
    return tuple(int(a) for a in axes)


def as_shape(shape: Any) -> tuple:
    """An op attribute for a shape: a tuple of ints (None or -1 for unknown)."""
    if isinstance(shape, int | np.integer):
        return (int(shape),)
    return tuple(None if d is None else int(d) for d in shape)


@register("reshape", inputs=("a",), methods=("reshape",))
class Reshape(Op):
    """a with a new shape of the same size.

    One dim may be -1 (inferred from the size); a None dim copies the input's dim at the same
    position (so ``(None, -1)`` flattens a batch of unknown size).
    """

    def __init__(self, shape: Any) -> None:
        self.shape = as_shape(shape)

    def _resolve(self, in_shape: tuple) -> tuple:
        if None not in self.shape:
            return self.shape
        if len(in_shape) < len(self.shape) and any(
                d is None and i >= len(in_shape) for i, d in enumerate(self.shape)):
            raise ShapeError(f"reshape: a None dim of {fmt_shape(self.shape)} has no matching "
                             f"input dim in {fmt_shape(in_shape)}")
        return tuple(in_shape[i] if d is None else d for i, d in enumerate(self.shape))

    def compute(self, a):
        if type(a) is np.ndarray:  # the method: np.reshape's wrapper costs more than the view
            return a.reshape(self._resolve(a.shape))
        return np.reshape(a, self._resolve(a.shape))

    def emit(self, args, node):
        return f"{args[0]}.reshape({tuple(node.shape)!r})"

    def gradient(self, out_grad, node):
        shape = node.inputs[0].shape
        if None in shape:  # a declared graph's unknown dim: here None would copy out_grad's dim
            if shape.count(None) > 1:
                raise ShapeError(f"reshape: cannot differentiate a reshape of an input with "
                                 f"more than one unknown dim, {fmt_shape(shape)}; declare all "
                                 f"but one of them")
            shape = tuple(-1 if d is None else d for d in shape)  # the size fixes it at run time
        return F.reshape(out_grad, shape)

    def infer(self, a: Aval) -> Aval:
        target = self._resolve(a.shape)
        if target.count(-1) > 1:
            raise ShapeError(f"reshape: at most one -1 dim allowed, got {fmt_shape(self.shape)}")
        if None in a.shape:  # the size is unknown: trust the request
            return Aval(tuple(None if d == -1 else d for d in target), a.dtype)
        size = int(np.prod(a.shape))
        known = int(np.prod([d for d in target if d != -1]))
        if -1 in target:
            if known == 0 or size % known:
                raise ShapeError(f"reshape: cannot reshape {fmt_shape(a.shape)} ({size} elements)"
                                 f" to {fmt_shape(self.shape)}")
            return Aval(tuple(size // known if d == -1 else d for d in target), a.dtype)
        if known != size:
            raise ShapeError(f"reshape: cannot reshape {fmt_shape(a.shape)} ({size} elements) to "
                             f"{fmt_shape(self.shape)} ({known} elements)")
        return Aval(target, a.dtype)


@functools.lru_cache(maxsize=4096)
def _expand_plan(axes: tuple, shape: tuple) -> tuple[tuple[int, ...], tuple]:
    """The inserted axes (normalized against the output's rank) and the output shape of
    expand_dims(shape, axes); unknown (None) dims stay None in place."""
    rank = len(shape) + len(axes)
    for axis in axes:
        if not -rank <= axis < rank:
            raise ShapeError(f"expand_dims: axis {axis} is out of range for the {rank}-d output "
                             f"of a {fmt_shape(shape)} input")
    out_axes = normalize_axes("expand_dims", axes, rank)
    dims = iter(shape)
    return out_axes, tuple(1 if i in out_axes else next(dims) for i in range(rank))


@register("expand_dims", inputs=("a",))
class ExpandDims(Op):
    """a with new size-1 axes inserted at ``axes`` (``np.expand_dims``; torch's ``unsqueeze``),
    a view. Unlike a reshape it needs no target shape, so it keeps unknown (None) dims where
    they are: a reduction's gradient uses it to put the reduced axes back."""

    def __init__(self, axes: Any) -> None:
        self.axes: tuple = as_axes(axes) or ()

    def compute(self, a):
        shape = _expand_plan(self.axes, a.shape)[1]
        if type(a) is np.ndarray:  # the method: as Reshape, the same view
            return a.reshape(shape)
        return np.reshape(a, shape)

    def emit(self, args, node):
        return f"{args[0]}.reshape({tuple(node.shape)!r})"

    def gradient(self, out_grad, node):
        shape = node.inputs[0].shape
        if None in shape:  # a reshape cannot name an unknown dim: sum the size-1 axes away
            return F.summation(out_grad, _expand_plan(self.axes, shape)[0])
        return F.reshape(out_grad, shape)  # (a view: summing size-1 axes would copy)

    def infer(self, a: Aval) -> Aval:
        return Aval(_expand_plan(self.axes, tuple(a.shape))[1], a.dtype)


def _broadcast_target(op_name: str, in_shape: tuple, shape: tuple) -> tuple:
    """Static output shape of broadcast_to; None in ``shape`` keeps the input's dim."""
    if len(shape) < len(in_shape):
        raise ShapeError(f"{op_name}: cannot broadcast {fmt_shape(in_shape)} to "
                         f"{fmt_shape(shape)} (fewer dims)")
    lead = len(shape) - len(in_shape)
    out = list(shape)
    for i, d in enumerate(in_shape):
        target = shape[lead + i]
        if target is None:
            out[lead + i] = d
        elif d is not None and d != 1 and d != target:
            raise ShapeError(f"{op_name}: cannot broadcast {fmt_shape(in_shape)} to "
                             f"{fmt_shape(shape)}: axis {lead + i} has size {d}, not 1 or {target}")
    return tuple(out)


def _broadcast_view(a: Any, shape: tuple) -> np.ndarray | None:
    """np.broadcast_to(a, shape) for a C-contiguous NumPy array or a NumPy scalar: the same
    read-only view (stride 0 along new and size-1 axes) built directly, at a third of the cost
    of np.broadcast_to's wrapper (a loss mean's gradient pays it every eager step); None where
    the shapes do not broadcast (np.broadcast_to then raises its error)."""
    lead = len(shape) - a.ndim
    if lead < 0:
        return None
    strides = [0] * lead
    for n, d, stride in zip(shape[lead:], a.shape, a.strides):
        if d == n:
            strides.append(stride)
        elif d == 1 and n >= 0:
            strides.append(0)
        else:
            return None
    view = np.ndarray(shape, a.dtype, a, 0, tuple(strides))
    view.flags.writeable = False  # as np.broadcast_to's: a gradient must never write into it
    return view


@register("broadcast_to", inputs=("a",), methods=("broadcast_to",))
class BroadcastTo(Op):
    """a repeated along size-1 and new leading axes to ``shape`` (a read-only view)."""

    def __init__(self, shape: Any) -> None:
        self.shape = as_shape(shape)

    def compute(self, a):
        shape = self.shape
        if None in shape:
            shape = _broadcast_target(self.name, a.shape, shape)
        if (isinstance(a, np.number | np.bool_)  # (a 0-d result: a loss mean's gradient)
                or type(a) is np.ndarray and a.flags.c_contiguous and a.size):
            view = _broadcast_view(a, shape)
            if view is not None:
                return view
        return np.broadcast_to(a, shape)

    def gradient(self, out_grad, node):
        return F.sum_to(out_grad, node.inputs[0].shape)

    def infer(self, a: Aval) -> Aval:
        return Aval(_broadcast_target(self.name, a.shape, self.shape), a.dtype)


@functools.lru_cache(maxsize=4096)
def _sum_to_plan(target: tuple, in_shape: tuple) -> tuple[tuple[int, ...], tuple]:
    """The axes to sum and the result shape for sum_to(in_shape -> target)."""
    lead = len(in_shape) - len(target)
    if lead < 0:
        raise ShapeError(f"sum_to: cannot sum {fmt_shape(in_shape)} to {fmt_shape(target)} "
                         "(more dims)")
    axes = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(target) if d == 1 and in_shape[lead + i] != 1)
    out_shape = tuple(in_shape[lead + i] if d is None else d for i, d in enumerate(target))
    return axes, out_shape


def kept_shape(shape: tuple, axes: tuple[int, ...]) -> tuple:
    """``shape`` with the ``axes`` set to 1 (keepdims)."""
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


@register("sum_to", inputs=("a",))
class SumTo(Op):
    """Sum a broadcast array back to ``shape`` (the inverse of broadcast_to; None keeps a dim)."""

    def __init__(self, shape: Any) -> None:
        self.shape = as_shape(shape)

    def _axes(self, in_shape: tuple) -> tuple[int, ...]:
        return _sum_to_plan(self.shape, tuple(in_shape))[0]

    #: helpers ``emit``'s expressions call besides ``np`` (compiled plans bind them)
    emit_helpers = {"_sum_to_rows": column_sums.sum_rows}

    def compute(self, a):
        axes, out_shape = _sum_to_plan(self.shape, a.shape)
        if column_sums.in_order(a.shape, axes):  # a bias gradient: the rows added in order
            return column_sums.sum_rows(a, out_shape)
        out = reduce_sum(a, axes, keepdims=True) if axes else a
        return out.reshape(out_shape)

    def emit(self, args, node):
        a = node.inputs[0]
        if a.dtype.kind != "f":
            return None
        axes, out_shape = _sum_to_plan(self.shape, tuple(a.shape))
        if not axes:
            return f"{args[0]}.reshape({out_shape!r})"
        if column_sums.in_order(tuple(a.shape), axes):
            return f"_sum_to_rows({args[0]}, {out_shape!r})"
        expr = sum_expr(args[0], tuple(a.shape), axes, True)
        return None if expr is None else f"{expr}.reshape({out_shape!r})"

    def gradient(self, out_grad, node):
        a = node.inputs[0]
        if None in a.shape:  # sizes known only at run time: broadcast against a itself
            return out_grad * F.full_like(a, 1)
        return F.broadcast_to(out_grad, a.shape)

    def infer(self, a: Aval) -> Aval:
        self._axes(a.shape)
        _broadcast_target(self.name, self.shape, a.shape)
        return Aval(self.shape, a.dtype)


@register("transpose", inputs=("a",), methods=("transpose",))
class Transpose(Op):
    """a with two axes swapped; ``axes=None`` swaps the last two (needle's transpose)."""

    def __init__(self, axes: Any = None) -> None:
        self.axes = as_axes(axes)
        if self.axes is not None and len(self.axes) != 2:
            raise ShapeError(f"transpose: axes must name exactly two axes, got {self.axes}; "
                             "use permute for a full permutation")

    def _pair(self, ndim: int) -> tuple[int, int]:
        if ndim < 2:
            raise ShapeError(f"transpose: needs at least 2 dims, got {ndim}")
        x, y = self.axes if self.axes is not None else (-1, -2)
        return normalize_axis(self.name, x, ndim), normalize_axis(self.name, y, ndim)

    def compute(self, a):
        return np.swapaxes(a, *self._pair(a.ndim))

    def emit(self, args, node):
        x, y = self._pair(len(node.inputs[0].shape))
        return f"{args[0]}.swapaxes({x}, {y})"

    def gradient(self, out_grad, node):
        return F.transpose(out_grad, self.axes)

    def infer(self, a: Aval) -> Aval:
        x, y = self._pair(len(a.shape))
        shape = list(a.shape)
        shape[x], shape[y] = shape[y], shape[x]
        return Aval(tuple(shape), a.dtype)


@register("permute", inputs=("a",), methods=("permute",))
class Permute(Op):
    """a with its axes reordered (``np.transpose(a, axes)``)."""

    def __init__(self, axes: Any) -> None:
        self.axes: Any = as_axes(axes)  # (None only if misused: np.transpose reverses then)

    def compute(self, a):
        return np.transpose(a, self.axes)

    def emit(self, args, node):
        return f"{args[0]}.transpose({self.axes!r})"

    def gradient(self, out_grad, node):
        ndim = len(self.axes)
        return F.permute(out_grad, inverse_permutation(tuple(a % ndim for a in self.axes)))

    def infer(self, a: Aval) -> Aval:
        if sorted(normalize_axis(self.name, x, len(a.shape)) for x in self.axes) != list(
                range(len(a.shape))):
            raise ShapeError(f"permute: axes {self.axes} are not a permutation of the "
                             f"{len(a.shape)} axes of {fmt_shape(a.shape)}")
        return Aval(tuple(a.shape[i] for i in self.axes), a.dtype)


# -- tuples -----------------------------------------------------------------------------------
@register("make_tuple", inputs=("*args",))
class MakeTuple(Op):
    """A TensorTuple of the given tensors."""

    returns_tuple = True

    def compute(self, *arrays):
        return tuple(arrays)

    def gradient(self, out_grad, node):
        return tuple(out_grad[i] for i in range(len(node.inputs)))

    def infer(self, *avals: Aval) -> tuple:
        return tuple(avals)


@register("tuple_get_item", inputs=("a",))
class TupleGetItem(Op):
    """Item ``index`` of a TensorTuple."""

    selects_item = True

    def __init__(self, index: int) -> None:
        self.index = int(index)

    def compute(self, a):
        return a[self.index]

    def emit(self, args, node):
        return f"{args[0]}[{self.index}]"

    def gradient(self, out_grad, node):
        source = node.inputs[0]
        return F.make_tuple(*[out_grad if i == self.index else F.full_like(source[i], 0)
                              for i in range(len(source))])

    def infer(self, a: tuple) -> Aval:
        return a[self.index]


def _stacked_already(arrays: Any, axis: int) -> Any:
    """The array that ``np.stack(arrays, axis)`` would equal where ``arrays`` are already its
    consecutive slices along ``axis`` (views of one C-contiguous array that owns its memory,
    in order: the q, k and v gradients that kernels/attention.py writes into one buffer),
    else None. Nothing writes an op's output in place, so handing the buffer on is a copy
    saved (a (16, 64, 3, 128) stack: ~0.2 ms)."""
    first = arrays[0] if arrays else None
    base = getattr(first, "base", None)
    if type(first) is not np.ndarray or type(base) is not np.ndarray or not base.flags.owndata \
            or not base.flags.c_contiguous or base.ndim != first.ndim + 1 \
            or base.shape[axis] != len(arrays):
        return None
    lead = (slice(None),) * axis
    for i, a in enumerate(arrays):
        if type(a) is not np.ndarray or a.base is not base:
            return None
        part = base[lead + (i,)]
        if a.shape != part.shape or a.strides != part.strides or a.dtype != part.dtype \
                or a.ctypes.data != part.ctypes.data:
            return None
    return base


@register("stack", inputs=("args",), tuple_input=True)
class Stack(Op):
    """Tensors of one shape stacked along a new ``axis``."""

    def __init__(self, axis: int) -> None:
        self.axis = int(axis)

    def compute(self, arrays):
        if len(arrays) > 1 and type(arrays[0]) is np.ndarray \
                and -arrays[0].ndim - 1 <= self.axis <= arrays[0].ndim:
            done = _stacked_already(arrays, self.axis % (arrays[0].ndim + 1))
            if done is not None:
                return done
        return np.stack(arrays, axis=self.axis)

    def gradient(self, out_grad, node):
        return F.split(out_grad, self.axis)

    def infer(self, avals: tuple) -> Aval:
        if not avals:
            raise ShapeError("stack: needs at least one tensor")
        shapes = {a.shape for a in avals}
        if len(shapes) > 1:
            raise ShapeError(f"stack: all tensors must have one shape, got "
                             f"{', '.join(fmt_shape(s) for s in shapes)}")
        shape = list(avals[0].shape)
        shape.insert(normalize_axis(self.name, self.axis, len(shape) + 1), len(avals))
        return Aval(tuple(shape), np.result_type(*[a.dtype for a in avals]))


@register("concatenate", inputs=("args",), tuple_input=True)
class Concatenate(Op):
    """Tensors joined along an existing ``axis`` (``np.concatenate``; torch's ``cat``).

    Shapes must agree except along ``axis``; the gradient hands each input its slice.
    """

    def __init__(self, axis: int = 0) -> None:
        self.axis = int(axis)

    def compute(self, arrays):
        return np.concatenate(arrays, axis=self.axis)

    def gradient(self, out_grad, node):
        parts = node.inputs[0].aval
        axis = normalize_axis(self.name, self.axis, len(parts[0].shape))
        pieces, start = [], 0
        for part in parts:
            size = part.shape[axis]
            if size is None:
                raise ShapeError(f"concatenate: the gradient needs each input's size along axis "
                                 f"{axis}, got {fmt_shape(part.shape)}")
            index = (slice(None),) * axis + (slice(start, start + size),)
            pieces.append(F.getitem(out_grad, index))
            start += size
        return F.make_tuple(*pieces)

    def infer(self, avals: tuple) -> Aval:
        if not avals:
            raise ShapeError("concatenate: needs at least one tensor")
        ndim = len(avals[0].shape)
        axis = normalize_axis(self.name, self.axis, ndim)
        for a in avals:
            if len(a.shape) != ndim or any(
                    i != axis and x is not None and y is not None and x != y
                    for i, (x, y) in enumerate(zip(a.shape, avals[0].shape))):
                raise ShapeError(f"concatenate: shapes must agree except along axis {axis}, got "
                                 f"{', '.join(fmt_shape(b.shape) for b in avals)}")
        sizes = [a.shape[axis] for a in avals]
        shape = list(avals[0].shape)
        shape[axis] = None if None in sizes else sum(sizes)
        return Aval(tuple(shape), np.result_type(*[a.dtype for a in avals]))


@register("split", inputs=("a",))
class Split(Op):
    """A TensorTuple of the slices of a along ``axis`` (the axis removed): stack's inverse."""

    returns_tuple = True

    def __init__(self, axis: int) -> None:
        self.axis = int(axis)

    def compute(self, a):
        return tuple(np.moveaxis(a, self.axis, 0))

    def gradient(self, out_grad, node):
        return F.stack(out_grad, self.axis)

    def infer(self, a: Aval) -> tuple:
        axis = normalize_axis(self.name, self.axis, len(a.shape))
        n = a.shape[axis]
        if n is None:
            raise ShapeError(f"split: the size of axis {axis} of {fmt_shape(a.shape)} must be "
                             "known to split along it")
        item = Aval(a.shape[:axis] + a.shape[axis + 1:], a.dtype)
        return (item,) * n


# -- flip, dilate -----------------------------------------------------------------------------
@register("flip", inputs=("a",))
class Flip(Op):
    """a reversed along ``axes`` (``np.flip``)."""

    def __init__(self, axes: Any) -> None:
        self.axes = as_axes(axes)

    def compute(self, a):
        return np.flip(a, self.axes)

    def gradient(self, out_grad, node):
        return F.flip(out_grad, self.axes)

    def infer(self, a: Aval) -> Aval:
        normalize_axes(self.name, self.axes, len(a.shape))
        return a


def _stride_slices(ndim: int, axes: tuple, step: int) -> tuple:
    sl = [slice(None)] * ndim
    for ax in axes:
        sl[ax] = slice(None, None, step)
    return tuple(sl)


@register("dilate", inputs=("a",))
class Dilate(Op):
    """``dilation`` zeros after every element along ``axes`` (size n becomes n*(1+dilation))."""

    def __init__(self, axes: Any, dilation: int) -> None:
        self.axes = as_axes(axes)
        self.dilation = int(dilation)

    def compute(self, a):
        axes = normalize_axes(self.name, self.axes, a.ndim)
        shape = tuple(n * (1 + self.dilation) if i in axes else n for i, n in enumerate(a.shape))
        out = np.zeros_like(a, shape=shape)
        out[_stride_slices(a.ndim, axes, 1 + self.dilation)] = a
        return out

    def gradient(self, out_grad, node):
        return F.undilate(out_grad, self.axes, self.dilation)

    def infer(self, a: Aval) -> Aval:
        axes = normalize_axes(self.name, self.axes, len(a.shape))
        return Aval(tuple(None if n is None else n * (1 + self.dilation) if i in axes else n
                          for i, n in enumerate(a.shape)), a.dtype)


@register("undilate", inputs=("a",))
class UnDilate(Op):
    """Every (1+dilation)-th element along ``axes``: the inverse of dilate."""

    def __init__(self, axes: Any, dilation: int) -> None:
        self.axes = as_axes(axes)
        self.dilation = int(dilation)

    def _index(self, ndim: int) -> tuple:
        axes = normalize_axes(self.name, self.axes, ndim)
        return _stride_slices(ndim, axes, 1 + self.dilation)

    def compute(self, a):
        return a[self._index(a.ndim)]

    def gradient(self, out_grad, node):
        a = node.inputs[0]
        return F.scatter(out_grad, self._index(len(a.shape)), a.shape)

    def infer(self, a: Aval) -> Aval:
        axes = normalize_axes(self.name, self.axes, len(a.shape))
        step = 1 + self.dilation
        return Aval(tuple(None if n is None else -(-n // step) if i in axes else n
                          for i, n in enumerate(a.shape)), a.dtype)


# -- indexing and padding ---------------------------------------------------------------------
def normalize_index(index: Any) -> tuple:
    """A tuple index of ints, slices, None, Ellipsis and NumPy integer/bool arrays."""
    if not isinstance(index, tuple):
        index = (index,)
    out = []
    for item in index:
        if hasattr(item, "realize_data"):  # a Tensor used as an index array
            item = item.numpy()
        if isinstance(item, list):
            item = np.asarray(item)
        if isinstance(item, np.ndarray) and item.dtype.kind not in "iub":
            if item.dtype.kind == "f" and np.all(item == np.round(item)):
                item = item.astype(np.int64)
            else:
                raise IndexError(f"getitem: index arrays must hold integers or bools, "
                                 f"got {item.dtype}")
        if isinstance(item, np.integer):
            item = int(item)
        out.append(item)
    return tuple(out)


def _index_key(index: tuple) -> tuple:
    """A hashable form of an index (slices and arrays are not hashable everywhere)."""
    key = []
    for item in index:
        if isinstance(item, slice):
            key.append(("slice", item.start, item.stop, item.step))
        elif isinstance(item, np.ndarray):
            key.append(("array", item.shape, item.dtype.str, item.tobytes()))
        else:
            key.append(item)
    return tuple(key)


def _is_advanced(index: tuple) -> bool:
    return any(isinstance(item, np.ndarray) for item in index)


_UNKNOWN = 2**40  # stands in for unknown dims when deriving static shapes from NumPy


def _indexed_shape(op_name: str, shape: tuple, index: tuple) -> tuple:
    """The shape of ``x[index]`` for an x of ``shape`` (None dims allowed for basic indexing)."""
    if None in shape and _is_advanced(index):
        raise ShapeError(f"{op_name}: array indexing needs a fully known input shape, got "
                         f"{fmt_shape(shape)}")
    # NOTE: unknown dims stand in as one huge size each, kept small enough that their
    # product stays below NumPy's 2**63 elements (two 2**40 dims were "too large")
    unknown = min(_UNKNOWN, 2 ** (62 // max(1, shape.count(None)) - 1))
    dummy = np.broadcast_to(np.empty((), dtype=np.int8),
                            tuple(unknown if d is None else d for d in shape))
    try:
        out = dummy[index].shape
    except (IndexError, ValueError) as exc:
        raise ShapeError(f"{op_name}: index {index!r} does not fit shape {fmt_shape(shape)}: "
                         f"{exc}") from None
    return tuple(None if d >= unknown // 2 else d for d in out)


@register("getitem", inputs=("a",))
class GetItem(Op):
    """``a[index]``: basic slicing and integer/bool array indexing; gradient scatters back."""

    def __init__(self, index: Any) -> None:
        self.index = normalize_index(index)

    def attrs(self) -> tuple:
        return (("index", _index_key(self.index)),)

    def compute(self, a):
        return a[self.index]

    def gradient(self, out_grad, node):
        return F.scatter(out_grad, self.index, node.inputs[0].shape)

    def infer(self, a: Aval) -> Aval:
        return Aval(_indexed_shape(self.name, a.shape, self.index), a.dtype)


def _known_shape(shape: tuple, index: tuple, values_shape: tuple) -> tuple:
    """``shape`` with its unknown (None) dims read from the values scattered at run time.

    A declared graph with an unknown batch size gives getitem's gradient the static input
    shape ``(None, ...)``. An axis the (basic) index keeps whole (``:``, ``::-1``, or under an
    Ellipsis) has the same size in the values, so it is read there; an axis the index cuts
    (``1:``, an int) has lost its size, and the scatter is refused naming it.
    """
    big = min(_UNKNOWN, 2 ** (62 // max(1, shape.count(None)) - 1)) // 2

    def indexed(stand_ins: dict) -> tuple:
        dummy = np.broadcast_to(np.empty((), dtype=np.int8),
                                tuple(stand_ins.get(i, d) for i, d in enumerate(shape)))
        return dummy[index].shape

    unknown = [i for i, d in enumerate(shape) if d is None]
    probe = dict.fromkeys(unknown, big)
    before = indexed(probe)
    lead = len(before) - len(values_shape)
    resolved = list(shape)
    for axis in unknown:
        # grow this axis by one: the output axis that keeps it whole grows by one and holds it
        after = indexed({**probe, axis: big + 1})
        where = [j for j, (m, n) in enumerate(zip(before, after))
                 if (m, n) == (big, big + 1) and j >= lead]
        if len(where) != 1 or len(after) != len(before):
            raise ShapeError(f"scatter: dim {axis} of the shape {fmt_shape(shape)} is unknown "
                             f"(None) and the index {index!r} does not keep axis {axis} whole, "
                             "so its size cannot be read from the values; give that axis a "
                             "known size (a placeholder shape without None there)")
        resolved[axis] = int(values_shape[where[0] - lead])
    return tuple(resolved)


@register("scatter", inputs=("a",))
class Scatter(Op):
    """Zeros of ``shape`` with a added at ``index`` (repeats accumulate): getitem's adjoint.

    ``shape`` may hold None (a declared graph's unknown batch size): the size of such an axis
    is read from ``a`` at run time where the index keeps the axis whole (see _known_shape).
    """

    def __init__(self, index: Any, shape: Any) -> None:
        self.index = normalize_index(index)
        self.shape = as_shape(shape)

    def attrs(self) -> tuple:
        return (("index", _index_key(self.index)), ("shape", self.shape))

    def compute(self, a):
        shape = self.shape if None not in self.shape else _known_shape(self.shape, self.index,
                                                                        a.shape)
        out = np.zeros_like(a, shape=shape)
        if not _is_advanced(self.index):
            out[self.index] = a
        elif isinstance(out, np.ndarray):
            np.add.at(out, self.index, a)
        else:  # CuPy: ufunc.at is spelled cupyx.scatter_add
            import cupyx

            cupyx.scatter_add(out, self.index, a)
        return out

    def gradient(self, out_grad, node):
        return F.getitem(out_grad, self.index)

    def infer(self, a: Aval) -> Aval:
        expected = _indexed_shape(self.name, self.shape, self.index)
        broadcast_ok = len(a.shape) <= len(expected) and all(
            x is None or y is None or x in (1, y)
            for x, y in zip(a.shape[::-1], expected[::-1]))
        if not broadcast_ok:
            raise ShapeError(f"scatter: values of shape {fmt_shape(a.shape)} do not fit "
                             f"index {self.index!r} of shape {fmt_shape(self.shape)}")
        return Aval(self.shape, a.dtype)


@register("pad", inputs=("a",))
class Pad(Op):
    """Zero padding: ``pad_width`` is one (before, after) pair per axis, as ``np.pad``."""

    def __init__(self, pad_width: Any) -> None:
        self.pad_width = tuple((int(lo), int(hi)) for lo, hi in pad_width)

    def _inner(self) -> tuple:
        return tuple(slice(lo, -hi if hi else None) for lo, hi in self.pad_width)

    def compute(self, a):
        if len(self.pad_width) != a.ndim:
            raise ShapeError(f"pad: {len(self.pad_width)} (before, after) pairs for a "
                             f"{a.ndim}-d input of shape {fmt_shape(a.shape)}")
        shape = tuple(n + lo + hi for n, (lo, hi) in zip(a.shape, self.pad_width))
        out = np.zeros_like(a, shape=shape)
        out[self._inner()] = a
        return out

    def gradient(self, out_grad, node):
        return F.getitem(out_grad, self._inner())

    def infer(self, a: Aval) -> Aval:
        if len(self.pad_width) != len(a.shape):
            raise ShapeError(f"pad: {len(self.pad_width)} (before, after) pairs for a "
                             f"{len(a.shape)}-d input of shape {fmt_shape(a.shape)}")
        return Aval(tuple(None if n is None else n + lo + hi
                          for n, (lo, hi) in zip(a.shape, self.pad_width)), a.dtype)
