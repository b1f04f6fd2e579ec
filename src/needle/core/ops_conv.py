"""2-D convolution (needle's layout: NHWC input, (kh, kw, C_in, C_out) weight) and its adjoints.

``conv`` is one matrix product over the padded input's patches (``unfold``: row (n, y, x)
holds the kh x kw x C window under output position (y, x)). Its two gradients are primitives
of their own, each the adjoint of the other, so backward costs two matrix products of the
forward's size (no dilated zeros, no badly strided patch copies) and second derivatives work:

    conv(a, b)                  y  = unfold(pad(a)) @ b             (N, Ho, Wo, C_out)
    conv_weight_grad(a, g)      Wb = unfold(pad(a)).T @ g           (kh, kw, C_in, C_out)
    conv_input_grad(g, b)       Xb = crop(fold(g @ b.T))            (N, H, W, C_in)
    conv_bias(a, b, c)          y  = conv(a, b) + c                 (the bias added in place)

with ``<conv(a, b), g> = <a, conv_input_grad(g, b)> = <b, conv_weight_grad(a, g)>`` (``fold``
adds each patch back where ``unfold`` took it from). How they are computed (the algorithm for
each shape and dtype, threads, memory layouts, compiled loops) is kernels/conv.py's business;
results are C-contiguous NHWC whatever the inputs' layout.
"""

from __future__ import annotations

import numpy as np

from ..kernels.conv import conv2d, conv2d_input_grad, conv2d_weight_grad
from .registry import Aval, F, Op, ShapeError, fmt_shape, register


def _out_size(n: int | None, k: int, stride: int, padding: int) -> int | None:
    return None if n is None else (n + 2 * padding - k) // stride + 1


def _in_size(n_out: int, k: int, stride: int, padding: int) -> int:
    """The smallest input size whose output has ``n_out`` positions (no leftover rows)."""
    return (n_out - 1) * stride + k - 2 * padding


def _check_nhwc(op: str, what: str, shape: tuple, other: str, other_shape: tuple) -> None:
    if len(shape) != 4 or len(other_shape) != 4:
        raise ShapeError(f"{op}: expected 4-d {what} and {other}, got {fmt_shape(shape)} and "
                         f"{fmt_shape(other_shape)}")


@register("conv", inputs=("a", "b"))
class Conv(Op):
    """Cross-correlation of NHWC ``a`` with a (kh, kw, C_in, C_out) kernel ``b``.

    ``y[n, y, x, o] = sum_{i, j, c} a_pad[n, s*y + i, s*x + j, c] * b[i, j, c, o]``;
    symmetric zero ``padding``; output (N, (H + 2p - kh) // stride + 1, ..., C_out),
    C-contiguous NHWC.
    """

    def __init__(self, stride: int = 1, padding: int = 0) -> None:
        self.stride = int(stride)
        self.padding = int(padding)

    def compute(self, a, b):
        if a.shape[3] != b.shape[2]:
            raise ShapeError(f"conv: input {fmt_shape(a.shape)} has {a.shape[3]} channels but "
                             f"the kernel {fmt_shape(b.shape)} expects {b.shape[2]}")
        return conv2d(a, b, self.stride, self.padding)

    def gradient(self, out_grad, node):
        a, b = node.inputs[:2]  # (conv_bias's bias third)
        s, p = self.stride, self.padding
        grad_a = grad_b = None
        if a.requires_grad:
            grad_a = F.conv_input_grad(out_grad, b, stride=s, padding=p,
                                       in_hw=(a.shape[1], a.shape[2]))
        if b.requires_grad:
            grad_b = F.conv_weight_grad(a, out_grad, kernel_hw=(b.shape[0], b.shape[1]),
                                        stride=s, padding=p)
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


@register("conv_bias", inputs=("a", "b", "c"))
class ConvBias(Conv):
    """``conv(a, b) + c`` for a (C_out,) bias ``c``, added where the convolution writes its
    output (no pass of its own, no second output array): nn.Conv's forward with a bias.

    ``y[n, y, x, o] = c[o] + sum_{i, j, ch} a_pad[n, s*y + i, s*x + j, ch] * b[i, j, ch, o]``;
    the bias gradient is the sum of the output gradient over (N, Ho, Wo). A separate op, not a
    third input of ``conv``, so graphs saved with 2-input convs load unchanged.
    """

    def compute(self, a, b, c):
        if a.shape[3] != b.shape[2]:
            raise ShapeError(f"conv_bias: input {fmt_shape(a.shape)} has {a.shape[3]} channels "
                             f"but the kernel {fmt_shape(b.shape)} expects {b.shape[2]}")
        if c.shape != (b.shape[3],):
            raise ShapeError(f"conv_bias: bias {fmt_shape(c.shape)} does not match the "
                             f"kernel's {b.shape[3]} output channels")
        return conv2d(a, b, self.stride, self.padding, c)

    def gradient(self, out_grad, node):
        a, b, c = node.inputs
        grad_a, grad_b = Conv.gradient(self, out_grad, node)
        grad_c = F.sum_to(out_grad, shape=tuple(c.shape)) if c.requires_grad else None
        return grad_a, grad_b, grad_c

    def infer(self, a: Aval, b: Aval, c: Aval) -> Aval:  # type: ignore[override]
        out = Conv.infer(self, a, b)
        c_out = b.shape[3]
        if len(c.shape) != 1 or (c_out is not None and c.shape[0] is not None
                                 and c.shape[0] != c_out):
            raise ShapeError(f"conv_bias: bias {fmt_shape(c.shape)} does not match the "
                             f"kernel {fmt_shape(b.shape)}'s {c_out} output channels")
        return Aval(out.shape, np.result_type(out.dtype, c.dtype))


@register("conv_weight_grad", inputs=("a", "g"))
class ConvWeightGrad(Op):
    """The kernel adjoint of ``conv``: ``Wb = unfold(pad(a), stride).T @ g.reshape(-1, C_out)``.

    ``Wb[i, j, c, o] = sum_{n, y, x} a_pad[n, s*y + i, s*x + j, c] * g[n, y, x, o]``;
    ``a`` (N, H, W, C_in), ``g`` (N, Ho, Wo, C_out) -> (kh, kw, C_in, C_out) with
    ``kernel_hw = (kh, kw)``. Linear in each input: its adjoints are
    ``conv_input_grad(g, Wb_bar)`` for ``a`` and ``conv(a, Wb_bar)`` for ``g``.
    """

    def __init__(self, kernel_hw: tuple, stride: int = 1, padding: int = 0) -> None:
        self.kernel_hw = tuple(int(k) for k in kernel_hw)
        self.stride = int(stride)
        self.padding = int(padding)

    def _check_g(self, a, g, out_nhw: tuple) -> None:
        """A ShapeError when g is not the conv output (N, Ho, Wo, .) of input a."""
        if g.shape[:3] != out_nhw:
            kh, kw = self.kernel_hw
            raise ShapeError(f"conv_weight_grad: g {fmt_shape(g.shape)} does not match the "
                             f"conv output (N, Ho, Wo) = {out_nhw} of input "
                             f"{fmt_shape(a.shape)} (kernel {kh}x{kw}, stride {self.stride}, "
                             f"padding {self.padding})")

    def compute(self, a, g):
        kh, kw = self.kernel_hw
        ho = _out_size(a.shape[1], kh, self.stride, self.padding)
        wo = _out_size(a.shape[2], kw, self.stride, self.padding)
        self._check_g(a, g, (a.shape[0], ho, wo))
        return conv2d_weight_grad(a, g, self.kernel_hw, self.stride, self.padding)

    def gradient(self, out_grad, node):
        a, g = node.inputs
        s, p = self.stride, self.padding
        grad_a = grad_g = None
        if a.requires_grad:
            grad_a = F.conv_input_grad(g, out_grad, stride=s, padding=p,
                                       in_hw=(a.shape[1], a.shape[2]))
        if g.requires_grad:
            grad_g = F.conv(a, out_grad, stride=s, padding=p)
        return grad_a, grad_g

    def infer(self, a: Aval, g: Aval) -> Aval:
        _check_nhwc("conv_weight_grad", "input a", a.shape, "g", g.shape)
        kh, kw = self.kernel_hw
        ho = _out_size(a.shape[1], kh, self.stride, self.padding)
        wo = _out_size(a.shape[2], kw, self.stride, self.padding)
        for got, want in ((g.shape[1], ho), (g.shape[2], wo)):
            if got is not None and want is not None and got != want:
                raise ShapeError(f"conv_weight_grad: g {fmt_shape(g.shape)} does not match "
                                 f"the conv output size {ho}x{wo} of input "
                                 f"{fmt_shape(a.shape)} (kernel {kh}x{kw}, stride "
                                 f"{self.stride}, padding {self.padding})")
        return Aval((kh, kw, a.shape[3], g.shape[3]), np.result_type(a.dtype, g.dtype))


@register("conv_input_grad", inputs=("g", "b"))
class ConvInputGrad(Op):
    """The input adjoint of ``conv``: ``Xb = crop(fold(g @ b.T))``.

    ``Xb[n, h, w, c] = sum_{y, x, i, j: s*y + i = h + p, s*x + j = w + p} g[n, y, x, o]
    * b[i, j, c, o]`` (summed over o); ``g`` (N, Ho, Wo, C_out), ``b`` (kh, kw, C_in, C_out)
    -> (N, H, W, C_in) with ``in_hw = (H, W)``, the conv input's size (None: the smallest
    input giving Ho x Wo). Linear in each input: its adjoints are ``conv(Xb_bar, b)`` for
    ``g`` and ``conv_weight_grad(Xb_bar, g)`` for ``b``.
    """

    def __init__(self, stride: int = 1, padding: int = 0, in_hw: tuple | None = None) -> None:
        self.stride = int(stride)
        self.padding = int(padding)
        self.in_hw = None if in_hw is None else tuple(
            None if d is None else int(d) for d in in_hw)

    def _input_hw(self, ho: int, wo: int, kh: int, kw: int) -> tuple[int, int]:
        s, p = self.stride, self.padding
        h, w = self.in_hw if self.in_hw is not None else (None, None)
        return (_in_size(ho, kh, s, p) if h is None else h,
                _in_size(wo, kw, s, p) if w is None else w)

    def compute(self, g, b):
        s, p = self.stride, self.padding
        ho, wo = g.shape[1:3]
        kh, kw = b.shape[:2]
        h, w = self._input_hw(ho, wo, kh, kw)
        if _out_size(h, kh, s, p) != ho or _out_size(w, kw, s, p) != wo:
            raise ShapeError(f"conv_input_grad: g {fmt_shape(g.shape)} is not the conv output "
                             f"of a {h}x{w} input (kernel {kh}x{kw}, stride {s}, padding {p})")
        return conv2d_input_grad(g, b, s, p, (h, w))

    def gradient(self, out_grad, node):
        g, b = node.inputs
        s, p = self.stride, self.padding
        grad_g = grad_b = None
        if g.requires_grad:
            grad_g = F.conv(out_grad, b, stride=s, padding=p)
        if b.requires_grad:
            grad_b = F.conv_weight_grad(out_grad, g, kernel_hw=(b.shape[0], b.shape[1]),
                                        stride=s, padding=p)
        return grad_g, grad_b

    def infer(self, g: Aval, b: Aval) -> Aval:
        _check_nhwc("conv_input_grad", "g", g.shape, "kernel b", b.shape)
        n, ho, wo, c_out = g.shape
        kh, kw, c_in, b_out = b.shape
        if c_out is not None and b_out is not None and c_out != b_out:
            raise ShapeError(f"conv_input_grad: g {fmt_shape(g.shape)} has {c_out} channels but "
                             f"the kernel {fmt_shape(b.shape)} has {b_out} outputs")
        h, w = self.in_hw if self.in_hw is not None else (None, None)
        if h is None and ho is not None:
            h = _in_size(ho, kh, self.stride, self.padding)
        if w is None and wo is not None:
            w = _in_size(wo, kw, self.stride, self.padding)
        return Aval((n, h, w, c_in), np.result_type(g.dtype, b.dtype))
