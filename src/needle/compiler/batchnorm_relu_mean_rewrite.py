"""Rewrite ``batch_norm -> relu -> mean over H, W`` into ``batch_norm_relu_mean`` (core/
ops_batchnorm_relu_mean.py), so a CNN's last BatchNorm + ReLU output is never stored.

A traced training step of a network ending ``conv -> BatchNorm2d -> ReLU -> global average
pool -> Linear`` holds::

    c = permute(b, (0, 3, 1, 2))                      # the conv's NHWC output, NCHW view
    i = batch_norm(c, weight, bias, mean, var)        # axes (0, 2, 3)
    j = relu(i)
    p = mean(j, axes=(2, 3))                          # (N, C)
    store(mean, j), store(var, j)                     # running statistics (j: a control edge)

and its backward reads c, not i or j, once batchnorm_relu_rewrite.py has made the pair
``relu_grad -> batch_norm_grad`` one ``batch_norm_relu_grad``. Where i and j are read by
nothing else and are not fetched, it becomes::

    p = batch_norm_relu_mean(b, weight, bias, mean, var)
    store(mean, p), store(var, p)

the same values bit for bit (kernels/bn_relu_mean.py): the plan's fused region that wrote j
and the pass of ``mean`` that read it become one pass reading b. Only where that kernel runs
(``bn_relu_mean.takes``). Run it after batchnorm_relu_rewrite.py and before the memory plan.

Measured (benchmarks/cnn_step.py's models, batch 64, jitted hot plans traced with this pass
off and on in one process, alternating rounds, parameters bit-identical after ~100-300
steps; 2-core machine shared with other work, loaded): per op (ndl.profile), strides 1,2,2:
the last layer's fused region + mean 117 + 94 = 211 us -> batch_norm_relu_mean 104 us (a
second run: 160 + 125 -> 118; a third, with the kernel serial below
bn_relu_mean.PRANGE_MIN_ELEMENTS: 178 + 151 -> 123); strides 1,1,1: 4625 + 1521 us -> 1637
us. Whole steps (medians of rounds, noisy): strides 1,2,2 0.954, 0.979 and 0.937 of the step
without it; strides 1,1,1 0.976 and 0.83.
Not covered: ResidualCNN's last block (relu -> add -> mean: a residual sum in between).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from ..backend import cpu
from ..core.interpret import Program, Step
from ..core.ops_batchnorm_relu_mean import BatchNormReluMean
from ..core.ops_shape import normalize_axes
from ..core.registry import Aval
from ..kernels import bn_relu_mean
from .rewrite_support import (
    activation_readers,
    batchnorm_relu_chains,
    kept_slots,
    retarget_stores,
    rewrite_until_done,
    step_readers,
)
from .rewritten_node import RewrittenNode

__all__ = ["ENABLED", "rewrite_batchnorm_relu_means"]

#: whether the pass runs (False: plans keep the separate ops; for A/B measurements and tests)
ENABLED = True

def _float32(node: Any) -> bool:
    aval = getattr(node, "aval", None)
    return (isinstance(aval, Aval) and None not in aval.shape
            and np.dtype(aval.dtype) == np.float32)


def _global_average(step: Step, value: int) -> bool:
    """Whether ``step`` is ``mean(value)`` over axes (2, 3), keepdims off."""
    pool: Any = step.op
    return (pool.name == "mean" and step.inputs == (value,)
            and normalize_axes("mean", pool.axes, 4) == (2, 3) and not pool.keepdims)


def rewrite_batchnorm_relu_means(program: Program) -> int:
    """Rewrite each matching block (see the module docstring); the number rewritten."""
    if not ENABLED:
        return 0
    return rewrite_until_done(lambda: _find(program),
                              lambda *match: _apply(program, *match))


def _find(program: Program) -> tuple | None:
    kept = kept_slots(program)
    steps = program.steps
    readers = step_readers(program)
    for bi, pi, ri in batchnorm_relu_chains(program, kept, readers):
        if not all(_float32(n) for n in steps[bi].node.inputs) \
                or not bn_relu_mean.takes(tuple(steps[pi].node.inputs[0].aval.shape)):
            continue
        relu_out = steps[ri].out
        means, stores = activation_readers(
            steps, readers, relu_out, partial(_global_average, value=relu_out))
        if len(means) != 1 or any(si < means[0] for si in stores):
            continue
        return bi, pi, ri, means[0], stores
    return None


def _apply(program: Program, bi: int, pi: int, ri: int, mi: int, stores: list) -> None:
    steps = program.steps
    bn = steps[bi]
    op: Any = bn.op
    pool = steps[mi]
    fused: Any = BatchNormReluMean(op.eps)
    node = RewrittenNode(fused, (steps[pi].node.inputs[0], *bn.node.inputs[1:]),
                          pool.node.aval, pool.node.meta, getattr(pool.node, "device", cpu()))
    steps[mi] = Step(fused, (steps[pi].inputs[0], *bn.inputs[1:]), pool.out, node)
    # the running statistics' stores named the activation as a control edge: the pooled
    # output stands for it (it is made after the statistics are known)
    retarget_stores(steps, stores, steps[ri].out, pool.out)
    program.steps = [s for i, s in enumerate(steps) if i not in (bi, ri)]
