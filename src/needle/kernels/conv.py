"""Kernels of the three convolutions: the one algorithm choice, im2col, col2im, the split by images.

needle's layout (core/ops_conv.py states the math): NHWC input, (kh, kw, C_in, C_out) kernel.
Results are stored channels-last (C-contiguous NHWC), whatever the layout of the inputs. An
NCHW model (nn.Conv permutes in and out) therefore keeps its activations channels-last behind
NCHW views, which is where im2col copies long runs (kw * C values) and col2im adds rows; the
BatchNorm kernels and the reductions have channels-last paths (layout.py). Measured on the
benchmark CNN: 28.9 -> 25.1 ms per step against keeping NCHW memory.

The algorithm, chosen here once for all three convolutions:

1. Winograd's F(4x4, 3x3) (winograd.py: 4x fewer multiply-adds, blocked and threaded; the
   benchmark CNN's step 132 -> 55 ms) for float32 3x3 stride-1 convolutions with 8 or more
   channels, where numba is installed and compiles its transforms (``_winograd``);
2. otherwise, for float32 layers with 16, 32, 48 or 64 output channels (input channels, for
   the input gradient) where numba runs, direct loops with no im2col matrix and no BLAS
   (kernels/numba_direct_conv.py: register tiles of 8 positions x 16 or 32 channels on
   512-bit vectors, ``_direct_conv``, ``_direct_weight_grad``, ``_direct_input_grad``; the
   strided CNN training step 0.86x its CPU time with im2col's, on one thread);
3. otherwise im2col and one matrix product per chunk of images, split across needle's CPU
   threads where it pays (``_image_chunks``, ``_by_images``). An input stored channels-first
   (a user's NCHW images) or with at most 4 channels (a first layer's NHWC images), with
   large maps, is read by the NCHW im2col, which copies runs of Wo values instead of
   transposing the input first or copying runs of kw * C (``_use_nchw``); where numba runs,
   in one compiled pass from an NCHW input (no padded copy). conv_input_grad scatters its
   patches back (col2im) in one compiled pass (cpu_kernels, numba) per block of images whose
   taps stay in cache, or, where that cannot run, in kh*kw NumPy scatter-adds by stride
   phase. conv_weight_grad sums one product per block of images (blocks fixed by the shapes,
   so the same bits on any thread count, with or without numba). Where numba runs, the NHWC
   im2col is one compiled pass from the unpadded input, and conv builds and multiplies its
   patches in blocks of about IM2COL_BLOCK_BYTES (stride-2 layer N64 C32->64 32x32 forward,
   2 threads, loaded machine, alternating in one process, medians of 30: 5.24 -> 3.62 ms;
   with its backward 14.1 -> 12.7 ms; CNN step strides 1,2,2 23.2 -> 22.4 ms).
   Where numba's parallel loops run on TBB (backend/parallel_loops.py) and NumPy's BLAS is
   OpenBLAS, conv's forward, its NHWC kernel gradient and its input gradient are instead
   one prange region each over blocks of images fixed by the shapes, each block's patches
   and product (and scatter) on one TBB thread (``_prange_conv``, ``_prange_weight_grad``,
   ``_prange_input_grad``; the same bits): no hand-off to needle's threads.

``conv_bias`` adds its bias where the output is written: in the Winograd output transform, or
as one more kernel row times a column of ones in the im2col product. conv + add -> conv_bias
on the benchmark CNN's layers (batch 64, 32x32, 2 threads, loaded machine, medians):
3->16 1.44 -> 1.13 ms, 16->32 4.31 -> 3.55 ms, 32->64 8.27 -> 6.94 ms.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from ..backend import array_module, cpu_threads, parallel_loops
from ..backend.numba_support import NumbaLoops
from . import blas_threads, cpu_kernels, openblas_gemm, winograd

__all__ = ["IM2COL_BLOCK_BYTES", "NCHW_MAX_CHANNELS", "NCHW_MIN_POSITIONS", "PRANGE_ENABLED",
           "PRANGE_MIN_BLOCKS",
           "PRANGE_MIN_BLOCK_MACS", "PRANGE_MIN_MACS", "SPLIT_MIN_MACS",
           "WEIGHT_GRAD_MIN_BLOCKS", "conv2d", "conv2d_input_grad", "conv2d_weight_grad"]


def _out_size(n: int, k: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - k) // stride + 1


# -- Winograd -----------------------------------------------------------------------------------
def _winograd(run: Callable, x: Any, other: Any, kernel_hw: tuple, stride: int, padding: int,
              c_in: int, c_out: int, *extra: Any) -> Any:
    """``run(x, other, padding, *extra)`` where the Winograd path takes this convolution (``x``
    the array it tiles, ``other`` the kernel or the output gradient); None where it does not,
    or where numba could not compile its transforms here: the caller runs im2col then."""
    if winograd.applies(x, other, kernel_hw, stride, padding, c_in, c_out):
        return run(x, other, padding, *extra)
    return None


# -- im2col -------------------------------------------------------------------------------------
def _padded(a, padding: int):
    """``a`` zero-padded by ``padding`` on both sides of H and W, as a C-contiguous array.

    NOTE: a non-contiguous view (the NCHW -> NHWC permute of nn.Conv) is copied to C order
    first even without padding: the im2col copy from it is 2-3x slower than the two copies.
    """
    xp = array_module(a)
    if not padding:
        return xp.ascontiguousarray(a)
    n, h, w, c = a.shape
    return _pad_into(xp.empty((n, h + 2 * padding, w + 2 * padding, c), dtype=a.dtype), a,
                     padding, 1)


def _pad_into(out, a, padding: int, first: int):
    """``out`` with ``a`` in its middle and zeros around it along axes ``first`` and
    ``first + 1`` (H and W): only the border is zeroed, not the whole array first (one
    pass over the padded input instead of two)."""
    p = padding
    h, w = a.shape[first:first + 2]
    lead = (slice(None),) * first
    out[lead + (slice(p, p + h), slice(p, p + w))] = a
    out[lead + (slice(0, p),)] = 0
    out[lead + (slice(p + h, None),)] = 0
    out[lead + (slice(p, p + h), slice(0, p))] = 0
    out[lead + (slice(p, p + h), slice(p + w, None))] = 0
    return out


def _im2col(a, kh: int, kw: int, stride: int, padding: int, ones: bool = False, out=None):
    """Patches of the padded input as an (N * Ho * Wo, kh * kw * C) matrix, and (N, Ho, Wo).

    Row (n, y, x) holds the window ``a_pad[n, s*y : s*y + kh, s*x : s*x + kw, :]`` flattened
    in (i, j, c) order, the order of the kernel's first three axes. ``ones``: one more column
    of ones (the product with a kernel whose last row is a bias adds the bias). ``out``: a
    C-contiguous matrix of that shape the compiled path writes into (the NumPy path ignores it).

    NOTE: where numba runs, one compiled pass reads the patches from the unpadded input
    (cpu_kernels.im2col) instead of padding a copy first and copying the patches out of it
    (bit for bit the same matrix): on the benchmark's stride-2 layer (N64, 32x32, C32, k3,
    loaded machine, medians) 3.2 -> 1.6 ms for the whole patch matrix.
    """
    if type(a) is np.ndarray and cpu_kernels.enabled(a.dtype):
        ho = _out_size(a.shape[1], kh, stride, padding)
        wo = _out_size(a.shape[2], kw, stride, padding)
        cols = cpu_kernels.im2col(np.ascontiguousarray(a), kh, kw, stride, padding, ho, wo, ones,
                                  out)
        if cols is not None:
            return cols, (a.shape[0], ho, wo)
    a = _padded(a, padding)
    n, h, w, c = a.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    sn, sh, sw, sc = a.strides
    xp = array_module(a)
    patches = xp.lib.stride_tricks.as_strided(
        a, shape=(n, ho, wo, kh, kw, c), strides=(sn, sh * stride, sw * stride, sh, sw, sc))
    if not ones:
        return patches.reshape(n * ho * wo, kh * kw * c), (n, ho, wo)
    cols = xp.empty((n * ho * wo, kh * kw * c + 1), a.dtype)
    cols[:, :-1].reshape(n, ho, wo, kh, kw, c)[...] = patches  # (a view: rows split, not cols)
    cols[:, -1] = 1
    return cols, (n, ho, wo)


def _channels_first(x) -> bool:
    """Whether an NHWC array keeps its channels outside H and W in memory (an NCHW array seen
    through a permute, as nn.Conv passes it) rather than innermost."""
    return x.strides[3] > x.strides[2]


#: output positions per image from which the per-image (NCHW im2col) products pay
NCHW_MIN_POSITIONS = 256


#: inputs with at most this many channels take the NCHW im2col whatever their memory layout
NCHW_MAX_CHANNELS = 4


def _use_nchw(x, positions: int) -> bool:
    """Read the input through the NCHW im2col: it is NCHW in memory, or has so few channels
    (a first layer's 1 or 3) that its NHWC im2col would copy runs of only kw * C values,
    and each image has enough positions for its own matrix product to be efficient (small
    maps do better transposed once and taken as one NHWC product).

    NOTE: measured on one thread, batch 64 of 32x32x3 NHWC images, 16 channels out: forward
    2.2 -> 1.3 ms, kernel gradient 2.5 -> 1.4 ms (the NCHW im2col's padding copy transposes
    the small input on the way); 28x28x1 (where NHWC and NCHW memory are one): forward
    1.4 -> 0.4 ms, kernel gradient 1.8 -> 0.5 ms."""
    return ((_channels_first(x) or x.shape[3] <= NCHW_MAX_CHANNELS)
            and positions >= NCHW_MIN_POSITIONS)


def _im2col_nchw(a, kh: int, kw: int, stride: int, padding: int, ones: bool = False,
                 out=None):
    """Patches of an NHWC-viewed NCHW array as (N, C * kh * kw, Ho * Wo), and (Ho, Wo).

    Caffe's layout: one column per output position, rows in (c, i, j) order; it reads an
    NCHW array without transposing it. ``ones``: one more row of ones (for a bias). ``out``:
    a buffer of that shape the compiled path writes into (the NumPy path ignores it).
    """
    xp = array_module(a)
    x = a.transpose(0, 3, 1, 2)  # the NCHW array itself
    n, c, h, w = x.shape
    ho, wo = _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding)
    cols = cpu_kernels.im2col_channels_first(x, kh, kw, stride, padding, ho, wo, ones, out)
    if cols is not None:  # numba: one pass from the unpadded input (64x3x32x32: 0.45 -> 0.33 ms)
        return cols, (ho, wo)
    if padding:
        x = _pad_into(xp.empty((n, c, h + 2 * padding, w + 2 * padding), dtype=x.dtype), x,
                      padding, 2)
    else:
        x = xp.ascontiguousarray(x)
    ho, wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    sn, sc, sh, sw = x.strides
    patches = xp.lib.stride_tricks.as_strided(
        x, shape=(n, c, kh, kw, ho, wo), strides=(sn, sc, sh, sw, sh * stride, sw * stride))
    if not ones:
        return patches.reshape(n, c * kh * kw, ho * wo), (ho, wo)
    cols = xp.empty((n, c * kh * kw + 1, ho * wo), x.dtype)
    cols[:, :-1].reshape(n, c, kh, kw, ho, wo)[...] = patches
    cols[:, -1] = 1
    return cols, (ho, wo)


def _nchw_blocks(a, s: int, e: int, rows: int, positions: int):
    """Images [s, e) of ``a`` in blocks of nearly equal size whose NCHW patches, (rows,
    positions) an image, take about IM2COL_BLOCK_BYTES, as (start, end, buffer): the compiled
    NCHW im2col writes every block into one reused buffer; NumPy's im2col (no buffer) takes
    all images at once.

    NOTE: a first layer's patch matrix for a whole batch is 7 MB (64 x 28 x 1024 float32);
    inside a training step, built whole, its kernel gradient took 2.2-2.4 ms instead of the
    1.4 it takes alone (minor page faults: ~1 a step, so not those; the cache, presumably).
    With one 1 MB buffer, inside the benchmark CNN's step (one thread, CPU time, loaded
    machine, medians of 15), against NumPy's padded copies of the whole batch before:
    forward 1.97 -> 1.16 ms, kernel gradient 1.54 -> 1.46 ms. Alone (outside a step) blocks
    made no difference."""
    x = a.transpose(0, 3, 1, 2)
    if not (type(x) is np.ndarray and x.flags.c_contiguous and cpu_kernels.enabled(x.dtype)):
        yield s, e, None
        return
    per_block = max(1, IM2COL_BLOCK_BYTES // (rows * positions * x.dtype.itemsize))
    count = max(1, -(-(e - s) // per_block))
    bounds = [s + (e - s) * i // count for i in range(count + 1)]
    flat = np.empty(-(-(e - s) // count) * rows * positions, x.dtype)
    for start, end in zip(bounds[:-1], bounds[1:]):
        yield start, end, flat[:(end - start) * rows * positions].reshape(
            end - start, rows, positions)


def _phase_range(r: int, s: int, p: int, n: int, nq: int) -> tuple[int, int]:
    """The phase-r positions y (0 <= y < nq) whose padded index s*y + r is an image position
    (0 <= s*y + r - p < n), as a range [y0, y1)."""
    return max(0, -(-(p - r) // s)), min(nq, (n - 1 + p - r) // s + 1)


#: bytes of patches built and multiplied at a time by conv's NHWC im2col path (whole images):
#: the patch matrix stays in cache between its copy and its product, and its buffer is reused.
#: NOTE: measured on the benchmark's stride-2 layer with the compiled im2col (N64, C32->64,
#: 32x32, k3, bias, loaded machine, process CPU time, medians): whole chunks 9.1 ms, blocks of
#: 1, 2 and 4 images (0.3, 0.6, 1.2 MB) 6.7, 6.5, 6.8 ms. Each output row's product has the
#: same K and N (only M, the rows per product, changes), so the results are the same bit for
#: bit (tests/test_conv_im2col_compiled.py). NumPy's im2col (no numba) did not gain from
#: blocks (its padded copy per block: 7.4 -> 8.1 ms), so it keeps one matrix per chunk.
IM2COL_BLOCK_BYTES = 1 << 20


#: conv_weight_grad's blocks (``_weight_grad_blocks``) are at least this many (as many as
#: there are images where fewer): threads drawing 5 blocks split them 3:2
WEIGHT_GRAD_MIN_BLOCKS = 8


# -- the convolutions in one prange region each ---------------------------------------------------
#: the prange loops (kernels/numba_parallel_conv.py), latched apart from the serial ones
_parallel_loops = NumbaLoops("needle.kernels.numba_parallel_conv")

#: whether the im2col convolutions take their prange paths where they can run (False: the
#: split across needle's threads, as before; for A/B measurements)
PRANGE_ENABLED = True

#: fewest blocks of images conv's prange forward cuts a batch into (as many as there are
#: images where fewer): two threads drawing 5 blocks would split them 3:2
PRANGE_MIN_BLOCKS = 8

#: fewest multiply-adds of a convolution (or gradient) that takes its prange path: as
#: SPLIT_MIN_MACS (smaller ones were not worth a split), kept apart so that a test of the split
#: path may lower that one alone
PRANGE_MIN_MACS = 1 << 22

#: fewest multiply-adds of one block's product in conv's prange forward (NHWC patches): OpenBLAS
#: takes small products (M*N*K up to ~1e6 on x86-64) through other kernels, whose bits differ
#: from the large products' that the path without prange makes
PRANGE_MIN_BLOCK_MACS = 1 << 22


def _prange_ready(dtype: Any, *arrays: Any) -> tuple | None:
    """(threads, gemm, loops) where conv's prange loops can run on ``arrays``: NumPy arrays of
    ``dtype`` (float32/float64), numba's TBB layer on two or more threads (``threads``, the
    bound of ``numba.get_thread_id()``: a buffer each), BLAS's thread count settable
    (kernels/blas_threads.py: held on one thread meanwhile), NumPy's OpenBLAS gemm
    (kernels/openblas_gemm.py) and the compiled loops module
    (kernels/numba_parallel_conv.py); else None."""
    if not (PRANGE_ENABLED and all(type(x) is np.ndarray and x.dtype == dtype for x in arrays)
            and cpu_kernels.enabled(dtype) and blas_threads.available()):
        return None
    threads = parallel_loops.parallel_threads()
    gemm = openblas_gemm.gemm(dtype) if threads else None
    loops = _parallel_loops.module() if gemm is not None else None
    return None if loops is None else (threads, gemm, loops)


def _block_count(n: int, image_bytes: int, image_macs: int | None) -> int:
    """Blocks of images for a prange loop, fixed by the shapes: about IM2COL_BLOCK_BYTES of
    patches each, at least PRANGE_MIN_BLOCKS (or n) of them, but (with ``image_macs``, each
    block one product) none with a product under PRANGE_MIN_BLOCK_MACS."""
    per_block = max(1, IM2COL_BLOCK_BYTES // image_bytes)
    count = max(-(-n // per_block), min(n, PRANGE_MIN_BLOCKS))
    if image_macs is not None:
        count = min(count, n // -(-PRANGE_MIN_BLOCK_MACS // image_macs))
    return max(1, count)


def _prange_conv(a, weight, kh: int, kw: int, stride: int, padding: int, ho: int, wo: int,
                 ones: bool, nchw: bool, out) -> bool:
    """conv's im2col forward in one numba prange region over blocks of images on the TBB
    threads: each block's patches (about IM2COL_BLOCK_BYTES; ``_im2col_nchw``'s layout where
    ``nchw``, else ``_im2col``'s) built into its thread's buffer and multiplied there by
    NumPy's OpenBLAS gemm into ``out`` (C-contiguous N, Ho, Wo, C_out), BLAS held on one
    thread meanwhile. The blocks depend on the shapes only, and each output row is the same
    product as in the split path's (only the rows per product differ), so the same bits on
    any thread count, with or without prange (tests). False (nothing written) where it does
    not run: fewer than PRANGE_MIN_MACS multiply-adds (the split path does not split those
    either; OpenBLAS's small-matrix kernels, whose bits may differ, take small products), or
    ``_prange_ready`` says no.

    NOTE: a split across needle's threads (``_by_images``) pays ~100-150 us a hand-off on a
    loaded 2-core machine; a prange region starts in ~1.5 us. Measured (session 10, 2 threads,
    machine shared with 4-8 other jobs, the CNN step of benchmarks/cnn_step.py strides 1,2,2
    in one process with and without these paths alternating, 16 rounds, paired medians, run
    at nice -15): eager 0.83x the time (16.9 -> 14.0 ms; PyTorch 12.8), ndl.jit 0.78x
    (16.7 -> 13.0 ms); forward, kernel gradient and input gradient alone 0.55-0.92x. What did
    not pay: the whole batch's patches in one prange call, multiplied in one product on
    OpenBLAS's threads (the step 1.04-1.14x: OpenBLAS's threads spin ~0.1 s after each
    threaded product and took the second core from the next passes' prange loops); numba's
    default schedule, which cuts the blocks into one run per thread up front (under load a
    thread that lost its core held half the work: the step 1.1-3x in wall time; drawn one
    block at a time, as backend/parallel_loops.parallel_threads sets for needle's threads,
    it is the 0.83x above)."""
    n, _, _, c = a.shape
    c_out = weight.shape[1]
    ready = (_prange_ready(a.dtype, a, weight, out)
             if n * ho * wo * kh * kw * c * c_out >= PRANGE_MIN_MACS else None)
    if ready is None:
        return False
    threads, gemm, loops = ready
    width, rows = kh * kw * c + ones, ho * wo
    # (the NCHW path multiplies image by image, as the path without prange does)
    count = _block_count(n, rows * width * a.dtype.itemsize,
                         None if nchw else rows * width * c_out)
    most = -(-n // count)  # images in the largest block
    weight = np.ascontiguousarray(weight)
    if nchw:  # (an NHWC input with few channels: copied to NCHW, 3% of its patches' bytes)
        src = np.ascontiguousarray(a.transpose(0, 3, 1, 2))
        buffers = np.empty((threads, most, width, rows), a.dtype)
        loop, result = loops.conv_channels_first, out.reshape(n, rows, c_out)
    else:
        src = np.ascontiguousarray(a)
        buffers = np.empty((threads, most * rows, width), a.dtype)
        loop, result = loops.conv_rows, out.reshape(n * rows, c_out)
    with blas_threads.hold():
        return _parallel_loops.call(loop, gemm, src, weight, kh, kw, stride, padding, ho, wo,
                                    result, count, buffers)


def _prange_weight_grad(a, g, kernel_hw: tuple, stride: int, padding: int, count: int):
    """``_weight_grad_blocks``' partial sums (count, C*kh*kw, C_out), one per block of images
    (the same blocks), each block's patches and product on one TBB thread in one prange
    region: the same products, so the same bits. None where it does not run (fewer than
    PRANGE_MIN_MACS multiply-adds, or ``_prange_ready`` says no)."""
    kh, kw = kernel_hw
    n, c_in = a.shape[0], a.shape[3]
    ho, wo, c_out = g.shape[1:]
    rows, taps = ho * wo, kh * kw * c_in
    ready = _prange_ready(a.dtype, a, g) if n * rows * taps * c_out >= PRANGE_MIN_MACS else None
    if ready is None:
        return None
    threads, gemm, loops = ready
    parts = np.empty((count, taps, c_out), a.dtype)
    buffers = np.empty((threads, -(-n // count) * rows, taps), a.dtype)
    g2 = np.ascontiguousarray(g).reshape(n * rows, c_out)
    with blas_threads.hold():
        done = _parallel_loops.call(loops.weight_grad_rows, gemm, np.ascontiguousarray(a), g2,
                                    kh, kw, stride, padding, ho, wo, parts, count, buffers)
    return parts if done else None


def _prange_weight_grad_nchw(a, g, kh: int, kw: int, stride: int, padding: int, products):
    """conv_weight_grad's per-image products (N, C*kh*kw, C_out) of an NCHW input and an
    NHWC-stored ``g`` in one prange region over blocks of images fixed by the shapes (each
    block's NCHW patches and its images' products on one TBB thread; the same products as
    ``images_nchw``'s, so the same bits); False (nothing written) where it does not run
    (as ``_prange_weight_grad``)."""
    n, ho, wo, c_out = g.shape
    taps, rows = products.shape[1], ho * wo
    ready = (_prange_ready(a.dtype, a, g, products)
             if n * rows * taps * c_out >= PRANGE_MIN_MACS else None)
    if ready is None:
        return False
    threads, gemm, loops = ready
    x = np.ascontiguousarray(a.transpose(0, 3, 1, 2))
    count = _block_count(n, taps * rows * a.dtype.itemsize, None)
    buffers = np.empty((threads, -(-n // count), taps, rows), a.dtype)
    g3 = np.ascontiguousarray(g).reshape(n, rows, c_out)
    with blas_threads.hold():
        return _parallel_loops.call(loops.weight_grad_channels_first, gemm, x, g3, kh, kw,
                                    stride, padding, ho, wo, products, count, buffers)


def _prange_input_grad(g, weights, in_shape: tuple, kh: int, kw: int, s: int, p: int):
    """``_col2im_compiled``'s result in one prange region over blocks of images fixed by the
    shapes (each block's taps product and col2im scatter on one TBB thread; images are
    independent, and each product's rows are the same as in the path without prange: the
    same bits), or None where it does not run (as ``_prange_conv``)."""
    n, ho, wo, c_out = g.shape
    width = weights.shape[1]
    rows = ho * wo
    ready = (_prange_ready(g.dtype, g, weights)
             if n * rows * width * c_out >= PRANGE_MIN_MACS else None)
    if ready is None:
        return None
    threads, gemm, loops = ready
    weights = np.ascontiguousarray(weights)
    count = _block_count(n, rows * width * g.dtype.itemsize, rows * width * c_out)
    out = np.empty(in_shape, g.dtype)
    buffers = np.empty((threads, -(-n // count) * rows, width), g.dtype)
    g2 = np.ascontiguousarray(g).reshape(n * rows, c_out)
    with blas_threads.hold():
        done = _parallel_loops.call(loops.input_grad, gemm, g2, weights, ho, wo, kh, kw, s, p,
                                    out, count, buffers)
    return out if done else None


# -- direct loops (no im2col, no BLAS) ------------------------------------------------------------
#: the direct loops (kernels/numba_direct_conv.py), latched apart from the other numba modules
_direct_loops = NumbaLoops("needle.kernels.numba_direct_conv")

#: whether conv's forward and kernel gradient take the direct loops where they apply (False:
#: im2col and OpenBLAS, as before; for A/B measurements and tests)
DIRECT_ENABLED = True

#: the direct loops' bounds: C_out a multiple of 16 up to DIRECT_MAX_COUT, at most
#: DIRECT_MAX_TAPS kernel taps (kh*kw*C_in); wider layers keep OpenBLAS's products, whose
#: 512-bit kernels win once the matrices are wide (not measured past 64 channels out)
DIRECT_MAX_COUT = 64
DIRECT_MAX_TAPS = 512

#: the direct input gradient's bound on kh*kw*C_out (its taps before the stride phases
#: thin them): a 3x3 kernel with 64 output channels, measured (C32->64 stride 2)
DIRECT_MAX_INPUT_GRAD_TAPS = 9 * 64

#: the direct kernel gradient up to this many output channels (one thread, batch 64, stride 2:
#: C32->64 16x16 1.0 ms by 4-tap x 64-channel tiles vs 1.2-1.5 im2col, 1.85 by two 8 x 32
#: tiles; C16->32 32x32 1.5 vs 2.5; the first layer's C3->16 0.7-0.8 vs 0.96-1.4, since
#: session 12 0.41-0.45 by one 27-tap x 16-channel tile, numba_direct_conv.py)
DIRECT_WEIGHT_GRAD_MAX_COUT = 64

#: blocks of images of the direct kernel gradient, fixed by the batch size (min(N, this)):
#: partial sums added in block order, so the same bits on any thread count
DIRECT_WEIGHT_GRAD_BLOCKS = 8


#: the direct loops' (alpha, beta) where their input is taken as it is (no BatchNorm + ReLU)
_NO_BN_RELU = (np.empty(0, np.float32), np.empty(0, np.float32))


def _direct_module(*arrays: Any) -> Any:
    """The direct loops' module where they can run on ``arrays`` (C-contiguous-able float32
    NumPy arrays, numba present and compiling), else None."""
    if not (DIRECT_ENABLED and all(type(x) is np.ndarray and x.dtype == np.float32
                                   for x in arrays) and cpu_kernels.enabled(np.float32)):
        return None
    return _direct_loops.module()


def _direct_applies(c_in: int, c_out: int, kh: int, kw: int) -> bool:
    """Whether the shape is one the direct loops take (see DIRECT_MAX_COUT)."""
    return (c_out % 16 == 0 and c_out <= DIRECT_MAX_COUT
            and kh * kw * c_in <= DIRECT_MAX_TAPS)


def _direct_scratch(threads: int, h: int, w: int, c: int, padding: int) -> np.ndarray:
    """A padded-image scratch per thread: (``threads`` or 1, H + 2p, W + 2p, C)."""
    return np.empty((max(1, threads), h + 2 * padding, w + 2 * padding, c), np.float32)


def _direct_conv(a, b, stride: int, padding: int, bias, ho: int, wo: int,
                 bn_relu: tuple | None = None):
    """conv's forward by the direct loops (kernels/numba_direct_conv.py): C-contiguous
    (N, Ho, Wo, C_out), or None where they do not take it (see ``_direct_applies``; inputs
    with at most NCHW_MAX_CHANNELS channels, a first layer's, only at stride 1: they take
    ``forward_few_channels``, vectorized over positions, since 8 x 16 tiles over 27 taps
    did not beat im2col there).

    NOTE: one thread, thread CPU time, batch 64, medians (machine shared): C16->32 32x32
    stride 2 2.91 -> 1.69 ms, C32->64 16x16 stride 2 1.77 -> 1.18 ms (oneDNN channels-last
    1.0-1.2 / 0.96-1.1); C3->16 32x32 (forward_few_channels) 1.18-1.54 -> 1.03 (the loop
    alone 0.89; oneDNN 0.60-0.69). Session 14 (one thread, 32 images; wall medians, quiet):
    with the tiles' rows stored as vectors and the scratch padded by rows, stride 2
    C16->32 0.625 -> 0.540 ms, C32->64 0.595 -> 0.529 (oneDNN 0.50 / 0.46); the first layer
    in 32 x 8 tiles, 64 images, 0.66-0.69 -> 0.46-0.48 (oneDNN 0.55-0.60). The image
    blocks run in one prange region where that runs; each output is the same sum in the same
    order wherever it runs.

    ``bn_relu``: per-channel float32 (alpha, beta): convolve relu(a * alpha + beta) instead of
    ``a``, made as each image is copied into the loop's padded scratch (kernels/
    conv_bn_relu.py)."""
    kh, kw, c_in, c_out = b.shape
    n, h, w, _ = a.shape
    few = c_in <= NCHW_MAX_CHANNELS
    if bn_relu is not None and few:
        return None
    if (n == 0 or wo < (16 if few else 8) or (few and stride != 1)
            or not _direct_applies(c_in, c_out, kh, kw)):
        return None
    loops = _direct_module(a, b) if bias is None else _direct_module(a, b, bias)
    if loops is None:
        return None
    bias = np.zeros(c_out, np.float32) if bias is None else np.ascontiguousarray(bias)
    out = np.empty((n, ho, wo, c_out), np.float32)
    threads = parallel_loops.parallel_threads() if n > 1 else 0
    if few:  # any layout of a: each image is copied into padded channel planes
        wt = np.ascontiguousarray(b.transpose(3, 2, 0, 1)).reshape(c_out, c_in * kh * kw)
        scratch = np.empty((max(1, threads), c_in, h + 2 * padding, w + 2 * padding),
                           np.float32)
        if threads:
            done = _direct_loops.call(loops.forward_few_channels_blocks, a, wt, bias, kh, kw,
                                      padding, ho, wo, scratch, out,
                                      min(n, 2 * PRANGE_MIN_BLOCKS))
        else:
            done = _direct_loops.call(loops.forward_few_channels, a, wt, bias, kh, kw,
                                      padding, ho, wo, scratch[0], out)
        return out if done else None
    a = np.ascontiguousarray(a)
    b = np.ascontiguousarray(b)
    scratch = _direct_scratch(threads, h, w, c_in, padding)
    alpha, beta = _NO_BN_RELU if bn_relu is None else bn_relu
    if threads:
        done = _direct_loops.call(loops.forward_blocks, a, b, bias, stride, padding, ho, wo,
                                  scratch, out, min(n, 2 * PRANGE_MIN_BLOCKS), alpha, beta)
    else:
        forward = loops.forward32 if c_out % 32 == 0 else loops.forward16
        done = _direct_loops.call(forward, a, b, bias, stride, padding, ho, wo, scratch[0],
                                  out, alpha, beta)
    return out if done else None


def _direct_weight_grad(a, g, kernel_hw: tuple, stride: int, padding: int,
                        bn_relu: tuple | None = None):
    """conv_weight_grad by the direct loops: (kh, kw, C_in, C_out), or None where they do not
    take it (C_out over DIRECT_WEIGHT_GRAD_MAX_COUT; see ``_direct_applies``). Partial sums per
    block of images (DIRECT_WEIGHT_GRAD_BLOCKS, fixed by N), added in block order, in one
    prange region or one after another: the same bits either way.

    ``bn_relu``: as ``_direct_conv``'s.

    NOTE: one thread, thread CPU time, batch 64, medians (machine shared): C3->16 32x32
    1.13-1.42 -> 0.94-1.07 ms (session 12: 0.41-0.45, oneDNN's 0.44-0.48, by the first layer's
    own loop, numba_direct_conv.weight_grad_first_layer), C16->32 32x32 stride 2 3.05 -> 1.99 ms
    (oneDNN channels-last 0.47-0.58 / 1.36-1.43). Vectorized over positions instead (a first
    layer's 3x3 taps x 4 channels of 16-position sums, 512-bit): 4.6 ms, not understood (the
    loop's code looked right; no hardware counters on this VM), dropped."""
    kh, kw = kernel_hw
    n, h, w, c_in = a.shape
    _, ho, wo, c_out = g.shape
    if n == 0 or c_out > DIRECT_WEIGHT_GRAD_MAX_COUT or not _direct_applies(c_in, c_out, kh, kw):
        return None
    loops = _direct_module(a, g)
    if loops is None:
        return None
    # (a as it comes: a first layer's NCHW images are read through their NHWC view while
    # padded, where NumPy's transposing copy of 3 channels cost ~0.4 ms a batch)
    g = np.ascontiguousarray(g)
    threads = parallel_loops.parallel_threads()
    scratch = _direct_scratch(threads, h, w, c_in, padding)
    taps = kh * kw * c_in
    offsets = _tap_offsets(kh, kw, scratch.shape[2], c_in)
    count = min(n, DIRECT_WEIGHT_GRAD_BLOCKS)
    parts = np.empty((count, offsets.size, c_out), np.float32)
    alpha, beta = _NO_BN_RELU if bn_relu is None else bn_relu
    if threads:
        if not _direct_loops.call(loops.weight_grad_blocks, a, g, stride, padding, offsets,
                                  scratch, parts, count, alpha, beta):
            return None
    else:
        kernel = (loops.weight_grad64 if c_out % 64 == 0 else
                  loops.weight_grad32 if c_out % 32 == 0 else loops.weight_grad16)
        xp = scratch[0]
        for i in range(count):
            s, e = n * i // count, n * (i + 1) // count
            parts[i] = 0.0
            if not _direct_loops.call(kernel, a[s:e], g[s:e], stride, padding, offsets, xp,
                                      xp.reshape(-1), parts[i], alpha, beta):
                return None
    total = np.empty(parts.shape[1:], np.float32)
    if not _direct_loops.call(loops.sum_in_order, parts, total):
        return None
    return total[:taps].reshape(kh, kw, c_in, c_out)


@functools.lru_cache(maxsize=64)
def _tap_offsets(kh: int, kw: int, wp: int, c_in: int) -> np.ndarray:
    """Each kernel tap's (i, j, c) offset in a flat padded scratch of rows ``wp`` x ``c_in``,
    padded to a multiple of 8 taps with offset 0 (read, then dropped); read-only, cached (it
    was ~5 us of NumPy calls per kernel gradient)."""
    taps = kh * kw * c_in
    offsets = np.zeros(-(-taps // 8) * 8, np.int64)
    offsets[:taps] = (np.arange(kh)[:, None, None] * (wp * c_in)
                      + np.arange(kw)[None, :, None] * c_in + np.arange(c_in)).reshape(-1)
    offsets.flags.writeable = False
    return offsets


def _direct_input_grad(g, b, stride: int, padding: int, in_hw: tuple):
    """conv_input_grad by the direct loops (``input_grad32``/``input_grad16``: taps grouped
    by column phase, no col2im scatter, no BLAS): (N, H, W, C_in), or None where they do not
    take it (C_in a multiple of 16 up to DIRECT_MAX_COUT, at most DIRECT_MAX_INPUT_GRAD_TAPS
    taps kh*kw*C_out, every column phase at least 8 positions: W // stride >= 8).

    NOTE: one thread, thread CPU time, batch 64, medians (machine shared): C16->32 32x32
    stride 2 2.52 -> 1.72 ms, C32->64 16x16 stride 2 1.75 -> 1.16 ms (oneDNN channels-last
    2.18 / 1.38). Images are independent: the same bits in a prange region or not."""
    kh, kw, c_in, c_out = b.shape
    n, h, w = g.shape[0], in_hw[0], in_hw[1]
    if (n == 0 or g.shape[3] != c_out or c_in % 16 or c_in > DIRECT_MAX_COUT
            or kh * kw * c_out > DIRECT_MAX_INPUT_GRAD_TAPS or w // stride < 8
            or padding >= min(kh, kw)):  # (the padded g's border is kh rows, kw columns)
        return None
    loops = _direct_module(g, b)
    if loops is None:
        return None
    g = np.ascontiguousarray(g)
    wt = np.ascontiguousarray(b.transpose(0, 1, 3, 2))  # (kh, kw, C_out, C_in)
    out = np.empty((n, h, w, c_in), np.float32)
    threads = parallel_loops.parallel_threads() if n > 1 else 0
    scratch = np.empty((max(1, threads), g.shape[1] + 2 * kh, g.shape[2] + 2 * kw, c_out),
                       np.float32)
    if threads:
        done = _direct_loops.call(loops.input_grad_blocks, g, wt, stride, padding, scratch,
                                  out, min(n, 2 * PRANGE_MIN_BLOCKS))
    else:
        kernel = loops.input_grad32 if c_in % 32 == 0 else loops.input_grad16
        done = _direct_loops.call(kernel, g, wt, stride, padding, scratch[0], out)
    return out if done else None


# -- the split by images ------------------------------------------------------------------------
#: smallest multiply-add count for which an im2col convolution is split by images across
#: needle's CPU threads (smaller ones lose more to the hand-off than they gain)
SPLIT_MIN_MACS = 1 << 22


def _image_chunks(n: int, macs: int, *arrays) -> list[tuple[int, int]] | None:
    """Contiguous image ranges [s, e) for splitting a convolution of ``n`` images across
    needle's threads (backend/cpu_threads.py), two per thread so one that shares its core
    takes fewer; None to run it whole (one thread, a small problem, CuPy arrays, or no hold
    on BLAS's threads: concurrent products on OpenBLAS's own threads ran slower)."""
    parts = min(cpu_threads.NUM_THREADS, n)
    if (parts < 2 or macs < SPLIT_MIN_MACS or not blas_threads.available()
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
    with blas_threads.hold():
        done = cpu_threads.in_parallel(
            lambda shared: [(s, images(s, e)) for s, e in shared], chunks,
            min(cpu_threads.NUM_THREADS, len(chunks)))
    return [result for _, result in sorted((pair for part in done for pair in part),
                                           key=lambda pair: pair[0])]


# -- the three convolutions ---------------------------------------------------------------------
def conv2d(a, b, stride: int, padding: int, bias=None):
    """``conv``: NHWC ``a`` (C_in channels) with a (kh, kw, C_in, C_out) kernel ``b`` ->
    C-contiguous (N, Ho, Wo, C_out); plus a (C_out,) ``bias`` where given (``conv_bias``),
    added where the output is written (by the Winograd output transform, or by the im2col
    product itself: a column of ones times a kernel row of biases), not in a pass of its own."""
    kh, kw, c_in, c_out = b.shape
    dtype = np.result_type(a.dtype, b.dtype)
    if bias is not None and np.result_type(dtype, bias.dtype) != dtype:
        return conv2d(a, b, stride, padding) + bias  # the bias widens the result's dtype
    out = _winograd(winograd.conv3x3, a, b, (kh, kw), stride, padding, c_in, c_out, bias)
    if out is not None:
        return out
    n = a.shape[0]
    ho = _out_size(a.shape[1], kh, stride, padding)
    wo = _out_size(a.shape[2], kw, stride, padding)
    out = _direct_conv(a, b, stride, padding, bias, ho, wo)
    if out is not None:
        return out
    xp = array_module(a)
    out = xp.empty((n, ho, wo, c_out), dtype)

    def with_bias(weight):
        """The kernel matrix with the bias as one more row: the patch matrices get a column
        of ones, so the product adds the bias (measured: the bias costs nothing then, where
        adding it to each chunk after its product cost as much as a pass of its own)."""
        if bias is None:
            return weight
        return xp.concatenate([weight, bias.reshape(1, c_out).astype(dtype)])

    if _use_nchw(a, ho * wo):
        # NCHW in memory: out (N, Ho*Wo, C_out) = cols.T @ W, per image, NHWC as it comes
        weight = with_bias(b.transpose(2, 0, 1, 3).reshape(c_in * kh * kw, c_out))
        if _prange_conv(a, weight, kh, kw, stride, padding, ho, wo, bias is not None, True,
                        out):
            return out

        def images(s: int, e: int) -> None:
            for start, end, buffer in _nchw_blocks(a, s, e, weight.shape[0], ho * wo):
                cols, _ = _im2col_nchw(a[start:end], kh, kw, stride, padding,
                                       bias is not None, buffer)
                xp.matmul(cols.transpose(0, 2, 1), weight,
                          out=out[start:end].reshape(end - start, ho * wo, c_out))
    else:
        weight = with_bias(b.reshape(-1, c_out))
        if _prange_conv(a, weight, kh, kw, stride, padding, ho, wo, bias is not None, False,
                        out):
            return out
        rows = ho * wo  # patch rows per image
        per_block = max(1, n)  # NumPy's im2col: one patch matrix per chunk (blocks: no gain)
        if type(a) is np.ndarray and cpu_kernels.enabled(a.dtype):
            per_block = max(1, IM2COL_BLOCK_BYTES // (rows * weight.shape[0] * a.dtype.itemsize))

        def images(s: int, e: int) -> None:
            # blocks of (nearly) equal size: a short last block made a thin, slow product
            count = max(1, -(-(e - s) // per_block))
            bounds = [s + (e - s) * i // count for i in range(count + 1)]
            buffer = (np.empty((-(-(e - s) // count) * rows, weight.shape[0]), a.dtype)
                      if count > 1 else None)  # one block's patches, reused
            for start, end in zip(bounds[:-1], bounds[1:]):
                cols, _ = _im2col(a[start:end], kh, kw, stride, padding, bias is not None,
                                  None if buffer is None else buffer[:(end - start) * rows])
                xp.matmul(cols, weight, out=out[start:end].reshape(-1, c_out))

    _by_images(images, _image_chunks(n, n * ho * wo * kh * kw * c_in * c_out, a, b), n)
    return out


def conv2d_weight_grad(a, g, kernel_hw: tuple, stride: int, padding: int):
    """``conv_weight_grad``: NHWC input ``a`` and the conv's output gradient ``g``
    (N, Ho, Wo, C_out) -> (kh, kw, C_in, C_out)."""
    kh, kw = kernel_hw
    n, c_in = a.shape[0], a.shape[3]
    ho, wo, c_out = g.shape[1:]
    out = _winograd(winograd.conv3x3_weight_grad, a, g, kernel_hw, stride, padding, c_in, c_out)
    if out is not None:
        return out
    out = _direct_weight_grad(a, g, kernel_hw, stride, padding)
    if out is not None:
        return out
    chunks = _image_chunks(n, n * ho * wo * kh * kw * c_in * c_out, a, g)
    if _use_nchw(a, ho * wo):
        xp = array_module(a)
        dtype = np.result_type(a.dtype, g.dtype)
        taps = c_in * kh * kw
        # one product per image, summed over all images at the end: the same sums, so the
        # same bits, however the images are split across threads
        g_first = _channels_first(g)
        products = xp.empty((n, c_out, taps) if g_first else (n, taps, c_out), dtype)

        def images_nchw(s: int, e: int) -> None:
            for s0, e0, buffer in _nchw_blocks(a, s, e, taps, ho * wo):
                cols, _ = _im2col_nchw(a[s0:e0], kh, kw, stride, padding, False, buffer)
                if g_first:  # (N, C_out, HW) @ (N, HW, C*kh*kw)
                    grads = g[s0:e0].transpose(0, 3, 1, 2).reshape(e0 - s0, c_out, ho * wo)
                    xp.matmul(grads, cols.transpose(0, 2, 1), out=products[s0:e0])
                else:  # (N, C*kh*kw, HW) @ (N, HW, C_out)
                    xp.matmul(cols, g[s0:e0].reshape(e0 - s0, ho * wo, c_out),
                              out=products[s0:e0])

        if not (chunks is not None and not g_first and _prange_weight_grad_nchw(
                a, g, kh, kw, stride, padding, products)):
            _by_images(images_nchw, chunks, n)
        total = products.sum(axis=0)
        return xp.ascontiguousarray(
            (total.T if g_first else total).reshape(c_in, kh, kw, c_out).transpose(1, 2, 0, 3))

    if type(a) is np.ndarray and type(g) is np.ndarray:
        return _weight_grad_blocks(a, g, kernel_hw, stride, padding, chunks is not None)

    def images(s: int, e: int):
        cols, _ = _im2col(a[s:e], kh, kw, stride, padding)
        return cols.T @ g[s:e].reshape(-1, c_out)

    return sum(_by_images(images, chunks, n)).reshape(kh, kw, c_in, c_out)


def _weight_grad_blocks(a, g, kernel_hw: tuple, stride: int, padding: int, split: bool):
    """conv_weight_grad of NumPy arrays in blocks of images whose patches (about
    IM2COL_BLOCK_BYTES) stay in cache between their copy and their product; each block's
    cols.T @ g is one partial sum, and the partials are added in block order. The blocks
    depend on the shapes only, so the result is the same on any number of threads (needle's
    threads share the blocks where ``split``; each reuses one patch buffer for the compiled
    im2col) and the same with NumPy's im2col (no numba), which pads a copy per block.

    NOTE: measured on one thread (CPU time, batch 64, k3, stride 2, loaded machine, alternating,
    medians of 25), one product per chunk -> blocks of 1 MB: C16->32 32x32 2.74 -> 2.27 ms,
    C32->64 16x16 1.63 -> 1.44 ms (blocks of 256 KB, 512 KB, 2 MB: slower than 1 MB); the
    product as g.T @ cols instead: 3-4% slower. Where it splits, the blocks run in one prange
    region instead where that runs (``_prange_weight_grad``: the same blocks and products)."""
    kh, kw = kernel_hw
    n, c_in = a.shape[0], a.shape[3]
    ho, wo, c_out = g.shape[1:]
    rows, taps = ho * wo, kh * kw * c_in
    count = -(-n // max(1, IM2COL_BLOCK_BYTES // (rows * taps * a.dtype.itemsize)))
    count = max(count, min(n, WEIGHT_GRAD_MIN_BLOCKS), 1)  # enough to share out evenly
    bounds = [n * i // count for i in range(count + 1)]
    blocks = list(enumerate(zip(bounds[:-1], bounds[1:])))
    parts: list = [None] * count
    dtype = np.result_type(a.dtype, g.dtype)

    def work(shared) -> None:
        buffer = np.empty((-(-n // count) * rows, taps), a.dtype)  # one block's patches
        for i, (s, e) in shared:
            cols, _ = _im2col(a[s:e], kh, kw, stride, padding, out=buffer[:(e - s) * rows])
            parts[i] = np.matmul(cols.T, g[s:e].reshape(-1, c_out), dtype=dtype)

    in_prange = _prange_weight_grad(a, g, kernel_hw, stride, padding, count) if split else None
    if in_prange is not None:
        parts = list(in_prange)
    elif split and count > 1:
        with blas_threads.hold():
            cpu_threads.in_parallel(work, blocks, min(cpu_threads.NUM_THREADS, count))
    else:
        work(iter(blocks))
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total.reshape(kh, kw, c_in, c_out)


def conv2d_input_grad(g, b, stride: int, padding: int, in_hw: tuple):
    """``conv_input_grad``: the output gradient ``g`` (N, Ho, Wo, C_out) and the kernel ``b``
    -> (N, H, W, C_in) for the conv input's size ``in_hw = (H, W)``."""
    kh, kw, c_in, c_out = b.shape
    if g.shape[3] == c_out:
        out = _winograd(winograd.conv3x3_input_grad, g, b, (kh, kw), stride, padding, c_in,
                        c_out)
        if out is not None:
            return out
    out = _direct_input_grad(g, b, stride, padding, in_hw)
    if out is not None:
        return out
    out = _col2im_compiled(g, b, stride, padding, in_hw)
    if out is not None:
        return out
    return _col2im_by_phases(g, b, stride, padding, in_hw)


def _col2im_compiled(g, b, s: int, p: int, in_hw: tuple):
    """conv_input_grad as one matrix product for all kh*kw taps (c_in*kh*kw columns: a wider,
    faster product than kh*kw thin ones), then one compiled scatter pass (cpu_kernels.col2im,
    numba; CNN step -17%), per block of images in one prange region where that runs
    (``_prange_input_grad``); None where the compiled loop cannot run."""
    dtype = np.result_type(g.dtype, b.dtype)
    if not (isinstance(g, np.ndarray) and isinstance(b, np.ndarray)
            and cpu_kernels.enabled(dtype)):
        return None
    n, ho, wo, c_out = g.shape
    kh, kw, c_in, _ = b.shape
    h, w = in_hw
    weights = b.transpose(3, 0, 1, 2).reshape(c_out, kh * kw * c_in)
    in_prange = _prange_input_grad(g, weights, (n, h, w, c_in), kh, kw, s, p)
    if in_prange is not None:
        return in_prange
    out = np.empty((n, h, w, c_in), dtype)

    rows, width = ho * wo, kh * kw * c_in
    per_block = max(1, IM2COL_BLOCK_BYTES // (rows * width * np.dtype(dtype).itemsize))

    def images(start: int, end: int) -> bool:
        # blocks of images whose taps (about IM2COL_BLOCK_BYTES) stay in cache between the
        # product and the scatter; images are independent, so the same bits as one block
        # (one thread, CPU time, loaded machine: N64 stride 2 C16->32 32x32 2.30 -> 2.18 ms,
        # C32->64 16x16 1.58 -> 1.46 ms)
        count = max(1, -(-(end - start) // per_block))
        bounds = [start + (end - start) * i // count for i in range(count + 1)]
        buffer = np.empty((-(-(end - start) // count) * rows, width), dtype)
        for s0, e0 in zip(bounds[:-1], bounds[1:]):
            taps = np.matmul(g[s0:e0].reshape(-1, c_out), weights, dtype=dtype,
                             out=buffer[:(e0 - s0) * rows])
            if cpu_kernels.col2im(taps, (e0 - s0, h, w, c_in), ho, wo, kh, kw, s, p,
                                  out=out[s0:e0]) is None:
                return False
        return True

    chunks = _image_chunks(n, n * ho * wo * kh * kw * c_in * c_out, g, b)
    return out if all(_by_images(images, chunks, n)) else None


def _col2im_by_phases(g, b, s: int, p: int, in_hw: tuple):
    """conv_input_grad in NumPy: kh*kw thin products, each scattered into its stride phase."""
    n, ho, wo, c_out = g.shape
    kh, kw, c_in, _ = b.shape
    h, w = in_hw
    xp = array_module(g)
    dtype = np.result_type(g.dtype, b.dtype)
    hq, wq = -(-(h + 2 * p) // s), -(-(w + 2 * p) // s)
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
