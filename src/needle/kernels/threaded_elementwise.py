"""ReLU, its adjoint and a bias add over large arrays: one compiled pass, split across threads.

Why: in a CNN step ReLU's forward and backward and the conv bias add run over every
activation (4-17 MB each in the benchmark CNN). NumPy's ``np.maximum`` is one serial pass;
ReLU's adjoint in NumPy is three (a compare, a cast of the mask, a multiply), all on one
core while the second waits. Here each is one numba loop (numba_kernels.relu, relu_grad,
add_row) over the arrays' memory, in blocks that needle's CPU threads draw
(backend/cpu_threads.run_chunks). Measured alone (64 x 64 x 32 x 32 float32, NCHW view of
NHWC memory, 2 threads, loaded machine, medians of 20 alternating calls): relu 1.43 ->
1.00 ms, relu_grad 3.24 -> 1.63 ms, the conv bias add 1.68 -> 1.08 ms. (nn.Conv's bias is
now added by the ``conv_bias`` op inside the convolution; add_row serves other row-vector
adds on large channels-last arrays: a conv + add graph saved earlier, a user's bias.)

The loops compute exactly what the NumPy formulas in core/ops_elementwise.py give, element
by element (NaN and -0.0 included), so the result does not depend on the path or on the
thread count. Arrays whose memory is not one dense block (a sliced view), of different
layouts, dtypes other than float32/float64, small arrays, CuPy arrays, or no numba: None, and
the caller runs NumPy.

Where numba's parallel loops run on TBB (backend/parallel_loops.parallel_threads() > 0), a
pass of ``PRANGE_MIN_ELEMENTS`` or more is instead one ``prange`` call over blocks fixed by the
shape (kernels/numba_parallel_elementwise.py, each block the same serial loop): a region starts
in ~1.5 us where a hand-off to needle's threads costs ~100 us (``PRANGE_MIN_ELEMENTS`` says
from which size it pays).

Layout: an activation of an NCHW model is an NCHW view of channels-last memory (nn.Conv);
the loops read the memory in its own order, and the result has the input's strides (as
NumPy's ufuncs give it), so later ops keep the fast channels-last paths.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import cpu_threads, parallel_loops
from ..backend.device import array_module
from ..backend.numba_support import NumbaLoops
from .axes import inverse_permutation

__all__ = ["MIN_ELEMENTS", "PRANGE_BLOCK_ELEMENTS", "PRANGE_MIN_ELEMENTS", "SPLIT_MIN_ELEMENTS",
           "add_row", "relu", "relu_grad", "relu_in_place", "relu_owned"]

#: smallest array, in elements, that takes the compiled loop (below it NumPy's call is as
#: fast and the dispatch costs more than it saves)
MIN_ELEMENTS = 1 << 15

#: smallest array, in elements, whose pass is split into blocks for needle's threads
SPLIT_MIN_ELEMENTS = 1 << 19

#: elements per block of a split pass (2 MB of float32)
BLOCK_ELEMENTS = 1 << 19

#: smallest array, in elements, whose pass is one numba prange call over blocks (where
#: ``parallel_loops.parallel_threads()`` is nonzero), and the elements per block.
#: NOTE: measured on the shared 2-core VM (relu, float32, 100 alternating calls, medians;
#: benchmarks/performance_notes.md, session 10): TBB's second thread either joined every call or
#: almost none, by the machine's load. Joining: 2^17 21.8 vs 21.2 us serial, 2^18 45.1 vs 46.2 (its
#: wake-up eats the gain), 2^19 116 vs 144, 2^20 222 vs 330. Not joining (load 4-6): prange costs
#: 1.5-2 us more at 2^17-2^18 and 5-14 us more at 2^19-2^20, where needle's threads (the old split
#: from 2^19) cost 20-65 us more than serial. Blocks of 2^15-2^17 timed alike.
PRANGE_MIN_ELEMENTS = 1 << 19
PRANGE_BLOCK_ELEMENTS = 1 << 16

_loops = NumbaLoops("needle.kernels.numba_kernels")
#: the prange variants (latched apart: a failure there leaves the serial loops in use)
_parallel_loops = NumbaLoops("needle.kernels.numba_parallel_elementwise")


def _memory_order(x: np.ndarray) -> tuple[int, ...] | None:
    """The axis order in which ``x``'s memory is C-contiguous (an NCHW view of NHWC memory:
    (0, 2, 3, 1)), or None where its memory is not one dense block."""
    order = tuple(sorted(range(x.ndim), key=lambda axis: -x.strides[axis]))
    return order if x.transpose(order).flags.c_contiguous else None


def _flat(x: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    return x.transpose(order).reshape(-1)


def _like(x: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    """A new array shaped and strided as ``x`` (memory in ``order``)."""
    out = np.empty(tuple(x.shape[axis] for axis in order), x.dtype)
    return out.transpose(inverse_permutation(order))


def _usable(*arrays: Any) -> tuple[int, ...] | None:
    """The common memory order of ``arrays`` where the loops can take them: NumPy arrays of
    one float dtype, shape and layout, dense, large enough, numba present; else None."""
    first = arrays[0]
    if (type(first) is not np.ndarray or first.dtype not in (np.float32, np.float64)
            or first.size < MIN_ELEMENTS):
        return None
    for other in arrays[1:]:
        if (type(other) is not np.ndarray or other.dtype != first.dtype
                or other.shape != first.shape or other.strides != first.strides):
            return None
    order = _memory_order(first)
    if order is None or _loops.module() is None:
        return None
    return order


def _run(loop_name: str, inputs: tuple, out: np.ndarray, *constants: Any) -> bool:
    """``loop(*inputs, *constants, out)`` over arrays split along their first axis (1-D, or
    the rows of a matrix), in blocks shared by needle's threads where the arrays are large;
    False if numba could not compile the loop (NumPy from then on)."""
    module = _loops.module()
    if module is None:
        return False
    if out.size >= PRANGE_MIN_ELEMENTS and _in_prange_blocks(loop_name, inputs, out, constants):
        return True
    loop = getattr(module, loop_name)
    if out.size < SPLIT_MIN_ELEMENTS or cpu_threads.NUM_THREADS < 2:
        return _loops.call(loop, *inputs, *constants, out)
    if not _loops.call(loop, *(x[:0] for x in inputs), *constants, out[:0]):
        return False  # compiled (or failed) here, on this thread, on empty slices
    size = out.shape[0]
    count = min(size, -(-out.size // BLOCK_ELEMENTS))
    bounds = [size * i // count for i in range(count + 1)]

    def block(i: int) -> None:
        s, e = bounds[i], bounds[i + 1]
        loop(*(x[s:e] for x in inputs), *constants, out[s:e])

    cpu_threads.run_chunks(block, count, cpu_threads.NUM_THREADS)
    return True


def _in_prange_blocks(loop_name: str, inputs: tuple, out: np.ndarray,
                     constants: tuple = ()) -> bool:
    """``loop`` as one prange call over blocks of ``PRANGE_BLOCK_ELEMENTS`` (rows of the first
    axis, their number fixed by the shape) on numba's TBB threads; False where that does not
    run (no TBB, one thread, numba could not compile it) and the caller's path runs instead."""
    if not parallel_loops.parallel_threads():
        return False
    parallel = _parallel_loops.module()
    if parallel is None:
        return False
    count = min(out.shape[0], -(-out.size // PRANGE_BLOCK_ELEMENTS))
    if count < 2:
        return False
    return _parallel_loops.call(getattr(parallel, loop_name), *inputs, *constants, out, count)


def relu(a: Any) -> np.ndarray | None:
    """``np.maximum(a, 0)`` in one threaded pass, or None where the loop cannot take ``a``."""
    order = _usable(a)
    if order is None:
        return None
    out = _like(a, order)
    return out if _run("relu", (_flat(a, order),), _flat(out, order)) else None


def relu_in_place(a: Any) -> bool:
    """``a = max(a, 0)`` in one threaded pass over a's memory (each element read and written
    at its own index); False, with nothing written, where the loop cannot take ``a``."""
    order = _usable(a)
    if order is None or not a.flags.writeable:
        return False
    flat = _flat(a, order)  # (a view: a's memory is one dense block in ``order``)
    return _run("relu", (flat,), flat)


def relu_owned(a: Any) -> Any:
    """``max(a, 0)`` of an array no one else sees yet (an op's fresh output): in place where
    it is a writable float NumPy array (``np.maximum``'s values: NaN kept, -0.0 -> +0.0),
    else a new array."""
    if type(a) is np.ndarray and a.dtype.kind == "f" and a.flags.writeable:
        if not relu_in_place(a):
            np.maximum(a, a.dtype.type(0), out=a)
        return a
    return array_module(a).maximum(a, 0)


def relu_grad(a: Any, g: Any) -> np.ndarray | None:
    """``g * (a > 0)`` (ReLU's adjoint, the mask in g's dtype) in one threaded pass, or None
    where the loop cannot take ``a`` and ``g`` (then NumPy runs it). A ``g`` broadcast to a's
    shape (the gradient of a global average pool) is read from the small array it broadcasts
    (``_relu_grad_strided``)."""
    order = _usable(a, g)
    if order is None:
        return _relu_grad_strided(a, g)
    out = _like(g, order)
    return out if _run("relu_grad", (_flat(a, order), _flat(g, order)), _flat(out, order)) \
        else None


def _relu_grad_strided(a: Any, g: Any) -> np.ndarray | None:
    """relu_grad for a dense ``a`` and a ``g`` of its shape and dtype broadcast along some of
    its axes (zero strides) but not along a's innermost one in memory, both seen as 4-d in
    a's memory order: the loop reads the small array g broadcasts; None elsewhere.

    NOTE: the CNN benchmark's last ReLU gets the broadcast gradient of its global average
    pool; NumPy's three passes over it took 5.8 ms of serial time per step (16 MB)."""
    if (type(g) is not np.ndarray or type(a) is not np.ndarray or g.shape != a.shape
            or g.dtype != a.dtype or not 1 <= a.ndim <= 4):
        return None
    order = _usable(a)
    if order is None:
        return None
    lead = (1,) * (4 - a.ndim)
    a4 = a.transpose(order).reshape(lead + tuple(a.shape[axis] for axis in order))
    g_strides = lead + tuple(g.strides[axis] for axis in order)
    if g_strides[3] == 0 or 0 not in g_strides[:3]:
        return None  # not broadcast, or along the innermost axis: NumPy
    g_in_order = g.transpose(order).reshape(a4.shape)
    small = np.ascontiguousarray(g_in_order[tuple(
        slice(0, 1) if stride == 0 else slice(None) for stride in g_strides)])
    out = _like(a, order)
    out4 = out.transpose(order).reshape(a4.shape)
    if small.shape[0] == 1:  # (split along axis 0 only where g has it whole)
        if out.size >= PRANGE_MIN_ELEMENTS and _in_prange_blocks(
                "relu_grad_rows", (a4, small), out4):
            return out
        return out if _loops.call(_loops.module().relu_grad_rows, a4, small, out4) else None
    return out if _run("relu_grad_rows", (a4, small), out4) else None


def add_row(xm: Any, b: Any) -> np.ndarray | None:
    """``xm + b`` for a C-contiguous (M, C) matrix and a (C,) row of its dtype (a conv bias
    on NHWC activations) in one threaded pass, or None where the loop cannot take them."""
    if (type(xm) is not np.ndarray or type(b) is not np.ndarray or xm.ndim != 2
            or b.shape != xm.shape[1:] or xm.dtype != b.dtype
            or xm.dtype not in (np.float32, np.float64) or xm.size < MIN_ELEMENTS
            or not xm.flags.c_contiguous or _loops.module() is None):
        return None
    out = np.empty_like(xm)
    return out if _run("add_row", (xm,), out, np.ascontiguousarray(b)) else None
