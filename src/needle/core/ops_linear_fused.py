"""``linear_relu`` and ``linear_residual``: a dense layer and the ReLU or residual add after
it as one node.

A Transformer block's linears are followed by a ReLU (the feed-forward's first) or a
residual add (the attention's output projection and the feed-forward's second). Compiled
plans (compiler/linear_epilogue_rewrite.py) run each pair as one of these ops, whose kernel
(kernels/linear.py) finishes every block of the product with the bias, the residual and the
ReLU while it is in cache: no pass and no array of their own. The values are the separate
ops' bit for bit; each is an ordinary op (every mode, a gradient written with ops), so a plan
holding it can be differentiated, saved or interpreted like any other.
"""

from __future__ import annotations

import numpy as np

from ..kernels import linear
from .ops_linalg import Linear, linear_grads
from .registry import Aval, F, ShapeError, fmt_shape, register


@register("linear_relu", inputs=("x", "w", "b"))
class LinearRelu(Linear):
    """``relu(x @ w + b)``: ``linear`` and the ReLU after it, one node (the ReLU in the
    product's epilogue). Gradient: ``relu_grad`` of the output (the same mask as of the
    input: ``relu(a) > 0`` exactly where ``a > 0``, NaN included), then linear's."""

    def compute(self, x, w, b):
        return linear.forward(x, w, b, relu=True)

    def gradient(self, out_grad, node):
        x, w, b = node.inputs
        return linear_grads(F.relu_grad(node, out_grad), x, w, b)


@register("linear_residual", inputs=("x", "w", "b", "residual"))
class LinearResidual(Linear):
    """``residual + (x @ w + b)``: ``linear`` and a residual add after it, one node (the add
    in the product's epilogue). ``residual`` has the output's shape."""

    def compute(self, x, w, b, residual):
        return linear.forward(x, w, b, residual=residual)

    def gradient(self, out_grad, node):
        x, w, b, residual = node.inputs
        return (*linear_grads(out_grad, x, w, b),
                out_grad if residual.requires_grad else None)

    def infer(self, x: Aval, w: Aval, b: Aval,  # type: ignore[override]
              residual: Aval) -> Aval:
        out = Linear.infer(self, x, w, b)
        if len(residual.shape) != 2 or any(
                d is not None and r is not None and d != r
                for d, r in zip(out.shape, residual.shape)):
            raise ShapeError(f"linear_residual: a residual of shape "
                             f"{fmt_shape(residual.shape)} is not the output's "
                             f"{fmt_shape(out.shape)}")
        return Aval(out.shape, np.result_type(out.dtype, residual.dtype))

