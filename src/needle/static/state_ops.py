"""Graph operations with effects: assign to Variables, print values, group, apply a train step.

Ops here change state or talk to the outside, so they carry flags the compiler passes read:
``side_effect`` (never merged, folded or dropped) and ``writes_state`` (scheduled after every
read that does not depend on it, so a run reads the values it started with).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..autograd import Tensor, make_from_op
from ..core import context
from ..core.autodiff import find_topo_sort, hooked_gradients
from ..core.ops_state import ApplyUpdates, Store
from ..core.registry import Aval, Op, register
from .graph import get_default_graph
from .runtime import current_session


def _target_of(var: Any, what: str) -> Any:
    from .nodes import Variable

    if isinstance(var, Variable) or (isinstance(var, Tensor) and var.op is None
                                     and var._data is not None):
        return var
    raise TypeError(f"{what}: the target must be a st.Variable or a parameter / buffer (a leaf "
                    f"tensor with a value), got {var!r}")


def _current_value(var: Any) -> Any:
    """The live array of an assign target: a Variable's value in the running Session, or a
    parameter's / buffer's own array (which needs no Session)."""
    from .nodes import Variable

    if isinstance(var, Variable):
        return current_session().variable_value(var)
    return var._data


@register("assign", inputs=("value",), internal=True)
class Assign(Op):
    """Store ``value`` (or var + value, var - value) into a Variable; outputs the new value.

    The target is a ``st.Variable`` (the running Session's value) or an eager leaf such as a
    Parameter or a BatchNorm buffer (its own array), written in place.
    """

    side_effect = True
    writes_state = True
    differentiable = False

    def __init__(self, var: Any, mode: str = "set") -> None:
        self.var = _target_of(var, f"assign ({mode})")
        self.mode = mode

    def attrs(self) -> tuple:
        return (("var", id(self.var)), ("mode", self.mode))

    def compute(self, value):
        current = _current_value(self.var)
        if self.mode == "add":
            value = current + value
        elif self.mode == "sub":
            value = current - value
        # write in place so that views and optimizers holding the array see the change
        np.copyto(current, np.broadcast_to(value, current.shape), casting="same_kind")
        return current.copy()

    def infer(self, value: Aval) -> Aval:
        return self.var.aval


def _as_node(value: Any, like: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    from .nodes import constant

    return constant(np.asarray(value, dtype=like.dtype))


def assign(var: Any, value: Any) -> Tensor:
    """A graph op that sets ``var`` to ``value`` when run; its value is the new value."""
    return make_from_op(Assign(var, "set"), (_as_node(value, var),))


def assign_add(var: Any, value: Any) -> Tensor:
    """A graph op that adds ``value`` to ``var`` when run."""
    return make_from_op(Assign(var, "add"), (_as_node(value, var),))


def assign_sub(var: Any, value: Any) -> Tensor:
    """A graph op that subtracts ``value`` from ``var`` when run."""
    return make_from_op(Assign(var, "sub"), (_as_node(value, var),))


@register("with_dependencies", inputs=("value", "*after"), internal=True)
class WithDependencies(Op):
    """Identity on its first input that also needs its other inputs (operations) to have run."""

    def compute(self, value, *dependencies):
        return value

    def gradient(self, out_grad, node):
        return (out_grad, *[None] * (len(node.inputs) - 1))

    def infer(self, value: Aval, *dependencies: Aval) -> Aval:
        return value


def with_dependencies(dependencies: list | tuple, output: Tensor) -> Tensor:
    """``output``, computed only after every operation in ``dependencies`` has run.

    Fetching the result (or anything made from it) runs the dependencies too (TensorFlow's
    ``control_dependencies``): ``y = st.with_dependencies(st.state_updates(y), y)`` makes a
    forward-only run update BatchNorm's running statistics.
    """
    dependencies = list(dependencies)
    if not dependencies:
        return output
    return make_from_op(WithDependencies(), (output, *dependencies))


@register("print", inputs=("value",), internal=True)
class Print(Op):
    """Identity that prints ``message`` and the value each time it runs (debugging a graph)."""

    side_effect = True

    def __init__(self, message: str = "", summarize: int = 6) -> None:
        self.message = str(message)
        self.summarize = int(summarize)

    def compute(self, a):
        flat = (a if isinstance(a, np.ndarray | np.generic) else a.get()).ravel()[: self.summarize]
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


@register("group", inputs=("*nodes",), internal=True)
class Group(Op):
    """Runs its inputs (operations) and produces nothing: ``st.group(op1, op2)``."""

    side_effect = True
    differentiable = False

    def compute(self, *values):
        return None

    def infer(self, *avals: Aval) -> Aval:
        return Aval((), np.dtype("float32"))


def group(*operations: Tensor) -> Tensor:
    """One operation that runs all of ``operations``; fetching it returns None."""
    return make_from_op(Group(), tuple(operations))


def state_updates(output: Tensor | list) -> list:
    """The ``ndl.ops.store`` nodes of the default graph that ``output`` computes the values
    for (BatchNorm's running-statistics updates made while building ``output``).

    In a declared graph a store runs only when something needs it; ``st.minimize`` attaches
    these to its train op, and ``st.with_dependencies(st.state_updates(y), y)`` attaches them
    to ``y``.
    """
    outputs = list(output) if isinstance(output, list | tuple) else [output]
    stores = [n for n in get_default_graph().effect_nodes() if isinstance(n.op, Store)]
    if not stores:
        return []
    ancestors = {id(n) for n in find_topo_sort(outputs)}
    return [s for s in stores if id(s) not in ancestors
            and all(id(i) in ancestors for i in s.inputs)]


def minimize(optimizer: Any, loss: Tensor) -> Tensor:
    """A train op: gradients of ``loss`` for the optimizer's parameters, then its update rule.

    Parameters that are ``st.Variable(trainable=False)`` or do not require a gradient are
    left alone. The op also runs the state updates the loss's forward pass made (BatchNorm's
    running statistics, see :func:`state_updates`), as an eager training step does. Running
    the op returns None.
    """
    from .gradients import gradients

    params = [p for p in optimizer.params
              if p.requires_grad and getattr(p, "trainable", True)]
    if not params:
        raise ValueError("minimize: the optimizer has no trainable parameters")
    # gradient hooks (a data-parallel wrapper's all-reduce) see and may replace them
    grads = hooked_gradients(params, gradients(loss, params))
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
    if not pairs:
        raise ValueError("minimize: the loss does not depend on any of the optimizer's "
                         "parameters")
    op = ApplyUpdates(optimizer, tuple(p for p, _ in pairs),
                      storage=lambda p: current_session().variable_value(p), restore_grads=True)
    train = make_from_op(op, tuple(g for _, g in pairs))
    updates = state_updates(loss)
    return group(train, *updates) if updates else train


context.provide("minimize_declared", minimize)
