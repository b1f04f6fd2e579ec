"""Attention's softmax and softmax-adjoint row loops (kernels/attention.py) split over cores by
numba's ``prange`` on the TBB layer (backend/parallel_loops.py; imported only where it runs).

The (B, H, T, S) logits are cut into ``count`` blocks of whole (batch, head) slabs of T rows,
block ``b`` holding slabs ``n * b // count`` to ``n * (b + 1) // count`` (``count`` from the
shape alone), and each block runs the one-thread loops of numba_attention.py on its rows (a
slab starts at a multiple of T, so the causal mask's row ``r % T`` is the same). Each row's
result depends on that row alone: the bits do not depend on the thread count or on whether
the blocks ran in parallel.
The whole attention (``attention_slabs``) and its adjoint (``attention_grad_slabs``) run
the same way, a block of slabs at a time, each slab's products by NumPy's own OpenBLAS gemm
(kernels/openblas_gemm.py, passed in as a ctypes function) with the very arguments NumPy's
``matmul`` gives it for that slab (row major; the same transpose flags and leading
dimensions), and its softmax passes by numba_attention.py's row loops: each slab's values are
those of kernels/attention.py's NumPy-ordered path, bit for bit, while the products of a
block run on one TBB thread with the slab's (T, S) logits in its cache (NumPy's batched
products ran on one thread, whole (B, H, T, S) arrays between them).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ..backend.parallel_loops import njit_parallel
from . import numba_attention

#: CBLAS enum values (cblas.h): row major, no transpose, transpose
_ROW, _N, _T = 101, 111, 112


def _softmax_slabs(s, scale, mask, use_mask, count):
    """numba_attention.softmax_rows_f32 over ``count`` blocks of the (N, T, S) slabs."""
    n, t, width = s.shape
    for b in prange(count):
        start = n * b // count
        stop = n * (b + 1) // count
        numba_attention.softmax_rows_f32(s[start:stop].reshape(((stop - start) * t, width)),
                                         scale, mask, use_mask)


def _softmax_grad_slabs(p, dp, count):
    """numba_attention.softmax_grad_rows over ``count`` blocks of the (N, T, S) slabs."""
    n, t, width = p.shape
    for b in prange(count):
        start = n * b // count
        stop = n * (b + 1) // count
        rows = (stop - start) * t
        numba_attention.softmax_grad_rows(p[start:stop].reshape((rows, width)),
                                          dp[start:stop].reshape((rows, width)))


def _slab_probabilities(gemm, q, k, i, h, dk, scale, mask, use_mask, p):
    """p (T, S) = softmax(scale * q_h k_h^T + mask rows) for slab (batch ``i``, head ``h``):
    the product by cblas_sgemm ``gemm`` (k_h^T read transposed, as NumPy passes a swapped
    view), then numba_attention's softmax rows."""
    t, s = p.shape
    qh = q[i, :, h * dk:(h + 1) * dk]
    kh = k[i, :, h * dk:(h + 1) * dk]
    gemm(_ROW, _N, _T, t, s, dk, 1.0, qh.ctypes, q.strides[1] // 4, kh.ctypes,
         k.strides[1] // 4, 0.0, p.ctypes, s)
    numba_attention.softmax_rows_f32(p, scale, mask, use_mask)


_slab_probabilities_jit = numba.njit(nogil=True, inline="always")(_slab_probabilities)


def _attention_slabs(gemm, q, k, v, out, mask, use_mask, scale, heads, count, p_all, keep_p):
    """out (B, T, H*dv) = softmax(scale * q_h k_h^T + mask rows) v_h per head h, in ``count``
    blocks of the B * H (batch, head) slabs; q (B, T, H*dk), k (B, S, H*dk), v (B, S, H*dv)
    float32 with unit-stride rows, mask (T, S) read where ``use_mask`` (see
    numba_attention.shifted_logits_rows). gemm: cblas_sgemm (a ctypes function). Where
    ``keep_p`` each slab's probabilities are made in ``p_all`` (B * H, T, S), kept for the
    backward, else in a scratch slab."""
    b, t, e = q.shape
    s = k.shape[1]
    dk = e // heads
    dv = v.shape[2] // heads
    n = b * heads
    ldv = v.strides[1] // 4
    ldo = out.strides[1] // 4
    for blk in prange(count):
        p = np.empty((t, s), np.float32)
        for slab in range(n * blk // count, n * (blk + 1) // count):
            i = slab // heads
            h = slab - i * heads
            vh = v[i, :, h * dv:(h + 1) * dv]
            oh = out[i, :, h * dv:(h + 1) * dv]
            ps = p_all[slab] if keep_p else p
            _slab_probabilities_jit(gemm, q, k, i, h, dk, scale, mask, use_mask, ps)
            gemm(_ROW, _N, _N, t, dv, s, 1.0, ps.ctypes, s, vh.ctypes, ldv, 0.0, oh.ctypes, ldo)


def _attention_grad_slabs(gemm, g, q, k, v, dq, dk_out, dv_out, ds_all, keep_ds, p_all,
                          have_p, mask, use_mask, scale, heads, count):
    """dq, dk_out, dv_out (shaped as q, k, v) of ``_attention_slabs`` for the output
    gradient g (B, T, H*dv), per slab: p read from ``p_all`` (B * H, T, S) where ``have_p``
    (the forward kept it), else recomputed, dv = p^T g, ds = softmax's adjoint of g v^T,
    dq = scale * ds k, dk = scale * ds^T q; ds kept in ``ds_all`` (B * H, T, S) where
    ``keep_ds`` (the mask's gradient), else in a scratch slab."""
    b, t, e = q.shape
    s = k.shape[1]
    dk = e // heads
    dv = v.shape[2] // heads
    n = b * heads
    ldq, ldk, ldv = q.strides[1] // 4, k.strides[1] // 4, v.strides[1] // 4
    ldg = g.strides[1] // 4
    lq, lk, lv = dq.strides[1] // 4, dk_out.strides[1] // 4, dv_out.strides[1] // 4
    box = np.empty(1, np.float32)  # the scale as float32: NumPy's ``dq *= scale``
    box[0] = scale
    factor = box[0]
    for blk in prange(count):
        p = np.empty((t, s), np.float32)
        scratch = np.empty((t, s), np.float32)
        for slab in range(n * blk // count, n * (blk + 1) // count):
            i = slab // heads
            h = slab - i * heads
            ds = ds_all[slab] if keep_ds else scratch
            qh = q[i, :, h * dk:(h + 1) * dk]
            kh = k[i, :, h * dk:(h + 1) * dk]
            vh = v[i, :, h * dv:(h + 1) * dv]
            gh = g[i, :, h * dv:(h + 1) * dv]
            dqh = dq[i, :, h * dk:(h + 1) * dk]
            dkh = dk_out[i, :, h * dk:(h + 1) * dk]
            dvh = dv_out[i, :, h * dv:(h + 1) * dv]
            if have_p:
                ps = p_all[slab]
            else:
                ps = p
                _slab_probabilities_jit(gemm, q, k, i, h, dk, scale, mask, use_mask, ps)
            # dv_h = p^T @ g_h, dp = g_h @ v_h^T (into ds), then softmax's adjoint in place
            gemm(_ROW, _T, _N, s, dv, t, 1.0, ps.ctypes, s, gh.ctypes, ldg, 0.0, dvh.ctypes, lv)
            gemm(_ROW, _N, _T, t, s, dv, 1.0, gh.ctypes, ldg, vh.ctypes, ldv, 0.0, ds.ctypes, s)
            numba_attention.softmax_grad_rows(ps, ds)
            # dq_h = ds @ k_h, dk_h = ds^T @ q_h, each then times the scale
            gemm(_ROW, _N, _N, t, dk, s, 1.0, ds.ctypes, s, kh.ctypes, ldk, 0.0, dqh.ctypes, lq)
            gemm(_ROW, _T, _N, s, dk, t, 1.0, ds.ctypes, s, qh.ctypes, ldq, 0.0, dkh.ctypes, lk)
            for r in range(t):
                for c in range(dk):
                    dqh[r, c] *= factor
            for r in range(s):
                for c in range(dk):
                    dkh[r, c] *= factor


softmax_slabs = njit_parallel(_softmax_slabs)
softmax_grad_slabs = njit_parallel(_softmax_grad_slabs)
attention_slabs = njit_parallel(_attention_slabs)
attention_grad_slabs = njit_parallel(_attention_grad_slabs)
