"""What the compiler's rewrite passes share (batchnorm_relu_rewrite.py,
batchnorm_relu_conv_rewrite.py, batchnorm_relu_mean_rewrite.py,
batchnorm_relu_pool_rewrite.py, vocab_head_rewrite.py): the
slots a rewrite must keep, which steps read each slot, applying
a pass's matches until none is left (each rewrite changes the steps the next search sees),
and the ``batch_norm -> relu`` chains both BatchNorm rewrites start from."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..core.interpret import Program, Step, snapshot_slots
from ..core.ops_shape import normalize_axes
from ..core.registry import Aval

__all__ = ["NCHW", "activation_readers", "batchnorm_relu_chains", "dense_float", "kept_slots",
           "retarget_stores", "rewrite_until_done", "step_readers"]

#: the permutation that views a convolution's NHWC output as NCHW (BatchNorm2d's layout)
NCHW = (0, 3, 1, 2)


def dense_float(aval: Any) -> tuple | None:
    """(shape, dtype) of a fully known float array aval, else None (the rewrites match on
    traced shapes)."""
    if not isinstance(aval, Aval) or None in aval.shape:
        return None
    dtype = np.dtype(aval.dtype)
    return (tuple(aval.shape), dtype) if dtype.kind == "f" else None


def kept_slots(program: Program) -> set:
    """The slots a rewrite must leave as they are: the outputs, the slots a snapshot reads,
    the constants."""
    return set(program.outputs) | snapshot_slots(program) | set(program.constants)


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


def batchnorm_relu_chains(program: Program, kept: set,
                          readers: dict[int, list[int]]) -> Iterator[tuple[int, int, int]]:
    """(batch_norm, permute, relu) step indices of each float32 ``permute(x, NCHW) ->
    batch_norm over (0, 2, 3) -> relu`` chain (x 4-d, its shape known) whose batch_norm is
    read by the relu alone and neither output is in ``kept``."""
    steps = program.steps
    producer = {step.out: i for i, step in enumerate(steps)}
    for bi, bn in enumerate(steps):
        if bn.op.name != "batch_norm" or len(bn.inputs) != 5 or bn.out in kept:
            continue
        x, *others = bn.node.inputs
        aval = getattr(x, "aval", None)
        if not (isinstance(aval, Aval) and len(aval.shape) == 4 and None not in aval.shape
                and all(np.dtype(n.aval.dtype) == np.float32 for n in bn.node.inputs)):
            continue
        if normalize_axes("batch_norm", getattr(bn.op, "axes", None), 4) != (0, 2, 3):
            continue
        pi = producer.get(bn.inputs[0])
        if pi is None or steps[pi].op.name != "permute" \
                or tuple(getattr(steps[pi].op, "axes", ())) != NCHW:
            continue
        relus = readers.get(bn.out, [])
        if len(relus) != 1 or steps[relus[0]].op.name != "relu" \
                or steps[relus[0]].inputs != (bn.out,) or steps[relus[0]].out in kept:
            continue
        yield bi, pi, relus[0]


def activation_readers(steps: list, readers: dict[int, list[int]], value: int,
                       takes: Callable[[Step], bool]) -> tuple[list[int], list[int]]:
    """The steps reading the activation ``value``, as (those ``takes`` accepts, the running
    statistics' stores that name it as a control edge); ([], []) where any other step
    reads it (the activation must then be stored as it is)."""
    taken, stores = [], []
    for i in readers.get(value, []):
        step = steps[i]
        if takes(step):
            taken.append(i)
        elif step.op.name == "store" and step.inputs[0] != value:
            stores.append(i)
        else:
            return [], []
    return taken, stores


def retarget_stores(steps: list, stores: list[int], old: int, new: int) -> None:
    """Point the control edge of each store in ``stores`` from slot ``old`` (an activation
    no longer made) to slot ``new`` (a step that runs after the statistics are known)."""
    for i in stores:
        step = steps[i]
        inputs = (step.inputs[0], *(new if s == old else s for s in step.inputs[1:]))
        steps[i] = Step(step.op, inputs, step.out, step.node)
