"""Ops about state rather than values: cut a gradient, write into a buffer (an effect)."""

from __future__ import annotations

import numpy as np

from .registry import Aval, Op, ShapeError, fmt_shape, register


@register("stop_gradient", inputs=("a",))
class StopGradient(Op):
    """a, with no gradient flowing back (``Tensor.detach`` of a value that is not computed yet)."""

    differentiable = False

    def compute(self, a):
        return a

    def infer(self, a: Aval) -> Aval:
        return a


@register("store", inputs=("value",))
class Store(Op):
    """Copy ``value`` into ``target``'s array in place (an effect); the result is that array.

    ``target`` is a leaf with data (a parameter or a buffer such as BatchNorm's running mean).
    Eagerly the copy happens at once; in a traced or declared graph it happens when the node
    runs, so the JIT replays it on every call.
    """

    differentiable = False
    side_effect = True

    def __init__(self, target) -> None:
        if getattr(target, "op", None) is not None or getattr(target, "_data", None) is None:
            raise TypeError("store: the target must be a leaf tensor with data (a parameter or "
                            "buffer)")
        self.target = target

    def attrs(self) -> tuple:
        return (("target", id(self.target)),)

    def compute(self, value):
        np.copyto(self.target._data, value, casting="same_kind")
        return self.target._data

    def infer(self, value: Aval) -> Aval:
        target = self.target.aval
        if tuple(value.shape) != tuple(target.shape):
            raise ShapeError(f"store: value of shape {fmt_shape(value.shape)} does not fit the "
                             f"target of shape {fmt_shape(target.shape)}")
        return target
