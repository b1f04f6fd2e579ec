"""OpenBLAS held on ONE thread for a whole run of a jitted plan, its large products split
into row or column blocks on numba's TBB threads instead (kernels/numba_parallel_gemm.py).

Why: after every product that OpenBLAS threads (anything over ~262k multiply-adds: the
LSTM's per-step 32 x 128 x 512 products, a Transformer's projections), its worker thread
spins ~0.1 s and takes the second core from the numba ``prange`` passes that follow (the
vocabulary head's softmax pass 10.1 vs 6.2 ms; session 10). Splitting only the head's
products did not pay (the other products still woke the worker: 1.41x slower), and
``OPENBLAS_THREAD_TIMEOUT`` is the host's setting, read when NumPy loads. Here, for the
length of a plan run, OpenBLAS is held on one thread (kernels/blas_threads.py: ~0.2 us,
process-wide, counted across threads) and restored after: small products
run on the calling thread with no hand-off, OpenBLAS's worker is never woken and never
spins, and products of ``MIN_MACS`` or more multiply-adds run as blocks in one prange
region, each block one OpenBLAS gemm call over the whole K.

Bits: a product's bits are those of OpenBLAS's ONE-thread product, whatever the thread
count (a block is a product over the same K of fewer rows or columns, starting on an
``ALIGN`` line: the same bits, tests; 0 of ~450 random float32 shapes differed, blocks down
to 2^18 multiply-adds). NOTE: OpenBLAS's two-thread product gives other bits than its
one-thread product in ~60% of random shapes (~1 ulp: its split of the rows at no multiple
of its kernel's tile), so with this module needle's products no longer change bits with
the BLAS thread count, but differ from the two-thread products before it by rounding.
float64 blocks do not keep dgemm's one-thread bits (~1e-14): float32 only; a large product
that does not split (float64, a batch, other strides) gets OpenBLAS's threads back for its
own call, as before this module, where no other thread holds BLAS meanwhile
(blas_threads.lend_threads; else it runs on one thread).

Eager ops (``EAGER``, off: see there): outside a plan's run each product of ``matmul`` that
OpenBLAS might thread would hold BLAS on one thread for itself (~1.5 us a product), large
ones as blocks.

Any thread holds (the count is the process's; blas_threads counts the holders, so one
thread's release never cuts another's hold short). Without NumPy's OpenBLAS or numba's TBB
layer nothing is held and products are NumPy's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..backend import parallel_loops
from ..backend.numba_support import NumbaLoops
from . import blas_threads, openblas_gemm, recycle

__all__ = ["ENABLED", "hold_one_thread", "held", "matmul", "split_with_epilogue",
           "transposed_matmul"]

#: the policy's switch (benchmarks turn it off for A/B runs)
#: NOTE measured (session 11, 2 threads, one plan per model, the policy switched per round,
#: 5 steps a round; the machine shared with 3-4 other helpers' benchmarks, the CPU time other
#: processes used read from /proc/stat per round; benchmarks/ab_blas_policy.py):
#: jitted LM steps, quiet rounds (other processes < 0.25 cores), off -> on: LSTM 65.0 -> 59.3
#: ms (0.912, n 40/40), 70.6 -> 65.9 (0.933; PyTorch eager 102.3: 0.690 -> 0.644), 70.1 ->
#: 68.9 (0.98); Transformer 70.3 -> 63.0 (0.896), 75.2 -> 69.9 (0.929; PyTorch eager 120.8:
#: 0.623 -> 0.578). Blocks from 2^22 / 2^23 / 2^24 multiply-adds: LSTM 0.977 / 0.982 / 0.960
#: (n 15-20); BLAS held without blocks 1.49x (the head's products on one core). Quiet too:
#: MLP-ResNet jit epoch 135.4 -> 135.6 ms (1.001, n 8/8), large MLP jit step 223.7 -> 218.6
#: (0.977, n 6/6); with ``EAGER`` the MLP-ResNet eager epoch 191.6 -> 185.6 (0.968, n 6/4).
#: Other processes using ~1-1.5 cores (OpenBLAS's two threads then wait for a core at every
#: product): LSTM jit 346 -> 227 ms (0.66), Transformer jit 558 -> 254 (0.46), MLP-ResNet
#: jit epoch 2.94 -> 0.26 s (0.09), CNN jit s111 0.91 / 1.09 / 1.03, s122 0.69 / 1.00 /
#: 1.02, ResidualCNN 0.99 / 0.91 (level: their products are inside the conv kernels, which
#: held BLAS on one thread already; profile per op level), the large MLP jit step 0.81 /
#: 0.77; eager (``EAGER``): LSTM 0.63, Transformer 0.46, MLP-ResNet epoch 0.22.
ENABLED = True
#: hold BLAS on one thread for each product of ``matmul`` outside a plan's run too (eager ops
#: and Session steps), from ``EAGER_MIN_MACS`` multiply-adds: those split into blocks, with
#: the bits of the jitted plans' products (which hold BLAS for their whole run).
#: NOTE measured (session 12, quiet machine, benchmarks/ab_blas_policy.py --switch eager,
#: alternating rounds), with the hold from 2^16 multiply-adds (every product OpenBLAS might
#: thread): eager LSTM 0.927, Transformer 0.903, large MLP 0.984, CNN s122 1.019, MLP-ResNet
#: 1.112 (its 7.8M and 0.5M products then on one core; jitted 1.060). From 2^23 (only the
#: products that split) the MLP-ResNet keeps OpenBLAS's threads. Before session 12 the hold
#: ran on the main thread only, and this switch broke tests/test_remote.py's bit-identical
#: training (a server thread's products kept OpenBLAS's two-thread bits); kernels/
#: blas_threads.py's hold is process-wide.
EAGER = True
#: ... from this many multiply-adds (per matrix of a batch): the products that split
EAGER_MIN_MACS = 1 << 23
#: fewest multiply-adds of a product split into blocks while held (smaller ones run on the
#: held thread).
#: NOTE measured (session 12): 2^22 with blocks from 2^21 (the MLP-ResNet's 7.8M products
#: as two blocks, so its jitted plan holds BLAS): the jitted epoch 1.050x on a quiet machine
#: (127.7 -> 134.1 ms, n 10/12: its 18 products of ~0.5M multiply-adds a step then run on
#: one core) and 0.558x with other processes using > 1.2 cores (1479 -> 826 ms). Not taken:
#: it would miss the MLP-ResNet jit goal on a quiet machine.
MIN_MACS = 1 << 23
#: fewest multiply-adds of one block's gemm call: OpenBLAS's small-matrix kernels, whose bits
#: differ, take products up to 1e6 multiply-adds (measured, session 12: random float32 products
#: over 1e6 split in two row blocks on a multiple of 64: 16 of 28 with a block of 1e6 or fewer
#: differed from the whole product, 0 of 385 with both blocks over it)
MIN_BLOCK_MACS = 1 << 22
#: blocks per thread of a split product (more: each gemm call packs the other operand again;
#: 2 measured no better: LSTM jit quiet 0.980 vs 1.008 of off, other processes using
#: 0.25-1.2 cores 0.656 vs 0.671, Transformer 0.269 vs 0.275)
BLOCKS_PER_THREAD = 1
#: each block starts at a multiple of this many rows (columns)
ALIGN = 64
#: products that ran as blocks (tests check the path ran)
CALLS = [0]

_LOOPS = NumbaLoops(f"{__package__}.numba_parallel_gemm")
#: this thread's hold (``held``), read directly on the eager path (a call costs ~0.1 us)
_thread_state = blas_threads.thread_state


def splits(rows: int | None, inner: int | None, cols: int | None) -> bool:
    """Whether a (rows, inner) @ (inner, cols) product is one a held run splits into blocks
    (``MIN_MACS`` or more multiply-adds; unknown sizes: no). Ops say through it whether a
    plan that runs them should hold BLAS (their ``large_products``, jit/compiled.py): a plan
    without such products keeps OpenBLAS's own threads (a held MLP-ResNet step ran its
    7.8M multiply-add products on one core: the jitted epoch 1.06-1.14x; the op chain paid the
    hold's ~4 us a call)."""
    if rows is None or inner is None or cols is None:
        return False
    return rows * inner * cols >= MIN_MACS


def held() -> bool:
    """Whether this thread runs inside a BLAS hold (products may split into blocks)."""
    return blas_threads.held()


def _can_hold() -> bool:
    """Whether a hold here would split products: switched on, BLAS's count settable, numba's
    TBB layer and NumPy's OpenBLAS gemm found."""
    return ENABLED and blas_threads.available() and bool(parallel_loops.parallel_threads()) \
        and openblas_gemm.gemm(np.float32) is not None


@contextlib.contextmanager
def hold_one_thread() -> Iterator[None]:
    """OpenBLAS on one thread inside the block (process-wide, kernels/blas_threads.py), its
    thread count restored after; large float32 products of ``matmul`` /
    ``transposed_matmul`` run as blocks meanwhile. A no-op where ``_can_hold`` is False."""
    if not _can_hold():
        yield
        return
    with blas_threads.hold():
        yield


def _blocks(a: Any, b: Any, trans_a: bool, trans_b: bool, out: Any,
            epilogue: tuple | None = None) -> bool:
    """``out = op(a) @ op(b)`` as blocks of out's rows (its columns where there are more of
    those) in one prange region, each one OpenBLAS gemm call; False (nothing written) where
    it does not run. a, b, out: C-contiguous float32 NumPy matrices. ``epilogue`` (bias,
    residual, relu): each block then adds the bias row and the residual and applies the
    ReLU to its own lines (numba_kernels.linear_epilogue)."""
    m, n = out.shape
    k = a.shape[0] if trans_a else a.shape[1]
    macs = m * n * k
    gemm = openblas_gemm.gemm(np.float32)
    loops = _LOOPS.module() if gemm is not None else None
    threads = parallel_loops.parallel_threads()
    if loops is None or threads < 2:
        return False
    by_columns = n > m
    split = n if by_columns else m
    units = -(-split // ALIGN)
    count = max(1, min(threads * BLOCKS_PER_THREAD, units, macs // MIN_BLOCK_MACS))
    # blocks of ALIGN * (units // count) lines or more, but the last may be short: keep every
    # block above MIN_BLOCK_MACS
    while count > 1 and (split - ALIGN * (units * (count - 1) // count)) * (
            macs // split) < MIN_BLOCK_MACS:
        count -= 1
    if count < 2:
        return False
    ta, tb = 112 if trans_a else 111, 112 if trans_b else 111
    if epilogue is None:
        ran = _LOOPS.call(loops.gemm_blocks, gemm, ta, tb, a, b, out, count, by_columns, ALIGN)
    else:
        ran = _LOOPS.call(loops.gemm_blocks_epilogue, gemm, ta, tb, a, b, out, count,
                          by_columns, ALIGN, *epilogue)
    if not ran:
        return False
    CALLS[0] += 1
    return True


def _as_cblas(x: Any) -> tuple[Any, bool] | None:
    """A float32 matrix as a C-contiguous array and whether it is op(x) = that array's
    transpose; None where neither x nor x.T is C-contiguous."""
    if x.flags.c_contiguous:
        return x, False
    if x.flags.f_contiguous:
        return x.T, True
    return None


def _split(a: Any, b: Any, out: Any, epilogue: tuple | None = None) -> Any:
    """``a @ b`` as blocks where held and large (float32 matrices), else None (nothing
    written); ``epilogue``: see ``_blocks``."""
    if not (held() and type(a) is np.ndarray and type(b) is np.ndarray and a.ndim == 2
            and b.ndim == 2 and a.shape[1] == b.shape[0]  # (else NumPy's own error)
            and a.dtype == np.float32 and b.dtype == np.float32
            and a.shape[0] * a.shape[1] * b.shape[1] >= MIN_MACS):
        return None
    left, right = _as_cblas(a), _as_cblas(b)
    if left is None or right is None or (
            # NumPy multiplies x @ x.T by syrk (other bits): left to NumPy
            a.__array_interface__["data"][0] == b.__array_interface__["data"][0]):
        return None
    if out is None:
        # (a weight gradient of 4096 x 4096: recycled, not page-faulted in every step)
        out = recycle.empty((a.shape[0], b.shape[1]), np.float32)
    elif not (type(out) is np.ndarray and out.dtype == np.float32 and out.flags.c_contiguous
              and out.shape == (a.shape[0], b.shape[1])):
        return None
    return out if _blocks(left[0], right[0], left[1], right[1], out, epilogue) else None


def split_with_epilogue(a: Any, b: Any, bias: Any, residual: Any, relu: bool,
                        out: Any = None) -> Any:
    """``relu(a @ b + bias + residual)`` where the product runs as blocks (large float32
    matrices, inside a plan's hold or, as ``matmul``, in one of their own), each block's
    lines finished by the thread that made them (while in its cache) with the arithmetic of
    the separate ops; None (nothing written) elsewhere.
    ``bias``: a C-contiguous float32 (cols,) row; ``residual``: a C-contiguous float32
    (rows, cols) array or None; ``relu``: apply ``max(v, 0)`` last."""
    epilogue = (bias, _NO_RESIDUAL if residual is None else residual, bool(relu))
    if _thread_state.held:
        return _split(a, b, out, epilogue)
    if _holds_alone(a, b):  # outside a plan's run: as ``matmul``
        with blas_threads.hold():
            return _split(a, b, out, epilogue)
    return None


#: the epilogue's "no residual" (an array with no rows: numba compiles one loop for both)
_NO_RESIDUAL = np.empty((0, 0), np.float32)


def _product(a: Any, b: Any, out: Any) -> Any:
    """``np.matmul(a, b[, out=out])``, as blocks where held and large; a large product that
    cannot split (float64, operands with other strides, a batch) gets OpenBLAS's threads
    back for itself, as it had them before this module."""
    done = _split(a, b, out)
    if done is not None:
        return done
    if held() and type(a) is np.ndarray and a.ndim >= 2 and b.ndim >= 2 \
            and a.shape[-2] * a.shape[-1] * b.shape[-1] >= MIN_MACS:
        with blas_threads.lend_threads():
            return np.matmul(a, b) if out is None else np.matmul(a, b, out=out)
    return np.matmul(a, b) if out is None else np.matmul(a, b, out=out)


def _holds_alone(a: Any, b: Any) -> bool:
    """Whether a product outside a plan's hold holds BLAS on one thread for itself (``EAGER``;
    one of ``EAGER_MIN_MACS`` or more multiply-adds per matrix)."""
    # (a.size * the columns bounds a matrix's multiply-adds from above: one product and one
    # comparison turn away a small product, ~0.4 us, the cost of an eager op's call)
    return EAGER and b.ndim >= 2 and a.size * b.shape[-1] >= EAGER_MIN_MACS \
        and type(a) is np.ndarray and type(b) is np.ndarray and a.ndim >= 2 \
        and a.shape[-2] * a.shape[-1] * b.shape[-1] >= EAGER_MIN_MACS and _can_hold()


def matmul(a: Any, b: Any, out: Any = None) -> Any:
    """``np.matmul(a, b[, out=out])`` with OpenBLAS held on one thread: inside
    ``hold_one_thread`` (a jitted plan's run), and outside it (eager ops) for this product
    alone where it is large (``EAGER_MIN_MACS``); large float32 matrices as blocks on
    numba's threads (the bits of OpenBLAS's one-thread product)."""
    if _thread_state.held:
        return _product(a, b, out)
    # (the cheap first test inline: most eager products are small, and a call costs ~0.1 us)
    if EAGER and b.ndim >= 2 and a.size * b.shape[-1] >= EAGER_MIN_MACS and _holds_alone(a, b):
        with blas_threads.hold():
            return _product(a, b, out)
    return np.matmul(a, b) if out is None else np.matmul(a, b, out=out)


def transposed_matmul(a: Any, b: Any, transpose_a: bool, transpose_b: bool) -> Any:
    """``op(a) @ op(b)``, op swapping the last two axes where its flag is set (the
    transposed_matmul op's compute), through ``matmul``."""
    return matmul(a.swapaxes(-1, -2) if transpose_a else a,
                  b.swapaxes(-1, -2) if transpose_b else b)
