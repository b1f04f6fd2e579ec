"""A ``BatchNorm2d -> ReLU -> max pool`` block as one node each way:

- ``batch_norm_relu_max_pool2d``: the forward, the pool of the activation made where the
  pool reads it (never stored);
- ``batch_norm_relu_max_pool2d_grad``: the gradient reaching the BatchNorm's input through
  the ReLU and the pool, ``max_pool2d_scatter`` (a full-size gradient, zeros but at each
  window's maximum) then ``batch_norm_relu_grad``, the scattered gradient made block by
  block from x (never stored as a whole; the activation never read).

Compiled plans (compiler/batchnorm_relu_pool_rewrite.py) run the ops they replace as these,
whose kernels are kernels/bn_relu_pool.py. Values: bit for bit those of the ops replaced
(where a kernel does not run, those ops' own computations). Ordinary ops (every mode, their
gradients by autodiff of the composites).

``x`` is BatchNorm's NCHW input (statistics over N, H and W), ``y`` the pooled activation
``max_pool2d(relu(batch_norm(x)))`` and ``g`` its gradient; ``weight``, ``bias``, ``mean``
and ``var`` hold C values each, shaped as batch_norm takes them. Outputs: ``(dx, dweight,
dbias)`` as batch_norm_relu_grad's.
"""

from __future__ import annotations

from ..kernels import bn_relu_pool
from ..kernels.pool import max_pool, max_pool_scatter, out_size
from .context import GradMode
from .ops_batchnorm_relu import BatchNormReluGrad
from .ops_elementwise import ReLU
from .ops_norm import BatchNorm
from .registry import Aval, F, Op, ShapeError, fmt_shape, register

_AXES = (0, 2, 3)
_RELU = ReLU()


def _pooled_shape(op: str, x: Aval, k: int, stride: int) -> tuple:
    """The (N, C, Ho, Wo) of k x k windows of NCHW ``x`` (ops_pool.py's rule and checks)."""
    if len(x.shape) != 4 or x.shape[2] is None or x.shape[3] is None:
        raise ShapeError(f"{op}: expected NCHW input of known height and width, got "
                         f"{fmt_shape(x.shape)}")
    n, c, h, w = x.shape
    if h < k or w < k:
        raise ShapeError(f"{op}: kernel {k}x{k} is larger than the input {h}x{w}")
    return (n, c, out_size(h, k, stride), out_size(w, k, stride))


@register("batch_norm_relu_max_pool2d", inputs=("x", "weight", "bias", "mean", "var"))
class BatchNormReluMaxPool2d(Op):
    """``max_pool2d(relu(batch_norm(x, weight, bias, mean, var)))``: training BatchNorm2d
    (axes (0, 2, 3)) and ReLU of NCHW ``x``, then its k x k max pool (``stride``)."""

    def __init__(self, kernel_size: int, stride: int, eps: float = 1e-5) -> None:
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)
        self.eps = float(eps)

    def compute(self, x, weight, bias, mean, var):
        k, s = self.kernel_size, self.stride
        out = bn_relu_pool.forward(x, weight, bias, mean, var, self.eps, k, s)
        if out is None:
            act = _RELU.compute(BatchNorm(_AXES, self.eps).compute(x, weight, bias, mean, var))
            out = max_pool(act, k, s)
        return out

    def gradient(self, out_grad, node):
        from .autodiff import gradients

        x, weight, bias, mean, var = node.inputs
        with GradMode(True):  # recorded even under create_graph=False (see NormalizeGrad)
            act = F.relu(F.batch_norm(x, weight, bias, mean, var, axes=_AXES, eps=self.eps))
            out = F.max_pool2d(act, kernel_size=self.kernel_size, stride=self.stride)
        return tuple(gradients([out], list(node.inputs), [out_grad], stop_at_wrt=True))

    def infer(self, x: Aval, weight: Aval, bias: Aval, mean: Aval,  # type: ignore[override]
              var: Aval) -> Aval:
        act = BatchNorm(_AXES, self.eps).infer(x, weight, bias, mean, var)
        return Aval(_pooled_shape(self.name, x, self.kernel_size, self.stride), act.dtype)


@register("batch_norm_relu_max_pool2d_grad",
          inputs=("g", "y", "x", "weight", "bias", "mean", "var"))
class BatchNormReluMaxPool2dGrad(Op):
    """``batch_norm_relu_grad(max_pool2d_scatter(relu(batch_norm(x, weight, bias, mean, var)),
    y, g), x, weight, bias, mean, var)``: ``(dx, dweight, dbias)`` of training BatchNorm2d
    (axes (0, 2, 3)) followed by a ReLU and a k x k max pool (``stride``), for the pool's
    output ``y`` and its gradient ``g``."""

    returns_tuple = True

    def __init__(self, kernel_size: int, stride: int, eps: float = 1e-5) -> None:
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)
        self.eps = float(eps)

    def compute(self, g, y, x, weight, bias, mean, var):
        k, s = self.kernel_size, self.stride
        fused = bn_relu_pool.backward(g, y, x, weight, bias, mean, var, self.eps, k, s)
        if fused is None:
            act = _RELU.compute(BatchNorm(_AXES, self.eps).compute(x, weight, bias, mean, var))
            scattered = max_pool_scatter(act, y, g, k, s)
            fused = BatchNormReluGrad(_AXES, self.eps).compute(scattered, x, weight, bias, mean,
                                                              var)
        return fused

    def gradient(self, out_grad, node):
        from .autodiff import gradients

        g, y, x, weight, bias, mean, var = node.inputs
        with GradMode(True):  # recorded even under create_graph=False (see NormalizeGrad)
            act = F.relu(F.batch_norm(x, weight, bias, mean, var, axes=_AXES, eps=self.eps))
            scattered = F.max_pool2d_scatter(act, y, g, kernel_size=self.kernel_size,
                                             stride=self.stride)
            grads = F.batch_norm_relu_grad(scattered, x, weight, bias, mean, var, axes=_AXES,
                                           eps=self.eps)
            outputs = [grads[0], grads[1], grads[2]]
        seeds = [out_grad[i] for i in range(3)]
        dg, dx, dweight, dbias = gradients(outputs, [g, x, weight, bias], seeds,
                                           stop_at_wrt=True)
        return dg, None, dx, dweight, dbias, None, None

    def infer(self, g: Aval, y: Aval, x: Aval, weight: Aval,  # type: ignore[override]
              bias: Aval, mean: Aval, var: Aval) -> tuple:
        pooled = _pooled_shape(self.name, x, self.kernel_size, self.stride)
        for name, a in (("g", g), ("y", y)):
            if len(a.shape) != 4 or any(p is not None and q is not None and p != q
                                        for p, q in zip(a.shape, pooled)):
                raise ShapeError(f"{self.name}: {name} {fmt_shape(a.shape)} is not the pooled "
                                 f"shape {fmt_shape(pooled)}")
        return BatchNormReluGrad(_AXES, self.eps).infer(Aval(x.shape, g.dtype), x, weight, bias,
                                                        mean, var)


__all__ = ["BatchNormReluMaxPool2d", "BatchNormReluMaxPool2dGrad"]
