"""Compiled CPU kernels (BatchNorm family, conv's col2im), used where numba is installed.

BatchNorm's statistics, its affine map and its backward are a few reductions and elementwise
passes over an (M, C) channel matrix (M = N*H*W rows of C channels). In NumPy each pass is a
call and a trip through memory: five to a dozen per op, and on the small activations of an
MLP (100 x 50) the calls cost more than the arithmetic. These loops read each input once or
twice. They are the same formulas as the NumPy paths in reduce.py / batchnorm.py, which stay the
reference and the fallback (no numba, CuPy arrays, other layouts); sums accumulate in float64
(the gradient's sums first add chunks of 8 rows in the arrays' dtype: numba_kernels.
bn_grad_sums_rows), so results agree with NumPy's float32 sums to rounding, not bit for bit.

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
23.3 -> 21.4 ms.

Threads: matrices of SPLIT_MIN_ELEMENTS or more (BatchNorm's passes, max pooling by images)
run in row blocks fixed by the shape (``row_blocks``), each block the same serial loop, in
one of three ways (``run_in_blocks``): one numba ``prange`` call on numba's TBB threads
(numba_parallel_batchnorm.py; backend/parallel_loops.py: a region starts in ~1.5 us) where
they run; else, from THREADS_MIN_ELEMENTS, needle's own threads draw chunks of blocks
(backend/cpu_threads.run_chunks, ~100 us a hand-off, so only large passes); else one call
runs the blocks in turn. The blocks' float64 sums are added in block order
(``numba_kernels.block_order_sums``), so the results are the same bits every way and on any
thread count (1 included); they differ from the whole loops' (smaller matrices) by rounding.
(Before session 10 the blocks were 2**20 elements from 2**20, on 2+ threads only; on a
loaded machine that split showed no wall-time gain, see THREADS_MIN_ELEMENTS' NOTE.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from ..backend import cpu_threads, parallel_loops
from ..backend.numba_support import NumbaLoops, numba_module

__all__ = ["batch_norm_forward", "batch_norm_grad", "batch_norm_grad_given_var", "col2im",
           "column_affine", "column_moments", "column_statistics", "column_sums", "enabled",
           "im2col", "im2col_channels_first", "max_pool", "max_pool_scatter", "row_blocks",
           "run_in_blocks", "run_kernel", "whole_batch_norm_forward", "whole_batch_norm_grad",
           "whole_column_statistics"]


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
            "max_pool_scatter": numba_kernels.max_pool_scatter_nhwc,
            "block_order_sums": numba_kernels.block_order_sums,
            "shifted_moments": numba_kernels.shifted_moments,
            "bn_grad_constants": numba_kernels.bn_grad_constants,
            "bn_alpha_beta": numba_kernels.bn_alpha_beta,
            **{f"{name}_blocks": getattr(numba_kernels, f"{name}_blocks")
               for name in ("column_sums", "shifted_sums", "centered_square_sums", "affine",
                            "bn_grad_sums", "bn_grad_dx", "max_pool", "max_pool_scatter")}}


def run_kernel(name: str, *args: Any) -> bool:
    """Call kernel ``name``; False (nothing written) if numba fails to compile it here, after
    which the NumPy paths are used for the rest of the process."""
    kernels = _kernels()
    assert kernels is not None  # (callers check enabled() first)
    return _call(kernels[name], *args, name=name)


def _call(loop: Any, *args: Any, name: str | None = None) -> bool:
    """``_run`` for the loop itself (``name``: what ``_disabled`` records, else its name)."""
    try:
        loop(*args)
    except numba_module().core.errors.NumbaError:  # compilation fails before anything runs
        _disabled.append(name or str(getattr(loop, "__name__", loop)))
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


#: smallest (M, C) matrix, in elements, whose passes run in row blocks fixed by the shape
#: (``row_blocks``); smaller ones run whole, one kernel call. Blocked sums are float64 sums
#: per block added in block order, so they do not depend on the thread count or on which of
#: the three ways below ran the blocks; they differ from the whole loop's sums by rounding.
#: NOTE (session 10): from 2**20 in blocks of 2**20 before, and only where needle had 2+
#: threads (1 thread ran the whole loops, whose sums differ by rounding). Now from 2**18
#: (PRANGE_MIN_ELEMENTS) in blocks of 2**16 on any thread count, so prange can split the CNN's
#: 2**18-2**20-element activations; run one after the other (one thread, prange off) they
#: cost ~5-15 us an op more than the whole loop (the blocks' sums, one more call).
SPLIT_MIN_ELEMENTS = 1 << 18

#: elements per row block (at least: a block holds whole rows; 256 KB of float32)
BLOCK_ELEMENTS = 1 << 16

#: smallest matrix whose blocks run as one numba prange call on numba's TBB threads where
#: backend/parallel_loops.parallel_threads() is nonzero (numba_parallel_batchnorm.py).
#: NOTE (2 cores shared with 5 other jobs, load 2.5-6): alone, in a loop (data in cache),
#: bn_grad's sums took 36 -> 30 us on 2**17 elements, 76 -> 47 on 2**18, 155 -> 86 on 2**19,
#: 313 -> 164 on 2**20 in a quiet minute, and the same as one thread (+2-5 us) while the
#: other core was busy. Inside CNN steps (ndl.profile, q25 of 48-96 steps, prange on vs off
#: alternating): 2**17 lost (BatchNorm ops 1.12-1.27x, the TBB worker wakes late), 2**18
#: level (0.96-1.04), 2**19 0.82-1.01, 2**20-2**21 0.68-0.99: the passes read activations
#: that left the cache, and the two cores share the memory bandwidth. Whole steps (the
#: models of benchmarks/cnn_step.py, q10 of 36-48 steps, these prange loops on vs off in one
#: process, alternating): ResidualCNN 32x32x3 eager 35.5 -> 30.5 ms, jitted 35.7 -> 29.1;
#: strides 1,2,2 eager 16.9 -> 13.5, jitted 15.5 -> 12.8; strides 1,1,1 eager 60.6 -> 56.9,
#: jitted 51.0 -> 48.8 (medians moved 2-4x with the load: these are rough).
PRANGE_MIN_ELEMENTS = 1 << 18

#: smallest matrix whose blocks needle's own threads share where prange does not run (a
#: hand-off costs ~100 us; see NOTE below), in chunks of about THREADS_CHUNK_ELEMENTS;
#: smaller matrices run their blocks one after the other in one compiled call.
#: NOTE: on a loaded machine (load ~3.5 on 2 cores) a pass split on needle's threads took
#: 0.135 ms where one thread took 0.067 on 2**18 elements, 0.40 vs 0.32 on 2**20, 1.34 vs 1.22
#: on 2**22 (best of 40); the split pays only where the second core is free. Idle-machine
#: step times estimated from CPU times (ab_cnn_step.py --estimate, 2 threads) with this split
#: from 2**18: CNN strides 1,1,1 89 -> 79 ms, strides 1,2,2 24.5 -> 22.7, ResidualCNN 32x32x3
#: 38.4 -> 32.8; from 2**20 less (q25 of 10 steps: ResidualCNN 40.5 -> 40.5, strides 1,2,2
#: 28.6 -> 26.9): the two threads' passes share the memory bandwidth.
THREADS_MIN_ELEMENTS = 1 << 20
THREADS_CHUNK_ELEMENTS = 1 << 20

#: the prange variants (latched apart: where numba cannot compile one, the serial block loops
#: run instead, with the same bits)
_parallel = NumbaLoops("needle.kernels.numba_parallel_batchnorm")


@functools.lru_cache(maxsize=256)
def _bounds(m: int, count: int) -> np.ndarray:
    """Row bounds of ``count`` near-equal blocks of ``m`` rows (shared: never written)."""
    return np.array([m * i // count for i in range(count + 1)], np.int64)


def row_blocks(xm: np.ndarray) -> np.ndarray | None:
    """Row bounds (int64, blocks + 1 of them) of the blocks of ``xm``'s first axis (rows; images
    for the pools) that the passes over it run in, or None: run it whole. They depend on the
    shape only (never on the thread count), so sums over them do not either."""
    m = xm.shape[0]
    if xm.size < SPLIT_MIN_ELEMENTS or m < 2:
        return None
    return _bounds(m, min(m, max(2, xm.size // BLOCK_ELEMENTS)))


def _run_blocks(name: str, bounds: np.ndarray, *args: Any) -> bool:
    """Pass ``name`` over every row block of ``bounds`` (``args``: the kernel's, its sums'
    arrays with a row per block, the first a matrix of the pass's size): ``run_in_blocks``
    with numba_kernels' ``<name>_blocks`` loop. False (the NumPy paths from then on) if numba
    fails to compile it here."""
    kernels = _kernels()
    assert kernels is not None  # (callers check enabled() first)
    return run_in_blocks(name, bounds, args[0].size, args, kernels[name + "_blocks"], _call)


def run_in_blocks(name: str, bounds: np.ndarray, size: int, args: tuple, serial: Any,
                  call: Callable[..., bool]) -> bool:
    """A pass of ``size`` elements over every row block of ``bounds``, each block the same
    serial loop every way (so the same bits): one prange call (numba_parallel_batchnorm's
    ``name``, on numba's TBB threads) from PRANGE_MIN_ELEMENTS where they run; else
    ``serial(*args, bounds, b0, b1)`` (blocks b0 .. b1-1) once over all blocks, or from
    THREADS_MIN_ELEMENTS on 2+ threads in chunks that needle's threads draw. ``call(loop,
    *args)`` runs a numba loop, False where numba could not compile it (then this returns
    False, nothing written)."""
    if size >= PRANGE_MIN_ELEMENTS and parallel_loops.parallel_threads():
        parallel = _parallel.module()
        if parallel is not None and _parallel.call(getattr(parallel, name), *args, bounds):
            return True
    blocks = len(bounds) - 1
    chunks = min(blocks, size // THREADS_CHUNK_ELEMENTS)
    if size < THREADS_MIN_ELEMENTS or chunks < 2 or cpu_threads.NUM_THREADS < 2:
        return call(serial, *args, bounds, 0, blocks)
    if not call(serial, *args, bounds, 0, 0):  # compiled here first (or failed)
        return False
    cpu_threads.run_chunks(
        lambda i: serial(*args, bounds, blocks * i // chunks, blocks * (i + 1) // chunks),
        chunks, cpu_threads.NUM_THREADS)
    return True


def _block_parts(name: str, bounds: np.ndarray, c: int, matrices: tuple,
                 *per_column: np.ndarray, outputs: int = 1) -> np.ndarray | None:
    """(outputs, blocks, C) float64 column sums of ``outputs`` kinds from pass ``name`` over
    each row block of ``matrices`` (plus the ``per_column`` constants), or None."""
    parts = np.empty((outputs, len(bounds) - 1, c), np.float64)
    return parts if _run_blocks(name, bounds, *matrices, *per_column, *parts) else None


def _block_sum(parts: np.ndarray) -> np.ndarray | None:
    """Row blocks' (blocks, C) float64 sums added in block order (numba_kernels.
    block_order_sums: every blocked path adds them so), or None."""
    out = np.empty(parts.shape[1], np.float64)
    return out if run_kernel("block_order_sums", parts, out) else None


def column_moments(xm: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, biased variance) of each column of ``xm``, or None where the kernels cannot run.
    Two passes; large matrices in row blocks (``row_blocks``)."""
    if not _usable(xm) or xm.shape[0] == 0:
        return None
    m, c = xm.shape
    mean = np.empty(c, xm.dtype)
    var = np.empty(c, xm.dtype)
    bounds = row_blocks(xm)
    if bounds is None:
        return (mean, var) if run_kernel("moments", xm, mean, var) else None
    parts = _block_parts("column_sums", bounds, c, (xm,))
    sums = None if parts is None else _block_sum(parts[0])
    if sums is None:
        return None
    mean[:] = sums / m  # the same float64 sum / m, rounded to xm's dtype, as "moments"
    parts = _block_parts("centered_square_sums", bounds, c, (xm,), mean)
    squares = None if parts is None else _block_sum(parts[0])
    if squares is None:
        return None
    var[:] = squares / m
    return mean, var


def column_statistics(xm: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, biased variance) of each column of ``xm`` in one pass over it (BatchNorm's batch
    statistics), or None where the kernels cannot run.

    float32: float64 sums of ``x - x[0]`` and its square (the shift keeps the subtraction
    ``sum(d*d) - sum(d)**2 / m`` from cancelling for data far from 0; float32 values and their
    squares are exact in float64), so the result matches the two-pass one to float32
    rounding (~1e-7 relative). float64: ``column_moments``'s two passes, where that rounding
    would show. Large matrices sum row blocks fixed by the shape (``row_blocks``), added in
    block order: the same result on any number of threads.
    """
    if not _usable(xm) or xm.shape[0] == 0:
        return None
    if xm.dtype != np.float32:
        return column_moments(xm)
    bounds = row_blocks(xm)
    if bounds is None:
        return whole_column_statistics(xm)
    m, c = xm.shape
    mean = np.empty(c, xm.dtype)
    var = np.empty(c, xm.dtype)
    parts = _block_parts("shifted_sums", bounds, c, (xm,), xm[0].astype(np.float64),
                         outputs=2)
    if parts is None or not run_kernel("shifted_moments", xm, parts[0], parts[1], mean, var):
        return None
    return mean, var


def whole_column_statistics(xm: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``column_statistics`` of a matrix the caller checked: ``_usable``, rows, not split
    (batchnorm.py's hot case: one kernel call and the fewest Python steps)."""
    c = xm.shape[1]
    mean = np.empty(c, xm.dtype)
    var = np.empty(c, xm.dtype)
    kernel = "one_pass_moments" if xm.dtype == np.float32 else "moments"
    return (mean, var) if run_kernel(kernel, xm, mean, var) else None


def column_sums(xm: np.ndarray) -> np.ndarray | None:
    """The sum of each column of ``xm`` (float64 sums, one loop), or None where the kernels
    cannot run. (Large channel matrices: reduce.reduce_sum takes column_sums.py's blocked
    sums first; this is its path below their size, so it stays one loop.)

    NOTE: the NumPy path's BLAS product with a ones vector is as fast on one core, but it is
    large enough for OpenBLAS to wake its worker threads, which then spin for ~0.1 s and take
    the second core from the Winograd convolutions' threads (CNN step 77 -> ~60 ms).
    """
    if not _usable(xm):
        return None
    out = np.empty(xm.shape[1], xm.dtype)
    return out if run_kernel("column_sums", xm, out) else None


def column_affine(xm: np.ndarray, scale: Any, shift: Any) -> np.ndarray | None:
    """``xm * scale + shift`` with per-column constants, or None where the kernels cannot run."""
    if not _usable(xm):
        return None
    out = np.empty_like(xm)
    scale, shift = _vector(scale, xm.dtype), _vector(shift, xm.dtype)
    bounds = row_blocks(xm)
    if bounds is None:
        done = run_kernel("affine", xm, scale, shift, out)
    else:
        done = _run_blocks("affine", bounds, xm, scale, shift, out)
    return out if done else None


def batch_norm_grad(gm: np.ndarray, xm: np.ndarray, mean: Any, inv: Any, weight: Any
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(dx, dweight, dbias) of BatchNorm over the rows of the (M, C) matrices ``gm`` (output
    gradient) and ``xm`` (input), given per-column ``mean`` and ``inv = 1 / sqrt(var + eps)``;
    None where the kernels cannot run."""
    if not _usable(gm, xm) or xm.shape[0] == 0:
        return None
    mean, inv, weight = (_vector(v, xm.dtype) for v in (mean, inv, weight))
    bounds = row_blocks(xm)
    if bounds is None:
        c = xm.shape[1]
        dx = np.empty_like(xm)
        dweight = np.empty(c, xm.dtype)
        dbias = np.empty(c, xm.dtype)
        done = run_kernel("bn_grad", gm, xm, mean, inv, weight, dx, dweight, dbias)
        return (dx, dweight, dbias) if done else None
    return _blocked_grad(gm, xm, mean, inv, weight, bounds)


def _blocked_grad(gm: np.ndarray, xm: np.ndarray, mean: np.ndarray, inv: np.ndarray,
                  weight: np.ndarray, bounds: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``batch_norm_grad`` in row blocks, its arguments checked (constants as (C,) vectors)."""
    m, c = xm.shape
    dx = np.empty_like(xm)
    dweight = np.empty(c, xm.dtype)
    dbias = np.empty(c, xm.dtype)
    parts = _block_parts("bn_grad_sums", bounds, c, (gm, xm), mean, outputs=2)
    a, b, k = (np.empty(c, xm.dtype) for _ in range(3))
    # the constants in xm's dtype, as "bn_grad" computes them
    if parts is None or not run_kernel("bn_grad_constants", parts[0], parts[1], inv, weight, m,
                                       a, b, k, dweight, dbias):
        return None
    done = _run_blocks("bn_grad_dx", bounds, gm, xm, mean, a, b, k, dx)
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
    a large matrix: alpha and beta in one call, then ``affine`` over its row blocks. None
    where it cannot run (other dtypes)."""
    if not _usable(xm):
        return None
    bounds = row_blocks(xm)
    if bounds is None:
        return whole_batch_norm_forward(xm, weight, bias, mean, var, eps)
    vectors = _same_dtype_vectors(xm.dtype, weight, bias, mean, var)
    if vectors is None:
        return None
    alpha, beta = np.empty(xm.shape[1], xm.dtype), np.empty(xm.shape[1], xm.dtype)
    if not run_kernel("bn_alpha_beta", *vectors, xm.dtype.type(eps), alpha, beta):
        return None
    out = np.empty_like(xm)
    return out if _run_blocks("affine", bounds, xm, alpha, beta, out) else None


def whole_batch_norm_forward(xm: np.ndarray, weight: Any, bias: Any, mean: Any, var: Any,
                             eps: float) -> np.ndarray | None:
    """``batch_norm_forward`` for a matrix the caller checked (``_usable``, not split)."""
    vectors = _same_dtype_vectors(xm.dtype, weight, bias, mean, var)
    if vectors is None:
        return None
    out = np.empty_like(xm)
    return out if run_kernel("bn_forward", xm, *vectors, xm.dtype.type(eps), out) else None


def batch_norm_grad_given_var(gm: np.ndarray, xm: np.ndarray, mean: Any, var: Any, eps: float,
                              weight: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``batch_norm_grad`` given the variance (``inv`` computed as NumPy computes it, in the
    arrays' dtype: bit-identical), None where it cannot run (other dtypes). One kernel call
    for a matrix run whole, ``batch_norm_grad``'s blocked passes for a large one."""
    if not _usable(gm, xm) or xm.shape[0] == 0:
        return None
    bounds = row_blocks(xm)
    if bounds is None:
        return whole_batch_norm_grad(gm, xm, mean, var, eps, weight)
    vectors = _same_dtype_vectors(xm.dtype, mean, var, weight)
    if vectors is None:
        return None
    mean, var, weight = vectors
    one = xm.dtype.type(1)
    return _blocked_grad(gm, xm, mean, one / np.sqrt(var + xm.dtype.type(eps)), weight, bounds)


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
    done = run_kernel("bn_grad_var", gm, xm, mean, var, xm.dtype.type(eps), weight, dx, dweight,
                      dbias)
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
    return out if run_kernel("col2im_add", taps, ho, wo, kh, kw, stride, padding, out) else None


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
    return cols if run_kernel("im2col_rows", a, kh, kw, stride, padding, ho, wo, cols) else None


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
    done = run_kernel("im2col_channels_first", x, kh, kw, stride, padding, ho, wo, cols)
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
    bounds = row_blocks(xt)
    if bounds is None:
        done = run_kernel("max_pool", xt, k, stride, out)
    else:  # images are independent: split by images
        done = _run_blocks("max_pool", bounds, xt, k, stride, out)
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
    bounds = row_blocks(xt)
    if bounds is None:
        done = run_kernel("max_pool_scatter", xt, yt, gt, k, stride, dx)
    else:  # images are independent: split by images
        done = _run_blocks("max_pool_scatter", bounds, xt, yt, gt, k, stride, dx)
    return dx.transpose(0, 3, 1, 2) if done else None

