"""2-D convolution (needle's layout: NHWC input, (kh, kw, C_in, C_out) weight)."""

from __future__ import annotations

import numpy as np

from ..backend import array_module
from . import api as F
from .registry import Aval, Op, ShapeError, fmt_shape, register


def _out_size(n: int | None, k: int, stride: int, padding: int) -> int | None:
    return None if n is None else (n + 2 * padding - k) // stride + 1


@register("conv", inputs=("a", "b"))
class Conv(Op):
    """Cross-correlation of NHWC ``a`` with a (kh, kw, C_in, C_out) kernel ``b``.

    Symmetric zero ``padding``; output (N, (H + 2p - kh) // stride + 1, ..., C_out).
    Computed as one matrix product over im2col patches (a strided view of the input).
    """

    def __init__(self, stride: int = 1, padding: int = 0) -> None:
        self.stride = int(stride)
        self.padding = int(padding)

    def compute(self, a, b):
        p, s = self.padding, self.stride
        if p:
            padded = np.zeros_like(a, shape=(a.shape[0], a.shape[1] + 2 * p,
                                             a.shape[2] + 2 * p, a.shape[3]))
            padded[:, p:-p, p:-p, :] = a
            a = padded
        n, h, w, c = a.shape
        kh, kw, _, c_out = b.shape
        ho, wo = (h - kh) // s + 1, (w - kw) // s + 1
        sn, sh, sw, sc = a.strides
        xp = array_module(a)
        patches = xp.lib.stride_tricks.as_strided(
            a, shape=(n, ho, wo, kh, kw, c), strides=(sn, sh * s, sw * s, sh, sw, sc))
        out = patches.reshape(n * ho * wo, kh * kw * c) @ b.reshape(kh * kw * c, c_out)
        return out.reshape(n, ho, wo, c_out)

    def gradient(self, out_grad, node):
        a, b = node.inputs
        kh, kw = b.shape[0], b.shape[1]
        s, p = self.stride, self.padding
        h, w = a.shape[1], a.shape[2]
        ho, wo = _out_size(h, kh, s, p), _out_size(w, kw, s, p)
        # rows/cols of the padded input that no window reaches when the stride skips past them
        rh, rw = h + 2 * p - kh - (ho - 1) * s, w + 2 * p - kw - (wo - 1) * s
        g = out_grad
        if s > 1:
            g = F.dilate(g, (1, 2), s - 1)
            g = F.getitem(g, (slice(None), slice(0, (ho - 1) * s + 1), slice(0, (wo - 1) * s + 1)))
        grad_a = grad_b = None
        # input adjoint: full correlation of g with the flipped kernel, then drop the padding
        if a.requires_grad:
            g_full = F.pad(g, ((0, 0), (kh - 1, kh - 1 + rh), (kw - 1, kw - 1 + rw), (0, 0)))
            kernel_t = F.permute(F.flip(b, (0, 1)), (0, 1, 3, 2))
            grad_a = F.conv(g_full, kernel_t)
            if p:
                grad_a = F.getitem(grad_a, (slice(None), slice(p, p + h), slice(p, p + w)))
        if b.requires_grad:
            # kernel adjoint: correlate the padded input (batch as channels) with g
            a_pad = F.pad(a, ((0, 0), (p, p), (p, p), (0, 0))) if p else a
            grad_b = F.conv(F.permute(a_pad, (3, 1, 2, 0)), F.permute(g, (1, 2, 0, 3)))
            if rh or rw:
                grad_b = F.getitem(grad_b, (slice(None), slice(0, kh), slice(0, kw)))
            grad_b = F.permute(grad_b, (1, 2, 0, 3))
        return grad_a, grad_b

    def infer(self, a: Aval, b: Aval) -> Aval:
        if len(a.shape) != 4 or len(b.shape) != 4:
            raise ShapeError(f"conv: expected NHWC input and (kh, kw, C_in, C_out) kernel, got "
                             f"{fmt_shape(a.shape)} and {fmt_shape(b.shape)}")
        n, h, w, c = a.shape
        kh, kw, c_in, c_out = b.shape
        if c is not None and c_in is not None and c != c_in:
            raise ShapeError(f"conv: input {fmt_shape(a.shape)} has {c} channels but the kernel "
                             f"{fmt_shape(b.shape)} expects {c_in}")
        ho = _out_size(h, kh, self.stride, self.padding)
        wo = _out_size(w, kw, self.stride, self.padding)
        if (ho is not None and ho < 1) or (wo is not None and wo < 1):
            raise ShapeError(f"conv: kernel {kh}x{kw} is larger than the padded input "
                             f"{fmt_shape(a.shape)} (padding {self.padding})")
        return Aval((n, ho, wo, c_out), np.result_type(a.dtype, b.dtype))
