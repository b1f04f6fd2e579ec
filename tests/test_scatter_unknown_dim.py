"""getitem's gradient (a scatter) in a declared graph whose batch size is unknown.

A placeholder ``(None, ...)`` gives every node a None batch dim; getitem's gradient is a
``scatter`` into the input's shape, which then holds None. The scatter must take the size of
such an axis from the values it scatters at run time (the index keeps the axis whole), so a
model with AvgPool2d (k*k window slices) trains in a Session fed batches of any size, as it
does eagerly.
"""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.nn as nn
import needle.static as st


def _cnn(seed: int) -> nn.Module:
    np.random.seed(seed)
    return nn.Sequential(nn.Conv(1, 4, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 10))


def test_pooling_model_trains_in_a_session_with_unknown_batch_like_eager():
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((n, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, n))
               for n in (6, 3, 6)]  # two batch sizes through one graph
    loss_fn = nn.SoftmaxLoss()

    eager = _cnn(seed=3)
    opt = ndl.optim.SGD(eager.parameters(), lr=0.1)
    eager_losses = []
    for images, labels in batches:
        opt.reset_grad()
        loss = loss_fn(eager(ndl.Tensor(images)), ndl.Tensor(labels))
        loss.backward()
        opt.step()
        eager_losses.append(float(loss.numpy()))

    graph_model = _cnn(seed=3)
    with st.Graph():
        x = st.placeholder((None, 1, 8, 8), name="images")
        y = st.placeholder((None,), dtype="int64", name="labels")
        loss = loss_fn(graph_model(x), y)
        train = st.minimize(ndl.optim.SGD(graph_model.parameters(), lr=0.1), loss)
        sess = st.Session()
        graph_losses = [float(sess.run([train, loss], {x: images, y: labels})[1])
                        for images, labels in batches]

    np.testing.assert_allclose(graph_losses, eager_losses, rtol=1e-6, atol=1e-6)
    for a, b in zip(eager.parameters(), graph_model.parameters()):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-6)


def test_getitem_gradient_with_unknown_batch_matches_numpy():
    with st.Graph():
        x = st.placeholder((None, 5, 3))
        y = x[:, 1:4:2, ::-1]  # a partial and a reversed slice beside the unknown axis
        (grad,) = st.gradients((y * y).sum(), [x])
        sess = st.Session()
        for n in (2, 7):
            value = np.random.default_rng(n).standard_normal((n, 5, 3)).astype(np.float32)
            expected = np.zeros_like(value)
            expected[:, 1:4:2] = 2 * value[:, 1:4:2]
            np.testing.assert_array_equal(sess.run(grad, {x: value}), expected)


def test_scatter_with_an_unknown_axis_it_cannot_read_is_refused_clearly():
    with st.Graph():
        x = st.placeholder((None, 3))
        (grad,) = st.gradients(x[1:].sum(), [x])  # the batch axis is cut: its size is lost
        # a ShapeError eagerly; a Session names the node around it (NodeRunError)
        with pytest.raises((ValueError, RuntimeError), match=r"scatter: .*unknown.*axis 0"):
            st.Session().run(grad, {x: np.ones((4, 3), np.float32)})


def test_scatter_resolves_unknown_dims_eagerly_from_its_values():
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = ndl.ops.scatter(ndl.Tensor(values), (slice(None), slice(0, 3)), (None, 4))
    expected = np.zeros((2, 4), np.float32)
    expected[:, 0:3] = values
    np.testing.assert_array_equal(out.numpy(), expected)
    # two unknown axes, one of them reversed: both are read from the values
    out = ndl.ops.scatter(ndl.Tensor(values), (slice(None, None, -1), slice(None)), (None, None))
    np.testing.assert_array_equal(out.numpy(), values[::-1])
