"""SyncBatchNorm: BatchNorm with the statistics of the global batch of a data-parallel job."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import ops
from ..autograd import Tensor
from .basic import BatchNorm1d
from .module import Module

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class SyncBatchNorm(BatchNorm1d):
    """BatchNorm over (B, C, ...) input whose training statistics are those of every rank's
    batch together, as one process with the global batch would compute them.

    Training: the per-channel sums and counts are summed over ranks (``all_reduce``), then
    the mean; then the sums of squared deviations from it, for the biased variance. Both are
    graph ops, so the gradient flows through the all-reduces and equals the gradient of
    BatchNorm on the global batch. Running statistics follow ``BatchNorm1d``'s rule with the
    global statistics, so they stay equal on every rank. Evaluation is BatchNorm's. In a
    world of one process it computes what BatchNorm1d / BatchNorm2d compute.
    """

    def _check(self, x: Tensor) -> tuple[int, ...]:
        if len(x.shape) < 2 or x.shape[1] != self.dim:
            raise ValueError(f"SyncBatchNorm({self.dim}): expected a (B, {self.dim}, ...) "
                             f"input, got shape {tuple(x.shape)}")
        return tuple(i for i in range(len(x.shape)) if i != 1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        axes = self._check(x)
        ndim = len(x.shape)
        local = 1
        for axis in axes:
            local *= x.shape[axis]
        # sums and the count in one all-reduce: (C + 1,) values
        count = Tensor(np.array([local], dtype=x.dtype), requires_grad=False, device=x.device)
        sums = ops.all_reduce(ops.concatenate(
            [ops.summation(x, axes=axes), count], axis=0))
        total = sums[self.dim:]
        mean = sums[: self.dim] / total
        mean = ops.reshape(mean, (1, self.dim) + (1,) * (ndim - 2))
        centered = x - mean
        squares = ops.all_reduce(ops.summation(centered * centered, axes=axes))
        var = ops.reshape(squares / total, mean.shape)
        normed = centered * ops.power_scalar(var + self.eps, -0.5)
        out = normed * self._per_channel(self.weight, ndim) + self._per_channel(self.bias, ndim)
        self._update_running(mean, var, out)  # nodes of the forward pass (a Session's
        # train op runs the stores whose inputs its loss computes)
        return out


def convert_sync_batchnorm(module: Module) -> Module:
    """``module`` with every BatchNorm1d / BatchNorm2d replaced by a SyncBatchNorm holding the
    same Parameters and Buffers (the very objects: optimizers built before still apply).
    Returns the new top module when ``module`` itself is a BatchNorm."""
    if isinstance(module, BatchNorm1d) and not isinstance(module, SyncBatchNorm):
        return _as_sync(module)
    for _, owner in list(module.named_modules()):
        for name, value in list(vars(owner).items()):
            vars(owner)[name] = _replace(value)
    return module


def _replace(value: Any) -> Any:
    if isinstance(value, BatchNorm1d) and not isinstance(value, SyncBatchNorm):
        return _as_sync(value)
    if isinstance(value, list):
        return [_replace(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_replace(v) for v in value)
    if isinstance(value, dict):
        return {k: _replace(v) for k, v in value.items()}
    return value


def _as_sync(bn: BatchNorm1d) -> SyncBatchNorm:
    sync = SyncBatchNorm.__new__(SyncBatchNorm)
    vars(sync).update(vars(bn))
    return sync
