"""One program, four front-ends: eager, a declared Session graph, the JIT and a Caffe Net give
the same loss and parameter gradients (the same ops run, so the agreement is to rounding)."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.caffe as cf
import needle.nn as nn
import needle.static as st


def _model() -> nn.Module:
    np.random.seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(),
                         nn.Residual(nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16))),
                         nn.Tanh(), nn.Linear(16, 4))


def _data():
    rng = np.random.default_rng(1)
    return rng.standard_normal((10, 6)).astype(np.float32), rng.integers(0, 4, 10)


def _eager(model, X, y):
    loss = nn.SoftmaxLoss()(model(ndl.Tensor(X, requires_grad=False)), ndl.Tensor(y))
    for p in model.parameters():
        p.grad = None
    loss.backward()
    return float(loss.numpy()), [p.grad.numpy() for p in model.parameters()]


def _session(model, X, y):
    with st.Graph():
        xs, ys = st.placeholder((None, 6)), st.placeholder((None,), dtype="int64")
        loss = nn.SoftmaxLoss()(model(xs), ys)
        grads = st.gradients(loss, model.parameters())
        value, grad_values = st.Session().run([loss, grads], feed_dict={xs: X, ys: y})
    return float(value), grad_values


def _jit(model, X, y):
    loss_fn = nn.SoftmaxLoss()

    @ndl.jit
    def loss_of(x, labels):
        return loss_fn(model(x), labels)

    for p in model.parameters():
        p.grad = None
    loss = loss_of(ndl.Tensor(X, requires_grad=False), ndl.Tensor(y))
    loss.backward()  # through the compiled plan's own compiled gradient
    return float(loss.numpy()), [p.grad.numpy() for p in model.parameters()]


def _caffe(model, X, y):
    net = cf.Net.from_module(model, X, loss="SoftmaxWithLoss")
    out = net.forward(data=X, label=y)
    net.backward()
    blobs = [b for b in net.learnable_params if b.lr_mult != 0]
    return float(out["loss"]), [b.diff.reshape(p.shape)
                                for b, p in zip(blobs, model.parameters())]


@pytest.mark.parametrize("front_end", [_session, _jit, _caffe],
                         ids=["session", "jit", "caffe"])
def test_front_ends_agree_with_eager(front_end):
    model = _model()
    X, y = _data()
    loss, grads = _eager(model, X, y)
    other_loss, other_grads = front_end(model, X, y)
    assert other_loss == pytest.approx(loss, rel=1e-6, abs=1e-7)
    assert len(other_grads) == len(grads) == 8
    for a, b in zip(other_grads, grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
