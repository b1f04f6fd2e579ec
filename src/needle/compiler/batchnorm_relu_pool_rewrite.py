"""Rewrite a ``BatchNorm2d -> ReLU -> max pool`` block's steps into the ops of core/
ops_batchnorm_relu_pool.py: its backward never stores the pool's full-size gradient, and
then its forward never stores the activation.

Once batchnorm_relu_rewrite.py has run, a traced training step of such a block holds::

    i = batch_norm(c, weight, bias, mean, var)         # axes (0, 2, 3)
    j = relu(i)
    p = max_pool2d(j)                                  # (forward)
    s = max_pool2d_scatter(j, p, gp)                   # gp: p's gradient; s: j's, full size
    t = batch_norm_relu_grad(s, c, weight, bias, mean, var)

Where s is read by t alone and is not fetched, and j, p are made by those very steps, the
pair becomes::

    t = batch_norm_relu_max_pool2d_grad(gp, p, c, weight, bias, mean, var)

the same values bit for bit (kernels/bn_relu_pool.py): each row block's piece of s is
made in a buffer from c (the activation recomputed, so j is not read) and read back by
batch_norm_relu_grad's loops while in cache.

j is then read by the pool alone (and by the running statistics' stores, as a control
edge). Where so, and i and j are not fetched, the forward becomes::

    p = batch_norm_relu_max_pool2d(c, weight, bias, mean, var)
    store(mean, p), store(var, p)

the same values bit for bit: the kernel pools the activation where it makes it, so the
plan's fused region that wrote j, and the pool's read of it, are gone. Run it after
batchnorm_relu_rewrite.py and before the memory plan.

Measured (ResidualCNN 32x32x3, batch 64, Adam; jitted hot plans traced with this pass off
and on in one process, alternating rounds of 10 steps; parameters and running statistics
bit-identical after ~215 steps; 2-core machine shared with other work): whole steps
(medians of 100-200 steps) 0.907, 0.942, 0.940, 0.946, 0.946 of the step without it;
benchmarks/cnn_step.py --jit's ResidualCNN row 0.894 of torch.compile off, 0.838 and 0.839
on. Per op (ndl.profile, 20 steps, us a step), the 16-, 64- and 128-channel layers:
backward max_pool2d_scatter + batch_norm_relu_grad 577 + 760, 333 + 796, 187 + 431 ->
1246, 950, 491; forward fused region + max_pool2d 306 + 331, 301 + 186, 121 + 79 -> 314,
194, 98. The backward alone lost at 16 channels (one op in a loop: 1.06-1.14x; the
scatter's loop per 2x2 window dominates there, and it recomputes the activation), so the
pass counts on the forward that it makes possible. Not kept: a backward whose dx pass made
the scattered gradient again per block (the scatter's compute twice: 1.4x the pair at 16
channels), and flat-row scatter loops without a loop per window (3-8x slower in numba).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from ..backend import cpu
from ..core.interpret import Program, Step
from ..core.ops_batchnorm_relu_pool import BatchNormReluMaxPool2d, BatchNormReluMaxPool2dGrad
from ..core.ops_shape import normalize_axes
from ..kernels import bn_relu_pool
from .rewrite_support import (
    activation_readers,
    batchnorm_relu_chains,
    kept_slots,
    retarget_stores,
    rewrite_until_done,
    step_readers,
)
from .rewritten_node import RewrittenNode

__all__ = ["ENABLED", "rewrite_batchnorm_relu_pools"]

#: whether the pass runs (False: plans keep the separate ops; for A/B measurements and tests)
ENABLED = True


def rewrite_batchnorm_relu_pools(program: Program) -> tuple[int, int]:
    """Rewrite each matching backward pair, then each forward chain (see the module
    docstring); the numbers rewritten."""
    if not ENABLED:
        return 0, 0
    backward = rewrite_until_done(lambda: _find(program),
                                  lambda *match: _apply(program, *match))
    forward = rewrite_until_done(lambda: _find_forward(program),
                                 lambda *match: _apply_forward(program, *match))
    return backward, forward


def _same_pool(a: Any, b: Any) -> bool:
    return a.kernel_size == b.kernel_size and a.stride == b.stride


def _find(program: Program) -> tuple[int, int] | None:
    """(scatter, batch_norm_relu_grad) step indices of the first matching pair."""
    kept = kept_slots(program)
    steps = program.steps
    readers = step_readers(program)
    producer = {step.out: i for i, step in enumerate(steps)}
    for ti, t in enumerate(steps):
        op: Any = t.op
        if t.op.name != "batch_norm_relu_grad" or op.channel_sums or len(t.inputs) != 6 \
                or not bn_relu_pool.takes(tuple(t.node.inputs[1].aval.shape)) \
                or normalize_axes(op.name, op.axes, 4) != (0, 2, 3):
            continue
        si = producer.get(t.inputs[0])
        if si is None or steps[si].op.name != "max_pool2d_scatter" \
                or readers.get(steps[si].out) != [ti] or steps[si].out in kept:
            continue
        j, p, _ = steps[si].inputs
        ri, pi = producer.get(j), producer.get(p)
        if ri is None or pi is None or steps[ri].op.name != "relu" \
                or steps[pi].op.name != "max_pool2d" or steps[pi].inputs != (j,) \
                or not _same_pool(steps[pi].op, steps[si].op):
            continue
        bi = producer.get(steps[ri].inputs[0])
        if bi is None or steps[bi].op.name != "batch_norm" or steps[bi].inputs != t.inputs[1:]:
            continue
        bn: Any = steps[bi].op
        if bn.eps != op.eps or normalize_axes(bn.name, bn.axes, 4) != (0, 2, 3):
            continue
        return si, ti
    return None


def _apply(program: Program, si: int, ti: int) -> None:
    steps = program.steps
    scatter, t = steps[si], steps[ti]
    pool: Any = scatter.op
    op: Any = t.op
    fused = BatchNormReluMaxPool2dGrad(pool.kernel_size, pool.stride, op.eps)
    _, p_node, gp_node = scatter.node.inputs
    node = RewrittenNode(fused, (gp_node, p_node, *t.node.inputs[1:]), t.node.aval, t.node.meta,
                          getattr(t.node, "device", cpu()))
    _, p, gp = scatter.inputs
    steps[ti] = Step(fused, (gp, p, *t.inputs[1:]), t.out, node)
    del steps[si]


def _max_pool_of(step: Step, value: int) -> bool:
    """Whether ``step`` is ``max_pool2d(value)``."""
    return step.op.name == "max_pool2d" and step.inputs == (value,)


def _find_forward(program: Program) -> tuple | None:
    """(batch_norm, relu, max_pool2d, stores) step indices of the first chain whose
    activation is read by one max pool and, as a control edge, by stores after it."""
    kept = kept_slots(program)
    steps = program.steps
    readers = step_readers(program)
    for bi, _, ri in batchnorm_relu_chains(program, kept, readers):
        relu_out = steps[ri].out
        pools, stores = activation_readers(
            steps, readers, relu_out,
            partial(_max_pool_of, value=relu_out))
        if len(pools) != 1 or any(si < pools[0] for si in stores):
            continue
        return bi, ri, pools[0], stores
    return None


def _apply_forward(program: Program, bi: int, ri: int, mi: int, stores: list) -> None:
    steps = program.steps
    bn, pool = steps[bi], steps[mi]
    op: Any = bn.op
    pool_op: Any = pool.op
    fused = BatchNormReluMaxPool2d(pool_op.kernel_size, pool_op.stride, op.eps)
    node = RewrittenNode(fused, bn.node.inputs, pool.node.aval, pool.node.meta,
                          getattr(pool.node, "device", cpu()))
    steps[mi] = Step(fused, bn.inputs, pool.out, node)
    # the running statistics' stores named the activation as a control edge: the pooled
    # output stands for it (it is made after the statistics are known)
    retarget_stores(steps, stores, steps[ri].out, pool.out)
    program.steps = [s for i, s in enumerate(steps) if i not in (bi, ri)]
