"""Elementwise primitives: arithmetic, activations, comparisons, casts.

Binary ops broadcast their operands as NumPy does; their gradients return adjoints of the
broadcast shape and the autodiff engine sums them back to each input (in one place).
Compute code calls NumPy functions that dispatch on their arguments, so the same code runs
on CuPy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..kernels import threaded_elementwise
from ..kernels.layout import ADD_ROWS_MIN_SIZE
from ..kernels.layout import add as add_rows
from .registry import Aval, F, Op, ShapeError, fmt_shape, register

#: the size below which relu and its gradient skip the threaded kernels' dispatch at once
#: (checked here, inline: the call alone costs ~0.3-1 us, a tenth of a small op)
_THREADED_MIN = threaded_elementwise.MIN_ELEMENTS


def scalar_value(value: Any) -> int | float | bool:
    """A Python number from a number or a one-element array (hashable op attribute)."""
    if isinstance(value, bool | int | float):
        return value
    arr = value if hasattr(value, "item") and hasattr(value, "size") else np.asarray(value)
    if arr.size != 1:  # (CuPy arrays have item() too; np.asarray would refuse them)
        raise ShapeError(f"expected a scalar or one-element array, got shape {arr.shape}")
    return arr.item()


def broadcast_shapes(op_name: str, *shapes: tuple) -> tuple:
    """NumPy broadcasting of static shapes, where None (unknown) dims are allowed."""
    ndim = max(len(s) for s in shapes)
    out = []
    for i in range(ndim):
        dims = [s[len(s) - ndim + i] for s in shapes if len(s) - ndim + i >= 0]
        known = {d for d in dims if d is not None and d != 1}
        if len(known) > 1:
            listed = " and ".join(fmt_shape(s) for s in shapes)
            raise ShapeError(f"{op_name}: shapes {listed} do not broadcast "
                             f"(axis {i - ndim}: sizes {sorted(known)})")
        if known:
            out.append(known.pop())
        elif None in dims:
            out.append(None)
        else:
            out.append(1)
    return tuple(out)


def _float_dtype(dtype: np.dtype) -> np.dtype:
    return dtype if dtype.kind in "fc" else np.dtype(np.float64)


class UnaryOp(Op):
    """Same shape out; transcendental ops give floats."""

    float_result = False

    def infer(self, a: Aval) -> Aval:
        return Aval(a.shape, _float_dtype(a.dtype) if self.float_result else a.dtype)


class BinaryOp(Op):
    """Broadcast shape out, NumPy's dtype promotion."""

    def infer(self, a: Aval, b: Aval) -> Aval:
        return Aval(broadcast_shapes(self.name, a.shape, b.shape),
                    np.result_type(a.dtype, b.dtype))


class ScalarOp(UnaryOp):
    """An op with one tensor and one Python-number attribute ``scalar``."""

    def __init__(self, scalar: Any) -> None:
        self.scalar = scalar_value(scalar)

    def infer(self, a: Aval) -> Aval:
        return Aval(a.shape, np.result_type(a.dtype, self.scalar))


#: a read-only 0-d zero of each float dtype: ufuncs take it faster than a Python 0 (whose
#: dtype NumPy resolves against the array's on every call)
_ZEROS = {np.dtype(t): np.zeros((), t) for t in (np.float16, np.float32, np.float64)}
for _zero in _ZEROS.values():
    _zero.flags.writeable = False


# -- arithmetic ------------------------------------------------------------------------------
@register("add", inputs=("a", "b"))
class EWiseAdd(BinaryOp):
    """a + b, broadcast."""

    def ufunc(self):
        return ("add", ())

    def scalar_expr(self, args, const):
        return f"({args[0]} + {args[1]})"

    def compute(self, a, b):
        if a.size >= ADD_ROWS_MIN_SIZE or b.size >= ADD_ROWS_MIN_SIZE:
            return add_rows(a, b)
        return a + b  # NOTE: small arrays skip the kernel: its call would cost more than the add

    def gradient(self, out_grad, node):
        return out_grad, out_grad


@register("add_scalar", inputs=("a",))
class AddScalar(ScalarOp):
    """a + scalar."""

    def ufunc(self):
        return ("add", (self.scalar,))

    def scalar_expr(self, args, const):
        return f"({args[0]} + {const(self.scalar)})"

    def compute(self, a):
        return a + self.scalar

    def gradient(self, out_grad, node):
        return out_grad


@register("multiply", inputs=("a", "b"))
class EWiseMul(BinaryOp):
    """a * b, broadcast."""

    def ufunc(self):
        return ("multiply", ())

    def scalar_expr(self, args, const):
        return f"({args[0]} * {args[1]})"

    def compute(self, a, b):
        return a * b

    def gradient(self, out_grad, node):
        a, b = node.inputs
        return (out_grad * b if a.requires_grad else None,
                out_grad * a if b.requires_grad else None)


@register("mul_scalar", inputs=("a",))
class MulScalar(ScalarOp):
    """a * scalar."""

    def ufunc(self):
        return ("multiply", (self.scalar,))

    def scalar_expr(self, args, const):
        return f"({args[0]} * {const(self.scalar)})"

    def compute(self, a):
        return a * self.scalar

    def gradient(self, out_grad, node):
        return out_grad * self.scalar


@register("divide", inputs=("a", "b"))
class EWiseDiv(BinaryOp):
    """a / b, broadcast."""

    def ufunc(self):
        return ("divide", ())

    def scalar_expr(self, args, const):
        return f"({args[0]} / {args[1]})"

    def compute(self, a, b):
        return a / b

    def gradient(self, out_grad, node):
        b = node.inputs[1]
        grad_a = out_grad / b
        # d(a/b)/db = -a / b**2 = -(1/b) * out
        return grad_a, -(grad_a * node) if b.requires_grad else None


@register("divide_scalar", inputs=("a",))
class DivScalar(ScalarOp):
    """a / scalar."""

    def ufunc(self):
        return ("divide", (self.scalar,))

    def scalar_expr(self, args, const):
        return f"({args[0]} / {const(self.scalar)})"

    def compute(self, a):
        return a / self.scalar

    def gradient(self, out_grad, node):
        return out_grad / self.scalar


@register("apply_mask", inputs=("a", "mask"))
class ApplyMask(BinaryOp):
    """(a * mask) / scalar, broadcast: Dropout's output (a 0/1 mask, scalar = 1 - p) as one
    node instead of a product and a division.

    Its gradient is the same op on the adjoint: (g * mask) / scalar. For a 0/1 mask that is
    bit for bit (g / scalar) * mask, the gradient of the two ops it replaces (multiplying by 0
    or 1 is exact; both orders give NaN, inf and signed zeros alike), except where g / scalar
    overflows at a dropped unit: 0 here (PyTorch's value), NaN there. For any other ``mask``
    it is the exact gradient, rounded in this order.
    """

    def __init__(self, scalar: Any) -> None:
        self.scalar = scalar_value(scalar)

    def infer(self, a: Aval, mask: Aval) -> Aval:
        return Aval(broadcast_shapes(self.name, a.shape, mask.shape),
                    np.result_type(np.result_type(a.dtype, mask.dtype), self.scalar))

    def scalar_expr(self, args, const):
        return f"(({args[0]} * {args[1]}) / {const(self.scalar)})"

    def compute(self, a, mask):
        out = a * mask
        if out.dtype.kind == "f" and type(out) is np.ndarray:  # in place: one allocation
            return np.true_divide(out, self.scalar, out=out)
        return out / self.scalar

    def gradient(self, out_grad, node):
        a, mask = node.inputs
        return (F.apply_mask(out_grad, mask, self.scalar) if a.requires_grad else None,
                F.apply_mask(out_grad, a, self.scalar) if mask.requires_grad else None)


@register("power_scalar", inputs=("a",))
class PowerScalar(ScalarOp):
    """a ** scalar (an integer or real exponent)."""

    def ufunc(self):
        # NOTE: NumPy's ``a ** s`` takes fast paths for -1, 0, 0.5 and 1 whose results can differ
        # in the last bit from np.power; only 2 (np.square) and other exponents are emitted
        if self.scalar == 2:
            return ("square", ())
        if self.scalar in (-1, 0, 0.5, 1):
            return None
        return ("power", (self.scalar,))

    def scalar_expr(self, args, const):
        a, s = args[0], self.scalar  # NumPy's fast paths for these exponents, then pow
        if s == 2:
            return f"({a} * {a})"
        if s == 1:
            return a
        if s == 0:
            return const(1)
        if s == 0.5:
            return f"np.sqrt({a})"
        if s == -1:
            return f"({const(1)} / {a})"
        return f"({a} ** {const(s)})"

    def compute(self, a):
        return a**self.scalar

    def gradient(self, out_grad, node):
        a = node.inputs[0]
        if self.scalar == 0:
            return out_grad * 0
        if self.scalar == 1:
            return out_grad
        if self.scalar == 2:
            return out_grad * (a * 2)
        return out_grad * (a ** (self.scalar - 1) * self.scalar)


@register("power", inputs=("a", "b"))
class EWisePow(BinaryOp):
    """a ** b elementwise, differentiable in both (a > 0 where b's gradient is needed)."""

    def compute(self, a, b):
        return a**b

    def gradient(self, out_grad, node):
        a, b = node.inputs
        grad_a = out_grad * b * a ** (b - 1) if a.requires_grad else None
        grad_b = out_grad * node * F.log(a) if b.requires_grad else None
        return grad_a, grad_b


@register("negate", inputs=("a",))
class Negate(UnaryOp):
    """-a."""

    def ufunc(self):
        return ("negative", ())

    def scalar_expr(self, args, const):
        return f"(-{args[0]})"

    def compute(self, a):
        return -a

    def gradient(self, out_grad, node):
        return -out_grad


# -- transcendental and activations ------------------------------------------------------------
@register("log", inputs=("a",), methods=("log",))
class Log(UnaryOp):
    """Natural logarithm."""

    float_result = True

    def ufunc(self):
        return ("log", ())

    def scalar_expr(self, args, const):
        return f"np.log({args[0]})"

    def compute(self, a):
        return np.log(a)

    def gradient(self, out_grad, node):
        return out_grad / node.inputs[0]


@register("exp", inputs=("a",), methods=("exp",))
class Exp(UnaryOp):
    """e ** a; the gradient reuses the output."""

    float_result = True

    def ufunc(self):
        return ("exp", ())

    def scalar_expr(self, args, const):
        return f"np.exp({args[0]})"

    def compute(self, a):
        return np.exp(a)

    def gradient(self, out_grad, node):
        return out_grad * node


@register("relu", inputs=("a",), methods=("relu",))
class ReLU(UnaryOp):
    """max(a, 0); gradient 0 at a = 0, as in PyTorch."""

    def ufunc(self):
        return ("maximum", (0,))

    def scalar_expr(self, args, const):
        return f"np.maximum({args[0]}, {const(0)})"

    def compute(self, a):
        if a.size >= _THREADED_MIN:  # large arrays: one pass on needle's threads
            out = threaded_elementwise.relu(a)
            if out is not None:
                return out
        # a zero of a's own dtype: NumPy resolves a Python 0 per call (~0.2 us on small arrays)
        return np.maximum(a, _ZEROS.get(a.dtype, 0) if type(a) is np.ndarray else 0)

    def gradient(self, out_grad, node):
        return F.relu_grad(node.inputs[0], out_grad)


@register("relu_grad", inputs=("a", "g"))
class ReLUGrad(BinaryOp):
    """g * (a > 0): ReLU's adjoint as one node (0 where a <= 0 or a is NaN; -0.0 and NaN
    from g kept, as the product with a 0/1 mask gives them).

    NOTE: the mask is cast to the result dtype before the multiply: a float x bool product
    runs NumPy's slower casting loop, and one node instead of compare + multiply halves the
    Python overhead of ReLU's backward. The result dtype is a's and g's common type, so the
    comparison never runs in a narrower dtype than a's (the fused form compares there too).
    """

    def compute(self, a, g):
        if a.size >= _THREADED_MIN:  # large arrays: one pass on needle's threads
            out = threaded_elementwise.relu_grad(a, g)
            if out is not None:
                return out
        zero = _ZEROS.get(a.dtype, 0) if type(a) is np.ndarray else 0
        dtype = g.dtype if a.dtype is g.dtype else np.result_type(a.dtype, g.dtype)
        mask = (a > zero).astype(dtype)
        if mask.shape == g.shape:
            mask *= g  # in place: one allocation (x * 1 and x * 0 commute bitwise)
            return mask
        return mask * g

    def scalar_expr(self, args, const):
        return f"({args[1]} * ({const(1)} if {args[0]} > {const(0)} else {const(0)}))"

    def gradient(self, out_grad, node):
        return None, F.relu_grad(node.inputs[0], out_grad)


@register("tanh", inputs=("a",), methods=("tanh",))
class Tanh(UnaryOp):
    """Hyperbolic tangent; gradient 1 - out**2."""

    float_result = True

    def ufunc(self):
        return ("tanh", ())

    def scalar_expr(self, args, const):
        return f"np.tanh({args[0]})"

    def compute(self, a):
        return np.tanh(a)

    def gradient(self, out_grad, node):
        return out_grad * (1 - node * node)


@register("sigmoid", inputs=("a",), methods=("sigmoid",))
class Sigmoid(UnaryOp):
    """1 / (1 + exp(-a)), computed as (1 + tanh(a/2)) / 2 so no exp can overflow."""

    float_result = True

    def compute(self, a):
        out = np.tanh(a * 0.5)
        out += 1
        out *= 0.5
        return out

    def scalar_expr(self, args, const):
        half = const(0.5)
        return f"((np.tanh({args[0]} * {half}) + {const(1)}) * {half})"

    def gradient(self, out_grad, node):
        return out_grad * (node * (1 - node))


@register("sqrt", inputs=("a",), methods=("sqrt",))
class Sqrt(UnaryOp):
    """Square root; gradient 1 / (2 out)."""

    float_result = True

    def ufunc(self):
        return ("sqrt", ())

    def scalar_expr(self, args, const):
        return f"np.sqrt({args[0]})"

    def compute(self, a):
        return np.sqrt(a)

    def gradient(self, out_grad, node):
        return out_grad / (node * 2)


@register("abs", inputs=("a",), methods=("abs",))
class Abs(UnaryOp):
    """|a|; gradient sign(a) (0 at 0)."""

    def ufunc(self):
        return ("absolute", ())

    def scalar_expr(self, args, const):
        return f"abs({args[0]})"

    def compute(self, a):
        return np.abs(a)

    def gradient(self, out_grad, node):
        return out_grad * F.sign(node.inputs[0])


@register("erf", inputs=("a",))
class Erf(UnaryOp):
    """The error function, to within 1.2e-7 (Numerical Recipes' erfc Chebyshev fit).

    NumPy has no erf; this keeps GELU exact to float32 precision without SciPy.
    """

    float_result = True

    def compute(self, a):
        z = np.abs(a)
        t = 1.0 / (1.0 + 0.5 * z)
        poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
            -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
                -0.82215223 + t * 0.17087277))))))))
        out = 1.0 - t * np.exp(poly)
        return (np.sign(a) * out).astype(a.dtype, copy=False)

    def gradient(self, out_grad, node):
        # d erf(x) / dx = 2 / sqrt(pi) * exp(-x^2)
        a = node.inputs[0]
        return out_grad * (F.exp(-(a * a)) * (2.0 / np.sqrt(np.pi)))


@register("maximum", inputs=("a", "b"))
class Maximum(BinaryOp):
    """Elementwise max(a, b); at ties each input gets half the gradient (as PyTorch)."""

    def ufunc(self):
        return ("maximum", ())

    def scalar_expr(self, args, const):
        return f"np.maximum({args[0]}, {args[1]})"

    def compute(self, a, b):
        return np.maximum(a, b)

    def gradient(self, out_grad, node):
        a, b = node.inputs
        dtype = out_grad.dtype
        tie_half = F.astype(F.compare(a, b, "eq"), dtype) * 0.5
        to_a = F.astype(F.compare(a, b, "gt"), dtype) + tie_half
        to_b = F.astype(F.compare(a, b, "lt"), dtype) + tie_half
        return out_grad * to_a, out_grad * to_b


@register("where", inputs=("condition", "a", "b"))
class Where(Op):
    """``condition ? a : b`` elementwise, broadcast; the condition gets no gradient."""

    def compute(self, condition, a, b):
        return np.where(condition, a, b)

    def scalar_expr(self, args, const):
        return f"({args[1]} if {args[0]} else {args[2]})"

    def gradient(self, out_grad, node):
        condition = node.inputs[0]
        zeros = F.full_like(out_grad, 0)
        return None, F.where(condition, out_grad, zeros), F.where(condition, zeros, out_grad)

    def infer(self, condition: Aval, a: Aval, b: Aval) -> Aval:
        shape = broadcast_shapes(self.name, condition.shape, a.shape, b.shape)
        return Aval(shape, np.result_type(a.dtype, b.dtype))


# -- non-differentiable ops ------------------------------------------------------------------
_COMPARE = {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
            "eq": np.equal, "ne": np.not_equal}
_OPERATOR = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}


def _check_kind(kind: str) -> str:
    if kind not in _COMPARE:
        raise ValueError(f"compare: kind must be one of {sorted(_COMPARE)}, got {kind!r}")
    return kind


@register("compare", inputs=("a", "b"))
class Compare(BinaryOp):
    """Elementwise comparison a <kind> b (lt, le, gt, ge, eq, ne) as a bool tensor."""

    differentiable = False

    def __init__(self, kind: str) -> None:
        self.kind = _check_kind(kind)

    def compute(self, a, b):
        return _COMPARE[self.kind](a, b)

    def scalar_expr(self, args, const):
        return f"({args[0]} {_OPERATOR[self.kind]} {args[1]})"

    def infer(self, a: Aval, b: Aval) -> Aval:
        return Aval(broadcast_shapes(self.name, a.shape, b.shape), np.dtype(bool))


@register("compare_scalar", inputs=("a",))
class CompareScalar(UnaryOp):
    """Elementwise comparison with a Python number, as a bool tensor."""

    differentiable = False

    def __init__(self, scalar: Any, kind: str) -> None:
        self.scalar = scalar_value(scalar)
        self.kind = _check_kind(kind)

    def compute(self, a):
        return _COMPARE[self.kind](a, self.scalar)

    def scalar_expr(self, args, const):
        return f"({args[0]} {_OPERATOR[self.kind]} {const(self.scalar)})"

    def infer(self, a: Aval) -> Aval:
        return Aval(a.shape, np.dtype(bool))


@register("sign", inputs=("a",))
class Sign(UnaryOp):
    """-1, 0 or 1 by the sign of a (no gradient)."""

    differentiable = False

    def ufunc(self):
        return ("sign", ())

    def scalar_expr(self, args, const):
        return f"np.sign({args[0]})"

    def compute(self, a):
        return np.sign(a)


@register("full_like", inputs=("a",))
class FullLike(UnaryOp):
    """A tensor of a's shape filled with ``fill_value`` (a's dtype unless ``dtype`` is given)."""

    differentiable = False

    def __init__(self, fill_value: Any, dtype: Any = None) -> None:
        self.fill_value = scalar_value(fill_value)
        self.dtype = None if dtype is None else np.dtype(dtype).name

    def compute(self, a):
        # np.full_like's two steps (empty_like, then a fill) without its Python-level wrapper:
        # the seed of every backward; the same array (dtype, layout, bytes)
        out = np.empty_like(a, dtype=self.dtype)
        try:
            out.fill(self.fill_value)
        except (OverflowError, ValueError):  # the dtype cannot hold it: NumPy's unsafe cast
            return np.full_like(a, self.fill_value, dtype=self.dtype)
        return out

    def scalar_expr(self, args, const):
        return const(self.fill_value)

    def infer(self, a: Aval) -> Aval:
        return Aval(a.shape, np.dtype(self.dtype) if self.dtype else a.dtype)


@register("astype", inputs=("a",))
class AsType(UnaryOp):
    """a converted to ``dtype``; the gradient converts back."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = np.dtype(dtype).name

    def compute(self, a):
        return a.astype(self.dtype, copy=False)

    def scalar_expr(self, args, const):
        # fusion casts the operand to the (float) result dtype already; no bool targets
        return args[0] if np.dtype(self.dtype).kind == "f" else None

    def gradient(self, out_grad, node):
        return F.astype(out_grad, node.inputs[0].dtype)

    def infer(self, a: Aval) -> Aval:
        return Aval(a.shape, np.dtype(self.dtype))

