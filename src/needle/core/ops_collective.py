"""Collective ops across the processes of a data-parallel job (MPI ranks).

They are graph nodes like any other op, so eager code, a Session and ``ndl.jit`` all run
them, and autodiff differentiates through them:

- ``all_reduce(x, op="sum")``: the sum over ranks; its adjoint is the sum over ranks of the
  adjoints (every rank's loss depends on every rank's x). ``op="mean"``: the sum / world size.
- ``broadcast(x, root)``: root's x everywhere; adjoint: the adjoints summed on root
  (``reduce_to_root``), zeros on the other ranks.
- ``reduce_to_root(x, root)``: the sum on root, zeros elsewhere; adjoint: root's adjoint broadcast.
- ``all_gather(x)``: every rank's x concatenated along axis 0; adjoint: this rank's block of
  the summed adjoint (``reduce_scatter``).
- ``reduce_scatter(x)``: this rank's block (axis 0) of the sum over ranks; adjoint:
  ``all_gather`` of the adjoint.

Every rank must run the same collectives in the same order, so they are ``side_effect``
ops: compiler passes never merge, fold or drop them. ``compute`` calls the process's
communicator, which the ``needle.distributed`` package provides as the context service
``"communicator"`` (the core imports no library package, and never mpi4py); without it
(a world of one) the ops are identities.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .context import service
from .registry import Aval, F, Op, ShapeError, fmt_shape, register

REDUCTIONS = ("sum", "mean")


def _communicator() -> Any:
    """The communicator ``needle.distributed`` provides (``import needle`` loads it)."""
    try:
        return service("communicator")()
    except LookupError:
        raise RuntimeError("collective ops need needle.distributed: import needle (or "
                           "needle.distributed) first") from None


def _world_size() -> int:
    return int(_communicator().size)


class CollectiveOp(Op):
    """A collective: runs on every rank in the same order; never merged, folded or dropped."""

    side_effect = True

    def infer(self, a: Aval) -> Aval:
        """Most collectives keep the shape and dtype (all_gather, reduce_scatter say theirs)."""
        return a


@register("all_reduce", inputs=("a",))
class AllReduce(CollectiveOp):
    """The elementwise sum (``op="sum"``) or mean (``op="mean"``) of ``a`` over all ranks."""

    def __init__(self, op: str = "sum") -> None:
        if op not in REDUCTIONS:
            raise ValueError(f"all_reduce: op must be one of {', '.join(REDUCTIONS)}, got {op!r}")
        self.op = op

    def compute(self, a):
        comm = _communicator()
        out = comm.allreduce(a, "sum")
        if self.op == "mean" and comm.size > 1:
            out = (out / comm.size).astype(out.dtype, copy=False)
        return out

    def gradient(self, out_grad, node):
        return F.all_reduce(out_grad, op=self.op)


@register("broadcast", inputs=("a",))
class Broadcast(CollectiveOp):
    """Rank ``root``'s ``a`` on every rank (every rank passes an array of that shape)."""

    def __init__(self, root: int = 0) -> None:
        self.root = int(root)

    def compute(self, a):
        return _communicator().broadcast(a, self.root)

    def gradient(self, out_grad, node):
        return F.reduce_to_root(out_grad, root=self.root)


@register("reduce_to_root", inputs=("a",))
class Reduce(CollectiveOp):
    """The sum of ``a`` over ranks on rank ``root``, zeros on the others."""

    def __init__(self, root: int = 0) -> None:
        self.root = int(root)

    def compute(self, a):
        return _communicator().reduce(a, self.root)

    def gradient(self, out_grad, node):
        return F.broadcast(out_grad, root=self.root)


def _check_leading(name: str, a: Aval) -> None:
    if len(a.shape) == 0:
        raise ShapeError(f"{name}: needs an input with at least one axis, got a scalar")


@register("all_gather", inputs=("a",))
class AllGather(CollectiveOp):
    """Every rank's ``a`` (one shape on all ranks) concatenated along axis 0 in rank order."""

    def compute(self, a):
        return _communicator().allgather(a)

    def gradient(self, out_grad, node):
        return F.reduce_scatter(out_grad)

    def infer(self, a: Aval) -> Aval:
        _check_leading(self.name, a)
        first = a.shape[0]
        return Aval((None if first is None else first * _world_size(), *a.shape[1:]), a.dtype)


@register("reduce_scatter", inputs=("a",))
class ReduceScatter(CollectiveOp):
    """This rank's block of axis 0 of the sum of ``a`` over ranks (axis 0 of ``a`` is
    world size blocks of equal length)."""

    def compute(self, a):
        return _communicator().reduce_scatter(a)

    def gradient(self, out_grad, node):
        return F.all_gather(out_grad)

    def infer(self, a: Aval) -> Aval:
        _check_leading(self.name, a)
        first, size = a.shape[0], _world_size()
        if first is not None and first % size:
            raise ShapeError(f"reduce_scatter: axis 0 of {fmt_shape(a.shape)} does not split "
                             f"into {size} equal blocks (one per rank)")
        return Aval((None if first is None else first // size, *a.shape[1:]),
                    np.dtype(a.dtype))
