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
        for j in range(hidden):
            dhv = dh[b, j] + dh_t[b, j]
            tc = tanh_c[b, j]
            i = act[b, j]
            f = act[b, hidden + j]
            g = act[b, 2 * hidden + j]
            o = act[b, 3 * hidden + j]
            dc = dhv * ((one - tc * tc) * o)
            dc = dc + dc_t[b, j]
            dc = dc + dc_next[b, j]
            d_i = dc * g
            d_f = dc * c_prev[b, j]
            d_g = dc * i
            d_o = dhv * tc
            if has_dacts:
                d_i = d_i + dacts_t[b, j]
                d_f = d_f + dacts_t[b, hidden + j]
                d_g = d_g + dacts_t[b, 2 * hidden + j]
                d_o = d_o + dacts_t[b, 3 * hidden + j]
            d[b, j] = d_i * (i * (one - i))
            d[b, hidden + j] = d_f * (f * (one - f))
            d[b, 2 * hidden + j] = d_g * (one - g * g)
            d[b, 3 * hidden + j] = d_o * (o * (one - o))
            dc_next[b, j] = dc * f
