"""3x3 stride-1 convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray, 2016).

Why: a 3x3 convolution over C channels costs 9 C multiply-adds per output value; im2col
turns that into one BLAS product, and on a CNN's small channel counts that product plus the
9x patch copy is most of a training step. Winograd's F(4x4, 3x3) computes each 4x4 output
tile from a 6x6 input tile with 36 products per (input, output) channel pair instead of 144:
4x fewer multiply-adds, done as 36 independent (tiles x C_in) @ (C_in x C_out) products, with
cheap additions before (input transform B^T d B) and after (output transform A^T m A):

    y_tile = A^T [ (G w G^T) * (B^T d_tile B) ] A       summed over input channels

The three adjoints of ``conv`` (core/ops_conv.py, kernels/conv.py) all become such products:

    conv(x, w)                   M = V(x) @ U(w)                 y = A^T M A
    conv_input_grad(g, w)        a conv of g with the flipped, transposed kernel (stride 1)
    conv_weight_grad(x, g)       dU = V(x)^T @ (A g A^T)         dw = G^T dU G

The work goes in blocks of up to BLOCK_TILES tiles: transform a block's input tiles, take the
36 products for the block, transform back. A block's tiles (tiles x 36 x C floats) stay in
the core's L2 cache between the three steps instead of making three trips through memory
(layer 3 of the benchmark CNN: 16.5 -> 10.7 ms on one thread), and blocks are independent,
so needle's CPU threads (backend/cpu_threads.py) share them: 5.7 ms on two, where im2col
took 27.6. The kernel gradient of a wide layer on few tiles (a 128 x 128 layer on a 4x4
map) instead transforms all tiles first and takes each position's product over all of
them (``_weight_grad_whole``); otherwise it sums float32 partials over 8 chunks of tiles
fixed by the shape, each chunk's 36 products added up by OpenBLAS's gemm itself
(``_chunked_weight_grad``, one prange region). The tile transforms are numba loops
(numba_winograd.py).
Without numba, and for other kernels, strides or dtypes, conv.py keeps its im2col path.

NOTE: threads of our own rather than numba's ``parallel=True``: OpenBLAS's worker threads
spin after every large product and numba's pool fought them for the two cores (CNN step
105 -> 170 ms). A block's products are too small for OpenBLAS to start its own threads.

Winograd trades a little accuracy for speed, as cuDNN's and oneDNN's Winograd convolutions
do: in float32 the results differ from exact by a few 1e-6 of the output's largest value,
about 10x im2col's rounding (tests/test_winograd.py bounds it against float64). Used for
float32 only: float64 (finite-difference checks) keeps the im2col path. ``ENABLED = False``
turns it off.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..backend import cpu_threads, parallel_loops
from ..backend.numba_support import NumbaLoops, numba_module
from . import blas_threads, openblas_gemm

__all__ = ["BLOCK_TILES", "ENABLED", "PRANGE_ENABLED", "applies", "conv3x3",
           "conv3x3_input_grad", "conv3x3_weight_grad"]

#: turn the Winograd path off (kernels/conv.py then runs im2col for every convolution):
#: ``needle.kernels.winograd.ENABLED = False``
ENABLED = True

#: smallest channel counts for which the transforms pay (below them the product is too thin)
MIN_CHANNELS = 8

#: smallest height and width of the map a conv tiles (its input; the output gradient for
#: conv_input_grad). Measured at 128 x 128 channels, batch 64, on one and two threads: on a
#: 2x2 map (a 4x4 tile for 4 outputs) im2col took half Winograd's time; on 3x3 the two
#: were even; on 4x4 Winograd took 0.6x im2col's
MIN_MAP = 3

#: largest C_in * C_out that takes the path. Measured (2 threads): 2-4x faster than im2col
#: up to 128 x 128 channels, even at 128 x 256 and slower beyond, where im2col's one large
#: product runs near BLAS peak and the blocks, sized for the cache, get too thin
MAX_CHANNEL_PRODUCT = 128 * 128

#: most tiles per block: a block's transformed tiles (36 x C floats each) stay in L2 cache
BLOCK_TILES = 128

#: bytes of a block's input and output tiles that _block_tiles aims at
BLOCK_BYTES = 2 * 2**20

#: the kernel gradient transforms all tiles first and takes each position's product over all
#: of them where the transformed tiles take at most this many bytes (``_weight_grad_whole``)
WHOLE_BYTES = 16 * 2**20

#: tile positions (of 36) a thread takes at a time for the kernel gradient's products
POSITIONS_PER_DRAW = 3


# F(4x4, 3x3) with interpolation points 0, 1, -1, 2, -2 and infinity
_G = np.array([[1 / 4, 0, 0],
               [-1 / 6, -1 / 6, -1 / 6],
               [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6],
               [1 / 24, -1 / 12, 1 / 6],
               [0, 0, 1]])


@functools.lru_cache(maxsize=1)
def _kernels() -> Any:
    if numba_module() is None:
        return None
    from . import numba_winograd

    return numba_winograd


#: set when numba fails to compile a transform here: the im2col path runs from then on
_disabled: list[bool] = []


def applies(x: Any, other: Any, kernel_hw: tuple, stride: int, padding: int, c_in: int,
            c_out: int) -> bool:
    """Whether the Winograd path takes this convolution: float32 NumPy operands ``x`` and
    ``other`` (the kernel, or the output gradient), a 3x3 kernel, stride 1, padding <= 2
    (conv_input_grad pads by 2 - padding), maps and channel counts where it pays, and numba."""
    return (ENABLED and stride == 1 and 0 <= padding <= 2 and tuple(kernel_hw) == (3, 3)
            and type(x) is np.ndarray and type(other) is np.ndarray
            and min(x.shape[1], x.shape[2]) >= MIN_MAP
            and x.dtype == np.float32 and other.dtype == np.float32
            and min(c_in, c_out) >= MIN_CHANNELS and c_in * c_out <= MAX_CHANNEL_PRODUCT
            and not _disabled and _kernels() is not None)


_local = threading.local()


def _scratch(slot: str, shape: tuple, dtype: Any) -> np.ndarray:
    """A per-thread buffer for one block's tiles, reused from call to call."""
    size = int(np.prod(shape))
    buffer = getattr(_local, slot, None)
    if buffer is None or buffer.dtype != dtype or buffer.size < size:
        buffer = np.empty(size, dtype)
        setattr(_local, slot, buffer)
    return buffer[:size].reshape(shape)


def _in_parallel(work: Callable[[Iterator[tuple[int, int]]], Any], n_tiles: int,
                 block: int) -> list | None:
    """``work(blocks)`` on up to NUM_THREADS threads (backend/cpu_threads.py), all drawing
    (first tile, tile count) blocks of ``block`` tiles from one shared iterator; their
    results, or None if numba could not compile a transform (the caller falls back to im2col).

    NOTE: blocks are drawn, not dealt out in advance: a thread that shares its core (OpenBLAS
    workers spin for a while after each large product) then takes fewer blocks, where a fixed
    split waited for it (1.9x slower right after a large product).
    """
    parts = max(1, min(cpu_threads.NUM_THREADS, -(-n_tiles // block)))
    blocks = ((t0, min(block, n_tiles - t0)) for t0 in range(0, n_tiles, block))
    try:
        return cpu_threads.in_parallel(work, blocks, parts)
    except numba_module().core.errors.NumbaError:
        _disabled.append(True)
        return None


def _tile_grid(h: int, w: int) -> tuple[int, int]:
    return -(-h // 4), -(-w // 4)


#: (G w G^T) and G^T dU G as one (36, 9) and one (9, 36) matrix: U = _GG @ w viewed as
#: (9, C_in * C_out), dw = _GG.T @ dU viewed as (36, C_in * C_out)
_GG = np.kron(_G, _G)


#: the two transform matrices in float32, C-contiguous (the compiled products' operands)
_GG32 = _GG.astype(np.float32)
_GGT32 = np.ascontiguousarray(_GG.T.astype(np.float32))

#: the compiled transform products (latched apart: a failure there leaves BLAS's products)
_transform_loops = NumbaLoops("needle.kernels.numba_winograd")

#: columns (C_in * C_out) from which the compiled transform runs as TBB blocks, and how many
_TRANSFORM_PRANGE_COLUMNS = 4096
_TRANSFORM_BLOCKS = 8


def _transform_product(t: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``t @ m`` for a transform matrix ``t`` (_GG or its transpose, in m's dtype) and a (K, N)
    matrix ``m``. float32: numba_winograd.transform_columns where numba runs (on TBB's threads
    from _TRANSFORM_PRANGE_COLUMNS columns), the bits of OpenBLAS's product; elsewhere (and
    where numba fails) the product itself, BLAS held on one thread.

    NOTE: OpenBLAS threaded this product, and its worker then spun on the second core while
    needle's threads ran the tiles (ResidualCNN step, 2 threads: CPU time per step 128 -> 62
    ms), so it is held. Its K of 9 or 36 is too thin for OpenBLAS's packed kernel: at 128 x
    128 channels one thread took 250-280 us a transform; the compiled loop ~155 us on one
    thread, ~80 on two."""
    if m.dtype == np.float32 and m.flags.c_contiguous and m.shape[1] >= 2:
        kernels = _transform_loops.module()
        if kernels is not None:
            t32 = _GG32 if t.shape == _GG32.shape else _GGT32
            out = np.empty((t32.shape[0], m.shape[1]), np.float32)
            n = m.shape[1]
            if n >= _TRANSFORM_PRANGE_COLUMNS and parallel_loops.parallel_threads():
                parallel = _parallel_loops.module()
                if parallel is not None and _parallel_loops.call(
                        parallel.transform_columns, t32, m, out, _TRANSFORM_BLOCKS):
                    return out
            if _transform_loops.call(kernels.transform_columns, t32, m, out, 0, n):
                return out
    with blas_threads.hold():
        return t.astype(m.dtype) @ m


def _kernel_transform(w: np.ndarray) -> np.ndarray:
    """U: (36, C_in, C_out) with U[6a + b] = (G w G^T)[a, b], one (36, 9) @ (9, C_in * C_out)
    product in w's dtype (``_transform_product``); its float32 sums of 9 terms round far
    below Winograd's own error (two float64 products with casts took 0.78 ms where the
    float32 product took 0.27 at 128 x 128 channels).
    NOTE: np.einsum("ai,ijco,bj->abco") took 18x longer (512x512)."""
    c_in, c_out = w.shape[2:]
    return _transform_product(_GG, np.ascontiguousarray(w).reshape(9, -1)) \
        .reshape(36, c_in, c_out)


def _kernel_adjoint(du: np.ndarray, dtype: Any) -> np.ndarray:
    """dw: (3, 3, C_in, C_out) = G^T dU G for dU (36, C_in, C_out), the adjoint of
    _kernel_transform (one (9, 36) product)."""
    c_in, c_out = du.shape[1:]
    return _transform_product(_GG.T, np.ascontiguousarray(du).reshape(36, -1)) \
        .reshape(3, 3, c_in, c_out).astype(dtype, copy=False)


def _block_tiles(n_tiles: int, c_in: int, c_out: int) -> int:
    """Tiles per block: at most BLOCK_TILES, fewer for wide layers (a block's tiles should
    stay near the L2 cache), and few enough that every thread gets blocks to draw."""
    by_cache = BLOCK_BYTES // (36 * 4 * (c_in + c_out))
    by_threads = -(-n_tiles // (2 * cpu_threads.NUM_THREADS))
    return max(8, min(BLOCK_TILES, by_cache, by_threads))


#: the transforms' (alpha, beta) where the input is taken as it is (no BatchNorm + ReLU)
_NO_BN_RELU = (np.empty(0, np.float32), np.empty(0, np.float32))


def conv3x3(x: np.ndarray, w: np.ndarray, padding: int, bias: np.ndarray | None = None,
            bn_relu: tuple | None = None) -> np.ndarray | None:
    """``conv(x, w, stride=1, padding)`` for NHWC ``x`` and a (3, 3, C_in, C_out) kernel, plus
    a (C_out,) ``bias`` where given (added by the output transform, no pass of its own); None
    where numba cannot compile the transforms: the caller takes the im2col path.
    ``bn_relu``: float32 per-channel (alpha, beta): convolve relu(x * alpha + beta) instead,
    made as the input tiles are read (kernels/conv_bn_relu.py)."""
    n, h, wd, c_in = x.shape
    alpha, beta = _NO_BN_RELU if bn_relu is None else bn_relu
    c_out = w.shape[3]
    ho, wo = h + 2 * padding - 2, wd + 2 * padding - 2
    th, tw = _tile_grid(ho, wo)
    n_tiles = n * th * tw
    block = _block_tiles(n_tiles, c_in, c_out)
    x = np.ascontiguousarray(x)
    u = _kernel_transform(w)
    out = np.empty((n, ho, wo, c_out), x.dtype)
    shift = (np.empty(0, x.dtype) if bias is None
             else np.ascontiguousarray(bias, dtype=x.dtype).reshape(c_out))
    kernels = _kernels()
    if _prange_conv3x3(kernels, x, u, out, shift, padding, (th, tw), block, (alpha, beta)):
        return out

    def work(blocks: Iterator[tuple[int, int]]) -> None:
        v = _scratch("v", (block, 36, c_in), x.dtype)
        m = _scratch("m", (block, 36, c_out), x.dtype)
        for t0, count in blocks:
            kernels.input_tiles(x, padding, th, tw, t0, v[:count], alpha, beta)
            np.matmul(v[:count].transpose(1, 0, 2), u, out=m[:count].transpose(1, 0, 2))
            kernels.output_tiles(m[:count], th, tw, t0, out, shift)

    return None if _in_parallel(work, n_tiles, block) is None else out


#: the prange loops (kernels/numba_parallel_conv.py), latched apart from the transforms
_parallel_loops = NumbaLoops("needle.kernels.numba_parallel_conv")

#: whether conv3x3 takes its prange path where it can run (False: needle's threads, as
#: before; for A/B measurements)
PRANGE_ENABLED = True


def _prange_conv3x3(kernels: Any, x: np.ndarray, u: np.ndarray, out: np.ndarray,
                    shift: np.ndarray, padding: int, grid: tuple[int, int], block: int,
                    bn_relu: tuple = ()) -> bool:
    """conv3x3's blocks of tiles (the same blocks) in one numba prange region on the TBB
    threads, each block's transforms and 36 products (NumPy's OpenBLAS gemm,
    kernels/openblas_gemm.py, BLAS held on one thread) on one thread: the same products as
    ``work``'s matmul, so the same bits, without the hand-off to needle's threads
    (kernels/conv.py ``_prange_conv`` says what it saves). False (nothing written) where it
    does not run: no TBB or one thread, BLAS's thread count not settable, no OpenBLAS gemm,
    numba failed, or ``kernels`` (``_kernels()``) is not numba_winograd itself (the loop calls its
    transforms directly).

    NOTE: measured (session 10, 2 threads, loaded shared machine, nice -15, alternating, 12
    rounds, paired medians), forward with bias, batch 64: 32x32 16->32 0.96x, 32x32 32->64
    0.84x, 16x16 16->64 0.89x, 8x8 64->128 0.86x, 4x4 128->128 0.89x the threaded path's
    time; the CNN steps it is in (strides 1,1,1; ResidualCNN) moved 0.97-0.98x, within noise."""
    if not PRANGE_ENABLED or getattr(kernels, "__name__", None) != \
            __package__ + ".numba_winograd" or not blas_threads.available():
        return False
    threads = parallel_loops.parallel_threads()
    gemm = openblas_gemm.gemm(np.float32) if threads else None
    loops = _parallel_loops.module() if gemm is not None else None
    if loops is None:
        return False
    th, tw = grid
    n_tiles = x.shape[0] * th * tw
    v = np.empty((threads, block, 36, x.shape[3]), x.dtype)
    m = np.empty((threads, block, 36, out.shape[3]), x.dtype)
    with blas_threads.hold():
        return _parallel_loops.call(loops.winograd, gemm, x, padding, th, tw, u, out, shift,
                                    block, n_tiles, v, m, *(bn_relu or _NO_BN_RELU))


def conv3x3_input_grad(g: np.ndarray, w: np.ndarray, padding: int) -> np.ndarray | None:
    """``conv_input_grad(g, w, stride=1, padding)``: the conv of ``g`` with the kernel flipped
    in space and transposed in channels, padded by ``2 - padding``."""
    return conv3x3(g, np.ascontiguousarray(w[::-1, ::-1].transpose(0, 1, 3, 2)), 2 - padding)


def conv3x3_weight_grad(x: np.ndarray, g: np.ndarray, padding: int,
                        bn_relu: tuple | None = None) -> np.ndarray | None:
    """``conv_weight_grad(x, g, (3, 3), stride=1, padding)``: the adjoint of conv3x3 in the
    kernel, dU = sum over tiles of V^T (A g A^T) per tile position, then dw = G^T dU G.

    Where all tiles fit in WHOLE_BYTES (``_weight_grad_whole``) each of the 36 products runs
    once over all tiles; otherwise, where NumPy's BLAS is OpenBLAS, float32 partial sums over
    chunks of tiles fixed by the shape (``_chunked_weight_grad``); elsewhere each thread adds
    its blocks' float32 products in float64. In every case the result does not depend on
    which thread took which block, nor on the thread count. ``bn_relu``: as conv3x3's."""
    n, ho, wo, c_out = g.shape
    bn = _NO_BN_RELU if bn_relu is None else bn_relu
    c_in = x.shape[3]
    th, tw = _tile_grid(ho, wo)
    n_tiles = n * th * tw
    x, g = np.ascontiguousarray(x), np.ascontiguousarray(g)
    chunk_block = _chunk_block(n_tiles, c_in, c_out)
    if _whole_pays(n_tiles, c_in, c_out, chunk_block, x.itemsize):
        return _weight_grad_whole(x, g, padding, (th, tw), _block_tiles(n_tiles, c_in, c_out),
                                  bn)
    chunked = _chunked_weight_grad(x, g, padding, (th, tw), chunk_block, bn)
    if chunked is not None:
        return chunked
    block = _block_tiles(n_tiles, c_in, c_out)
    kernels = _kernels()

    def work(blocks: Iterator[tuple[int, int]]) -> np.ndarray:
        v = _scratch("v", (block, 36, c_in), x.dtype)
        gt = _scratch("m", (block, 36, c_out), x.dtype)
        du = np.zeros((36, c_in, c_out))
        for t0, count in blocks:
            kernels.input_tiles(x, padding, th, tw, t0, v[:count], *bn)
            kernels.gradient_tiles(g, th, tw, t0, gt[:count])
            du += np.matmul(v[:count].transpose(1, 2, 0), gt[:count].transpose(1, 0, 2))
        return du

    parts = _in_parallel(work, n_tiles, block)
    if parts is None:
        return None
    return _kernel_adjoint(sum(parts), x.dtype)


#: chunks of tiles the kernel gradient's float32 partial sums are taken over
#: (``_chunked_weight_grad``): fixed by the shape, never by the thread count, so that the
#: result is the same on any; 8 lets two threads that draw them split the work 5:3 at worst
WEIGHT_GRAD_CHUNKS = 8

#: the kernel gradient's prange loop (kernels/numba_parallel_winograd.py), latched apart
_winograd_loops = NumbaLoops("needle.kernels.numba_parallel_winograd")


def _chunk_block(n_tiles: int, c_in: int, c_out: int) -> int:
    """Tiles per block of the kernel gradient, from the shape alone: at most BLOCK_TILES,
    fewer for wide layers (a block's transformed tiles stay near the L2 cache), and few
    enough for WEIGHT_GRAD_CHUNKS chunks of whole blocks."""
    by_cache = BLOCK_BYTES // (36 * 4 * (c_in + c_out))
    by_chunks = -(-n_tiles // WEIGHT_GRAD_CHUNKS)
    return max(8, min(BLOCK_TILES, by_cache, by_chunks))


def _chunked_weight_grad(x: np.ndarray, g: np.ndarray, padding: int, grid: tuple[int, int],
                         block: int, bn_relu: tuple = ()) -> np.ndarray | None:
    """dw from float32 partial sums of dU over WEIGHT_GRAD_CHUNKS chunks of whole blocks of
    ``block`` tiles, added up in chunk order (in float64) before G^T dU G. Each chunk is one
    call of numba_winograd.weight_grad_chunk: per block, the transforms laid out by tile
    position ((36, tiles, C): each position's product reads two contiguous matrices) and 36
    gemms by NumPy's OpenBLAS (kernels/openblas_gemm.py) that add into the chunk's partial
    (beta 1), BLAS held on one thread. The chunks run in one prange region on TBB where that
    runs and BLAS can be held on one thread (kernels/blas_threads.py), else on
    needle's threads: the same chunks, the same bits (OpenBLAS splits a product's rows and
    columns across its threads, never the sums). None where NumPy's BLAS is not OpenBLAS or
    numba could not compile the loop (the caller goes on to its float64 blocks).

    NOTE: measured against those float64 blocks (batch 64, 2 threads, the shared machine
    loaded, alternating in one process, medians of 7 rounds, process CPU time): 32x32 maps
    32 -> 64 channels 0.68-0.72x, 16 -> 32 0.84-0.88x; 16x16 64 -> 64 0.63-0.72x. Whole
    steps (strides 1,1,1 and ResidualCNN, eager and jitted) 0.92-0.97x CPU time. Laying out
    the forward's tiles by position as well did not pay (0.93-1.10x); neither did blocks of
    64 tiles or 4 or 16 chunks (within noise). Where the whole path takes a shape
    (_whole_pays) chunks were slower (128 x 128 on 4x4 maps: 4.4x, 64 x 128 on 8x8: 1.2x)."""
    kernels = _kernels()
    if getattr(kernels, "__name__", None) != __package__ + ".numba_winograd":
        return None
    alpha, beta = bn_relu or _NO_BN_RELU
    gemm = openblas_gemm.gemm(x.dtype)
    if gemm is None:
        return None
    th, tw = grid
    n_tiles = x.shape[0] * th * tw
    c_in, c_out = x.shape[3], g.shape[3]
    n_blocks = -(-n_tiles // block)
    chunks = min(WEIGHT_GRAD_CHUNKS, n_blocks)
    parts = np.empty((chunks, 36, c_in, c_out), x.dtype)
    threads = parallel_loops.parallel_threads() if blas_threads.available() else 0
    loops = _winograd_loops.module() if threads else None
    with blas_threads.hold():
        if loops is None or not _winograd_loops.call(
                loops.weight_grad, gemm, x, g, padding, th, tw, block, n_tiles, parts,
                np.empty((threads, 36 * block * c_in), x.dtype),
                np.empty((threads, 36 * block * c_out), x.dtype), alpha, beta):

            def work(shared: Iterator[tuple[int, int]]) -> None:
                v = _scratch("v", (36 * block * c_in,), x.dtype)
                gt = _scratch("m", (36 * block * c_out,), x.dtype)
                for c, _ in shared:
                    kernels.weight_grad_chunk(
                        gemm, x, g, padding, th, tw, n_blocks * c // chunks * block,
                        min(n_blocks * (c + 1) // chunks * block, n_tiles), block, parts[c],
                        v, gt, alpha, beta)

            if _in_parallel(work, chunks, 1) is None:
                return None
    return _kernel_adjoint(parts.sum(axis=0, dtype=np.float64), x.dtype)


def _whole_pays(n_tiles: int, c_in: int, c_out: int, block: int, itemsize: int) -> bool:
    """Whether the kernel gradient takes ``_weight_grad_whole``: its tiles fit WHOLE_BYTES and
    the blocked path's float64 sums (36 C_in C_out per block) would cost more than the
    whole path's extra trip through memory (36 (C_in + C_out) per tile).

    NOTE: measured on one thread: whole 1.9x faster at 128 x 128 channels on 4x4 maps, 1.3x
    at 64 x 128 on 8x8; 1.8x slower at 16 x 64 on 16x16 (1024 tiles of few channels)."""
    return (n_tiles * 36 * (c_in + c_out) * itemsize <= WHOLE_BYTES
            and 2 * c_in * c_out >= block * (c_in + c_out))


def _weight_grad_whole(x: np.ndarray, g: np.ndarray, padding: int, grid: tuple[int, int],
                       block: int, bn_relu: tuple = ()) -> np.ndarray | None:
    """conv3x3_weight_grad in two parallel passes: every tile's transforms (threads share
    blocks of tiles), then the 36 products dU[p] = V[:, p]^T @ (A g A^T)[:, p], each over
    all tiles at once (threads share the positions p) and in float32, straight into dU.

    NOTE: for small maps (ResidualCNN's 128 x 128 layer on 4x4 and 3x3 maps: 64 tiles) the
    blocked path took 4-8x im2col's time: per thread a float64 dU of 36 C_in C_out values
    zeroed, added to per block of 16 tiles and summed, where the products themselves are
    small. Each dU[p] here is one product, whichever thread runs it: the result does not
    depend on the thread count."""
    th, tw = grid
    n_tiles = x.shape[0] * th * tw
    c_in, c_out = x.shape[3], g.shape[3]
    kernels = _kernels()
    v = np.empty((n_tiles, 36, c_in), x.dtype)
    gt = np.empty((n_tiles, 36, c_out), x.dtype)

    def transforms(blocks: Iterator[tuple[int, int]]) -> None:
        for t0, count in blocks:
            kernels.input_tiles(x, padding, th, tw, t0, v[t0:t0 + count],
                                *(bn_relu or _NO_BN_RELU))
            kernels.gradient_tiles(g, th, tw, t0, gt[t0:t0 + count])

    if _in_parallel(transforms, n_tiles, block) is None:
        return None
    du = np.empty((36, c_in, c_out), x.dtype)

    def products(positions: Iterator[tuple[int, int]]) -> None:
        for p0, count in positions:
            np.matmul(v[:, p0:p0 + count].transpose(1, 2, 0),
                      gt[:, p0:p0 + count].transpose(1, 0, 2), out=du[p0:p0 + count])

    with blas_threads.hold():
        _in_parallel(products, 36, POSITIONS_PER_DRAW)
    return _kernel_adjoint(du, x.dtype)
