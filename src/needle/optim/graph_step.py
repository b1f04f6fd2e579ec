"""An optimizer step as a graph node: how a traced (JIT) training step records ``opt.step()``."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np

from ..autograd import Tensor, _new_node, make_from_op
from ..core.registry import Aval, Op
from .optimizer import Optimizer


class ApplyUpdates(Op):
    """Give the parameters these gradients and run the optimizer's eager update rule, in place.

    An effect: it changes the parameters and the optimizer's state when it runs; its value is
    nothing. Parameters of the optimizer not in ``params`` get no gradient for this step
    (as after ``reset_grad()``), whatever ``.grad`` they held. ``storage(p)``, if given, is the
    array the update writes for parameter ``p`` (a Session's value of a graph Variable);
    with ``restore_grads`` the ``.grad`` attributes are put back afterwards (a Session run
    leaves eager state alone), else they keep this step's gradients as in eager mode.
    """

    name = "apply_updates"
    side_effect = True
    writes_state = True
    differentiable = False

    #: set by the compiler's fuse_update_rules pass: run the rule as one compiled loop
    fuse_rule = False

    def __init__(self, optimizer: Any, params: tuple,
                 storage: Callable[[Any], Any] | None = None,
                 restore_grads: bool = False) -> None:
        self.optimizer = optimizer
        self.params = params
        self.storage = storage
        self.restore_grads = restore_grads

    def attrs(self) -> tuple:
        return (("optimizer", id(self.optimizer)), ("params", tuple(map(id, self.params))))

    def with_fused_rule(self) -> ApplyUpdates:
        """A copy whose update runs fused (unless the optimizer was made with fused=False)."""
        op = copy.copy(self)
        op.fuse_rule = True
        return op

    def compute(self, *grads):
        opt = self.optimizer
        given = {id(p): g for p, g in zip(self.params, grads)}
        # only what this node changes is put back (nothing, under the JIT)
        saved_grads = [(p, p.grad) for p in opt.params] if self.restore_grads else []
        saved_data = [(p, p._data) for p in self.params] if self.storage is not None else []
        try:
            for p in opt.params:
                g = given.get(id(p))
                p.grad = (None if g is None
                          else _new_node(Tensor, None, (), np.asarray(g), False, p.device))
                if g is not None and self.storage is not None:
                    p._data = self.storage(p)  # updated in place by step()
            if type(opt).step is Optimizer.step:
                opt._apply_step(fuse=opt.fused is True or (self.fuse_rule and opt.fused is None))
            else:  # a subclass with its own step()
                opt.step()
        finally:
            for p, data in saved_data:
                p._data = data
            for p, grad in saved_grads:
                p.grad = grad
        return None

    def infer(self, *avals: Aval) -> Aval:
        return Aval((), np.dtype("float32"))


def record_step(optimizer: Any) -> Tensor:
    """The node that performs ``optimizer.step()`` with the parameters' (traced) gradients."""
    pairs = [(p, p.grad) for p in optimizer.params if p.grad is not None]
    op = ApplyUpdates(optimizer, tuple(p for p, _ in pairs))
    return make_from_op(op, tuple(g for _, g in pairs))
