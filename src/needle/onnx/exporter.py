"""needle -> ONNX: trace the inference graph, then map each step through one table.

The graph is the optimized Program of ``ndl.jit(fn).lower(*inputs)``. Every op name maps to
an emitter (``EMITTERS``) that writes ONNX nodes from the op's attributes, its input names and
the step's static shapes. Data sources (parameters, buffers, constant tensors) become
initializers.

Dynamic batch: the function is traced at the example's batch size and at a second one. Both
programs must have the same steps; a dimension that differs between them is ``k * batch``
(``Sym(k)``), and emitters that write shapes (Reshape, Expand, ConstantOfShape) build those
dimensions from the input's runtime shape instead of baking in the example's. An attribute
that depends on the batch size anywhere else is refused with an OnnxError.

Layout: needle's ``conv`` is NHWC with (kh, kw, C_in, C_out) kernels; ONNX's Conv is NCHW
with (C_out, C_in, kh, kw). The emitter wraps Conv in Transposes and stores the kernel in
ONNX's layout; a final pass cancels the Transpose pairs that nn.Conv's own NCHW <-> NHWC
permutes leave behind, so an nn model exports as plain NCHW Convs. nn.Embedding's lookup
(the take op) is written as a Gather; a one-hot product ``astype(compare(ids, arange(n))) @ W``
(how older nn.Embedding code traced) is still recognized and written as a Gather.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np
import onnx
from numpy.typing import DTypeLike
from onnx import helper, numpy_helper

from .. import nn
from ..autograd import Tensor
from ..core.context import watching_nodes
from ..core.interpret import Program
from ..core.registry import REGISTRY, Aval
from ..core.source import is_needle_file
from ..jit import jit
from ..jit.compiled import CompiledFunction, JitError
from ..jit.tracing import TraceInput
from .errors import OnnxError

MIN_OPSET = 13
MAX_OPSET = 21
INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min
#: metadata key listing initializers that are state, not trained (BatchNorm statistics)
BUFFERS_KEY = "needle.buffers"


@dataclass(frozen=True)
class Sym:
    """A dimension equal to ``k`` times the batch size."""

    k: int

    def __repr__(self) -> str:
        return "batch" if self.k == 1 else f"{self.k}*batch"


# -- the graph being written ------------------------------------------------------------------
class _Graph:
    """Collects ONNX nodes and initializers with unique value names."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.used: set[str] = set()
        self.batch_source: tuple[str, int] | None = None  # (input name, axis)
        self._batch: dict[int, str] = {}
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        base = hint.replace(" ", "_") or "v"
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name

    def node(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1,
             **attrs: Any) -> Any:
        """Append one node; its output name (or names when ``outputs`` is a count > 1)."""
        if isinstance(outputs, int):
            names = [self.fresh(op_type.lower()) for _ in range(outputs)]
        else:
            names = outputs
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, inputs, names,
                                           name=self.fresh(f"{op_type}_node"), **attrs))
        return names[0] if isinstance(outputs, int) and outputs == 1 else names

    def initializer(self, array: np.ndarray, name: str) -> str:
        name = self.fresh(name)
        self.initializers[name] = numpy_helper.from_array(np.asarray(array), name)
        return name

    def const(self, value: Any, dtype: Any = np.int64, hint: str = "const") -> str:
        """A Constant node (one per distinct value). Constants are nodes, not initializers,
        so that an importer can tell them from weights (needle's makes initializers
        Parameters)."""
        array = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh(hint)
            self.node("Constant", [], outputs=[name],
                      value=numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def batch(self, k: int = 1) -> str:
        """A 1-D int64 tensor holding ``k * batch`` read from the input's runtime shape."""
        if k not in self._batch:
            if self.batch_source is None:
                raise OnnxError("internal: a batch-sized dimension without a batch input")
            if 1 not in self._batch:
                source, axis = self.batch_source
                shape = self.node("Shape", [source])
                self._batch[1] = self.node("Gather", [shape, self.const([axis])], axis=0)
            if k != 1:
                self._batch[k] = self.node("Mul", [self._batch[1], self.const([k])])
        return self._batch[k]

    def shape_input(self, dims: list[Any]) -> str:
        """A 1-D int64 shape tensor: a constant, or a Concat when a dim is ``Sym``."""
        if not any(isinstance(d, Sym) for d in dims):
            return self.const(list(dims))
        pieces = [self.batch(d.k) if isinstance(d, Sym) else self.const([d]) for d in dims]
        return self.node("Concat", pieces, axis=0)

    def reduce(self, op_type: str, x: str, axes: list[int] | None, keepdims: bool) -> str:
        """A Reduce* node; axes as an input where the opset wants one (all axes when None)."""
        keep = int(bool(keepdims))
        axes_as_input = op_type == "ReduceSum" or self.opset >= 18
        if axes is None:
            return self.node(op_type, [x], keepdims=keep)
        if axes_as_input:
            return self.node(op_type, [x, self.const(list(axes))], keepdims=keep)
        return self.node(op_type, [x], keepdims=keep, axes=list(axes))

    def squeeze(self, x: str, axes: list[int]) -> str:
        return self.node("Squeeze", [x, self.const(list(axes))])

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        return self.node("Unsqueeze", [x, self.const(list(axes))])

    def cast(self, x: str, src: DTypeLike, dst: DTypeLike) -> str:
        if np.dtype(src) == np.dtype(dst):
            return x
        return self.node("Cast", [x], to=helper.np_dtype_to_tensor_dtype(np.dtype(dst)))


@dataclass
class _Ctx:
    """What an emitter sees of one step: the op (and the same step of the second trace), its
    input names, static shapes (``dims`` hold ``Sym`` where the batch size enters)."""

    g: _Graph
    op: Any
    op2: Any
    ins: list
    in_avals: list
    in_dims: list
    aval: Any
    dims: Any
    bias: str | None = None  # conv: a bias folded into the Conv node
    weight_oihw: bool = False  # conv: the kernel initializer is stored in ONNX's layout

    def inputs_as(self, dtype: Any) -> list[str]:
        """The inputs cast to ``dtype`` where they differ (ONNX ops take one type)."""
        return [self.g.cast(n, a.dtype, dtype) for n, a in zip(self.ins, self.in_avals)]


# -- emitters: one per needle op ---------------------------------------------------------------
def _binary(onnx_op: str) -> Callable[[_Ctx], str]:
    def emit(c: _Ctx) -> str:
        return c.g.node(onnx_op, c.inputs_as(c.aval.dtype))

    emit.onnx = onnx_op  # type: ignore[attr-defined]  # (a function attribute: its ONNX op)
    return emit


def _unary(onnx_op: str) -> Callable[[_Ctx], str]:
    def emit(c: _Ctx) -> str:
        return c.g.node(onnx_op, c.inputs_as(c.aval.dtype))

    emit.onnx = onnx_op  # type: ignore[attr-defined]  # (a function attribute: its ONNX op)
    return emit


def _scalar(onnx_op: str) -> Callable[[_Ctx], str]:
    def emit(c: _Ctx) -> str:
        dtype = c.aval.dtype
        (x,) = c.inputs_as(dtype)
        return c.g.node(onnx_op, [x, c.g.const(c.op.scalar, dtype)])

    emit.onnx = onnx_op  # type: ignore[attr-defined]  # (a function attribute: its ONNX op)
    return emit


def _emit_apply_mask(c: _Ctx) -> str:
    dtype = c.aval.dtype
    product = c.g.node("Mul", c.inputs_as(dtype))
    return c.g.node("Div", [product, c.g.const(c.op.scalar, dtype)])


_COMPARE = {"lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual",
            "eq": "Equal", "ne": "Equal"}


def _emit_compare(c: _Ctx) -> str:
    common = np.result_type(*[a.dtype for a in c.in_avals])
    out = c.g.node(_COMPARE[c.op.kind], c.inputs_as(common))
    return c.g.node("Not", [out]) if c.op.kind == "ne" else out


def _emit_compare_scalar(c: _Ctx) -> str:
    dtype = c.in_avals[0].dtype
    out = c.g.node(_COMPARE[c.op.kind], [c.ins[0], c.g.const(c.op.scalar, dtype)])
    return c.g.node("Not", [out]) if c.op.kind == "ne" else out


def _emit_where(c: _Ctx) -> str:
    cond = c.g.cast(c.ins[0], c.in_avals[0].dtype, np.bool_)
    a = c.g.cast(c.ins[1], c.in_avals[1].dtype, c.aval.dtype)
    b = c.g.cast(c.ins[2], c.in_avals[2].dtype, c.aval.dtype)
    return c.g.node("Where", [cond, a, b])


def _emit_astype(c: _Ctx) -> str:
    return c.g.node("Cast", [c.ins[0]], to=helper.np_dtype_to_tensor_dtype(c.aval.dtype))


def _emit_full_like(c: _Ctx) -> str:
    value = numpy_helper.from_array(np.array([c.op.fill_value], dtype=c.aval.dtype), "value")
    if any(isinstance(d, Sym) for d in c.dims):
        shape = c.g.node("Shape", [c.ins[0]])
    else:
        shape = c.g.const(list(c.dims))
    return c.g.node("ConstantOfShape", [shape], value=value)


def _emit_identity(c: _Ctx) -> str:
    return c.g.node("Identity", [c.ins[0]])


def _emit_matmul(c: _Ctx) -> str:
    return c.g.node("MatMul", c.inputs_as(c.aval.dtype))


def _emit_transposed_matmul(c: _Ctx) -> str:
    """transposed_matmul: a Transpose of the last two axes before MatMul where it swaps."""
    ins = c.inputs_as(c.aval.dtype)
    for i, swap in enumerate((c.op.transpose_a, c.op.transpose_b)):
        if swap:
            perm = list(range(len(c.in_avals[i].shape)))
            perm[-1], perm[-2] = perm[-2], perm[-1]
            ins[i] = c.g.node("Transpose", [ins[i]], perm=perm)
    return c.g.node("MatMul", ins)


def _emit_linear(c: _Ctx) -> str:
    x, w, b = c.inputs_as(c.aval.dtype)
    return c.g.node("Add", [c.g.node("MatMul", [x, w]), b])


def _emit_linear_relu(c: _Ctx) -> str:
    return c.g.node("Relu", [_emit_linear(c)])


def _emit_linear_residual(c: _Ctx) -> str:
    x, w, b, residual = c.inputs_as(c.aval.dtype)
    return c.g.node("Add", [residual, c.g.node("Add", [c.g.node("MatMul", [x, w]), b])])


def _emit_reshape(c: _Ctx) -> str:
    out, in_dims = list(c.dims), list(c.in_dims[0])
    target: list[Any] = []
    open_dims = []
    for i, d in enumerate(out):
        if not isinstance(d, Sym):
            target.append(d)
        elif i < len(in_dims) and in_dims[i] == d:
            target.append(0)  # ONNX: copy the input's dim at this position
        else:
            target.append(d)
            open_dims.append(i)
    if len(open_dims) == 1:
        target[open_dims[0]] = -1
    return c.g.node("Reshape", [c.ins[0], c.g.shape_input(target)])


def _emit_expand_dims(c: _Ctx) -> str:
    rank = len(c.aval.shape)
    axes = sorted(int(a) % rank for a in c.op.axes)
    return c.g.unsqueeze(c.ins[0], axes) if axes else c.g.node("Identity", [c.ins[0]])


def _emit_broadcast_to(c: _Ctx) -> str:
    out, in_dims = list(c.dims), list(c.in_dims[0])
    lead = len(out) - len(in_dims)
    target = []
    for i, d in enumerate(out):
        if isinstance(d, Sym) and i >= lead and in_dims[i - lead] == d:
            target.append(1)  # Expand broadcasts both ways: the input brings its own size
        else:
            target.append(d)
    return c.g.node("Expand", [c.ins[0], c.g.shape_input(target)])


def _emit_sum_to(c: _Ctx) -> str:
    in_dims, out = list(c.in_dims[0]), list(c.dims)
    lead = len(in_dims) - len(out)
    x = c.ins[0]
    if lead:
        x = c.g.reduce("ReduceSum", x, list(range(lead)), keepdims=False)
    axes = [i for i, d in enumerate(out) if d == 1 and in_dims[i + lead] != 1]
    if axes:
        x = c.g.reduce("ReduceSum", x, axes, keepdims=True)
    return x if x != c.ins[0] else c.g.node("Identity", [x])


def _axes_of(axes: Any, ndim: int) -> list[int] | None:
    if axes is None:
        return None
    return sorted({int(a) % ndim for a in axes}) if ndim else []


def _reduction(onnx_op: str) -> Callable[[_Ctx], str]:
    def emit(c: _Ctx) -> str:
        ndim = len(c.in_avals[0].shape)
        return c.g.reduce(onnx_op, c.ins[0], _axes_of(c.op.axes, ndim), c.op.keepdims)

    emit.onnx = onnx_op  # type: ignore[attr-defined]  # (a function attribute: its ONNX op)
    return emit


def _emit_logsumexp(c: _Ctx) -> str:
    g, x = c.g, c.ins[0]
    axes = _axes_of(c.op.axes, len(c.in_avals[0].shape))
    top = g.reduce("ReduceMax", x, axes, keepdims=True)
    shifted = g.node("Exp", [g.node("Sub", [x, top])])
    out = g.node("Log", [g.reduce("ReduceSum", shifted, axes, keepdims=True)])
    out = g.node("Add", [out, top])
    if not c.op.keepdims:
        axes = list(range(len(c.in_avals[0].shape))) if axes is None else axes
        out = g.squeeze(out, axes) if axes else out
    return out


def _variance(g: _Graph, x: str, axes: list[int] | None, keepdims: bool) -> tuple[str, str]:
    """(centered x, biased variance) over axes (mean kept as size-1 dims)."""
    mean = g.reduce("ReduceMean", x, axes, keepdims=True)
    centered = g.node("Sub", [x, mean])
    var = g.reduce("ReduceMean", g.node("Mul", [centered, centered]), axes, keepdims)
    return centered, var


def _emit_variance(c: _Ctx) -> str:
    axes = _axes_of(c.op.axes, len(c.in_avals[0].shape))
    return _variance(c.g, c.ins[0], axes, c.op.keepdims)[1]


def _emit_batch_stats(c: _Ctx) -> list[str]:
    """batch_stats: (mean, biased variance) kept as size-1 dims, the two outputs of a tuple."""
    axes = _axes_of(c.op.axes, len(c.in_avals[0].shape))
    g, x = c.g, c.ins[0]
    mean = g.reduce("ReduceMean", x, axes, keepdims=True)
    centered = g.node("Sub", [x, mean])
    return [mean, g.reduce("ReduceMean", g.node("Mul", [centered, centered]), axes, True)]


def _emit_softmax(onnx_op: str) -> Callable[[_Ctx], str]:
    def emit(c: _Ctx) -> str:
        return c.g.node(onnx_op, [c.ins[0]], axis=int(c.op.axis))

    emit.onnx = onnx_op  # type: ignore[attr-defined]  # (a function attribute: its ONNX op)
    return emit


def _inv_std(g: _Graph, var: str, eps: float, dtype: np.dtype) -> str:
    return g.node("Reciprocal", [g.node("Sqrt", [g.node("Add", [var, g.const(eps, dtype)])])])


def _emit_normalize(c: _Ctx) -> str:
    g, x = c.g, c.ins[0]
    ndim = len(c.in_avals[0].shape)
    axes = _axes_of(c.op.axes, ndim)
    axes = list(range(ndim)) if axes is None else axes
    dtype = c.aval.dtype
    if len(c.ins) == 3:  # statistics given (BatchNorm): (x - mean) / sqrt(var + eps)
        mean, var = c.ins[1], c.ins[2]
        return g.node("Mul", [g.node("Sub", [x, mean]), _inv_std(g, var, c.op.eps, dtype)])
    trailing = axes == list(range(ndim - len(axes), ndim))
    kept = [c.in_dims[0][a] for a in axes]
    if g.opset >= 17 and trailing and axes and not any(isinstance(d, Sym) for d in kept):
        scale = g.const(np.ones(kept, dtype), dtype, "layernorm_scale")
        bias = g.const(np.zeros(kept, dtype), dtype, "layernorm_bias")
        return g.node("LayerNormalization", [x, scale, bias], axis=axes[0],
                      epsilon=float(c.op.eps))
    centered, var = _variance(g, x, axes, keepdims=True)
    return g.node("Mul", [centered, _inv_std(g, var, c.op.eps, dtype)])


def _emit_inv_std(c: _Ctx) -> str:
    axes = _axes_of(c.op.axes, len(c.in_avals[0].shape))
    var = _variance(c.g, c.ins[0], axes, keepdims=True)[1]
    return _inv_std(c.g, var, c.op.eps, c.aval.dtype)


def _emit_batch_norm(c: _Ctx) -> str:
    g = c.g
    x, weight, bias, mean, var = c.inputs_as(c.aval.dtype)
    scale = g.node("Mul", [weight, _inv_std(g, var, c.op.eps, c.aval.dtype)])
    return g.node("Add", [g.node("Mul", [g.node("Sub", [x, mean]), scale]), bias])


def _emit_batch_norm_relu(c: _Ctx) -> str:
    return c.g.node("Relu", [_emit_batch_norm(c)])


def _emit_layer_norm(c: _Ctx) -> str:
    """layer_norm (last axis): LayerNormalization from opset 17, else its formula."""
    g = c.g
    x, weight, bias = c.inputs_as(c.aval.dtype)
    if g.opset >= 17:
        return g.node("LayerNormalization", [x, weight, bias], axis=-1,
                      epsilon=float(c.op.eps))
    centered, var = _variance(g, x, [len(c.in_avals[0].shape) - 1], keepdims=True)
    normed = g.node("Mul", [centered, _inv_std(g, var, c.op.eps, c.aval.dtype)])
    return g.node("Add", [g.node("Mul", [normed, weight]), bias])


def _emit_attention(c: _Ctx) -> str:
    """attention: heads by Reshape + Transpose, MatMul, Mul (scale), Add (mask), Softmax,
    MatMul, and the heads merged back by Transpose + Reshape (0 keeps the batch dim)."""
    g, heads, dtype = c.g, int(c.op.heads), c.aval.dtype
    q, k, v, *mask = c.inputs_as(dtype)

    def split(x: str, perm: list[int]) -> str:
        shaped = g.node("Reshape", [x, g.const([0, 0, heads, -1])])
        return g.node("Transpose", [shaped], perm=perm)

    logits = g.node("MatMul", [split(q, [0, 2, 1, 3]), split(k, [0, 2, 3, 1])])
    logits = g.node("Mul", [logits, g.const(c.op.scale, dtype)])
    if mask:
        logits = g.node("Add", [logits, mask[0]])
    out = g.node("MatMul", [g.node("Softmax", [logits], axis=-1), split(v, [0, 2, 1, 3])])
    merged = g.node("Transpose", [out], perm=[0, 2, 1, 3])
    return g.node("Reshape", [merged, g.const([0, 0, -1])])


def _emit_permute(c: _Ctx) -> str:
    return c.g.node("Transpose", [c.ins[0]], perm=[int(a) for a in c.op.axes])


def _emit_transpose(c: _Ctx) -> str:
    ndim = len(c.in_avals[0].shape)
    i, j = (ndim - 2, ndim - 1) if c.op.axes is None else (c.op.axes[0] % ndim,
                                                          c.op.axes[1] % ndim)
    perm = list(range(ndim))
    perm[i], perm[j] = perm[j], perm[i]
    return c.g.node("Transpose", [c.ins[0]], perm=perm)


def _slice_bounds(item: slice) -> tuple[int, int, int]:
    step = 1 if item.step is None else int(item.step)
    if step > 0:
        start = 0 if item.start is None else int(item.start)
        stop = INT64_MAX if item.stop is None else int(item.stop)
    else:
        start = INT64_MAX if item.start is None else int(item.start)
        stop = INT64_MIN if item.stop is None else int(item.stop)
    return start, stop, step


def _full_slice(item: slice, n: Any) -> bool:
    if item == slice(None):
        return True
    return isinstance(n, int) and item.indices(n) == (0, n, 1)


def _expand_index(index: tuple, ndim: int) -> list:
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    out: list = []
    for item in index:
        if item is Ellipsis:
            out.extend([slice(None)] * (ndim - used))
        else:
            out.append(item)
    if not any(item is Ellipsis for item in index):
        out.extend([slice(None)] * (ndim - used))
    return out


def _emit_getitem(c: _Ctx) -> str:
    g, x = c.g, c.ins[0]
    shape = c.in_avals[0].shape
    items = _expand_index(tuple(c.op.index), len(shape))
    items2 = (_expand_index(tuple(c.op2.index), len(shape)) if c.op2 is not None else items)
    arrays = [i for i in items if isinstance(i, np.ndarray)]
    if len(arrays) > 1 or (arrays and any(isinstance(i, int) for i in items)):
        raise OnnxError(f"getitem: index {c.op.index!r} mixes several array/integer indices; "
                        "only one index array (with slices) can be exported")
    starts, ends, axes, steps, squeeze, unsqueeze = [], [], [], [], [], []
    gather = None
    axis = out_pos = 0
    for item, item2 in zip(items, items2):
        if item is None:
            unsqueeze.append(out_pos)
            out_pos += 1
            continue
        if isinstance(item, slice):
            if item != item2:  # differs between the traces: only a whole batch axis may
                if not (_full_slice(item, shape[axis]) and isinstance(item2, slice)
                        and isinstance(c.in_dims[0][axis], Sym)):
                    raise OnnxError(f"getitem: the slice {item} on axis {axis} depends on "
                                    "the batch size")
            elif not _full_slice(item, shape[axis]):
                start, stop, step = _slice_bounds(item)
                starts.append(start)
                ends.append(stop)
                axes.append(axis)
                steps.append(step)
            out_pos += 1
        elif isinstance(item, np.ndarray):
            if item.dtype == np.bool_ and item.ndim != 1:
                raise OnnxError("getitem: only 1-d boolean masks can be exported")
            idx = np.nonzero(item)[0] if item.dtype == np.bool_ else item.astype(np.int64)
            gather = (axis, idx)
            out_pos += idx.ndim
        else:  # an int: a one-wide slice, squeezed away
            i = int(item)
            starts.append(i)
            ends.append(i + 1 if i != -1 else INT64_MAX)
            axes.append(axis)
            steps.append(1)
            squeeze.append(axis)
        axis += 1
    if axes:
        x = g.node("Slice", [x, g.const(starts), g.const(ends), g.const(axes), g.const(steps)])
    if gather is not None:
        gather_axis, idx = gather
        x = g.node("Gather", [x, g.const(idx)], axis=gather_axis)
    if squeeze:
        x = g.squeeze(x, squeeze)
    if unsqueeze:
        x = g.unsqueeze(x, unsqueeze)
    return x if x != c.ins[0] else g.node("Identity", [x])


def _emit_split(c: _Ctx) -> list[str]:
    g = c.g
    ndim = len(c.in_avals[0].shape)
    axis = c.op.axis % ndim
    n = c.in_dims[0][axis]
    if isinstance(n, Sym) or n is None:
        raise OnnxError("split: the number of pieces depends on the batch size")
    parts = g.node("Split", [c.ins[0], g.const([1] * n)], outputs=n, axis=axis)
    parts = [parts] if isinstance(parts, str) else parts
    return [g.squeeze(p, [axis]) for p in parts]


def _emit_make_tuple(c: _Ctx) -> list[str]:
    return list(c.ins)


def _emit_tuple_get_item(c: _Ctx) -> str:
    return c.ins[0][c.op.index]


def _emit_stack(c: _Ctx) -> str:
    items = c.ins[0]
    ndim = len(c.aval.shape)
    axis = c.op.axis % ndim
    return c.g.node("Concat", [c.g.unsqueeze(n, [axis]) for n in items], axis=axis)


def _emit_concatenate(c: _Ctx) -> str:
    return c.g.node("Concat", list(c.ins[0]), axis=int(c.op.axis))


def _emit_flip(c: _Ctx) -> str:
    g = c.g
    ndim = len(c.in_avals[0].shape)
    axes = list(range(ndim)) if c.op.axes is None else sorted({a % ndim for a in c.op.axes})
    n = len(axes)
    return g.node("Slice", [c.ins[0], g.const([-1] * n), g.const([INT64_MIN] * n),
                            g.const(axes), g.const([-1] * n)])


def _emit_pad(c: _Ctx) -> str:
    pads = [lo for lo, _ in c.op.pad_width] + [hi for _, hi in c.op.pad_width]
    return c.g.node("Pad", [c.ins[0], c.g.const(pads)], mode="constant")


def _emit_max_pool(c: _Ctx) -> str:
    """max_pool2d (NCHW, no padding, floor mode) is ONNX's MaxPool as it is."""
    k, s = int(c.op.kernel_size), int(c.op.stride)
    return c.g.node("MaxPool", [c.ins[0]], kernel_shape=[k, k], strides=[s, s])


def _emit_scaled_softmax(c: _Ctx) -> str:
    a, scale = c.inputs_as(c.aval.dtype)
    return c.g.node("Mul", [c.g.node("Softmax", [a], axis=c.op.axis), scale])


def _emit_gather(onnx_op: str) -> Callable[[_Ctx], str]:
    """take -> Gather, take_along_axis -> GatherElements (int64 indices, the same axis)."""

    def emit(c: _Ctx) -> str:
        ids = c.g.cast(c.ins[1], c.in_avals[1].dtype, np.int64)
        return c.g.node(onnx_op, [c.ins[0], ids], axis=c.op.axis)

    emit.onnx = onnx_op  # type: ignore[attr-defined]  # (a function attribute: its ONNX op)
    return emit


def _emit_conv(c: _Ctx) -> str:
    """needle's NHWC conv as Transpose -> NCHW Conv -> Transpose (kernel stored OIHW)."""
    g = c.g
    x, w, *bias = c.inputs_as(c.aval.dtype)  # conv_bias: the bias third, Conv's B
    kh, kw = c.in_avals[1].shape[:2]
    w_oihw = c.ins[1] if c.weight_oihw else g.node("Transpose", [w], perm=[3, 2, 0, 1])
    inputs = [g.node("Transpose", [x], perm=[0, 3, 1, 2]), w_oihw]
    if bias:
        inputs.append(bias[0])
    elif c.bias is not None:
        inputs.append(c.bias)
    p, s = int(c.op.padding), int(c.op.stride)
    y = g.node("Conv", inputs, kernel_shape=[int(kh), int(kw)], strides=[s, s],
               pads=[p, p, p, p])
    return g.node("Transpose", [y], perm=[0, 2, 3, 1])


def _emit_lstm_sequence(c: _Ctx) -> list[str]:
    """lstm_sequence unrolled over its steps (a static count): per step MatMul + Add, a Split
    into the four gates, Sigmoid/Tanh, the c and h updates; each output is a Concat of the
    steps' values (the gates' Concat is left unread where the model does not use it)."""
    g = c.g
    dtype = np.result_type(*(a.dtype for a in c.in_avals))
    x_proj, w_hh, *state = c.inputs_as(dtype)
    h, cell = state if state else (None, None)  # no state: zeros, which drop out of step 1
    steps, hidden = c.in_dims[0][0], c.in_avals[1].shape[0]
    if isinstance(steps, Sym) or steps is None:
        raise OnnxError("lstm_sequence: the number of steps depends on the batch size")
    xs = g.node("Split", [x_proj, g.const([1] * steps)], outputs=steps, axis=0)
    xs = [xs] if isinstance(xs, str) else xs
    hs, cs, acts = [], [], []
    for x_t in xs:
        pre = g.squeeze(x_t, [0])
        if h is not None:
            pre = g.node("Add", [pre, g.node("MatMul", [h, w_hh])])
        i, f, gate, o = g.node("Split", [pre, g.const([hidden] * 4)], outputs=4, axis=1)
        i, f, gate, o = (g.node("Sigmoid", [i]), g.node("Sigmoid", [f]), g.node("Tanh", [gate]),
                         g.node("Sigmoid", [o]))
        cell = g.node("Mul", [i, gate]) if cell is None else g.node(
            "Add", [g.node("Mul", [f, cell]), g.node("Mul", [i, gate])])
        h = g.node("Mul", [o, g.node("Tanh", [cell])])
        hs.append(g.unsqueeze(h, [0]))
        cs.append(g.unsqueeze(cell, [0]))
        acts.append(g.unsqueeze(g.node("Concat", [i, f, gate, o], axis=1), [0]))
    return [g.node("Concat", items, axis=0) for items in (hs, cs, acts)]


#: needle op name -> emitter; emitters carry the ONNX ops they write for the table
EMITTERS: dict[str, Callable[[_Ctx], Any]] = {
    "add": _binary("Add"), "multiply": _binary("Mul"), "divide": _binary("Div"),
    "power": _binary("Pow"), "maximum": _binary("Max"),
    "add_scalar": _scalar("Add"), "mul_scalar": _scalar("Mul"),
    "divide_scalar": _scalar("Div"), "power_scalar": _scalar("Pow"),
    "apply_mask": _emit_apply_mask,
    "negate": _unary("Neg"), "exp": _unary("Exp"), "log": _unary("Log"),
    "sqrt": _unary("Sqrt"), "abs": _unary("Abs"), "sign": _unary("Sign"), "erf": _unary("Erf"),
    "tanh": _unary("Tanh"), "sigmoid": _unary("Sigmoid"), "relu": _unary("Relu"),
    "compare": _emit_compare, "compare_scalar": _emit_compare_scalar, "where": _emit_where,
    "astype": _emit_astype, "full_like": _emit_full_like,
    "stop_gradient": _emit_identity, "to_device": _emit_identity,
    "matmul": _emit_matmul, "transposed_matmul": _emit_transposed_matmul,
    "linear": _emit_linear, "linear_relu": _emit_linear_relu,
    "linear_residual": _emit_linear_residual, "conv": _emit_conv, "conv_bias": _emit_conv,
    "max_pool2d": _emit_max_pool,
    "reshape": _emit_reshape, "expand_dims": _emit_expand_dims,
    "broadcast_to": _emit_broadcast_to, "sum_to": _emit_sum_to,
    "summation": _reduction("ReduceSum"), "mean": _reduction("ReduceMean"),
    "max": _reduction("ReduceMax"), "logsumexp": _emit_logsumexp,
    "variance": _emit_variance, "batch_stats": _emit_batch_stats,
    "softmax": _emit_softmax("Softmax"),
    "logsoftmax": _emit_softmax("LogSoftmax"), "normalize": _emit_normalize,
    "inv_std": _emit_inv_std, "batch_norm": _emit_batch_norm,
    "batch_norm_relu": _emit_batch_norm_relu, "layer_norm": _emit_layer_norm,
    "attention": _emit_attention,
    "permute": _emit_permute, "transpose": _emit_transpose, "getitem": _emit_getitem,
    "split": _emit_split, "make_tuple": _emit_make_tuple,
    "tuple_get_item": _emit_tuple_get_item, "stack": _emit_stack,
    "concatenate": _emit_concatenate, "flip": _emit_flip, "pad": _emit_pad,
    "take": _emit_gather("Gather"), "take_along_axis": _emit_gather("GatherElements"),
    "scaled_softmax": _emit_scaled_softmax, "lstm_sequence": _emit_lstm_sequence,
}

#: the ONNX ops each composite emitter writes (for ``mapping_table``)
_WRITES = {
    "compare": "Less/LessOrEqual/Greater/GreaterOrEqual/Equal (+Not for ne)",
    "compare_scalar": "Less/LessOrEqual/Greater/GreaterOrEqual/Equal (+Not for ne)",
    "apply_mask": "Mul, Div", "where": "Where", "astype": "Cast",
    "full_like": "ConstantOfShape (+Shape)",
    "stop_gradient": "Identity", "to_device": "Identity", "matmul": "MatMul",
    "linear": "MatMul, Add", "linear_relu": "MatMul, Add, Relu",
    "linear_residual": "MatMul, Add, Add", "transposed_matmul": "Transpose (where swapped), MatMul",
    "conv": "Conv (NCHW, OIHW kernel; Transposes around it cancel with nn.Conv's permutes)",
    "conv_bias": "Conv with its bias B (as conv)",
    "max_pool2d": "MaxPool",
    "reshape": "Reshape (0 / -1 / Shape-based dims for the batch)",
    "expand_dims": "Unsqueeze (axes as an input)",
    "broadcast_to": "Expand", "sum_to": "ReduceSum", "logsumexp": "ReduceMax, Sub, Exp, "
    "ReduceSum, Log, Add", "variance": "ReduceMean, Sub, Mul",
    "batch_stats": "ReduceMean, Sub, Mul (two outputs)",
    "normalize": "LayerNormalization (trailing axes, opset >= 17) or ReduceMean/Sub/Mul/Sqrt",
    "inv_std": "ReduceMean, Sub, Mul, Add, Sqrt, Reciprocal",
    "batch_norm": "Sub, Mul, Add, Sqrt, Reciprocal",
    "batch_norm_relu": "Sub, Mul, Add, Sqrt, Reciprocal, Relu", "permute": "Transpose",
    "layer_norm": "LayerNormalization (opset >= 17) or ReduceMean/Sub/Mul/Sqrt/Add",
    "attention": "Reshape, Transpose, MatMul, Mul, Add, Softmax, MatMul, Transpose, Reshape",
    "transpose": "Transpose", "getitem": "Slice / Gather / Squeeze / Unsqueeze",
    "split": "Split + Squeeze", "make_tuple": "(no node)", "tuple_get_item": "(no node)",
    "stack": "Unsqueeze + Concat", "concatenate": "Concat", "flip": "Slice (step -1)",
    "pad": "Pad", "scaled_softmax": "Softmax, Mul",
    "lstm_sequence": "per step: MatMul, Add, Split, Sigmoid, Tanh, Mul (unrolled); Concat",
}

#: why the ops without an emitter have none
_NO_MAPPING = {
    "bernoulli_like": "random (Dropout in training mode: export the module in eval mode)",
    "store": "a state update (BatchNorm in training mode: export in eval mode)",
    "apply_updates": "an optimizer step (export an inference function)",
    "check_class_ids": "a check of loss labels (export the model, not the loss)",
}


def mapping_table() -> dict[str, str]:
    """needle op -> ONNX ops ('' where the op has no mapping), every registered op listed."""
    table = {}
    for name in sorted(REGISTRY):
        emit = EMITTERS.get(name)
        table[name] = "" if emit is None else _WRITES.get(name, getattr(emit, "onnx", ""))
    return table


# -- tracing ---------------------------------------------------------------------------------
def _as_inputs(example_inputs: Any) -> list[Tensor]:
    items = list(example_inputs) if isinstance(example_inputs, list | tuple) else [
        example_inputs]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Tensor):
            out.append(item)
        elif isinstance(item, np.ndarray):
            out.append(Tensor(item, requires_grad=False))
        else:
            raise TypeError(f"export: example input {i} is a {type(item).__name__}; pass "
                            "Tensors or NumPy arrays")
    return out


def _with_batch(x: Tensor, axis: int, size: int) -> Tensor:
    """``x`` resized to ``size`` along ``axis`` (items repeated, so ids stay valid)."""
    data = x.numpy()
    index = np.arange(size) % data.shape[axis]
    return Tensor(np.take(data, index, axis=axis), dtype=x.dtype, requires_grad=False)


class _Origins:
    """Where each traced node was made: the module whose forward made it and the line."""

    def __init__(self, module_names: dict[int, str]) -> None:
        self.module_names = module_names
        self.where: dict[int, str] = {}

    def __call__(self, node: Any) -> None:
        frame: FrameType | None = sys._getframe(1)
        found = None
        user = None
        while frame is not None:
            code = frame.f_code
            if found is None and code.co_name == "forward":
                owner = frame.f_locals.get("self")
                if isinstance(owner, nn.Module):
                    name = self.module_names.get(id(owner))
                    label = type(owner).__name__ + (f" {name!r}" if name else "")
                    found = f"{label} at {code.co_filename}:{frame.f_lineno}"
            if user is None and not is_needle_file(code.co_filename) and not \
                    code.co_filename.startswith("<"):
                user = f"{code.co_filename}:{frame.f_lineno}"
            if found is not None and user is not None:
                break
            frame = frame.f_back
        if found and user:
            found = f"{found} (called from {user})"
        self.where[id(node)] = found or user or "an unknown place"


def _trace(fn: Any, inputs: list[Tensor], origins: _Origins | None) -> Program:
    jitted = jit(fn)
    try:
        if origins is None:
            return jitted.lower(*inputs)
        with watching_nodes(origins):
            return jitted.lower(*inputs)
    except JitError as exc:
        raise OnnxError(f"export: the function cannot be traced into one graph ({exc}); an "
                        "ONNX graph cannot depend on tensor values read in Python") from exc


def _slot_index(program: Program) -> dict[int, tuple]:
    """slot -> ('source', i) / ('step', i) / ('const', i): positions comparable across traces."""
    index: dict[int, tuple] = {}
    for i, node in enumerate(program.sources):
        index[id(node)] = ("source", i)
    for i, slot in enumerate(program.constants):
        index.setdefault(slot, ("const", i))
    for i, step in enumerate(program.steps):
        index[step.out] = ("step", i)
    return index


def _structure(program: Program) -> tuple:
    index = _slot_index(program)
    return ([(s.op.name, tuple(index.get(x) for x in s.inputs)) for s in program.steps],
            [index.get(o) for o in program.outputs])


def _sym_dims(shape1: tuple, shape2: tuple | None, b1: int, b2: int, what: str) -> tuple:
    if shape2 is None:
        return tuple(shape1)
    if len(shape1) != len(shape2):
        raise OnnxError(f"export: {what} has rank {len(shape1)} at batch {b1} but "
                        f"{len(shape2)} at batch {b2}")
    dims = []
    for d1, d2 in zip(shape1, shape2):
        if d1 == d2:
            dims.append(d1)
        elif d1 % b1 == 0 and (d1 // b1) * b2 == d2:
            dims.append(Sym(d1 // b1))
        else:
            raise OnnxError(f"export: {what} has shape {tuple(shape1)} at batch {b1} and "
                            f"{tuple(shape2)} at batch {b2}: a dimension is not a multiple of "
                            "the batch size")
    return tuple(dims)


def _dims_of(aval1: Any, aval2: Any, b1: int, b2: int, what: str) -> Any:
    if isinstance(aval1, tuple) and not hasattr(aval1, "shape"):
        return [_dims_of(a, None if aval2 is None else a2, b1, b2, what)
                for a, a2 in zip(aval1, aval2 if aval2 is not None else aval1)]
    return _sym_dims(tuple(aval1.shape), None if aval2 is None else tuple(aval2.shape),
                     b1, b2, what)


# -- the export -------------------------------------------------------------------------------

def _io_names(given: list[str] | None, count: int, stem: str, rule: str) -> list[str]:
    """``given`` checked (``count`` distinct names), or ``stem`` / ``stem0, stem1, ...``."""
    if given is None:
        return [stem] if count == 1 else [f"{stem}{i}" for i in range(count)]
    if len(given) != count or len(set(given)) != len(given):
        raise ValueError(f"export: {rule}, got {given}")
    return list(given)

def export(module_or_fn: Any, example_inputs: Any, path: Any = None,
           input_names: list[str] | None = None, output_names: list[str] | None = None,
           dynamic_batch: bool = True, opset: int = 17, batch_axis: int = 0
           ) -> onnx.ModelProto:
    """See ``needle.onnx.export``."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"export: opset must lie in [{MIN_OPSET}, {MAX_OPSET}], got {opset}")
    fn = module_or_fn.fn if isinstance(module_or_fn, CompiledFunction) else module_or_fn
    inputs = _as_inputs(example_inputs)
    input_names = _io_names(input_names, len(inputs), "input",
                            f"{len(inputs)} inputs need as many distinct input_names")
    module_names: dict[int, str] = {}
    tensor_names: dict[int, str] = {}
    buffer_ids: set[int] = set()
    modes = []
    if isinstance(module_or_fn, nn.Module):
        for name, m in module_or_fn.named_modules():
            module_names[id(m)] = name or type(m).__name__
            modes.append((m, m.training))
        for name, p in module_or_fn.named_parameters():
            tensor_names[id(p)] = name
        for name, b in module_or_fn.named_buffers():
            tensor_names[id(b)] = name
            buffer_ids.add(id(b))
        module_or_fn.eval()
    try:
        origins = _Origins(module_names)
        program = _trace(fn, inputs, origins)
        _check_supported(program, origins)
        program2 = None
        b1 = b2 = 0
        batched = [False] * len(inputs)
        if dynamic_batch:
            b1, b2, batched, program2 = _second_trace(fn, inputs, program, batch_axis)
    finally:
        for m, mode in modes:
            m.training = mode
    model = _write(program, program2, b1, b2, inputs, batched, batch_axis, input_names,
                   output_names, tensor_names, buffer_ids, opset, origins)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # an exporter bug: say so rather than write a broken file
        raise OnnxError(f"export: the written model fails onnx.checker: {exc}") from exc
    if path is not None:
        onnx.save(model, path)
    return model


def _check_supported(program: Program, origins: _Origins) -> None:
    """One OnnxError listing every step with no ONNX mapping and where it was made."""
    missing = []
    for step in program.steps:
        name = step.op.name
        if name not in EMITTERS:
            why = _NO_MAPPING.get(name, "no ONNX mapping")
            where = origins.where.get(id(step.node), "an unknown place")
            missing.append(f"  {name} ({why}), made by {where}")
    if missing:
        raise OnnxError(f"export: {len(missing)} op(s) cannot be exported to ONNX (nothing "
                        "was written):\n" + "\n".join(missing))


def _second_trace(fn: Any, inputs: list[Tensor], program: Program, axis: int
                  ) -> tuple[int, int, list[bool], Program]:
    """Trace again at another batch size; check both programs have the same steps."""
    if not inputs or len(inputs[0].shape) <= axis:
        raise OnnxError(f"export: dynamic_batch needs a first input with an axis {axis}")
    b1 = int(inputs[0].shape[axis])
    batched = [len(x.shape) > axis and x.shape[axis] == b1 for x in inputs]
    seen = {int(d) for s in program.steps for d in _flat_shape(s.node)}
    seen |= {int(d) for x in inputs for d in x.shape}
    b2 = b1 + 1
    while b2 in seen or b2 < 2:
        b2 += 1
    inputs2 = [_with_batch(x, axis, b2) if flag else x for x, flag in zip(inputs, batched)]
    program2 = _trace(fn, inputs2, None)
    if _structure(program) != _structure(program2):
        raise OnnxError(
            f"export: tracing at batch sizes {b1} and {b2} gave different programs, so the "
            "graph depends on the batch size in a way ONNX cannot express (a loop over the "
            "batch, or a batch size equal to another dimension that the optimizer merged). "
            "Try another example batch size, or dynamic_batch=False.")
    return b1, b2, batched, program2


def _flat_shape(node: Any) -> list[int]:
    aval = node.aval
    if isinstance(aval, tuple) and not hasattr(aval, "shape"):
        return [d for a in aval for d in a.shape if d is not None]
    return [d for d in aval.shape if d is not None]


def _value_info(name: str, dtype: np.dtype, dims: tuple) -> onnx.ValueInfoProto:
    shape = []
    for d in dims:
        if isinstance(d, Sym):
            shape.append("batch" if d.k == 1 else f"batch_x{d.k}")
        else:
            shape.append(d)
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), shape)


def _conv_fusions(program: Program) -> tuple[dict[int, int], dict[int, int], set[int]]:
    """Conv steps whose only reader adds a (C_out,) source (folded into Conv's bias), and the
    data sources read only as conv kernels (stored in ONNX's OIHW layout)."""
    readers: dict[int, list] = {}
    for step in program.steps:
        for pos, slot in enumerate(step.inputs):
            readers.setdefault(slot, []).append((step, pos))
    for slot in program.outputs:
        readers.setdefault(slot, []).append((None, 0))
    sources = {id(n): n for n in program.sources if n._data is not None}
    bias_of: dict[int, int] = {}
    alias: dict[int, int] = {}
    kernels = set()
    for step in program.steps:
        if step.op.name not in ("conv", "conv_bias"):
            continue
        users = readers.get(step.out, [])
        if (step.op.name == "conv" and len(users) == 1 and users[0][0] is not None
                and users[0][0].op.name == "add"):
            add = users[0][0]
            other = add.inputs[1 - users[0][1]]
            node = sources.get(other)
            c_out = step.node.aval.shape[-1]
            if (node is not None and tuple(node.shape) == (c_out,)
                    and node.dtype == step.node.aval.dtype
                    and tuple(add.node.aval.shape) == tuple(step.node.aval.shape)):
                bias_of[step.out] = other
                alias[add.out] = step.out
        w = step.inputs[1]
        if w in sources and all(s is not None and s.op.name in ("conv", "conv_bias") and p == 1
                                for s, p in readers.get(w, [])):
            kernels.add(w)
    return bias_of, alias, kernels


def _embedding_lookups(program: Program) -> dict[int, tuple[int, int]]:
    """nn.Embedding's traced lookup ``astype(compare(ids, arange(n), 'eq')) @ W`` (one-hot
    rows times the table): matmul slot -> (ids slot, table slot), for a Gather instead (the
    same values for valid ids, without an (ids, n) one-hot matrix)."""
    steps = {s.out: s for s in program.steps}
    readers: dict[int, int] = {}
    for step in program.steps:
        for slot in step.inputs:
            readers[slot] = readers.get(slot, 0) + 1
    for slot in program.outputs:
        readers[slot] = readers.get(slot, 0) + 1
    consts = {id(n): n for n in program.sources if n._data is not None and not n.requires_grad}
    avals = _avals(program)
    found = {}
    for step in program.steps:
        if step.op.name != "matmul":
            continue
        hot, table = step.inputs
        cast = steps.get(hot)
        if cast is None or cast.op.name != "astype" or readers.get(hot) != 1:
            continue
        eq = steps.get(cast.inputs[0])
        if (eq is None or eq.op.name != "compare"
                or eq.op.kind != "eq"  # type: ignore[attr-defined]  # (a compare op has kind)
                or readers.get(eq.out) != 1):
            continue
        ids, classes = eq.inputs
        node = consts.get(classes)
        ids_shape = tuple(eq.node.aval.shape)
        table_aval = avals[table]
        if node is None or len(table_aval.shape) != 2:
            continue
        data = node.numpy()
        if (data.ndim != 1 or data.dtype.kind not in "iu" or len(ids_shape) != 2
                or not np.array_equal(data, np.arange(len(data)))
                or len(data) != table_aval.shape[0]
                or tuple(avals[ids].shape[1:]) != (1,)):
            continue
        found[step.out] = (ids, table)
    return found


def _write(program: Program, program2: Program | None, b1: int, b2: int, inputs: list,
           batched: list[bool], batch_axis: int, input_names: list[str],
           output_names: list[str] | None, tensor_names: dict[int, str],
           buffer_ids: set[int], opset: int, origins: _Origins) -> onnx.ModelProto:
    g = _Graph(opset)
    names: dict[int, Any] = {}
    dims: dict[int, Any] = {}
    index1 = _slot_index(program)
    avals = _avals(program)

    def dims_for(slot: int, aval: Any, what: str) -> Any:
        other = None if program2 is None else _node_aval2(program2, index1.get(slot))
        return _dims_of(aval, other, b1, b2, what)

    out_slots = list(program.outputs)
    output_names = _io_names(output_names, len(out_slots), "output",
                             f"the function returns {len(out_slots)} tensors; as many "
                             "distinct output_names are needed")
    if set(output_names) & set(input_names):
        raise ValueError(f"export: output_names {output_names} reuse an input name")
    g.used.update(output_names)
    # graph inputs: the call's stand-ins, by position
    graph_inputs = []
    stand_ins = {int(n.meta.name[3:]): n for n in program.sources
                 if isinstance(n, TraceInput) and n.meta is not None
                 and n.meta.name is not None and n.meta.name.startswith("arg")}
    for i, (x, name) in enumerate(zip(inputs, input_names)):
        g.used.add(name)
        shape = list(x.shape)
        if batched[i]:
            shape[batch_axis] = Sym(1)
            if g.batch_source is None:
                g.batch_source = (name, batch_axis)
        graph_inputs.append(_value_info(name, x.dtype, tuple(shape)))
        node = stand_ins.get(i)
        if node is not None:
            names[id(node)] = name
            dims[id(node)] = tuple(shape)
    bias_of, alias, kernels = _conv_fusions(program)
    lookups = _embedding_lookups(program)
    # data sources and constants: initializers
    buffers = []
    for k, node in enumerate(program.sources):
        if id(node) in names:
            continue
        if node._data is None:
            raise OnnxError(f"export: the graph reads a value with no data ({node.meta}); "
                            "pass every input in example_inputs")
        data = node.numpy()
        base = tensor_names.get(id(node), f"param{k}" if node.requires_grad else f"const{k}")
        what = f"the constant {base!r}"
        dims[id(node)] = dims_for(id(node), node.aval, what)
        if any(isinstance(d, Sym) for d in dims[id(node)]):
            raise OnnxError(f"export: {what} of shape {data.shape} depends on the batch size")
        if id(node) in kernels:
            data = np.transpose(data, (3, 2, 0, 1))  # (kh, kw, C_in, C_out) -> OIHW
        if node.requires_grad or id(node) in buffer_ids:  # weights and state: initializers
            names[id(node)] = g.initializer(np.ascontiguousarray(data), base)
            if id(node) in buffer_ids:
                buffers.append(names[id(node)])
        else:  # a constant made by the traced code (a mask, Embedding's class ids)
            names[id(node)] = g.const(data, data.dtype, base)
    for slot, value in program.constants.items():
        if slot in names:
            continue
        array = np.asarray(value)
        names[slot] = g.const(array, array.dtype)
        dims[slot] = tuple(array.shape)
    # the steps
    steps2: list[Any] = [None] * len(program.steps) if program2 is None else program2.steps
    for step, step2 in zip(program.steps, steps2):
        what = f"step {step.op.name}"
        dims[step.out] = _dims_of(step.node.aval, None if step2 is None else step2.node.aval,
                                  b1, b2, what)
        if step.out in alias:
            names[step.out] = names[alias[step.out]]
            continue
        if step2 is not None and step.op.key() != step2.op.key() and step.op.name not in (
                "reshape", "broadcast_to", "sum_to", "getitem"):
            raise OnnxError(f"export: {step.op!r} at batch {b1} is {step2.op!r} at batch "
                            f"{b2}: an attribute depends on the batch size (made by "
                            f"{origins.where.get(id(step.node), 'an unknown place')}); "
                            "compute it with ops, or export with dynamic_batch=False")
        ins = [names[s] for s in step.inputs]
        in_avals = [avals[s] for s in step.inputs]
        ctx = _Ctx(g, step.op, None if step2 is None else step2.op, ins, in_avals,
                   [dims[s] for s in step.inputs], step.node.aval, dims[step.out])
        if step.op.name in ("conv", "conv_bias"):
            ctx.bias = names[bias_of[step.out]] if step.out in bias_of else None
            ctx.weight_oihw = step.inputs[1] in kernels
        if step.out in lookups:  # the one-hot product (now dead) becomes a Gather
            ids, table = lookups[step.out]
            index = g.cast(names[ids], avals[ids].dtype, np.int64)
            names[step.out] = g.node("Gather", [names[table], g.squeeze(index, [1])], axis=0)
            continue
        try:
            names[step.out] = EMITTERS[step.op.name](ctx)
        except Exception as exc:
            raise OnnxError(f"export: cannot write {step.op!r} on inputs "
                            f"{[tuple(a.shape) for a in in_avals]} (made by "
                            f"{origins.where.get(id(step.node), 'an unknown place')}): "
                            f"{exc}") from exc
    # outputs: rename each final value to its output name (Identity where that cannot be)
    graph_outputs = []
    renamed: dict[str, str] = {}
    for slot, out_name in zip(out_slots, output_names):
        value = names[slot]
        produced = any(value in n.output for n in g.nodes)
        if produced and value not in renamed and value not in input_names:
            renamed[value] = out_name
        else:
            g.node("Identity", [renamed.get(value, value)], outputs=[out_name])
        aval = avals[slot]
        graph_outputs.append(_value_info(out_name, aval.dtype, dims[slot]))
    _rename(g.nodes, renamed)
    nodes = _simplify(g.nodes, set(output_names))
    used = {i for n in nodes for i in n.input}
    inits = [t for name, t in g.initializers.items() if name in used]
    graph = helper.make_graph(nodes, "needle", graph_inputs, graph_outputs, inits)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="needle",
                              ir_version=helper.find_min_ir_version_for(opsets))
    if buffers:
        helper.set_model_props(model, {BUFFERS_KEY: ",".join(b for b in buffers if b in used)})
    return model


def _node_aval2(program: Program, key: Any) -> Any:
    if key is None:
        return None
    kind, i = key
    if kind == "source":
        return program.sources[i].aval
    if kind == "step":
        return program.steps[i].node.aval
    value = np.asarray(list(program.constants.values())[i])
    return Aval(value.shape, value.dtype)


def _avals(program: Program) -> dict[int, Any]:
    """slot -> static shape and dtype, for every source, constant and step."""
    avals: dict[int, Any] = {id(n): n.aval for n in program.sources}
    for slot, value in program.constants.items():
        value = np.asarray(value)
        avals[slot] = Aval(value.shape, value.dtype)
    avals.update((step.out, step.node.aval) for step in program.steps)
    return avals


def _rename(nodes: list, renamed: dict[str, str]) -> None:
    if not renamed:
        return
    for node in nodes:
        for i, name in enumerate(node.output):
            if name in renamed:
                node.output[i] = renamed[name]
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]


def _simplify(nodes: list, outputs: set[str]) -> list:
    """Fold Transpose chains, drop identity Transposes and nodes nothing reads."""
    producer = {o: n for n in nodes for o in n.output}
    perm = {n.output[0]: list(helper.get_attribute_value(a) for a in n.attribute
                              if a.name == "perm")[0]
            for n in nodes if n.op_type == "Transpose"}
    renamed: dict[str, str] = {}
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        if node.op_type != "Transpose":
            continue
        src = node.input[0]
        p2 = perm[node.output[0]]
        while src in perm and producer[src].op_type == "Transpose":
            p1 = perm[src]
            p2 = [p1[i] for i in p2]
            src = producer[src].input[0]
        if src != node.input[0]:
            node.input[0] = src
            perm[node.output[0]] = p2
            for a in node.attribute:
                if a.name == "perm":
                    del a.ints[:]
                    a.ints.extend(p2)
        if p2 == list(range(len(p2))) and node.output[0] not in outputs:
            renamed[node.output[0]] = src
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    # dead nodes, last to first
    needed = set(outputs)
    kept = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    return kept[::-1]


__all__ = ["EMITTERS", "OnnxError", "Sym", "export", "mapping_table"]
