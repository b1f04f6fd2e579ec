"""Compiled CPU kernels (BatchNorm family, conv's col2im), used where numba is installed.

BatchNorm's statistics, its affine map and its backward are a few reductions and elementwise
passes over an (M, C) channel matrix (M = N*H*W rows of C channels). In NumPy each pass is a
call and a trip through memory: five to a dozen per op, and on the small activations of an
MLP (100 x 50) the calls cost more than the arithmetic. These loops read each input once or
twice. They are the same formulas as the NumPy paths in reduce.py / batchnorm.py, which stay the
reference and the fallback (no numba, CuPy arrays, other layouts); sums accumulate in float64,
so results agree with NumPy's float32 sums to rounding, not bit for bit.

``column_statistics`` takes BatchNorm's batch mean and variance in one pass (float64 sums of
the values shifted by the first row, see its docstring); ``batch_norm_forward`` and
``batch_norm_grad_given_var`` are BatchNorm's forward and backward as one call each, their
per-channel constants computed inside in the arrays' dtype (bit-identical to the NumPy
formulas and to ``batch_norm_grad``): on an MLP's (100, 50) activations the NumPy calls for
those constants cost more than the pass.

``column_sums`` sums a channel matrix's columns (Mean and SumTo on channels-last arrays)
without BLAS: see its NOTE on OpenBLAS's spinning worker thread.

``col2im`` is conv_input_grad's scatter: after one matrix product for all kernel taps, each
tap row is added into the input gradient in one pass, where NumPy needs kh*kw strided
scatter-adds after kh*kw thin products (CNN step 23.3 -> 19.3 ms with strides 1,2,2,
179 -> 146 ms with stride 1, measured in one process).

Measured in one process, kernels on and off in turn (2 cores, 2 BLAS threads): the MLP-ResNet
step 2.28 -> 2.16 ms eager and 1.45 -> 1.35 ms under ndl.jit, the CNN step (strides 1,2,2)
23.3 -> 21.4 ms. numba's own ``parallel=True`` pool is not used: beside OpenBLAS's it fought
for the cores (see compiler/fused_update.py). Instead, on matrices of SPLIT_MIN_ELEMENTS or
more, BatchNorm's passes, the column sums (Mean and SumTo on channels-last arrays) and the
max-pool loops run in row (image) blocks that needle's CPU threads draw
(backend/cpu_threads.run_chunks, which never waits for a thread that has not started): on
two cores they were serial work beside the threaded convolutions. Idle-machine step times
estimated from CPU times (benchmarks/ab_cnn_step.py --estimate, 2 threads, best of 24 steps,
splitting from 2**18 elements): CNN strides 1,1,1 89 -> 79 ms (the main thread's serial work
55 -> 30 ms), strides 1,2,2 24.5 -> 22.7, ResidualCNN 32x32x3 38.4 -> 32.8, 28x28x1 32.4 ->
29.4. From 2**20 (SPLIT_MIN_ELEMENTS, see its NOTE) the ResidualCNN rows gain less (q25 of
10 steps: 32x32x3 40.5 -> 40.5, 28x28x1 36.8 -> 35.4; strides 1,2,2 28.6 -> 26.9). The split
halves the serial work, but the two threads' passes share the memory bandwidth (their CPU
time grows by about half), and on a loaded machine no wall-time gain could be seen. The
blocks depend on the shape only and their float64 sums are added in block order, so the
result does not depend on the thread count (float32 results matched the unsplit loops' bit
for bit on 65536 x 64 and 1000 x 300).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from ..backend import cpu_threads
from ..backend.numba_support import numba_module

__all__ = ["batch_norm_forward", "batch_norm_grad", "batch_norm_grad_given_var", "col2im",
           "column_affine", "column_moments", "column_statistics", "column_sums", "enabled",
           "im2col", "im2col_channels_first", "max_pool", "max_pool_scatter", "splits",
           "whole_batch_norm_forward", "whole_batch_norm_grad", "whole_column_statistics"]


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
            "im2col_rows": numba_kernels.im2col_rows,
            "im2col_channels_first": numba_kernels.im2col_channels_first,
            "one_pass_moments": numba_kernels.one_pass_moments,
            "bn_forward": numba_kernels.bn_forward, "bn_grad_var": numba_kernels.bn_grad_var,
            "shifted_sums": numba_kernels.shifted_sums,
            "centered_square_sums": numba_kernels.centered_square_sums,
            "bn_grad_sums": numba_kernels.bn_grad_sums, "bn_grad_dx": numba_kernels.bn_grad_dx,
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


#: smallest (M, C) matrix, in elements, whose BatchNorm passes run in row blocks shared by
#: needle's CPU threads (backend/cpu_threads.py); smaller ones run whole on one thread.
#: NOTE: on a loaded machine (load ~3.5 on 2 cores) a split affine pass took 0.135 ms where
#: one thread took 0.067 on 2**18 elements, 0.40 vs 0.32 on 2**20, 1.34 vs 1.22 on 2**22 (best
#: of 40); the split pays only where the second core is free. Set it above any array's size
#: to turn the split off.
SPLIT_MIN_ELEMENTS = 1 << 20

#: elements per row block of a split pass (4 MB of float32)
BLOCK_ELEMENTS = 1 << 20


def _row_blocks(xm: np.ndarray) -> list[tuple[int, int]] | None:
    """Ranges [s, e) of ``xm``'s first axis (rows; images for the pools) that split the
    passes over it (None: run it whole). They depend on the shape only, so the float64 block
    sums, added in block order, give the same result on any number (2 or more) of threads;
    one thread runs the unsplit loops, whose float64 sums differ from them only by rounding.

    NOTE: blocks of 2**20 elements: with 2**18 the extra kernel calls and partial sums cost
    ~10% more CPU time (BatchNorm's three kernels on a 65536 x 64 matrix, run blocked on one
    thread: 9.3 ms, unsplit 8.6, 2**20-element blocks 8.6)."""
    m = xm.shape[0]
    if xm.size < SPLIT_MIN_ELEMENTS or m < 2 or cpu_threads.NUM_THREADS < 2:
        return None
    count = min(m, max(2, xm.size // BLOCK_ELEMENTS))
    bounds = [m * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def splits(xm: np.ndarray) -> bool:
    """Whether the passes over ``xm`` run in row blocks on needle's threads (``_row_blocks``)."""
    return _row_blocks(xm) is not None


def _run_blocks(name: str, blocks: list[tuple[int, int]],
                args_of: Callable[[int, int, int], tuple]) -> bool:
    """Kernel ``name`` on ``args_of(i, s, e)`` for every row block i = [s, e), the blocks
    shared by needle's threads; False (the NumPy paths from then on) if numba fails to
    compile it here."""
    kernels = _kernels()
    assert kernels is not None
    kernel = kernels[name]
    try:
        cpu_threads.run_chunks(lambda i: kernel(*args_of(i, *blocks[i])), len(blocks),
                               cpu_threads.NUM_THREADS)
    except numba_module().core.errors.NumbaError:
        _disabled.append(name)
        return False
    return True


def _block_sums(name: str, blocks: list[tuple[int, int]], c: int, matrices: tuple,
                *per_column: np.ndarray, outputs: int = 1) -> list[np.ndarray] | None:
    """Float64 column sums of ``outputs`` kinds from kernel ``name`` over each row block of
    ``matrices`` (plus the ``per_column`` constants), added in block order."""
    parts = np.empty((outputs, len(blocks), c), np.float64)

    def args_of(i: int, s: int, e: int) -> tuple:
        return (*(mat[s:e] for mat in matrices), *per_column,
                *(parts[k, i] for k in range(outputs)))

    if not _run_blocks(name, blocks, args_of):
        return None
    return [np.add.reduce(parts[k], axis=0) for k in range(outputs)]


def column_moments(xm: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, biased variance) of each column of ``xm``, or None where the kernels cannot run.
    Large matrices take two passes in row blocks on needle's threads (``_row_blocks``)."""
    if not _usable(xm) or xm.shape[0] == 0:
        return None
    m, c = xm.shape
    mean = np.empty(c, xm.dtype)
    var = np.empty(c, xm.dtype)
    blocks = _row_blocks(xm)
    if blocks is None:
        return (mean, var) if _run("moments", xm, mean, var) else None
    sums = _block_sums("column_sums", blocks, c, (xm,))
    if sums is None:
        return None
    mean[:] = sums[0] / m  # the same float64 sum / m, rounded to xm's dtype, as "moments"
    squares = _block_sums("centered_square_sums", blocks, c, (xm,), mean)
    if squares is None:
        return None
    var[:] = squares[0] / m
    return mean, var


def _shape_blocks(xm: np.ndarray) -> list[tuple[int, int]] | None:
    """``_row_blocks`` on any number of threads: row blocks of large matrices that depend on
    the shape alone (one thread runs them in turn), so sums over them do not depend on the
    thread count either."""
    m = xm.shape[0]
    if xm.size < SPLIT_MIN_ELEMENTS or m < 2:
        return None
    count = min(m, max(2, xm.size // BLOCK_ELEMENTS))
    bounds = [m * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def column_statistics(xm: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, biased variance) of each column of ``xm`` in one pass over it (BatchNorm's batch
    statistics), or None where the kernels cannot run.

    float32: float64 sums of ``x - x[0]`` and its square (the shift keeps the subtraction
    ``sum(d*d) - sum(d)**2 / m`` from cancelling for data far from 0; float32 values and their
    squares are exact in float64), so the result matches the two-pass one to float32
    rounding (~1e-7 relative). float64: ``column_moments``'s two passes, where that rounding
    would show. Large matrices sum row blocks fixed by the shape on needle's threads, added
    in block order: the same result on any number of threads.
    """
    if not _usable(xm) or xm.shape[0] == 0:
        return None
    if xm.dtype != np.float32:
        return column_moments(xm)
    blocks = _shape_blocks(xm)
    if blocks is None:
        return whole_column_statistics(xm)
    m, c = xm.shape
    mean = np.empty(c, xm.dtype)
    var = np.empty(c, xm.dtype)
    shift = xm[0].astype(np.float64)
    sums = _block_sums("shifted_sums", blocks, c, (xm,), shift, outputs=2)
    if sums is None:
        return None
    s1, s2 = sums  # the arithmetic of numba_kernels.one_pass_moments
    mean[:] = shift + s1 / m
    var[:] = np.maximum(s2 - s1 * (s1 / m), 0.0) / m
    return mean, var


def whole_column_statistics(xm: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``column_statistics`` of a matrix the caller checked: ``_usable``, rows, not split
    (batchnorm.py's hot case: one kernel call and the fewest Python steps)."""
    c = xm.shape[1]
    mean = np.empty(c, xm.dtype)
    var = np.empty(c, xm.dtype)
    kernel = "one_pass_moments" if xm.dtype == np.float32 else "moments"
    return (mean, var) if _run(kernel, xm, mean, var) else None


def column_sums(xm: np.ndarray) -> np.ndarray | None:
    """The sum of each column of ``xm`` (float64 sums), or None where the kernels cannot run.

    NOTE: the NumPy path's BLAS product with a ones vector is as fast on one core, but it is
    large enough for OpenBLAS to wake its worker threads, which then spin for ~0.1 s and take
    the second core from the Winograd convolutions' threads (CNN step 77 -> ~60 ms).
    """
    if not _usable(xm):
        return None
    out = np.empty(xm.shape[1], xm.dtype)
    blocks = _row_blocks(xm)
    if blocks is None:
        return out if _run("column_sums", xm, out) else None
    sums = _block_sums("column_sums", blocks, xm.shape[1], (xm,))
    if sums is None:
        return None
    out[:] = sums[0]
    return out


def column_affine(xm: np.ndarray, scale: Any, shift: Any) -> np.ndarray | None:
    """``xm * scale + shift`` with per-column constants, or None where the kernels cannot run."""
    if not _usable(xm):
        return None
    out = np.empty_like(xm)
    scale, shift = _vector(scale, xm.dtype), _vector(shift, xm.dtype)
    blocks = _row_blocks(xm)
    if blocks is None:
        done = _run("affine", xm, scale, shift, out)
    else:
        done = _run_blocks("affine", blocks, lambda _, s, e: (xm[s:e], scale, shift, out[s:e]))
    return out if done else None


def batch_norm_grad(gm: np.ndarray, xm: np.ndarray, mean: Any, inv: Any, weight: Any
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(dx, dweight, dbias) of BatchNorm over the rows of the (M, C) matrices ``gm`` (output
    gradient) and ``xm`` (input), given per-column ``mean`` and ``inv = 1 / sqrt(var + eps)``;
    None where the kernels cannot run."""
    if not _usable(gm, xm) or xm.shape[0] == 0:
        return None
    m, c = xm.shape
    dx = np.empty_like(xm)
    dweight = np.empty(c, xm.dtype)
    dbias = np.empty(c, xm.dtype)
    mean, inv, weight = (_vector(v, xm.dtype) for v in (mean, inv, weight))
    blocks = _row_blocks(xm)
    if blocks is None:
        done = _run("bn_grad", gm, xm, mean, inv, weight, dx, dweight, dbias)
        return (dx, dweight, dbias) if done else None
    sums = _block_sums("bn_grad_sums", blocks, c, (gm, xm), mean, outputs=2)
    if sums is None:
        return None
    sum_g, sum_gc = sums
    # the coefficients in xm's dtype, as "bn_grad" computes them
    scale = weight * inv
    a = scale
    b = (-scale * inv * inv * (sum_gc / m)).astype(xm.dtype)
    k = (-scale * (sum_g / m)).astype(xm.dtype)
    dbias[:] = sum_g
    dweight[:] = sum_gc * inv
    done = _run_blocks("bn_grad_dx", blocks,
                       lambda _, s, e: (gm[s:e], xm[s:e], mean, a, b, k, dx[s:e]))
    return (dx, dweight, dbias) if done else None


def _same_dtype_vectors(dtype: Any, *values: Any) -> list[np.ndarray] | None:
    """Per-column constants as (C,) arrays, or None unless each is a NumPy array of
    ``dtype`` (other dtypes change the NumPy formulas' result dtype: they take that path)."""
    out = []
    for v in values:
        if type(v) is not np.ndarray or v.dtype != dtype:
            return None
        out.append(v.reshape(-1) if v.flags.c_contiguous else np.ascontiguousarray(v).reshape(-1))
    return out


def batch_norm_forward(xm: np.ndarray, weight: Any, bias: Any, mean: Any, var: Any,
                       eps: float) -> np.ndarray | None:
    """Training BatchNorm's output for the (M, C) matrix ``xm`` and per-column statistics in
    one kernel call (the per-column alpha and beta too: on an MLP's 100 x 50 activations the
    five NumPy calls for them cost more than the pass), bit-identical to the NumPy formulas;
    None where it cannot run (other dtypes, matrices large enough to split: the caller's
    ``column_affine`` path splits them)."""
    if not _usable(xm) or _row_blocks(xm) is not None:
        return None
    return whole_batch_norm_forward(xm, weight, bias, mean, var, eps)


def whole_batch_norm_forward(xm: np.ndarray, weight: Any, bias: Any, mean: Any, var: Any,
                             eps: float) -> np.ndarray | None:
    """``batch_norm_forward`` for a matrix the caller checked (``_usable``, not split)."""
    vectors = _same_dtype_vectors(xm.dtype, weight, bias, mean, var)
    if vectors is None:
        return None
    out = np.empty_like(xm)
    return out if _run("bn_forward", xm, *vectors, xm.dtype.type(eps), out) else None


def batch_norm_grad_given_var(gm: np.ndarray, xm: np.ndarray, mean: Any, var: Any, eps: float,
                              weight: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``batch_norm_grad`` given the variance (``inv`` computed in the kernel, as NumPy
    would: bit-identical) in one kernel call; None where it cannot run (other dtypes,
    matrices large enough to split)."""
    if not _usable(gm, xm) or xm.shape[0] == 0 or _row_blocks(xm) is not None:
        return None
    return whole_batch_norm_grad(gm, xm, mean, var, eps, weight)


def whole_batch_norm_grad(gm: np.ndarray, xm: np.ndarray, mean: Any, var: Any, eps: float,
                          weight: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``batch_norm_grad_given_var`` for matrices the caller checked (``_usable`` both, rows,
    not split)."""
    vectors = _same_dtype_vectors(xm.dtype, mean, var, weight)
    if vectors is None:
        return None
    mean, var, weight = vectors
    c = xm.shape[1]
    dx = np.empty_like(xm)
    dweight = np.empty(c, xm.dtype)
    dbias = np.empty(c, xm.dtype)
    done = _run("bn_grad_var", gm, xm, mean, var, xm.dtype.type(eps), weight, dx, dweight, dbias)
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


def im2col(a: np.ndarray, kh: int, kw: int, stride: int, padding: int, ho: int, wo: int,
           ones: bool = False, out: np.ndarray | None = None) -> np.ndarray | None:
    """Patches of NHWC ``a`` zero-padded by ``padding`` as an (N*Ho*Wo, kh*kw*C) matrix (one
    more column of ones with ``ones``), read in one pass from ``a`` itself: NumPy pads a copy
    first, then copies the patches out of it. The same values bit for bit (a copy). Written
    into ``out`` where it is a C-contiguous matrix of that shape and dtype (a reused buffer),
    else into a new one. None where the kernels cannot run."""
    if type(a) is not np.ndarray or a.ndim != 4 or not enabled(a.dtype):
        return None
    n, _, _, c = a.shape
    shape = (n * ho * wo, kh * kw * c + (1 if ones else 0))
    if (type(out) is np.ndarray and out.shape == shape and out.dtype == a.dtype
            and out.flags.c_contiguous):
        cols = out
    else:
        cols = np.empty(shape, a.dtype)
    return cols if _run("im2col_rows", a, kh, kw, stride, padding, ho, wo, cols) else None


def im2col_channels_first(x: np.ndarray, kh: int, kw: int, stride: int, padding: int, ho: int,
                          wo: int, ones: bool = False, out: np.ndarray | None = None
                          ) -> np.ndarray | None:
    """Patches of C-contiguous NCHW ``x`` zero-padded by ``padding`` as (N, C*kh*kw, Ho*Wo)
    (one more row of ones with ``ones``), read in one pass from ``x`` itself (conv's NCHW
    im2col pads a copy first): the same values bit for bit. Written into ``out`` where it is
    a C-contiguous array of that shape and dtype (a reused buffer), else into a new one. None
    where the kernels cannot run (no numba, another dtype, or ``x`` not C-contiguous: read
    through NHWC memory's strides the loop was slower than NumPy's two copies, 0.64 vs 0.45
    ms)."""
    if not (type(x) is np.ndarray and x.ndim == 4 and x.flags.c_contiguous
            and enabled(x.dtype)):
        return None
    n, c = x.shape[:2]
    shape = (n, c * kh * kw + (1 if ones else 0), ho * wo)
    if (type(out) is np.ndarray and out.shape == shape and out.dtype == x.dtype
            and out.flags.c_contiguous):
        cols = out
    else:
        cols = np.empty(shape, x.dtype)
    done = _run("im2col_channels_first", x, kh, kw, stride, padding, ho, wo, cols)
    return cols if done else None


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
    xt = x.transpose(0, 2, 3, 1)
    blocks = _row_blocks(xt)
    if blocks is None:
        done = _run("max_pool", xt, k, stride, out)
    else:  # images are independent: split by images
        done = _run_blocks("max_pool", blocks, lambda _, s, e: (xt[s:e], k, stride, out[s:e]))
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
    # NOTE: y and g are read channels-last; other layouts (a broadcast gradient of a sum or
    # mean, an NCHW-contiguous one from a flatten) are copied so first: read in place with
    # their strides the loop ran 15-25x slower (64 x 16 x 32 x 32: 0.75 -> 14-20 ms)
    xt = x.transpose(0, 2, 3, 1)
    yt, gt = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in (y, g))
    blocks = _row_blocks(xt)
    if blocks is None:
        done = _run("max_pool_scatter", xt, yt, gt, k, stride, dx)
    else:  # images are independent: split by images
        done = _run_blocks("max_pool_scatter", blocks,
                           lambda _, s, e: (xt[s:e], yt[s:e], gt[s:e], k, stride, dx[s:e]))
    return dx.transpose(0, 3, 1, 2) if done else None

