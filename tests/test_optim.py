"""needle.optim: update rules vs torch.optim / NumPy transcriptions, state dicts, clipping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needle as ndl
import needle.autograd as autograd
import needle.nn as nn
from needle import optim

SHAPES = [(4, 3), (3,), (2, 2, 2)]
STEPS = 20


def _init_arrays(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _grad_sequence(steps: int = STEPS, seed: int = 1) -> list[list[np.ndarray]]:
    """A fixed gradient per step and parameter, so needle and torch see the same inputs."""
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]


def _needle_params(arrays: list[np.ndarray]) -> list[nn.Parameter]:
    return [nn.Parameter(a) for a in arrays]


def _set_grads(params: list, grads: list[np.ndarray]) -> None:
    for p, g in zip(params, grads):
        p.grad = ndl.Tensor(g, requires_grad=False)


def _run_needle(make_opt, grads_seq, arrays=None) -> list[np.ndarray]:
    params = _needle_params(arrays if arrays is not None else _init_arrays())
    opt = make_opt(params)
    for grads in grads_seq:
        _set_grads(params, grads)
        opt.step()
    return [p.numpy().copy() for p in params]


def _run_torch(make_opt, grads_seq, arrays=None) -> list[np.ndarray]:
    params = [torch.tensor(a, requires_grad=True)
              for a in (arrays if arrays is not None else _init_arrays())]
    opt = make_opt(params)
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        opt.step()
    return [p.detach().numpy().copy() for p in params]


def _assert_params_close(ours, theirs, atol=1e-5, rtol=1e-5):
    for a, b in zip(ours, theirs):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=atol, rtol=rtol)


# -- trajectories vs torch ----------------------------------------------------------------------
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_plain_sgd_matches_torch(weight_decay):
    grads = _grad_sequence()
    ours = _run_needle(lambda ps: optim.SGD(ps, lr=0.05, weight_decay=weight_decay), grads)
    theirs = _run_torch(lambda ps: torch.optim.SGD(ps, lr=0.05, weight_decay=weight_decay),
                        grads)
    _assert_params_close(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_matches_torch(weight_decay):
    grads = _grad_sequence()
    ours = _run_needle(lambda ps: optim.Adam(ps, lr=0.01, beta1=0.8, beta2=0.99, eps=1e-8,
                                             weight_decay=weight_decay), grads)
    theirs = _run_torch(lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-8,
                                                    weight_decay=weight_decay), grads)
    _assert_params_close(ours, theirs)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01, 0.5])
def test_adamw_matches_torch(weight_decay):
    grads = _grad_sequence()
    ours = _run_needle(lambda ps: optim.AdamW(ps, lr=0.02, weight_decay=weight_decay), grads)
    theirs = _run_torch(lambda ps: torch.optim.AdamW(ps, lr=0.02, weight_decay=weight_decay),
                        grads)
    _assert_params_close(ours, theirs)


def test_adam_and_adamw_defaults_match_torch_defaults():
    """needle's Adam defaults to lr=0.01 (needle's), AdamW to torch's lr=1e-3, wd=1e-2."""
    grads = _grad_sequence(5)
    ours = _run_needle(lambda ps: optim.AdamW(ps), grads)
    theirs = _run_torch(lambda ps: torch.optim.AdamW(ps), grads)
    _assert_params_close(ours, theirs)
    ours = _run_needle(lambda ps: optim.Adam(ps), grads)
    theirs = _run_torch(lambda ps: torch.optim.Adam(ps, lr=0.01), grads)
    _assert_params_close(ours, theirs)


def test_adam_trains_a_model_like_torch():
    """Gradients from backward() on a small tanh MLP, 20 Adam steps, same weights as torch."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 5)).astype(np.float32)
    y = rng.standard_normal((8, 1)).astype(np.float32)
    w1, b1 = rng.standard_normal((5, 6)).astype(np.float32), np.zeros(6, np.float32)
    w2 = rng.standard_normal((6, 1)).astype(np.float32)

    params = [nn.Parameter(a) for a in (w1, b1, w2)]
    opt = optim.Adam(params, lr=0.01, weight_decay=0.01)
    xt, yt = ndl.Tensor(x, requires_grad=False), ndl.Tensor(y, requires_grad=False)
    for _ in range(STEPS):
        out = ndl.tanh(xt @ params[0] + params[1]) @ params[2]
        opt.minimize(((out - yt) ** 2).mean())

    tparams = [torch.tensor(a, requires_grad=True) for a in (w1, b1, w2)]
    topt = torch.optim.Adam(tparams, lr=0.01, weight_decay=0.01)
    for _ in range(STEPS):
        out = torch.tanh(torch.tensor(x) @ tparams[0] + tparams[1]) @ tparams[2]
        topt.zero_grad()
        ((out - torch.tensor(y)) ** 2).mean().backward()
        topt.step()
    _assert_params_close([p.numpy() for p in params], [p.detach().numpy() for p in tparams])


# -- SGD momentum: needle's damped rule vs a NumPy transcription ------------------------------
def _numpy_sgd(arrays, grads_seq, lr, momentum, weight_decay, nesterov):
    """The documented equations, written out directly on float32 NumPy arrays."""
    params = [a.copy() for a in arrays]
    u = [np.zeros_like(a) for a in arrays]
    for grads in grads_seq:
        for i, g in enumerate(grads):
            g = g + np.float32(weight_decay) * params[i]
            u[i] = np.float32(momentum) * u[i] + np.float32(1 - momentum) * g
            if nesterov:
                d = np.float32(momentum) * u[i] + np.float32(1 - momentum) * g
            else:
                d = u[i]
            params[i] = params[i] - np.float32(lr) * d
    return params


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_sgd_momentum_matches_numpy_rule(nesterov, weight_decay):
    grads = _grad_sequence()
    arrays = _init_arrays()
    ours = _run_needle(lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=nesterov,
                                            weight_decay=weight_decay), grads)
    expected = _numpy_sgd(arrays, grads, 0.1, 0.9, weight_decay, nesterov)
    _assert_params_close(ours, expected, atol=1e-6, rtol=1e-6)


def test_sgd_first_momentum_step_is_damped():
    """u starts at 0, so the first step moves lr * (1 - momentum) * g (torch moves lr * g)."""
    p = nn.Parameter(np.array([1.0, -2.0], np.float32))
    p.grad = ndl.Tensor(np.array([0.5, 1.0], np.float32), requires_grad=False)
    optim.SGD([p], lr=0.1, momentum=0.9).step()
    np.testing.assert_allclose(p.numpy(), [1.0 - 0.1 * 0.1 * 0.5, -2.0 - 0.1 * 0.1 * 1.0],
                               rtol=1e-6)


def test_sgd_weight_decay_equals_l2_penalty_gradient():
    """SGD(wd) on grad == SGD(wd=0) on grad + wd * p, the gradient of loss + wd/2 * sum p^2."""
    wd = 0.3
    arrays = _init_arrays()
    grads = _grad_sequence(1)[0]
    decayed = _needle_params(arrays)
    _set_grads(decayed, grads)
    optim.SGD(decayed, lr=0.1, weight_decay=wd).step()
    penalised = _needle_params(arrays)
    _set_grads(penalised, [g + np.float32(wd) * a for g, a in zip(grads, arrays)])
    optim.SGD(penalised, lr=0.1).step()
    for a, b in zip(decayed, penalised):
        assert np.array_equal(a.numpy(), b.numpy())

    # the same through autodiff: d/dp (wd/2 * sum p^2) = wd * p
    p = nn.Parameter(arrays[0])
    g = ndl.Tensor(grads[0], requires_grad=False)
    ((p * g).sum() + (p * p).sum() * (wd / 2)).backward()
    optim.SGD([p], lr=0.1).step()
    np.testing.assert_allclose(p.numpy(), decayed[0].numpy(), rtol=1e-6, atol=1e-7)


# -- invariants: dtype, .grad, graph ---------------------------------------------------------
OPTIMIZERS = {
    "sgd": lambda ps: optim.SGD(ps, lr=0.1, weight_decay=0.1),
    "momentum": lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    "nesterov": lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                     weight_decay=0.1),
    "adam": lambda ps: optim.Adam(ps, lr=0.01, weight_decay=0.1),
    "adamw": lambda ps: optim.AdamW(ps, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_step_keeps_float32_leaves_grad_and_builds_no_graph(name):
    params = _needle_params(_init_arrays())
    opt = OPTIMIZERS[name](params)
    grads = _grad_sequence(3)
    arrays_before = [p._data for p in params]
    for step_grads in grads:
        _set_grads(params, step_grads)
        grad_tensors = [p.grad for p in params]
        # a NumPy float64 lr (e.g. from a user's schedule) must not promote either
        opt.lr = np.float64(opt.lr)
        counter = autograd.TENSOR_COUNTER
        opt.step()
        assert autograd.TENSOR_COUNTER == counter
        for p, g_tensor, g in zip(params, grad_tensors, step_grads):
            assert p.grad is g_tensor
            assert np.array_equal(p.grad.numpy(), g)
            assert p.dtype == np.float32 and p.is_leaf() and p.inputs == ()
    # updated in place: the same arrays, float32 state too
    assert all(p._data is a for p, a in zip(params, arrays_before))
    for entry in opt.state.values():
        assert all(arr.dtype == np.float32 for arr in entry.values())


def test_step_skips_params_without_grad():
    params = _needle_params(_init_arrays())
    opt = optim.Adam(params, lr=0.1, weight_decay=0.1)
    before = params[1].numpy().copy()
    _set_grads([params[0], params[2]], [np.ones(SHAPES[0], np.float32),
                                        np.ones(SHAPES[2], np.float32)])
    opt.step()
    assert np.array_equal(params[1].numpy(), before)
    assert 1 not in opt.state and set(opt.state) == {0, 2}


def test_reset_grad_and_zero_grad():
    params = _needle_params(_init_arrays())
    opt = optim.SGD(params)
    _set_grads(params, _grad_sequence(1)[0])
    opt.reset_grad()
    assert all(p.grad is None for p in params)
    _set_grads(params, _grad_sequence(1)[0])
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_minimize_matches_manual_step():
    rng = np.random.default_rng(4)
    w0 = rng.standard_normal((3, 2)).astype(np.float32)
    x = ndl.Tensor(rng.standard_normal((5, 3)).astype(np.float32), requires_grad=False)

    w = nn.Parameter(w0)
    opt = optim.SGD([w], lr=0.1, momentum=0.5)
    w.grad = ndl.Tensor(np.full(w0.shape, 100.0, np.float32))  # stale: minimize must reset it
    loss = opt.minimize(((x @ w) ** 2).sum())
    assert isinstance(loss, ndl.Tensor)

    w_ref = nn.Parameter(w0)
    ((x @ w_ref) ** 2).sum().backward()
    optim.SGD([w_ref], lr=0.1, momentum=0.5).step()
    assert np.array_equal(w.numpy(), w_ref.numpy())


def test_lr_attribute_drives_the_step():
    p = nn.Parameter(np.zeros(2, np.float32))
    opt = optim.SGD([p], lr=1.0)
    opt.lr = 0.25
    p.grad = ndl.Tensor(np.ones(2, np.float32), requires_grad=False)
    opt.step()
    np.testing.assert_array_equal(p.numpy(), [-0.25, -0.25])


def test_plain_tensors_are_accepted():
    p = ndl.Tensor(np.ones(2, np.float32), requires_grad=True)
    (p * p).sum().backward()
    optim.SGD([p], lr=0.5).step()
    np.testing.assert_array_equal(p.numpy(), [0.0, 0.0])


def test_bad_arguments_raise():
    params = _needle_params(_init_arrays())
    with pytest.raises(ValueError, match="more than once"):
        optim.SGD([params[0], params[0]])
    with pytest.raises(TypeError, match="params\\[0\\]"):
        optim.Adam([np.ones(3)])
    with pytest.raises(ValueError, match="lr"):
        optim.Adam(params, lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD(params, nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        optim.SGD(params, momentum=1.0)
    with pytest.raises(ValueError, match="beta2"):
        optim.Adam(params, beta2=1.0)


# -- state dicts: bit-for-bit resume ---------------------------------------------------------
def _is_plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, int | str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    return isinstance(value, np.ndarray | int | float | bool | str)


def _stringify_keys(value):
    """What a data-only checkpoint (string keys) gives back."""
    if isinstance(value, dict):
        return {str(k): _stringify_keys(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("string_keys", [False, True])
def test_state_dict_resume_is_bit_for_bit(name, string_keys):
    make = OPTIMIZERS[name]
    grads = _grad_sequence()
    straight = _run_needle(make, grads)

    params = _needle_params(_init_arrays())
    opt = make(params)
    for step_grads in grads[:10]:
        _set_grads(params, step_grads)
        opt.step()
    saved = opt.state_dict()
    assert _is_plain(saved)
    checkpoint_params = [p.numpy().copy() for p in params]
    # saved arrays are copies: further steps must not change them
    snapshot = {i: {k: v.copy() for k, v in e.items()} for i, e in saved["state"].items()}
    _set_grads(params, grads[0])
    opt.step()
    for i, entry in saved["state"].items():
        for k, v in entry.items():
            assert np.array_equal(v, snapshot[i][k])

    resumed = _needle_params(checkpoint_params)
    opt2 = make(resumed)
    opt2.lr = 123.0  # must be overwritten by the load
    opt2.load_state_dict(_stringify_keys(saved) if string_keys else saved)
    for step_grads in grads[10:]:
        _set_grads(resumed, step_grads)
        opt2.step()
    for a, b in zip(straight, resumed):
        assert np.array_equal(a, b.numpy())


def test_load_state_dict_rejects_mismatches():
    params = _needle_params(_init_arrays())
    adam = optim.Adam(params)
    _set_grads(params, _grad_sequence(1)[0])
    adam.step()
    saved = adam.state_dict()
    with pytest.raises(ValueError, match="belongs to Adam"):
        optim.SGD(params).load_state_dict(saved)
    other = _needle_params([np.zeros((2, 2), np.float32)] + _init_arrays()[1:])
    fresh = optim.Adam(other, lr=0.5)
    with pytest.raises(ValueError, match=r"parameter 0 m: checkpoint \(4, 3\) vs parameter"):
        fresh.load_state_dict(saved)
    assert fresh.lr == 0.5  # a failed load changes nothing
    with pytest.raises(ValueError, match="optimizer has 1 parameters"):
        optim.Adam(params[:1]).load_state_dict(saved)


# -- clip_grad_norm ---------------------------------------------------------------------------
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(max_norm):
    arrays = _init_arrays()
    grads = _grad_sequence(1)[0]
    params = _needle_params(arrays)
    _set_grads(params, grads)
    params.append(nn.Parameter(np.ones(2, np.float32)))  # no grad: skipped
    total = optim.clip_grad_norm(params, max_norm)

    tparams = [torch.tensor(a, requires_grad=True) for a in arrays]
    for p, g in zip(tparams, grads):
        p.grad = torch.tensor(g)
    ttotal = torch.nn.utils.clip_grad_norm_(tparams, max_norm)

    assert isinstance(total, float)
    np.testing.assert_allclose(total, float(ttotal), rtol=1e-6)
    assert params[-1].grad is None
    for p, tp in zip(params, tparams):
        assert p.grad.dtype == np.float32
        np.testing.assert_allclose(p.grad.numpy(), tp.grad.numpy(), rtol=1e-6, atol=1e-7)


def test_clip_grad_norm_with_shared_gradient_arrays():
    """``(x + b).sum()`` may hand x and b the same adjoint array; each is clipped once."""
    x = nn.Parameter(np.full(3, 2.0, np.float32))
    b = nn.Parameter(np.full(3, -1.0, np.float32))
    (x + b).sum().backward()
    total = optim.clip_grad_norm([x, b], 1.0)
    np.testing.assert_allclose(total, np.sqrt(6.0), rtol=1e-6)
    expected = 1.0 / (np.sqrt(6.0) + 1e-6)
    np.testing.assert_allclose(x.grad.numpy(), np.full(3, expected), rtol=1e-6)
    np.testing.assert_allclose(b.grad.numpy(), np.full(3, expected), rtol=1e-6)


# -- the all-parameters (flat) update path ----------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda ps: ndl.optim.Adam(ps, lr=0.01, weight_decay=0.01),
    lambda ps: ndl.optim.AdamW(ps, lr=0.01),
    lambda ps: ndl.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda ps: ndl.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
])
@pytest.mark.parametrize("user_holds_arrays", [False, True])
def test_flat_update_is_bitwise_the_per_parameter_update(make, user_holds_arrays, monkeypatch):
    def run(flat: bool):
        rng = np.random.default_rng(0)
        params = [ndl.Tensor(rng.standard_normal(s).astype(np.float32))
                  for s in [(3, 4), (4,), (2, 2, 2), (5,), (1, 3)]]
        # a user's p.numpy() taken before the optimizer exists must keep seeing the updates
        held = [p.numpy() for p in params] if user_holds_arrays else None
        opt = make(params)
        if not flat:
            monkeypatch.setattr(opt, "_flat_step", lambda fuse=False: False)
        # arrays nobody else holds become views of the optimizer's flat buffer
        assert opt._flat.holds([p._data for p in params]) is (not user_holds_arrays)
        for step in range(6):
            for i, p in enumerate(params):
                g = rng.standard_normal(p.shape).astype(np.float32)
                # step 3 leaves one gradient out: that step takes the per-parameter path
                p.grad = None if (step == 3 and i == 1) else ndl.Tensor(g, requires_grad=False)
            opt.step()
        if held is not None:
            assert all(p._data is a for p, a in zip(params, held))  # updated in place
        return [p.numpy().copy() for p in params], opt.state_dict()

    (flat_params, flat_state), (plain_params, plain_state) = run(True), run(False)
    for a, b in zip(flat_params, plain_params):
        np.testing.assert_array_equal(a, b)
    for index, entry in plain_state["state"].items():
        for name, value in entry.items():
            np.testing.assert_array_equal(flat_state["state"][index][name], value)


def test_flat_update_follows_a_replaced_parameter_array():
    """``p.data = ...`` after the optimizer adopted the arrays: the new array is updated."""
    params = [ndl.Tensor(np.ones(s, dtype=np.float32)) for s in [(2,), (3,), (4,), (5,)]]
    opt = ndl.optim.SGD(params, lr=0.5)
    params[2].data = np.full(4, 3.0, dtype=np.float32)
    replaced = params[2].numpy()
    for p in params:
        p.grad = ndl.Tensor(np.ones(p.shape, dtype=np.float32), requires_grad=False)
    opt.step()
    np.testing.assert_array_equal(replaced, np.full(4, 2.5))
    np.testing.assert_array_equal(params[0].numpy(), np.full(2, 0.5))
