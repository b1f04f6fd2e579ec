"""Collectives on Tensors: registered ops (``ndl.ops.all_reduce``, ...), so they run eagerly,
in a Session and under ``ndl.jit``, and are differentiable."""

from __future__ import annotations

from typing import Any

from .. import ops
from ..autograd import Tensor
from .comm import communicator


def _tensor(x: Any, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"needle.distributed.{what}: expected a Tensor, got {type(x).__name__}")
    communicator()  # joins the group on first use
    return x


def all_reduce(x: Tensor, op: str = "sum") -> Tensor:
    """The elementwise sum (``op="sum"``) or mean (``op="mean"``) of ``x`` over all ranks.

    Gradient: the same all-reduce of the adjoint."""
    return ops.all_reduce(_tensor(x, "all_reduce"), op=op)


def broadcast(x: Tensor, root: int = 0) -> Tensor:
    """Rank ``root``'s ``x`` on every rank. Gradient: the adjoints summed onto ``root``."""
    return ops.broadcast(_tensor(x, "broadcast"), root=root)


def all_gather(x: Tensor) -> Tensor:
    """Every rank's ``x`` concatenated along axis 0 in rank order (one shape on all ranks).

    Gradient: this rank's block of the summed adjoint."""
    return ops.all_gather(_tensor(x, "all_gather"))


def reduce_scatter(x: Tensor) -> Tensor:
    """This rank's block of axis 0 of the sum of ``x`` over ranks."""
    return ops.reduce_scatter(_tensor(x, "reduce_scatter"))


__all__ = ["all_gather", "all_reduce", "broadcast", "reduce_scatter"]
