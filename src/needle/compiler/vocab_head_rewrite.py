"""Rewrite a vocabulary head and its loss, ``linear`` -> ``softmax_cross_entropy`` and that
loss's gradient, into the fused ops of core/ops_vocab_head.py.

A traced training step of a language model holds::

    z  = linear(x, w, b)                          # (N, C) logits
    l  = softmax_cross_entropy(z, ids)
    G  = softmax_cross_entropy_grad(z, ids, g)    # a second (N, C) array
    dx = transposed_matmul(G, w, False, True);  dw = transposed_matmul(x, G, True, False)
    db = sum_to(G, b.shape)

Where z and G are used by nothing else (and are not fetched), it becomes::

    t  = vocab_head_softmax(x, w, b, ids)         # (losses, S = softmax(z) - onehot), one array
    l  = vocab_head_loss(x, w, b, ids, t[0], t[1])
    d  = vocab_head_loss_grad(x, w, b, ids, t[1], g, parts)   # (dx, dw, db): those used
    dx, dw, db = d[0], d[1], d[2]

the same values to float rounding, one logits-sized array instead of two, each exponential
once, and g applied to the small arrays. Only logits of at least ``MIN_LOGITS`` elements:
smaller heads keep the separate ops, bit for bit what eager mode computes. The pattern is
matched on the traced shapes; the pass leaves the user's graph nodes alone (new steps get
nodes of their own).
"""

from __future__ import annotations

from typing import Any

from ..backend import cpu
from ..core.interpret import Program, Step
from ..core.ops_shape import TupleGetItem
from ..core.ops_vocab_head import VocabHeadLoss, VocabHeadLossGrad, VocabHeadSoftmax
from .rewrite_support import kept_slots, rewrite_until_done
from .rewritten_node import RewrittenNode

__all__ = ["MIN_LOGITS", "rewrite_vocab_heads"]

#: smaller logits keep the separate ops (bit for bit what eager computes): a classifier's
#: few classes gain nothing from the fusion, a vocabulary's tens of megabytes do
MIN_LOGITS = 1 << 18



def _users(program: Program) -> dict[int, list[int]]:
    users: dict[int, list[int]] = {}
    for i, step in enumerate(program.steps):
        for slot in step.inputs:
            users.setdefault(slot, []).append(i)
    return users


def _grad_role(step: Step, grad_slot: int, x: int, w: int, b_shape: tuple) -> str | None:
    """Which adjoint ("x", "w", "b") a reader of the loss gradient G computes, or None."""
    op: Any = step.op
    ins = step.inputs
    if op.name == "transposed_matmul" and ins.count(grad_slot) == 1:
        if ins == (grad_slot, w) and not op.transpose_a and op.transpose_b:
            return "x"
        if ins == (x, grad_slot) and op.transpose_a and not op.transpose_b:
            return "w"
    if op.name == "sum_to" and ins == (grad_slot,) and tuple(op.shape) == b_shape:
        return "b"
    return None


def rewrite_vocab_heads(program: Program) -> int:
    """Rewrite each matching head (see the module docstring); the number rewritten. Run it
    before dead-step elimination (the ``linear`` step is left unread) and the memory plan."""
    kept = kept_slots(program)
    return rewrite_until_done(lambda: _find(program, kept),
                              lambda *match: _apply(program, *match))


def _find(program: Program, kept: set) -> tuple | None:
    users = _users(program)
    steps = program.steps
    for li, lin in enumerate(steps):
        if lin.op.name != "linear" or lin.out in kept:
            continue
        x, w, b = lin.inputs
        b_aval = lin.node.inputs[2].aval
        w_aval = lin.node.inputs[1].aval
        z_shape = lin.node.aval.shape
        if len(z_shape) != 2 or None in z_shape or z_shape[0] * z_shape[1] < MIN_LOGITS:
            continue
        if not (len(b_aval.shape) in (1, 2) and b_aval.shape[-1] == w_aval.shape[-1]
                and (len(b_aval.shape) == 1 or b_aval.shape[0] == 1)):
            continue
        readers = users.get(lin.out, [])
        losses = [i for i in readers if steps[i].op.name == "softmax_cross_entropy"]
        grads = [i for i in readers if steps[i].op.name == "softmax_cross_entropy_grad"]
        if len(losses) != 1 or len(grads) != 1 or len(readers) != 2:
            continue
        ci, gi = losses[0], grads[0]
        ids = steps[ci].inputs[1]
        if steps[ci].inputs != (lin.out, ids) or steps[gi].inputs[:2] != (lin.out, ids) \
                or steps[gi].out in kept:
            continue
        roles: dict[str, int] = {}
        for ri in users.get(steps[gi].out, []):
            role = _grad_role(steps[ri], steps[gi].out, x, w, tuple(b_aval.shape))
            if role is None or role in roles:
                roles = {}
                break
            roles[role] = ri
        if not roles:
            continue
        return li, ci, gi, roles
    return None


def _apply(program: Program, li: int, ci: int, gi: int, roles: dict[str, int]) -> None:
    steps = program.steps
    lin, loss, grad = steps[li], steps[ci], steps[gi]
    x, w, b = lin.inputs
    ids, g = loss.inputs[1], grad.inputs[2]
    xn, wn, bn = lin.node.inputs
    ids_n, g_n = loss.node.inputs[1], grad.node.inputs[2]
    device = getattr(lin.node, "device", cpu())
    meta = loss.node.meta
    z_aval, l_aval = lin.node.aval, loss.node.aval

    head_op = VocabHeadSoftmax()
    head = RewrittenNode(head_op, (xn, wn, bn, ids_n), (l_aval, z_aval), meta, device)
    item_l = RewrittenNode(TupleGetItem(0), (head,), l_aval, meta, device)
    item_s = RewrittenNode(TupleGetItem(1), (head,), z_aval, meta, device)
    loss_node = RewrittenNode(VocabHeadLoss(), (xn, wn, bn, ids_n, item_l, item_s), l_aval,
                               meta, device)
    new_loss = [Step(head_op, (x, w, b, ids), id(head), head),
                Step(item_l.op, (id(head),), id(item_l), item_l),
                Step(item_s.op, (id(head),), id(item_s), item_s),
                Step(loss_node.op, (x, w, b, ids, id(item_l), id(item_s)), loss.out, loss_node)]

    parts = "".join(p for p in "xwb" if p in roles)
    grad_op = VocabHeadLossGrad(parts)
    avals = tuple(steps[roles[p]].node.aval for p in parts)
    grad_node = RewrittenNode(grad_op, (xn, wn, bn, ids_n, item_s, g_n), avals,
                               grad.node.meta, device)
    grad_step = Step(grad_op, (x, w, b, ids, id(item_s), g), id(grad_node), grad_node)
    # the loss's steps where the first of the loss and its gradient was (both read ids)
    replaced = ({ci: new_loss, gi: [grad_step]} if ci < gi
                else {gi: [*new_loss, grad_step], ci: []})
    for k, p in enumerate(parts):
        reader = steps[roles[p]]
        node = RewrittenNode(TupleGetItem(k), (grad_node,), reader.node.aval,
                              reader.node.meta, device)
        replaced[roles[p]] = [Step(node.op, (id(grad_node),), reader.out, node)]
    # (the new nodes stay referenced by their steps, so their ids stay unique slots)
    program.steps = [s for i, step in enumerate(steps) if i != li
                     for s in replaced.get(i, [step])]
