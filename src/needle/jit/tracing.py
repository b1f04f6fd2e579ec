"""Tracing: run a Python function on value-less tensors and record the nodes it makes."""

from __future__ import annotations

from typing import Any

from ..autograd import Tensor, init_leaf
from ..core.context import active_trace, tracing
from ..core.registry import Aval, NodeMeta
from .guards import GuardCollector


class Trace:
    """What one trace recorded: effects in order (optimizer steps, buffer stores), the modules
    it called, and the Python values it read (see :mod:`needle.jit.guards`)."""

    def __init__(self, collect_guards: bool = False) -> None:
        self.effects: list = []
        self.modules: list = []
        self.guards = GuardCollector() if collect_guards else None

    def node_made(self, node: Any) -> None:
        """A lazy node was made while this trace was active."""
        if node.op.side_effect:
            self.effects.append(node)

    def module_called(self, module: Any) -> None:
        """An ``nn.Module`` was called while this trace was active."""
        self.modules.append(module)


def is_tracing() -> bool:
    """Whether this thread is tracing a function for ``ndl.jit``."""
    return active_trace() is not None


class TraceInput(Tensor):
    """A value-less stand-in for a tensor argument while a function is traced."""

    __slots__ = ()


def trace_input(like: Any, name: str, requires_grad: bool | None = None) -> TraceInput:
    """A stand-in with ``like``'s shape, dtype, device (and requires_grad unless given)."""
    return init_leaf(Tensor.__new__(TraceInput), None, aval=Aval(tuple(like.shape), like.dtype),
                     requires_grad=like.requires_grad if requires_grad is None else requires_grad,
                     device=like.device, meta=NodeMeta(name=name))


__all__ = ["Trace", "TraceInput", "is_tracing", "trace_input", "tracing"]
