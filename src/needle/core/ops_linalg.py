"""Linear algebra: matrix multiplication as ``np.matmul`` (batched, 1-D operands allowed)."""

from __future__ import annotations

import numpy as np

from ..kernels import recycle
from .ops_elementwise import broadcast_shapes
from .registry import Aval, F, Op, ShapeError, fmt_shape, register


def _known(dim: int | None) -> int:
    """A reshape target dim: the size, or -1 where it is unknown (a declared graph)."""
    return -1 if dim is None else dim


@register("matmul", inputs=("a", "b"), methods=("matmul",))
class MatMul(Op):
    """a @ b with NumPy's ``matmul`` rules: leading (batch) dims broadcast; 1-D operands are
    vectors (a 1-D ``a`` is a row, a 1-D ``b`` a column, and that axis is dropped again).

    Shapes: (..., n, k) @ (..., k, m) -> (..., n, m); (k,) @ (..., k, m) -> (..., m);
    (..., n, k) @ (k,) -> (..., n); (k,) @ (k,) -> (). The gradients are g @ b^T and a^T @ g
    on the operands seen as matrices; the engine sums them over broadcast batch dims.

    >>> import needle as ndl
    >>> (ndl.init.ones(4) @ ndl.init.ones(4, 2)).shape
    (2,)
    """

    def compute(self, a, b):
        return np.matmul(a, b)

    def emit(self, args, node):
        return f"np.matmul({args[0]}, {args[1]})"

    def gradient(self, out_grad, node):
        a, b = node.inputs
        a_vec, b_vec = len(a.shape) == 1, len(b.shape) == 1
        if not (a_vec or b_vec):
            # NOTE: skip the adjoint of an input that needs none (x in x @ W): a whole matmul
            return (F.matmul(out_grad, F.transpose(b)) if a.requires_grad else None,
                    F.matmul(F.transpose(a), out_grad) if b.requires_grad else None)
        # a vector operand: compute as matrices ((1, k) row, (k, 1) column), then drop that
        # axis from its adjoint; batch dims stay for the engine to sum back
        k = a.shape[-1]
        a2 = F.reshape(a, (1, _known(k))) if a_vec else a
        b2 = F.reshape(b, (_known(k), 1)) if b_vec else b
        if a_vec and b_vec:  # vector @ vector: a scalar
            batch: tuple = ()
            g2 = F.reshape(out_grad, (1, 1))
        elif a_vec:  # out_grad (*batch, m) as (*batch, 1, m); None dims copy out_grad's
            batch = tuple(node.shape[:-1])
            g2 = F.reshape(out_grad, (*batch, 1, _known(node.shape[-1])))
        else:  # out_grad (*batch, n) as (*batch, n, 1)
            batch = tuple(node.shape[:-1])
            g2 = F.reshape(out_grad, (*batch, _known(node.shape[-1]), 1))
        grad_a = grad_b = None
        if a.requires_grad:
            grad_a = F.matmul(g2, F.transpose(b2))  # (*batch, n or 1, k)
            if a_vec:
                grad_a = F.reshape(grad_a, (*batch, _known(k)))
        if b.requires_grad:
            grad_b = F.matmul(F.transpose(a2), g2)  # (*batch, k, m or 1)
            if b_vec:
                grad_b = F.reshape(grad_b, (*batch, _known(k)))
        return grad_a, grad_b

    def infer(self, a: Aval, b: Aval) -> Aval:
        if len(a.shape) < 1 or len(b.shape) < 1:
            raise ShapeError(f"matmul: inputs must have at least 1 dim, got "
                             f"{fmt_shape(a.shape)} @ {fmt_shape(b.shape)}; use multiply for "
                             "scalars")
        a_vec, b_vec = len(a.shape) == 1, len(b.shape) == 1
        k1 = a.shape[-1]
        k2 = b.shape[0] if b_vec else b.shape[-2]
        if k1 is not None and k2 is not None and k1 != k2:
            expected = "b.shape[0] (b is a vector)" if b_vec else "b.shape[-2]"
            raise ShapeError(f"matmul: inner dimensions differ: {fmt_shape(a.shape)} @ "
                             f"{fmt_shape(b.shape)}; expected a.shape[-1] == {expected}")
        dtype = np.result_type(a.dtype, b.dtype)
        if a_vec and b_vec:
            return Aval((), dtype)
        if a_vec:
            return Aval(tuple(b.shape[:-2]) + (b.shape[-1],), dtype)
        if b_vec:
            return Aval(tuple(a.shape[:-1]), dtype)
        batch = broadcast_shapes(self.name, a.shape[:-2], b.shape[:-2])
        return Aval(batch + (a.shape[-2], b.shape[-1]), dtype)


@register("linear", inputs=("x", "w", "b"))
class Linear(Op):
    """``x @ w + b`` for matrices x (n, k), w (k, m) and a bias b that broadcasts to (n, m)
    (nn.Linear's (1, m)): one node where matmul and add made two. The bias is added in place
    into the product's array, so a vocabulary-sized head writes one (n, m) array, not two,
    and that array is recycled between steps (kernels/recycle.py: no page faults); the
    values are those of ``add(matmul(x, w), b)``, and so are the gradients (g @ w^T, x^T @ g,
    and g summed back to b's shape by the engine)."""

    def compute(self, x, w, b):
        if x.ndim != 2 or w.ndim != 2:
            raise ValueError("x and w must be matrices")  # (the shape rule's error is raised)
        if type(x) is np.ndarray and type(w) is np.ndarray and x.dtype == w.dtype:
            # a vocabulary-sized head: a recycled array, not page-faulted in every step
            out = np.matmul(x, w, out=recycle.empty((x.shape[0], w.shape[1]), x.dtype))
        else:
            out = np.matmul(x, w)
        if b.ndim > 2 or any(d not in (1, n) for d, n in zip(b.shape[::-1], out.shape[::-1])):
            raise ValueError("the bias does not broadcast to the output")
        if out.dtype == np.result_type(out.dtype, b.dtype):
            out += b  # the product's own array: nothing else sees this write
            return out
        return out + b

    def gradient(self, out_grad, node):
        x, w, b = node.inputs
        # NOTE: skip the product of an input that needs no gradient (x in a model's first layer)
        return (F.matmul(out_grad, F.transpose(w)) if x.requires_grad else None,
                F.matmul(F.transpose(x), out_grad) if w.requires_grad else None,
                out_grad if b.requires_grad else None)

    def infer(self, x: Aval, w: Aval, b: Aval) -> Aval:
        if len(x.shape) != 2 or len(w.shape) != 2:
            raise ShapeError(f"linear: x and w must be matrices, got {fmt_shape(x.shape)} and "
                             f"{fmt_shape(w.shape)}")
        k1, k2 = x.shape[1], w.shape[0]
        if k1 is not None and k2 is not None and k1 != k2:
            raise ShapeError(f"linear: inner dimensions differ: {fmt_shape(x.shape)} @ "
                             f"{fmt_shape(w.shape)}")
        out = (x.shape[0], w.shape[1])
        merged = broadcast_shapes(self.name, out, b.shape)
        if len(merged) != 2 or any(d is not None and d != m for d, m in zip(out, merged)):
            raise ShapeError(f"linear: a bias of shape {fmt_shape(b.shape)} does not broadcast "
                             f"to the output's {fmt_shape(out)}")
        return Aval(merged, np.result_type(x.dtype, w.dtype, b.dtype))
