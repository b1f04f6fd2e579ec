"""Ops about state rather than values: cut a gradient, write into a buffer (an effect)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np

from ..kernels.running_average import running_average
from .registry import Aval, F, Op, ShapeError, fmt_shape, make_node, register


@register("stop_gradient", inputs=("a",))
class StopGradient(Op):
    """a, with no gradient flowing back (``Tensor.detach`` of a value that is not computed yet)."""

    differentiable = False

    def compute(self, a):
        return a

    def emit(self, args, node):
        return args[0]

    def infer(self, a: Aval) -> Aval:
        return a


@register("to_device", inputs=("a",))
class ToDevice(Op):
    """``a`` copied to ``device`` (CPU <-> GPU); the gradient is copied back to a's device."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.out_device = device

    def attrs(self) -> tuple:
        return (("device", str(self.device)),)

    def compute(self, a):
        from ..backend import device_of

        source = device_of(a)
        if source == self.device:
            return a.copy()
        return self.device.array(source.to_numpy(a))

    def gradient(self, out_grad, node):
        return F.to_device(out_grad, node.inputs[0].device)

    def infer(self, a: Aval) -> Aval:
        return a


def store_into(target: Any, value: Any, momentum: float) -> None:
    """``store``'s write: ``target = (1 - momentum) * target + momentum * value`` in place
    (``momentum=1``: a copy), ``value`` of any shape of the target's size. Eager training
    BatchNorm calls it directly for its running averages, with no node (nn/basic.py)."""
    if value.shape != target.shape:
        value = value.reshape(target.shape)
    if momentum == 1.0:
        np.copyto(target, value, casting="same_kind")
    else:  # in place: target *= 1 - m; target += m * value (one loop where numba is)
        running_average(target, value, momentum)


@register("store", inputs=("value", "*after"))
class Store(Op):
    """Write ``value`` into ``target``'s array in place (an effect); the result is that array.

    ``target = (1 - momentum) * target + momentum * value`` (``momentum=1``: a plain copy;
    BatchNorm's running statistics use 0.1). ``value`` may have any shape of the target's
    size. ``after`` are
    control dependencies: nodes the store belongs with (their values are not used), so a
    declared graph can tell which forward computation made it.
    ``target`` is a leaf with data (a parameter or a buffer). Eagerly the write happens at
    once; in a traced or declared graph it happens when the node runs, so the JIT replays it
    on every call. ``storage(target)``, if given, is the array written instead of the
    target's own (a Session's value of a graph Variable: a loaded graph's running
    statistics), as in ``ApplyUpdates``.
    """

    differentiable = False
    side_effect = True
    writes_state = True

    def __init__(self, target, momentum: float = 1.0,
                 storage: Callable[[Any], Any] | None = None) -> None:
        if target is None:
            raise TypeError("store: give the target tensor (store(value, target=buffer))")
        if getattr(target, "op", None) is not None or (
                storage is None and getattr(target, "_data", None) is None):
            raise TypeError("store: the target must be a leaf tensor with data (a parameter or "
                            "buffer)")
        self.target = target
        self.momentum = float(momentum)
        self.storage = storage

    def attrs(self) -> tuple:
        return (("target", id(self.target)), ("momentum", self.momentum))

    def compute(self, value, *after):
        target = self.target._data if self.storage is None else self.storage(self.target)
        store_into(target, value, self.momentum)
        return target

    def infer(self, value: Aval, *after: Aval) -> Aval:
        target = self.target.aval
        shape = value.shape
        size = int(np.prod([d for d in shape if d is not None]))
        if None not in shape and size != int(np.prod(target.shape)):
            raise ShapeError(f"store: value of shape {fmt_shape(value.shape)} does not fit the "
                             f"target of shape {fmt_shape(target.shape)}")
        return target


@register("apply_updates", inputs=("*grads",), internal=True)
class ApplyUpdates(Op):
    """Give the parameters these gradients and run the optimizer's eager update rule, in place.

    How a traced training step (``opt.step()`` under ``ndl.jit``) and a declared train op
    (``st.minimize``) update parameters: an effect that changes the parameters and the
    optimizer's state when it runs; its value is nothing. Parameters of the optimizer not in
    ``params`` get no gradient for this step (as after ``reset_grad()``), whatever ``.grad``
    they held. ``storage(p)``, if given, is the array the update writes for parameter ``p``
    (a Session's value of a graph Variable); with ``restore_grads`` the ``.grad`` attributes
    are put back afterwards (a Session run leaves eager state alone), else they keep this
    step's gradients as in eager mode. The optimizer is reached only through its
    ``run_update`` method, so the core knows no optimizer class.
    """

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
        self.optimizer.run_update(self.params, grads, self.storage, self.restore_grads,
                                  self.fuse_rule)
        return None

    def infer(self, *avals: Aval) -> Aval:
        return Aval((), np.dtype("float32"))


def apply_updates(optimizer: Any, grads: dict) -> Any:
    """The node that runs ``optimizer``'s update with ``grads`` (parameter -> gradient node)."""
    return make_node(ApplyUpdates(optimizer, tuple(grads)), tuple(grads.values()))
