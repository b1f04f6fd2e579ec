"""Multi-head scaled dot-product attention as one op, and its adjoint as one op.

``attention(q, k, v[, mask], heads=H, scale=c)`` is, per head h of H,
``softmax(c * q_h k_h^T + mask) v_h`` with q (B, T, H*dk), k (B, S, H*dk), v (B, S, H*dv)
and the heads concatenated again in the output (B, T, H*dv): the layout of the projections
around it, so the module needs no reshape, permute or split of its own. ``mask`` is an
optional additive float mask broadcasting to (B, H, T, S) (causal, key padding, ...).
kernels/attention.py computes both directions on strided views of the heads. The adjoint's
own gradient is that of its formula written with elementary ops
(``composite_attention_grad``), derived by the same autodiff, so second order works (as
``normalize_grad``).
"""

from __future__ import annotations

import numpy as np

from ..kernels import attention as kernel
from .autodiff import per_input
from .context import GradMode
from .registry import Aval, F, Op, ShapeError, fmt_shape, register


def _compatible(a: object, b: object) -> bool:
    return a is None or b is None or a == b


def _check(op: str, heads: int, q: Aval, k: Aval, v: Aval, mask: tuple) -> tuple:
    """A ShapeError unless q, k, v (and the mask) fit; the (B, H, T, S) logits shape."""
    if heads < 1:
        raise ShapeError(f"{op}: heads must be >= 1, got {heads}")
    shapes = f"q {fmt_shape(q.shape)}, k {fmt_shape(k.shape)}, v {fmt_shape(v.shape)}"
    if len(q.shape) != 3 or len(k.shape) != 3 or len(v.shape) != 3:
        raise ShapeError(f"{op}: q, k and v must be (batch, length, heads * head_dim), got "
                         f"{shapes}")
    (b, t, e), (bk, s, ek), (bv, sv, ev) = q.shape, k.shape, v.shape
    if not (_compatible(b, bk) and _compatible(b, bv) and _compatible(s, sv)
            and _compatible(e, ek)):
        raise ShapeError(f"{op}: q, k and v must share the batch size, k and v the length, "
                         f"q and k the width; got {shapes}")
    for width in (e, ev):
        if width is not None and width % heads:
            raise ShapeError(f"{op}: widths must divide into {heads} heads; got {shapes}")
    logits = (b, heads, t, s)
    for aval in mask:
        fits = len(aval.shape) <= 4 and all(
            m == 1 or m is None or n is None or m == n
            for m, n in zip(aval.shape[::-1], logits[::-1]))
        if not fits:
            raise ShapeError(f"{op}: mask {fmt_shape(aval.shape)} does not broadcast to the "
                             f"logits (batch, heads, target, source) = {fmt_shape(logits)}")
    return logits


class _AttentionBase(Op):
    def __init__(self, heads: int = 1, scale: float = 1.0) -> None:
        self.heads = int(heads)
        self.scale = float(scale)


@register("attention", inputs=("q", "k", "v", "*mask"))
class Attention(_AttentionBase):
    """softmax(scale * q k^T + mask) v for each of ``heads`` heads, heads concatenated:
    q (B, T, H*dk), k (B, S, H*dk), v (B, S, H*dv) -> (B, T, H*dv); ``mask`` (optional) is
    added to the logits and broadcasts to (B, H, T, S)."""

    def compute(self, q, k, v, *mask):
        return kernel.attention(q, k, v, mask[0] if mask else None, self.heads, self.scale)

    def gradient(self, out_grad, node):
        mask_grad = len(node.inputs) == 4 and node.inputs[3].requires_grad
        grads = F.attention_grad(out_grad, *node.inputs, heads=self.heads, scale=self.scale,
                                 mask_grad=mask_grad)
        return (grads[0], grads[1], grads[2], *([grads[3] if mask_grad else None]
                                               * (len(node.inputs) - 3)))

    def infer(self, q: Aval, k: Aval, v: Aval, *mask: Aval) -> Aval:
        if len(mask) > 1:
            raise ShapeError(f"attention: at most one mask, got {len(mask)}")
        _check(self.name, self.heads, q, k, v, mask)
        return Aval((q.shape[0], q.shape[1], v.shape[2]),
                    np.result_type(q.dtype, k.dtype, v.dtype))


def _split(x, heads: int):
    """(B, L, H*d) -> (B, H, L, d) with ops."""
    b, length, width = x.shape
    x = F.reshape(x, (-1 if b is None else b, length, heads, width // heads))
    return F.permute(x, (0, 2, 1, 3))


def _merge(x, shape: tuple):
    """(B, H, L, d) -> (B, L, H*d) of ``shape``, with ops."""
    b, length, width = shape
    return F.reshape(F.permute(x, (0, 2, 1, 3)), (-1 if b is None else b, length, width))


def _composite_probs(qh, kh, mask, scale: float):
    """softmax(scale * q_h k_h^T + mask) per head (B, H, T, S), with ops."""
    logits = F.mul_scalar(qh @ F.transpose(kh, (2, 3)), scale)
    if mask is not None:
        logits = logits + mask
    return F.softmax(logits, -1)


def composite_attention_grad(g, q, k, v, mask, heads: int, scale: float, p=None,
                             mask_grad: bool = True) -> list:
    """``attention_grad``'s outputs written with elementary ops (its own gradient): the
    formulas of kernels/attention.py on per-head views made by reshape and permute; ``p``
    the probabilities where given (``attention_grad_probs``), else made from q and k."""
    qh, kh, vh, gh = (_split(x, heads) for x in (q, k, v, g))
    if p is None:
        p = _composite_probs(qh, kh, mask, scale)
    dv = F.transpose(p, (2, 3)) @ gh
    dp = gh @ F.transpose(vh, (2, 3))
    ds = p * (dp - F.summation(dp * p, (3,), keepdims=True))
    dq = F.mul_scalar(ds @ kh, scale)
    dk = F.mul_scalar(F.transpose(ds, (2, 3)) @ qh, scale)
    grads = [_merge(dq, q.shape), _merge(dk, k.shape), _merge(dv, v.shape)]
    return grads if mask is None or not mask_grad else [*grads, ds]


@register("attention_grad", inputs=("g", "q", "k", "v", "*mask"))
class AttentionGrad(_AttentionBase):
    """The adjoint of ``attention`` for output gradient ``g``: ``(dq, dk, dv)``, and with a
    mask (unless ``mask_grad=False``: a constant causal mask) also ``dmask``, the logits'
    adjoint (B, H, T, S) (summed to the mask's shape by the engine). Recomputes the
    probabilities from q and k (see kernels/attention.py)."""

    returns_tuple = True

    def __init__(self, heads: int = 1, scale: float = 1.0, mask_grad: bool = True) -> None:
        super().__init__(heads, scale)
        self.mask_grad = bool(mask_grad)

    def compute(self, g, q, k, v, *mask):
        return self._outputs(kernel.attention_grad(g, q, k, v, mask[0] if mask else None,
                                                   self.heads, self.scale,
                                                   mask_grad=self.mask_grad), mask)

    def _outputs(self, grads: tuple, mask: tuple) -> tuple:
        return grads if mask and self.mask_grad else grads[:3]

    def _composite(self, node) -> list:
        g, q, k, v, *mask = node.inputs
        return composite_attention_grad(g, q, k, v, mask[0] if mask else None, self.heads,
                                        self.scale, mask_grad=self.mask_grad)

    def gradient(self, out_grad, node):
        from .autodiff import gradients

        # recorded even under backward(create_graph=False), as NormalizeGrad's composite
        with GradMode(True):
            outputs = self._composite(node)
        seeds = [out_grad[i] for i in range(len(outputs))]
        return per_input(node.inputs, lambda wrt: gradients(outputs, wrt, seeds,
                                                            stop_at_wrt=True))

    def infer(self, g: Aval, q: Aval, k: Aval, v: Aval, *mask: Aval) -> tuple:
        if len(mask) > 1:
            raise ShapeError(f"{self.name}: at most one mask, got {len(mask)}")
        logits = _check(self.name, self.heads, q, k, v, mask)
        expected = (q.shape[0], q.shape[1], v.shape[2])
        if len(g.shape) != 3 or not all(_compatible(a, b) for a, b in zip(g.shape, expected)):
            raise ShapeError(f"{self.name}: g {fmt_shape(g.shape)} does not match the "
                             f"output {fmt_shape(expected)}")
        dtype = np.result_type(g.dtype, q.dtype, k.dtype, v.dtype)
        avals = (Aval(q.shape, dtype), Aval(k.shape, dtype), Aval(v.shape, dtype))
        return (*avals, Aval(logits, dtype)) if mask and self.mask_grad else avals


# -- the probabilities kept from the forward (compiler/attention_probs_rewrite.py) -------------
@register("attention_with_probs", inputs=("q", "k", "v", "*mask"))
class AttentionWithProbs(_AttentionBase):
    """``(attention(q, k, v, mask), p)``: the attention and its probabilities
    ``p = softmax(scale * q_h k_h^T + mask)`` (B, H, T, S), which ``attention_grad_probs``
    reads instead of recomputing them (the very values, bit for bit)."""

    returns_tuple = True

    def compute(self, q, k, v, *mask):
        return kernel.attention(q, k, v, mask[0] if mask else None, self.heads, self.scale,
                                keep_probs=True)

    def gradient(self, out_grad, node):
        from .autodiff import gradients

        q, k, v, *mask = node.inputs
        with GradMode(True):  # (as AttentionGrad's composite)
            p = _composite_probs(_split(q, self.heads), _split(k, self.heads),
                                 mask[0] if mask else None, self.scale)
            out = _merge(p @ _split(v, self.heads), (q.shape[0], q.shape[1], v.shape[2]))
        seeds = [out_grad[0], out_grad[1]]
        return per_input(node.inputs, lambda wrt: gradients([out, p], wrt, seeds,
                                                            stop_at_wrt=True))

    def infer(self, q: Aval, k: Aval, v: Aval, *mask: Aval) -> tuple:
        if len(mask) > 1:
            raise ShapeError(f"{self.name}: at most one mask, got {len(mask)}")
        logits = _check(self.name, self.heads, q, k, v, mask)
        dtype = np.result_type(q.dtype, k.dtype, v.dtype)
        return Aval((q.shape[0], q.shape[1], v.shape[2]), dtype), Aval(logits, dtype)


@register("attention_grad_probs", inputs=("g", "q", "k", "v", "probs", "*mask"))
class AttentionGradProbs(AttentionGrad):
    """``attention_grad`` given the forward's probabilities ``probs`` (B, H, T, S)
    (``attention_with_probs``'s second output): read, not recomputed. Its outputs are
    attention_grad's; as a function of its inputs, the formulas with ``probs`` for p."""

    def compute(self, g, q, k, v, probs, *mask):
        return self._outputs(kernel.attention_grad(g, q, k, v, mask[0] if mask else None,
                                                   self.heads, self.scale, probs=probs,
                                                   mask_grad=self.mask_grad), mask)

    def _composite(self, node) -> list:
        g, q, k, v, probs, *mask = node.inputs
        return composite_attention_grad(g, q, k, v, mask[0] if mask else None, self.heads,
                                        self.scale, p=probs, mask_grad=self.mask_grad)

    def infer(self, g: Aval, q: Aval, k: Aval, v: Aval,  # type: ignore[override]
              probs: Aval, *mask: Aval) -> tuple:
        avals = AttentionGrad.infer(self, g, q, k, v, *mask)
        logits = _check(self.name, self.heads, q, k, v, mask)
        if len(probs.shape) != 4 or not all(_compatible(a, b)
                                            for a, b in zip(probs.shape, logits)):
            raise ShapeError(f"{self.name}: probs {fmt_shape(probs.shape)} are not the "
                             f"logits' (batch, heads, target, source) = {fmt_shape(logits)}")
        return avals
