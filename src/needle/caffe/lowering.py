"""An ``nn.Sequential``-style model lowered into a Net spec with its parameter values
(for ``Net.from_module``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import nn
from ..autograd import Tensor, no_grad
from .layer import _abstract

__all__ = ["lower_to_spec"]


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


def lower_to_spec(module: nn.Module, example_input: Any, loss: str | None = None,
                  input_name: str = "data", label_name: str = "label") -> tuple[list, dict]:
    """The Net spec computing ``module`` (built of standard layers), and its parameter values
    by layer name (what ``Net.from_module`` builds and copies in).

    ``example_input`` (an array or Tensor) gives the input shape (its batch size is free).
    ``loss`` (``"SoftmaxWithLoss"`` or ``"EuclideanLoss"``) appends a loss layer reading a
    second input ``label_name``. Linear becomes InnerProduct (axis -1), BatchNorm1d/2d
    becomes BatchNorm + Scale (the running statistics copied with scale_factor 1;
    ``moving_average_fraction = 1 - momentum``, though Caffe's running averages are
    normalized sums, not needle's exponential ones), Residual(f) an Eltwise SUM of f's
    output and its input.
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
    return spec, lowering.values
