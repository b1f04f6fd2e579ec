"""Graph operations with effects: assign to Variables, print values, group, apply a train step."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..autograd import Tensor, make_from_op
from ..core.registry import Aval, Op
from .runtime import current_session


def _target_of(var: Any) -> Any:
    from .nodes import Variable

    if isinstance(var, Variable) or (isinstance(var, Tensor) and var.op is None
                                     and var._data is not None):
        return var
    raise TypeError(f"assign: the target must be a Variable or a parameter, got {var!r}")


class Assign(Op):
    """Store ``value`` (or var + value, var - value) into a Variable; outputs the new value."""

    name = "assign"

    side_effect = True
    differentiable = False

    def __init__(self, var: Any, mode: str = "set") -> None:
        self.var = _target_of(var)
        self.mode = mode

    def attrs(self) -> tuple:
        return (("var", id(self.var)), ("mode", self.mode))

    def compute(self, value):
        session = current_session()
        current = session.variable_value(self.var)
        if self.mode == "add":
            value = current + value
        elif self.mode == "sub":
            value = current - value
        # write in place so that views and optimizers holding the array see the change
        np.copyto(current, np.broadcast_to(value, current.shape), casting="same_kind")
        return current.copy()

    def infer(self, value: Aval) -> Aval:
        return self.var.aval


def assign(var: Any, value: Any) -> Tensor:
    """A graph op that sets ``var`` to ``value`` when run; its value is the new value."""
    return make_from_op(Assign(var, "set"), (_as_node(value, var),))


def assign_add(var: Any, value: Any) -> Tensor:
    """A graph op that adds ``value`` to ``var`` when run."""
    return make_from_op(Assign(var, "add"), (_as_node(value, var),))


def assign_sub(var: Any, value: Any) -> Tensor:
    """A graph op that subtracts ``value`` from ``var`` when run."""
    return make_from_op(Assign(var, "sub"), (_as_node(value, var),))


def _as_node(value: Any, like: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    from .nodes import constant

    return constant(np.asarray(value, dtype=like.dtype))


class Print(Op):
    """Identity that prints ``message`` and the value each time it runs (debugging a graph)."""

    name = "print"

    side_effect = True

    def __init__(self, message: str = "", summarize: int = 6) -> None:
        self.message = str(message)
        self.summarize = int(summarize)

    def compute(self, a):
        flat = np.asarray(a).ravel()[: self.summarize]
        more = " ..." if np.size(a) > self.summarize else ""
        print(f"{self.message}{np.shape(a)} {flat}{more}", flush=True)
        return a

    def gradient(self, out_grad, node):
        return out_grad

    def infer(self, a: Aval) -> Aval:
        return a


def print_(tensor: Tensor, message: str = "", summarize: int = 6) -> Tensor:
    """An identity node that prints ``message``, the shape and the first values when it runs."""
    return make_from_op(Print(message, summarize), (tensor,))


class Group(Op):
    """Runs its inputs (operations) and produces nothing: ``st.group(op1, op2)``."""

    name = "group"

    side_effect = True
    differentiable = False

    def compute(self, *values):
        return None

    def infer(self, *avals: Aval) -> Aval:
        return Aval((), np.dtype("float32"))


def group(*operations: Tensor) -> Tensor:
    """One operation that runs all of ``operations``; fetching it returns None."""
    return make_from_op(Group(), tuple(operations))


class ApplyGradients(Op):
    """Runs an optimizer's eager update rule on the Session's values of its parameters."""

    name = "apply_gradients"

    side_effect = True
    differentiable = False

    def __init__(self, optimizer: Any, params: tuple) -> None:
        self.optimizer = optimizer
        self.params = params

    def attrs(self) -> tuple:
        return (("optimizer", id(self.optimizer)),)

    def compute(self, *grads):
        session = current_session()
        opt = self.optimizer
        saved = []
        try:
            for p, g in zip(self.params, grads):
                saved.append((p, p._data, p.grad))
                p._data = session.variable_value(p)  # the optimizer updates this array in place
                p.grad = Tensor.make_const(g)
            opt.step()
        finally:
            for p, data, grad in saved:
                p._data, p.grad = data, grad
        return None

    def infer(self, *avals: Aval) -> Aval:
        return Aval((), np.dtype("float32"))


def minimize(optimizer: Any, loss: Tensor) -> Tensor:
    """A train op: gradients of ``loss`` for the optimizer's parameters, then its update rule."""
    from .gradients import gradients

    params = [p for p in optimizer.params if p.requires_grad]
    grads = gradients(loss, params)
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
    if not pairs:
        raise ValueError("minimize: the loss does not depend on any of the optimizer's "
                         "parameters")
    op = ApplyGradients(optimizer, tuple(p for p, _ in pairs))
    return make_from_op(op, tuple(g for _, g in pairs))
