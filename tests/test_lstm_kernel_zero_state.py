"""kernels/rnn.lstm_backward without a state (h0, c0 None) skips the zero h0's share of the
recurrent weight's gradient; the results must equal those of an explicit zero state, and
the gradient must match a plain transcription, sum over steps of h_{t-1}^T dpre_t."""

import numpy as np
import pytest

from needle.kernels import rnn


@pytest.mark.parametrize("steps", [0, 1, 2, 5])
def test_zero_state_equals_explicit_zeros_and_transcription(steps):
    rng = np.random.default_rng(3)
    batch, hidden = 3, 4
    x_proj = rng.standard_normal((steps, batch, 4 * hidden))
    w_hh = rng.standard_normal((hidden, 4 * hidden))
    dh, dc = (rng.standard_normal((steps, batch, hidden)) for _ in range(2))
    zeros = np.zeros((batch, hidden))
    fwd = rnn.lstm_forward(x_proj, w_hh)
    implicit = rnn.lstm_backward(dh, dc, None, w_hh, *fwd)
    explicit = rnn.lstm_backward(dh, dc, None, w_hh, *fwd, zeros, zeros)
    for got, want in zip(implicit, explicit):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    dpre, dw_hh = implicit[0], implicit[1]
    h_prev = np.concatenate([zeros[None], fwd[0][:-1]]) if steps else fwd[0]
    want_dw = sum((h_prev[t].T @ dpre[t] for t in range(steps)), np.zeros_like(w_hh))
    np.testing.assert_allclose(dw_hh, want_dw, rtol=1e-12, atol=1e-12)
    assert dw_hh.shape == w_hh.shape


def test_state_given_weight_gradient_includes_h0():
    rng = np.random.default_rng(4)
    steps, batch, hidden = 4, 2, 3
    x_proj = rng.standard_normal((steps, batch, 4 * hidden))
    w_hh = rng.standard_normal((hidden, 4 * hidden))
    h0, c0 = rng.standard_normal((2, batch, hidden))
    dh, dc = (rng.standard_normal((steps, batch, hidden)) for _ in range(2))
    fwd = rnn.lstm_forward(x_proj, w_hh, h0, c0)
    dpre, dw_hh, _, _ = rnn.lstm_backward(dh, dc, None, w_hh, *fwd, h0, c0)
    h_prev = np.concatenate([h0[None], fwd[0][:-1]])
    want_dw = sum(h_prev[t].T @ dpre[t] for t in range(steps))
    np.testing.assert_allclose(dw_hh, want_dw, rtol=1e-12, atol=1e-12)
