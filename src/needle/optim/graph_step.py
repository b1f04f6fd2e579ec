"""An optimizer step as a graph node: how a traced (JIT) training step records ``opt.step()``."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..autograd import Tensor, make_from_op
from ..core.registry import Aval, Op


class ApplyUpdates(Op):
    """Give the parameters these gradients and run the optimizer's eager update rule, in place.

    An effect: it changes the parameters and the optimizer's state when it runs; its value is
    nothing. The parameters keep the gradients as ``.grad`` afterwards, as in eager mode.
    """

    name = "apply_updates"
    side_effect = True
    writes_state = True
    differentiable = False

    def __init__(self, optimizer: Any, params: tuple) -> None:
        self.optimizer = optimizer
        self.params = params

    def attrs(self) -> tuple:
        return (("optimizer", id(self.optimizer)),)

    def compute(self, *grads):
        for p, g in zip(self.params, grads):
            p.grad = Tensor.make_const(g)
        self.optimizer.step()
        return None

    def infer(self, *avals: Aval) -> Aval:
        return Aval((), np.dtype("float32"))


def record_step(optimizer: Any) -> Tensor:
    """The node that performs ``optimizer.step()`` with the parameters' (traced) gradients."""
    pairs = [(p, p.grad) for p in optimizer.params if p.grad is not None]
    op = ApplyUpdates(optimizer, tuple(p for p, _ in pairs))
    return make_from_op(op, tuple(g for _, g in pairs))
