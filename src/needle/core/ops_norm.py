"""Normalization ops: BatchNorm's and LayerNorm's core as single nodes, forward and backward.

``normalize`` and its adjoint ``normalize_grad`` replace the ten-odd elementwise and reduction
nodes of the textbook formulas (LayerNorm); ``batch_norm`` and ``batch_norm_grad`` do the same
for training-mode BatchNorm with its affine weight and bias, in as few passes over the
activations as NumPy allows (BatchNorm is hot in every CNN step), and ``batch_stats`` gives
them the batch mean and variance in one node (one pass with numba); ``inv_std`` is the piece
the adjoints' own gradients need. Statistics follow np.mean's arithmetic (biased variance;
``batch_stats``'s compiled pass agrees with it to float32 rounding).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..kernels import batchnorm
from ..kernels.reduce import moments, reduce_sum, reduce_sum_of_products
from .context import GradMode
from .ops_reduce import reduced_count
from .ops_shape import as_axes, kept_shape, normalize_axes
from .registry import Aval, F, Op, ShapeError, fmt_shape, register


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
        kept = kept_shape(a.shape, axes)
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
        gy_mean = np.true_divide(reduce_sum_of_products(g, y, axes, keepdims=True), count)
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
        # the composite must record its graph even under backward(create_graph=False), or
        # the adjoints of its inputs are lost; the gradients follow the caller's grad mode
        with GradMode(True):
            expr = self._composite(*inputs)
        return tuple(gradients([expr], inputs, [out_grad], stop_at_wrt=True))

    def infer(self, g: Aval, y: Aval, s: Aval) -> Aval:
        normalize_axes(self.name, self.axes, len(g.shape))
        return g


def _check_batch_stats(op: str, x: Aval, axes: tuple, stats: dict[str, Aval]) -> None:
    """A ShapeError unless each of ``stats`` broadcasts against x's kept shape over ``axes``
    without growing it (a per-channel array: (C,), (1, C) or (1, C, 1, 1) ...)."""
    kept = kept_shape(x.shape, axes)
    for name, aval in stats.items():
        shape = aval.shape
        fits = len(shape) <= len(kept) and all(
            d == 1 or k is None or d is None or d == k
            for d, k in zip(shape[::-1], kept[::-1]))
        if not fits:
            raise ShapeError(f"{op}: {name} of shape {fmt_shape(shape)} does not fit input "
                             f"{fmt_shape(x.shape)} normalized over axes {axes}; expected a "
                             f"per-channel shape that broadcasts to {fmt_shape(kept)}")


#: ``batch_stats``'s values for an array, ``(mean, biased variance)`` over ``axes`` (sorted,
#: non-negative) kept as size-1 dims: the op's own kernel, which eager training BatchNorm
#: calls directly with no node (nn/basic.py). (An alias, not a wrapper: no extra call.)
batch_statistics = batchnorm.statistics


@register("batch_stats", inputs=("x",))
class BatchStats(Op):
    """``(mean, variance)`` of x over ``axes``, kept as size-1 dims (biased variance): the
    batch statistics of training-mode BatchNorm, for ``batch_norm`` and the running averages.

    One node and, where numba runs, one pass over x (kernels/batchnorm.py ``statistics``)
    where ``mean`` + ``variance`` took two nodes and three passes (the CNN step's BatchNorm
    reads its activations twice less). float32 statistics agree with ``mean`` and
    ``variance`` to float32 rounding; the NumPy path computes theirs exactly.
    """

    returns_tuple = True

    def __init__(self, axes: Any) -> None:
        self.axes = as_axes(axes)

    def compute(self, x):
        return batchnorm.statistics(x, normalize_axes(self.name, self.axes, x.ndim))

    def gradient(self, out_grad, node):
        # d mean / dx = 1 / n; d var / dx = 2 (x - mean) / n (the mean's own dependence on x
        # drops out: the centered values sum to 0)
        x = node.inputs[0]
        count = reduced_count(x, normalize_axes(self.name, self.axes, len(x.shape)))
        g_mean, g_var = out_grad[0], out_grad[1]
        return (g_mean + g_var * (x - node[0]) * 2.0) / count

    def infer(self, x: Aval) -> tuple:
        axes = normalize_axes(self.name, self.axes, len(x.shape))
        stat = Aval(kept_shape(x.shape, axes), x.dtype)
        return (stat, stat)


@register("batch_norm", inputs=("x", "weight", "bias", "mean", "var"))
class BatchNorm(NormOp):
    """Training-mode BatchNorm: ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    ``mean`` and ``var`` are x's own (biased) statistics over ``axes`` with kept dims, as
    ``batch_stats`` (or ``mean`` and ``variance``) make them (BatchNorm computes them once,
    for this and for its running averages). ``weight`` and ``bias`` are per-channel arrays of
    one shape that broadcast against that kept shape. Computed as PyTorch's CPU kernel does:
    ``y = x * alpha + beta`` with ``alpha = weight / sqrt(var + eps)`` and
    ``beta = bias - mean * alpha``.

    NOTE: as with ``normalize``, the gradient (``batch_norm_grad``) already accounts for the
    statistics' dependence on ``x``, so none flows to the ``mean``/``var`` inputs.
    """

    def compute(self, x, weight, bias, mean, var):
        return batchnorm.forward(x, weight, bias, mean, var, self.eps,
                                 normalize_axes(self.name, self.axes, x.ndim))

    def scalar_expr(self, args, const):
        """``compute``'s arithmetic on one element, so region fusion runs BatchNorm in one loop
        with the relu / residual add after it (jitted MLP-ResNet step -6%). Bit-identical to
        ``compute`` where the statistics have the output's dtype; with float64 weights on
        float32 x, ``var + eps`` is rounded in float64 here (float32 in ``compute``)."""
        x, weight, bias, mean, var = args
        inv = f"({const(1.0)} / np.sqrt({var} + {const(self.eps)}))"
        alpha = f"({weight} * {inv})"
        return f"(({x} * {alpha}) + ({bias} - ({mean} * {alpha})))"

    def gradient(self, out_grad, node):
        x, weight, bias, mean, var = node.inputs
        grads = F.batch_norm_grad(out_grad, x, weight, mean, var, axes=self.axes, eps=self.eps)
        return grads[0], grads[1], grads[2], None, None

    def infer(self, x: Aval, weight: Aval, bias: Aval, mean: Aval, var: Aval) -> Aval:
        axes = normalize_axes(self.name, self.axes, len(x.shape))
        _check_batch_stats(self.name, x, axes, {"weight": weight, "bias": bias, "mean": mean,
                                                "var": var})
        if weight.shape != bias.shape:
            raise ShapeError(f"batch_norm: weight {fmt_shape(weight.shape)} and bias "
                             f"{fmt_shape(bias.shape)} must have one shape")
        return Aval(x.shape, np.result_type(x.dtype, weight.dtype))


@register("batch_norm_grad", inputs=("g", "x", "weight", "mean", "var"))
class BatchNormGrad(NormOp):
    """The adjoint of ``batch_norm`` for output gradient ``g``: ``(dx, dweight, dbias)``.

    With ``xhat = (x - mean) * inv``, ``inv = 1 / sqrt(var + eps)`` and n the reduced count::

        dbias = sum(g),  dweight = sum(g * xhat) = inv * sum(g * (x - mean))
        dx = weight * inv * (g - dbias / n - xhat * dweight / n)

    ``dweight`` and ``dbias`` have the weight's shape. The sums read their inputs once
    (einsum) and ``dx`` is ``a * g + b * (x - mean) + c`` with per-channel a, b, c: five
    passes over the activations where the composite formula takes a dozen. Its own gradient
    is the composite formula's, derived by the same autodiff, so second order works.
    """

    returns_tuple = True

    def compute(self, g, x, weight, mean, var):
        axes = normalize_axes(self.name, self.axes, x.ndim)
        return batchnorm.backward_given_var(g, x, weight, mean, var, self.eps, axes)

    def _composite(self, g, x, weight):
        xhat = F.normalize(x, axes=self.axes, eps=self.eps)
        dx = F.normalize_grad(g * weight, xhat, x, axes=self.axes, eps=self.eps)
        dweight = F.reshape(F.summation(g * xhat, self.axes, keepdims=True), weight.shape)
        dbias = F.reshape(F.summation(g, self.axes, keepdims=True), weight.shape)
        return [dx, dweight, dbias]

    def gradient(self, out_grad, node):
        from .autodiff import gradients

        g, x, weight, _, _ = node.inputs
        with GradMode(True):  # recorded even under create_graph=False (see NormalizeGrad)
            outputs = self._composite(g, x, weight)
        seeds = [out_grad[i] for i in range(3)]
        return (*gradients(outputs, [g, x, weight], seeds, stop_at_wrt=True), None, None)

    def infer(self, g: Aval, x: Aval, weight: Aval, mean: Aval, var: Aval) -> tuple:
        axes = normalize_axes(self.name, self.axes, len(x.shape))
        _check_batch_stats(self.name, x, axes, {"weight": weight, "mean": mean, "var": var})
        if len(g.shape) != len(x.shape) or any(
                a is not None and b is not None and a != b for a, b in zip(g.shape, x.shape)):
            raise ShapeError(f"batch_norm_grad: g {fmt_shape(g.shape)} does not match x "
                             f"{fmt_shape(x.shape)}")
        dtype = np.result_type(g.dtype, x.dtype, weight.dtype)
        return (Aval(x.shape, dtype), Aval(weight.shape, dtype), Aval(weight.shape, dtype))


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
        return Aval(kept_shape(a.shape, axes), a.dtype)
