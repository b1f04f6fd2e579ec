"""A convolution that reads ``relu(batch_norm(x))``, and its kernel gradient, as single nodes.

In a ``conv -> BatchNorm2d -> ReLU -> conv`` network the next convolution's forward and its
kernel gradient both read the BatchNorm + ReLU output. Compiled plans (compiler/
batchnorm_relu_conv_rewrite.py) let them read the BatchNorm's input instead, through these
ops, whose kernels (kernels/conv_bn_relu.py) make the activation per block of images where the
convolution's loop reads it, so it is never stored (the pass that wrote it is gone). Values:
bit for bit those of ``batch_norm``, ``relu`` and ``conv_bias`` / ``conv_weight_grad``; where
the kernels do not run, those ops' own computations. Ordinary ops (every mode, their own
gradient, by the same autodiff of the composite).

Layouts are nn.Conv's and BatchNorm2d's: ``x`` is the NHWC array whose NCHW view the
BatchNorm normalizes per channel (over N, H and W); ``weight``, ``bias``, ``mean`` and ``var``
hold C values each (any shape, e.g. BatchNorm2d's (1, C, 1, 1)).
"""

from __future__ import annotations

import numpy as np

from ..kernels import conv_bn_relu
from .context import GradMode
from .ops_conv import ConvBias, ConvWeightGrad
from .ops_elementwise import ReLU
from .ops_norm import BatchNorm
from .registry import Aval, F, Op, ShapeError, fmt_shape, register

_NCHW = (0, 3, 1, 2)
_NHWC = (0, 2, 3, 1)
_AXES = (0, 2, 3)
_RELU = ReLU()


def _check(op: str, x: Aval, stats: dict[str, Aval]) -> None:
    """A ShapeError unless x is 4-d and each statistic holds x's C values."""
    if len(x.shape) != 4:
        raise ShapeError(f"{op}: expected a 4-d NHWC x, got {fmt_shape(x.shape)}")
    c = x.shape[3]
    for name, aval in stats.items():
        size = None if None in aval.shape else int(np.prod(aval.shape))
        if c is not None and size is not None and size != c:
            raise ShapeError(f"{op}: {name} {fmt_shape(aval.shape)} must hold x's {c} channel "
                             f"values (x {fmt_shape(x.shape)})")


class _BatchNormReluInput(Op):
    """What both ops share: ``relu(batch_norm(x))`` as arrays (the ops' own computations) and
    as a graph (for the gradients)."""

    eps: float

    def _activation(self, x, weight, bias, mean, var):
        """relu(batch_norm(x)) as BatchNorm2d and ReLU compute it, NHWC."""
        shape = (1, x.shape[3], 1, 1)
        y = BatchNorm(_AXES, self.eps).compute(x.transpose(_NCHW), weight.reshape(shape),
                                               bias.reshape(shape), mean.reshape(shape),
                                               var.reshape(shape))
        return _RELU.compute(y).transpose(_NHWC)

    def _activation_graph(self, x, weight, bias, mean, var):
        shape = (1, x.shape[3], 1, 1)
        y = F.batch_norm(F.permute(x, _NCHW), F.reshape(weight, shape), F.reshape(bias, shape),
                         F.reshape(mean, shape), F.reshape(var, shape), axes=_AXES,
                         eps=self.eps)
        return F.permute(F.relu(y), _NHWC)


@register("batch_norm_relu_conv_bias",
          inputs=("x", "weight", "bias", "mean", "var", "b", "c"))
class BatchNormReluConvBias(_BatchNormReluInput):
    """``conv_bias(relu(batch_norm(x, weight, bias, mean, var)), b, c)``: nn.Conv with a
    bias applied to a BatchNorm2d + ReLU output, ``x`` the BatchNorm's input stored NHWC (its
    NCHW view normalized per channel with the batch ``mean`` and ``var``); the output is
    conv_bias's, (N, Ho, Wo, C_out) NHWC."""

    def __init__(self, eps: float = 1e-5, stride: int = 1, padding: int = 0) -> None:
        self.eps = float(eps)
        self.stride = int(stride)
        self.padding = int(padding)

    def compute(self, x, weight, bias, mean, var, b, c):
        out = conv_bn_relu.conv2d_bn_relu(x, weight, bias, mean, var, self.eps, b,
                                          self.stride, self.padding, c)
        if out is None:
            out = ConvBias(self.stride, self.padding).compute(
                self._activation(x, weight, bias, mean, var), b, c)
        return out

    def gradient(self, out_grad, node):
        from .autodiff import gradients

        x, weight, bias, mean, var, b, c = node.inputs
        with GradMode(True):  # recorded even under create_graph=False (see NormalizeGrad)
            out = F.conv_bias(self._activation_graph(x, weight, bias, mean, var), b, c,
                              stride=self.stride, padding=self.padding)
        return tuple(gradients([out], list(node.inputs), [out_grad], stop_at_wrt=True))

    def infer(self, x: Aval, weight: Aval, bias: Aval, mean: Aval,  # type: ignore[override]
              var: Aval, b: Aval, c: Aval) -> Aval:
        _check(self.name, x, {"weight": weight, "bias": bias, "mean": mean, "var": var})
        return ConvBias(self.stride, self.padding).infer(x, b, c)


@register("batch_norm_relu_conv_weight_grad",
          inputs=("x", "weight", "bias", "mean", "var", "g"))
class BatchNormReluConvWeightGrad(_BatchNormReluInput):
    """``conv_weight_grad(relu(batch_norm(x, weight, bias, mean, var)), g)``: the kernel
    gradient of a convolution whose input is a BatchNorm2d + ReLU output (``x`` as for
    ``batch_norm_relu_conv_bias``)."""

    def __init__(self, kernel_hw: tuple, eps: float = 1e-5, stride: int = 1,
                 padding: int = 0) -> None:
        self.kernel_hw = tuple(int(k) for k in kernel_hw)
        self.eps = float(eps)
        self.stride = int(stride)
        self.padding = int(padding)

    def _plain(self) -> ConvWeightGrad:
        return ConvWeightGrad(self.kernel_hw, self.stride, self.padding)

    def compute(self, x, weight, bias, mean, var, g):
        out = conv_bn_relu.conv2d_weight_grad_bn_relu(x, weight, bias, mean, var, self.eps, g,
                                                      self.kernel_hw, self.stride,
                                                      self.padding)
        if out is None:
            out = self._plain().compute(self._activation(x, weight, bias, mean, var), g)
        return out

    def gradient(self, out_grad, node):
        from .autodiff import gradients

        x, weight, bias, mean, var, g = node.inputs
        with GradMode(True):
            out = F.conv_weight_grad(self._activation_graph(x, weight, bias, mean, var), g,
                                     kernel_hw=self.kernel_hw, stride=self.stride,
                                     padding=self.padding)
        return tuple(gradients([out], list(node.inputs), [out_grad], stop_at_wrt=True))

    def infer(self, x: Aval, weight: Aval, bias: Aval, mean: Aval,  # type: ignore[override]
              var: Aval, g: Aval) -> Aval:
        _check(self.name, x, {"weight": weight, "bias": bias, "mean": mean, "var": var})
        return self._plain().infer(x, g)


__all__ = ["BatchNormReluConvBias", "BatchNormReluConvWeightGrad"]
