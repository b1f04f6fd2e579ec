"""Max pooling over k x k windows of NCHW arrays (any memory layout), and its two adjoints.

The windows are read as k*k strided views of the input, one per offset (i, j) in the window,
each (N, C, Ho, Wo): an elementwise maximum over the views is the pooled output, in k*k - 1
ufunc calls that keep the input's memory order (channels-last stays channels-last). Reducing
a (..., k, ..., k) view over its small strided axes instead was ~10x slower in NumPy.

The gradient goes to the FIRST maximum of each window in row-major window order, as
PyTorch's CPU kernel does (``argmax`` semantics), so a window with tied maxima sends all of
its gradient to one input, never to both (a NaN is a window's maximum, as in torch):

    scatter(x, y, g)  dx[window w's first argmax] += g[w]        (N, C, H, W)
    gather(x, y, a)   b[w] = a[window w's first argmax]          (N, C, Ho, Wo)

The two are each other's adjoint for a fixed x: <scatter(x, y, g), a> = <g, gather(x, y, a)>.
``y`` is the pooled output of ``x`` (passed in, not recomputed). On channels-last float
arrays (nn.Conv's outputs) with numba, the pool and its scatter are one compiled pass each
(cpu_kernels.py); the NumPy views below are the reference and the fallback.
"""

from __future__ import annotations

from typing import Any

from ..backend.device import array_module as _array_module
from . import cpu_kernels


def out_size(n: int, k: int, stride: int) -> int:
    """Output positions along an axis of ``n`` (no padding, floor mode)."""
    return (n - k) // stride + 1


def _views(x: Any, k: int, stride: int, ho: int, wo: int) -> list:
    """The k*k strided views of ``x``, one per window offset, in row-major window order."""
    h_end, w_end = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    return [x[:, :, i: i + h_end: stride, j: j + w_end: stride]
            for i in range(k) for j in range(k)]


def max_pool(x: Any, k: int, stride: int) -> Any:
    """The maximum of each k x k window (stride ``stride``) of NCHW ``x``."""
    xp = _array_module(x)
    ho, wo = out_size(x.shape[2], k, stride), out_size(x.shape[3], k, stride)
    compiled = cpu_kernels.max_pool(x, k, stride, ho, wo)
    if compiled is not None:
        return compiled
    views = _views(x, k, stride, ho, wo)
    if len(views) == 1:
        return views[0].copy()
    out = xp.maximum(views[0], views[1])
    for view in views[2:]:
        xp.maximum(out, view, out=out)
    return out


def _first_argmax_masks(x: Any, y: Any, k: int, stride: int):
    """For each window offset: (view of x, mask of windows whose first maximum is there)."""
    xp = _array_module(x)
    views = _views(x, k, stride, y.shape[2], y.shape[3])
    taken = xp.zeros(y.shape, dtype=bool)
    for index, view in enumerate(views):
        hit = view == y
        if view.dtype.kind == "f":  # a NaN is its window's maximum (y is NaN there), as torch
            hit |= view != view
        if index:
            hit &= ~taken
        if index < len(views) - 1:
            taken |= hit
        yield index, hit


def max_pool_scatter(x: Any, y: Any, g: Any, k: int, stride: int) -> Any:
    """``g`` (N, C, Ho, Wo) added into zeros like ``x`` at each window's first maximum."""
    compiled = cpu_kernels.max_pool_scatter(x, y, g, k, stride)
    if compiled is not None:
        return compiled
    xp = _array_module(x)
    dx = xp.zeros_like(x, dtype=g.dtype)  # the input's memory order (channels-last stays)
    ho, wo = y.shape[2], y.shape[3]
    targets = _views(dx, k, stride, ho, wo)
    overlapping = stride < k
    for index, hit in _first_argmax_masks(x, y, k, stride):
        picked = xp.where(hit, g, 0)
        if overlapping:
            targets[index] += picked
        else:  # each input position is in one window only
            targets[index][...] = picked
    return dx


def max_pool_gather(x: Any, y: Any, a: Any, k: int, stride: int) -> Any:
    """``a`` (shaped like ``x``) read at each window's first maximum: (N, C, Ho, Wo)."""
    xp = _array_module(x)
    ho, wo = y.shape[2], y.shape[3]
    sources = _views(a, k, stride, ho, wo)
    out = xp.zeros(y.shape, dtype=a.dtype)
    for index, hit in _first_argmax_masks(x, y, k, stride):
        xp.copyto(out, sources[index], where=hit)
    return out


__all__ = ["max_pool", "max_pool_gather", "max_pool_scatter", "out_size"]
