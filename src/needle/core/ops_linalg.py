"""Linear algebra: batched matrix multiplication with broadcast leading dims."""

from __future__ import annotations

import numpy as np

from . import api as F
from .ops_elementwise import broadcast_shapes
from .registry import Aval, Op, ShapeError, fmt_shape, register


@register("matmul", inputs=("a", "b"), methods=("matmul",))
class MatMul(Op):
    """a @ b for inputs of at least 2 dims; leading (batch) dims broadcast as in NumPy.

    Shapes: (..., n, k) @ (..., k, m) -> (..., m). The gradients are g @ b^T and a^T @ g;
    the engine sums them over broadcast batch dims.
    """

    def compute(self, a, b):
        return np.matmul(a, b)

    def emit(self, args, node):
        return f"np.matmul({args[0]}, {args[1]})"

    def gradient(self, out_grad, node):
        a, b = node.inputs
        # NOTE: skip the adjoint of an input that needs none (x in x @ W): a whole matmul
        return (F.matmul(out_grad, F.transpose(b)) if a.requires_grad else None,
                F.matmul(F.transpose(a), out_grad) if b.requires_grad else None)

    def infer(self, a: Aval, b: Aval) -> Aval:
        if len(a.shape) < 2 or len(b.shape) < 2:
            raise ShapeError(f"matmul: inputs must have at least 2 dims, got "
                             f"{fmt_shape(a.shape)} @ {fmt_shape(b.shape)}; reshape vectors "
                             "to (1, n) or (n, 1)")
        k1, k2 = a.shape[-1], b.shape[-2]
        if k1 is not None and k2 is not None and k1 != k2:
            raise ShapeError(f"matmul: inner dimensions differ: {fmt_shape(a.shape)} @ "
                             f"{fmt_shape(b.shape)}; expected a.shape[-1] == b.shape[-2]")
        batch = broadcast_shapes(self.name, a.shape[:-2], b.shape[:-2])
        return Aval(batch + (a.shape[-2], b.shape[-1]), np.result_type(a.dtype, b.dtype))
