"""The node a step rewritten by a compiler pass reports (vocab_head_rewrite.py,
batchnorm_relu_rewrite.py): a fused op that no traced graph holds still needs a node for the
plan's step (its op, input nodes, aval and the origin it came from)."""

from __future__ import annotations

from typing import Any

__all__ = ["RewrittenNode"]


class RewrittenNode:
    """The node a rewritten step reports: its op, input nodes, aval(s) and origin."""

    __slots__ = ("op", "inputs", "aval", "meta", "device")

    def __init__(self, op: Any, inputs: tuple, aval: Any, meta: Any, device: Any) -> None:
        self.op = op
        self.inputs = inputs
        self.aval = aval
        self.meta = meta
        self.device = device

    @property
    def shape(self) -> tuple:
        """The value's shape (ops' ``emit`` read it, as they read a Tensor's)."""
        return tuple(self.aval.shape)

    @property
    def dtype(self) -> Any:
        """The value's dtype."""
        return self.aval.dtype
