"""Rewrite ``linear`` -> ``relu`` into ``linear_relu``, and ``linear`` -> ``add`` (a
residual) into ``linear_residual``: the ReLU or the add in the product's epilogue.

A traced Transformer step holds, per block::

    t = linear(x, w1, b1);  u = reshape(t);  v = relu(u)      # the feed-forward's first
    ...  relu_grad(u, g)                                      # (its backward)
    t = linear(h, w, b);    y = reshape(t);  z = add(q, y)    # a residual branch's last

(the reshapes between (tokens, features) matrices and (batch, time, features) arrays are
views, and may be absent). Where the linear's value is read by nothing else, the pairs become::

    t = linear_relu(x, w1, b1);  u = reshape(t)               # v's readers read u
    ...  relu_grad(u, g)                                      # relu(a) > 0 exactly where a > 0
    q2 = reshape(q);  t = linear_residual(h, w, b, q2);  z = reshape(t)

whose kernel (kernels/linear.py) adds the bias, the residual and the ReLU to each block of
the product in the thread that made it, while it is in cache: the same values bit for bit,
without the separate passes and arrays (measured in the jitted Transformer LM step: the
ReLU 0.23 ms a call, each residual add 71 us). The residual add moves down to where the
add stood (its other operand may be made after the linear); the linear's inputs are ready
there too. Only outputs of at least ``MIN_ELEMENTS`` elements (small ones keep their own
steps, where compiler/fusion.py may merge the ReLU into a region). The user's graph nodes are
left alone (new steps get nodes of their own).

NOTE: ``add(y, q)`` becomes ``q + y`` inside the kernel: the same value (IEEE addition
commutes), only a NaN's payload may come from the other operand.
"""

from __future__ import annotations

from typing import Any

from ..backend import cpu
from ..core.interpret import Program, Step
from ..core.ops_linear_fused import LinearRelu, LinearResidual
from ..core.ops_shape import Reshape
from ..core.registry import Aval
from .rewrite_support import dense_float, kept_slots, rewrite_until_done, step_readers
from .rewritten_node import RewrittenNode

__all__ = ["MIN_ELEMENTS", "rewrite_linear_epilogues"]

#: smallest output (elements) whose pair is rewritten
MIN_ELEMENTS = 1 << 15


def _dense(node: Any) -> tuple | None:
    """(shape, dtype) of a node's fully known float aval, else None."""
    return dense_float(getattr(node, "aval", None))


def rewrite_linear_epilogues(program: Program) -> tuple[int, int]:
    """Rewrite each matching pair (see the module docstring); (ReLUs, residual adds) fused.
    Run it before constant folding and the memory plan."""
    kept = kept_slots(program)
    relus = rewrite_until_done(lambda: _find_relu(program, kept),
                               lambda *match: _apply_relu(program, *match))
    adds = rewrite_until_done(lambda: _find_residual(program, kept),
                              lambda *match: _apply_residual(program, *match))
    return relus, adds


def _linear_behind(program: Program, producer: dict[int, int], readers: dict[int, list[int]],
                   slot: int, kept: set) -> tuple[int, int | None] | None:
    """(linear step, reshape step or None) making ``slot`` as ``[reshape](linear(...))``,
    the linear's value read by that reshape alone (or, without one, ``slot`` is the linear's);
    a large float32/float64 linear on the CPU, its value not kept; else None."""
    steps = program.steps
    i = producer.get(slot)
    if i is None:
        return None
    reshape = None
    if steps[i].op.name == "reshape":
        reshape, i = i, producer.get(steps[i].inputs[0])
        if i is None or readers.get(steps[reshape].inputs[0]) != [reshape]:
            return None
    lin = steps[i]
    if lin.op.name != "linear" or lin.out in kept:
        return None
    known = _dense(lin.node)
    if known is None or len(known[0]) != 2 or known[0][0] * known[0][1] < MIN_ELEMENTS:
        return None
    if getattr(lin.node, "device", cpu()) != cpu():
        return None
    if any((_dense(n) or (None, None))[1] != known[1] for n in lin.node.inputs):
        return None  # one float dtype throughout (the kernel's in-place epilogue)
    return i, reshape


# -- linear -> relu ----------------------------------------------------------------------------
def _find_relu(program: Program, kept: set) -> tuple | None:
    steps = program.steps
    readers = step_readers(program)
    producer = {step.out: i for i, step in enumerate(steps)}
    for ri, relu in enumerate(steps):
        if relu.op.name != "relu" or len(relu.inputs) != 1 or relu.out in kept:
            continue
        u = relu.inputs[0]
        found = _linear_behind(program, producer, readers, u, kept)
        if found is None or u in kept:
            continue
        # u's other readers: ReLU adjoints masking by it (relu(u) gives them the same mask)
        others = [i for i in readers.get(u, []) if i != ri]
        if all(steps[i].op.name == "relu_grad" and steps[i].inputs[0] == u
               and steps[i].inputs.count(u) == 1 for i in others):
            return ri, found[0]
    return None


def _apply_relu(program: Program, ri: int, li: int) -> None:
    steps = program.steps
    lin, relu = steps[li], steps[ri]
    op = LinearRelu()
    node = RewrittenNode(op, lin.node.inputs, lin.node.aval, lin.node.meta,
                         getattr(lin.node, "device", cpu()))
    steps[li] = Step(op, lin.inputs, lin.out, node)
    u, v = relu.inputs[0], relu.out
    del steps[ri]
    for i, step in enumerate(steps):
        if v in step.inputs:
            steps[i] = Step(step.op, tuple(u if s == v else s for s in step.inputs), step.out,
                            step.node)
    program.outputs = [u if s == v else s for s in program.outputs]


# -- linear -> add (a residual) ------------------------------------------------------------------
def _find_residual(program: Program, kept: set) -> tuple | None:
    steps = program.steps
    readers = step_readers(program)
    producer = {step.out: i for i, step in enumerate(steps)}
    for ai, add in enumerate(steps):
        if add.op.name != "add" or len(add.inputs) != 2 or add.inputs[0] == add.inputs[1]:
            continue
        out = _dense(add.node)
        if out is None:
            continue
        for k in (1, 0):  # (the branch is usually the second operand: x + f(x))
            y = add.inputs[k]
            if y in kept or readers.get(y) != [ai] \
                    or _dense(add.node.inputs[1 - k]) != out or _dense(add.node.inputs[k]) != out:
                continue
            found = _linear_behind(program, producer, readers, y, kept)
            # the linear moves down to the add: no state may change in between
            if found is not None and not any(s.op.side_effect
                                             for s in steps[found[0] + 1:ai]):
                return ai, k, found[0], found[1]
    return None


def _apply_residual(program: Program, ai: int, k: int, li: int, pi: int | None) -> None:
    steps = program.steps
    add, lin = steps[ai], steps[li]
    q, q_node = add.inputs[1 - k], add.node.inputs[1 - k]
    device = getattr(lin.node, "device", cpu())
    meta = add.node.meta
    t_aval = lin.node.aval
    new: list[Step] = []
    if pi is not None:  # q as the linear's (tokens, features) matrix; z as the add's shape
        flat = RewrittenNode(Reshape(t_aval.shape), (q_node,), Aval(t_aval.shape,
                             q_node.aval.dtype), meta, device)
        new.append(Step(flat.op, (q,), id(flat), flat))
        q, q_node = id(flat), flat
    op = LinearResidual()
    fused = RewrittenNode(op, (*lin.node.inputs, q_node), t_aval, meta, device)
    if pi is None:
        new.append(Step(op, (*lin.inputs, q), add.out, fused))
    else:
        new.append(Step(op, (*lin.inputs, q), lin.out, fused))
        back = RewrittenNode(Reshape(add.node.aval.shape), (fused,), add.node.aval, meta,
                             device)
        new.append(Step(back.op, (lin.out,), add.out, back))
    # (the new nodes stay referenced by their steps, so their ids stay unique slots)
    dropped = {li} if pi is None else {li, pi}
    program.steps = [s for i, step in enumerate(steps) if i not in dropped
                     for s in (new if i == ai else [step])]
