"""The built-in Caffe layers, each a TensorLayer: forward written with needle ops (mostly the
``needle.nn`` modules' own), backward by autodiff, top shapes from the ops' shape rules.

Parameter layouts follow needle, not Caffe, where the two differ (documented per layer):
InnerProduct's weight is (in, out) and Convolution's (k, k, C_in, C_out).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import nn, ops
from ..autograd import Tensor
from .layer import Layer, TensorLayer, register_layer

__all__ = [
    "Accuracy", "BatchNorm", "Concat", "Convolution", "Dropout", "Eltwise", "EuclideanLoss",
    "Flatten", "InnerProduct", "MemoryData", "Pooling", "ReLU", "Scale", "Sigmoid", "Softmax",
    "SoftmaxWithLoss", "Split", "TanH",
]


def _axis(axis: int, ndim: int, layer: Layer) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{layer.type} {layer.name!r}: axis {axis} is out of range for a "
                         f"{ndim}-d bottom")
    return axis % ndim


def _known(dim: Any, layer: Layer, what: str) -> int:
    if dim is None:
        raise ValueError(f"{layer.type} {layer.name!r}: {what} must be known to set up the "
                         "layer's parameters")
    return int(dim)


def _channel_view(t: Tensor, ndim: int, axis: int) -> Tensor:
    """A per-channel (C,) tensor shaped to broadcast along ``axis`` of an ``ndim``-d input."""
    shape = [1] * ndim
    shape[axis] = t.shape[0]
    return ops.reshape(t, tuple(shape))


# -- vision -------------------------------------------------------------------------------------
@register_layer("InnerProduct")
class InnerProduct(TensorLayer):
    """Fully connected: y = flatten(x, axis) @ W + b (needle's Linear ops).

    The bottom's dims from ``axis`` on are flattened into the input features (Caffe's rule;
    ``axis=-1`` acts on the last dim like ``nn.Linear``). Params: ``weight`` (in, out) (needle's
    layout; Caffe stores (out, in)), ``bias`` (out,). Default fillers draw like ``nn.Linear``
    (weight ``kaiming_uniform(in, out)``, then bias ``kaiming_uniform(out, 1)``).
    """

    def __init__(self, num_output: int, bias_term: bool = True, axis: int = 1,
                 weight_filler: dict | None = None, bias_filler: dict | None = None,
                 name: str | None = None) -> None:
        super().__init__(name)
        self.num_output = int(num_output)
        self.bias_term = bool(bias_term)
        self.axis = int(axis)
        self.weight_filler = weight_filler
        self.bias_filler = bias_filler

    def setup(self, bottom_shapes: list[tuple]) -> None:
        shape = bottom_shapes[0]
        axis = _axis(self.axis, len(shape), self)
        fan_in = 1
        for d in shape[axis:]:
            fan_in *= _known(d, self, "the feature dims of the bottom")
        out = self.num_output
        self.add_param("weight", (fan_in, out), self.weight_filler,
                       {"type": "kaiming_uniform"}, fan_in, out)
        if self.bias_term:
            self.add_param("bias", (out,), self.bias_filler, {"type": "kaiming_uniform"}, out, 1)

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        x = bottom[0]
        axis = _axis(self.axis, len(x.shape), self)
        lead = tuple(-1 if d is None else d for d in x.shape[:axis])
        fan_in = params[0].shape[0]
        flat = x if len(x.shape) == 2 and axis == 1 else ops.reshape(x, (-1, fan_in))
        y = ops.matmul(flat, params[0])
        if self.bias_term:
            y = y + params[1]
        if len(lead) != 1:
            y = ops.reshape(y, (*lead, self.num_output))
        return [y]


@register_layer("Convolution")
class Convolution(TensorLayer):
    """2-D convolution of NCHW input (Caffe's layout): needle's ``conv`` op on NHWC views.

    ``num_output`` filters of ``kernel_size`` x ``kernel_size``, ``stride``, symmetric zero
    ``pad``; output (N, num_output, (H + 2 pad - k) // stride + 1, ...). Params: ``weight``
    (k, k, C_in, C_out) (needle's layout; Caffe's is (C_out, C_in, k, k)), ``bias`` (C_out,).
    Default fillers draw like ``nn.Conv``.
    """

    def __init__(self, num_output: int, kernel_size: int, stride: int = 1, pad: int = 0,
                 bias_term: bool = True, weight_filler: dict | None = None,
                 bias_filler: dict | None = None, name: str | None = None) -> None:
        super().__init__(name)
        self.num_output = int(num_output)
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)
        self.pad = int(pad)
        self.bias_term = bool(bias_term)
        self.weight_filler = weight_filler
        self.bias_filler = bias_filler

    def setup(self, bottom_shapes: list[tuple]) -> None:
        shape = bottom_shapes[0]
        if len(shape) != 4:
            raise ValueError(f"Convolution {self.name!r}: expected an NCHW bottom, got shape "
                             f"{tuple(shape)}")
        c_in = _known(shape[1], self, "the channel count")
        k, out = self.kernel_size, self.num_output
        fan_in = c_in * k * k
        self.add_param("weight", (k, k, c_in, out), self.weight_filler,
                       {"type": "kaiming_uniform"}, fan_in, out * k * k)
        if self.bias_term:
            bound = 1.0 / math.sqrt(fan_in)
            self.add_param("bias", (out,), self.bias_filler,
                           {"type": "uniform", "min": -bound, "max": bound}, fan_in, out)

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        x = ops.permute(bottom[0], (0, 2, 3, 1))
        if self.bias_term:  # the bias added where the conv writes its output
            y = ops.conv_bias(x, params[0], params[1], stride=self.stride, padding=self.pad)
        else:
            y = ops.conv(x, params[0], stride=self.stride, padding=self.pad)
        return [ops.permute(y, (0, 3, 1, 2))]


@register_layer("Pooling")
class Pooling(TensorLayer):
    """Max or average pooling of NCHW input over k x k windows (``nn.MaxPool2d`` /
    ``nn.AvgPool2d``'s ops).

    ``pool`` is ``"MAX"`` or ``"AVE"``; ``stride`` defaults to 1 as in Caffe. The output size is
    (H - k) // stride + 1 (floor; Caffe rounds up). ``global_pooling=True`` pools all of H x W
    into (N, C, 1, 1). No padding.
    """

    def __init__(self, pool: str = "MAX", kernel_size: int | None = None, stride: int = 1,
                 global_pooling: bool = False, name: str | None = None) -> None:
        super().__init__(name)
        kind = str(pool).upper()
        aliases = {"MAX": "MAX", "AVE": "AVE", "AVG": "AVE", "AVERAGE": "AVE", "MEAN": "AVE"}
        if kind not in aliases:
            raise ValueError(f"Pooling {self.name!r}: pool must be MAX or AVE, got {pool!r}")
        self.pool = aliases[kind]
        self.global_pooling = bool(global_pooling)
        if kernel_size is None and not self.global_pooling:
            raise ValueError(f"Pooling {self.name!r}: give kernel_size (or global_pooling)")
        if not self.global_pooling:
            assert kernel_size is not None  # (checked above)
            cls = nn.MaxPool2d if self.pool == "MAX" else nn.AvgPool2d
            self.module = cls(int(kernel_size), int(stride))

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        x = bottom[0]
        if self.global_pooling:
            reduce = ops.max if self.pool == "MAX" else ops.mean
            return [reduce(x, axes=(2, 3), keepdims=True)]
        return [self.module(x)]


# -- activations --------------------------------------------------------------------------------
@register_layer("ReLU")
class ReLU(TensorLayer):
    """y = max(x, 0), or with ``negative_slope`` s: y = max(x, s x) (0 <= s < 1)."""

    def __init__(self, negative_slope: float = 0.0, name: str | None = None) -> None:
        super().__init__(name)
        self.negative_slope = float(negative_slope)

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        x = bottom[0]
        if self.negative_slope:
            return [ops.maximum(x, x * self.negative_slope)]
        return [ops.relu(x)]


@register_layer("Sigmoid")
class Sigmoid(TensorLayer):
    """y = 1 / (1 + exp(-x))."""

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        return [ops.sigmoid(bottom[0])]


@register_layer("TanH")
class TanH(TensorLayer):
    """y = tanh(x)."""

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        return [ops.tanh(bottom[0])]


@register_layer("Softmax")
class Softmax(TensorLayer):
    """y = exp(x) / sum(exp(x)) along ``axis`` (default 1, the channels)."""

    def __init__(self, axis: int = 1, name: str | None = None) -> None:
        super().__init__(name)
        self.axis = int(axis)

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        return [ops.softmax(bottom[0], axis=self.axis)]


@register_layer("Dropout")
class Dropout(TensorLayer):
    """Training: y = x * mask / (1 - ratio) with mask ~ Bernoulli(1 - ratio) (``nn.Dropout``'s
    ops, one draw from NumPy's global RNG); test phase: y = x."""

    def __init__(self, dropout_ratio: float = 0.5, name: str | None = None) -> None:
        super().__init__(name)
        if not 0.0 <= dropout_ratio <= 1.0:
            raise ValueError(f"Dropout {self.name!r}: dropout_ratio must lie in [0, 1], got "
                             f"{dropout_ratio}")
        self.module = nn.Dropout(float(dropout_ratio))

    @property
    def dropout_ratio(self) -> float:
        return self.module.p

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        self.module.training = self.training
        return [self.module(bottom[0])]


# -- normalization ------------------------------------------------------------------------------
@register_layer("BatchNorm")
class BatchNorm(TensorLayer):
    """y = (x - mean) / sqrt(var + eps) per channel (axis 1), with Caffe's three blobs.

    Training normalizes with the batch mean and biased variance (over every axis but 1) and
    accumulates Caffe's statistics: ``scale_factor = f * scale_factor + 1``,
    ``mean = f * mean + batch_mean``, ``variance = f * variance + m / (m - 1) * batch_var``
    (f = ``moving_average_fraction``, m = values per channel). The test phase (or
    ``use_global_stats=True``) normalizes with ``mean / scale_factor`` and
    ``variance / scale_factor``. The blobs have lr_mult 0: solvers never change them.
    Learned scale and shift come from a following ``Scale`` layer (``bias_term: true``).
    """

    def __init__(self, use_global_stats: bool | None = None,
                 moving_average_fraction: float = 0.999, eps: float = 1e-5,
                 name: str | None = None) -> None:
        super().__init__(name)
        self.use_global_stats = use_global_stats
        self.moving_average_fraction = float(moving_average_fraction)
        self.eps = float(eps)

    def setup(self, bottom_shapes: list[tuple]) -> None:
        shape = bottom_shapes[0]
        if len(shape) < 2:
            raise ValueError(f"BatchNorm {self.name!r}: expected a (N, C, ...) bottom, got "
                             f"shape {tuple(shape)}")
        c = _known(shape[1], self, "the channel count")
        zero = {"type": "constant", "value": 0.0}
        for name, size in (("mean", c), ("variance", c), ("scale_factor", 1)):
            self.add_param(name, (size,), None, zero, lr_mult=0.0, decay_mult=0.0)

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        x = bottom[0]
        ndim = len(x.shape)
        axes = tuple(i for i in range(ndim) if i != 1)
        use_global = (not self.training) if self.use_global_stats is None \
            else self.use_global_stats
        if use_global:
            factor = float(self.params[2].data[0]) if self.params[2].data is not None else 0.0
            factor = 0.0 if factor == 0.0 else 1.0 / factor
            centered = x - _channel_view(params[0] * factor, ndim, 1)
            var = _channel_view(params[1] * factor, ndim, 1)
        else:
            mean = ops.mean(x, axes=axes, keepdims=True)
            centered = x - mean
            var = ops.mean(centered * centered, axes=axes, keepdims=True)
            self._accumulate(mean, var, x.shape)
        return [centered / ops.sqrt(var + self.eps)]

    def _accumulate(self, mean: Tensor, var: Tensor, shape: tuple) -> None:
        """Caffe's running sums, in place on the blobs' arrays (no graph)."""
        if mean._data is None:
            return  # shape inference: no values yet
        m = int(np.prod(shape)) // int(shape[1])
        f = self.moving_average_fraction
        mean_blob, var_blob, factor_blob = (b.data for b in self.params)
        correction = m / (m - 1) if m > 1 else 1.0
        factor_blob *= f
        factor_blob += 1
        mean_blob *= f
        mean_blob += mean._data.reshape(-1)
        var_blob *= f
        var_blob += correction * var._data.reshape(-1)


@register_layer("Scale")
class Scale(TensorLayer):
    """y = x * scale (+ bias), scale and bias per channel along ``axis`` (default 1).

    With one bottom, ``scale`` (C,) is a parameter (filler default constant 1) and
    ``bias_term`` adds a learned ``bias`` (C,) (default 0); with two bottoms the second is the
    scale (shape (C,)). After ``BatchNorm`` this gives ``nn.BatchNorm1d``'s weight and bias.
    """

    bottom_count = (1, 2)

    def __init__(self, axis: int = 1, bias_term: bool = False, filler: dict | None = None,
                 bias_filler: dict | None = None, name: str | None = None) -> None:
        super().__init__(name)
        self.axis = int(axis)
        self.bias_term = bool(bias_term)
        self.filler = filler
        self.bias_filler = bias_filler

    def setup(self, bottom_shapes: list[tuple]) -> None:
        shape = bottom_shapes[0]
        c = _known(shape[_axis(self.axis, len(shape), self)], self, "the scaled axis")
        if len(bottom_shapes) == 1:
            self.add_param("scale", (c,), self.filler, {"type": "constant", "value": 1.0})
        if self.bias_term:
            self.add_param("bias", (c,), self.bias_filler, {"type": "constant", "value": 0.0})

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        x = bottom[0]
        ndim = len(x.shape)
        axis = _axis(self.axis, ndim, self)
        scale = bottom[1] if len(bottom) == 2 else params[0]
        y = _channel_view(scale, ndim, axis) * x
        if self.bias_term:
            y = y + _channel_view(params[-1], ndim, axis)
        return [y]


# -- losses -------------------------------------------------------------------------------------
@register_layer("SoftmaxWithLoss")
class SoftmaxWithLoss(TensorLayer):
    """Mean over the batch of -log softmax(x)[label] (``nn.SoftmaxLoss``'s ops); top: a scalar.

    Bottoms: scores (N, C) and labels (N,) (or (N, 1, ...)), class ids as ints or whole
    floats. The labels get no diff.
    """

    bottom_count = (2, 2)
    is_loss = True

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.loss = nn.SoftmaxLoss()

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        scores, label = bottom
        n = scores.shape[0]
        if len(label.shape) != 1:
            label = ops.reshape(label, (-1 if n is None else n,))
        return [self.loss(scores, label)]


@register_layer("EuclideanLoss")
class EuclideanLoss(TensorLayer):
    """loss = sum((a - b)^2) / (2 N), N the batch size (Caffe's definition)."""

    bottom_count = (2, 2)
    is_loss = True

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        a, b = bottom
        d = a - b
        n = a.shape[0]
        return [ops.summation(d * d) / (2.0 * (1 if n is None else n))]


@register_layer("Accuracy")
class Accuracy(Layer):
    """Fraction of rows whose highest score is the label (no backward): top a scalar.

    Bottoms: scores (N, C) and labels (N,). ``top_k`` counts a hit when the label is among
    the k highest scores.
    """

    bottom_count = (2, 2)
    differentiable = False

    def __init__(self, top_k: int = 1, name: str | None = None) -> None:
        super().__init__(name)
        self.top_k = int(top_k)

    def reshape(self, bottom_shapes: list[tuple]) -> list[tuple]:
        return [()]

    def forward(self, bottom: list) -> list:
        scores, label = bottom
        label = np.asarray(label).reshape(-1).astype(np.int64)
        if self.top_k == 1:
            hit = np.argmax(scores, axis=1) == label
        else:
            best = np.argsort(-scores, axis=1)[:, :self.top_k]
            hit = (best == label[:, None]).any(axis=1)
        return [np.asarray(hit.mean(), dtype=scores.dtype)]

    def backward(self, top_diff: list, propagate_down: list[bool]) -> list:
        return [None, None]


# -- wiring -------------------------------------------------------------------------------------
@register_layer("Flatten")
class Flatten(TensorLayer):
    """Merge dims ``axis`` .. ``end_axis`` into one: (N, C, H, W) -> (N, C*H*W) by default."""

    def __init__(self, axis: int = 1, end_axis: int = -1, name: str | None = None) -> None:
        super().__init__(name)
        self.axis = int(axis)
        self.end_axis = int(end_axis)

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        x = bottom[0]
        shape = tuple(x.shape)
        start, end = _axis(self.axis, len(shape), self), _axis(self.end_axis, len(shape), self)
        middle = 1
        for d in shape[start:end + 1]:
            if d is None:
                middle = -1
                break
            middle *= d
        rest = [(-1 if d is None else d) for d in (*shape[:start], middle, *shape[end + 1:])]
        if rest.count(-1) > 1:
            raise ValueError(f"Flatten {self.name!r}: more than one unknown dim in {shape}")
        return [ops.reshape(x, tuple(rest))]


@register_layer("Eltwise")
class Eltwise(TensorLayer):
    """Elementwise SUM (optionally weighted by ``coeff``), PROD or MAX of all bottoms (one
    shape). SUM of a block's output and its input is a residual connection."""

    bottom_count = (2, None)

    def __init__(self, operation: str = "SUM", coeff: list | None = None,
                 name: str | None = None) -> None:
        super().__init__(name)
        operation = str(operation).upper()
        if operation not in ("SUM", "PROD", "MAX"):
            raise ValueError(f"Eltwise {self.name!r}: operation must be SUM, PROD or MAX, got "
                             f"{operation!r}")
        if coeff is not None and operation != "SUM":
            raise ValueError(f"Eltwise {self.name!r}: coeff applies to SUM only")
        self.operation = operation
        self.coeff = None if coeff is None else [float(c) for c in coeff]

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        shapes = {tuple(b.shape) for b in bottom}
        if len(shapes) > 1:
            raise ValueError(f"Eltwise {self.name!r}: bottoms must have one shape, got "
                             f"{[tuple(b.shape) for b in bottom]}")
        if self.coeff is not None and len(self.coeff) != len(bottom):
            raise ValueError(f"Eltwise {self.name!r}: {len(self.coeff)} coeffs for "
                             f"{len(bottom)} bottoms")
        terms = bottom
        if self.coeff is not None:
            terms = [b if c == 1.0 else b * c for b, c in zip(bottom, self.coeff)]
        out = terms[0]
        for t in terms[1:]:
            if self.operation == "SUM":
                out = out + t
            elif self.operation == "PROD":
                out = out * t
            else:
                out = ops.maximum(out, t)
        return [out]


@register_layer("Concat")
class Concat(TensorLayer):
    """Bottoms joined along ``axis`` (default 1) with ``ops.concatenate``; its backward hands
    each bottom its slice of the top's diff."""

    bottom_count = (1, None)

    def __init__(self, axis: int = 1, name: str | None = None) -> None:
        super().__init__(name)
        self.axis = int(axis)

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        axis = _axis(self.axis, len(bottom[0].shape), self)
        try:
            return [ops.concatenate(list(bottom), axis)]
        except ValueError as exc:  # ShapeError: name the layer too
            raise ValueError(f"Concat {self.name!r}: {exc}") from None


@register_layer("Split")
class Split(TensorLayer):
    """Copies of one bottom for several consumers; the bottom's diff is the sum of the tops'.
    (A Net sums the diffs of a blob read by several layers by itself, so Split is optional.)"""

    top_count = (1, None)

    def reshape(self, bottom_shapes: list[tuple]) -> list[tuple]:
        return [tuple(bottom_shapes[0])] * (self.num_tops or 1)

    def compute(self, bottom: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        return [bottom[0]] * (self.num_tops or 1)


# -- data ---------------------------------------------------------------------------------------
@register_layer("MemoryData")
class MemoryData(Layer):
    """Batches of ``batch_size`` from data held in memory; no bottoms, one top per array.

    ``source`` is a tuple of arrays of one length (e.g. ``(images, labels)``) or a needle
    Dataset (``ds[index_array]`` gives a batch tuple, transforms applied). Each epoch visits
    the items in a fresh random order (``shuffle``, from its own generator seeded by ``seed``)
    and batches wrap around into the next epoch, so every batch is full (Caffe's behaviour).
    Float arrays come out in the layer's dtype. Python specs only (JSON cannot hold arrays).
    """

    bottom_count = (0, 0)
    top_count = (1, None)
    differentiable = False

    def __init__(self, source: Any, batch_size: int, shuffle: bool = True, seed: int = 0,
                 name: str | None = None) -> None:
        super().__init__(name)
        if isinstance(source, tuple | list):
            arrays = [np.asarray(a) for a in source]
            if len({len(a) for a in arrays}) != 1:
                raise ValueError(f"MemoryData {self.name!r}: the arrays have different lengths "
                                 f"{[len(a) for a in arrays]}")
            self._length = len(arrays[0])
            self._take = lambda idx: tuple(a[idx] for a in arrays)
        else:
            self._length = len(source)
            self._take = lambda idx: tuple(source[idx])
        if not 0 < batch_size:
            raise ValueError(f"MemoryData {self.name!r}: batch_size must be positive")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self._rng = np.random.default_rng(seed)
        self._order = np.zeros(0, np.int64)

    def _next_indices(self) -> np.ndarray:
        while len(self._order) < self.batch_size:
            epoch = (self._rng.permutation(self._length) if self.shuffle
                     else np.arange(self._length))
            self._order = np.concatenate([self._order, epoch])
        idx, self._order = self._order[:self.batch_size], self._order[self.batch_size:]
        return idx

    def _cast(self, arrays: tuple) -> list:
        return [a.astype(self.dtype, copy=False) if a.dtype.kind == "f" else a for a in arrays]

    def reshape(self, bottom_shapes: list[tuple]) -> list[tuple]:
        sample = self._take(np.arange(min(self.batch_size, self._length)))
        return [(self.batch_size, *np.shape(a)[1:]) for a in sample]

    def forward(self, bottom: list) -> list:
        return self._cast(self._take(self._next_indices()))

    def backward(self, top_diff: list, propagate_down: list[bool]) -> list:
        return []
