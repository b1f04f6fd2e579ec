"""A vocabulary head and its softmax cross-entropy as ops that make no second logits-sized
array: ``linear`` then ``softmax_cross_entropy``, fused.

``vocab_head_softmax(x, w, b, ids)`` (not differentiable) computes the per-row losses of
``softmax_cross_entropy(linear(x, w, b), ids)`` and the direction of their gradient,
``S = softmax(z) - onehot(ids)``, written over the logits in place (kernels/vocab_head.py).
``vocab_head_loss(x, w, b, ids, losses, S)`` hands the losses on and carries the gradient:
``vocab_head_loss_grad`` is two matrix products on S (the bias's adjoint one more row of
the weight's), the losses' adjoint scaling only the small arrays. Second-order gradients
are those of the two-op composite, derived by the same autodiff (as ``lstm_sequence_grad``'s).
``nn.linear_softmax_cross_entropy`` makes the two nodes.

The JIT rewrites ``linear`` -> ``softmax_cross_entropy`` (and its gradient) into these ops
(compiler/vocab_head_rewrite.py). Eager code calls them itself: ``nn.SoftmaxLoss`` after
``nn.Linear`` cannot be fused in eager (the logits exist before the loss is called).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import array_module
from ..kernels import blas_policy, vocab_head
from .context import GradMode
from .ops_index import checked_ids
from .ops_reduce import SoftmaxCrossEntropy, SoftmaxCrossEntropyGrad
from .ops_rnn import _is_zeros, _tuple_items
from .registry import Aval, F, Op, ShapeError, fmt_shape, register

_PARTS = ("x", "w", "b")


def _check_avals(op: str, x: Aval, w: Aval, b: Aval, ids: Aval) -> tuple:
    """(rows, classes), or a ShapeError naming what does not fit."""
    if len(x.shape) != 2 or len(w.shape) != 2:
        raise ShapeError(f"{op}: x and w must be matrices, got {fmt_shape(x.shape)} and "
                         f"{fmt_shape(w.shape)}")
    if None not in (x.shape[1], w.shape[0]) and x.shape[1] != w.shape[0]:
        raise ShapeError(f"{op}: inner dimensions differ: {fmt_shape(x.shape)} @ "
                         f"{fmt_shape(w.shape)}")
    classes = w.shape[1]
    if not (len(b.shape) in (1, 2) and b.shape[-1] in (None, classes)
            and (len(b.shape) == 1 or b.shape[0] in (None, 1))):
        raise ShapeError(f"{op}: the bias must be ({classes},) or (1, {classes}), got "
                         f"{fmt_shape(b.shape)}")
    if np.dtype(ids.dtype).kind not in "iuf":
        raise ShapeError(f"{op}: ids must be integers, got dtype {ids.dtype}")
    if len(ids.shape) != 1 or (None not in (ids.shape[0], x.shape[0])
                               and ids.shape[0] != x.shape[0]):
        raise ShapeError(f"{op}: ids must be (N,) for x (N, K) = {fmt_shape(x.shape)}, got "
                         f"{fmt_shape(ids.shape)}")
    rows = x.shape[0] if x.shape[0] is not None else ids.shape[0]
    return rows, classes


def _check_arrays(x: Any, w: Any, b: Any, ids: Any) -> None:
    """Raise (the shape rule then names the shapes) unless the arrays fit."""
    if (x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0] or ids.shape != x.shape[:1]
            or b.size != w.shape[1] or b.ndim not in (1, 2)):
        raise ValueError("x (N, K), w (K, C), b (C,) or (1, C) and ids (N,) expected")


def _large_head(node: Any) -> bool:
    """Whether the head's x @ w is a product a held plan run splits (kernels/blas_policy)."""
    x, w = node.inputs[0], node.inputs[1]
    return len(x.shape) == 2 and len(w.shape) == 2 and \
        blas_policy.splits(x.shape[0], x.shape[1], w.shape[1])


def composite(x: Any, w: Any, b: Any, ids: Any) -> Any:
    """The losses with the separate ops: the definition, and the source of second order."""
    return F.softmax_cross_entropy(F.linear(x, w, b), ids)


@register("vocab_head_softmax", inputs=("x", "w", "b", "ids"))
class VocabHeadSoftmax(Op):
    """``(losses, S)`` for ``z = x @ w + b``: ``losses_i = logsumexp(z_i) - z_i[ids_i]``
    (N,) and ``S = softmax(z) - onehot(ids)`` (N, C), the direction of the loss gradient.
    x (N, K), w (K, C), b (C,) or (1, C), ids (N,) class ids.

    Not differentiable: ``vocab_head_loss`` takes both and carries the gradient, so no
    adjoint of the logits-sized S is ever made (a differentiable tuple would get a
    zero-filled one)."""

    returns_tuple = True
    differentiable = False
    def large_products(self, node: Any) -> bool:
        return _large_head(node)

    def compute(self, x, w, b, ids):
        _check_arrays(x, w, b, ids)
        ids = checked_ids(self.name, ids, w.shape[1])
        out = vocab_head.forward(x, w, b, ids)
        if out is not None:
            return out
        # a non-finite row maximum: the separate ops' careful formulas
        z = x @ w + b.reshape(1, -1)
        ones = array_module(z).ones(z.shape[0], z.dtype)
        return (SoftmaxCrossEntropy().compute(z, ids),
                SoftmaxCrossEntropyGrad().compute(z, ids, ones))

    def infer(self, x: Aval, w: Aval, b: Aval, ids: Aval) -> tuple:
        rows, classes = _check_avals(self.name, x, w, b, ids)
        dtype = np.result_type(x.dtype, w.dtype, b.dtype)
        return Aval((rows,), dtype), Aval((rows, classes), dtype)


@register("vocab_head_loss", inputs=("x", "w", "b", "ids", "losses", "s"))
class VocabHeadLoss(Op):
    """The per-row losses ``softmax_cross_entropy(linear(x, w, b), ids)`` from
    ``vocab_head_softmax(x, w, b, ids)``'s ``losses`` and ``S``; differentiable in x, w and
    b (``vocab_head_loss_grad``). Use ``linear_softmax_cross_entropy`` (nn/vocab_head.py),
    which makes both nodes."""

    def compute(self, x, w, b, ids, losses, s):
        return losses.copy()  # (N values: a plan may write into its output's buffer)

    def gradient(self, out_grad, node):
        x, w, b, ids, _, s = node.inputs
        wanted = [t.requires_grad for t in (x, w, b)]
        if not any(wanted):
            return None, None, None, None, None, None
        parts = "".join(p for p, want in zip(_PARTS, wanted) if want)
        got = F.vocab_head_loss_grad(x, w, b, ids, s, out_grad, parts=parts)
        items = iter(_tuple_items(got, len(parts)))
        return (*(next(items) if want else None for want in wanted), None, None, None)

    def infer(self, x: Aval, w: Aval, b: Aval, ids: Aval, losses: Aval, s: Aval) -> Aval:
        rows, classes = _check_avals(self.name, x, w, b, ids)
        if len(losses.shape) != 1 or len(s.shape) != 2:
            raise ShapeError(f"{self.name}: losses (N,) and s (N, C) expected, got "
                             f"{fmt_shape(losses.shape)} and {fmt_shape(s.shape)}")
        return Aval((rows,), np.result_type(x.dtype, w.dtype, b.dtype))


@register("vocab_head_loss_grad", inputs=("x", "w", "b", "ids", "s", "g"))
class VocabHeadLossGrad(Op):
    """The adjoints of ``vocab_head_loss``'s x, w and b (those named in
    ``parts``, in the order x, w, b; b's shaped like b) for the losses' adjoint ``g`` (N,),
    from its ``S`` output: ``diag(g) S w^T``, ``(diag(g) x)^T S`` and ``g^T S``.

    NOTE: ``s`` must be the forward's S for these x, w, b and ids: the second-order gradient
    is the composite's in x, w, b and g, which already accounts for it.
    """

    returns_tuple = True

    def __init__(self, parts: str = "xwb") -> None:
        if not parts or any(p not in _PARTS for p in parts) or "".join(
                p for p in _PARTS if p in parts) != parts:
            raise ValueError(f"{self.name}: parts must be a non-empty subsequence of 'xwb', "
                             f"got {parts!r}")
        self.parts = parts

    def large_products(self, node: Any) -> bool:
        return _large_head(node)

    def compute(self, x, w, b, ids, s, g):
        _check_arrays(x, w, b, ids)
        if s.shape != (x.shape[0], w.shape[1]) or g.shape != x.shape[:1]:
            raise ValueError("s (N, C) and g (N,) expected")
        out = vocab_head.backward(x, w, s, g, self.parts)
        if "b" in self.parts:
            out = (*out[:-1], out[-1].reshape(b.shape))
        return out

    def gradient(self, out_grad, node):
        from .autodiff import gradients

        x, w, b, ids, _, g = node.inputs
        # recorded even under backward(create_graph=False), as in LSTMSequenceGrad.gradient
        with GradMode(True):
            losses = composite(x, w, b, ids)
            firsts = gradients([losses], [x, w, b], [g], stop_at_wrt=True)
        chosen = [f for p, f in zip(_PARTS, firsts) if p in self.parts]
        pairs = [(f, seed) for f, seed in zip(chosen, _tuple_items(out_grad, len(self.parts)))
                 if f is not None and not _is_zeros(seed)]
        if not pairs:
            return None, None, None, None, None, None
        sx, sw, sb, sg = gradients([p[0] for p in pairs], [x, w, b, g], [p[1] for p in pairs],
                                   stop_at_wrt=True)
        return sx, sw, sb, None, None, sg

    def infer(self, x: Aval, w: Aval, b: Aval, ids: Aval, s: Aval, g: Aval) -> tuple:
        rows, classes = _check_avals(self.name, x, w, b, ids)
        if len(s.shape) != 2 or any(d is not None and e is not None and d != e
                                    for d, e in zip(s.shape, (rows, classes))):
            raise ShapeError(f"{self.name}: s must be {fmt_shape((rows, classes))}, got "
                             f"{fmt_shape(s.shape)}")
        if len(g.shape) != 1 or None not in (g.shape[0], rows) and g.shape[0] != rows:
            raise ShapeError(f"{self.name}: g must be ({rows},), got {fmt_shape(g.shape)}")
        dtype = np.result_type(x.dtype, w.dtype, b.dtype, s.dtype, g.dtype)
        shapes = {"x": x.shape, "w": w.shape, "b": b.shape}
        return tuple(Aval(shapes[p], dtype) for p in self.parts)
