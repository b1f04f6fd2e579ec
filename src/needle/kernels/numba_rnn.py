"""The numba loops behind rnn.py's LSTM steps (imported only where numba is installed).

Each fuses the elementwise work of one time step into one pass, where NumPy makes five to
ten calls on (batch, hidden) slices; the tanh calls and matrix products stay in NumPy (its
SIMD tanh is faster than numba's scalar one). Same formulas, same order of operations as
rnn.py's NumPy paths, so results agree to rounding. Top-level functions so numba can cache
their machine code on disk.
"""

from __future__ import annotations

from ..backend.numba_support import njit_cached


def _jit(fn):
    """needle's njit (backend/numba_support.py) for this file's loops."""
    return njit_cached(fn)


@_jit
def gates_in(a, x_t, scale):
    """a = (a + x_t) * scale: the pre-activations of one step, scaled for one tanh call."""
    batch, four = a.shape
    for b in range(batch):
        for j in range(four):
            a[b, j] = (a[b, j] + x_t[b, j]) * scale[j]


@_jit
def gates_out_and_cell(a, scale, shift, c_prev, c_t):
    """a = a * scale + shift (tanh -> sigmoid / tanh gates); c_t = f * c_prev + i * g."""
    batch, four = a.shape
    hidden = four // 4
    for b in range(batch):
        for j in range(four):
            a[b, j] = a[b, j] * scale[j] + shift[j]
        for j in range(hidden):
            c_t[b, j] = a[b, hidden + j] * c_prev[b, j] + a[b, j] * a[b, 2 * hidden + j]


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
