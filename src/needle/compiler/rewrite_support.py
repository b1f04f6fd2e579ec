"""What the compiler's rewrite passes share (batchnorm_relu_conv_rewrite.py,
batchnorm_relu_mean_rewrite.py, vocab_head_rewrite.py): which steps read each slot, and
applying a pass's matches until none is left (each rewrite changes the steps the next
search sees)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.interpret import Program

__all__ = ["rewrite_until_done", "step_readers"]


def step_readers(program: Program) -> dict[int, list[int]]:
    """Slot -> the indices of the steps that read it (each step once, in order)."""
    readers: dict[int, list[int]] = {}
    for i, step in enumerate(program.steps):
        for slot in set(step.inputs):
            readers.setdefault(slot, []).append(i)
    return readers


def rewrite_until_done(find: Callable[[], tuple | None], apply: Callable[..., Any]) -> int:
    """``apply(*match)`` for each ``find()`` until it finds nothing; the number applied."""
    count = 0
    while (match := find()) is not None:
        apply(*match)
        count += 1
    return count
