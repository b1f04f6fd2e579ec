"""Gradient averaging in buckets: the engine of DistributedDataParallel.

Parameters are grouped into buckets of about ``bucket_mb`` megabytes, in reverse
registration order (a backward sweep reaches the last layers' parameters first). Eagerly,
each gradient is copied into its bucket's flat buffer the moment it is final (the autodiff
gradient hook); once every gradient of the next bucket is in, a non-blocking all-reduce
(``MPI_Iallreduce``) of the buffer starts, while backward goes on computing the earlier
layers' gradients. Buckets start strictly in order, so every rank issues the same collectives
in the same order. When the sweep ends the reducer waits for all of them (with the
communicator's deadline) and hands back the averaged gradients, views of the buffers.

Under ``ndl.jit`` and in declared graphs the gradients have no values yet: the reducer
then builds, per bucket, ``concatenate -> all_reduce(mean) -> slices`` graph nodes, which
the compiled program runs (blocking there).

A parameter that got no gradient on this rank contributes zeros (another rank's gradient
for it is still averaged in), so every rank takes the same collectives and steps.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..autograd import Tensor, make_from_op, new_leaf
from ..core import context
from ..core.registry import Aval, F, Op, register

#: events kept per backward at most (``Reducer.events``: what happened, in order)
_MAX_EVENTS = 4096


def plan_buckets(params: list, bucket_bytes: int) -> list[list[int]]:
    """Parameter indices in buckets of at most ``bucket_bytes`` (a larger parameter alone),
    last parameter first; each bucket holds one dtype."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    dtype = None
    for index in reversed(range(len(params))):
        p = params[index]
        nbytes = int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize
        if current and (size + nbytes > bucket_bytes or np.dtype(p.dtype) != dtype):
            buckets.append(current)
            current, size = [], 0
        current.append(index)
        size += nbytes
        dtype = np.dtype(p.dtype)
    if current:
        buckets.append(current)
    return buckets


@register("arm_gradient_hook", inputs=("*after",), internal=True)
class ArmGradientHook(Op):
    """Arms a Reducer for the next backward each time a compiled forward runs (a jitted
    forward whose backward runs eagerly, outside the plan). An effect: never dropped."""

    side_effect = True
    differentiable = False

    def __init__(self, reducer: Reducer) -> None:
        self.reducer = reducer
        #: False once the traced function ran its backward itself (its plan all-reduces)
        self.active = True

    def attrs(self) -> tuple:
        return (("reducer", id(self.reducer)),)

    def compute(self, *after: Any) -> Any:
        if self.active:
            self.reducer.arm()
        return np.zeros((), dtype=np.float32)

    def infer(self, *avals: Aval) -> Aval:
        return Aval((), np.dtype(np.float32))


class Reducer:
    """Averages the gradients of ``params`` over the ranks of ``comm`` (a gradient hook)."""

    def __init__(self, params: list, comm: Any, bucket_mb: float) -> None:
        self.params = params
        self.comm = comm
        self.buckets = plan_buckets(params, max(1, int(bucket_mb * 2**20)))
        self._where: dict[int, tuple[int, int, int]] = {}  # id(param) -> bucket, start, stop
        self._sizes: list[int] = []
        for b, members in enumerate(self.buckets):
            offset = 0
            for index in members:
                n = int(np.prod(params[index].shape))
                self._where[id(params[index])] = (b, offset, offset + n)
                offset += n
            self._sizes.append(offset)
        #: (event, detail, time.perf_counter()) of the last backward: "ready" (a gradient
        #: arrived: parameter index), "start" (a bucket's all-reduce began), "done" (the sweep
        #: ended), "complete" (a bucket's all-reduce was seen finished while backward ran),
        #: "wait" (a bucket's all-reduce was waited for after the sweep)
        self.events: list[tuple[str, int, float]] = []
        #: the arming nodes of jitted forwards since the last backward (see ddp.py)
        self.arm_ops: list = []
        self._reset()

    # -- per-backward state ------------------------------------------------------------------
    def _reset(self) -> None:
        self._buffers: list[Any] = [None] * len(self.buckets)
        self._missing = [len(members) for members in self.buckets]
        self._requests: list[Any] = []
        self._completed: set[int] = set()
        self._launched = 0
        self._ready: set[int] = set()
        self._lazy: dict[int, Any] = {}

    def _log(self, event: str, detail: int) -> None:
        if len(self.events) < _MAX_EVENTS:
            self.events.append((event, detail, time.perf_counter()))

    def arm(self) -> None:
        """Hear of the next backward pass's gradients in this thread."""
        if not self._ready and not self._lazy and self._launched == 0:
            self.events = []
        context.add_grad_hook(self)

    def prepare(self, args: tuple) -> None:
        """A forward pass of the wrapped module on ``args`` begins: arm for its backward.
        While ``ndl.jit`` traces, also record a node that arms on every replay of the plan
        (a jitted forward whose backward runs eagerly)."""
        self.arm()
        if context.active_trace() is not None:
            lazy = [a for a in args if isinstance(a, Tensor) and a._data is None]
            if lazy:
                self.arm_ops.append(make_from_op(ArmGradientHook(self), (lazy[0],)).op)

    # -- the gradient hook -------------------------------------------------------------------
    def grad_ready(self, leaf: Any, grad: Any) -> None:
        where = self._where.get(id(leaf))
        if where is None or id(leaf) in self._ready:
            return
        bucket, start, stop = where
        self._ready.add(id(leaf))
        data = grad._data
        if data is None or type(data) is not np.ndarray:  # a graph gradient (JIT, Session)
            self._lazy[id(leaf)] = grad
            return
        buffer = self._buffers[bucket]
        if buffer is None:
            dtype = self.params[self.buckets[bucket][0]].dtype
            buffer = self._buffers[bucket] = np.zeros(self._sizes[bucket], dtype=dtype)
        buffer[start:stop] = data.reshape(-1)
        self._missing[bucket] -= 1
        self._log("ready", self._index(leaf))
        self._launch_ready()
        for b, request in enumerate(self._requests):  # drive MPI's progress of those in flight
            if b not in self._completed and request.Test():
                self._completed.add(b)
                self._log("complete", b)

    def _index(self, leaf: Any) -> int:
        bucket, start, _ = self._where[id(leaf)]
        for index in self.buckets[bucket]:
            if self.params[index] is leaf:
                return index
        return -1

    def _launch_ready(self, force: bool = False) -> None:
        """Start the all-reduce of each next bucket whose gradients are all in (all, with
        ``force``), in bucket order."""
        while self._launched < len(self.buckets) and (force or
                                                      self._missing[self._launched] == 0):
            b = self._launched
            if self._buffers[b] is None:  # no gradient of this bucket on this rank
                dtype = self.params[self.buckets[b][0]].dtype
                self._buffers[b] = np.zeros(self._sizes[b], dtype=dtype)
            self._requests.append(self.comm.iallreduce(self._buffers[b]))
            self._log("start", b)
            self._launched += 1

    def backward_done(self) -> dict:
        """Wait for every bucket; the averaged gradients by parameter."""
        context.remove_grad_hook(self)
        self._log("done", -1)
        try:
            if self._lazy:
                return self._graph_average()
            self.arm_ops.clear()
            if not self._ready:
                return {}
            self._launch_ready(force=True)
            size = self.comm.size
            result: dict = {}
            for b, request in enumerate(self._requests):
                self.comm.wait(request, f"the all-reduce of gradient bucket {b}")
                self._log("wait", b)
                buffer = self._buffers[b]
                np.divide(buffer, size, out=buffer)
                for index in self.buckets[b]:
                    p = self.params[index]
                    _, start, stop = self._where[id(p)]
                    result[p] = new_leaf(Tensor, buffer[start:stop].reshape(p.shape),
                                         device=p.device)
            return result
        finally:
            self._reset()

    def _graph_average(self) -> dict:
        """Graph nodes averaging the (lazy) gradients: one all-reduce per bucket."""
        for op in self.arm_ops:  # a traced forward whose backward is traced too
            op.active = False
        self.arm_ops.clear()
        result: dict = {}
        for b, members in enumerate(self.buckets):
            pieces = []
            for index in members:
                p = self.params[index]
                grad = self._lazy.get(id(p))
                if grad is None:
                    grad = F.full_like(F.stop_gradient(p), 0)
                pieces.append(F.reshape(grad, (int(np.prod(p.shape)),)))
            flat = pieces[0] if len(pieces) == 1 else F.concatenate(pieces, axis=0)
            averaged = F.all_reduce(flat, op="mean")
            self._log("start", b)
            for index in members:
                p = self.params[index]
                _, start, stop = self._where[id(p)]
                result[p] = F.reshape(averaged[start:stop], tuple(p.shape))
        return result


__all__ = ["Reducer", "plan_buckets"]
