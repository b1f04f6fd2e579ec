"""``batch_norm_relu_mean``: a CNN's last BatchNorm2d + ReLU and its global average pool, one
node.

Each benchmark CNN ends ``BatchNorm2d -> ReLU -> mean over H, W -> Linear``. Compiled plans
(compiler/batchnorm_relu_mean_rewrite.py) run the three forward steps as this op, whose
kernel (kernels/bn_relu_mean.py) makes the activation where it sums it, so it is neither
written nor read back. Values: bit for bit those of ``batch_norm``, ``relu`` and ``mean``
(where the kernel does not run, those ops' own computations). An ordinary op (every mode,
its gradient by autodiff of the composite). The backward of such a block never reads the
activation: ``batch_norm_relu_grad`` recomputes its sign from x.

Layouts as core/ops_batchnorm_relu_conv.py's: ``x`` is the NHWC array whose NCHW view the
BatchNorm normalizes per channel (over N, H and W); ``weight``, ``bias``, ``mean`` and ``var``
hold C values each (any shape); the output is the (N, C) pooled activation.
"""

from __future__ import annotations

from ..kernels import bn_relu_mean
from .context import GradMode
from .ops_batchnorm_relu_conv import _check
from .ops_elementwise import ReLU
from .ops_norm import BatchNorm
from .ops_reduce import Mean
from .registry import Aval, F, Op, register

_NCHW = (0, 3, 1, 2)
_AXES = (0, 2, 3)
_RELU = ReLU()
_POOL = Mean((2, 3))


@register("batch_norm_relu_mean", inputs=("x", "weight", "bias", "mean", "var"))
class BatchNormReluMean(Op):
    """``mean(relu(batch_norm(permute(x, (0, 3, 1, 2)), weight, bias, mean, var)), (2, 3))``:
    training BatchNorm2d (the batch ``mean`` and ``var``) and ReLU of the NHWC array ``x``,
    averaged over H and W: (N, C)."""

    def __init__(self, eps: float = 1e-5) -> None:
        self.eps = float(eps)

    def compute(self, x, weight, bias, mean, var):
        out = bn_relu_mean.bn_relu_mean(x, weight, bias, mean, var, self.eps)
        if out is None:
            shape = (1, x.shape[3], 1, 1)
            y = BatchNorm(_AXES, self.eps).compute(x.transpose(_NCHW), weight.reshape(shape),
                                                   bias.reshape(shape), mean.reshape(shape),
                                                   var.reshape(shape))
            out = _POOL.compute(_RELU.compute(y))
        return out

    def gradient(self, out_grad, node):
        from .autodiff import gradients

        x, weight, bias, mean, var = node.inputs
        shape = (1, x.shape[3], 1, 1)
        with GradMode(True):  # recorded even under create_graph=False (see NormalizeGrad)
            y = F.batch_norm(F.permute(x, _NCHW), F.reshape(weight, shape),
                             F.reshape(bias, shape), F.reshape(mean, shape),
                             F.reshape(var, shape), axes=_AXES, eps=self.eps)
            out = F.mean(F.relu(y), (2, 3))
        return tuple(gradients([out], list(node.inputs), [out_grad], stop_at_wrt=True))

    def infer(self, x: Aval, weight: Aval, bias: Aval, mean: Aval,  # type: ignore[override]
              var: Aval) -> Aval:
        _check(self.name, x, {"weight": weight, "bias": bias, "mean": mean, "var": var})
        return Aval((x.shape[0], x.shape[3]), x.dtype)


__all__ = ["BatchNormReluMean"]
