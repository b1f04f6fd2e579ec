"""Reductions: sum, mean, max, logsumexp, and the softmax family (stable by construction)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..backend import array_module
from ..kernels import batchnorm, cross_entropy
from ..kernels.reduce import reduce_sum, sum_expr
from ..kernels.softmax import logsumexp_last_axis, softmax_last_axis
from .ops_index import checked_ids
from .ops_shape import as_axes, kept_shape, normalize_axes
from .registry import Aval, F, Op, ShapeError, fmt_shape, register


class Reduction(Op):
    """An op that reduces ``axes`` (None: all); ``keepdims`` keeps them as size 1."""

    def __init__(self, axes: Any = None, keepdims: bool = False) -> None:
        self.axes = as_axes(axes)
        self.keepdims = bool(keepdims)

    def _axes(self, ndim: int) -> tuple[int, ...]:
        return normalize_axes(self.name, self.axes, ndim)

    def kept_shape(self, shape: tuple) -> tuple:
        """The input shape with the reduced axes set to 1."""
        return kept_shape(shape, self._axes(len(shape)))

    def kept(self, t: Any, node: Any) -> Any:
        """``t``, shaped like this node's output, with the reduced axes back as size 1.

        expand_dims, not a reshape to the kept shape: a reshape's None dims copy the input's
        dim at the same position, which is another dim once a middle axis was reduced away
        (a declared graph's (None, 5, None) summed over axis 1)."""
        if self.keepdims:
            return t
        return F.expand_dims(t, self._axes(len(node.inputs[0].shape)))

    def infer(self, a: Aval) -> Aval:
        axes = self._axes(len(a.shape))
        if self.keepdims:
            return Aval(self.kept_shape(a.shape), a.dtype)
        return Aval(tuple(d for i, d in enumerate(a.shape) if i not in axes), a.dtype)

    def expand(self, out_grad: Any, node: Any) -> Any:
        """The output adjoint broadcast back over the reduced axes."""
        shape = node.inputs[0].shape
        axes = self._axes(len(shape))
        if axes != tuple(range(len(axes))):
            # (reduced leading axes need no expand_dims: broadcasting adds them back in front)
            out_grad = self.kept(out_grad, node)
        if any(shape[i] is None for i in axes):
            # a reduced dim of unknown size: broadcast against the input itself at run time
            return out_grad * F.full_like(node.inputs[0], 1)
        return F.broadcast_to(out_grad, shape)


@register("summation", inputs=("a",), methods=("sum",))
class Summation(Reduction):
    """Sum over ``axes`` (None: all), removing them unless ``keepdims``."""

    def compute(self, a):
        return reduce_sum(a, self._axes(a.ndim), self.keepdims)

    def emit(self, args, node):
        a = node.inputs[0]
        if a.dtype.kind != "f":
            return None
        return sum_expr(args[0], tuple(a.shape), self._axes(len(a.shape)), self.keepdims)

    def gradient(self, out_grad, node):
        return self.expand(out_grad, node)


@register("mean", inputs=("a",), methods=("mean",))
class Mean(Reduction):
    """Mean over ``axes`` (None: all)."""

    def compute(self, a):
        axes = self._axes(a.ndim)
        if a.dtype.kind != "f" or not isinstance(a, np.ndarray):
            return np.mean(a, axis=axes, keepdims=self.keepdims)
        # np.mean's own arithmetic (a float sum, then one true division), without its wrapper
        count = 1
        for i in axes:
            count *= a.shape[i]
        return np.true_divide(reduce_sum(a, axes, self.keepdims), count)

    def emit(self, args, node):
        a = node.inputs[0]
        if a.dtype.kind != "f":
            return None
        axes = self._axes(len(a.shape))
        count = int(np.prod([a.shape[i] for i in axes]))
        expr = sum_expr(args[0], tuple(a.shape), axes, self.keepdims)
        return None if expr is None else f"np.true_divide({expr}, {count})"

    def gradient(self, out_grad, node):
        a = node.inputs[0]
        reduced = [a.shape[i] for i in self._axes(len(a.shape))]
        if None in reduced:  # the count is known only when the graph runs
            count = F.summation(F.full_like(a, 1), self.axes, keepdims=True)
            return self.expand(out_grad, node) / F.broadcast_to(count, a.shape)
        # divide before broadcasting: n times less work, the same values, and the adjoint stays
        # a broadcast view, so the next elementwise op keeps its other operand's memory layout
        # (dividing the materialized broadcast made a copy in a layout of its own, and products
        # of operands in two layouts ran 4x slower than either layout alone)
        return self.expand(out_grad / int(math.prod(reduced)), node)  # (np.prod: 2 us)


@register("max", inputs=("a",), methods=("max",))
class Max(Reduction):
    """Maximum over ``axes``; tied maxima share the gradient equally (as ``torch.amax``)."""

    def compute(self, a):
        return np.max(a, axis=self._axes(a.ndim), keepdims=self.keepdims)

    def gradient(self, out_grad, node):
        a = node.inputs[0]
        peak = F.broadcast_to(self.kept(node, node), a.shape)
        mask = F.astype(F.compare(a, peak, "eq"), out_grad.dtype)
        count = F.summation(mask, self.axes, keepdims=True)
        return self.expand(out_grad, node) * (mask / count)


@register("logsumexp", inputs=("a",))
class LogSumExp(Reduction):
    """log(sum(exp(a))) over ``axes``, stable: the max of each slice is taken out first."""

    def compute(self, a):
        axes = self._axes(a.ndim)
        if axes == (a.ndim - 1,):  # a loss's rows: blocks that stay in cache
            out = logsumexp_last_axis(a)
            if out is not None:
                return out if self.keepdims else out.reshape(a.shape[:-1])
        if a.size == 0 or not isinstance(a, np.ndarray):
            return self._compute_general(a, axes)
        peak = np.maximum.reduce(a, axis=axes, keepdims=True)
        if not np.isfinite(peak).all():  # -inf, inf or nan slices: the careful form
            return self._compute_general(a, axes)
        # finite peaks: each slice's sum is >= 1 (its max gives exp(0)), so no log(0) and no
        # errstate; ufunc reductions skip np.max / np.sum's Python wrappers (a loss is small)
        shifted = np.subtract(a, peak)
        np.exp(shifted, out=shifted)  # in place: one vocabulary-sized temporary, not two
        out = np.log(np.add.reduce(shifted, axis=axes, keepdims=True))
        out += peak
        return out if self.keepdims else out.reshape(
            [n for i, n in enumerate(a.shape) if i not in axes])

    def _compute_general(self, a, axes: tuple):
        xp = array_module(a)
        peak = xp.max(a, axis=axes, keepdims=True)
        # NOTE: a slice of all -inf has max -inf; use 0 there so it gives -inf, not nan
        peak = xp.where(xp.isfinite(peak), peak, 0)
        with np.errstate(divide="ignore"):  # log(0) = -inf is the right answer there
            out = xp.log(xp.sum(xp.exp(a - peak), axis=axes, keepdims=True)) + peak
        return out if self.keepdims else xp.squeeze(out, axis=axes)

    def gradient(self, out_grad, node):
        # d lse / da = exp(a - lse): a softmax, bounded by 1, so it cannot overflow. lse and
        # the adjoint stay kept-shape operands that broadcast in the subtraction and product:
        # no a-sized negate of a broadcast copy (a vocabulary-sized loss is memory-bound)
        a = node.inputs[0]
        grad = self.kept(out_grad, node)
        axes = self._axes(len(a.shape))
        if len(axes) == 1:  # the same softmax times the adjoint, one cache-blocked op
            return F.scaled_softmax(a, grad, axes[0])
        return F.exp(a - self.kept(node, node)) * grad


class AxisOp(Op):
    """An op along one ``axis`` that keeps the input's shape."""

    def __init__(self, axis: int = -1) -> None:
        self.axis = int(axis)

    def infer(self, a: Aval) -> Aval:
        normalize_axes(self.name, self.axis, len(a.shape))
        return a


@register("logsoftmax", inputs=("a",))
class LogSoftmax(AxisOp):
    """a - logsumexp(a) along ``axis`` (default the last), stable."""

    def compute(self, a):
        peak = np.max(a, axis=self.axis, keepdims=True)
        shifted = a - peak
        return shifted - np.log(np.sum(np.exp(shifted), axis=self.axis, keepdims=True))

    def gradient(self, out_grad, node):
        total = F.summation(out_grad, self.axis, keepdims=True)
        return out_grad - F.exp(node) * total


@register("softmax", inputs=("a",))
class Softmax(AxisOp):
    """exp(a) / sum(exp(a)) along ``axis`` (default the last), stable."""

    def compute(self, a):
        if self.axis in (-1, a.ndim - 1):
            blocked = softmax_last_axis(a)  # rows in cache-sized blocks, the same bits
            if blocked is not None:
                return blocked
        out = np.exp(a - np.max(a, axis=self.axis, keepdims=True))
        out /= np.sum(out, axis=self.axis, keepdims=True)
        return out

    def gradient(self, out_grad, node):
        weighted = F.summation(out_grad * node, self.axis, keepdims=True)
        return node * (out_grad - weighted)


@register("scaled_softmax", inputs=("a", "scale"))
class ScaledSoftmax(Op):
    """softmax(a) * scale along ``axis``: logsumexp's adjoint (``scale`` is the output
    adjoint, kept-shape: one value per slice), in one pass over ``a`` where the blocked kernel
    applies (a vocabulary-sized loss writes one array, not a softmax and then a product)."""

    def __init__(self, axis: int = -1) -> None:
        self.axis = int(axis)

    def compute(self, a, scale):
        if self.axis in (-1, a.ndim - 1):
            blocked = softmax_last_axis(a, scale)
            if blocked is not None:
                return blocked
        out = np.exp(a - np.max(a, axis=self.axis, keepdims=True))
        out /= np.sum(out, axis=self.axis, keepdims=True)
        return out * scale

    def gradient(self, out_grad, node):
        # node = s p with p = softmax(a): d/da = node * (g - sum(g p)), d/ds = g p
        a, _ = node.inputs
        p = F.softmax(a, self.axis)
        weighted = F.summation(out_grad * p, self.axis, keepdims=True)
        return node * (out_grad - weighted), out_grad * p

    def infer(self, a: Aval, scale: Aval) -> Aval:
        normalize_axes(self.name, self.axis, len(a.shape))
        return Aval(a.shape, np.result_type(a.dtype, scale.dtype))


def _check_loss_avals(op: str, logits: Aval, ids: Aval) -> None:
    """Logits (B, C) and ids (B,) of an integer (or whole-valued float) dtype."""
    if np.dtype(ids.dtype).kind not in "iuf":
        raise ShapeError(f"{op}: ids must be integers, got dtype {ids.dtype}")
    if len(logits.shape) != 2 or len(ids.shape) != 1 or (
            None not in (logits.shape[0], ids.shape[0]) and logits.shape[0] != ids.shape[0]):
        raise ShapeError(f"{op}: expected logits (B, C) and ids (B,), got "
                         f"{fmt_shape(logits.shape)} and {fmt_shape(ids.shape)}")


def _check_loss_shapes(logits: Any, ids: Any, g: Any = None) -> None:
    """Raise (the shape rule then names the shapes) unless logits (B, C), ids and g (B,)."""
    rows = (logits.shape[0],) if logits.ndim == 2 else None
    if rows is None or ids.shape != rows or (g is not None and g.shape != rows):
        raise ValueError("logits (B, C) with ids and adjoints (B,) expected")


_ROW_LOGSUMEXP = LogSumExp(axes=(1,))


@register("softmax_cross_entropy", inputs=("logits", "ids"))
class SoftmaxCrossEntropy(Op):
    """Per-row softmax cross-entropy ``logsumexp(z_i) - z_i[ids_i]`` of logits (B, C) and
    class ids (B,): SoftmaxLoss in one node. The forward is logsumexp's (cache-blocked) and
    one pick per row, the same values as ``logsumexp(z, (1,)) - take_along_axis(z, ids)``;
    the gradient is one op, ``softmax_cross_entropy_grad``, that writes one (B, C) array
    where the two-op form made a softmax, a scattered one-hot and their sum."""

    def compute(self, logits, ids):
        _check_loss_shapes(logits, ids)
        # small logits: one compiled pass, which checks integer ids itself (else None)
        compiled = cross_entropy.loss_rows(logits, ids)
        if compiled is not None:
            return compiled
        whole_floats = ids.dtype.kind == "f"
        ids = checked_ids(self.name, ids, logits.shape[1])
        if whole_floats:  # now integers: the compiled pass, as for integer ids
            compiled = cross_entropy.loss_rows(logits, ids)
            if compiled is not None:
                return compiled
        lse = _ROW_LOGSUMEXP.compute(logits)
        picked = logits[array_module(logits).arange(logits.shape[0]), ids]
        return lse - picked

    def gradient(self, out_grad, node):
        logits, ids = node.inputs
        return F.softmax_cross_entropy_grad(logits, ids, out_grad), None

    def infer(self, logits: Aval, ids: Aval) -> Aval:
        _check_loss_avals(self.name, logits, ids)
        batch = logits.shape[0] if logits.shape[0] is not None else ids.shape[0]
        return Aval((batch,), logits.dtype)


@register("softmax_cross_entropy_grad", inputs=("logits", "ids", "g"))
class SoftmaxCrossEntropyGrad(Op):
    """``g_i * (softmax(z_i) - onehot(ids_i))`` for logits (B, C), ids (B,) and adjoints g
    (B,): the gradient of ``softmax_cross_entropy``, one pass over the logits (the blocked
    softmax times g) and one subtraction per row."""

    def compute(self, logits, ids, g):
        _check_loss_shapes(logits, ids, g)
        # small: one compiled pass, which checks integer ids itself (else None)
        compiled = cross_entropy.loss_rows_grad(logits, ids, g)
        if compiled is not None:
            return compiled
        whole_floats = ids.dtype.kind == "f"
        ids = checked_ids(self.name, ids, logits.shape[1])
        if whole_floats:  # now integers: the compiled pass, as for integer ids
            compiled = cross_entropy.loss_rows_grad(logits, ids, g)
            if compiled is not None:
                return compiled
        # large: the blocked softmax into a recycled array
        compiled = cross_entropy.loss_rows_grad_blocked(logits, ids, g)
        if compiled is not None:
            return compiled
        scale = g.reshape(-1, 1)
        out = softmax_last_axis(logits, scale)
        if out is None:
            xp = array_module(logits)
            out = xp.exp(logits - xp.max(logits, axis=1, keepdims=True))
            out /= xp.sum(out, axis=1, keepdims=True)
            out = out * scale
        out[array_module(out).arange(out.shape[0]), ids] -= g
        return out

    def gradient(self, out_grad, node):
        # D = g (p - onehot) with p = softmax(z): dD/dz applied to G is g p (G - sum(G p)),
        # dD/dg is sum(G p) - G[ids]
        logits, ids, g = node.inputs
        p = F.softmax(logits, 1)
        weighted = F.summation(out_grad * p, (1,), keepdims=True)
        grad_z = F.scaled_softmax(logits, F.reshape(g, (-1, 1)), 1) * (out_grad - weighted)
        picked = F.reshape(F.take_along_axis(out_grad, F.reshape(ids, (-1, 1)), 1), (-1,))
        grad_g = F.reshape(weighted, (-1,)) - picked
        return grad_z, None, grad_g

    def infer(self, logits: Aval, ids: Aval, g: Aval) -> Aval:
        _check_loss_avals(self.name, logits, ids)
        if len(g.shape) != 1 or (None not in (g.shape[0], logits.shape[0])
                                 and g.shape[0] != logits.shape[0]):
            raise ShapeError(f"{self.name}: g must be (B,) for logits "
                             f"{fmt_shape(logits.shape)}, got {fmt_shape(g.shape)}")
        return Aval(logits.shape, np.result_type(logits.dtype, g.dtype))


def reduced_count(a: Any, axes: tuple) -> Any:
    """The number of elements reduced over ``axes``: an int, or a tensor when a dim is unknown."""
    dims = [a.shape[i] for i in axes]
    if None in dims:
        return F.summation(F.full_like(a, 1), axes, keepdims=True)
    return int(math.prod(dims))


@register("variance", inputs=("a",))
class Variance(Reduction):
    """Biased variance over ``axes`` (divide by n, as BatchNorm and LayerNorm use)."""

    def compute(self, a):
        return batchnorm.variance(a, self._axes(a.ndim), self.keepdims)

    def gradient(self, out_grad, node):
        # d var / da = 2 (a - mean) / n
        a = node.inputs[0]
        centered = a - F.mean(a, self.axes, keepdims=True)
        count = reduced_count(a, self._axes(len(a.shape)))
        return self.expand(out_grad, node) * centered * 2.0 / count
