"""Value checks run in every mode: bad class ids fail SoftmaxLoss the same way eagerly, under
ndl.jit and in a Session (the ``check_class_ids`` op), instead of giving a finite loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as tF

import needle as ndl
import needle.nn as nn
import needle.static as st

X = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32) * 2
GOOD = np.array([2, 0, 1, 2])

RANGE = "SoftmaxLoss: class ids must lie in [0, 3) for logits of shape (4, 3), got {}"
BAD = [
    pytest.param(np.array([0, 1, 12, 2]), RANGE.format([12]), id="too-large"),
    pytest.param(np.array([0, -1, 1, 2]), RANGE.format([-1]), id="negative"),
    pytest.param(np.array([3, -1, 1, 7]), RANGE.format([3, -1, 7]), id="several"),
    pytest.param(np.array([0.0, 1.0, 12.0, 2.0], np.float32), RANGE.format([12.0]),
                 id="float-too-large"),
    pytest.param(np.array([0.0, 1.5, 1.0, 2.0], np.float32),
                 "SoftmaxLoss: float labels must be whole numbers (class ids)", id="not-whole"),
]


def _message(fn) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


def _eager(loss_fn, x, y):
    return loss_fn(ndl.Tensor(x), ndl.Tensor(y, requires_grad=False))


def _session_loss(loss_fn, labels_dtype):
    """(graph, logits placeholder, labels placeholder, loss node)."""
    graph = st.Graph()
    with graph:
        x = st.placeholder((None, 3), name="logits")
        y = st.placeholder((None,), dtype=labels_dtype, name="labels")
        loss = loss_fn(x, y)
    return graph, x, y, loss


def _torch_loss(x, y, **kwargs):
    return tF.cross_entropy(torch.tensor(x), torch.tensor(y).long(), **kwargs).numpy()


@pytest.mark.parametrize(("labels", "expected"), BAD)
def test_bad_labels_raise_the_same_error_eagerly_under_jit_and_in_a_session(labels, expected):
    loss_fn = nn.SoftmaxLoss()
    eager = _message(lambda: _eager(loss_fn, X, labels))

    jitted = ndl.jit(lambda x, y: loss_fn(x, y))
    jit = _message(lambda: jitted(ndl.Tensor(X), ndl.Tensor(labels, requires_grad=False)))

    graph, x, y, loss = _session_loss(loss_fn, labels.dtype)
    with graph:
        sess = st.Session()
    session = _message(lambda: sess.run(loss, feed_dict={x: X, y: labels}))

    assert eager == jit == session == expected


@pytest.mark.parametrize(("labels", "expected"), BAD)
def test_jitted_training_step_rejects_bad_labels_and_leaves_the_model_alone(labels, expected):
    np.random.seed(0)
    model = nn.Linear(5, 3)
    opt = ndl.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = nn.SoftmaxLoss()

    @ndl.jit
    def train_step(x, y):
        loss = loss_fn(model(x), y)
        opt.reset_grad()
        loss.backward()
        opt.step()
        return loss

    features = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
    train_step(ndl.Tensor(features), ndl.Tensor(GOOD))  # trains: the plan is fine
    before = [p.numpy().copy() for p in model.parameters()]
    message = _message(lambda: train_step(ndl.Tensor(features),
                                          ndl.Tensor(labels, requires_grad=False)))
    assert message == expected
    for p, old in zip(model.parameters(), before):
        np.testing.assert_array_equal(p.numpy(), old)  # no update from the bad batch


@pytest.mark.parametrize("labels_dtype", ["int64", "int32", "float32"])
@pytest.mark.parametrize(("loss_cls", "kwargs"), [
    (nn.SoftmaxLoss, {}),
    (nn.SoftmaxLoss, {"reduction": "sum", "label_smoothing": 0.1}),
    (nn.CrossEntropyLoss, {"reduction": "none"}),
])
def test_valid_labels_match_torch_then_bad_labels_fail_in_every_mode(loss_cls, kwargs,
                                                                     labels_dtype):
    loss_fn = loss_cls(**kwargs)
    good = GOOD.astype(labels_dtype)
    bad = np.array([0, 1, 12, 2], dtype=labels_dtype)
    expected = _torch_loss(X, good, **kwargs)
    bad_value = 12.0 if labels_dtype == "float32" else 12
    message = (f"{loss_cls.__name__}: class ids must lie in [0, 3) for logits of shape (4, 3), "
               f"got {[bad_value]}")

    # eager, with the gradient as well
    x = ndl.Tensor(X)
    out = loss_fn(x, ndl.Tensor(good, requires_grad=False))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert _message(lambda: _eager(loss_fn, X, bad)) == message

    # jit: the same plan computes torch's loss and gradient, then rejects the bad labels
    jitted = ndl.jit(lambda x, y: loss_fn(x, y))
    xj = ndl.Tensor(X)
    out = jitted(xj, ndl.Tensor(good, requires_grad=False))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    tx = torch.tensor(X, requires_grad=True)
    tF.cross_entropy(tx, torch.tensor(good).long(), **kwargs).sum().backward()
    np.testing.assert_allclose(xj.grad.numpy(), tx.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert _message(lambda: jitted(ndl.Tensor(X), ndl.Tensor(bad, requires_grad=False))) == \
        message
    assert jitted.explain().traces == 1

    # Session: placeholders fed at run time, one cached plan for both runs
    graph, xp, yp, loss = _session_loss(loss_fn, labels_dtype)
    with graph:
        sess = st.Session()
    value = sess.run(loss, feed_dict={xp: X, yp: good})
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
    assert _message(lambda: sess.run(loss, feed_dict={xp: X, yp: bad})) == message


def test_jitted_loss_checks_the_labels_on_every_call_not_only_when_tracing():
    loss_fn = nn.SoftmaxLoss()
    jitted = ndl.jit(lambda x, y: loss_fn(x, y))
    x = ndl.Tensor(X)
    first = jitted(x, ndl.Tensor(GOOD))
    np.testing.assert_allclose(first.numpy(), _torch_loss(X, GOOD), rtol=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 3\).*got \[12\]"):
        jitted(x, ndl.Tensor(np.array([0, 12, 1, 2])))
    with pytest.raises(ValueError, match=r"got \[-1\]"):
        jitted(x, ndl.Tensor(np.array([0, 1, -1, 2])))
    again = jitted(x, ndl.Tensor(GOOD))  # the plan still works after a failed call
    np.testing.assert_allclose(again.numpy(), first.numpy())
    assert jitted.explain().traces == 1  # every call ran the one cached plan


def test_session_training_op_rejects_bad_labels_and_leaves_the_model_alone():
    np.random.seed(0)
    model = nn.Linear(5, 3)
    opt = ndl.optim.SGD(model.parameters(), lr=0.5)
    with st.Graph():
        x = st.placeholder((None, 5), name="features")
        y = st.placeholder((None,), dtype="int64", name="labels")
        loss = nn.SoftmaxLoss()(model(x), y)
        train = st.minimize(opt, loss)
        sess = st.Session()
    features = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
    sess.run([train, loss], feed_dict={x: features, y: GOOD})
    before = [p.numpy().copy() for p in model.parameters()]
    with pytest.raises(ValueError) as info:
        sess.run([train, loss], feed_dict={x: features, y: np.array([0, 1, 12, 2])})
    assert str(info.value) == RANGE.format([12])
    for p, old in zip(model.parameters(), before):
        np.testing.assert_array_equal(p.numpy(), old)


def test_constant_labels_in_a_session_raise_the_eager_error():
    """A constant label node may be checked while the run is planned (constant folding)."""
    loss_fn = nn.SoftmaxLoss()
    bad = np.array([0, 1, 12, 2])
    with st.Graph():
        x = st.placeholder((None, 3), name="logits")
        loss = loss_fn(x, st.constant(bad))
        sessions = [st.Session(optimize=True), st.Session(optimize=False)]
    for sess in sessions:
        assert _message(lambda: sess.run(loss, feed_dict={x: X})) == RANGE.format([12])  # noqa: B023


@pytest.mark.skipif(not ndl.cuda().enabled(),
                    reason="needs CuPy and a GPU (ndl.cuda().enabled() is False)")
@pytest.mark.parametrize(("labels", "expected"), [*BAD, pytest.param(GOOD, None, id="good")])
def test_labels_on_the_gpu_are_checked_like_on_the_cpu(labels, expected):
    loss_fn = nn.SoftmaxLoss()
    jitted = ndl.jit(lambda x, y: loss_fn(x, y))
    for run in (loss_fn, jitted):
        def call(run=run):
            return run(ndl.Tensor(X, device=ndl.cuda()),
                       ndl.Tensor(labels, device=ndl.cuda(), requires_grad=False))

        if expected is None:
            np.testing.assert_allclose(call().numpy(), _torch_loss(X, labels), rtol=1e-5)
        else:
            assert _message(call) == expected
