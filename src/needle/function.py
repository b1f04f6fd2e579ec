"""Custom differentiable functions (PyTorch's ``autograd.Function``) as real graph ops.

A user writes the forward and the backward on arrays::

    class Cube(Function):
        @staticmethod
        def forward(ctx, x):                 # x: a NumPy (backend) array
            ctx.save_for_backward(x)
            return x ** 3

        @staticmethod
        def backward(ctx, out_grad):         # one array per output of forward
            (x,) = ctx.saved_tensors
            return 3 * x ** 2 * out_grad     # one array (or None) per input of forward

    y = Cube.apply(x)                        # x a Tensor: eager, lazy (Session) or traced

``apply`` makes one node of a ``FunctionOp`` (compute = ``forward``), so every front-end sees
an ordinary op: eager mode computes it at once, a ``needle.static`` graph runs it in
``Session.run``, and a tracer records it. Its gradient is one node of a
``FunctionBackwardOp`` (compute = ``backward``), so ``Tensor.backward``, ``st.gradients`` and
a traced training step all call the user's backward through the same reverse mode.

Shapes of lazy nodes: when forward's inputs have no values yet (a declared graph), the output
shape comes from ``shape(*args)`` if the Function defines that static method (each Tensor
argument replaced by its shape, None for unknown dims), else
from running ``forward`` on zeros of the known input shapes (unknown dims tried at 2 and 3;
output dims that differ between the two runs are unknown).

Non-Tensor arguments of ``apply`` (numbers, arrays, any object) are passed to ``forward``
unchanged at their positions; ``backward`` may return a gradient per Tensor argument or per
argument (then the entries for non-Tensors are ignored).

NOTE: the backward of a Function is not itself differentiable (it runs on arrays); asking
for a second derivative through one raises a NotImplementedError naming the Function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .autograd import Tensor, Value, make_from_op
from .core.registry import Aval, Op, ShapeError, fmt_shape, register

__all__ = ["Function", "FunctionBackwardOp", "FunctionCtx", "FunctionOp"]


class FunctionCtx:
    """What ``forward`` leaves for ``backward``: saved arrays and any attributes set on it.

    ``ctx.save_for_backward(*arrays)`` keeps arrays, ``ctx.saved_tensors`` returns them (as
    arrays, in order); ``ctx.needs_input_grad`` has one bool per argument of ``apply`` (True
    where the argument is a Tensor that requires a gradient), so backward may skip work.
    """

    def __init__(self, needs_input_grad: tuple = ()) -> None:
        self.saved_tensors: tuple = ()
        self.needs_input_grad = needs_input_grad

    def save_for_backward(self, *arrays: Any) -> None:
        self.saved_tensors = tuple(arrays)

    if TYPE_CHECKING:  # any attribute forward sets for backward (``ctx.scale = 2.0``)
        def __getattr__(self, name: str) -> Any: ...

        def __setattr__(self, name: str, value: Any) -> None: ...


def _as_array(value: Any, like: Any, what: str) -> Any:
    """A Function result as a backend array (Tensors and Python numbers accepted)."""
    if isinstance(value, Value):
        return value.realize_data()
    if isinstance(value, np.ndarray | np.generic):
        return np.asarray(value)
    if type(value).__module__.startswith("cupy"):
        return value
    arr = np.asarray(value)
    if arr.dtype.kind == "O":
        raise TypeError(f"{what} returned a {type(value).__name__}, expected an array")
    if arr.dtype == np.float64 and like is not None and getattr(like, "dtype", None) is not None:
        arr = arr.astype(like.dtype)
    return arr


@register("function", inputs=("*inputs",), internal=True)
class FunctionOp(Op):
    """The forward node of ``fn.apply(*args)``: compute runs ``fn.forward(ctx, *args)``.

    Tensor arguments are the node's inputs; the other arguments (``consts``, with their
    positions) are attributes. The ctx of the latest compute is kept with the output it made,
    so the backward node uses it when it sees that very output, and recomputes the forward
    (a fresh ctx) otherwise, e.g. when a graph was rewritten or the output was fed.
    """

    #: never merged, folded or replayed by graph passes: user code may be random or stateful
    random = True

    def __init__(self, fn: type[Function], positions: tuple[int, ...], consts: tuple,
                 needs_input_grad: tuple = ()) -> None:
        self.fn = fn
        self.positions = positions  # where each Tensor input goes among forward's arguments
        self.consts = consts  # ((position, value), ...) for the non-Tensor arguments
        self.needs_input_grad = needs_input_grad
        self.name = f"function:{fn.__name__}"
        self.returns_tuple = False
        self._ctx: FunctionCtx | None = None
        self._ctx_output: Any = None
        self._pending: tuple | None = None  # (input arrays, output) computed by apply
        self._infer_cache: tuple | None = None

    def attrs(self) -> tuple:
        return (("fn", self.fn), ("positions", self.positions),
                ("consts", tuple((i, _hashable(v)) for i, v in self.consts)))

    # -- forward -----------------------------------------------------------------------------
    def arguments(self, arrays: tuple) -> list:
        """forward's arguments: the input arrays and the constants, each at its position."""
        args: list = [None] * (len(self.positions) + len(self.consts))
        for pos, arr in zip(self.positions, arrays):
            args[pos] = arr
        for pos, value in self.consts:
            args[pos] = value
        return args

    def run_forward(self, ctx: FunctionCtx, arrays: tuple) -> Any:
        """``fn.forward`` on arrays; a tuple result stays a tuple (a TensorTuple node)."""
        out = self.fn.forward(ctx, *self.arguments(arrays))
        like = arrays[0] if arrays else None
        where = f"{self.fn.__name__}.forward"
        if isinstance(out, tuple | list):
            return tuple(_as_array(o, like, where) for o in out)
        return _as_array(out, like, where)

    def compute(self, *arrays: Any) -> Any:
        pending = self._pending
        if pending is not None:
            self._pending = None
            if len(pending[0]) == len(arrays) and all(
                    a is b for a, b in zip(pending[0], arrays)):
                return pending[1]
        ctx = FunctionCtx(self.needs_input_grad)
        out = self.run_forward(ctx, arrays)
        self._ctx, self._ctx_output = ctx, out
        return out

    def ctx_for(self, inputs: tuple, output: Any) -> FunctionCtx:
        """The ctx of the forward call that produced ``output`` (recomputed if it is gone)."""
        if self._ctx is not None and self._ctx_output is output:
            return self._ctx
        ctx = FunctionCtx(self.needs_input_grad)
        self.run_forward(ctx, inputs)
        return ctx

    # -- gradient ----------------------------------------------------------------------------
    def gradient(self, out_grad: Any, node: Any) -> tuple:
        grads = make_from_op(FunctionBackwardOp(self), (*node.inputs, node, out_grad))
        if len(node.inputs) == 1:
            return (grads,)
        return tuple(grads[i] for i in range(len(node.inputs)))

    # -- shapes ------------------------------------------------------------------------------
    def infer(self, *avals: Aval) -> Aval | tuple:
        key = tuple(avals)
        if self._infer_cache is not None and self._infer_cache[0] == key:
            return self._infer_cache[1]
        rule = getattr(self.fn, "shape", None)
        if rule is not None:
            result = _from_shape_rule(self, rule, avals)
        else:
            result = self._infer_by_running(avals)
        self._infer_cache = (key, result)
        return result

    def _infer_by_running(self, avals: tuple) -> Aval | tuple:
        """Run forward on zeros twice (unknown dims at 2, then 3); dims that differ are None."""
        runs = []
        for fill in (2, 3):
            arrays = tuple(np.zeros(tuple(fill if d is None else d for d in a.shape),
                                    dtype=a.dtype) for a in avals)
            try:
                with np.errstate(all="ignore"):
                    out = self.run_forward(FunctionCtx(self.needs_input_grad), arrays)
            except Exception as exc:
                shapes = ", ".join(fmt_shape(a.shape) for a in avals)
                raise ShapeError(
                    f"{self.fn.__name__}: cannot infer the output shape for inputs of shapes "
                    f"{shapes} by running forward on zeros ({type(exc).__name__}: {exc}); "
                    "define a static method shape(*args) on the Function") from exc
            runs.append(out)
            if not any(None in a.shape for a in avals):
                break
        first = runs[0]
        outs = first if isinstance(first, tuple) else (first,)
        others = runs[-1] if isinstance(runs[-1], tuple) else (runs[-1],)
        result = tuple(
            Aval(tuple(d if d == e else None for d, e in zip(o.shape, p.shape)), o.dtype)
            for o, p in zip(outs, others))
        return result if isinstance(first, tuple) else result[0]


def _hashable(value: Any) -> Any:
    """A hashable stand-in for a constant argument (arrays by identity)."""
    try:
        hash(value)
        return value
    except TypeError:
        return ("id", id(value))


def _from_shape_rule(op: FunctionOp, rule: Any, avals: tuple) -> Aval | tuple:
    """Avals from a user's ``shape(*args)``: one shape, or a list of shapes.

    The rule gets forward's arguments with each Tensor replaced by its shape (None dims are
    unknown) and the other arguments as they are.
    """
    fn = op.fn
    out = rule(*op.arguments(tuple(a.shape for a in avals)))
    dtype = next((a.dtype for a in avals if a.dtype.kind in "fc"),
                 avals[0].dtype if avals else np.dtype(np.float32))
    multiple = isinstance(out, list | tuple) and len(out) > 0 and all(
        isinstance(s, list | tuple) for s in out)
    if multiple:
        return tuple(Aval(tuple(s), dtype) for s in out)
    if not isinstance(out, list | tuple):
        raise TypeError(f"{fn.__name__}.shape must return a shape tuple or a list of them, got "
                        f"{out!r}")
    return Aval(tuple(out), dtype)


@register("function_backward", inputs=("*inputs",), internal=True)
class FunctionBackwardOp(Op):
    """The gradient node of a FunctionOp node: compute runs ``fn.backward(ctx, *out_grads)``.

    Inputs: the forward's inputs, the forward node itself (its value identifies the ctx) and
    the output adjoint (a tuple for a tuple-valued forward). Output: one gradient per Tensor
    input of the forward (a tuple when there are several); None from backward becomes zeros.
    """

    random = True

    def __init__(self, forward_op: FunctionOp) -> None:
        self.forward_op = forward_op
        self.name = f"function_backward:{forward_op.fn.__name__}"
        self.returns_tuple = len(forward_op.positions) > 1

    def attrs(self) -> tuple:
        return (("forward_op", id(self.forward_op)),)

    def compute(self, *arrays: Any) -> Any:
        fwd = self.forward_op
        n = len(fwd.positions)
        inputs, output, out_grad = arrays[:n], arrays[n], arrays[n + 1]
        ctx = fwd.ctx_for(inputs, output)
        out_grads = out_grad if isinstance(output, tuple) else (out_grad,)
        result = fwd.fn.backward(ctx, *out_grads)
        if not isinstance(result, tuple | list):
            result = (result,)
        if len(result) == len(fwd.positions) + len(fwd.consts) and fwd.consts:
            result = [result[p] for p in fwd.positions]
        name = fwd.fn.__name__
        if len(result) != n:
            raise ValueError(f"{name}.backward returned {len(result)} gradients; expected one "
                             f"per Tensor input of apply ({n})")
        grads = []
        for i, (g, x) in enumerate(zip(result, inputs)):
            if g is None:
                grads.append(np.zeros_like(x))
                continue
            g = _as_array(g, x, f"{name}.backward")
            if g.shape != x.shape:
                try:
                    g = np.broadcast_to(g, x.shape).copy()
                except ValueError:
                    raise ShapeError(f"{name}.backward: gradient {i} has shape "
                                     f"{fmt_shape(g.shape)}, its input {fmt_shape(x.shape)}"
                                     ) from None
            grads.append(g.astype(x.dtype, copy=False))
        return tuple(grads) if self.returns_tuple else grads[0]

    def gradient(self, out_grad: Any, node: Any) -> Any:
        raise NotImplementedError(
            f"{self.forward_op.fn.__name__}: the backward of a custom Function is written on "
            "arrays and cannot be differentiated again; write the second derivative as its "
            "own Function")

    def infer(self, *avals: Aval) -> Aval | tuple:
        inputs = avals[:len(self.forward_op.positions)]
        return tuple(inputs) if self.returns_tuple else inputs[0]


class Function:
    """Base of custom differentiable functions: subclass it with static ``forward(ctx, *args)``
    and ``backward(ctx, *out_grads)`` working on arrays, then call ``MyFn.apply(*tensors)``.

    ``forward`` returns one array or a tuple of arrays; ``backward`` gets one adjoint array per
    output and returns one gradient array (or None) per input. Optionally a static
    ``shape(*args)`` (Tensors replaced by their shapes) gives the output shape or a list of
    output shapes of lazy nodes (see the module doc).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, *args: Any) -> Any:
        raise NotImplementedError("Function subclasses define a static forward(ctx, *args)")

    @staticmethod
    def backward(ctx: FunctionCtx, *out_grads: Any) -> Any:
        raise NotImplementedError("Function subclasses define a static backward(ctx, *grads)")

    @classmethod
    def apply(cls, *args: Any) -> Tensor | tuple:
        """Apply the function: a Tensor (or a tuple of Tensors) that is a node of the graph."""
        positions = tuple(i for i, a in enumerate(args) if isinstance(a, Value))
        if not positions:
            raise TypeError(f"{cls.__name__}.apply: needs at least one Tensor argument")
        tensors = tuple(args[i] for i in positions)
        consts = tuple((i, a) for i, a in enumerate(args) if not isinstance(a, Value))
        needs = tuple(isinstance(a, Value) and bool(a.requires_grad) for a in args)
        op = FunctionOp(cls, positions, consts, needs)
        arrays = tuple(t._data for t in tensors)
        if all(a is not None for a in arrays):
            # eager: run forward now to learn whether it returns a tuple; make_from_op's
            # compute call then takes this result instead of running forward twice
            ctx = FunctionCtx(needs)
            out = op.run_forward(ctx, arrays)
            op._ctx, op._ctx_output = ctx, out
            op._pending = (arrays, out)
        else:
            out = op.infer(*[t.aval for t in tensors])
        # NOTE: an Aval is a NamedTuple; only a plain tuple means several outputs
        op.returns_tuple = isinstance(out, tuple) and not isinstance(out, Aval)
        node = make_from_op(op, tensors)
        op._pending = None
        return tuple(node) if op.returns_tuple else node
