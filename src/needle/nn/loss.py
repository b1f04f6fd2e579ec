"""Losses as modules (tensor in, scalar out) and the l2 penalty."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .. import ops
from ..autograd import Tensor
from .module import Module

__all__ = [
    "BCEWithLogitsLoss", "CrossEntropyLoss", "L1Loss", "MSELoss", "SoftmaxLoss", "l2_penalty",
]

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(loss: str, reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{loss}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return ops.mean(values)
    if reduction == "sum":
        return ops.summation(values)
    return values


def _as_tensor(value: Any, like: Tensor) -> Tensor:
    """Labels or targets given as arrays or lists become constant Tensors."""
    if isinstance(value, Tensor):
        device = value.device
        return value if device is like.device or device == like.device else value.to(
            like.device)
    return Tensor(np.asarray(value), device=like.device, requires_grad=False)


def _checked_labels(loss: str, logits: Tensor, y: Tensor) -> Tensor:
    """``y`` through the ``check_class_ids`` op, after the static checks of shapes and dtype.

    Shapes must be (B, C) and (B,) (known while the graph is built, so checked here in
    Python; an unknown B in either agrees with any). The values, whole class ids in [0, C),
    are checked by the op when they exist: at once in eager mode, on every Session run and
    every JIT call. Use the returned labels, so that no graph pass can drop the check.
    """
    shape, y_shape = tuple(logits.shape), tuple(y.shape)  # (each read once: every step)
    if len(shape) != 2:
        raise ValueError(f"{loss}: logits must be (batch, classes), got shape {shape}")
    batch, classes = shape
    if classes is None:
        raise ValueError(f"{loss}: the number of classes (logits' last dim) must be known, got "
                         f"shape {shape}")
    if len(y_shape) != 1 or (None not in (batch, y_shape[0]) and y_shape[0] != batch):
        raise ValueError(f"{loss}: labels must have shape ({batch},) for logits of shape "
                         f"{shape}, got {y_shape}; pass one class id per row (e.g. "
                         "y.reshape((batch,)))")
    if y.dtype.kind not in "iuf":
        raise ValueError(f"{loss}: labels must be integer class ids, got dtype {y.dtype}")
    return ops.check_class_ids(y, classes, what=loss)


def _picked_logits(logits: Tensor, y: Tensor) -> Tensor:
    """(B,) logits z_i[y_i] of each row's label: one gather of B values (its adjoint adds B
    values into zeros), no (B, C) one-hot target; works while B is unknown (-1 reshapes)."""
    picked = ops.take_along_axis(logits, ops.reshape(y, (-1, 1)), axis=1)
    return ops.reshape(picked, (-1,))


class SoftmaxLoss(Module):
    """Softmax cross-entropy: mean over the batch of logsumexp(z_i) - z_i[y_i].

    ``logits`` (B, C), ``y`` (B,) integer class ids (any int or whole-valued float dtype).
    With ``label_smoothing`` = s the target is (1 - s) one_hot(y) + s / C (PyTorch):
    loss_i = logsumexp(z_i) - sum_c target_ic z_ic.
    """

    def __init__(self, label_smoothing: float = 0.0, reduction: str = "mean") -> None:
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"{type(self).__name__}: label_smoothing must lie in [0, 1], got "
                             f"{label_smoothing}")
        self.label_smoothing = label_smoothing
        self.reduction = _check_reduction(type(self).__name__, reduction)

    def forward(self, logits: Tensor, y: Any) -> Tensor:
        y = _checked_labels(type(self).__name__, logits, _as_tensor(y, logits))
        if not self.label_smoothing:
            # one node (its gradient one op): logsumexp(z_i) - z_i[y_i] per row
            return _reduce(ops.softmax_cross_entropy(logits, y), self.reduction)
        # sum_c target_ic z_ic = (1 - s) z_i[y_i] + s mean_c z_ic
        s = self.label_smoothing
        picked = _picked_logits(logits, y) * (1.0 - s) + ops.mean(logits, axes=(1,)) * s
        return _reduce(ops.logsumexp(logits, axes=(1,)) - picked, self.reduction)


class CrossEntropyLoss(SoftmaxLoss):
    """PyTorch's name for SoftmaxLoss (logits and class ids)."""


def _check_same_shape(loss: str, pred: Tensor, target: Tensor) -> None:
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"{loss}: input and target shapes differ: {tuple(pred.shape)} vs "
                         f"{tuple(target.shape)}")


class MSELoss(Module):
    """mean((pred - target)^2) (``reduction="sum"``: the sum; ``"none"``: per element)."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _check_reduction("MSELoss", reduction)

    def forward(self, pred: Tensor, target: Any) -> Tensor:
        target = _as_tensor(target, pred)
        _check_same_shape("MSELoss", pred, target)
        diff = pred - target
        return _reduce(diff * diff, self.reduction)


class L1Loss(Module):
    """mean(|pred - target|) (``reduction="sum"``: the sum; ``"none"``: per element)."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _check_reduction("L1Loss", reduction)

    def forward(self, pred: Tensor, target: Any) -> Tensor:
        target = _as_tensor(target, pred)
        _check_same_shape("L1Loss", pred, target)
        return _reduce(ops.abs(pred - target), self.reduction)


class BCEWithLogitsLoss(Module):
    """Binary cross-entropy on logits: mean(softplus(x) - y x), y in [0, 1].

    softplus(x) = log(1 + e^x) is computed as logsumexp([0, x]), which is stable for any x
    and smooth at 0, so the gradient is exactly sigmoid(x) - y (no kink from |x| or max).
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _check_reduction("BCEWithLogitsLoss", reduction)

    def forward(self, logits: Tensor, target: Any) -> Tensor:
        target = _as_tensor(target, logits)
        _check_same_shape("BCEWithLogitsLoss", logits, target)
        if target.dtype != logits.dtype:
            target = ops.astype(target, logits.dtype)
        pair = ops.stack([ops.zeros_like(logits), logits], axis=-1)
        softplus = ops.logsumexp(pair, axes=(-1,))
        return _reduce(softplus - logits * target, self.reduction)


def l2_penalty(parameters: Iterable[Tensor] | Module, weight_decay: float) -> Tensor:
    """weight_decay / 2 * sum over parameters of ||p||^2, a scalar Tensor.

    Its gradient is ``weight_decay * p``, the same term that an optimizer's ``weight_decay``
    adds, so ``loss + l2_penalty(model.parameters(), wd)`` with a plain optimizer trains like
    the optimizer with ``weight_decay=wd`` (use one or the other, not both).
    """
    params: Sequence[Tensor] = (list(parameters) if not isinstance(parameters, Module)
                                else parameters.parameters())
    if not params:
        return Tensor(0.0, requires_grad=False)
    total = None
    for p in params:
        term = ops.summation(p * p)
        total = term if total is None else total + term
    assert total is not None  # (params is not empty)
    return total * (weight_decay / 2.0)
