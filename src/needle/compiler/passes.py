"""Program rewrites: common-subexpression elimination, constant folding, dead steps, frees.

Passes never modify the user's graph nodes: they rewrite a Program's steps and slots.
An op with ``side_effect = True`` (assign, print, train ops) or ``random = True`` (dropout
masks) is never merged or folded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.interpret import Program, plan_frees


def _pure(op: Any) -> bool:
    return not getattr(op, "side_effect", False) and not getattr(op, "random", False)


def _rename(program: Program, alias: dict[int, int]) -> None:
    """Point every use of an aliased slot at its replacement."""
    if not alias:
        return
    for step in program.steps:
        step.inputs = tuple(alias.get(s, s) for s in step.inputs)
    program.outputs = [alias.get(s, s) for s in program.outputs]


def eliminate_dead_steps(program: Program) -> None:
    """Drop steps whose values nothing needs (after merging or folding made them unused)."""
    needed = set(program.outputs)
    kept = []
    for step in reversed(program.steps):
        if step.out in needed or getattr(step.op, "side_effect", False):
            kept.append(step)
            needed.update(step.inputs)
    program.steps = kept[::-1]
    program.constants = {k: v for k, v in program.constants.items() if k in needed}


def eliminate_common_subexpressions(program: Program) -> int:
    """Merge steps applying the same op (equal ``op.key()``) to the same input slots."""
    seen: dict[tuple, int] = {}
    alias: dict[int, int] = {}
    for step in program.steps:
        step.inputs = tuple(alias.get(s, s) for s in step.inputs)
        if not _pure(step.op):
            continue
        try:
            key = (step.op.key(), step.inputs)
            hash(key)
        except TypeError:  # an attribute that cannot be hashed: leave the step alone
            continue
        if key in seen:
            alias[step.out] = seen[key]
        else:
            seen[key] = step.out
    _rename(program, alias)
    before = len(program.steps)
    eliminate_dead_steps(program)
    return before - len(program.steps)


def fold_constants(program: Program, constant_value: Callable[[Any], Any]) -> int:
    """Compute at plan time every pure step whose inputs are all constants.

    ``constant_value(node)`` gives a source node's fixed value, or None if it can change
    between runs (placeholders, Variables, parameters).
    """
    known: dict[int, Any] = dict(program.constants)
    for node in program.sources:
        value = constant_value(node)
        if value is not None:
            known[id(node)] = value
    remaining = []
    folded = 0
    for step in program.steps:
        if _pure(step.op) and all(s in known for s in step.inputs):
            known[step.out] = step.op.compute(*[known[s] for s in step.inputs])
            folded += 1
        else:
            remaining.append(step)
    program.steps = remaining
    program.constants = known
    eliminate_dead_steps(program)
    return folded


def optimize(program: Program, constant_value: Callable[[Any], Any]) -> Program:
    """The shared pipeline: fold constants, merge duplicates, drop dead steps, plan frees."""
    fold_constants(program, constant_value)
    eliminate_common_subexpressions(program)
    plan_frees(program)
    program.passes = ["prune", "constant_folding", "cse", "dead_step_elimination", "memory_plan"]
    return program


def _nbytes(aval: Any) -> int:
    if isinstance(aval, tuple) and aval and not hasattr(aval, "shape"):
        return sum(_nbytes(a) for a in aval)
    shape = [1 if d is None else d for d in aval.shape]
    size = 1
    for d in shape:
        size *= d
    return size * aval.dtype.itemsize


def predict_peak_bytes(program: Program, free_early: bool) -> int:
    """Peak bytes of intermediate values from static shapes (unknown dims counted as 1)."""
    if free_early and not program.frees:
        plan_frees(program)
    sizes: dict[int, int] = {}
    live = 0
    peak = 0
    for i, step in enumerate(program.steps):
        sizes[step.out] = _nbytes(step.node.aval)
        live += sizes[step.out]
        peak = max(peak, live)
        if free_early:
            for slot in program.frees[i]:
                live -= sizes.get(slot, 0)
    return peak
