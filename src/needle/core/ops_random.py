"""Random primitives: drawn afresh every time they run (never merged, folded or replayed)."""

from __future__ import annotations

import numpy as np

from ..backend import array_module
from .registry import Aval, Op, register


@register("bernoulli_like", inputs=("a",))
class BernoulliLike(Op):
    """A 0/1 mask of a's shape and dtype, 1 with probability ``p``: ``rand(*a.shape) <= p``.

    One ``np.random.rand`` draw per run (NumPy's global RNG on the CPU, so ``np.random.seed``
    reproduces it; needle's ``init.randb`` makes the same draw, cast to float32 first).
    """

    differentiable = False
    random = True

    def __init__(self, p: float) -> None:
        self.p = float(p)

    def compute(self, a):
        draw = array_module(a).random.rand(*a.shape).astype(np.float32)
        return (draw <= self.p).astype(a.dtype)

    def infer(self, a: Aval) -> Aval:
        return a
