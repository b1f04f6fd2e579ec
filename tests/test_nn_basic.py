"""needle.nn basic layers against PyTorch with the same weights (forward and backward)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import needle as ndl
import needle.nn as nn


def _rng(seed=0):
    return np.random.default_rng(seed)


def _pair(array):
    """The same float32 values as a needle leaf and a torch leaf, both requiring gradients."""
    array = np.asarray(array, dtype=np.float32)
    return ndl.Tensor(array), torch.tensor(array, requires_grad=True)


def _close(ours, theirs, rtol=1e-5, atol=1e-6):
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=rtol, atol=atol)


def _backward_both(ours, theirs, rng):
    """Backpropagate the same random adjoint through both outputs."""
    seed = rng.standard_normal(ours.shape).astype(np.float32)
    ours.backward(ndl.Tensor(seed, requires_grad=False))
    theirs.backward(torch.tensor(seed))


# -- Linear -----------------------------------------------------------------------------------
def test_linear_draws_weight_then_bias_like_needle():
    np.random.seed(3)
    layer = nn.Linear(4, 3)
    np.random.seed(3)
    bound_w = math.sqrt(2) * math.sqrt(3 / 4)
    w = np.random.rand(4, 3).astype(np.float32) * (bound_w - -bound_w) + -bound_w
    bound_b = math.sqrt(2) * math.sqrt(3 / 3)
    b = np.random.rand(3, 1).astype(np.float32) * (bound_b - -bound_b) + -bound_b
    np.testing.assert_array_equal(layer.weight.numpy(), w)
    np.testing.assert_array_equal(layer.bias.numpy(), b.reshape(1, 3))
    assert layer.weight.dtype == "float32" and layer.bias.shape == (1, 3)
    assert isinstance(layer.weight, nn.Parameter) and layer.weight.requires_grad
    assert [p is q for p, q in zip(layer.parameters(), [layer.weight, layer.bias])] == [True] * 2


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4), (4,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(shape, bias):
    rng = _rng(1)
    layer = nn.Linear(4, 3, bias=bias)
    ref = torch.nn.Linear(4, 3, bias=bias)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(layer.weight.numpy().T))
        if bias:
            ref.bias.copy_(torch.tensor(layer.bias.numpy().reshape(3)))
    x, tx = _pair(rng.standard_normal(shape))
    out, expected = layer(x), ref(tx)
    assert out.shape == tuple(expected.shape)
    _close(out, expected)
    _backward_both(out, expected, rng)
    _close(x.grad, tx.grad)
    _close(layer.weight.grad, ref.weight.grad.T)
    if bias:
        _close(layer.bias.grad, ref.bias.grad.reshape(1, 3))
    else:
        assert layer.parameters() == [layer.weight]


def test_linear_rejects_wrong_in_features():
    with pytest.raises(ValueError, match=r"Linear.*in_features=4.*\(2, 5\)"):
        nn.Linear(4, 3)(ndl.Tensor(np.zeros((2, 5), np.float32)))


# -- activations and shape layers -------------------------------------------------------------
@pytest.mark.parametrize(("ours", "theirs"), [
    (nn.ReLU(), torch.nn.ReLU()),
    (nn.Tanh(), torch.nn.Tanh()),
    (nn.Sigmoid(), torch.nn.Sigmoid()),
    (nn.GELU(), torch.nn.GELU()),
    (nn.GELU(approximate="tanh"), torch.nn.GELU(approximate="tanh")),
    (nn.Softmax(), torch.nn.Softmax(dim=-1)),
    (nn.Softmax(dim=0), torch.nn.Softmax(dim=0)),
    (nn.Identity(), torch.nn.Identity()),
    (nn.Flatten(), torch.nn.Flatten()),
], ids=["relu", "tanh", "sigmoid", "gelu", "gelu-tanh", "softmax", "softmax-dim0", "identity",
        "flatten"])
def test_activation_matches_torch(ours, theirs):
    rng = _rng(2)
    x, tx = _pair(rng.standard_normal((3, 4, 5)) * 3)
    out, expected = ours(x), theirs(tx)
    assert out.shape == tuple(expected.shape)
    # atol: 1 + tanh(u) cancels in float32 for large negative u
    _close(out, expected, rtol=1e-5, atol=1e-5)
    _backward_both(out, expected, rng)
    _close(x.grad, tx.grad, rtol=1e-5, atol=1e-5)


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="GELU"):
        nn.GELU(approximate="fast")


# -- composition ------------------------------------------------------------------------------
def _mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.BatchNorm1d(8),
                         nn.Residual(nn.Sequential(nn.Linear(8, 8), nn.Tanh())), nn.Linear(8, 2))


def test_sequential_parameter_order_and_forward():
    np.random.seed(0)
    model = _mlp()
    mods = model.modules
    expected = [mods[0].weight, mods[0].bias, mods[3].weight, mods[3].bias,
                mods[4].fn.modules[0].weight, mods[4].fn.modules[0].bias,
                mods[5].weight, mods[5].bias]
    assert len(model.parameters()) == len(expected)
    assert all(p is q for p, q in zip(model.parameters(), expected))
    assert [name for name, _ in model.named_buffers()] == ["modules.3.running_mean",
                                                           "modules.3.running_var"]
    model.eval()
    x = ndl.Tensor(_rng(3).standard_normal((5, 4)).astype(np.float32))
    manual = x
    for m in mods:
        manual = m(manual)
    np.testing.assert_array_equal(model(x).numpy(), manual.numpy())


def test_sequential_train_and_eval_reach_every_module():
    model = _mlp()
    every = [m for _, m in model.named_modules()]
    assert len(every) == 10  # itself, 6 children, Residual's Sequential, its Linear and Tanh
    model.eval()
    assert not any(m.training for m in every)
    model.train()
    assert all(m.training for m in every)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _mlp()

    holder = Holder().eval()
    assert not any(m.training for _, m in holder.named_modules())


def test_residual_matches_torch():
    rng = _rng(4)
    inner = nn.Linear(3, 3)
    ref = torch.nn.Linear(3, 3)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(inner.weight.numpy().T))
        ref.bias.copy_(torch.tensor(inner.bias.numpy().reshape(3)))
    x, tx = _pair(rng.standard_normal((4, 3)))
    out, expected = nn.Residual(inner)(x), ref(tx) + tx
    _close(out, expected)
    _backward_both(out, expected, rng)
    _close(x.grad, tx.grad)


# -- normalization ----------------------------------------------------------------------------
def _torch_bn(ours, cls):
    ref = cls(ours.dim, eps=ours.eps, momentum=ours.momentum)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(ours.weight.numpy()))
        ref.bias.copy_(torch.tensor(ours.bias.numpy()))
    return ref


@pytest.mark.parametrize(("cls", "ref_cls", "shape"), [
    (nn.BatchNorm1d, torch.nn.BatchNorm1d, (6, 4)),
    (nn.BatchNorm1d, torch.nn.BatchNorm1d, (6, 4, 3)),
    (nn.BatchNorm2d, torch.nn.BatchNorm2d, (3, 4, 5, 2)),
], ids=["bn1d", "bn1d-3d", "bn2d"])
def test_batchnorm_train_eval_and_running_stats(cls, ref_cls, shape):
    rng = _rng(5)
    bn = cls(4, momentum=0.2)
    bn.weight.data = rng.uniform(0.5, 1.5, 4).astype(np.float32)
    bn.bias.data = rng.standard_normal(4).astype(np.float32)
    ref = _torch_bn(bn, ref_cls)
    axes = tuple(i for i in range(len(shape)) if i != 1)
    mean = np.zeros(4)
    var = np.ones(4)
    for step in range(3):
        data = rng.standard_normal(shape) * (step + 1) + step
        x, tx = _pair(data)
        ref.zero_grad()  # needle's backward sets .grad; torch's accumulates
        out, expected = bn(x), ref(tx)
        _close(out, expected, rtol=1e-4, atol=1e-5)
        _backward_both(out, expected, rng)
        _close(x.grad, tx.grad, rtol=1e-4, atol=1e-5)
        _close(bn.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
        _close(bn.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)
        # needle's rule folds in the biased batch variance (torch: the unbiased one)
        batch = data.astype(np.float32).astype(np.float64)
        mean = 0.8 * mean + 0.2 * batch.mean(axis=axes)
        var = 0.8 * var + 0.2 * batch.var(axis=axes)
    _close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    _close(bn.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    _close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert not np.allclose(bn.running_var.numpy(), ref.running_var.numpy(), rtol=1e-3)
    assert isinstance(bn.running_mean, nn.Buffer) and bn.running_var.is_leaf()
    assert not bn.running_var.requires_grad and bn.running_mean.dtype == "float32"

    # eval uses the running statistics: give torch ours and compare
    bn.eval()
    ref.eval()
    with torch.no_grad():
        ref.running_var.copy_(torch.tensor(bn.running_var.numpy()))
    x, tx = _pair(rng.standard_normal(shape))
    before = bn.running_mean.numpy().copy()
    out, expected = bn(x), ref(tx)
    _close(out, expected, rtol=1e-4, atol=1e-5)
    _backward_both(out, expected, rng)
    _close(x.grad, tx.grad, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(bn.running_mean.numpy(), before)


def test_batchnorm_state_dict_has_parameters_then_buffers():
    bn = nn.BatchNorm1d(3)
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert bn.parameters() == [bn.weight, bn.bias]


def test_batchnorm_running_update_grows_no_graph():
    bn = nn.BatchNorm1d(3)
    x = ndl.Tensor(_rng(6).standard_normal((4, 3)).astype(np.float32))
    bn(x)
    assert bn.running_mean.op is None and bn.running_var.inputs == ()


@pytest.mark.parametrize(("layer", "shape"), [
    (nn.BatchNorm1d(4), (2, 3)), (nn.BatchNorm1d(4), (4,)), (nn.BatchNorm2d(4), (2, 4, 3)),
    (nn.BatchNorm2d(4), (2, 3, 2, 2)), (nn.LayerNorm1d(4), (2, 3)),
])
def test_norm_layers_reject_wrong_shapes(layer, shape):
    with pytest.raises(ValueError, match=type(layer).__name__):
        layer(ndl.Tensor(np.zeros(shape, np.float32)))


@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 6)])
def test_layernorm_matches_torch(shape):
    rng = _rng(7)
    ln = nn.LayerNorm1d(6, eps=1e-5)
    ln.weight.data = rng.uniform(0.5, 1.5, 6).astype(np.float32)
    ln.bias.data = rng.standard_normal(6).astype(np.float32)
    ref = torch.nn.LayerNorm(6, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(ln.weight.numpy()))
        ref.bias.copy_(torch.tensor(ln.bias.numpy()))
    x, tx = _pair(rng.standard_normal(shape) * 2 + 1)
    out, expected = ln(x), ref(tx)
    _close(out, expected, rtol=1e-4, atol=1e-5)
    _backward_both(out, expected, rng)
    _close(x.grad, tx.grad, rtol=1e-4, atol=1e-5)
    _close(ln.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    _close(ln.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)


# -- Dropout ----------------------------------------------------------------------------------
def test_dropout_is_one_randb_draw():
    x = ndl.Tensor(_rng(8).standard_normal((4, 5)).astype(np.float32))
    np.random.seed(11)
    out = nn.Dropout(0.3)(x)
    after = np.random.rand()
    np.random.seed(11)
    mask = np.random.rand(4, 5).astype(np.float32) <= 1 - 0.3
    expected_after = np.random.rand()
    np.testing.assert_array_equal(out.numpy(), x.numpy() * mask / (1 - 0.3))
    assert after == expected_after
    out.backward()
    np.testing.assert_allclose(x.grad.numpy(), mask / np.float32(0.7), rtol=1e-6)


def test_dropout_statistics():
    np.random.seed(0)
    x = ndl.Tensor(np.ones((200, 500), np.float32))
    out = nn.Dropout(0.25)(x).numpy()
    zero_fraction = np.mean(out == 0)
    # 100000 Bernoulli draws: the standard error of the fraction is ~0.0014
    assert abs(zero_fraction - 0.25) < 0.01
    assert abs(out.mean() - 1.0) < 0.02
    np.testing.assert_allclose(out[out != 0], 1 / 0.75, rtol=1e-6)


def test_dropout_eval_is_identity_and_edge_probabilities():
    x = ndl.Tensor(_rng(9).standard_normal((3, 4)).astype(np.float32))
    layer = nn.Dropout(0.5).eval()
    state = np.random.get_state()[1].copy()
    assert layer(x) is x
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # eval draws nothing
    np.testing.assert_array_equal(nn.Dropout(0.0)(x).numpy(), x.numpy())
    zeros = nn.Dropout(1.0)(x).numpy()
    assert np.all(zeros == 0)
    with pytest.raises(ValueError, match="Dropout"):
        nn.Dropout(1.5)


# -- lazy graphs ------------------------------------------------------------------------------
def _lazy(shape, dtype="float32"):
    """A graph placeholder: any use of raw data would fail."""
    import needle.static as st

    return st.placeholder(shape, dtype)


def test_layers_build_lazy_graphs_with_unknown_batch():
    import needle.static as st

    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Dropout(0.1), nn.BatchNorm1d(6),
                          nn.LayerNorm1d(6), nn.Residual(nn.Linear(6, 6)), nn.Softmax(),
                          nn.Flatten(), nn.Linear(6, 3))
    before = model.state_dict()
    x = _lazy((None, 4))
    train_out = model(x)  # Dropout's mask is a random op: drawn afresh at every run
    assert train_out.shape == (None, 3) and train_out._data is None
    model.eval()
    out = model(x)
    assert out.shape == (None, 3) and out._data is None
    assert nn.Linear(4, 2)(_lazy((None, 5, 4))).shape == (None, 5, 2)
    assert nn.BatchNorm2d(3)(_lazy((None, 3, 2, 2))).shape == (None, 3, 2, 2)
    # lazy batch statistics have no values to fold into the running ones
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    batch = _rng(12).standard_normal((7, 4)).astype(np.float32)
    sess = st.Session()
    np.testing.assert_allclose(sess.run(out, {x: batch}), model(ndl.Tensor(batch)).numpy(),
                               rtol=1e-5, atol=1e-6)
    first, second = sess.run(train_out, {x: batch}), sess.run(train_out, {x: batch})
    assert first.shape == (7, 3) and not np.array_equal(first, second)


def test_small_mlp_trains_with_plain_gradient_steps():
    np.random.seed(0)
    rng = _rng(10)
    X = rng.standard_normal((64, 2)).astype(np.float32)
    y = (X[:, 0] * X[:, 1] > 0).astype(np.int64)  # XOR of the signs: not linearly separable
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.LayerNorm1d(16), nn.Linear(16, 2))
    loss_fn = nn.SoftmaxLoss()
    losses = []
    for _ in range(60):
        loss = loss_fn(model(ndl.Tensor(X)), ndl.Tensor(y))
        loss.backward()
        for p in model.parameters():
            p.data = p.numpy() - 0.3 * p.grad.numpy()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_module_to_keeps_the_tensor_objects_and_their_values():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = [(t, t.numpy().copy()) for t in [*model.parameters(), *model.buffers()]]
    assert model.to(ndl.cpu()) is model
    after = [*model.parameters(), *model.buffers()]
    for (t, values), t2 in zip(before, after):
        assert t is t2 and t2.device == ndl.cpu()
        np.testing.assert_array_equal(t2.numpy(), values)
