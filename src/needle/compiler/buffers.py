"""Buffer reuse: let an elementwise step write its result into a dead input's array (``out=``).

A step can reuse input slot ``s`` when (1) the step is one ufunc call (``op.ufunc()``), (2)
``s`` was made by an earlier ufunc step of the same program (so the program owns that array:
never a parameter, a fed value or a view), (3) no other step ever took a view of ``s``,
(4) this step is the last use of ``s`` and ``s`` is not an output, and (5) ``s`` has exactly the
result's shape and dtype (known statically: the JIT traces with concrete shapes), and is
not 0-d (NumPy returns 0-d results as scalars).
"""

from __future__ import annotations

from typing import Any

from ..core.interpret import Program, plan_frees


def _aval(node: Any) -> tuple | None:
    aval = node.aval
    # NOTE: 0-d results are NumPy scalars, not arrays: they cannot be written into (out=)
    if not hasattr(aval, "shape") or None in aval.shape or not aval.shape:
        return None
    return tuple(aval.shape), aval.dtype


def plan_inplace(program: Program) -> dict[int, int]:
    """Step index -> the input slot whose buffer that step writes into."""
    if not program.frees:
        plan_frees(program)
    owned: set[int] = set()  # slots holding arrays the program allocated itself
    viewed: set[int] = set()  # slots some non-ufunc step read (it may have kept a view)
    for step in program.steps:
        if step.op.ufunc() is None:
            viewed.update(step.inputs)
    keep = set(program.outputs)
    plan: dict[int, int] = {}
    for i, step in enumerate(program.steps):
        if step.op.ufunc() is None:
            continue
        owned.add(step.out)
        out_aval = _aval(step.node)
        if out_aval is None:
            continue
        dead = set(program.frees[i]) if program.frees else set()
        for slot, node in zip(step.inputs, step.node.inputs):
            if (slot in owned and slot in dead and slot not in viewed and slot not in keep
                    and step.inputs.count(slot) == 1 and _aval(node) == out_aval):
                plan[i] = slot
                owned.discard(slot)  # its buffer now belongs to this step's value
                break
    return plan
