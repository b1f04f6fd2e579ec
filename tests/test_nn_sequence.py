"""nn.Embedding, RNNCell, LSTMCell, RNN and LSTM against PyTorch (forward and all gradients)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import needle as ndl
import needle.nn as nn

ATOL, RTOL = 2e-5, 1e-4
SEQ, BATCH, IN, HID = 4, 3, 5, 6


def _close(ours, theirs, atol=ATOL, rtol=RTOL) -> None:
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    np.testing.assert_allclose(ours.numpy(), theirs, atol=atol, rtol=rtol)


def _randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _copy_cell(cell, torch_module, suffix: str = "") -> None:
    """needle's (in, out) weights into torch's (out, in) parameters (biases as they are)."""
    with torch.no_grad():
        getattr(torch_module, "weight_ih" + suffix).copy_(torch.tensor(cell.W_ih.numpy().T))
        getattr(torch_module, "weight_hh" + suffix).copy_(torch.tensor(cell.W_hh.numpy().T))
        if cell.bias_ih is not None:
            getattr(torch_module, "bias_ih" + suffix).copy_(torch.tensor(cell.bias_ih.numpy()))
            getattr(torch_module, "bias_hh" + suffix).copy_(torch.tensor(cell.bias_hh.numpy()))


def _check_cell_grads(cell, torch_module, suffix: str = "") -> None:
    _close(cell.W_ih.grad, getattr(torch_module, "weight_ih" + suffix).grad.numpy().T)
    _close(cell.W_hh.grad, getattr(torch_module, "weight_hh" + suffix).grad.numpy().T)
    if cell.bias_ih is not None:
        _close(cell.bias_ih.grad, getattr(torch_module, "bias_ih" + suffix).grad)
        _close(cell.bias_hh.grad, getattr(torch_module, "bias_hh" + suffix).grad)


# -- Embedding --------------------------------------------------------------------------------
def test_embedding_matches_torch():
    rng = np.random.default_rng(0)
    emb = nn.Embedding(10, 4)
    assert emb.weight.shape == (10, 4)
    ids = rng.integers(0, 10, size=(5, 3))
    ids[0, :] = 7  # repeated ids must add up their gradients
    out = emb(ndl.Tensor(ids.astype(np.float32), requires_grad=False))  # float ids work
    tw = torch.tensor(emb.weight.numpy(), requires_grad=True)
    tout = torch.nn.functional.embedding(torch.tensor(ids), tw)
    assert out.shape == (5, 3, 4)
    _close(out, tout)
    g = _randn(rng, 5, 3, 4)
    (out * ndl.Tensor(g)).sum().backward()
    (tout * torch.tensor(g)).sum().backward()
    _close(emb.weight.grad, tw.grad)


def test_embedding_in_a_declared_graph_agrees_with_eager():
    """Ids fed through a placeholder (no value while the graph is built) take the same
    gather as eager ids: the same rows and the same weight gradient."""
    import needle.static as st

    rng = np.random.default_rng(1)
    emb = nn.Embedding(6, 3)
    ids = rng.integers(0, 6, size=(4, 2))
    ids[0, :] = 5  # repeated ids add up
    g = _randn(rng, 4, 2, 3)
    looked_up = emb(ndl.Tensor(ids, requires_grad=False))
    (looked_up * ndl.Tensor(g)).sum().backward()
    with st.Graph():
        x = st.placeholder((None, 2), dtype="int64")
        out = emb(x)
        (grad,) = st.gradients(out * ndl.Tensor(g), [emb.weight])
        got, got_grad = st.Session().run([out, grad], {x: ids})
    np.testing.assert_allclose(got, looked_up.numpy(), atol=1e-6)
    np.testing.assert_allclose(got_grad, emb.weight.grad.numpy(), atol=1e-6)


def test_embedding_rejects_bad_ids():
    emb = nn.Embedding(4, 2)
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        emb(ndl.Tensor(np.array([[4]]), requires_grad=False))
    with pytest.raises(ValueError, match="whole numbers"):
        emb(ndl.Tensor(np.array([[1.5]], dtype=np.float32), requires_grad=False))


# -- cells ------------------------------------------------------------------------------------
def test_rnn_cell_init_draw_order_and_bounds():
    np.random.seed(3)
    cell = nn.RNNCell(IN, HID)
    np.random.seed(3)
    k = 1 / math.sqrt(HID)
    expected = [np.random.rand(*shape) * 2 * k - k
                for shape in [(IN, HID), (HID, HID), (HID,), (HID,)]]
    params = [cell.W_ih, cell.W_hh, cell.bias_ih, cell.bias_hh]
    assert cell.parameters() == params
    for p, e in zip(params, expected):
        assert p.dtype == np.float32
        np.testing.assert_allclose(p.numpy(), e, rtol=1e-6, atol=1e-7)
    lstm = nn.LSTMCell(IN, HID, bias=False)
    assert [p.shape for p in lstm.parameters()] == [(IN, 4 * HID), (HID, 4 * HID)]


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("with_state", [False, True])
def test_rnn_cell_matches_torch(nonlinearity, with_state):
    rng = np.random.default_rng(2)
    cell = nn.RNNCell(IN, HID, nonlinearity=nonlinearity)
    tcell = torch.nn.RNNCell(IN, HID, nonlinearity=nonlinearity)
    _copy_cell(cell, tcell)
    x, h = _randn(rng, BATCH, IN), _randn(rng, BATCH, HID)
    X, H = ndl.Tensor(x), ndl.Tensor(h)
    tx, th = torch.tensor(x, requires_grad=True), torch.tensor(h, requires_grad=True)
    out = cell(X, H if with_state else None)
    tout = tcell(tx, th if with_state else None)
    _close(out, tout)
    g = _randn(rng, BATCH, HID)
    (out * ndl.Tensor(g)).sum().backward()
    (tout * torch.tensor(g)).sum().backward()
    _close(X.grad, tx.grad)
    if with_state:
        _close(H.grad, th.grad)
    _check_cell_grads(cell, tcell)  # with a zero state W_hh's gradient is zeros, not None


@pytest.mark.parametrize("with_state", [False, True])
def test_lstm_cell_matches_torch(with_state):
    rng = np.random.default_rng(3)
    cell = nn.LSTMCell(IN, HID)
    tcell = torch.nn.LSTMCell(IN, HID)
    _copy_cell(cell, tcell)
    x, h, c = _randn(rng, BATCH, IN), _randn(rng, BATCH, HID), _randn(rng, BATCH, HID)
    X, H, C = ndl.Tensor(x), ndl.Tensor(h), ndl.Tensor(c)
    tx, th, tc = (torch.tensor(a, requires_grad=True) for a in (x, h, c))
    h1, c1 = cell(X, (H, C) if with_state else None)
    th1, tc1 = tcell(tx, (th, tc) if with_state else None)
    _close(h1, th1)
    _close(c1, tc1)
    gh, gc = _randn(rng, BATCH, HID), _randn(rng, BATCH, HID)
    ((h1 * ndl.Tensor(gh)).sum() + (c1 * ndl.Tensor(gc)).sum()).backward()
    ((th1 * torch.tensor(gh)).sum() + (tc1 * torch.tensor(gc)).sum()).backward()
    _close(X.grad, tx.grad)
    if with_state:
        _close(H.grad, th.grad)
        _close(C.grad, tc.grad)
    _check_cell_grads(cell, tcell)


# -- multi-layer sequences --------------------------------------------------------------------
@pytest.mark.parametrize("nonlinearity, bias", [("tanh", True), ("relu", True), ("tanh", False)])
@pytest.mark.parametrize("with_state", [False, True])
def test_rnn_two_layers_matches_torch(nonlinearity, bias, with_state):
    rng = np.random.default_rng(4)
    layers = 2
    model = nn.RNN(IN, HID, num_layers=layers, bias=bias, nonlinearity=nonlinearity)
    tmodel = torch.nn.RNN(IN, HID, num_layers=layers, bias=bias, nonlinearity=nonlinearity)
    assert len(model.rnn_cells) == layers and len(model.parameters()) == (4 if bias else 2) * 2
    for i, cell in enumerate(model.rnn_cells):
        _copy_cell(cell, tmodel, f"_l{i}")
    x, h0 = _randn(rng, SEQ, BATCH, IN), _randn(rng, layers, BATCH, HID)
    X, H0 = ndl.Tensor(x), ndl.Tensor(h0)
    tx, th0 = torch.tensor(x, requires_grad=True), torch.tensor(h0, requires_grad=True)
    out, h_n = model(X, H0 if with_state else None)
    tout, th_n = tmodel(tx, th0 if with_state else None)
    assert out.shape == (SEQ, BATCH, HID) and h_n.shape == (layers, BATCH, HID)
    _close(out, tout)
    _close(h_n, th_n)
    g, gh = _randn(rng, SEQ, BATCH, HID), _randn(rng, layers, BATCH, HID)
    ((out * ndl.Tensor(g)).sum() + (h_n * ndl.Tensor(gh)).sum()).backward()
    ((tout * torch.tensor(g)).sum() + (th_n * torch.tensor(gh)).sum()).backward()
    _close(X.grad, tx.grad)
    if with_state:
        _close(H0.grad, th0.grad)
    for i, cell in enumerate(model.rnn_cells):
        _check_cell_grads(cell, tmodel, f"_l{i}")


@pytest.mark.parametrize("with_state", [False, True])
def test_lstm_two_layers_matches_torch(with_state):
    rng = np.random.default_rng(5)
    layers = 2
    model = nn.LSTM(IN, HID, num_layers=layers)
    tmodel = torch.nn.LSTM(IN, HID, num_layers=layers)
    assert len(model.lstm_cells) == layers
    for i, cell in enumerate(model.lstm_cells):
        _copy_cell(cell, tmodel, f"_l{i}")
    x = _randn(rng, SEQ, BATCH, IN)
    h0, c0 = _randn(rng, layers, BATCH, HID), _randn(rng, layers, BATCH, HID)
    X, H0, C0 = ndl.Tensor(x), ndl.Tensor(h0), ndl.Tensor(c0)
    tx, th0, tc0 = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
    out, (h_n, c_n) = model(X, (H0, C0) if with_state else None)
    tout, (th_n, tc_n) = tmodel(tx, (th0, tc0) if with_state else None)
    _close(out, tout)
    _close(h_n, th_n)
    _close(c_n, tc_n)
    g, gh, gc = (_randn(rng, *shape) for shape in [out.shape, h_n.shape, c_n.shape])
    loss = sum(((t * ndl.Tensor(w)).sum() for t, w in [(out, g), (h_n, gh), (c_n, gc)]),
               start=ndl.Tensor(0.0, requires_grad=False))
    loss.backward()
    sum((t * torch.tensor(w)).sum() for t, w in [(tout, g), (th_n, gh), (tc_n, gc)]).backward()
    _close(X.grad, tx.grad)
    if with_state:
        _close(H0.grad, th0.grad)
        _close(C0.grad, tc0.grad)
    for i, cell in enumerate(model.lstm_cells):
        _check_cell_grads(cell, tmodel, f"_l{i}")


def test_rnn_rejects_wrong_state_and_input():
    model = nn.RNN(IN, HID, num_layers=2)
    x = ndl.Tensor(np.zeros((SEQ, BATCH, IN), dtype=np.float32))
    with pytest.raises(ValueError, match="expected 2"):
        model(x, ndl.Tensor(np.zeros((1, BATCH, HID), dtype=np.float32)))
    with pytest.raises(ValueError, match="expected input"):
        model(ndl.Tensor(np.zeros((SEQ, BATCH, IN + 1), dtype=np.float32)))


def test_cells_read_weights_at_call_time():
    """Users may replace a cell's weights after construction (needle's tests do)."""
    cell = nn.RNNCell(2, 3, bias=False)
    cell.W_ih = nn.Parameter(np.ones((2, 3), dtype=np.float32))
    cell.W_hh = nn.Parameter(np.zeros((3, 3), dtype=np.float32))
    out = cell(ndl.Tensor(np.array([[1.0, 2.0]], dtype=np.float32)))
    np.testing.assert_allclose(out.numpy(), np.tanh(np.full((1, 3), 3.0)), rtol=1e-6)


def test_embedding_and_lstm_run_on_a_declared_graph():
    """Ids without a value take the one-hot path; unknown batch sizes work."""
    st = pytest.importorskip("needle.static")
    np.random.seed(2)
    emb, lstm = nn.Embedding(7, IN), nn.LSTM(IN, HID, num_layers=2)
    ids = np.random.randint(0, 7, size=(SEQ, BATCH)).astype(np.float32)
    out, (h_n, c_n) = lstm(emb(ndl.Tensor(ids, requires_grad=False)))
    with st.Graph():
        I = st.placeholder((SEQ, None))
        lazy_out, (lazy_h, lazy_c) = lstm(emb(I))
        got = st.Session().run([lazy_out, lazy_h, lazy_c], feed_dict={I: ids})
    for value, reference in zip(got, [out, h_n, c_n]):
        np.testing.assert_allclose(value, reference.numpy(), rtol=1e-5, atol=1e-6)
