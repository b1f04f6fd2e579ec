"""needle.nn losses and l2_penalty against PyTorch (values, gradients, errors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as tF

import needle as ndl
import needle.nn as nn


def _pair(array):
    array = np.asarray(array, dtype=np.float32)
    return ndl.Tensor(array), torch.tensor(array, requires_grad=True)


def _check(ours, theirs, x, tx, rtol=1e-5, atol=1e-6):
    """Values and gradients (seeded with ones) agree."""
    assert ours.shape == tuple(theirs.shape)
    assert ours.dtype == "float32"
    np.testing.assert_allclose(ours.numpy(), theirs.detach().numpy(), rtol=rtol, atol=atol)
    ours.backward()
    theirs.backward(torch.ones_like(theirs))
    np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy(), rtol=rtol, atol=atol)


def _logits(seed=0, shape=(6, 5), scale=3.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


LABELS = np.array([0, 4, 2, 2, 1, 3])


# -- softmax cross-entropy --------------------------------------------------------------------
@pytest.mark.parametrize("label_dtype", ["int64", "int32", "uint8", "float32", "float64"])
def test_softmax_loss_matches_torch_for_any_label_dtype(label_dtype):
    x, tx = _pair(_logits())
    y = ndl.Tensor(LABELS.astype(label_dtype), requires_grad=False)
    loss = nn.SoftmaxLoss()(x, y)
    assert loss.shape == ()
    _check(loss, tF.cross_entropy(tx, torch.tensor(LABELS)), x, tx)


@pytest.mark.parametrize("smoothing", [0.1, 0.35, 1.0])
def test_label_smoothing_matches_torch(smoothing):
    x, tx = _pair(_logits(1))
    loss = nn.SoftmaxLoss(label_smoothing=smoothing)(x, ndl.Tensor(LABELS))
    _check(loss, tF.cross_entropy(tx, torch.tensor(LABELS), label_smoothing=smoothing), x, tx)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cross_entropy_reductions_and_alias(reduction):
    x, tx = _pair(_logits(2))
    loss = nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.2)(x, LABELS)
    ref = tF.cross_entropy(tx, torch.tensor(LABELS), reduction=reduction, label_smoothing=0.2)
    _check(loss, ref, x, tx)
    assert issubclass(nn.CrossEntropyLoss, nn.SoftmaxLoss)


def test_softmax_loss_is_stable_for_huge_logits():
    x, tx = _pair(_logits(3, scale=1e4))
    loss = nn.SoftmaxLoss()(x, ndl.Tensor(LABELS))
    assert np.isfinite(loss.numpy())
    _check(loss, tF.cross_entropy(tx, torch.tensor(LABELS)), x, tx, rtol=1e-5, atol=1e-3)


def test_softmax_loss_label_list_and_needle_transcription():
    z = _logits(4).astype(np.float32)
    loss = nn.SoftmaxLoss()(ndl.Tensor(z), LABELS.tolist())
    lse = np.log(np.exp(z.astype(np.float64)).sum(axis=1))
    expected = np.mean(lse - z[np.arange(6), LABELS])
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-6)


@pytest.mark.parametrize(("logits_shape", "labels", "match"), [
    ((6, 5), LABELS.reshape(6, 1), r"labels must have shape \(6,\).*\(6, 1\)"),
    ((6, 5), LABELS[:4], r"labels must have shape \(6,\).*\(4,\)"),
    ((6, 5), np.array([0, 1, 2, 3, 4, 5]), r"\[0, 5\).*\[5\]"),
    ((6, 5), np.array([0, 1, -1, 3, 4, 0]), r"\[0, 5\).*\[-1\]"),
    ((6, 5), np.array([0, 1, 2.5, 3, 4, 0]), "whole numbers"),
    ((6, 5), np.ones(6, dtype=bool), "integer class ids"),
    ((30,), LABELS, r"logits must be \(batch, classes\)"),
])
def test_softmax_loss_errors_name_the_loss_and_shapes(logits_shape, labels, match):
    x = ndl.Tensor(np.zeros(logits_shape, np.float32))
    with pytest.raises(ValueError, match="SoftmaxLoss: .*" + match):
        nn.SoftmaxLoss()(x, ndl.Tensor(labels, requires_grad=False))


def test_bad_options_raise():
    with pytest.raises(ValueError, match="reduction"):
        nn.MSELoss(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        nn.SoftmaxLoss(label_smoothing=1.5)


# -- regression losses ------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("ours", "theirs"), [(nn.MSELoss, tF.mse_loss), (nn.L1Loss, tF.l1_loss)],
                         ids=["mse", "l1"])
def test_regression_losses_match_torch(ours, theirs, reduction):
    rng = np.random.default_rng(5)
    x, tx = _pair(rng.standard_normal((4, 3)))
    target = rng.standard_normal((4, 3)).astype(np.float32)
    loss = ours(reduction=reduction)(x, ndl.Tensor(target, requires_grad=False))
    _check(loss, theirs(tx, torch.tensor(target), reduction=reduction), x, tx)


@pytest.mark.parametrize("cls", [nn.MSELoss, nn.L1Loss, nn.BCEWithLogitsLoss])
def test_pointwise_losses_reject_shape_mismatch(cls):
    x = ndl.Tensor(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match=rf"{cls.__name__}: .*\(4, 3\) vs \(4, 1\)"):
        cls()(x, np.zeros((4, 1), np.float32))


# -- binary cross-entropy on logits -----------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_with_logits_matches_torch_including_extreme_logits(reduction):
    logits = np.array([[-1e4, -50.0, -3.0, 0.0], [0.0, 2.5, 60.0, 1e4]])
    target = np.array([[1.0, 0.0, 0.3, 0.5], [1.0, 1.0, 0.0, 0.0]])
    x, tx = _pair(logits)
    loss = nn.BCEWithLogitsLoss(reduction=reduction)(x, target)  # float64 target is cast
    ref = tF.binary_cross_entropy_with_logits(tx, torch.tensor(target, dtype=torch.float32),
                                              reduction=reduction)
    assert np.all(np.isfinite(loss.numpy()))
    _check(loss, ref, x, tx, rtol=1e-5, atol=1e-6)


def test_bce_gradient_at_zero_is_sigmoid_minus_target():
    # a max(x, 0) + log1p(exp(-|x|)) form would give -y here (subgradient 0 at the kink)
    x = ndl.Tensor(np.zeros(3, np.float32))
    nn.BCEWithLogitsLoss(reduction="sum")(x, np.array([0.0, 0.5, 1.0], np.float32)).backward()
    np.testing.assert_allclose(x.grad.numpy(), [0.5, 0.0, -0.5], atol=1e-7)


# -- l2 penalty -------------------------------------------------------------------------------
def test_l2_penalty_value_and_gradient():
    rng = np.random.default_rng(6)
    params = [nn.Parameter(rng.standard_normal(s).astype(np.float32)) for s in [(3, 2), (2,)]]
    penalty = nn.l2_penalty(params, weight_decay=0.1)
    expected = 0.05 * sum(float(np.sum(p.numpy().astype(np.float64) ** 2)) for p in params)
    assert penalty.shape == ()
    np.testing.assert_allclose(penalty.item(), expected, rtol=1e-6)
    penalty.backward()
    for p in params:
        # the same term SGD's weight_decay adds to the gradient: wd * p
        np.testing.assert_allclose(p.grad.numpy(), 0.1 * p.numpy(), rtol=1e-6)


def test_l2_penalty_matches_torch_sgd_weight_decay():
    np.random.seed(0)
    layer = nn.Linear(3, 2)
    x = np.random.default_rng(7).standard_normal((4, 3)).astype(np.float32)
    loss = nn.MSELoss()(layer(ndl.Tensor(x)), np.zeros((4, 2), np.float32))
    (loss + nn.l2_penalty(layer, 0.01)).backward()
    w = torch.tensor(layer.weight.numpy(), requires_grad=True)
    b = torch.tensor(layer.bias.numpy(), requires_grad=True)
    tF.mse_loss(torch.tensor(x) @ w + b, torch.zeros(4, 2)).backward()
    opt = torch.optim.SGD([w, b], lr=1.0, weight_decay=0.01)
    before = w.detach().clone()
    opt.step()  # w <- w - (grad + wd * w)
    np.testing.assert_allclose(layer.weight.grad.numpy(), (before - w).detach().numpy(),
                               rtol=1e-5, atol=1e-7)


def test_l2_penalty_of_nothing_is_zero():
    assert nn.l2_penalty([], 0.5).item() == 0.0


# -- lazy graphs ------------------------------------------------------------------------------
def _lazy(shape, dtype="float32"):
    """A graph placeholder: any use of raw data would fail."""
    import needle.static as st

    return st.placeholder(shape, dtype)


def _run(fetch, feed):
    """Evaluate a declared graph with a Session."""
    import needle.static as st

    return st.Session().run(fetch, feed_dict=feed)


def test_lazy_model_and_loss_compute_what_eager_does():
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.BatchNorm1d(6), nn.LayerNorm1d(6),
                          nn.Residual(nn.Linear(6, 6)), nn.Softmax(), nn.Flatten(),
                          nn.Linear(6, 3)).eval()
    x, y = _lazy((None, 4)), _lazy((None,), "int64")
    loss_fn = nn.SoftmaxLoss(label_smoothing=0.1)
    lazy_loss = loss_fn(model(x), y)
    X = np.random.default_rng(11).standard_normal((5, 4)).astype(np.float32)
    Y = np.array([0, 2, 1, 1, 0])
    eager = loss_fn(model(ndl.Tensor(X)), ndl.Tensor(Y)).numpy()
    np.testing.assert_allclose(_run(lazy_loss, {x: X, y: Y}), eager, rtol=1e-6)


def test_losses_build_lazy_graphs():
    logits = _lazy((None, 5))
    loss = nn.SoftmaxLoss(label_smoothing=0.1)(logits, _lazy((None,), "int64"))
    assert loss.shape == () and loss._data is None
    for cls in (nn.MSELoss, nn.L1Loss, nn.BCEWithLogitsLoss):
        assert cls()(logits, _lazy((None, 5))).shape == ()
    with pytest.raises(ValueError, match="labels must have shape"):
        nn.SoftmaxLoss()(_lazy((4, 5)), _lazy((4, 1), "int64"))
