"""A language model's vocabulary head and its loss in one: ``Linear`` then ``SoftmaxLoss``
without a second logits-sized array (core/ops_vocab_head.py).

``SoftmaxLoss()(Linear(k, v)(x), y)`` makes the logits, then the loss's gradient makes a
second array of their size and passes over it again. ``LinearSoftmaxLoss(k, v)(x, y)``
computes the same loss (and gradients, to float rounding) from one array, with each
exponential computed once. Under ``ndl.jit`` the first form is rewritten into the second.
"""

from __future__ import annotations

from typing import Any

from .. import ops
from ..autograd import Tensor
from .basic import Linear
from .loss import _as_tensor, _check_reduction, _reduce

__all__ = ["LinearSoftmaxLoss", "linear_softmax_cross_entropy"]


def linear_softmax_cross_entropy(x: Tensor, weight: Tensor, bias: Tensor, ids: Tensor
                                 ) -> Tensor:
    """Per-row ``softmax_cross_entropy(linear(x, weight, bias), ids)`` (N,): x (N, K),
    weight (K, C), bias (C,) or (1, C), ids (N,) class ids in [0, C)."""
    parts = ops.vocab_head_softmax(x, weight, bias, ids)
    return ops.vocab_head_loss(x, weight, bias, ids, parts[0], parts[1])


class LinearSoftmaxLoss(Linear):
    """``SoftmaxLoss(reduction)(Linear(in_features, out_features)(x), y)`` as one module: the
    parameters (``weight``, ``bias``, initialized as Linear's) and the loss of x (N, in) for
    class ids y (N,)."""

    def __init__(self, in_features: int, out_features: int, reduction: str = "mean",
                 device: Any = None, dtype: Any = "float32") -> None:
        super().__init__(in_features, out_features, bias=True, device=device, dtype=dtype)
        self.reduction = _check_reduction(type(self).__name__, reduction)

    def forward(self, x: Tensor, y: Any) -> Tensor:  # type: ignore[override]
        if len(x.shape) != 2 or x.shape[1] not in (None, self.in_features):
            raise ValueError(f"{type(self).__name__}: x must be (N, {self.in_features}), got "
                             f"{tuple(x.shape)}")
        y = _as_tensor(y, x)
        assert self.bias is not None  # (made with bias=True)
        losses = linear_softmax_cross_entropy(x, self.weight, self.bias, y)
        return _reduce(losses, self.reduction)
