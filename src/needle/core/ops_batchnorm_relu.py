"""``batch_norm_relu`` and its adjoint ``batch_norm_relu_grad``: BatchNorm and the ReLU after
it as one node each way.

A ``conv -> BatchNorm -> ReLU`` block's backward is ``relu_grad(y, g)`` then
``batch_norm_grad``, y being BatchNorm's output; compiled plans (compiler/
batchnorm_relu_rewrite.py) run the pair as this op, whose kernel (kernels/batchnorm_relu.py)
recomputes y's sign from x and never writes the masked gradient. Its value is bit for bit
the ops'; it is an ordinary op (every mode, its own gradient) so a plan that holds it can be
differentiated, saved or interpreted like any other. Eager CNN blocks (nn.BatchNorm2d then
nn.ReLU, see ``nn.BatchNorm1d.forward_relu``) run the forward pair as ``batch_norm_relu``,
whose gradient is ``batch_norm_relu_grad``.
"""

from __future__ import annotations

from typing import Any

from ..kernels import batchnorm_relu, threaded_elementwise
from .context import GradMode
from .ops_elementwise import ReLUGrad
from .ops_norm import BatchNorm, BatchNormGrad, _check_batch_stats
from .ops_shape import SumTo, normalize_axes
from .registry import Aval, F, ShapeError, fmt_shape, register

_RELU_GRAD = ReLUGrad()


@register("batch_norm_relu", inputs=("x", "weight", "bias", "mean", "var"))
class BatchNormRelu(BatchNorm):
    """``relu(batch_norm(x, weight, bias, mean, var))``: training BatchNorm (x's own batch
    ``mean`` and ``var`` over ``axes``) and the ReLU after it, one node.

    Its values are the two ops' bit for bit (the ReLU runs in place on BatchNorm's output);
    its gradient is ``batch_norm_relu_grad``, two passes over the activations where
    ``relu_grad`` and ``batch_norm_grad`` take eight.
    """

    def compute(self, x, weight, bias, mean, var):
        return threaded_elementwise.relu_owned(
            BatchNorm.compute(self, x, weight, bias, mean, var))

    def scalar_expr(self, args, const):
        return f"np.maximum({BatchNorm.scalar_expr(self, args, const)}, {const(0)})"

    def gradient(self, out_grad, node):
        x, weight, bias, mean, var = node.inputs
        grads = F.batch_norm_relu_grad(out_grad, x, weight, bias, mean, var, axes=self.axes,
                                       eps=self.eps)
        return grads[0], grads[1], grads[2], None, None


@register("batch_norm_relu_grad", inputs=("g", "x", "weight", "bias", "mean", "var"))
class BatchNormReluGrad(BatchNormGrad):
    """``batch_norm_grad(relu_grad(batch_norm(x, weight, bias, mean, var), g), x, weight,
    mean, var)``: ``(dx, dweight, dbias)`` of training BatchNorm (input x, its batch ``mean``
    and ``var`` over ``axes``) followed by a ReLU, for the ReLU's output gradient ``g``.

    Two passes over g and x where the three ops take eight, the same bits (kernels/
    batchnorm_relu.py); where its loops cannot run, the ops' own computations. Gradient:
    the composite's, derived by the same autodiff (second order works).

    ``channel_sums=True`` adds a fourth output: dx summed over every axis but the channel
    one, a (C,) vector (the gradient of a conv bias before the BatchNorm), as
    ``sum_to(permute(dx, channel axis last), (C,))`` gives it, bit for bit; the dx pass
    takes it where that gives the same bits, else dx is summed afterwards.
    """

    def __init__(self, axes: Any, eps: float = 1e-5, channel_sums: bool = False) -> None:
        super().__init__(axes, eps)
        self.channel_sums = bool(channel_sums)

    def _channel_axis(self, ndim: int) -> int:
        axes = normalize_axes(self.name, self.axes, ndim)
        kept = [i for i in range(ndim) if i not in axes]
        if len(kept) != 1:
            raise ShapeError(f"batch_norm_relu_grad: channel_sums needs one axis kept, not "
                             f"{tuple(kept)}")
        return kept[0]

    def _summed(self, dx):
        """``sum_to(permute(dx, channel axis last), (C,))``, as those ops compute it."""
        axis = self._channel_axis(dx.ndim)
        order = (*range(axis), *range(axis + 1, dx.ndim), axis)
        return SumTo((dx.shape[axis],)).compute(dx.transpose(order))

    def compute(self, g, x, weight, bias, mean, var):
        axes = normalize_axes(self.name, self.axes, x.ndim)
        fused = batchnorm_relu.backward(g, x, weight, bias, mean, var, self.eps, axes,
                                        self.channel_sums)
        if fused is None:
            y = BatchNorm(self.axes, self.eps).compute(x, weight, bias, mean, var)
            fused = BatchNormGrad.compute(self, _RELU_GRAD.compute(y, g), x, weight, mean, var)
            if self.channel_sums:
                fused = (*fused, None)
        if self.channel_sums and fused[3] is None:
            return (*fused[:3], self._summed(fused[0]))
        return fused

    def gradient(self, out_grad, node):
        from .autodiff import gradients

        g, x, weight, bias, mean, var = node.inputs
        with GradMode(True):  # recorded even under create_graph=False (see NormalizeGrad)
            y = F.batch_norm(x, weight, bias, mean, var, axes=self.axes, eps=self.eps)
            grads = F.batch_norm_grad(F.relu_grad(y, g), x, weight, mean, var, axes=self.axes,
                                      eps=self.eps)
            outputs = [grads[0], grads[1], grads[2]]
            if self.channel_sums:
                axis = self._channel_axis(len(x.shape))
                order = (*range(axis), *range(axis + 1, len(x.shape)), axis)
                outputs.append(F.sum_to(F.permute(grads[0], order), (x.shape[axis],)))
        seeds = [out_grad[i] for i in range(len(outputs))]
        return (*gradients(outputs, [g, x, weight, bias], seeds, stop_at_wrt=True), None,
                None)

    def infer(self, g: Aval, x: Aval, weight: Aval, bias: Aval,  # type: ignore[override]
              mean: Aval, var: Aval) -> tuple:
        axes = normalize_axes(self.name, self.axes, len(x.shape))
        _check_batch_stats(self.name, x, axes, {"weight": weight, "bias": bias, "mean": mean,
                                                "var": var})
        if weight.shape != bias.shape:
            raise ShapeError(f"batch_norm_relu_grad: weight {fmt_shape(weight.shape)} and bias "
                             f"{fmt_shape(bias.shape)} must have one shape")
        grads = BatchNormGrad.infer(self, g, x, weight, mean, var)
        if not self.channel_sums:
            return grads
        channels = x.shape[self._channel_axis(len(x.shape))]
        return (*grads, Aval((channels,), grads[0].dtype))
