"""An LSTM over a whole sequence on arrays: the forward recurrence and its backward (BPTT).

Why one kernel for the whole sequence: an LSTM step is one small matrix product and a dozen
elementwise ops on (batch, hidden) arrays. As graph nodes, 35 steps x 2 layers make ~1,000
forward and ~2,000 backward nodes per language-model step, each costing more in dispatch than
in arithmetic. Here a step is a handful of array calls, the state-independent work is done
for all steps at once, and the recurrent weight's gradient is one matrix product.

Gates are in PyTorch's order (input, forget, cell, output) along the last axis of
``x_proj = x W_ih + b_ih + b_hh`` (seq, batch, 4 hidden). The activated gates (``acts``) are
an output too: the backward needs them and recomputing costs a matrix product and a tanh over
every step. Sigmoid is ``(1 + tanh(a / 2)) / 2``, as the ``sigmoid`` op computes it, so all
four gates take one tanh call and the results equal the step-by-step ops' to rounding.

Where numba is installed and NumPy runs on OpenBLAS, a whole layer's recurrence is one
compiled loop per block of batch rows (numba_rnn.py): its step products call OpenBLAS's gemm
directly, and the blocks (rows never meet in an LSTM) run on numba's TBB threads
(numba_parallel_rnn.py) with no synchronisation between steps. The block cut depends on the
batch size alone, so the bits do not depend on the threads. The NumPy loops below are the
reference and the fallback (no numba, CuPy arrays, another BLAS) and do the same operations
in the same order (float32 results differ in the last bits: tanh, numba_tanh.py).

NOTE: the step loops hold OpenBLAS to one thread (kernels/blas_threads.py). A step's product
(batch x hidden x 4 hidden: 32 x 128 x 512 in the LM benchmark) is too small to split, and a
threaded one waits for OpenBLAS's worker at every step. Measured on 2 cores, one layer's
forward + backward over 35 steps: 50 ms with 2 BLAS threads, 16 ms held to one while other
processes kept the cores busy (load ~8); no difference on a quieter machine (load ~3). The
products over all steps at once (the weight gradient; the input projection outside this
module) go through kernels/blas_policy.py (blocks on numba's threads, OpenBLAS on one
thread: its worker never spins).
Splitting the batch over needle's Python threads did not pay (1.3x slower forward: the GIL
between steps); the compiled blocks on TBB threads, with no Python between steps, do: one
layer's forward + backward 5.0 ms -> 2.8 ms (session 13, MIN_BLOCK_ROWS below).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ..backend import parallel_loops
from ..backend.device import array_module
from ..backend.numba_support import NumbaLoops, numba_module
from . import blas_policy, blas_threads, openblas_gemm

__all__ = ["lstm_backward", "lstm_forward"]


@functools.lru_cache(maxsize=32)
def _gate_affine(hidden: int, dtype: np.dtype, xp: Any = np) -> tuple[Any, Any]:
    """Per-column ``(scale, shift)`` of the gates: s = 0.5 for the sigmoid gates (i, f, o),
    1 for g (tanh); ``act = tanh(pre * s) * s + (1 - s)`` is sigmoid where s = 0.5, tanh
    where s = 1. Arrays of module ``xp`` (NumPy or CuPy), shared by every call: never
    written."""
    scale = xp.full(4 * hidden, 0.5, dtype=dtype)
    scale[2 * hidden:3 * hidden] = 1.0
    shift = 1.0 - scale
    if xp is np:
        scale.setflags(write=False)
        shift.setflags(write=False)
    return scale, shift


#: rows of the batch per block of the whole-sequence loops, at least. Measured on the LM's
#: layer (batch 32, hidden 128, 35 steps; forward / backward ms): one core 1.95 / 2.64 as one
#: block, 1.85 / 2.09 as 4 blocks of 8 rows (OpenBLAS's small-matrix kernels take products
#: under ~1e6 multiply-adds: 0.9-1.2 us a row at 8-12 rows, 1.2-1.5 at 16-32); 2 cores 1.09 /
#: 1.73 as 4 blocks of 8, 1.36 / 2.14 as 2 of 16; 8 blocks of 4 rows gain nothing more
MIN_BLOCK_ROWS = 8
#: blocks at most (no more threads than that would pay for one LSTM layer)
MAX_BLOCKS = 8

#: numba_parallel_rnn.py: the blocks in one prange region where it runs
PARALLEL_LOOPS = NumbaLoops(f"{__package__}.numba_parallel_rnn")

#: set once numba failed to compile a loop here: the NumPy loops run from then on
_numba_failed: list[bool] = []


def _loops(*arrays: Any) -> Any:
    """The numba loops (module numba_rnn) for these arrays, or None: numba missing or turned
    off, a compilation failed before, arrays other than float32/float64 NumPy arrays, or a
    NumPy whose BLAS is not OpenBLAS (the loops call its gemm: kernels/openblas_gemm.py)."""
    if _numba_failed or numba_module() is None:
        return None
    present = [a for a in arrays if a is not None]
    if not all(isinstance(a, np.ndarray) and a.dtype in (np.float32, np.float64)
               for a in present):
        return None
    if openblas_gemm.gemm(np.result_type(*present)) is None:
        return None
    from . import numba_rnn

    return numba_rnn


def _block_count(batch: int) -> int:
    """Blocks of the batch the whole-sequence loops cut (from the batch size alone, so the
    same with or without threads): rows of at least ``MIN_BLOCK_ROWS``, at most
    ``MAX_BLOCKS`` blocks."""
    return max(1, min(MAX_BLOCKS, batch // MIN_BLOCK_ROWS))


def _parallel_loops(count: int) -> Any:
    """numba_parallel_rnn where its blocks can run on numba's TBB threads (more than one
    block, prange running, BLAS held on one thread so the blocks' products do not fight over
    OpenBLAS's workers), else None."""
    if count < 2 or not parallel_loops.parallel_threads() or not blas_threads.available():
        return None
    return PARALLEL_LOOPS.module()


def _over_blocks(loops: Any, pass_name: str, batch: int, *args: Any) -> None:
    """numba_rnn's ``<pass_name>_rows(*args, start, stop)`` over the ``_block_count(batch)``
    blocks of the batch: in one prange region (numba_parallel_rnn's ``<pass_name>_blocks``)
    where the blocks can run on numba's threads, else one after another here."""
    count = _block_count(batch)
    parallel = _parallel_loops(count)
    if parallel is not None:
        getattr(parallel, f"{pass_name}_blocks")(*args, count)
        return
    rows = getattr(loops, f"{pass_name}_rows")
    for i in range(count):
        rows(*args, batch * i // count, batch * (i + 1) // count)


def _with_fallback(fused: Any, plain: Any, loops: Any, *args: Any) -> Any:
    """``fused(loops, *args)``, or ``plain(*args)`` where numba is not used or cannot compile
    a loop (compilation fails at a loop's first call, before it writes anything; the whole
    computation is redone)."""
    if loops is not None:
        try:
            return fused(loops, *args)
        except numba_module().core.errors.NumbaError:
            _numba_failed.append(True)
    return plain(*args)


def _check_shapes(what: str, arrays: dict[str, Any], shapes: dict[str, tuple]) -> None:
    """A ValueError unless each array has its shape (the compiled loops do not check
    bounds; the op's shape rule then names the problem)."""
    for name, shape in shapes.items():
        array = arrays[name]
        if array is not None and tuple(array.shape) != shape:
            raise ValueError(f"{what}: {name} has shape {tuple(array.shape)}, expected {shape}")


def lstm_forward(x_proj: Any, w_hh: Any, h0: Any = None, c0: Any = None
                 ) -> tuple[Any, Any, Any]:
    """``(h_all, c_all, acts)`` of an LSTM over ``x_proj`` (seq, batch, 4 hidden) with
    recurrent weight ``w_hh`` (hidden, 4 hidden) from the state ``h0``, ``c0`` (batch,
    hidden; None: zeros)."""
    steps, batch, four = x_proj.shape
    hidden = four // 4
    _check_shapes("lstm_forward", {"w_hh": w_hh, "h0": h0, "c0": c0},
                  {"w_hh": (hidden, four), "h0": (batch, hidden), "c0": (batch, hidden)})
    state_dtypes = () if h0 is None else (h0.dtype, c0.dtype)
    dtype = np.result_type(x_proj.dtype, w_hh.dtype, *state_dtypes)
    xp = array_module(x_proj)
    if h0 is None:
        h0 = c0 = xp.zeros((batch, hidden), dtype)
    out = (xp.empty((steps, batch, hidden), dtype), xp.empty((steps, batch, hidden), dtype),
           xp.empty((steps, batch, four), dtype))
    loops = _loops(x_proj, w_hh, h0, c0, *out)
    with blas_threads.hold():  # small products: see the module NOTE
        _with_fallback(_forward_fused, _forward_numpy, loops, x_proj, w_hh, h0, c0, *out)
    return out


def _forward_numpy(x_proj: Any, w_hh: Any, h0: Any, c0: Any, h_all: Any, c_all: Any,
                   acts: Any) -> None:
    hidden = w_hh.shape[0]
    xp = array_module(acts)
    scale, shift = _gate_affine(hidden, acts.dtype, xp)
    h, c = h0, c0
    for t in range(x_proj.shape[0]):
        a, c_t, h_t = acts[t], c_all[t], h_all[t]
        xp.matmul(h, w_hh, out=a)
        a += x_proj[t]
        a *= scale
        xp.tanh(a, out=a)
        a *= scale
        a += shift
        xp.multiply(a[:, hidden:2 * hidden], c, out=c_t)          # f * c
        c_t += a[:, :hidden] * a[:, 2 * hidden:3 * hidden]          # + i * g
        xp.tanh(c_t, out=h_t)
        h_t *= a[:, 3 * hidden:]                                    # o * tanh(c')
        h, c = h_t, c_t


def _forward_fused(loops: Any, x_proj: Any, w_hh: Any, h0: Any, c0: Any, h_all: Any,
                   c_all: Any, acts: Any) -> None:
    dtype = acts.dtype
    scale, shift = _gate_affine(w_hh.shape[0], dtype)
    gemm = openblas_gemm.gemm(dtype)
    x_proj, w_hh, h0, c0 = (np.ascontiguousarray(a, dtype) for a in (x_proj, w_hh, h0, c0))
    _over_blocks(loops, "forward", x_proj.shape[1], gemm, x_proj, w_hh, h0, c0, h_all, c_all,
                 acts, scale, shift)


def lstm_backward(dh_all: Any, dc_all: Any, dacts: Any, w_hh: Any, h_all: Any, c_all: Any,
                  acts: Any, h0: Any = None, c0: Any = None) -> tuple[Any, Any, Any, Any]:
    """The adjoints ``(dx_proj, dw_hh, dh0, dc0)`` of :func:`lstm_forward` for the output
    adjoints ``dh_all``, ``dc_all`` (seq, batch, hidden) and ``dacts`` (seq, batch, 4 hidden,
    or None for zeros), from the forward's inputs and outputs (h0, c0 None: zeros)."""
    steps, batch, four = acts.shape
    hidden = four // 4
    dtype = acts.dtype
    state, gates = (steps, batch, hidden), (steps, batch, four)
    _check_shapes("lstm_backward",
                  {"dh_all": dh_all, "dc_all": dc_all, "dacts": dacts, "w_hh": w_hh,
                   "h_all": h_all, "c_all": c_all, "h0": h0, "c0": c0},
                  {"dh_all": state, "dc_all": state, "dacts": gates, "w_hh": (hidden, four),
                   "h_all": state, "c_all": state, "h0": state[1:], "c0": state[1:]})
    xp = array_module(acts)
    zero_state = h0 is None
    if zero_state:
        h0 = c0 = xp.zeros((batch, hidden), dtype)
    dpre = xp.empty((steps, batch, four), dtype)
    dh = xp.zeros((batch, hidden), dtype)       # the adjoint of h from the later steps
    dc = xp.zeros((batch, hidden), dtype)       # ... and of c
    tanh_c = xp.tanh(c_all)                     # every step at once
    w_hh_t = xp.ascontiguousarray(w_hh.T)
    loops = _loops(dh_all, dc_all, dacts, w_hh, h_all, c_all, acts, h0, c0)
    with blas_threads.hold():  # small products: see the module NOTE
        dh = _with_fallback(_backward_fused, _backward_numpy, loops, dh_all, dc_all, dacts,
                            w_hh_t, c_all, acts, c0, tanh_c, dpre, dh, dc)
    if steps > 1:  # one product over the steps after the first; a zero h0 adds nothing
        dw_hh = blas_policy.matmul(h_all[:-1].reshape(-1, hidden).T,
                                   dpre[1:].reshape(-1, four))
        if not zero_state:
            dw_hh += h0.T @ dpre[0]
    else:
        dw_hh = (xp.zeros(w_hh.shape, dtype) if zero_state or not steps
                 else h0.T @ dpre[0])
    return dpre, dw_hh, dh, dc


def _backward_numpy(dh_all: Any, dc_all: Any, dacts: Any, w_hh_t: Any, c_all: Any, acts: Any,
                    c0: Any, tanh_c: Any, dpre: Any, dh: Any, dc_next: Any) -> Any:
    """Fills ``dpre`` and ``dc_next`` (then dc0); returns dh0."""
    hidden = c_all.shape[2]
    xp = array_module(acts)
    dc_from_h = 1.0 - tanh_c * tanh_c
    dc_from_h *= acts[:, :, 3 * hidden:]                   # dc'/dh = (1 - tanh(c')^2) o
    deriv = acts * (1.0 - acts)                             # sigmoid' = s (1 - s)
    g_all = deriv[:, :, 2 * hidden:3 * hidden]
    xp.multiply(acts[:, :, 2 * hidden:3 * hidden], acts[:, :, 2 * hidden:3 * hidden], out=g_all)
    xp.subtract(1.0, g_all, out=g_all)                      # tanh' = 1 - g^2
    dc = xp.empty_like(dc_next)
    for t in range(c_all.shape[0] - 1, -1, -1):
        a, d = acts[t], dpre[t]
        dh += dh_all[t]
        xp.multiply(dh, dc_from_h[t], out=dc)
        dc += dc_all[t]
        dc += dc_next
        xp.multiply(dh, tanh_c[t], out=d[:, 3 * hidden:])                    # d o
        xp.multiply(dc, a[:, 2 * hidden:3 * hidden], out=d[:, :hidden])       # d i = dc g
        xp.multiply(dc, c_all[t - 1] if t else c0, out=d[:, hidden:2 * hidden])  # d f = dc c
        xp.multiply(dc, a[:, :hidden], out=d[:, 2 * hidden:3 * hidden])       # d g = dc i
        xp.multiply(dc, a[:, hidden:2 * hidden], out=dc_next)                 # dc_prev = dc f
        if dacts is not None:
            d += dacts[t]
        d *= deriv[t]
        dh = d @ w_hh_t
    return dh


def _backward_fused(loops: Any, dh_all: Any, dc_all: Any, dacts: Any, w_hh_t: Any, c_all: Any,
                    acts: Any, c0: Any, tanh_c: Any, dpre: Any, dh: Any, dc_next: Any) -> Any:
    dtype = acts.dtype
    gemm = openblas_gemm.gemm(dtype)
    has_dacts = dacts is not None
    dh_all, dc_all, c0 = (np.ascontiguousarray(a, dtype) for a in (dh_all, dc_all, c0))
    dacts = np.ascontiguousarray(dacts, dtype) if has_dacts else dpre
    one = dtype.type(1)
    _over_blocks(loops, "backward", acts.shape[1], gemm, dh_all, dc_all, dacts, has_dacts,
                 w_hh_t, c_all, acts, c0, tanh_c, dpre, dh, dc_next, one)
    return dh
