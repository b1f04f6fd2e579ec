"""2-D convolution (needle's layout: NHWC input, (kh, kw, C_in, C_out) weight) and its adjoints.

``conv`` is one matrix product over im2col patches. Its two gradients are primitives of their
own, each the adjoint of the other, so backward costs two matrix products of the forward's
size (no dilated zeros, no badly strided patch copies) and second derivatives still work:

    conv(a, b)                  y  = im2col(pad(a)) @ b            (N, Ho, Wo, C_out)
    conv_weight_grad(a, g)      Wb = im2col(pad(a)).T @ g          (kh, kw, C_in, C_out)
    conv_input_grad(g, b)       Xb = crop(col2im(g @ b.T))         (N, H, W, C_in)

with ``<conv(a, b), g> = <a, conv_input_grad(g, b)> = <b, conv_weight_grad(a, g)>``.

Float32 3x3 stride-1 convolutions with 8 or more channels take Winograd's F(4x4, 3x3)
instead (core/winograd.py: 4x fewer multiply-adds, blocked and threaded; the benchmark CNN's
step 132 -> 55 ms) where numba is installed; everything else, and float64, runs im2col,
split by images across needle's CPU threads where it pays (``_by_images``).

Results are stored channels-last (C-contiguous NHWC), whatever the layout of the inputs. An
NCHW model (nn.Conv permutes in and out) therefore keeps its activations channels-last behind
NCHW views, which is where im2col copies long runs (kw * C values) and col2im adds rows; the
BatchNorm ops and the reductions have channels-last paths (core/channels_last.py). Measured on
the benchmark CNN: 28.9 -> 25.1 ms per step against keeping NCHW memory. An input stored
channels-first (a user's NCHW images) with large maps is read by the NCHW im2col, which copies
runs of Wo values instead of transposing the input first.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module, cpu_threads
from . import api as F
from . import cpu_kernels, winograd
from .registry import Aval, Op, ShapeError, fmt_shape, register


def _out_size(n: int | None, k: int, stride: int, padding: int) -> int | None:
    return None if n is None else (n + 2 * padding - k) // stride + 1


def _in_size(n_out: int, k: int, stride: int, padding: int) -> int:
    """The smallest input size whose output has ``n_out`` positions (no leftover rows)."""
    return (n_out - 1) * stride + k - 2 * padding


def _padded(a, padding: int):
    """``a`` zero-padded by ``padding`` on both sides of H and W, as a C-contiguous array.

    NOTE: a non-contiguous view (the NCHW -> NHWC permute of nn.Conv) is copied to C order
    first even without padding: the im2col copy from it is 2-3x slower than the two copies.
    """
    xp = array_module(a)
    if not padding:
        return xp.ascontiguousarray(a)
    n, h, w, c = a.shape
    out = xp.zeros((n, h + 2 * padding, w + 2 * padding, c), dtype=a.dtype)
    out[:, padding:padding + h, padding:padding + w, :] = a
    return out


def _im2col(a, kh: int, kw: int, stride: int, padding: int):
    """Patches of the padded input as an (N * Ho * Wo, kh * kw * C) matrix, and (N, Ho, Wo).

    Row (n, y, x) holds the window ``a_pad[n, s*y : s*y + kh, s*x : s*x + kw, :]`` flattened
    in (i, j, c) order, the order of the kernel's first three axes.
    """
    a = _padded(a, padding)
    n, h, w, c = a.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    sn, sh, sw, sc = a.strides
    xp = array_module(a)
    patches = xp.lib.stride_tricks.as_strided(
        a, shape=(n, ho, wo, kh, kw, c), strides=(sn, sh * stride, sw * stride, sh, sw, sc))
    return patches.reshape(n * ho * wo, kh * kw * c), (n, ho, wo)


def _channels_first(x) -> bool:
    """Whether an NHWC array keeps its channels outside H and W in memory (an NCHW array seen
    through a permute, as nn.Conv passes it) rather than innermost."""
    return x.strides[3] > x.strides[2]


#: output positions per image from which the per-image (NCHW im2col) products pay
NCHW_MIN_POSITIONS = 256


def _use_nchw(x, positions: int) -> bool:
    """Read the input through the NCHW im2col: it is NCHW in memory and each image has enough
    positions for its own matrix product to be efficient (small maps do better transposed
    once and taken as one NHWC product)."""
    return _channels_first(x) and positions >= NCHW_MIN_POSITIONS


def _im2col_nchw(a, kh: int, kw: int, stride: int, padding: int):
    """Patches of an NHWC-viewed NCHW array as (N, C * kh * kw, Ho * Wo), and (Ho, Wo).

    Caffe's layout: one column per output position, rows in (c, i, j) order; it reads an
    NCHW array without transposing it.
    """
    xp = array_module(a)
    x = a.transpose(0, 3, 1, 2)  # the NCHW array itself
    n, c, h, w = x.shape
    if padding:
        padded = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=x.dtype)
        padded[:, :, padding:padding + h, padding:padding + w] = x
        x = padded
    else:
        x = xp.ascontiguousarray(x)
    ho, wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    sn, sc, sh, sw = x.strides
    patches = xp.lib.stride_tricks.as_strided(
        x, shape=(n, c, kh, kw, ho, wo), strides=(sn, sc, sh, sw, sh * stride, sw * stride))
    return patches.reshape(n, c * kh * kw, ho * wo), (ho, wo)


def _phase_range(r: int, s: int, p: int, n: int, nq: int) -> tuple[int, int]:
    """The phase-r positions y (0 <= y < nq) whose padded index s*y + r is an image position
    (0 <= s*y + r - p < n), as a range [y0, y1)."""
    return max(0, -(-(p - r) // s)), min(nq, (n - 1 + p - r) // s + 1)


def _check_nhwc(op: str, what: str, shape: tuple, other: str, other_shape: tuple) -> None:
    if len(shape) != 4 or len(other_shape) != 4:
        raise ShapeError(f"{op}: expected 4-d {what} and {other}, got {fmt_shape(shape)} and "
                         f"{fmt_shape(other_shape)}")


#: smallest multiply-add count for which an im2col convolution is split by images across
#: needle's CPU threads (smaller ones lose more to the hand-off than they gain)
SPLIT_MIN_MACS = 1 << 22


def _image_chunks(n: int, macs: int, *arrays) -> list[tuple[int, int]] | None:
    """Contiguous image ranges [s, e) for splitting a convolution of ``n`` images across
    needle's threads (backend/cpu_threads.py), two per thread so one that shares its core
    takes fewer; None to run it whole (one thread, a small problem, CuPy arrays, or no hold
    on BLAS's threads: concurrent products on OpenBLAS's own threads ran slower)."""
    parts = min(cpu_threads.NUM_THREADS, n)
    if (parts < 2 or macs < SPLIT_MIN_MACS or not cpu_threads.can_hold_blas()
            or any(type(x) is not np.ndarray for x in arrays)):
        return None
    count = min(n, 2 * parts)
    bounds = [n * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _by_images(images, chunks: list[tuple[int, int]] | None, n: int) -> list:
    """``images(s, e)`` for every chunk, on needle's threads with BLAS on one thread (or for
    all n images at once where ``chunks`` is None); the results in image order."""
    if chunks is None:
        return [images(0, n)]
    with cpu_threads.single_threaded_blas():
        done = cpu_threads.in_parallel(
            lambda shared: [(s, images(s, e)) for s, e in shared], chunks,
            min(cpu_threads.NUM_THREADS, len(chunks)))
    return [result for _, result in sorted((pair for part in done for pair in part),
                                           key=lambda pair: pair[0])]


@register("conv", inputs=("a", "b"))
class Conv(Op):
    """Cross-correlation of NHWC ``a`` with a (kh, kw, C_in, C_out) kernel ``b``.

    ``y[n, y, x, o] = sum_{i, j, c} a_pad[n, s*y + i, s*x + j, c] * b[i, j, c, o]``;
    symmetric zero ``padding``; output (N, (H + 2p - kh) // stride + 1, ..., C_out).
    Computed as one matrix product over im2col patches. The output is C-contiguous NHWC.
    """

    def __init__(self, stride: int = 1, padding: int = 0) -> None:
        self.stride = int(stride)
        self.padding = int(padding)

    def compute(self, a, b):
        kh, kw, c_in, c_out = b.shape
        if a.shape[3] != c_in:
            raise ShapeError(f"conv: input {fmt_shape(a.shape)} has {a.shape[3]} channels but "
                             f"the kernel {fmt_shape(b.shape)} expects {c_in}")
        if winograd.applies(a, b, (kh, kw), self.stride, self.padding, c_in, c_out):
            out = winograd.conv3x3(a, b, self.padding)
            if out is not None:
                return out
        n = a.shape[0]
        ho = _out_size(a.shape[1], kh, self.stride, self.padding)
        wo = _out_size(a.shape[2], kw, self.stride, self.padding)
        xp = array_module(a)
        out = xp.empty((n, ho, wo, c_out), np.result_type(a.dtype, b.dtype))
        if _use_nchw(a, ho * wo):
            # NCHW in memory: out (N, Ho*Wo, C_out) = cols.T @ W, per image, NHWC as it comes
            weight = b.transpose(2, 0, 1, 3).reshape(c_in * kh * kw, c_out)

            def images(s: int, e: int) -> None:
                cols, _ = _im2col_nchw(a[s:e], kh, kw, self.stride, self.padding)
                xp.matmul(cols.transpose(0, 2, 1), weight,
                          out=out[s:e].reshape(e - s, ho * wo, c_out))
        else:
            weight = b.reshape(-1, c_out)

            def images(s: int, e: int) -> None:
                cols, _ = _im2col(a[s:e], kh, kw, self.stride, self.padding)
                xp.matmul(cols, weight, out=out[s:e].reshape(-1, c_out))

        _by_images(images, _image_chunks(n, n * ho * wo * kh * kw * c_in * c_out, a, b), n)
        return out

    def gradient(self, out_grad, node):
        a, b = node.inputs
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


@register("conv_weight_grad", inputs=("a", "g"))
class ConvWeightGrad(Op):
    """The kernel adjoint of ``conv``: ``Wb = im2col(pad(a), stride).T @ g.reshape(-1, C_out)``.

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
        n, c_in = a.shape[0], a.shape[3]
        ho = _out_size(a.shape[1], kh, self.stride, self.padding)
        wo = _out_size(a.shape[2], kw, self.stride, self.padding)
        self._check_g(a, g, (n, ho, wo))
        c_out = g.shape[3]
        if winograd.applies(a, g, self.kernel_hw, self.stride, self.padding, c_in, c_out):
            out = winograd.conv3x3_weight_grad(a, g, self.padding)
            if out is not None:
                return out
        chunks = _image_chunks(n, n * ho * wo * kh * kw * c_in * c_out, a, g)
        if _use_nchw(a, ho * wo):
            def images(s: int, e: int):
                cols, _ = _im2col_nchw(a[s:e], kh, kw, self.stride, self.padding)
                if _channels_first(g):  # (N, C_out, HW) @ (N, HW, C*kh*kw), summed over images
                    grads = g[s:e].transpose(0, 3, 1, 2).reshape(e - s, c_out, ho * wo)
                    return np.matmul(grads, cols.transpose(0, 2, 1)).sum(axis=0).T
                # (N, C*kh*kw, HW) @ (N, HW, C_out)
                return np.matmul(cols, g[s:e].reshape(e - s, ho * wo, c_out)).sum(axis=0)

            parts = _by_images(images, chunks, n)
            return array_module(a).ascontiguousarray(
                sum(parts).reshape(c_in, kh, kw, c_out).transpose(1, 2, 0, 3))

        def images(s: int, e: int):
            cols, _ = _im2col(a[s:e], kh, kw, self.stride, self.padding)
            return cols.T @ g[s:e].reshape(-1, c_out)

        return sum(_by_images(images, chunks, n)).reshape(kh, kw, c_in, c_out)

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
    """The input adjoint of ``conv``: ``Xb = crop(col2im(g @ b.T))``.

    ``Xb[n, h, w, c] = sum_{y, x, i, j: s*y + i = h + p, s*x + j = w + p} g[n, y, x, o]
    * b[i, j, c, o]`` (summed over o); ``g`` (N, Ho, Wo, C_out), ``b`` (kh, kw, C_in, C_out)
    -> (N, H, W, C_in) with ``in_hw = (H, W)``, the conv input's size (None: the smallest
    input giving Ho x Wo). Linear in each input: its adjoints are ``conv(Xb_bar, b)`` for
    ``g`` and ``conv_weight_grad(Xb_bar, g)`` for ``b``.

    With numba (cpu_kernels): one product for all taps, then one compiled scatter pass
    (CNN step -17%); otherwise kh*kw thin products scattered by stride phase in NumPy.
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
        n, ho, wo, c_out = g.shape
        kh, kw, c_in, _ = b.shape
        h, w = self._input_hw(ho, wo, kh, kw)
        if _out_size(h, kh, s, p) != ho or _out_size(w, kw, s, p) != wo:
            raise ShapeError(f"conv_input_grad: g {fmt_shape(g.shape)} is not the conv output "
                             f"of a {h}x{w} input (kernel {kh}x{kw}, stride {s}, padding {p})")
        if c_out == b.shape[3] and winograd.applies(g, b, (kh, kw), s, p, c_in, c_out):
            out = winograd.conv3x3_input_grad(g, b, p)
            if out is not None:
                return out
        xp = array_module(g)
        dtype = np.result_type(g.dtype, b.dtype)
        hq, wq = -(-(h + 2 * p) // s), -(-(w + 2 * p) // s)
        if isinstance(g, np.ndarray) and isinstance(b, np.ndarray) and \
                cpu_kernels.enabled(dtype):
            # one matrix product for all kh*kw taps (c_in*kh*kw columns: a wider, faster
            # product than kh*kw thin ones), then one compiled scatter pass (numba)
            weights = b.transpose(3, 0, 1, 2).reshape(c_out, kh * kw * c_in)
            out = np.empty((n, h, w, c_in), dtype)

            def images(start: int, end: int) -> bool:
                taps = np.matmul(g[start:end].reshape(-1, c_out), weights, dtype=dtype)
                return cpu_kernels.col2im(taps, (end - start, h, w, c_in), ho, wo, kh, kw, s,
                                          p, out=out[start:end]) is not None

            chunks = _image_chunks(n, n * ho * wo * kh * kw * c_in * c_out, g, b)
            if all(_by_images(images, chunks, n)):
                return out
        g2 = g.reshape(n * ho * wo, c_out)  # a copy when g is stored channels-first
        # Padded rows/cols y = s*y' + i are split by phase (y mod s): phase (i % s, j % s)
        # receives tap (i, j) as one slice with contiguous rows, so each of the kh*kw
        # scatter-adds runs over long contiguous runs instead of C-element pieces.
        phases = xp.zeros((s, s, n, hq, wq, c_in), dtype=dtype)
        for i in range(kh):
            for j in range(kw):
                tap = (g2 @ b[i, j].T).reshape(n, ho, wo, c_in)
                phases[i % s, j % s, :, i // s:i // s + ho, j // s:j // s + wo, :] += tap
        if s == 1:
            padded = phases[0, 0]
            return padded if p == 0 and (hq, wq) == (h, w) else \
                xp.ascontiguousarray(padded[:, p:p + h, p:p + w, :])
        # interleave the phases into the cropped result: padded row s*y + r is image row
        # s*y + r - p (one strided assignment per phase)
        out = xp.empty((n, h, w, c_in), dtype=dtype)
        for r in range(s):
            y0, y1 = _phase_range(r, s, p, h, hq)
            for t in range(s):
                x0, x1 = _phase_range(t, s, p, w, wq)
                if y1 > y0 and x1 > x0:
                    out[:, s * y0 + r - p:s * (y1 - 1) + r - p + 1:s,
                        s * x0 + t - p:s * (x1 - 1) + t - p + 1:s] = phases[r, t, :, y0:y1, x0:x1]
        return out  # every position is covered: s * hq >= h + 2p (zeros where no tap lands)

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
