"""Bridges to the module world: a Layer as an ``nn.Module`` (``as_module``) and an
``nn.Sequential``-style model lowered into a Net (``lower_module`` / ``Net.from_module``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import nn
from ..autograd import Tensor, enable_grad, no_grad
from ..function import Function, FunctionCtx
from .layer import Layer, _abstract
from .net import Net

__all__ = ["LayerModule", "as_module", "lower_module"]


class _LayerFunction(Function):
    """A Layer as a custom Function: forward is the layer's forward, backward its backward.

    ``apply(layer, n_bottom, *bottoms, *params)``: the parameter Tensors are inputs too (their
    arrays become the blobs' data), so autodiff hands their gradients to the optimizer.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, layer: Layer, n_bottom: int, *arrays: Any) -> Any:
        bottom, params = list(arrays[:n_bottom]), arrays[n_bottom:]
        for blob, array in zip(layer.params, params):
            if blob.data is not array:  # the Parameter's array (replaced by load_state_dict)
                blob.data = array
        needs = list(ctx.needs_input_grad[2:2 + n_bottom]) or [False] * n_bottom
        layer.needs_backward = any(ctx.needs_input_grad)
        layer.bottom_needs_diff = needs
        layer.reshape([b.shape for b in bottom])
        with enable_grad():
            tops = layer.forward(bottom)
        # the layer keeps one forward's state: remember which call it belongs to
        token = object()
        layer._bridge_token = token
        ctx.token, ctx.layer, ctx.n_bottom, ctx.arrays = token, layer, n_bottom, arrays
        return tops[0] if len(tops) == 1 else tuple(tops)

    @staticmethod
    def backward(ctx: FunctionCtx, *top_diff: Any) -> tuple:
        layer, n = ctx.layer, ctx.n_bottom
        if getattr(layer, "_bridge_token", None) is not ctx.token:
            # the layer ran another forward since: restore this call's state first
            _LayerFunction.forward(ctx, layer, n, *ctx.arrays)
        saved = [blob._diff for blob in layer.params]
        for blob in layer.params:
            blob.diff = np.zeros_like(blob.data)
        needs = list(ctx.needs_input_grad[2:2 + n])
        bottom_diff = layer.backward(list(top_diff), needs)
        param_grads = [blob.diff for blob in layer.params]
        for blob, diff in zip(layer.params, saved):
            blob.diff = diff
        return (None, None, *bottom_diff, *param_grads)

    @staticmethod
    def shape(layer: Layer, n_bottom: int, *shapes: tuple) -> Any:
        tops = layer.reshape([tuple(s) for s in shapes[:n_bottom]])
        return tuple(tops[0]) if len(tops) == 1 else [tuple(t) for t in tops]


class LayerModule(nn.Module):
    """An ``nn.Module`` running a caffe Layer; its gradient is the layer's own backward.

    Trainable parameter blobs (lr_mult != 0) appear as ``nn.Parameter``s and frozen ones
    (BatchNorm's statistics) as ``nn.Buffer``s, named after the blobs and sharing memory with
    them: optimizers update the blobs in place. ``forward(*bottoms)`` returns one Tensor per
    top (a tuple for several). The module's ``training`` flag sets the layer's phase.
    """

    def __init__(self, layer: Layer, bottom_shapes: list[tuple] | None = None) -> None:
        super().__init__()
        if not isinstance(layer, Layer):
            raise TypeError(f"as_module: expected a caffe Layer, got {type(layer).__name__}")
        self.layer = layer
        self._param_names: list[str] = []
        if bottom_shapes is not None:
            layer.ensure_setup([tuple(s) for s in bottom_shapes])
        if layer.is_setup:
            self._expose()

    def _expose(self) -> None:
        for i, blob in enumerate(self.layer.params):
            cls = nn.Parameter if blob.lr_mult != 0 else nn.Buffer
            tensor = cls.make_const(blob.data, requires_grad=blob.lr_mult != 0)
            tensor.grad = None
            name = blob.name
            if not (name and name.isidentifier() and not hasattr(self, name)):
                name = f"param{i}"
            setattr(self, name, tensor)
            self._param_names.append(name)

    def forward(self, *bottoms: Tensor) -> Any:
        layer = self.layer
        if not layer.is_setup:
            layer.ensure_setup([tuple(1 if d is None else d for d in b.shape) for b in bottoms])
            self._expose()
        layer.training = self.training
        params = [getattr(self, name) for name in self._param_names]
        return _LayerFunction.apply(layer, len(bottoms), *bottoms, *params)

    def extra_repr(self) -> str:
        return repr(self.layer)


def as_module(layer: Layer, bottom_shapes: list[tuple] | None = None) -> LayerModule:
    """Wrap ``layer`` as an ``nn.Module`` (see :class:`LayerModule`).

    Give ``bottom_shapes`` to create the parameters now (so ``module.parameters()`` can be
    handed to an optimizer before the first call); otherwise the first call sets it up.
    """
    return LayerModule(layer, bottom_shapes)


# -- lowering modules into a Net -------------------------------------------------------------
def _array(t: Any) -> np.ndarray:
    return np.array(t.numpy(), copy=True)


class _Lowering:
    """Walks a module tree, emitting spec entries and the parameter values for each layer."""

    def __init__(self) -> None:
        self.entries: list[dict] = []
        self.values: dict[str, list[np.ndarray]] = {}
        self.counts: dict[str, int] = {}

    def emit(self, kind: str, bottom: Any, values: list | None = None, **params: Any) -> str:
        k = self.counts.get(kind, 0)
        self.counts[kind] = k + 1
        name = f"{kind.lower()}{k}"
        self.entries.append({"name": name, "type": kind, "bottom": bottom, "top": name,
                             **params})
        if values is not None:
            self.values[name] = values
        return name

    def lower(self, m: nn.Module, bottom: str, path: str) -> str:
        if isinstance(m, nn.Sequential):
            for i, child in enumerate(m.modules):
                bottom = self.lower(child, bottom, f"{path}.{i}" if path else str(i))
            return bottom
        if isinstance(m, nn.Residual):
            out = self.lower(m.fn, bottom, f"{path}.fn" if path else "fn")
            return self.emit("Eltwise", [out, bottom], operation="SUM")
        if isinstance(m, nn.Linear):
            values = [_array(m.weight)]
            if m.bias is not None:
                values.append(_array(m.bias).reshape(-1))
            return self.emit("InnerProduct", bottom, values, num_output=m.out_features,
                             bias_term=m.bias is not None, axis=-1)
        if isinstance(m, nn.BatchNorm1d):  # also BatchNorm2d: both normalize along axis 1
            stats = [_array(m.running_mean), _array(m.running_var), np.ones(1, np.float32)]
            normed = self.emit("BatchNorm", bottom, stats, eps=m.eps,
                               moving_average_fraction=1.0 - m.momentum)
            return self.emit("Scale", normed, [_array(m.weight), _array(m.bias)],
                             bias_term=True)
        if isinstance(m, nn.Conv):
            values = [_array(m.weight)] + ([_array(m.bias)] if m.bias is not None else [])
            return self.emit("Convolution", bottom, values, num_output=m.out_channels,
                             kernel_size=m.kernel_size, stride=m.stride, pad=m.padding,
                             bias_term=m.bias is not None)
        if isinstance(m, nn.MaxPool2d | nn.AvgPool2d):
            pool = "MAX" if isinstance(m, nn.MaxPool2d) else "AVE"
            return self.emit("Pooling", bottom, pool=pool, kernel_size=m.kernel_size,
                             stride=m.stride)
        simple = {nn.ReLU: "ReLU", nn.Sigmoid: "Sigmoid", nn.Tanh: "TanH", nn.Flatten: "Flatten"}
        for cls, kind in simple.items():
            if type(m) is cls:
                return self.emit(kind, bottom)
        if type(m) is nn.Softmax:
            return self.emit("Softmax", bottom, axis=m.dim)
        if type(m) is nn.Dropout:
            return self.emit("Dropout", bottom, dropout_ratio=m.p)
        if type(m) is nn.Identity:
            return bottom
        raise NotImplementedError(
            f"Net.from_module: cannot lower {type(m).__name__} at {path or 'the root'}; "
            "supported: Sequential, Residual, Linear, ReLU, Sigmoid, Tanh, Softmax, Flatten, "
            "Identity, Dropout, BatchNorm1d/2d, Conv, MaxPool2d, AvgPool2d")


def lower_module(module: nn.Module, example_input: Any, loss: str | None = None,
                 net_cls: type = Net, input_name: str = "data", label_name: str = "label",
                 dtype: Any = "float32") -> Net:
    """A Net computing ``module`` (built of standard layers) with copies of its parameters.

    ``example_input`` (an array or Tensor) gives the input shape (its batch size is free).
    ``loss`` (``"SoftmaxWithLoss"`` or ``"EuclideanLoss"``) appends a loss layer reading a
    second input ``label_name``. Linear becomes InnerProduct (axis -1), BatchNorm1d/2d
    becomes BatchNorm + Scale (the running statistics copied with scale_factor 1;
    ``moving_average_fraction = 1 - momentum``, though Caffe's running averages are
    normalized sums, not needle's exponential ones), Residual(f) an Eltwise SUM of f's
    output and its input. The Net's phase follows ``module.training``.
    """
    x = example_input.numpy() if isinstance(example_input, Tensor) else np.asarray(
        example_input)
    if x.ndim == 0:
        raise ValueError("Net.from_module: example_input needs a batch dim")
    lowering = _Lowering()
    out = lowering.lower(module, input_name, "")
    tops, shapes = [input_name], [[None, *x.shape[1:]]]
    if loss is not None:
        with no_grad():
            out_shape = module(_abstract((None, *x.shape[1:]), np.float32)).shape
        if loss == "SoftmaxWithLoss":
            shapes.append([None])
        elif loss == "EuclideanLoss":
            shapes.append([None, *out_shape[1:]])
        else:
            raise ValueError(f"Net.from_module: loss must be 'SoftmaxWithLoss' or "
                             f"'EuclideanLoss', got {loss!r}")
        tops.append(label_name)
        lowering.entries.append({"name": "loss", "type": loss, "bottom": [out, label_name],
                                 "top": "loss"})
    spec = [{"name": "input", "type": "Input", "top": tops, "shape": shapes},
            *lowering.entries]
    net = net_cls(spec, phase="train" if module.training else "test", dtype=dtype)
    for name, values in lowering.values.items():
        blobs = net.params[name]
        for blob, value in zip(blobs, values):
            np.copyto(blob.data, value.astype(blob.data.dtype, copy=False))
    return net
