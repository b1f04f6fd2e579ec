"""Tracing: run a Python function on value-less tensors and record the nodes it makes."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from .. import autograd
from ..autograd import Tensor
from ..core.registry import Aval, NodeMeta

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Trace:
    """What one trace recorded: effects in order (optimizer steps, buffer stores) and modules."""

    def __init__(self) -> None:
        self.effects: list = []
        self.modules: list = []

    @staticmethod
    def user_source() -> str | None:
        """``file:line`` of the innermost frame outside the needle package."""
        frame = sys._getframe(1)
        while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
                _PACKAGE_DIR):
            frame = frame.f_back
        return None if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


@contextlib.contextmanager
def tracing(trace: Trace):
    """While active, every op makes a lazy node and effects are collected in ``trace``."""
    previous = autograd._TRACE
    autograd._TRACE = trace
    try:
        yield trace
    finally:
        autograd._TRACE = previous


def is_tracing() -> bool:
    return autograd._TRACE is not None


class TraceInput(Tensor):
    """A value-less stand-in for a tensor argument while a function is traced."""

    __slots__ = ()


def trace_input(like: Any, name: str, requires_grad: bool | None = None) -> TraceInput:
    """A stand-in with ``like``'s shape, dtype, device (and requires_grad unless given)."""
    node = Tensor.__new__(TraceInput)
    autograd.TENSOR_COUNTER += 1
    node.op, node.inputs, node._data, node.grad = None, (), None, None
    node.requires_grad = like.requires_grad if requires_grad is None else requires_grad
    node.device = like.device
    node._aval = Aval(tuple(like.shape), like.dtype)
    node.meta = NodeMeta(name=name)
    return node
