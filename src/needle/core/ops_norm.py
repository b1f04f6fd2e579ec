"""Normalization ops: BatchNorm's and LayerNorm's core as single nodes, forward and backward.

``normalize`` and its adjoint ``normalize_grad`` replace the ten-odd elementwise and reduction
nodes of the textbook formulas (BatchNorm is hot in every training step); ``inv_std`` is the
piece the adjoint's own gradient needs. Statistics follow np.mean's arithmetic (biased
variance).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import api as F
from .ops_reduce import moments, reduced_count
from .ops_shape import as_axes, normalize_axes, reduce_sum
from .registry import Aval, Op, ShapeError, fmt_shape, register


class NormOp(Op):
    """An op over ``axes`` with biased-variance statistics and an ``eps`` (BatchNorm, LayerNorm)."""

    def __init__(self, axes: Any, eps: float = 1e-5) -> None:
        self.axes = as_axes(axes)
        self.eps = float(eps)

    def _stats(self, a):
        """(centered, variance) over the axes, keepdims, in np.mean's arithmetic."""
        _, centered, var = moments(a, normalize_axes(self.name, self.axes, a.ndim))
        return centered, var


@register("normalize", inputs=("a", "*stats"))
class Normalize(NormOp):
    """(a - mean) / sqrt(var + eps) over ``axes`` with a's own (biased) statistics.

    ``normalize(a, axes=..., eps=...)`` computes them; ``normalize(a, mean, var, ...)`` takes
    them ready made (keepdims shapes) so BatchNorm computes them once for its running
    averages too. NOTE: they must be a's statistics over ``axes``: the gradient is the classic
    ``(g - mean(g) - y * mean(g * y)) / sqrt(var + eps)``, which already accounts for their
    dependence on ``a`` (so none flows to the ``mean``/``var`` inputs themselves).
    """

    def compute(self, a, *stats):
        if stats:
            mean, var = stats
            centered = a - mean
        else:
            centered, var = self._stats(a)
        centered *= 1.0 / np.sqrt(var + self.eps)
        return centered

    def gradient(self, out_grad, node):
        a, *stats = node.inputs
        if stats:
            grad = F.normalize_grad(out_grad, node, stats[1], axes=self.axes, eps=self.eps,
                                    given_var=True)
            return grad, None, None
        return F.normalize_grad(out_grad, node, a, axes=self.axes, eps=self.eps)

    def infer(self, a: Aval, *stats: Aval) -> Aval:
        axes = normalize_axes(self.name, self.axes, len(a.shape))
        kept = tuple(1 if i in axes else d for i, d in enumerate(a.shape))
        for stat in stats:
            if len(stat.shape) != len(kept) or any(
                    x is not None and y is not None and x != y for x, y in zip(stat.shape, kept)):
                raise ShapeError(f"normalize: statistics of shape {fmt_shape(stat.shape)} do not "
                                 f"fit input {fmt_shape(a.shape)} over axes {axes}; expected "
                                 f"{fmt_shape(kept)}")
        return a


@register("normalize_grad", inputs=("g", "y", "s"))
class NormalizeGrad(NormOp):
    """The adjoint of ``normalize``: ``(g - mean(g) - y * mean(g * y)) / sqrt(var + eps)``.

    ``s`` is the normalized input (its variance is computed) or, with ``given_var``, that
    variance itself. One node for what would be ten (BatchNorm's backward is hot); its own
    gradient is the composite formula's, derived by the same autodiff, so second order works.
    """

    def __init__(self, axes: Any, eps: float = 1e-5, given_var: bool = False) -> None:
        super().__init__(axes, eps)
        self.given_var = bool(given_var)

    def compute(self, g, y, s):
        axes = normalize_axes(self.name, self.axes, g.ndim)
        var = s if self.given_var else moments(s, axes)[2]
        count = 1
        for i in axes:
            count *= g.shape[i]
        g_mean = np.true_divide(reduce_sum(g, axes, keepdims=True), count)
        gy_mean = np.true_divide(reduce_sum(g * y, axes, keepdims=True), count)
        out = g - g_mean
        out -= y * gy_mean
        out *= 1.0 / np.sqrt(var + self.eps)
        return out

    def _composite(self, g, y, s):
        g_mean = F.mean(g, self.axes, keepdims=True)
        gy_mean = F.mean(g * y, self.axes, keepdims=True)
        inv = (s + self.eps) ** -0.5 if self.given_var else F.inv_std(s, self.axes, self.eps)
        return (g - g_mean - y * gy_mean) * inv

    def gradient(self, out_grad, node):
        from .autodiff import gradients

        inputs = list(node.inputs)
        expr = self._composite(*inputs)
        return tuple(gradients([expr], inputs, [out_grad], stop_at_wrt=True))

    def infer(self, g: Aval, y: Aval, s: Aval) -> Aval:
        normalize_axes(self.name, self.axes, len(g.shape))
        return g


@register("inv_std", inputs=("a",))
class InvStd(NormOp):
    """1 / sqrt(var(a) + eps) over ``axes``, kept as size-1 dims (biased variance)."""

    def compute(self, a):
        _, var = self._stats(a)
        return 1.0 / np.sqrt(var + self.eps)

    def gradient(self, out_grad, node):
        # d/da (var + eps)^(-1/2) = -(var + eps)^(-3/2) (a - mean) / n
        a = node.inputs[0]
        axes = normalize_axes(self.name, self.axes, len(a.shape))
        centered = a - F.mean(a, self.axes, keepdims=True)
        scale = out_grad * (node * node * node)
        return -(scale * centered) / reduced_count(a, axes)

    def infer(self, a: Aval) -> Aval:
        axes = normalize_axes(self.name, self.axes, len(a.shape))
        return Aval(tuple(1 if i in axes else d for i, d in enumerate(a.shape)), a.dtype)
