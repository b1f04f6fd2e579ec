"""Keep attention's probabilities from the forward for its backward, in a training step.

``attention`` computes ``p = softmax(scale * q_h k_h^T + mask)`` per (batch, head) slab and
multiplies it by v; ``attention_grad`` recomputes p from q and k (one product and a softmax
a slab: about 0.3 of its time for the Transformer LM's 16 x 4 slabs of 64 x 64). Where a
program holds both for the same q, k, v and mask::

    o = attention(q, k, v, mask)
    ...
    d = attention_grad(g, q, k, v, mask)

they become::

    t = attention_with_probs(q, k, v, mask);  o = t[0];  p = t[1]
    ...
    d = attention_grad_probs(g, q, k, v, p, mask)

the forward writing each slab's p into a (B, H, T, S) array instead of a scratch slab, the
backward reading it: the same values bit for bit (one function makes p both ways), one
logits-sized array kept between the two. The backward's mask gradient is made only where
something reads it (a causal mask is a constant). Only float32 logits of at least
``kernels/attention.PRANGE_MIN_SIZE`` elements (where the slab kernels run) and at most
``MAX_PROBS_BYTES`` of probabilities (long sequences keep recomputing them: kept, they would
grow with T * S per layer); inference programs (no attention_grad) are left alone. The
user's graph nodes are left alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import cpu
from ..core.interpret import Program, Step
from ..core.ops_attention import AttentionGradProbs, AttentionWithProbs
from ..core.ops_shape import TupleGetItem
from ..core.registry import Aval
from ..kernels import attention as kernel
from .rewrite_support import kept_slots, rewrite_until_done, step_readers
from .rewritten_node import RewrittenNode

__all__ = ["MAX_PROBS_BYTES", "rewrite_attention_probs"]

#: the most bytes of probabilities kept for one attention (B * H * T * S * 4): longer
#: sequences recompute them, as before (kept, they would grow with T * S per layer)
MAX_PROBS_BYTES = 1 << 24


def rewrite_attention_probs(program: Program) -> int:
    """Rewrite each matching forward and backward pair (see the module docstring); the
    number of attentions rewritten. Run it before constant folding and the memory plan."""
    kept = kept_slots(program)
    return rewrite_until_done(lambda: _find(program, kept),
                              lambda *match: _apply(program, *match))


def _float32_logits(node: Any) -> bool:
    """Whether an attention node's q, k, v are known float32 (B, T, E) arrays whose
    (B, H, T, S) logits are large enough for the slab kernels, on the CPU."""
    avals = [getattr(n, "aval", None) for n in node.inputs[:3]]
    if not all(isinstance(a, Aval) and len(a.shape) == 3 and None not in a.shape
               and np.dtype(a.dtype) == np.float32 for a in avals):
        return False
    (b, t, _), (_, s, _) = avals[0].shape, avals[1].shape  # type: ignore[union-attr]
    logits = b * node.op.heads * t * s
    return kernel.PRANGE_MIN_SIZE <= logits <= MAX_PROBS_BYTES // 4 and \
        getattr(node, "device", cpu()) == cpu()


def _find(program: Program, kept: set) -> tuple | None:
    steps = program.steps
    readers = step_readers(program)
    for ai, fwd in enumerate(steps):
        if fwd.op.name != "attention" or not _float32_logits(fwd.node):
            continue
        op: Any = fwd.op
        grads = [i for i in range(ai + 1, len(steps))
                 if steps[i].op.name == "attention_grad" and steps[i].inputs[1:] == fwd.inputs
                 and _same_attrs(steps[i].op, op) and steps[i].out not in kept]
        if grads:
            return ai, grads, readers
    return None


def _same_attrs(grad_op: Any, op: Any) -> bool:
    return grad_op.heads == op.heads and grad_op.scale == op.scale


def _mask_grad_read(program: Program, readers: dict, gi: int) -> bool:
    """Whether anything reads the mask gradient (output 3) of the attention_grad at ``gi``."""
    grad = program.steps[gi]
    if not getattr(grad.op, "mask_grad", True) or len(grad.inputs) < 5:
        return False
    for ri in readers.get(grad.out, []):
        reader = program.steps[ri]
        if reader.op.name != "tuple_get_item" or getattr(reader.op, "index", None) == 3:
            return True  # (a reader of the whole tuple keeps every output)
    return False


def _apply(program: Program, ai: int, grads: list[int], readers: dict) -> None:
    steps = program.steps
    fwd = steps[ai]
    op: Any = fwd.op
    device = getattr(fwd.node, "device", cpu())
    meta = fwd.node.meta
    out_aval = fwd.node.aval
    q_aval, k_aval = fwd.node.inputs[0].aval, fwd.node.inputs[1].aval
    p_aval = Aval((q_aval.shape[0], op.heads, q_aval.shape[1], k_aval.shape[1]),
                  np.dtype(np.float32))
    with_probs = AttentionWithProbs(op.heads, op.scale)
    both = RewrittenNode(with_probs, fwd.node.inputs, (out_aval, p_aval), meta, device)
    pick_out = RewrittenNode(TupleGetItem(0), (both,), out_aval, meta, device)
    pick_p = RewrittenNode(TupleGetItem(1), (both,), p_aval, meta, device)
    forward = [Step(with_probs, fwd.inputs, id(both), both),
               Step(pick_out.op, (id(both),), fwd.out, pick_out),
               Step(pick_p.op, (id(both),), id(pick_p), pick_p)]
    replaced = {ai: forward}
    for gi in grads:
        grad = steps[gi]
        g_op: Any = grad.op
        fused_op = AttentionGradProbs(g_op.heads, g_op.scale,
                                      mask_grad=_mask_grad_read(program, readers, gi))
        g_node, *rest = grad.node.inputs
        node = RewrittenNode(fused_op, (g_node, *rest[:3], pick_p, *rest[3:]),
                             fused_op.infer(*(n.aval for n in (g_node, *rest[:3], pick_p,
                                                               *rest[3:]))),
                             grad.node.meta, device)
        g, *others = grad.inputs
        replaced[gi] = [Step(fused_op, (g, *others[:3], id(pick_p), *others[3:]), grad.out,
                             node)]
    # (the new nodes stay referenced by their steps, so their ids stay unique slots)
    program.steps = [s for i, step in enumerate(steps) for s in replaced.get(i, [step])]
