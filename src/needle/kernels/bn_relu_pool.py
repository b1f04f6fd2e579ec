"""A ``BatchNorm2d -> ReLU -> max pool`` block's two kernels (core/ops_batchnorm_relu_pool.py):

- ``forward``: ``max_pool2d(relu(batch_norm(x)))`` in one pass over x, the activation made
  where the pool reads it (never stored); the bits of max_pool2d's compiled loop over the
  activation, made with BatchNorm's compiled constants (conv_bn_relu.alpha_beta), as the
  plan's fused BatchNorm + ReLU region rounds it;
- ``backward``: the gradient reaching x through the pool, the ReLU and the BatchNorm,
  ``batch_norm_relu_grad(max_pool2d_scatter(activation, y, g), x, ...)``. Its first pass
  runs per row block of x (whole images): the block's scattered gradient, the activation
  recomputed from x (so it is not read), then at once batch_norm_relu_grad's sums over the
  block while it is in cache; then batchnorm_relu.py's constants and dx pass. The scatter's
  compute stays (per window: the first maximum); what goes is the activation's read and a
  full-size read of the scattered gradient from memory.

Bits: the ops' own where batchnorm_relu.py's loops would run (the same row blocks,
cpu_kernels.row_blocks, the same loops over them, the same per-channel constants).
Elsewhere (no numba, other layouts or dtypes, BatchNorm statistics that batchnorm_relu.py
would not take, row blocks that split an image) ``forward`` / ``backward`` return None and
the caller computes the ops.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend.numba_support import NumbaLoops
from . import batchnorm_relu, conv_bn_relu, cpu_kernels
from .pool import out_size
from .reduce import stat_matrix

__all__ = ["backward", "forward", "takes"]

_loops = NumbaLoops("needle.kernels.numba_bn_relu_pool")


def takes(x_shape: tuple) -> bool:
    """Whether a compiled plan should fuse the block of NCHW activation ``x_shape``: known,
    4-d, with numba here (the loops may still decline the arrays at run time, as
    ``forward`` and ``backward`` say; the ops then compute what they replace)."""
    return len(x_shape) == 4 and None not in x_shape and _loops.module() is not None


def _channels_last(a: Any, dtype: Any) -> np.ndarray | None:
    """An NCHW array's NHWC memory as a C-contiguous array (a copy where it is stored
    otherwise, as cpu_kernels.max_pool_scatter reads y and g), or None if not NumPy."""
    if type(a) is not np.ndarray or a.ndim != 4 or a.dtype != dtype:
        return None
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def _vectors(dtype: Any, c: int, *values: Any) -> list[np.ndarray] | None:
    out = []
    for v in values:
        if type(v) is not np.ndarray or v.dtype != dtype or v.size != c:
            return None
        out.append(np.ascontiguousarray(v).reshape(-1))
    return out


def backward(g: Any, y: Any, x: Any, weight: Any, bias: Any, mean: Any, var: Any, eps: float,
             k: int, stride: int) -> tuple | None:
    """``(dx, dweight, dbias)``: batch_norm_relu_grad(max_pool2d_scatter(relu(batch_norm(x)),
    y, g), x, ...) for an NCHW view ``x`` of NHWC memory, BatchNorm over (0, 2, 3) with batch
    ``mean`` and ``var``, ``y`` the k x k pool (``stride``) of the activation and ``g`` its
    gradient; None where the fused loops do not run (see the module docstring)."""
    if (type(x) is not np.ndarray or x.ndim != 4 or not cpu_kernels.enabled(x.dtype)
            or x.size == 0 or _loops.module() is None):
        return None
    found = stat_matrix(x, (0, 2, 3))
    n, c, h, w = x.shape
    if found is None or found[0] != 1 or found[1].shape != (n * h * w, c):
        return None
    xm = found[1]
    x4 = xm.reshape(n, h, w, c)
    gt, yt = _channels_last(g, x.dtype), _channels_last(y, x.dtype)
    vectors = _vectors(x.dtype, c, mean, var, weight, bias)
    if gt is None or yt is None or vectors is None or gt.shape != yt.shape:
        return None
    mean_v, var_v, weight_v, bias_v = vectors
    m = xm.shape[0]
    inv, alpha, beta = batchnorm_relu.forward_constants(mean_v, var_v, weight_v, bias_v, eps)
    # batch_norm_relu_grad's row blocks (one block where its sums run whole); each block's
    # images get their scattered gradient in the block's pass, so blocks hold whole images
    bounds = cpu_kernels.row_blocks(xm)
    whole = np.array([0, m], np.int64)
    if bounds is not None and np.any(bounds % (h * w)):
        return None
    tiled = (stride == k and (h - k) % stride == 0 and (w - k) % stride == 0
             and gt.shape[1] == (h - k) // stride + 1 and gt.shape[2] == (w - k) // stride + 1)
    s4 = np.empty_like(x4) if tiled else np.zeros_like(x4)  # (tiled: all written)
    sm = s4.reshape(m, c)
    module = _loops.module()
    parts = np.empty((2, 1 if bounds is None else len(bounds) - 1, c), np.float64)
    args = (gt, yt, x4, xm, alpha, beta, mean_v, int(k), int(stride), s4, sm, parts[0], parts[1])
    if bounds is None:
        if not _loops.call(module.bn_relu_pool_grad_sums_blocks, *args, whole, 0, 1):
            return None
    elif not cpu_kernels.run_in_blocks("bn_relu_pool_grad_sums", bounds, xm.size, args,
                                       module.bn_relu_pool_grad_sums_blocks, _loops.call):
        return None
    constants = batchnorm_relu.grad_constants(parts, inv, weight_v, m, x.dtype)
    if constants is None:
        return None
    b, kk, dweight, dbias = constants
    dxm = np.empty_like(xm)
    if batchnorm_relu.dx_pass(sm, 1, xm, alpha, beta, mean_v, b, kk, bounds, dxm) is None:
        return None
    dx = dxm.reshape(n, h, w, c).transpose(0, 3, 1, 2)
    return dx, dweight.reshape(weight.shape), dbias.reshape(weight.shape)


def forward(x: Any, weight: Any, bias: Any, mean: Any, var: Any, eps: float, k: int,
            stride: int) -> np.ndarray | None:
    """``max_pool2d(relu(batch_norm(x)))`` of an NCHW view ``x`` of float32 NHWC memory
    (statistics over (0, 2, 3), C values each), k x k windows moved by ``stride``: an NCHW
    view of NHWC memory, as max_pool2d returns it; None where the loops do not run."""
    if (type(x) is not np.ndarray or x.ndim != 4 or x.dtype != np.float32 or x.size == 0
            or not x.transpose(0, 2, 3, 1).flags.c_contiguous or _loops.module() is None):
        return None
    xt = x.transpose(0, 2, 3, 1)
    constants = conv_bn_relu.alpha_beta(xt, weight, bias, mean, var, eps)
    if constants is None:
        return None
    n, h, w, c = xt.shape
    out = np.empty((n, out_size(h, k, stride), out_size(w, k, stride), c), x.dtype)
    module = _loops.module()
    args = (xt, *constants, int(k), int(stride), out)
    bounds = cpu_kernels.row_blocks(xt)  # (max_pool's: blocks of whole images)
    if bounds is None:
        done = _loops.call(module.bn_relu_max_pool, *args)
    else:
        done = cpu_kernels.run_in_blocks("bn_relu_max_pool", bounds, xt.size, args,
                                         module.bn_relu_max_pool_blocks, _loops.call)
    return out.transpose(0, 3, 1, 2) if done else None
