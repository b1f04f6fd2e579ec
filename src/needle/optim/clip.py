"""Gradient clipping by the total L2 norm (as torch.nn.utils.clip_grad_norm_)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..autograd import Tensor
from ..backend import array_module

__all__ = ["clip_grad_norm"]


def clip_grad_norm(params: Iterable[Tensor] | Tensor, max_norm: float) -> float:
    """Scale all gradients by one factor so their total L2 norm is at most ``max_norm``.

    ``total = sqrt(sum_p ||p.grad||^2)``; when ``max_norm / (total + 1e-6) < 1`` every
    gradient becomes ``grad * max_norm / (total + 1e-6)``. Parameters without a gradient are
    skipped. Returns ``total`` (before clipping) as a Python float.

    NOTE: each clipped ``p.grad`` is a new Tensor rather than an in-place write, because
    gradient arrays may be shared (``add`` hands one adjoint to both inputs) or read-only
    broadcast views; scaling them in place could clip one array twice.
    """
    if isinstance(params, Tensor):
        params = [params]
    if max_norm < 0:
        raise ValueError(f"clip_grad_norm: max_norm must be >= 0, got {max_norm}")
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    squares = 0.0
    for p in with_grad:
        assert p.grad is not None
        g = p.grad.realize_data()
        flat = g.reshape(-1)
        # a dot product accumulates in the gradient's dtype without a temporary g * g
        squares += float(array_module(g).dot(flat, flat))
    total = math.sqrt(squares)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in with_grad:
            assert p.grad is not None
            g = p.grad.realize_data()
            p.grad = Tensor.make_const(array_module(g).multiply(g, coef))
    return total
