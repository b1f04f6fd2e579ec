"""Bridges to the module world: a Layer as an ``nn.Module`` (``as_module``), a module as a
Net (``lower_module``, which ``Net.from_module`` does with ``lowering.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import nn
from ..autograd import Tensor, enable_grad
from ..function import Function, FunctionCtx
from .layer import Layer
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


def lower_module(module: nn.Module, example_input: Any, loss: str | None = None,
                 net_cls: type[Net] = Net, **kwargs: Any) -> Net:
    """``net_cls.from_module(module, example_input, loss, ...)``: a Net computing the module."""
    return net_cls.from_module(module, example_input, loss, **kwargs)
