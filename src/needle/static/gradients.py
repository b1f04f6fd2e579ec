"""Symbolic gradients: the same reverse mode as Tensor.backward, on graph nodes."""

from __future__ import annotations

from typing import Any

from ..core import autodiff


def gradients(ys: Any, xs: Any, grad_ys: Any = None) -> list:
    """Gradient tensors of sum(ys) with respect to each of ``xs`` (None where unconnected).

    ``ys`` and ``xs`` may be single tensors or lists; ``grad_ys`` seeds the outputs
    (ones by default). The result is a list with one entry per x.
    """
    ys = list(ys) if isinstance(ys, list | tuple) else [ys]
    xs = list(xs) if isinstance(xs, list | tuple) else [xs]
    if grad_ys is not None:
        grad_ys = list(grad_ys) if isinstance(grad_ys, list | tuple) else [grad_ys]
    for y in ys:
        if not y.requires_grad:
            raise ValueError(f"gradients: {y!r} does not depend on any trainable Variable or "
                             "tensor that requires a gradient")
    return autodiff.gradients(ys, xs, grad_ys)
