"""Stochastic gradient descent with needle's damped momentum and an optional Nesterov step."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..autograd import Tensor
from ..backend import array_module
from .optimizer import Optimizer, coupled_weight_decay

__all__ = ["SGD", "sgd_update"]


def sgd_update(param: Any, grad: Any, lr: float, momentum: float, u: Any | None,
               nesterov: bool, scratch: Any, dampening: float | None = None) -> None:
    """One SGD step on arrays, in place on ``param`` (and ``u``); ``grad`` is only read.

    ``g`` is the (already weight-decayed) gradient, ``u`` the momentum buffer (zeros at first),
    ``d`` the dampening (None: ``d = momentum``, needle's rule)::

        momentum == 0:  p = p - lr * g
        otherwise:      u = momentum * u + (1 - d) * g
                        p = p - lr * u                              (heavy ball)
                        p = p - lr * (momentum * u + (1 - d) * g)   (nesterov, new u)

    With ``d = momentum`` the buffer is a damped average, so for a constant gradient both forms
    settle at ``p -= lr * g``; ``d = 0`` is ``torch.optim.SGD``'s default ``u = m u + g``.
    ``scratch`` is an array shaped like ``param`` whose contents are overwritten.
    """
    xp = array_module(param)
    if momentum == 0.0:
        xp.multiply(grad, lr, out=scratch)
        xp.subtract(param, scratch, out=param)
        return
    damp = 1.0 - (momentum if dampening is None else dampening)
    xp.multiply(u, momentum, out=u)
    if damp == 1.0:  # undamped (PyTorch's default): u += g, no scaling pass
        xp.add(u, grad, out=u)
        damped = grad
    else:
        xp.multiply(grad, damp, out=scratch)
        xp.add(u, scratch, out=u)
        damped = scratch
    if nesterov:
        # p -= lr * (1 - d) * g, then p -= lr * momentum * u: two passes, no extra array
        xp.multiply(damped, lr, out=scratch)
        xp.subtract(param, scratch, out=param)
        xp.multiply(u, lr * momentum, out=scratch)
    else:
        xp.multiply(u, lr, out=scratch)
    xp.subtract(param, scratch, out=param)


class SGD(Optimizer):
    """SGD with momentum, dampening and coupled weight decay (``g = grad + wd * p``).

    ``SGD(params, lr=0.01, momentum=0.0, weight_decay=0.0, nesterov=False, fused=None,
    dampening=None)``; see ``sgd_update`` for the equations. The momentum buffer ``u`` starts
    at 0 and is updated as ``u = momentum * u + (1 - dampening) * g``; then ``p -= lr * u``.

    * ``dampening=None`` (default): needle's rule, ``dampening = momentum``, so
      ``u = m u + (1 - m) g`` and the first step moves ``lr * (1 - momentum) * g``.
    * ``dampening=0``: ``torch.optim.SGD``'s default, ``u = m u + g``; the same steps as
      ``torch.optim.SGD(momentum=m, dampening=0)``, with or without nesterov and weight decay.
    * other values as in PyTorch, except that PyTorch's buffer starts at the first gradient
      undamped (``u = g``), needle's at 0, so the first step differs by ``dampening * g``.

    >>> import numpy as np, needle as ndl
    >>> p = ndl.nn.Parameter(np.zeros(2, np.float32))
    >>> opt = SGD([p], lr=0.1, momentum=0.9, dampening=0)
    >>> p.grad = ndl.Tensor(np.ones(2, np.float32)); opt.step(); p.numpy()
    array([-0.1, -0.1], dtype=float32)
    """

    hyperparams = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def __init__(self, params: Iterable[Tensor], lr: float = 0.01, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False,
                 fused: bool | None = None, dampening: float | None = None) -> None:
        super().__init__(params, lr, fused)
        self._check_hyperparams("SGD", {"momentum": momentum, "dampening": dampening,
                                        "weight_decay": weight_decay, "nesterov": nesterov})
        self.momentum = float(momentum)
        self.dampening = None if dampening is None else float(dampening)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)

    @classmethod
    def _check_hyperparams(cls, where: str, values: dict[str, Any]) -> None:
        super()._check_hyperparams(where, values)
        if values.get("nesterov") and values.get("momentum") == 0.0:
            raise ValueError(f"{where}: nesterov=True needs momentum > 0")

    @property
    def state_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("u",) if self.momentum != 0.0 else ()

    def state_dict(self) -> dict[str, Any]:
        """As ``Optimizer.state_dict``; ``dampening`` is left out while it is None (the
        default), so such state dicts are those of needle before ``dampening`` existed."""
        state = super().state_dict()
        if self.dampening is None:
            del state["hyperparams"]["dampening"]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``; a missing ``dampening`` means None (the default)."""
        hyper = state_dict.get("hyperparams")
        if isinstance(hyper, dict) and "dampening" not in hyper:
            state_dict = {**state_dict, "hyperparams": {**hyper, "dampening": None}}
        super().load_state_dict(state_dict)

    def _update(self, index: int, param: Any, grad: Any) -> None:
        # the second scratch array exists only when there is decay to add
        out = self._buffer(index, param, 1) if self.weight_decay != 0.0 else None
        g = coupled_weight_decay(grad, param, self.weight_decay, out)
        u = self._state(index, param)["u"] if self.momentum != 0.0 else None
        sgd_update(param, g, float(self.lr), self.momentum, u, self.nesterov,
                   self._buffer(index, param, 0), self.dampening)
