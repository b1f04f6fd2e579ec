"""Adam (coupled L2 weight decay) and AdamW (decoupled weight decay)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ..autograd import Tensor
from ..backend import array_module
from .optimizer import Optimizer, coupled_weight_decay, decoupled_weight_decay

__all__ = ["Adam", "AdamW", "adam_update"]


def adam_update(param: Any, grad: Any, m: Any, v: Any, t: int, lr: float, beta1: float,
                beta2: float, eps: float, scratch: Any) -> None:
    """One Adam step on arrays, in place on ``param``, ``m`` and ``v``; ``grad`` is only read.

    With ``g`` the (already weight-decayed) gradient and ``t`` the 1-based step number::

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g^2
        m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)
        p = p - lr * m_hat / (sqrt(v_hat) + eps)

    computed in torch.optim.Adam's order (``m`` as a lerp towards ``g``,
    ``denom = sqrt(v) / sqrt(1 - beta2^t) + eps``, ``p -= lr / (1 - beta1^t) * m / denom``)
    so trajectories agree with PyTorch to float32 rounding. ``scratch`` is overwritten.
    """
    xp = array_module(param)
    # NOTE: Python floats keep float32 arrays float32 (a NumPy float64 scalar would promote)
    bias1 = 1.0 - beta1**t
    bias2_sqrt = math.sqrt(1.0 - beta2**t)
    step_size = lr / bias1
    # m += (1 - beta1) * (g - m)
    xp.subtract(grad, m, out=scratch)
    xp.multiply(scratch, 1.0 - beta1, out=scratch)
    xp.add(m, scratch, out=m)
    # v = beta2 * v + (1 - beta2) * g * g
    xp.multiply(v, beta2, out=v)
    xp.multiply(grad, grad, out=scratch)
    xp.multiply(scratch, 1.0 - beta2, out=scratch)
    xp.add(v, scratch, out=v)
    # p -= step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    xp.sqrt(v, out=scratch)
    xp.divide(scratch, bias2_sqrt, out=scratch)
    xp.add(scratch, eps, out=scratch)
    xp.divide(m, scratch, out=scratch)
    xp.multiply(scratch, step_size, out=scratch)
    xp.subtract(param, scratch, out=param)


class Adam(Optimizer):
    """Adam with coupled weight decay: ``g = grad + wd * p``, then ``adam_update``.

    ``Adam(params, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, fused=None)``
    (``fused``: see ``Optimizer``). One step counter ``t`` counts ``step()`` calls
    (``step_count``). Matches ``torch.optim.Adam`` with ``betas=(beta1, beta2)``.
    """

    hyperparams = ("lr", "beta1", "beta2", "eps", "weight_decay")
    state_names = ("m", "v")
    #: True in AdamW: weight decay shrinks p directly instead of entering the gradient
    decoupled = False

    def __init__(self, params: Iterable[Tensor], lr: float = 0.01, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                 fused: bool | None = None) -> None:
        super().__init__(params, lr, fused)
        # the shared rule table (optimizer.py), as load_state_dict checks: NaN is refused too
        self._check_hyperparams(type(self).__name__, {
            "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay})
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)

    def _update(self, index: int, param: Any, grad: Any) -> None:
        lr = float(self.lr)
        if self.decoupled:
            decoupled_weight_decay(param, lr, self.weight_decay)
            g = grad
        else:
            # the second scratch array exists only when there is decay to add
            out = self._buffer(index, param, 1) if self.weight_decay != 0.0 else None
            g = coupled_weight_decay(grad, param, self.weight_decay, out)
        state = self._state(index, param)
        adam_update(param, g, state["m"], state["v"], self.step_count, lr, self.beta1,
                    self.beta2, self.eps, self._buffer(index, param, 0))


class AdamW(Adam):
    """Adam with decoupled weight decay (``torch.optim.AdamW``)::

        p = p * (1 - lr * weight_decay)      then adam_update with g = grad

    ``AdamW(params, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)``.
    """

    decoupled = True

    def __init__(self, params: Iterable[Tensor], lr: float = 0.001, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01,
                 fused: bool | None = None) -> None:
        super().__init__(params, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                         weight_decay=weight_decay, fused=fused)
