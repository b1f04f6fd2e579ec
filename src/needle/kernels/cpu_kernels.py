"""Compiled CPU kernels (BatchNorm family, conv's col2im), used where numba is installed.

BatchNorm's statistics, its affine map and its backward are a few reductions and elementwise
passes over an (M, C) channel matrix (M = N*H*W rows of C channels). In NumPy each pass is a
call and a trip through memory: five to a dozen per op, and on the small activations of an
MLP (100 x 50) the calls cost more than the arithmetic. These loops read each input once or
twice. They are the same formulas as the NumPy paths in reduce.py / batchnorm.py, which stay the
reference and the fallback (no numba, CuPy arrays, other layouts); sums accumulate in float64,
so results agree with NumPy's float32 sums to rounding, not bit for bit.

``column_sums`` sums a channel matrix's columns (Mean and SumTo on channels-last arrays)
without BLAS: see its NOTE on OpenBLAS's spinning worker thread.

``col2im`` is conv_input_grad's scatter: after one matrix product for all kernel taps, each
tap row is added into the input gradient in one pass, where NumPy needs kh*kw strided
scatter-adds after kh*kw thin products (CNN step 23.3 -> 19.3 ms with strides 1,2,2,
179 -> 146 ms with stride 1, measured in one process).

Measured in one process, kernels on and off in turn (2 cores, 2 BLAS threads): the MLP-ResNet
step 2.28 -> 2.16 ms eager and 1.45 -> 1.35 ms under ndl.jit, the CNN step (strides 1,2,2)
23.3 -> 21.4 ms. Loops run on one thread: a second thread pool beside OpenBLAS's fights it
for the cores (see compiler/fused_update.py).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ..backend.numba_support import numba_module

__all__ = ["batch_norm_grad", "col2im", "column_affine", "column_moments", "column_sums",
           "enabled", "max_pool", "max_pool_scatter"]


@functools.lru_cache(maxsize=1)
def _kernels() -> dict[str, Any] | None:
    """The compiled loops, or None without numba. They live in numba_kernels.py, imported
    only here (numba's import costs ~0.2 s) and cached on disk by numba after their first
    compilation (~1 s), so later processes load them."""
    if numba_module() is None:
        return None
    from . import numba_kernels

    return {"moments": numba_kernels.moments, "column_sums": numba_kernels.column_sums,
            "affine": numba_kernels.affine,
            "bn_grad": numba_kernels.bn_grad, "col2im_add": numba_kernels.col2im_add,
            "max_pool": numba_kernels.max_pool_nhwc,
            "max_pool_scatter": numba_kernels.max_pool_scatter_nhwc}


def _run(name: str, *args: Any) -> bool:
    """Call kernel ``name``; False (nothing written) if numba fails to compile it here, after
    which the NumPy paths are used for the rest of the process."""
    kernels = _kernels()
    assert kernels is not None  # (callers check enabled() first)
    try:
        kernels[name](*args)
    except numba_module().core.errors.NumbaError:  # compilation fails before anything runs
        _disabled.append(name)
        return False
    return True


#: kernels numba could not compile in this process (the NumPy paths run instead)
_disabled: list[str] = []


def enabled(dtype: Any) -> bool:
    """Whether the kernels run for arrays of ``dtype`` here (numba present, float32/float64)."""
    return dtype in (np.float32, np.float64) and not _disabled and _kernels() is not None


def _usable(*matrices: Any) -> bool:
    """Whether the kernels can take these (M, C) matrices: C-contiguous float32/float64 NumPy
    arrays of one dtype, and numba present."""
    first = matrices[0]
    for matrix in matrices:
        if (type(matrix) is not np.ndarray or matrix.ndim != 2 or matrix.dtype != first.dtype
                or not matrix.flags.c_contiguous):
            return False
    return enabled(first.dtype)


def _vector(values: Any, dtype: Any) -> np.ndarray:
    """Per-column constants as a contiguous (C,) array of ``dtype``."""
    if type(values) is np.ndarray and values.dtype == dtype and values.flags.c_contiguous:
        return values.reshape(-1)
    return np.ascontiguousarray(np.asarray(values, dtype=dtype).reshape(-1))


def column_moments(xm: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, biased variance) of each column of ``xm``, or None where the kernels cannot run."""
    if not _usable(xm) or xm.shape[0] == 0:
        return None
    mean = np.empty(xm.shape[1], xm.dtype)
    var = np.empty(xm.shape[1], xm.dtype)
    return (mean, var) if _run("moments", xm, mean, var) else None


def column_sums(xm: np.ndarray) -> np.ndarray | None:
    """The sum of each column of ``xm`` (float64 sums), or None where the kernels cannot run.

    NOTE: the NumPy path's BLAS product with a ones vector is as fast on one core, but it is
    large enough for OpenBLAS to wake its worker threads, which then spin for ~0.1 s and take
    the second core from the Winograd convolutions' threads (CNN step 77 -> ~60 ms).
    """
    if not _usable(xm):
        return None
    out = np.empty(xm.shape[1], xm.dtype)
    return out if _run("column_sums", xm, out) else None


def column_affine(xm: np.ndarray, scale: Any, shift: Any) -> np.ndarray | None:
    """``xm * scale + shift`` with per-column constants, or None where the kernels cannot run."""
    if not _usable(xm):
        return None
    out = np.empty_like(xm)
    done = _run("affine", xm, _vector(scale, xm.dtype), _vector(shift, xm.dtype), out)
    return out if done else None


def batch_norm_grad(gm: np.ndarray, xm: np.ndarray, mean: Any, inv: Any, weight: Any
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(dx, dweight, dbias) of BatchNorm over the rows of the (M, C) matrices ``gm`` (output
    gradient) and ``xm`` (input), given per-column ``mean`` and ``inv = 1 / sqrt(var + eps)``;
    None where the kernels cannot run."""
    if not _usable(gm, xm) or xm.shape[0] == 0:
        return None
    c = xm.shape[1]
    dx = np.empty_like(xm)
    dweight = np.empty(c, xm.dtype)
    dbias = np.empty(c, xm.dtype)
    done = _run("bn_grad", gm, xm, _vector(mean, xm.dtype), _vector(inv, xm.dtype),
                _vector(weight, xm.dtype), dx, dweight, dbias)
    return (dx, dweight, dbias) if done else None


def col2im(taps: np.ndarray, out_shape: tuple, ho: int, wo: int, kh: int, kw: int, stride: int,
           padding: int, out: np.ndarray | None = None) -> np.ndarray | None:
    """The adjoint of im2col: ``taps`` (N*Ho*Wo, kh*kw*C), one row of kernel-tap values per
    output position, summed into a zeroed (N, H, W, C) array at the input positions they came
    from (one pass; conv_input_grad's scatter): ``out`` (C-contiguous, overwritten) or a new
    one. None where the kernels cannot run."""
    if not _usable(taps) or (out is not None and (
            type(out) is not np.ndarray or out.dtype != taps.dtype
            or not out.flags.c_contiguous)):
        return None
    if out is None:
        out = np.empty(out_shape, taps.dtype)
    return out if _run("col2im_add", taps, ho, wo, kh, kw, stride, padding, out) else None


def _channels_last(x: Any) -> bool:
    """A float NumPy NCHW array whose memory is NHWC (C-contiguous behind the NCHW view),
    as nn.Conv's outputs are: the pool loops read it in order."""
    return (type(x) is np.ndarray and x.ndim == 4 and enabled(x.dtype)
            and x.transpose(0, 2, 3, 1).flags.c_contiguous)


def max_pool(x: np.ndarray, k: int, stride: int, ho: int, wo: int) -> np.ndarray | None:
    """Max pooling of channels-last NCHW ``x`` in one pass (an NCHW view of NHWC memory), or
    None where the loop cannot run (other layouts, dtypes, no numba)."""
    if not _channels_last(x):
        return None
    n, c = x.shape[0], x.shape[1]
    out = np.empty((n, ho, wo, c), x.dtype)
    done = _run("max_pool", x.transpose(0, 2, 3, 1), k, stride, out)
    return out.transpose(0, 3, 1, 2) if done else None


def max_pool_scatter(x: np.ndarray, y: np.ndarray, g: np.ndarray, k: int, stride: int
                     ) -> np.ndarray | None:
    """Max pooling's input gradient in one pass over channels-last arrays, or None."""
    if not (_channels_last(x) and type(y) is np.ndarray and type(g) is np.ndarray
            and y.dtype == x.dtype and g.dtype == x.dtype):
        return None
    shape = (x.shape[0], x.shape[2], x.shape[3], x.shape[1])
    h, w = x.shape[2], x.shape[3]
    tiled = stride == k and (h - k) % stride == 0 and (w - k) % stride == 0
    dx = np.empty(shape, x.dtype) if tiled else np.zeros(shape, x.dtype)  # (tiled: all written)
    done = _run("max_pool_scatter", x.transpose(0, 2, 3, 1), y.transpose(0, 2, 3, 1),
                g.transpose(0, 2, 3, 1), k, stride, dx)
    return dx.transpose(0, 3, 1, 2) if done else None

