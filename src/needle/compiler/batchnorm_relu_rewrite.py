"""Rewrite ``relu_grad`` -> ``batch_norm_grad`` into ``batch_norm_relu_grad`` (one step).

The backward of every ``BatchNorm -> ReLU`` block of a traced training step holds::

    y = batch_norm(x, weight, bias, mean, var)    # (forward)
    r = relu_grad(y, g)                           # g masked by the ReLU's input y > 0
    t = batch_norm_grad(r, x, weight, mean, var)  # (dx, dweight, dbias)

Where r is read by that step alone (and is not fetched), and y was made by the batch_norm
step of the same x, weight, mean and var, the pair becomes::

    t = batch_norm_relu_grad(g, x, weight, bias, mean, var)

whose kernel (kernels/batchnorm_relu.py) recomputes y's sign from x and forms r in
registers: two passes over g and x where the pair took five over four arrays, the same
values bit for bit. Two more things follow from it:

- y is no longer read by the backward. The running statistics' ``store`` steps name it
  only as a control dependency; they name ``relu(y)`` instead, so y is read by its relu
  alone and the forward's BatchNorm + ReLU region (compiler/fusion.py) writes one array
  instead of two;
- a conv bias's gradient, ``sum_to(permute(dx, channel axis last), (C,))``, is taken in the
  fused op's dx pass (``channel_sums``; the same bits as summing dx afterwards) and the
  sum_to step picks it, so dx is not read again.

Measured (CNN benchmark steps under ndl.jit, this rewrite on vs off in one process,
alternating, parameters bit-identical; 2-core machine loaded by other work, load ~4, so
main-thread CPU medians): 2 threads: strides 1,1,1 51.8 -> 47.4 ms, strides 1,2,2 15.2 ->
14.6, ResidualCNN 26.2 -> 25.2; 1 thread: strides 1,1,1 113.5 -> 84.9, ResidualCNN 38.2 ->
36.2. The op alone (1 thread, medians): 64x64x32x32 7.34 -> 5.72 ms, 64x32x32x32 3.06 ->
2.31, 64x16x32x32 1.38 -> 1.58 (16 channels: the loops' per-row cost shows), smaller ones
equal. Only activations of at least ``MIN_ELEMENTS`` elements (small ones gain nothing: the
pair's calls are as cheap). The pattern is matched on the traced shapes; the user's graph
nodes are left alone (new steps get nodes of their own).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import cpu
from ..core.interpret import Program, Step
from ..core.ops_batchnorm_relu import BatchNormReluGrad
from ..core.ops_shape import TupleGetItem
from .rewrite_support import dense_float, kept_slots
from .rewritten_node import RewrittenNode

__all__ = ["MIN_ELEMENTS", "rewrite_batchnorm_relu_grads"]

#: smallest activation (elements) whose pair is rewritten
MIN_ELEMENTS = 1 << 15



def _matches(relu: Step, bn: Step) -> bool:
    """Whether ``relu`` (a relu_grad) and ``bn`` (a batch_norm_grad reading it as g) fuse:
    y, g and x one known shape and float dtype, large enough, on the CPU."""
    if len(relu.node.inputs) != 2 or len(bn.node.inputs) != 5:
        return False
    y_n, g_n = relu.node.inputs
    x_n = bn.node.inputs[1]
    known = {dense_float(n.aval) for n in (y_n, g_n, x_n, relu.node)}
    first = known.pop()
    if first is None or known:  # unknown, or not one shape and dtype
        return False
    if int(np.prod(first[0])) < MIN_ELEMENTS:
        return False
    return all(getattr(n, "device", cpu()) == cpu() for n in (relu.node, bn.node, y_n, g_n))


def rewrite_batchnorm_relu_grads(program: Program) -> int:
    """Rewrite each matching pair (see the module docstring); the number rewritten. Run it
    before the memory plan."""
    kept = kept_slots(program)
    readers: dict[int, int] = {}
    for step in program.steps:
        for slot in step.inputs:
            readers[slot] = readers.get(slot, 0) + 1
    producer = {step.out: i for i, step in enumerate(program.steps)}
    dropped: set[int] = set()
    rewritten = 0
    for bi, bn in enumerate(program.steps):
        if bn.op.name != "batch_norm_grad" or not bn.inputs:
            continue
        r = bn.inputs[0]
        ri = producer.get(r)
        if ri is None or ri in dropped or r in kept or readers.get(r) != 1:
            continue
        relu = program.steps[ri]
        if relu.op.name != "relu_grad" or not _matches(relu, bn):
            continue
        y, g = relu.inputs
        op: Any = bn.op
        fwd = _forward_of(program, y, bn)
        if fwd is None:
            continue
        x, weight, bias, mean, var = program.steps[fwd].inputs
        fused_op = BatchNormReluGrad(op.axes, op.eps)
        g_n = relu.node.inputs[1]
        x_n, w_n, b_n, mean_n, var_n = program.steps[fwd].node.inputs
        node = RewrittenNode(fused_op, (g_n, x_n, w_n, b_n, mean_n, var_n), bn.node.aval,
                              bn.node.meta, getattr(bn.node, "device", cpu()))
        program.steps[bi] = Step(fused_op, (g, x, weight, bias, mean, var), bn.out, node)
        _stores_after_relu(program, y, bi)
        dropped.add(ri)
        rewritten += 1
        _fold_channel_sum(program, bi)
    if dropped:
        program.steps = [s for i, s in enumerate(program.steps) if i not in dropped]
    return rewritten


def _forward_of(program: Program, y: int, bn: Step) -> int | None:
    """The index of the ``batch_norm`` step that made ``y`` from the very x, weight, mean and
    var (same axes and eps) that ``bn``, a batch_norm_grad, differentiates; else None."""
    for i, step in enumerate(program.steps):
        if step.out != y:
            continue
        op: Any = step.op
        bn_op: Any = bn.op
        if (step.op.name != "batch_norm" or len(step.inputs) != 5
                or len(step.node.inputs) != 5 or op.axes != bn_op.axes or op.eps != bn_op.eps):
            return None
        # one dtype throughout: the kernel recomputes y as every forward path rounds it
        # (the fused forward region rounds mixed float64 weights differently)
        if len({np.dtype(n.aval.dtype) for n in step.node.inputs}) != 1:
            return None
        x, weight, _, mean, var = step.inputs
        return i if bn.inputs[1:] == (x, weight, mean, var) else None
    return None


def _stores_after_relu(program: Program, y: int, fi: int) -> None:
    """The running statistics' ``store`` steps name y, BatchNorm's output, only as a control
    dependency (``after``): where the program computes ``relu(y)`` before them, they name its
    output instead, so that once the fused step at ``fi`` no longer reads y, y is read by
    its relu alone and the forward's BatchNorm + ReLU region (compiler/fusion.py, which
    stores only values read outside a region) never writes it."""
    steps = program.steps
    found = [i for i, s in enumerate(steps[:fi]) if s.op.name == "relu" and s.inputs == (y,)]
    if not found:
        return
    ri = found[0]
    relu_out = steps[ri].out
    for i in range(ri + 1, len(steps)):
        step = steps[i]
        if step.op.name == "store" and y in step.inputs[1:]:
            after = tuple(relu_out if s == y else s for s in step.inputs[1:])
            steps[i] = Step(step.op, (step.inputs[0], *after), step.out, step.node)


def _fold_channel_sum(program: Program, fi: int) -> None:
    """Where the fused step's dx is summed per channel, ``sum_to(permute(dx, channel axis
    last), (C,))`` (a conv bias's gradient), let the fused op's dx pass take that sum
    (its ``channel_sums`` output) and the sum_to step pick it."""
    fused = program.steps[fi]
    op: Any = fused.op
    shape = fused.node.inputs[1].aval.shape  # x
    kept_axes = [i for i in range(len(shape)) if i not in op.axes]
    if len(shape) < 3 or len(kept_axes) != 1:
        return
    axis = kept_axes[0]
    order = (*range(axis), *range(axis + 1, len(shape)), axis)
    readers: dict[int, list[int]] = {}
    for i, step in enumerate(program.steps):
        for slot in set(step.inputs):
            readers.setdefault(slot, []).append(i)
    for di in readers.get(fused.out, []):
        item = program.steps[di]
        if item.op.name != "tuple_get_item" or getattr(item.op, "index", None) != 0:
            continue
        for pi in readers.get(item.out, []):
            perm = program.steps[pi]
            if perm.op.name != "permute" or tuple(getattr(perm.op, "axes", ())) != order:
                continue
            for si in readers.get(perm.out, []):
                sum_step = program.steps[si]
                if (sum_step.op.name != "sum_to" or si < fi
                        or tuple(getattr(sum_step.op, "shape", ())) != (shape[axis],)):
                    continue
                with_sums = BatchNormReluGrad(op.axes, op.eps, channel_sums=True)
                avals = (*fused.node.aval, sum_step.node.aval)
                node = RewrittenNode(with_sums, fused.node.inputs, avals, fused.node.meta,
                                      fused.node.device)
                program.steps[fi] = Step(with_sums, fused.inputs, fused.out, node)
                pick = RewrittenNode(TupleGetItem(3), (node,), sum_step.node.aval,
                                      sum_step.node.meta, node.device)
                program.steps[si] = Step(pick.op, (fused.out,), sum_step.out, pick)
                return
