"""DistributedDataParallel: one model replica per rank, gradients averaged across ranks.

Each rank runs the wrapped module on its share of the global batch; backward averages
the gradients over the ranks (bucketed, overlapped with the rest of backward: see
:mod:`needle.distributed.reducer`), so after ``optimizer.step()`` every replica holds the
same parameters, those of one process training on the whole batch (the mean loss over equal
shares is the mean loss over the batch). Works eagerly, under ``ndl.jit`` (the trace holds
the all-reduce ops) and with a Session's train op (``opt.minimize(loss)``).

BatchNorm layers keep per-rank statistics unless ``sync_bn=True`` turns them into
``nn.SyncBatchNorm`` (statistics of the global batch).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..autograd import is_grad_enabled, no_grad
from ..nn import Module
from ..nn.sync_batchnorm import convert_sync_batchnorm
from .comm import communicator
from .reducer import Reducer


def broadcast_state(module: Module, root: int = 0) -> None:
    """Give every rank rank ``root``'s parameters and buffers (in place: the arrays keep
    their identity, so optimizers' views of them stay valid)."""
    comm = communicator()
    if comm.size == 1:
        return
    with no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            value = comm.broadcast(tensor.numpy(), root)
            data = tensor._data
            if type(data) is np.ndarray and data.flags.writeable:
                np.copyto(data, value)
            else:
                tensor.data = value


class DistributedDataParallel(Module):
    """``DistributedDataParallel(module, bucket_mb=25, sync_bn=False)``.

    At construction rank 0's parameters and buffers are broadcast to every rank. Calling it
    calls ``module``; the backward pass that follows averages the parameters' gradients over
    the ranks, so the optimizer (built on ``ddp.parameters()`` or ``module.parameters()``)
    reads averaged gradients. ``bucket_mb`` is the size of each all-reduce. A world of one
    process adds nothing.
    """

    def __init__(self, module: Module, bucket_mb: float = 25.0, sync_bn: bool = False) -> None:
        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(f"DistributedDataParallel: expected an nn.Module, got "
                            f"{type(module).__name__}")
        if not bucket_mb > 0:
            raise ValueError(f"DistributedDataParallel: bucket_mb must be positive, got "
                             f"{bucket_mb}")
        if sync_bn:
            module = convert_sync_batchnorm(module)
        self.module = module
        self.bucket_mb = float(bucket_mb)
        comm = communicator()
        self.world_size = comm.size
        broadcast_state(module)
        params = [p for p in module.parameters() if p.requires_grad]
        self.reducer = Reducer(params, comm, self.bucket_mb)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.world_size > 1 and is_grad_enabled():
            self.reducer.prepare(args)  # the next backward in this thread averages
        return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"world_size={self.world_size}, buckets={len(self.reducer.buckets)}"


__all__ = ["DistributedDataParallel", "broadcast_state"]
