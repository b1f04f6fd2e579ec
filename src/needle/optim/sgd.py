"""Stochastic gradient descent with needle's damped momentum and an optional Nesterov step."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..autograd import Tensor
from ..backend import array_module
from .optimizer import Optimizer, coupled_weight_decay

__all__ = ["SGD", "sgd_update"]


def sgd_update(param: Any, grad: Any, lr: float, momentum: float, u: Any | None,
               nesterov: bool, scratch: Any) -> None:
    """One SGD step on arrays, in place on ``param`` (and ``u``); ``grad`` is only read.

    ``g`` is the (already weight-decayed) gradient, ``u`` the momentum buffer (zeros at first)::

        momentum == 0:  p = p - lr * g
        otherwise:      u = momentum * u + (1 - momentum) * g
                        p = p - lr * u                                    (heavy ball)
                        p = p - lr * (momentum * u + (1 - momentum) * g)  (nesterov, new u)

    The Nesterov form applies the damped momentum average once more to look one step ahead;
    for a constant gradient both forms settle at ``p -= lr * g``. ``scratch`` is an array
    shaped like ``param`` whose contents are overwritten.
    """
    xp = array_module(param)
    if momentum == 0.0:
        xp.multiply(grad, lr, out=scratch)
        xp.subtract(param, scratch, out=param)
        return
    damp = 1.0 - momentum
    xp.multiply(u, momentum, out=u)
    xp.multiply(grad, damp, out=scratch)
    xp.add(u, scratch, out=u)
    if nesterov:
        # p -= lr * (1 - momentum) * g, then p -= lr * momentum * u: two passes, no extra array
        xp.multiply(scratch, lr, out=scratch)
        xp.subtract(param, scratch, out=param)
        xp.multiply(u, lr * momentum, out=scratch)
    else:
        xp.multiply(u, lr, out=scratch)
    xp.subtract(param, scratch, out=param)


class SGD(Optimizer):
    """SGD with needle's damped momentum and coupled weight decay (``g = grad + wd * p``).

    ``SGD(params, lr=0.01, momentum=0.0, weight_decay=0.0, nesterov=False, fused=None)``; see
    ``sgd_update`` for the equations. Unlike ``torch.optim.SGD`` the momentum buffer starts at
    0 and is damped by ``1 - momentum``, so the first step moves ``lr * (1 - momentum) * g``.
    """

    hyperparams = ("lr", "momentum", "weight_decay", "nesterov")

    def __init__(self, params: Iterable[Tensor], lr: float = 0.01, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False,
                 fused: bool | None = None) -> None:
        super().__init__(params, lr, fused)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SGD: momentum must be in [0, 1) (needle damps it by "
                             f"1 - momentum), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"SGD: weight_decay must be >= 0, got {weight_decay}")
        if nesterov and momentum == 0.0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)

    @property
    def state_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("u",) if self.momentum != 0.0 else ()

    def _update(self, index: int, param: Any, grad: Any) -> None:
        # the second scratch array exists only when there is decay to add
        out = self._buffer(index, param, 1) if self.weight_decay != 0.0 else None
        g = coupled_weight_decay(grad, param, self.weight_decay, out)
        u = self._state(index, param)["u"] if self.momentum != 0.0 else None
        sgd_update(param, g, float(self.lr), self.momentum, u, self.nesterov,
                   self._buffer(index, param, 0))
