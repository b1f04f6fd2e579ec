"""ONNX -> needle: an ``nn.Module`` whose forward applies needle ops node by node.

The whole model is checked before a module is made (so nothing runs on a bad file): it must
parse, every node's op must be in ``IMPORTERS`` (with attributes needle can honour), every
input must be a graph input, an initializer or another node's output, the nodes must not form
a cycle, and ``onnx.checker`` must accept it. Each problem kind is one OnnxError listing all
the offending nodes.

Values during forward are either Tensors or *static* NumPy arrays: integer initializers,
Constant nodes, Shape outputs and what is computed from them only (shape arithmetic). Static
values are computed with NumPy, so shape computations never become graph nodes, and they
become constant Tensors where a tensor op reads them. A Shape of a tensor whose batch size is
unknown (a Session placeholder ``(None, ...)``) holds None there; Reshape and Expand accept
that (needle's None keeps the input's dim), arithmetic on it raises an OnnxError.

Float initializers become ``nn.Parameter``s, except scalars (0-d: constants such as a
divisor) and those read only where a value is static by nature (a Pow exponent, Clip bounds,
Pad values), which stay constants, and BatchNormalization's running mean and variance, which
become ``nn.Buffer``s (as do the initializers an exported needle model lists as buffers).
Inference semantics are kept while fine-tuning: Dropout is the identity and
BatchNormalization uses its running statistics.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import nn, ops
from ..autograd import Tensor
from .errors import OnnxError

BUFFERS_KEY = "needle.buffers"


# -- nodes -------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Node:
    """One ONNX node as the forward runs it."""

    op_type: str
    name: str
    inputs: tuple
    outputs: tuple
    attrs: dict = field(default_factory=dict)
    opset: int = 17

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def where(self) -> str:
        return f"{self.op_type} node {self.name!r}" if self.name else f"{self.op_type} node"


def _attributes(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        elif isinstance(value, list):
            value = [v.decode() if isinstance(v, bytes) else v for v in value]
        out[a.name] = value
    return out


# -- value helpers -----------------------------------------------------------------------------
def _is_static(v: Any) -> bool:
    return isinstance(v, np.ndarray)


def _tensor(v: Any) -> Tensor:
    """A Tensor of a value (static arrays become constants that need no gradient)."""
    if isinstance(v, Tensor):
        return v
    array = np.asarray(v)
    if array.dtype == object:
        raise OnnxError("a shape value with an unknown dimension is used as data")
    return Tensor(array, dtype=array.dtype, requires_grad=False)


def _static(v: Any, what: str) -> np.ndarray:
    """A static value (a shape, axes, indices); Tensors with data are read."""
    if _is_static(v):
        return v
    if isinstance(v, Tensor) and v._data is not None:
        return v.numpy()
    raise OnnxError(f"{what} must be known before the graph runs (a constant or a shape "
                    "computation), but it is computed from the inputs")


def _ints(v: Any, what: str) -> list:
    return [None if d is None else int(d) for d in np.asarray(_static(v, what)).reshape(-1)]


def _shape(x: Any) -> tuple:
    return tuple(x.shape)


def _rank(x: Any) -> int:
    return len(x.shape)


def _scalar_of(v: Any) -> float | int | None:
    """A Python number when ``v`` is a static value of size 1 and rank 0."""
    if _is_static(v) and v.ndim == 0 and v.dtype != object:
        return v.item()
    return None


def _binary(np_fn: Callable, tensor_fn: Callable) -> Callable:
    def run(n: _Node, a: Any, b: Any) -> Any:
        if _is_static(a) and _is_static(b):
            return _static_math(np_fn, a, b, n=n)
        return tensor_fn(_tensor(a), _tensor(b) if _scalar_of(b) is None else _scalar_of(b))

    return run


def _static_math(fn: Callable, *args: Any, n: _Node | None = None) -> np.ndarray:
    try:
        out = fn(*args)
    except TypeError as exc:
        raise OnnxError(f"{n.where() if n else 'a node'}: shape arithmetic on an unknown "
                        "dimension (feed a concrete batch size)") from exc
    return np.asarray(out)


def _static_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iu" and b.dtype.kind in "iu":
        return np.trunc(a / b).astype(a.dtype)
    return a / b


def _imp_add(n, a, b):
    return _binary(np.add, lambda x, y: x + y)(n, a, b)


def _imp_sub(n, a, b):
    return _binary(np.subtract, lambda x, y: x - y)(n, a, b)


def _imp_mul(n, a, b):
    return _binary(np.multiply, lambda x, y: x * y)(n, a, b)


def _imp_div(n, a, b):
    return _binary(_static_div, lambda x, y: x / y)(n, a, b)


def _imp_pow(n, a, b):
    if _is_static(a) and _is_static(b):
        return _static_math(np.power, a, b, n=n)
    exponent = _scalar_of(b)
    if exponent is None and _is_static(b) and b.size == 1:
        exponent = b.reshape(()).item()
    if exponent is not None:
        return ops.power_scalar(_tensor(a), exponent)
    return ops.power(_tensor(a), _tensor(b))


def _fold(fn: Callable) -> Callable:
    def run(n: _Node, *args: Any) -> Any:
        values = [_tensor(a) for a in args if a is not None]
        out = values[0]
        for v in values[1:]:
            out = fn(out, v)
        return out

    return run


def _minimum(a: Tensor, b: Tensor) -> Tensor:
    return -ops.maximum(-a, -b)


def _imp_mean(n, *args):
    values = [a for a in args if a is not None]
    return _fold(lambda x, y: x + y)(n, *values) / float(len(values))


def _unary(fn: Callable) -> Callable:
    def run(n: _Node, x: Any) -> Any:
        return fn(_tensor(x))

    return run


def _imp_leaky_relu(n, x):
    alpha = float(n.attr("alpha", 0.01))
    x = _tensor(x)
    return ops.relu(x) - ops.relu(-x) * alpha


def _imp_gelu(n, x):
    x = _tensor(x)
    if n.attr("approximate", "none") == "tanh":
        inner = (x + ops.power_scalar(x, 3) * 0.044715) * math.sqrt(2.0 / math.pi)
        return x * 0.5 * (ops.tanh(inner) + 1.0)
    return x * 0.5 * (ops.erf(x * (1.0 / math.sqrt(2.0))) + 1.0)


def _imp_clip(n, x, lo=None, hi=None):
    x = _tensor(x)
    lo = n.attr("min") if lo is None else _static(lo, "Clip min").item()
    hi = n.attr("max") if hi is None else _static(hi, "Clip max").item()
    if lo is not None:
        x = ops.maximum(x, _tensor(np.asarray(lo, dtype=x.dtype)))
    if hi is not None:
        x = _minimum(x, _tensor(np.asarray(hi, dtype=x.dtype)))
    return x


def _imp_identity(n, x, *rest):
    return x


def _imp_reciprocal(n, x):
    return ops.power_scalar(_tensor(x), -1.0)


# -- linear algebra ----------------------------------------------------------------------------
def _imp_matmul(n, a, b):
    if _is_static(a) and _is_static(b):
        return np.matmul(a, b)
    return ops.matmul(_tensor(a), _tensor(b))


def _imp_gemm(n, a, b, c=None):
    a, b = _tensor(a), _tensor(b)
    if n.attr("transA", 0):
        a = ops.permute(a, (1, 0))
    if n.attr("transB", 0):
        b = ops.permute(b, (1, 0))
    y = ops.matmul(a, b)
    alpha, beta = float(n.attr("alpha", 1.0)), float(n.attr("beta", 1.0))
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        c = _tensor(c)
        y = y + (c * beta if beta != 1.0 else c)
    return y


# -- convolution and pooling (2-D, NCHW) ------------------------------------------------------
def _spatial_pads(n: _Node, in_hw: tuple, kernel: tuple, strides: tuple,
                  dilations: tuple = (1, 1)) -> list[int]:
    """[top, left, bottom, right] from ``pads`` or ``auto_pad``."""
    auto = n.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", "") or auto is None:
        pads = list(n.attr("pads", [0, 0, 0, 0]))
        return pads if pads else [0, 0, 0, 0]
    if auto == "VALID":
        return [0, 0, 0, 0]
    begin, end = [], []
    for size, k, s, d in zip(in_hw, kernel, strides, dilations):
        if size is None:
            raise OnnxError(f"{n.where()}: auto_pad needs known spatial sizes")
        eff = (k - 1) * d + 1
        total = max((-(-size // s) - 1) * s + eff - size, 0)
        small = total // 2
        begin.append(small if auto == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


def _nhwc_pad(x: Tensor, pads: list[int]) -> Tensor:
    t, left, b, r = pads
    return ops.pad(x, ((0, 0), (t, b), (left, r), (0, 0)))


def _imp_conv(n, x, w, bias=None):
    x, w = _tensor(x), _tensor(w)
    if _rank(x) != 4 or _rank(w) != 4:
        raise OnnxError(f"{n.where()}: only 2-D convolutions (4-d input and weight) are "
                        f"supported, got {_shape(x)} and {_shape(w)}")
    kh, kw = w.shape[2], w.shape[3]
    strides = tuple(n.attr("strides", [1, 1]))
    dilations = tuple(n.attr("dilations", [1, 1]))
    groups = int(n.attr("group", 1))
    pads = _spatial_pads(n, (x.shape[2], x.shape[3]), (kh, kw), strides, dilations)
    xh = ops.permute(x, (0, 2, 3, 1))  # NCHW -> NHWC, needle's conv layout
    kernel = ops.permute(w, (2, 3, 1, 0))  # (C_out, C_in, kh, kw) -> (kh, kw, C_in, C_out)
    for axis, d, k in ((0, dilations[0], kh), (1, dilations[1], kw)):
        if d > 1:  # zeros between taps, the trailing ones cut off
            kernel = ops.dilate(kernel, axes=(axis,), dilation=d - 1)
            index = [slice(None)] * 4
            index[axis] = slice(0, (k - 1) * d + 1)
            kernel = ops.getitem(kernel, tuple(index))
    if len(set(pads)) == 1:
        padding = pads[0]
    else:
        xh, padding = _nhwc_pad(xh, pads), 0
    stride = strides[0] if strides[0] == strides[1] else 1
    c_in = w.shape[1]
    c_out = w.shape[0]
    fused = bias is not None and strides[0] == strides[1]  # the bias added by the conv
    if groups == 1 and fused:
        y = ops.conv_bias(xh, kernel, _tensor(bias), stride=stride, padding=padding)
    elif groups == 1:
        fused = False
        y = ops.conv(xh, kernel, stride=stride, padding=padding)
    else:
        fused = False
        per_out = c_out // groups
        parts = [ops.conv(ops.getitem(xh, (Ellipsis, slice(i * c_in, (i + 1) * c_in))),
                          ops.getitem(kernel, (Ellipsis, slice(i * per_out, (i + 1) * per_out))),
                          stride=stride, padding=padding)
                 for i in range(groups)]
        y = ops.concatenate(parts, axis=3)
    if strides[0] != strides[1]:
        y = ops.getitem(y, (slice(None), slice(None, None, strides[0]),
                            slice(None, None, strides[1]), slice(None)))
    if bias is not None and not fused:
        y = y + _tensor(bias)
    return ops.permute(y, (0, 3, 1, 2))


def _pool_geometry(n: _Node, x: Tensor) -> tuple:
    if _rank(x) != 4:
        raise OnnxError(f"{n.where()}: only 2-D pooling (4-d NCHW input) is supported, got "
                        f"{_shape(x)}")
    kernel = tuple(n.attr("kernel_shape"))
    strides = tuple(n.attr("strides", [1, 1]))
    h, w = x.shape[2], x.shape[3]
    if h is None or w is None:
        raise OnnxError(f"{n.where()}: pooling needs known spatial sizes, got {_shape(x)}")
    pads = _spatial_pads(n, (h, w), kernel, strides)
    out, extra = [], []
    for size, k, s, lo, hi in zip((h, w), kernel, strides, pads[:2], pads[2:]):
        span = size + lo + hi - k
        count = (-(-span // s) if n.attr("ceil_mode", 0) else span // s) + 1
        if n.attr("ceil_mode", 0) and (count - 1) * s >= size + lo:
            count -= 1
        out.append(count)
        extra.append(max((count - 1) * s + k - (size + lo + hi), 0))
    pads = [pads[0], pads[1], pads[2] + extra[0], pads[3] + extra[1]]
    return kernel, strides, pads, tuple(out), any(extra)


def _padded(x: Tensor, pads: list[int], value: float | None) -> Tensor:
    """x zero-padded on H and W, or with ``value`` where padding (a mask and where)."""
    width = ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3]))
    out = ops.pad(x, width)
    if value is None or value == 0:
        return out
    inside = ops.compare_scalar(ops.pad(ops.full_like(x, 1), width), 0, "gt")
    return ops.where(inside, out, _tensor(np.asarray(value, dtype=x.dtype)))


def _windows(x: Tensor, kernel: tuple, strides: tuple, out: tuple) -> list[Tensor]:
    (kh, kw), (sh, sw), (ho, wo) = kernel, strides, out
    return [ops.getitem(x, (slice(None), slice(None), slice(i, i + sh * (ho - 1) + 1, sh),
                            slice(j, j + sw * (wo - 1) + 1, sw)))
            for i in range(kh) for j in range(kw)]


def _imp_max_pool(n, x):
    x = _tensor(x)
    kernel, strides, pads, out, _ = _pool_geometry(n, x)
    if any(pads):
        x = _padded(x, pads, -np.inf)
    if kernel[0] == kernel[1] and strides[0] == strides[1]:  # needle's max_pool2d op
        return ops.max_pool2d(x, kernel_size=kernel[0], stride=strides[0])
    windows = _windows(x, kernel, strides, out)
    while len(windows) > 1:  # a balanced tree of maxima
        paired = [ops.maximum(a, b) for a, b in zip(windows[::2], windows[1::2])]
        windows = paired + windows[len(paired) * 2:]
    return windows[0]


def _imp_average_pool(n, x):
    x = _tensor(x)
    kernel, strides, pads, out, extra = _pool_geometry(n, x)
    if extra:
        raise OnnxError(f"{n.where()}: ceil_mode windows past the padding are not supported")
    total = None
    for window in _windows(_padded(x, pads, None) if any(pads) else x, kernel, strides, out):
        total = window if total is None else total + window
    if any(pads) and not n.attr("count_include_pad", 0):
        ones = _padded(ops.full_like(x, 1), pads, None)
        count = None
        for window in _windows(ones, kernel, strides, out):
            count = window if count is None else count + window
        return total / count
    return total / float(kernel[0] * kernel[1])


def _imp_global_average_pool(n, x):
    x = _tensor(x)
    return ops.mean(x, axes=tuple(range(2, _rank(x))), keepdims=True)


def _imp_global_max_pool(n, x):
    x = _tensor(x)
    return ops.max(x, axes=tuple(range(2, _rank(x))), keepdims=True)


# -- normalization -----------------------------------------------------------------------------
def _per_channel(t: Any, ndim: int) -> Tensor:
    t = _tensor(t)
    return ops.reshape(t, (1, t.shape[0]) + (1,) * (ndim - 2)) if ndim > 2 else t


def _imp_batch_norm(n, x, scale, bias, mean, var):
    x = _tensor(x)
    ndim = _rank(x)
    eps = float(n.attr("epsilon", 1e-5))
    centered = x - _per_channel(mean, ndim)
    normed = centered / ops.sqrt(_per_channel(var, ndim) + eps)
    return _per_channel(scale, ndim) * normed + _per_channel(bias, ndim)


def _imp_layer_norm(n, x, scale, bias=None):
    x = _tensor(x)
    ndim = _rank(x)
    axis = int(n.attr("axis", -1)) % ndim
    y = ops.normalize(x, axes=tuple(range(axis, ndim)), eps=float(n.attr("epsilon", 1e-5)))
    y = y * _tensor(scale)
    return y if bias is None else y + _tensor(bias)


def _softmax(kind: str) -> Callable:
    fn = ops.softmax if kind == "softmax" else ops.logsoftmax

    def run(n: _Node, x: Any) -> Any:
        x = _tensor(x)
        ndim = _rank(x)
        if n.opset >= 13:
            return fn(x, axis=int(n.attr("axis", -1)))
        axis = int(n.attr("axis", 1)) % ndim  # before opset 13: over the flattened tail
        if axis == ndim - 1:
            return fn(x, axis=-1)
        tail = int(np.prod(x.shape[axis:]))
        flat = ops.reshape(x, (-1, tail))
        return ops.reshape(fn(flat, axis=-1), tuple(-1 if d is None else d for d in x.shape))

    return run


# -- shapes ------------------------------------------------------------------------------------
def _imp_shape(n, x):
    shape = list(_shape(x))
    start, end = n.attr("start", 0), n.attr("end", None)
    shape = shape[start:end]
    if any(d is None for d in shape):
        return np.array(shape, dtype=object)
    return np.array(shape, dtype=np.int64)


def _imp_size(n, x):
    shape = _shape(x)
    if any(d is None for d in shape):
        raise OnnxError(f"{n.where()}: Size of a tensor with an unknown dimension")
    return np.array(int(np.prod(shape)), dtype=np.int64)


def _reshape_target(n: _Node, x: Any, shape: Any) -> tuple:
    target = _ints(shape, f"{n.where()}: the shape")
    in_shape = _shape(x)
    out = []
    for i, d in enumerate(target):
        if d == 0 and not n.attr("allowzero", 0):
            d = in_shape[i] if i < len(in_shape) else None
        out.append(d)
    unknown = [i for i, d in enumerate(out) if d is None]
    if len(unknown) == 1 and -1 not in out:
        out[unknown[0]] = -1
    elif -1 in out and all(i in unknown for i, d in enumerate(in_shape) if d is None):
        # the input's unknown dims are all copied (None): the -1 is known, e.g. (None, 3, 4)
        # to (None, -1) is (None, 12) (needle alone would infer (None, None))
        known_in = int(np.prod([d for d in in_shape if d is not None], dtype=np.int64))
        known_out = int(np.prod([d for d in out if d not in (None, -1)], dtype=np.int64))
        if known_out and known_in % known_out == 0:
            out[out.index(-1)] = known_in // known_out
    return tuple(out)


def _imp_reshape(n, x, shape):
    target = _reshape_target(n, x, shape)
    if _is_static(x):
        return x.reshape(target)
    return ops.reshape(x, target)


def _imp_flatten(n, x):
    shape = _shape(x)
    axis = int(n.attr("axis", 1)) % (len(shape) + 1)
    head, tail = shape[:axis], shape[axis:]

    def prod(dims: tuple) -> int | None:
        return None if any(d is None for d in dims) else int(np.prod(dims, dtype=np.int64))

    a, b = prod(head), prod(tail)
    if a is None and b is None:
        raise OnnxError(f"{n.where()}: Flatten of {shape} with unknown dims on both sides")
    target = (-1 if a is None else a, -1 if b is None else b)
    if _is_static(x):
        return x.reshape(target)
    return ops.reshape(x, target)


def _imp_transpose(n, x):
    perm = n.attr("perm") or list(range(_rank(x)))[::-1]
    if _is_static(x):
        return np.transpose(x, perm)
    return ops.permute(x, tuple(int(p) for p in perm))


def _axes(n: _Node, axes_input: Any, ndim: int) -> list[int] | None:
    axes = n.attr("axes") if axes_input is None else _ints(axes_input, f"{n.where()}: axes")
    if axes is None:
        return None
    return sorted(int(a) % ndim for a in axes)


def _imp_squeeze(n, x, axes=None):
    shape = _shape(x)
    picked = _axes(n, axes, len(shape))
    if picked is None:
        picked = [i for i, d in enumerate(shape) if d == 1]
    if _is_static(x):
        return np.squeeze(x, axis=tuple(picked))
    index = tuple(0 if i in picked else slice(None) for i in range(len(shape)))
    return ops.getitem(x, index)


def _imp_unsqueeze(n, x, axes=None):
    out_rank = _rank(x) + len(n.attr("axes") if axes is None else _ints(axes, "axes"))
    picked = _axes(n, axes, out_rank)
    if _is_static(x):
        return np.expand_dims(x, tuple(picked))
    return ops.expand_dims(x, tuple(picked))


def _imp_concat(n, *args):
    axis = int(n.attr("axis"))
    values = [a for a in args if a is not None]
    if all(_is_static(a) for a in values):
        return np.concatenate(values, axis=axis)
    return ops.concatenate([_tensor(a) for a in values], axis=axis % _rank(values[0]))


def _imp_split(n, x, split=None):
    ndim = _rank(x)
    axis = int(n.attr("axis", 0)) % ndim
    size = _shape(x)[axis]
    sizes = _ints(split, "split") if split is not None else n.attr("split")
    if not sizes:
        parts = len(n.outputs)
        if size is None:
            raise OnnxError(f"{n.where()}: splitting an axis of unknown size")
        step = -(-size // parts)
        sizes = [min(step, size - i * step) for i in range(parts)]
    outs, start = [], 0
    for s in sizes:
        index = (slice(None),) * axis + (slice(start, start + s),)
        outs.append(x[index] if _is_static(x) else ops.getitem(x, index))
        start += s
    return outs


def _imp_slice(n, x, starts=None, ends=None, axes=None, steps=None):
    ndim = _rank(x)
    if starts is None:  # before opset 10: attributes
        starts_, ends_ = n.attr("starts"), n.attr("ends")
        axes_ = n.attr("axes") or list(range(len(starts_)))
        steps_ = [1] * len(starts_)
    else:
        starts_ = _ints(starts, "Slice starts")
        ends_ = _ints(ends, "Slice ends")
        axes_ = _ints(axes, "Slice axes") if axes is not None else list(range(len(starts_)))
        steps_ = _ints(steps, "Slice steps") if steps is not None else [1] * len(starts_)
    index = [slice(None)] * ndim
    for s, e, a, st in zip(starts_, ends_, axes_, steps_):
        index[a % ndim] = slice(s, e, st)
    if _is_static(x):
        return x[tuple(index)]
    return ops.getitem(x, tuple(index))


def _imp_gather_elements(n, data, indices):
    """GatherElements: take_along_axis (static indices with negative values wrap first)."""
    axis = int(n.attr("axis", 0))
    if not (isinstance(indices, Tensor) and indices._data is None):
        idx = np.asarray(_static(indices, "GatherElements indices")).astype(np.int64)
        size = _shape(data)[axis]
        if size is not None:
            idx = np.where(idx < 0, idx + size, idx)
        indices = Tensor(idx, requires_grad=False)
    return ops.take_along_axis(_tensor(data), indices, axis)


def _imp_gather(n, data, indices):
    axis = int(n.attr("axis", 0))
    ndim = _rank(data)
    axis %= ndim
    if isinstance(indices, Tensor) and indices._data is None:
        # indices with no values yet (a traced or declared graph): a take op, so the ids stay
        # an input of the graph (negative indices are refused there, not wrapped)
        return ops.take(_tensor(data), indices, axis)
    idx = np.asarray(_static(indices, "Gather indices")).astype(np.int64)
    size = _shape(data)[axis]
    if size is not None:
        idx = np.where(idx < 0, idx + size, idx)
    item = int(idx) if idx.ndim == 0 else idx
    index = (slice(None),) * axis + (item,)
    if _is_static(data):
        return np.asarray(data[index])
    return ops.getitem(_tensor(data), index)


def _imp_expand(n, x, shape):
    target = _ints(shape, f"{n.where()}: the shape")
    in_shape = _shape(x)
    rank = max(len(target), len(in_shape))
    target = [1] * (rank - len(target)) + target
    padded = [1] * (rank - len(in_shape)) + list(in_shape)
    out = []
    for t, d in zip(target, padded):
        if t is None:
            out.append(d)  # None: keeps the input's dim (needle's broadcast_to rule)
        elif t == 1:
            out.append(d)
        else:
            out.append(t)
    if _is_static(x) and None not in out:
        return np.broadcast_to(x, out).copy()
    return ops.broadcast_to(_tensor(x), tuple(out))


def _imp_pad(n, x, pads=None, value=None, axes=None):
    mode = n.attr("mode", "constant")
    pads = n.attr("pads") if pads is None else _ints(pads, "Pad pads")
    fill = n.attr("value", 0.0) if value is None else _static(value, "Pad value").item()
    ndim = _rank(x)
    picked = list(range(ndim)) if axes is None else [a % ndim for a in _ints(axes, "axes")]
    width = [(0, 0)] * ndim
    half = len(pads) // 2
    for k, a in enumerate(picked):
        width[a] = (int(pads[k]), int(pads[k + half]))
    x = _tensor(x)
    if mode != "constant":
        raise OnnxError(f"{n.where()}: Pad mode {mode!r} is not supported")
    if any(lo < 0 or hi < 0 for lo, hi in width):
        index = tuple(slice(max(-lo, 0), (hi if hi < 0 else None)) for lo, hi in width)
        x = ops.getitem(x, index)
        width = [(max(lo, 0), max(hi, 0)) for lo, hi in width]
    out = ops.pad(x, tuple(width))
    if fill:
        inside = ops.compare_scalar(ops.pad(ops.full_like(x, 1), tuple(width)), 0, "gt")
        out = ops.where(inside, out, _tensor(np.asarray(fill, dtype=x.dtype)))
    return out


def _imp_cast(n, x):
    dtype = helper.tensor_dtype_to_np_dtype(int(n.attr("to")))
    if _is_static(x):
        if x.dtype == object:
            if dtype.kind in "iu":
                return x  # shape values stay as they are
            raise OnnxError(f"{n.where()}: casting a shape with an unknown dimension")
        return x.astype(dtype)
    return ops.astype(x, dtype)


def _imp_where(n, cond, a, b):
    if all(_is_static(v) for v in (cond, a, b)):
        return np.where(cond, a, b)
    return ops.where(_tensor(cond), _tensor(a), _tensor(b))


def _compare(kind: str, np_fn: Callable) -> Callable:
    def run(n: _Node, a: Any, b: Any) -> Any:
        if _is_static(a) and _is_static(b):
            return _static_math(np_fn, a, b, n=n)
        return ops.compare(_tensor(a), _tensor(b), kind)

    return run


def _imp_not(n, x):
    if _is_static(x):
        return np.logical_not(x)
    return ops.compare_scalar(x, 0, "eq")


def _imp_constant(n):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in n.attrs:
            value = n.attrs[key]
            if key.startswith("value_float"):
                return np.asarray(value, dtype=np.float32)
            if key.startswith("value_int"):
                return np.asarray(value, dtype=np.int64)
            return np.asarray(value)
    raise OnnxError(f"{n.where()}: Constant without a supported value attribute")


def _fill_value(n: _Node) -> np.ndarray:
    value = n.attr("value")
    return np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)


def _imp_constant_of_shape(n, shape):
    value = _fill_value(n)
    dims = _ints(shape, f"{n.where()}: the shape")
    if any(d is None for d in dims):
        raise OnnxError(f"{n.where()}: a shape with an unknown dimension")
    return np.full(dims, value[0], dtype=value.dtype)


def _imp_range(n, start, limit, delta):
    first = _static(start, f"{n.where()}: start")
    return np.arange(first.item(), _static(limit, "limit").item(),
                     _static(delta, "delta").item(), dtype=first.dtype)


def _reduce(kind: str) -> Callable:
    def run(n: _Node, x: Any, axes_input: Any = None) -> Any:
        ndim = _rank(x)
        axes: Sequence[int] | None = _axes(n, axes_input, ndim)
        keep = bool(n.attr("keepdims", 1))
        if not axes:
            if n.attr("noop_with_empty_axes", 0):
                return x
            axes = list(range(ndim))
        if _is_static(x):
            fn: Any = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min,
                       "prod": np.prod}.get(kind)  # (NumPy's stubs type these unlike each other)
            if fn is not None:
                static_axes = tuple(axes)
                return _static_math(lambda a: fn(a, axis=static_axes, keepdims=keep), x, n=n)
        x = _tensor(x)
        axes = tuple(axes)
        if kind == "sum":
            return ops.summation(x, axes=axes, keepdims=keep)
        if kind == "mean":
            return ops.mean(x, axes=axes, keepdims=keep)
        if kind == "max":
            return ops.max(x, axes=axes, keepdims=keep)
        if kind == "min":
            return -ops.max(-x, axes=axes, keepdims=keep)
        if kind == "logsumexp":
            return ops.logsumexp(x, axes=axes, keepdims=keep)
        if kind == "sumsquare":
            return ops.summation(x * x, axes=axes, keepdims=keep)
        raise OnnxError(f"{n.where()}: {kind} reduction of a tensor is not supported")

    return run


#: ONNX op type -> function(node, *input values) -> value or list of values
IMPORTERS: dict[str, Callable] = {
    "Add": _imp_add, "Sub": _imp_sub, "Mul": _imp_mul, "Div": _imp_div, "Pow": _imp_pow,
    "Max": _fold(ops.maximum), "Min": _fold(_minimum), "Sum": _fold(lambda a, b: a + b),
    "Mean": _imp_mean,
    "Neg": _unary(ops.negate), "Abs": _unary(ops.abs), "Exp": _unary(ops.exp),
    "Log": _unary(ops.log), "Sqrt": _unary(ops.sqrt), "Erf": _unary(ops.erf),
    "Relu": _unary(ops.relu), "Sigmoid": _unary(ops.sigmoid), "Tanh": _unary(ops.tanh),
    "Sign": _unary(ops.sign), "Reciprocal": _imp_reciprocal, "LeakyRelu": _imp_leaky_relu,
    "Gelu": _imp_gelu, "Clip": _imp_clip, "Identity": _imp_identity, "Dropout": _imp_identity,
    "MatMul": _imp_matmul, "Gemm": _imp_gemm,
    "Conv": _imp_conv, "MaxPool": _imp_max_pool, "AveragePool": _imp_average_pool,
    "GlobalAveragePool": _imp_global_average_pool, "GlobalMaxPool": _imp_global_max_pool,
    "BatchNormalization": _imp_batch_norm, "LayerNormalization": _imp_layer_norm,
    "Softmax": _softmax("softmax"), "LogSoftmax": _softmax("logsoftmax"),
    "Shape": _imp_shape, "Size": _imp_size, "Reshape": _imp_reshape, "Flatten": _imp_flatten,
    "Transpose": _imp_transpose, "Squeeze": _imp_squeeze, "Unsqueeze": _imp_unsqueeze,
    "Concat": _imp_concat, "Split": _imp_split, "Slice": _imp_slice, "Gather": _imp_gather,
    "GatherElements": _imp_gather_elements,
    "Expand": _imp_expand, "Pad": _imp_pad, "Cast": _imp_cast, "Where": _imp_where,
    "Equal": _compare("eq", np.equal), "Less": _compare("lt", np.less),
    "LessOrEqual": _compare("le", np.less_equal), "Greater": _compare("gt", np.greater),
    "GreaterOrEqual": _compare("ge", np.greater_equal), "Not": _imp_not,
    "Constant": _imp_constant, "ConstantOfShape": _imp_constant_of_shape,
    "Range": _imp_range,
    "ReduceSum": _reduce("sum"), "ReduceMean": _reduce("mean"), "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"), "ReduceProd": _reduce("prod"),
    "ReduceLogSumExp": _reduce("logsumexp"), "ReduceSumSquare": _reduce("sumsquare"),
}

#: input positions whose values are static by nature: float initializers read only there
#: stay NumPy constants instead of becoming Parameters
_STATIC_INPUTS = {
    "Pow": (1,), "Clip": (1, 2), "Pad": (1, 2, 3), "Reshape": (1,), "Expand": (1,),
    "Slice": (1, 2, 3, 4), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "Gather": (1,),
    "ConstantOfShape": (0,), "Range": (0, 1, 2), "ReduceSum": (1,), "ReduceMean": (1,),
    "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,), "ReduceLogSumExp": (1,),
    "ReduceSumSquare": (1,),
}


def _check_node(node: onnx.NodeProto, attrs: dict, opset: int) -> str | None:
    """Why needle cannot run this node as configured (None when it can)."""
    op = node.op_type
    if op == "Conv":
        k = attrs.get("kernel_shape")
        if k is not None and len(k) != 2:
            return f"{len(k)}-d convolution (only 2-d)"
    if op in ("MaxPool", "AveragePool"):
        k = attrs.get("kernel_shape")
        if k is None or len(k) != 2:
            return "pooling that is not 2-d"
        if any(d != 1 for d in attrs.get("dilations", [1, 1])):
            return "dilated pooling"
        if op == "MaxPool" and len([o for o in node.output if o]) > 1:
            return "MaxPool with an Indices output"
    if op == "BatchNormalization":
        if attrs.get("training_mode", 0):
            return "BatchNormalization in training mode"
        if len([o for o in node.output if o]) > 1:
            return "BatchNormalization with running-statistics outputs"
    if op == "LayerNormalization" and len([o for o in node.output if o]) > 1:
        return "LayerNormalization with Mean/InvStdDev outputs"
    if op == "Dropout" and len([o for o in node.output if o]) > 1:
        return "Dropout with a mask output"
    if op == "Pad" and attrs.get("mode", "constant") != "constant":
        return f"Pad mode {attrs['mode']!r}"
    return None


# -- loading and checking ----------------------------------------------------------------------
def _load(path_or_proto: Any) -> onnx.ModelProto:
    if isinstance(path_or_proto, onnx.ModelProto):
        return path_or_proto
    what = "the given bytes"
    try:
        if isinstance(path_or_proto, bytes | bytearray):
            model = onnx.ModelProto()
            model.ParseFromString(bytes(path_or_proto))
        else:
            what = os.fspath(path_or_proto)
            model = onnx.load(what)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise OnnxError(f"cannot read an ONNX model from {what}: the file is truncated or "
                        f"not an ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.HasField("graph") or not (model.graph.node or model.graph.output):
        raise OnnxError(f"{what} holds no ONNX graph (an empty, truncated or foreign file)")
    return model


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def _label(node: onnx.NodeProto, i: int) -> str:
    return f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node #{i}"


def _check_graph(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes in an order that runs, after every check; OnnxError lists each problem."""
    graph = model.graph
    opset = _opset(model)
    problems = []
    for i, node in enumerate(graph.node):
        label = _label(node, i)
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"  {label}: domain {node.domain!r}")
        elif node.op_type not in IMPORTERS:
            problems.append(f"  {label}")
        else:
            why = _check_node(node, _attributes(node), opset)
            if why:
                problems.append(f"  {label}: {why}")
    if problems:
        raise OnnxError(f"the ONNX model uses {len(problems)} node(s) needle cannot run "
                        f"(supported: {', '.join(sorted(IMPORTERS))}):\n" + "\n".join(problems))
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    producers: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if out and (out in producers or out in known):
                problems.append(f"  value {out!r} is written twice (by {_label(node, i)})")
            producers[out] = i
    for i, node in enumerate(graph.node):
        missing = [x for x in node.input if x and x not in known and x not in producers]
        if missing:
            problems.append(f"  {_label(node, i)} reads {missing}")
    for out in graph.output:
        if out.name not in known and out.name not in producers:
            problems.append(f"  graph output {out.name!r} is never computed")
    if problems:
        raise OnnxError("the ONNX graph reads values that do not exist or writes one twice:\n"
                        + "\n".join(problems))
    order = _topological(graph, producers)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise OnnxError(f"the ONNX model fails onnx.checker: {exc}") from None
    return order


def _topological(graph: Any, producers: dict[str, int]) -> list[onnx.NodeProto]:
    """Kahn's order of the nodes; an OnnxError naming the nodes on a cycle."""
    nodes = list(graph.node)
    waiting = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        deps = {producers[x] for x in node.input if x in producers}
        waiting[i] = len(deps)
        for j in deps:
            users[j].append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    order = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for j in users[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    if len(order) != len(nodes):
        stuck = {i for i in range(len(nodes)) if waiting[i] > 0}
        trimmed = True
        while trimmed:  # drop the nodes that only wait downstream of a cycle
            trimmed = False
            for i in list(stuck):
                if not any(j in stuck for j in users[i]):
                    stuck.discard(i)
                    trimmed = True
        labels = [_label(nodes[i], i) for i in sorted(stuck)]
        raise OnnxError("the ONNX graph has a cycle; these nodes wait on each other: "
                        + ", ".join(labels))
    return [nodes[i] for i in order]


# -- the module --------------------------------------------------------------------------------
class OnnxModule(nn.Module):
    """An ONNX graph as an ``nn.Module``: ``forward(*inputs)`` runs needle ops node by node.

    ``initializers`` maps ONNX initializer names to Parameters (trained) and Buffers (state);
    ``input_names`` / ``output_names`` are the graph's. One output is returned as a Tensor,
    several as a tuple.
    """

    def __init__(self, nodes: tuple, initializers: dict, statics: dict, inputs: list,
                 outputs: list, opset: int) -> None:
        super().__init__()
        self.initializers = initializers
        self._statics = statics
        self._nodes = nodes
        self._inputs = inputs  # (name, NumPy dtype or None)
        self.input_names = [name for name, _ in inputs]
        self.output_names = list(outputs)
        self.opset = opset

    def forward(self, *inputs: Any) -> Any:
        if len(inputs) != len(self._inputs):
            raise TypeError(f"OnnxModule: the graph takes {len(self._inputs)} inputs "
                            f"({', '.join(self.input_names)}), got {len(inputs)}")
        env: dict[str, Any] = dict(self._statics)
        env.update(self.initializers)
        for (name, dtype), value in zip(self._inputs, inputs):
            if not isinstance(value, Tensor):
                array = np.asarray(value)
                value = Tensor(array if dtype is None else array.astype(dtype, copy=False),
                               requires_grad=False)
            env[name] = value
        shape_of: dict[str, Tensor] = {}  # Shape outputs -> the tensor they measure
        for node in self._nodes:
            args = [env[x] if x else None for x in node.inputs]
            while args and args[-1] is None:
                args.pop()
            try:
                if node.op_type == "ConstantOfShape" and node.inputs[0] in shape_of:
                    # ConstantOfShape(Shape(x)) is full_like(x): fine for unknown batch sizes
                    value = _fill_value(node)
                    out = ops.full_like(shape_of[node.inputs[0]], value[0].item(),
                                        dtype=value.dtype)
                else:
                    out = IMPORTERS[node.op_type](node, *args)
            except OnnxError:
                raise
            except Exception as exc:
                shapes = [None if a is None else _shape(a) for a in args]
                raise OnnxError(f"{node.where()} failed on inputs of shapes {shapes}: "
                                f"{type(exc).__name__}: {exc}") from exc
            if node.op_type == "Shape" and isinstance(args[0], Tensor) and not node.attrs:
                shape_of[node.outputs[0]] = args[0]
            outs = out if isinstance(out, list) else [out]
            for name, value in zip(node.outputs, outs):
                if name:
                    env[name] = value
        results = [_tensor(env[name]) for name in self.output_names]
        return results[0] if len(results) == 1 else tuple(results)

    def extra_repr(self) -> str:
        return (f"inputs={self.input_names}, outputs={self.output_names}, "
                f"nodes={len(self._nodes)}, opset={self.opset}")


def import_model(path_or_proto: Any) -> OnnxModule:
    """See ``needle.onnx.import_model``."""
    model = _load(path_or_proto)
    order = _check_graph(model)
    graph = model.graph
    opset = _opset(model)
    # run only what the outputs need
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(order):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(x for x in node.input if x)
    kept.reverse()
    buffers: set[str] = set()
    for prop in model.metadata_props:
        if prop.key == BUFFERS_KEY:
            buffers.update(n for n in prop.value.split(",") if n)
    static_uses: dict[str, bool] = {}
    for node in kept:
        static_positions = _STATIC_INPUTS.get(node.op_type, ())
        for pos, name in enumerate(node.input):
            if not name:
                continue
            static_uses[name] = static_uses.get(name, True) and pos in static_positions
        if node.op_type == "BatchNormalization":
            buffers.update(x for x in node.input[3:5] if x)
    initializers: dict[str, Tensor] = {}
    statics: dict[str, np.ndarray] = {}
    for tensor in graph.initializer:
        if tensor.name not in needed:
            continue
        array = numpy_helper.to_array(tensor).copy()
        if array.dtype.kind != "f" or array.ndim == 0 or static_uses.get(tensor.name, False):
            statics[tensor.name] = array
        elif tensor.name in buffers:
            initializers[tensor.name] = nn.Buffer(array, dtype=array.dtype)
        else:
            initializers[tensor.name] = nn.Parameter(array, dtype=array.dtype)
    nodes = []
    for i, node in enumerate(kept):
        nodes.append(_Node(node.op_type, node.name or f"{node.op_type}_{i}", tuple(node.input),
                           tuple(node.output), _attributes(node), opset))
    init_names = {t.name for t in graph.initializer}
    inputs = []
    for value in graph.input:
        if value.name in init_names:
            continue
        elem = value.type.tensor_type.elem_type
        dtype = helper.tensor_dtype_to_np_dtype(elem) if elem else None
        inputs.append((value.name, dtype))
    return OnnxModule(tuple(nodes), initializers, statics, inputs,
                      [o.name for o in graph.output], opset)


__all__ = ["IMPORTERS", "OnnxModule", "import_model"]
