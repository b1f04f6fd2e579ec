"""LayerNorm as one op over the last axis, and its adjoint as one op.

``layer_norm(x, weight, bias)`` replaces ``normalize`` + ``multiply`` + ``add`` (and their
three to five backward nodes: ``normalize_grad``, two products, two ``sum_to``) with one
node each way; kernels/layernorm.py computes each in one visit per row where numba is
installed. The adjoint's own gradient is the composite formula's, derived by the same
autodiff, so second order works (as ``normalize_grad`` and ``batch_norm_grad``).
"""

from __future__ import annotations

import numpy as np

from ..kernels import layernorm
from .autodiff import per_input
from .context import GradMode
from .registry import Aval, F, Op, ShapeError, fmt_shape, register


def _check(op: str, x: Aval, weight: Aval, *more: Aval) -> None:
    """A ShapeError unless ``weight`` (and ``more``) are (D,) for x's last dim D."""
    if len(x.shape) == 0:
        raise ShapeError(f"{op}: x must have at least one dim (the normalized axis), got a "
                         "0-d array")
    d = x.shape[-1]
    for name, aval in zip(("weight", "bias"), (weight, *more)):
        if len(aval.shape) != 1 or (d is not None and aval.shape[0] not in (None, d)):
            raise ShapeError(f"{op}: {name} must have shape ({d},) to fit x "
                             f"{fmt_shape(x.shape)}, got {fmt_shape(aval.shape)}")


@register("layer_norm", inputs=("x", "weight", "bias"))
class LayerNorm(Op):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with each row's own (biased)
    statistics over the last axis; ``weight`` and ``bias`` are (D,)."""

    def __init__(self, eps: float = 1e-5) -> None:
        self.eps = float(eps)

    def compute(self, x, weight, bias):
        return layernorm.layer_norm(x, weight, bias, self.eps)

    def gradient(self, out_grad, node):
        x, weight, _ = node.inputs
        grads = F.layer_norm_grad(out_grad, x, weight, eps=self.eps)
        return grads[0], grads[1], grads[2]

    def infer(self, x: Aval, weight: Aval, bias: Aval) -> Aval:
        _check(self.name, x, weight, bias)
        return Aval(x.shape, np.result_type(x.dtype, weight.dtype, bias.dtype))


@register("layer_norm_grad", inputs=("g", "x", "weight"))
class LayerNormGrad(Op):
    """The adjoint of ``layer_norm`` for output gradient ``g``: ``(dx, dweight, dbias)``::

        xhat = (x - mean) / sqrt(var + eps),  gw = g * weight
        dx = (gw - mean(gw) - xhat * mean(gw * xhat)) / sqrt(var + eps)   (row means)
        dweight = sum over rows of g * xhat,  dbias = sum over rows of g
    """

    returns_tuple = True

    def __init__(self, eps: float = 1e-5) -> None:
        self.eps = float(eps)

    def compute(self, g, x, weight):
        return layernorm.layer_norm_grad(g, x, weight, self.eps)

    def _composite(self, g, x, weight):
        rows = tuple(range(len(x.shape) - 1))
        xhat = F.normalize(x, axes=(-1,), eps=self.eps)
        dx = F.normalize_grad(g * weight, xhat, x, axes=(-1,), eps=self.eps)
        dweight = F.summation(g * xhat, rows) if rows else g * xhat
        dbias = F.summation(g, rows) if rows else g
        return [dx, dweight, dbias]

    def gradient(self, out_grad, node):
        from .autodiff import gradients

        # recorded even under backward(create_graph=False), as NormalizeGrad's composite
        with GradMode(True):
            outputs = self._composite(*node.inputs)
        seeds = [out_grad[i] for i in range(3)]
        return per_input(node.inputs, lambda wrt: gradients(outputs, wrt, seeds,
                                                            stop_at_wrt=True))

    def infer(self, g: Aval, x: Aval, weight: Aval) -> tuple:
        _check(self.name, x, weight)
        if len(g.shape) != len(x.shape) or any(
                a is not None and b is not None and a != b for a, b in zip(g.shape, x.shape)):
            raise ShapeError(f"layer_norm_grad: g {fmt_shape(g.shape)} does not match x "
                             f"{fmt_shape(x.shape)}")
        dtype = np.result_type(g.dtype, x.dtype, weight.dtype)
        return (Aval(x.shape, dtype), Aval(weight.shape, dtype), Aval(weight.shape, dtype))
