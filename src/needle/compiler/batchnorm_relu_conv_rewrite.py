"""Rewrite ``batch_norm -> relu -> permute -> conv_bias / conv_weight_grad`` into the ops of
core/ops_batchnorm_relu_conv.py, so the BatchNorm + ReLU output is never stored.

A traced training step of a ``conv -> BatchNorm2d -> ReLU -> conv`` network holds::

    c = permute(b, (0, 3, 1, 2))                      # the first conv's NHWC output, NCHW view
    i = batch_norm(c, weight, bias, mean, var)        # axes (0, 2, 3)
    j = relu(i)
    k = permute(j, (0, 2, 3, 1))
    l = conv_bias(k, W, C)                            # the next conv's forward
    dW = conv_weight_grad(k, g)                       # and its kernel gradient
    store(mean, j), store(var, j)                     # running statistics (j: a control edge)

Where i, j and k are read by nothing else (batchnorm_relu_rewrite.py has already taken i's
read by the backward) and are not fetched, it becomes::

    l = batch_norm_relu_conv_bias(b, weight, bias, mean, var, W, C)
    dW = batch_norm_relu_conv_weight_grad(b, weight, bias, mean, var, g)
    store(mean, l), store(var, l)

the same values bit for bit: each of the two kernels makes ``relu(bn(b))`` where its loop
reads its input (the direct loops as they pad an image, Winograd's transforms as they read a
tile: kernels/conv_bn_relu.py), so the activation is neither written nor read from memory,
and the pass that wrote it (a fused region of the hot plan) is gone. Only where those
kernels run (``conv_bn_relu.takes``: the direct loops' strided layers; Winograd's where
``conv_bn_relu.WINOGRAD`` is on, off by default):
elsewhere the op would make the activation twice. Run it after batchnorm_relu_rewrite.py
and before the memory plan.

Measured (benchmarks/cnn_step.py's strided model, batch 64, jitted hot plans traced with
this pass off and on in one process, alternating rounds of 10 steps, parameters
bit-identical after ~300 steps; 2-core machine shared with other work): the step 8.05 ->
7.71 ms wall (0.955-0.96; two threads, quieter) and 0.92-0.95 under load (one core's worth
of CPU); per op (ndl.profile, loaded): the 16->32 layer's forward + its input's fused
region 956 -> 819 us, its kernel gradient 862 -> 843; the 32->64 layer's 750 -> 665 and
716 -> 715. The first version, which made each block of activations in a scratch and then
let the loops pad it (one more copy), gained 1% only. Strides 1,1,1 (Winograd; per op,
loaded, ~83 ms steps): the 16->32 layer's forward + region 7.94 -> 7.29 ms, kernel gradient
5.58 -> 5.67; the 32->64 layer's 14.69 -> 12.47 and 11.21 -> 11.65 (its interior tiles are
gathered, not read in place): ~-2.3 ms of 83 per op, but the steps' process CPU time
1.015-1.054x (kernels/conv_bn_relu.py ``WINOGRAD`` has the numbers): off by default.
A layer read by a max pool: batchnorm_relu_pool_rewrite.py; by ``mean`` (each model's
last): batchnorm_relu_mean_rewrite.py.
"""

from __future__ import annotations

from typing import Any

from ..backend import cpu
from ..core.interpret import Program, Step
from ..core.ops_batchnorm_relu_conv import BatchNormReluConvBias, BatchNormReluConvWeightGrad
from ..kernels import conv_bn_relu
from .rewrite_support import (
    activation_readers,
    batchnorm_relu_chains,
    kept_slots,
    retarget_stores,
    rewrite_until_done,
    step_readers,
)
from .rewritten_node import RewrittenNode

__all__ = ["ENABLED", "rewrite_batchnorm_relu_convs"]

#: whether the pass runs (False: plans keep the separate ops; for A/B measurements and tests)
ENABLED = True

_NHWC = (0, 2, 3, 1)


def rewrite_batchnorm_relu_convs(program: Program) -> int:
    """Rewrite each matching block (see the module docstring); the number of BatchNorm +
    ReLU activations no longer stored."""
    if not ENABLED:
        return 0
    return rewrite_until_done(lambda: _find(program),
                              lambda *match: _apply(program, *match))


def _find(program: Program) -> tuple | None:
    kept = kept_slots(program)
    steps = program.steps
    readers = step_readers(program)
    for bi, pi, ri in batchnorm_relu_chains(program, kept, readers):
        perms, stores = activation_readers(
            steps, readers, steps[ri].out,
            lambda s: s.op.name == "permute" and tuple(getattr(s.op, "axes", ())) == _NHWC)
        if len(perms) != 1 or steps[perms[0]].out in kept:
            continue
        ki = perms[0]
        k = steps[ki].out
        convs, grads = [], []
        for i in readers.get(k, []):
            s = steps[i]
            if s.op.name == "conv_bias" and s.inputs[0] == k and k not in s.inputs[1:]:
                convs.append(i)
            elif (s.op.name == "conv_weight_grad" and s.inputs[0] == k
                  and s.inputs[1] != k):
                grads.append(i)
            else:
                convs = []
                break
        if not convs or any(si < convs[0] for si in stores):
            continue
        x_shape = tuple(steps[pi].node.inputs[0].aval.shape)
        if not all(conv_bn_relu.takes(x_shape, tuple(steps[i].node.inputs[1].aval.shape),
                                      steps[i].op.stride, steps[i].op.padding)  # type: ignore[attr-defined]
                   for i in convs):
            continue
        if not all(conv_bn_relu.takes(x_shape, (*steps[i].op.kernel_hw, x_shape[3],  # type: ignore[attr-defined]
                                                steps[i].node.inputs[1].aval.shape[3]),
                                      steps[i].op.stride, steps[i].op.padding)  # type: ignore[attr-defined]
                   for i in grads):
            continue
        return bi, pi, ri, ki, convs, grads, stores
    return None


def _apply(program: Program, bi: int, pi: int, ri: int, ki: int, convs: list, grads: list,
           stores: list) -> None:
    steps = program.steps
    bn = steps[bi]
    op: Any = bn.op
    b_slot = steps[pi].inputs[0]
    b_node = steps[pi].node.inputs[0]
    stat_slots = bn.inputs[1:]
    stat_nodes = tuple(bn.node.inputs[1:])
    for i in convs:
        step = steps[i]
        conv: Any = step.op
        fused: Any = BatchNormReluConvBias(op.eps, conv.stride, conv.padding)
        node = RewrittenNode(fused, (b_node, *stat_nodes, *step.node.inputs[1:]),
                              step.node.aval, step.node.meta,
                              getattr(step.node, "device", cpu()))
        steps[i] = Step(fused, (b_slot, *stat_slots, *step.inputs[1:]), step.out, node)
    for i in grads:
        step = steps[i]
        grad: Any = step.op
        fused = BatchNormReluConvWeightGrad(grad.kernel_hw, op.eps, grad.stride, grad.padding)
        node = RewrittenNode(fused, (b_node, *stat_nodes, step.node.inputs[1]),
                              step.node.aval, step.node.meta,
                              getattr(step.node, "device", cpu()))
        steps[i] = Step(fused, (b_slot, *stat_slots, step.inputs[1]), step.out, node)
    # the running statistics' stores named the activation as a control edge: the first
    # convolution reading it now stands for it (it runs after the statistics are known)
    retarget_stores(steps, stores, steps[ri].out, steps[convs[0]].out)
    dropped = {bi, ri, ki}
    program.steps = [s for i, s in enumerate(steps) if i not in dropped]
