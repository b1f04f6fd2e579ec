"""Multi-head scaled dot-product attention on (batch, length, heads * head_dim) arrays.

The heads are strided views of the inputs ((B, L, H*d) seen as (B, H, L, d)), so no head is
ever copied out: each batched ``np.matmul`` runs one BLAS product per (batch, head) straight
on the views, and results are written through a transposed view of an output that already
has the (B, L, H*d) layout the next layer wants. The softmax runs in place on the logits
buffer. Compared with the composite graph (reshape, permute, split, scale, mask add,
softmax, two products, permute, reshape: a dozen nodes and about as many copies forward,
twice that backward) this is four products and three in-place passes each way. Where numba
is installed, the softmax and its adjoint are row loops (kernels/numba_attention.py; for
float32 the exp too, numba_exp.py's), split over cores by numba's ``prange`` in blocks of
(batch, head) slabs from ``PRANGE_MIN_SIZE`` logits (numba_parallel_attention.py; the same
bits on any thread count); without it the same formulas run in NumPy.

The backward recomputes the probabilities from q and k (one product and a softmax), unless
it is given the forward's (``keep_probs`` / ``probs``: a jitted training step's
``attention_with_probs`` and ``attention_grad_probs``, compiler/attention_probs_rewrite.py;
the same values, one (B, H, T, S) array kept between the two). The mask's gradient (the
logits' adjoint) is written only where asked (``mask_grad``: a causal mask is a constant).
Formulas, with ``p = softmax(s)``, ``s = scale * q k^T + mask`` per head::

    dv = p^T g,  dp = g v^T,  ds = p * (dp - rowsum(p * dp)),
    dq = scale * ds k,  dk = scale * ds^T q,  dmask = ds
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import parallel_loops
from ..backend.numba_support import NumbaLoops
from . import blas_threads, openblas_gemm

__all__ = ["attention", "attention_grad"]


def heads_view(x: Any, heads: int) -> Any:
    """(B, L, H*d) -> (B, H, L, d), a view where the layout allows (always for arrays with a
    unit-stride last axis)."""
    b, length, width = x.shape
    return x.reshape(b, length, heads, width // heads).transpose(0, 2, 1, 3)


def _merged(b: int, length: int, heads: int, d: int, dtype: Any) -> tuple[Any, Any]:
    """A new (B, L, H*d) array and its (B, H, L, d) view (an ``out=`` for products)."""
    out = np.empty((b, length, heads, d), dtype=dtype)
    return out.reshape(b, length, heads * d), out.transpose(0, 2, 1, 3)


#: kernels/numba_attention.py on first use (NumPy runs where numba cannot)
LOOPS = NumbaLoops(f"{__package__}.numba_attention")
#: kernels/numba_parallel_attention.py, where prange runs (the one-thread loops where not)
PARALLEL_LOOPS = NumbaLoops(f"{__package__}.numba_parallel_attention")
#: logits of at least this many elements split their (batch, head) slabs over numba's
#: prange threads, in blocks of about ``SLAB_BLOCK_ELEMENTS`` (fixed by the shape)
PRANGE_MIN_SIZE = 1 << 16
SLAB_BLOCK_ELEMENTS = 1 << 14


def _slab_blocks(s: Any) -> int:
    """How many blocks of whole (batch, head) slabs the (..., T, S) array ``s`` is cut into
    for prange (from the shape alone), or 0: one thread (small, or prange not running)."""
    if s.size < PRANGE_MIN_SIZE or s.ndim < 2 or not parallel_loops.parallel_threads():
        return 0
    slabs = s.size // (s.shape[-1] * s.shape[-2])
    return min(slabs, max(1, s.size // SLAB_BLOCK_ELEMENTS))


def _slabs(a: Any) -> Any:
    """The (..., T, S) C-contiguous array as (N, T, S)."""
    return a.reshape(-1, a.shape[-2], a.shape[-1])


def _softmax_f32(s: Any, loops: Any, factor: float, mask: Any, use_mask: bool) -> bool:
    """In place: softmax(factor * s + mask rows) over the float32 rows of s, all in numba
    (numba_attention.softmax_rows_f32), its slabs split over prange threads where that runs;
    False where the loops do not compile (nothing ran)."""
    count = _slab_blocks(s)
    if count > 1:
        parallel = PARALLEL_LOOPS.module()
        if parallel is not None and PARALLEL_LOOPS.call(
                parallel.softmax_slabs, _slabs(s), factor, mask, use_mask, count):
            return True
    return LOOPS.call(loops.softmax_rows_f32, s.reshape(-1, s.shape[-1]), factor, mask,
                      use_mask)


def _softmax_grad(loops: Any, p: Any, ds: Any) -> bool:
    """In place: ds becomes softmax's adjoint p * (ds - rowsum(p * ds)), slabs split over
    prange threads where that runs; False where the loops do not compile."""
    count = _slab_blocks(ds)
    if count > 1:
        parallel = PARALLEL_LOOPS.module()
        if parallel is not None and PARALLEL_LOOPS.call(parallel.softmax_grad_slabs,
                                                        _slabs(p), _slabs(ds), count):
            return True
    width = ds.shape[-1]
    return LOOPS.call(loops.softmax_grad_rows, p.reshape(-1, width), ds.reshape(-1, width))


def _row_loops(s: Any) -> Any:
    """The numba loops if they can take the (..., S) array ``s`` in place, else None."""
    if type(s) is not np.ndarray or s.dtype not in (np.float32, np.float64):
        return None
    return LOOPS.module() if s.flags.c_contiguous and s.size else None


def _mask_rows(mask: Any, s: Any) -> Any:
    """``mask`` as a contiguous (T, S) array of s's dtype if it is the same for every batch
    and head (a causal mask), else None."""
    if type(mask) is not np.ndarray or any(n != 1 for n in mask.shape[:-2]):
        return None
    rows = np.broadcast_to(mask.reshape(mask.shape[-2:]) if mask.ndim >= 2 else mask,
                           s.shape[-2:])
    return np.ascontiguousarray(rows, dtype=s.dtype)


#: OpenBLAS runs a product of at most this many multiply-adds on one thread whatever its
#: thread count (its SMP threshold, 65536 * 4): slabs that small give the same bits whether
#: or not BLAS is held on one thread
_ONE_THREAD_MACS = 1 << 18
#: the whole-slab kernels' switch (A/B runs turn it off)
SLABS = True
#: slab runs of the whole attention (tests check the path ran)
SLAB_RUNS = [0]


def _blasable(x: Any, width: int) -> bool:
    """Whether NumPy's matmul hands the (L, width) head views of the 3-d x to BLAS as they
    are (unit-stride rows, a row stride of whole items spanning at least a head)."""
    item = x.itemsize
    return x.strides[2] == item and x.strides[1] % item == 0 and x.strides[1] // item >= width


def _same_slab_start(a: Any, b: Any) -> bool:
    """Whether some batch index i puts a[i] and b[i] at one address (NumPy multiplies such
    an a_h @ b_h^T pair by syrk, other bits than gemm)."""
    gap = b.ctypes.data - a.ctypes.data
    step = a.strides[0] - b.strides[0]
    if step == 0:
        return gap == 0
    return gap % step == 0 and 0 <= gap // step < a.shape[0]


def _slab_kernels(q: Any, k: Any, v: Any, g: Any, mask: Any, heads: int, scale: Any
                  ) -> Any:
    """(module, mask rows, blocks, cblas_sgemm) for the whole-slab kernels, or None where
    they do not apply: prange not running, not all float32, a scale that is not a Python
    float (NumPy multiplies by a NumPy float64 in float64), dims of 1 (NumPy's matmul then
    takes other BLAS calls), views BLAS cannot read as they are, q and k (g and v) at one
    address (syrk), a mask other than one (T, S) for all slabs, or slabs large enough for
    OpenBLAS to thread while BLAS is not held (the bits of its two threads differ)."""
    b, t, e = q.shape
    s, ev = k.shape[1], v.shape[2]
    if not SLABS or type(scale) is not float or min(b, t - 1, s - 1) < 1 \
            or e < 2 * heads or ev < 2 * heads or e % heads or ev % heads:
        return None
    slabs = b * heads
    if slabs * t * s < PRANGE_MIN_SIZE or not parallel_loops.parallel_threads() \
            or LOOPS.module() is None:
        return None
    count = min(slabs, max(1, slabs * t * s // SLAB_BLOCK_ELEMENTS))
    arrays = (q, k, v) if g is None else (q, k, v, g)
    if any(type(x) is not np.ndarray or x.dtype != np.float32 for x in arrays):
        return None
    dk, dv = e // heads, ev // heads
    if not (_blasable(q, dk) and _blasable(k, dk) and _blasable(v, dv)
            and (g is None or _blasable(g, dv))):
        return None
    if _same_slab_start(q, k) or (g is not None and t == s and g.strides[1] == v.strides[1]
                                  and _same_slab_start(g, v)):
        return None
    rows = None
    if mask is not None:
        rows = _mask_rows(mask, np.empty((1, 1, t, s), np.float32))
        if rows is None:
            return None
    if not blas_threads.available() or (
            not blas_threads.held() and max(dk, dv) * t * s > _ONE_THREAD_MACS):
        return None
    gemm = openblas_gemm.gemm(np.float32)
    module = PARALLEL_LOOPS.module() if gemm is not None else None
    if module is None:
        return None
    if rows is None:
        rows = np.zeros((1, s), np.float32)
    return module, rows, count, gemm


def _packed(q: Any, k: Any, v: Any) -> bool:
    """Whether q, k and v are the slices 0, 1, 2 along axis 2 of one C-contiguous
    (B, T, 3, D) array (split views of a self-attention's one projection)."""
    if not (q.shape == k.shape == v.shape and q.strides == k.strides == v.strides):
        return False
    b, t, e = q.shape
    row = e * q.itemsize
    start = q.ctypes.data
    return q.strides == (t * 3 * row, 3 * row, q.itemsize) and \
        k.ctypes.data == start + row and v.ctypes.data == start + 2 * row


#: the slab kernels' stand-in for an array they do not use (no probabilities kept or given)
_UNUSED = np.empty((1, 1, 1), np.float32)


def _attention_by_slabs(q: Any, k: Any, v: Any, mask: Any, heads: int, scale: float,
                        keep_probs: bool) -> tuple | None:
    """(out, probabilities or None) of :func:`attention` by the whole-slab kernel, or None
    where it does not run."""
    found = _slab_kernels(q, k, v, None, mask, heads, scale)
    if found is None:
        return None
    module, rows, count, gemm = found
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    out, _ = _merged(b, t, heads, v.shape[-1] // heads, np.float32)
    probs = np.empty((b, heads, t, s), np.float32) if keep_probs else None
    with blas_threads.hold():
        ran = PARALLEL_LOOPS.call(module.attention_slabs, gemm, q, k, v, out, rows,
                                  mask is not None, scale, heads, count,
                                  _UNUSED if probs is None else _slabs(probs), keep_probs)
    if not ran:
        return None
    SLAB_RUNS[0] += 1
    return out, probs


def _attention_grad_by_slabs(g: Any, q: Any, k: Any, v: Any, mask: Any, heads: int,
                             scale: float, probs: Any, mask_grad: bool) -> tuple | None:
    """:func:`attention_grad` by the whole-slab kernel, or None where it does not run."""
    found = _slab_kernels(q, k, v, g, mask, heads, scale)
    if found is None:
        return None
    if probs is not None and not (type(probs) is np.ndarray and probs.dtype == np.float32
                                  and probs.flags.c_contiguous):
        return None
    module, rows, count, gemm = found
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    dk_width, dv_width = q.shape[-1] // heads, v.shape[-1] // heads
    if _packed(q, k, v):
        # the gradients as the same views of one (B, T, 3, D) array: the ``stack`` that is
        # split's adjoint hands that array on uncopied (ops_shape._stacked_already)
        packed = np.empty((b, t, 3, q.shape[-1]), np.float32)
        dq, dk, dv = packed[:, :, 0], packed[:, :, 1], packed[:, :, 2]
    else:
        dq, _ = _merged(b, t, heads, dk_width, np.float32)
        dk, _ = _merged(b, s, heads, dk_width, np.float32)
        dv, _ = _merged(b, s, heads, dv_width, np.float32)
    keep = mask is not None and mask_grad
    ds = np.empty((b, heads, t, s) if keep else (1, 1, 1, 1), np.float32)
    with blas_threads.hold():
        ran = PARALLEL_LOOPS.call(module.attention_grad_slabs, gemm, g, q, k, v, dq, dk, dv,
                                  ds.reshape(-1, ds.shape[2], ds.shape[3]), keep,
                                  _UNUSED if probs is None else _slabs(probs),
                                  probs is not None, rows, mask is not None, scale, heads,
                                  count)
    if not ran:
        return None
    SLAB_RUNS[0] += 1
    return dq, dk, dv, (ds if keep else None)


def probabilities(q: Any, k: Any, mask: Any, heads: int, scale: float) -> Any:
    """softmax(scale * q k^T + mask) over the last axis, per head: a new (B, H, T, S) array."""
    s = np.matmul(heads_view(q, heads), heads_view(k, heads).swapaxes(-1, -2))
    loops = _row_loops(s)
    if loops is not None:
        rows = None if mask is None else _mask_rows(mask, s)
        factor = scale
        if mask is not None and rows is None:  # any other broadcast: NumPy adds it
            s *= scale
            s += mask
            factor = 1.0
        width = s.shape[-1]
        flat = s.reshape(-1, width)
        mask_rows = rows if rows is not None else np.zeros((1, width), s.dtype)
        if s.dtype == np.float32:  # the whole softmax in numba (numba_exp's exp)
            if _softmax_f32(s, loops, factor, mask_rows, rows is not None):
                return s
        elif LOOPS.call(loops.shifted_logits_rows, flat, factor, mask_rows,
                        rows is not None):
            np.exp(flat, out=flat)
            if LOOPS.call(loops.normalize_rows, flat):
                return s
        s = np.matmul(heads_view(q, heads), heads_view(k, heads).swapaxes(-1, -2))
    s *= scale
    if mask is not None:
        s += mask
    s -= s.max(axis=-1, keepdims=True)  # (methods: CuPy arrays run this path too)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def attention(q: Any, k: Any, v: Any, mask: Any, heads: int, scale: float,
              keep_probs: bool = False) -> Any:
    """softmax(scale * q k^T + mask) v per head: (B, T, H*dv) from q (B, T, H*dk),
    k (B, S, H*dk), v (B, S, H*dv) and an additive mask broadcasting to (B, H, T, S) or None.
    With ``keep_probs``: (that, the probabilities (B, H, T, S)), for ``attention_grad``'s
    ``probs`` (the very values its recomputation would give)."""
    done = _attention_by_slabs(q, k, v, mask, heads, scale, keep_probs)
    if done is not None:
        return done if keep_probs else done[0]
    dtype = np.result_type(q.dtype, k.dtype, v.dtype)
    p = probabilities(q, k, mask, heads, scale).astype(dtype, copy=False)
    b, t = q.shape[0], q.shape[1]
    out, out_heads = _merged(b, t, heads, v.shape[-1] // heads, dtype)
    np.matmul(p, heads_view(v.astype(dtype, copy=False), heads), out=out_heads)
    return (out, p) if keep_probs else out


def attention_grad(g: Any, q: Any, k: Any, v: Any, mask: Any, heads: int, scale: float,
                   probs: Any = None, mask_grad: bool = True) -> tuple[Any, Any, Any, Any]:
    """(dq, dk, dv, dmask) of :func:`attention` for the output gradient ``g`` (B, T, H*dv);
    dmask is d(loss)/d(logits) (B, H, T, S), or None without a mask or where ``mask_grad``
    is False. ``probs``: the forward's probabilities (``attention(..., keep_probs=True)``),
    read instead of recomputed (never written)."""
    done = _attention_grad_by_slabs(g, q, k, v, mask, heads, scale, probs, mask_grad)
    if done is not None:
        return done
    dtype = np.result_type(g.dtype, q.dtype, k.dtype, v.dtype)
    q, k, v, g = (a.astype(dtype, copy=False) for a in (q, k, v, g))
    if probs is None:
        p = probabilities(q, k, mask, heads, scale).astype(dtype, copy=False)
    else:
        p = np.ascontiguousarray(probs, dtype=dtype)
    gh, vh = heads_view(g, heads), heads_view(v, heads)
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    dv, dv_heads = _merged(b, s, heads, v.shape[-1] // heads, dtype)
    np.matmul(p.swapaxes(-1, -2), gh, out=dv_heads)
    ds = np.matmul(gh, vh.swapaxes(-1, -2))  # dp, then ds in place
    loops = _row_loops(ds)
    if loops is None or not p.flags.c_contiguous or not _softmax_grad(loops, p, ds):
        ds *= p
        ds -= p * ds.sum(axis=-1, keepdims=True)  # (p is not written: it may be the forward's)
    dk_width = q.shape[-1] // heads
    dq, dq_heads = _merged(b, t, heads, dk_width, dtype)
    np.matmul(ds, heads_view(k, heads), out=dq_heads)
    dq *= scale
    dk, dk_heads = _merged(b, s, heads, dk_width, dtype)
    np.matmul(ds.swapaxes(-1, -2), heads_view(q, heads), out=dk_heads)
    dk *= scale
    return dq, dk, dv, (ds if mask is not None and mask_grad else None)
