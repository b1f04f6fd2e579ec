"""Linear algebra: matrix multiplication as ``np.matmul`` (batched, 1-D operands allowed)."""

from __future__ import annotations

import numpy as np

from ..kernels import blas_policy, linear
from .ops_elementwise import broadcast_shapes
from .registry import Aval, F, Op, ShapeError, fmt_shape, register


def _known(dim: int | None) -> int:
    """A reshape target dim: the size, or -1 where it is unknown (a declared graph)."""
    return -1 if dim is None else dim


def _may_split(a_shape: tuple, b_shape: tuple) -> bool:
    """Whether a product of matrices of these (known) shapes is large enough for
    kernels/blas_policy.py to split it into blocks while a plan holds BLAS on one thread."""
    return len(a_shape) == 2 and len(b_shape) == 2 and \
        blas_policy.splits(a_shape[0], a_shape[1], b_shape[1])


#: the helper that compiled plans call for large products (kernels/blas_policy.py)
_BLAS_HELPERS = {"_blas_matmul": blas_policy.matmul}


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

    emit_helpers = _BLAS_HELPERS

    def compute(self, a, b):
        return blas_policy.matmul(a, b)

    def large_products(self, node) -> bool:
        """Whether a jitted plan running this step should hold BLAS (kernels/blas_policy)."""
        a, b = node.inputs
        return _may_split(a.shape, b.shape)

    def emit(self, args, node):
        a, b = node.inputs
        call = "_blas_matmul" if _may_split(a.shape, b.shape) else "np.matmul"
        return f"{call}({args[0]}, {args[1]})"

    def gradient(self, out_grad, node):
        a, b = node.inputs
        a_vec, b_vec = len(a.shape) == 1, len(b.shape) == 1
        if not (a_vec or b_vec):
            # NOTE: skip the adjoint of an input that needs none (x in x @ W): a whole matmul;
            # g @ b^T and a^T @ g are one node each (no transpose node: see TransposedMatMul)
            return (F.transposed_matmul(out_grad, b, False, True) if a.requires_grad else None,
                    F.transposed_matmul(a, out_grad, True, False) if b.requires_grad else None)
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
            grad_a = F.transposed_matmul(g2, b2, False, True)  # (*batch, n or 1, k)
            if a_vec:
                grad_a = F.reshape(grad_a, (*batch, _known(k)))
        if b.requires_grad:
            grad_b = F.transposed_matmul(a2, g2, True, False)  # (*batch, k, m or 1)
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


@register("transposed_matmul", inputs=("a", "b"))
class TransposedMatMul(Op):
    """``a @ b`` with either operand's last two axes swapped first (``transpose_a``,
    ``transpose_b``): matmul's and linear's gradients ``g @ b^T`` and ``a^T @ g`` as one node
    each, where a transpose node and a matmul made two. ``np.matmul`` reads the swapped
    operand as a strided view (BLAS takes it transposed: no copy). Both operands have at
    least 2 dims; leading (batch) dims broadcast as in matmul.

    >>> import needle as ndl
    >>> ndl.ops.transposed_matmul(ndl.init.ones(3, 4), ndl.init.ones(3, 2), True, False).shape
    (4, 2)
    """

    def __init__(self, transpose_a: bool = False, transpose_b: bool = False) -> None:
        self.transpose_a = bool(transpose_a)
        self.transpose_b = bool(transpose_b)

    emit_helpers = _BLAS_HELPERS

    def compute(self, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError("inputs must be matrices")  # (the shape rule's error is raised)
        return blas_policy.transposed_matmul(a, b, self.transpose_a, self.transpose_b)

    def emit(self, args, node):
        a = f"{args[0]}.swapaxes(-1, -2)" if self.transpose_a else args[0]
        b = f"{args[1]}.swapaxes(-1, -2)" if self.transpose_b else args[1]
        call = "_blas_matmul" if self.large_products(node) else "np.matmul"
        return f"{call}({a}, {b})"

    def large_products(self, node) -> bool:
        """Whether a jitted plan running this step should hold BLAS (kernels/blas_policy)."""
        a_shape, b_shape = (tuple(x.shape[::-1]) if swap and len(x.shape) == 2 else tuple(x.shape)
                            for x, swap in zip(node.inputs, (self.transpose_a, self.transpose_b)))
        return _may_split(a_shape, b_shape)

    def gradient(self, out_grad, node):
        # c = op_a(a) @ op_b(b), op_x the identity or the swap of the last two axes: each
        # adjoint is again one (transposed) product of out_grad and the other operand
        a, b = node.inputs
        ta, tb, g = self.transpose_a, self.transpose_b, out_grad
        grad_a = grad_b = None
        if a.requires_grad:  # g @ op_b(b)^T, swapped when a was
            grad_a = (F.transposed_matmul(b, g, tb, True) if ta
                      else F.transposed_matmul(g, b, False, not tb))
        if b.requires_grad:  # op_a(a)^T @ g, swapped when b was
            grad_b = (F.transposed_matmul(g, a, True, ta) if tb
                      else F.transposed_matmul(a, g, not ta, False))
        return grad_a, grad_b

    def infer(self, a: Aval, b: Aval) -> Aval:
        if len(a.shape) < 2 or len(b.shape) < 2:
            raise ShapeError(f"transposed_matmul: inputs must have at least 2 dims, got "
                             f"{fmt_shape(a.shape)} and {fmt_shape(b.shape)}; use matmul for "
                             "vectors")

        def swapped(x: Aval, swap: bool) -> Aval:
            return Aval((*x.shape[:-2], x.shape[-1], x.shape[-2]), x.dtype) if swap else x

        a2, b2 = swapped(a, self.transpose_a), swapped(b, self.transpose_b)
        k1, k2 = a2.shape[-1], b2.shape[-2]
        if k1 is not None and k2 is not None and k1 != k2:
            raise ShapeError(f"transposed_matmul: inner dimensions differ: "
                             f"{fmt_shape(a.shape)}{'^T' if self.transpose_a else ''} @ "
                             f"{fmt_shape(b.shape)}{'^T' if self.transpose_b else ''}")
        batch = broadcast_shapes(self.name, a.shape[:-2], b.shape[:-2])
        return Aval(batch + (a2.shape[-2], b2.shape[-1]), np.result_type(a.dtype, b.dtype))


def linear_grads(g, x, w, b) -> tuple:
    """The adjoints of ``linear(x, w, b)`` for its output's adjoint ``g``: g @ w^T, x^T @ g
    and g (summed back to b's shape by the engine), each only where its input needs one
    (x in a model's first layer does not: its product is skipped)."""
    return (F.transposed_matmul(g, w, False, True) if x.requires_grad else None,
            F.transposed_matmul(x, g, True, False) if w.requires_grad else None,
            g if b.requires_grad else None)


@register("linear", inputs=("x", "w", "b"))
class Linear(Op):
    """``x @ w + b`` for matrices x (n, k), w (k, m) and a bias b that broadcasts to (n, m)
    (nn.Linear's (1, m)): one node where matmul and add made two. The bias is added in place
    into the product's array, so a vocabulary-sized head writes one (n, m) array, not two,
    and that array is recycled between steps (kernels/recycle.py: no page faults); the
    values are those of ``add(matmul(x, w), b)``, and so are the gradients (g @ w^T, x^T @ g,
    and g summed back to b's shape by the engine)."""

    def large_products(self, node) -> bool:
        """Whether a jitted plan running this step should hold BLAS (kernels/blas_policy)."""
        x, w = node.inputs[:2]  # (linear_residual has a fourth input)
        return _may_split(x.shape, w.shape)

    def compute(self, x, w, b):
        return linear.forward(x, w, b)

    def gradient(self, out_grad, node):
        x, w, b = node.inputs[:3]
        return linear_grads(out_grad, x, w, b)

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
