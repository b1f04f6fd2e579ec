"""The numba loops behind rnn.py's LSTM (imported only where numba is installed).

``forward_rows`` and ``backward_rows`` run a whole layer's recurrence for a block of batch
rows in one call: each step's small product by NumPy's own OpenBLAS gemm (a ctypes function,
kernels/openblas_gemm.py, with the arguments NumPy's matmul would pass), then the step's
elementwise work in one pass per row, tanh by numba_tanh (vectorized; libm's in float64).
Python made ~6 calls a step before (matmul, two NumPy tanh, two loops, a multiply).
Same formulas, same order of operations as rnn.py's NumPy paths, so results agree to a few
ulp (the tanh). Top-level functions so numba can cache their machine code on disk.
"""

from __future__ import annotations

from ..backend.numba_support import njit_cached
from .numba_gemm import gemm_call
from .numba_intrinsics import wide_vectors
from .numba_tanh import tanh_of


def _jit(fn):
    """needle's njit (backend/numba_support.py) for this file's loops."""
    return njit_cached(fn)


@_jit
def step_backward(dh, dh_t, dc_t, dc_next, tanh_c, act, c_prev, dacts_t, has_dacts, one, d):
    """One step of the LSTM backward, given the adjoint ``dh`` of h from the later steps.

    ``dh`` += dh_t; dc = dh o (1 - tanh(c)^2) + dc_t + dc_next; the pre-activation adjoints
    of the gates into ``d``; ``dc_next`` becomes the adjoint of c_prev (dc f). ``one`` is 1
    in the arrays' dtype (float32 stays float32).
    """
    batch, four = act.shape
    hidden = four // 4
    for b in range(batch):
        # one-dimensional row views: with them LLVM vectorizes the j loop (2x faster than
        # 2-D indexing at batch 32, hidden 128); same operations in the same order
        dh_b, dh_tb, dc_tb, dc_nb = dh[b], dh_t[b], dc_t[b], dc_next[b]
        tanh_b, c_prev_b, act_b, dacts_b, d_b = tanh_c[b], c_prev[b], act[b], dacts_t[b], d[b]
        act_i, act_f = act_b[:hidden], act_b[hidden:2 * hidden]
        act_g, act_o = act_b[2 * hidden:3 * hidden], act_b[3 * hidden:]
        d_i_b, d_f_b = d_b[:hidden], d_b[hidden:2 * hidden]
        d_g_b, d_o_b = d_b[2 * hidden:3 * hidden], d_b[3 * hidden:]
        for j in range(hidden):
            dhv = dh_b[j] + dh_tb[j]
            tc = tanh_b[j]
            i = act_i[j]
            f = act_f[j]
            g = act_g[j]
            o = act_o[j]
            dc = dhv * ((one - tc * tc) * o)
            dc = dc + dc_tb[j]
            dc = dc + dc_nb[j]
            d_i = dc * g
            d_f = dc * c_prev_b[j]
            d_g = dc * i
            d_o = dhv * tc
            if has_dacts:
                d_i = d_i + dacts_b[j]
                d_f = d_f + dacts_b[hidden + j]
                d_g = d_g + dacts_b[2 * hidden + j]
                d_o = d_o + dacts_b[3 * hidden + j]
            d_i_b[j] = d_i * (i * (one - i))
            d_f_b[j] = d_f * (f * (one - f))
            d_g_b[j] = d_g * (one - g * g)
            d_o_b[j] = d_o * (o * (one - o))
            dc_nb[j] = dc * f


@_jit
def forward_rows(gemm, x_proj, w_hh, h0, c0, h_all, c_all, acts, scale, shift, start, stop):
    """The whole forward recurrence of rnn.lstm_forward for the batch rows ``start:stop``:
    each step's product ``h @ w_hh`` by the ctypes cblas gemm ``gemm`` (BLAS held on one
    thread by the caller), then the gates and the new state in one pass per row, tanh by
    numba_tanh.tanh_of. The rows are independent, so any cut of the batch gives each row the
    same values for the same gemm results."""
    wide_vectors()
    steps = x_proj.shape[0]
    four = x_proj.shape[2]
    hidden = four // 4
    for t in range(steps):
        a = acts[t, start:stop]
        h_t = h_all[t, start:stop]
        c_t = c_all[t, start:stop]
        if t == 0:
            gemm_call(gemm, 111, h0[start:stop], w_hh, a)
        else:
            gemm_call(gemm, 111, h_all[t - 1, start:stop], w_hh, a)
        for b in range(stop - start):
            a_b, x_b, c_b, h_b = a[b], x_proj[t, start + b], c_t[b], h_t[b]
            c_prev_b = c0[start + b] if t == 0 else c_all[t - 1, start + b]
            for j in range(four):
                a_b[j] = tanh_of((a_b[j] + x_b[j]) * scale[j]) * scale[j] + shift[j]
            for j in range(hidden):
                c_new = a_b[hidden + j] * c_prev_b[j] + a_b[j] * a_b[2 * hidden + j]
                c_b[j] = c_new
                h_b[j] = tanh_of(c_new) * a_b[3 * hidden + j]


@_jit
def backward_rows(gemm, dh_all, dc_all, dacts, has_dacts, w_hh_t, c_all, acts, c0, tanh_c,
                  dpre, dh, dc_next, one, start, stop):
    """The whole backward recurrence of rnn.lstm_backward for the batch rows ``start:stop``:
    step_backward per step, then ``dh = d @ w_hh_t`` (the ctypes cblas gemm ``gemm``;
    ``w_hh_t`` is w_hh.T, contiguous) into ``dh`` for the step before. ``dacts`` is read only
    where ``has_dacts``."""
    steps = acts.shape[0]
    for t in range(steps - 1, -1, -1):
        d = dpre[t, start:stop]
        c_prev = c0[start:stop] if t == 0 else c_all[t - 1, start:stop]
        step_backward(dh[start:stop], dh_all[t, start:stop], dc_all[t, start:stop],
                      dc_next[start:stop], tanh_c[t, start:stop], acts[t, start:stop],
                      c_prev, dacts[t, start:stop], has_dacts, one, d)
        gemm_call(gemm, 111, d, w_hh_t, dh[start:stop])
