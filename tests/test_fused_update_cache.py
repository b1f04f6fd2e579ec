"""Eager steps fuse the update by default, reusing the loop recorded at the first step.

(Steps over fewer than ``EAGER_FUSE_MIN_ELEMENTS`` parameter elements run NumPy by default;
the small models here lower that bound, and one test checks it.)

The default (``fused=None``) must give bit for bit what ``fused=False`` (the rule's NumPy calls)
gives, step after step, while recording the rule's loop once; a change that alters which calls
the rule makes (a user setting momentum, weight decay or nesterov, new state arrays from a
checkpoint) must record afresh, and a change of scalars only (a scheduler's lr) must not, yet
still take the new values.
"""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.nn as nn
from needle import optim
from needle.compiler import fused_update
from needle.optim import optimizer as optimizer_module

needs_numba = pytest.mark.skipif(not fused_update.available(),
                                 reason="numba is not installed or NEEDLE_NUMBA=0")

SHAPES = [(6, 4), (4,), (4, 3), (3,), (2, 3, 2)]

OPTIMIZERS = {
    "sgd": lambda ps, fused: optim.SGD(ps, lr=0.1, weight_decay=1e-2, fused=fused),
    "sgd_momentum": lambda ps, fused: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2,
                                                fused=fused),
    "sgd_nesterov": lambda ps, fused: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                                weight_decay=1e-2, dampening=0, fused=fused),
    "adam": lambda ps, fused: optim.Adam(ps, lr=1e-2, weight_decay=1e-2, fused=fused),
    "adamw": lambda ps, fused: optim.AdamW(ps, lr=1e-2, weight_decay=1e-2, fused=fused),
}


@pytest.fixture(autouse=True)
def fuse_small_models(monkeypatch) -> None:
    """These tests' models are small: let the default fuse them."""
    monkeypatch.setattr(optimizer_module, "EAGER_FUSE_MIN_ELEMENTS", 1)


@pytest.fixture
def recordings(monkeypatch) -> list[int]:
    """One entry per fresh recording of a rule (a replay that matched is not one)."""
    calls: list[int] = []
    original = fused_update._record

    def spy(rule, arrays):
        calls.append(1)
        return original(rule, arrays)

    monkeypatch.setattr(fused_update, "_record", spy)
    return calls


@pytest.fixture
def fused_calls(monkeypatch) -> list[bool]:
    """What every run_fused call returned (True: the compiled loop ran)."""
    calls: list[bool] = []
    original = fused_update.run_fused

    def spy(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(fused_update, "run_fused", spy)
    return calls


def _params(rng) -> list:
    return [nn.Parameter(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]


def _train(make_opt, fused, steps: int = 20, change=None) -> list[np.ndarray]:
    """Parameters and state after ``steps`` steps on seeded gradients (zeros, tiny, large);
    ``change(opt, step)`` runs before each step."""
    rng = np.random.default_rng(0)
    params = _params(rng)
    opt = make_opt(params, fused)
    for step in range(steps):
        if change is not None:
            change(opt, step)
        for p in params:
            scale = rng.choice([0.0, 1e-6, 1.0, 50.0])
            p.grad = ndl.Tensor(rng.standard_normal(p.shape).astype(np.float32) * scale)
        opt.step()
    state = [a for entry in opt.state.values() for a in entry.values()]
    return [p.numpy().copy() for p in params] + [np.array(a) for a in state]


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@needs_numba
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_default_is_fused_and_bit_identical_over_20_steps(name, fused_calls, recordings):
    expected = _train(OPTIMIZERS[name], fused=False)
    assert fused_calls == [] and recordings == []
    got = _train(OPTIMIZERS[name], fused=None)
    assert fused_calls == [True] * 20, "the default eager step did not run the fused loop"
    assert len(recordings) == 1, "the loop was recorded afresh instead of reused"
    _assert_same(expected, got)


@needs_numba
def test_a_scheduler_changes_the_scalars_without_recording_again(recordings):
    def schedule(opt, step):
        if step == 0:
            opt.scheduler = optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        else:
            opt.scheduler.step()

    expected = _train(OPTIMIZERS["adam"], fused=False, change=schedule)
    got = _train(OPTIMIZERS["adam"], fused=None, change=schedule)
    assert len(recordings) == 1
    _assert_same(expected, got)
    # the lr really changed, so the reused loop took new scalars
    unscheduled = _train(OPTIMIZERS["adam"], fused=None)
    assert not np.array_equal(got[0], unscheduled[0])


def _set(step_at: int, **values):
    def change(opt, step):
        if step == step_at:
            for key, value in values.items():
                setattr(opt, key, value)
    return change


@needs_numba
@pytest.mark.parametrize("make, change, records", [
    # a user turns momentum on: a new state array and other calls
    (lambda ps, fused: optim.SGD(ps, lr=0.1, fused=fused), _set(5, momentum=0.9), 2),
    # ... and nesterov, and then weight decay off
    (OPTIMIZERS["sgd_momentum"], _set(4, nesterov=True), 2),
    (OPTIMIZERS["adam"], _set(7, weight_decay=0.0), 2),
    # dampening 0 drops a call (u += g unscaled)
    (OPTIMIZERS["sgd_momentum"], _set(3, dampening=0.0), 2),
    # a value change that keeps the calls: the same loop, new scalars
    (OPTIMIZERS["adamw"], _set(6, beta1=0.5, eps=1e-3), 1),
], ids=["momentum_on", "nesterov_on", "weight_decay_off", "dampening_0", "betas_eps"])
def test_a_hyperparameter_change_records_afresh_where_the_calls_change(make, change, records,
                                                                       recordings):
    expected = _train(make, fused=False, change=change)
    got = _train(make, fused=None, change=change)
    assert len(recordings) == records
    _assert_same(expected, got)


@needs_numba
def test_loading_a_state_dict_records_with_the_new_state_arrays(recordings):
    rng = np.random.default_rng(1)
    saved = optim.Adam(_params(rng), lr=1e-2)
    for p in saved.params:
        p.grad = ndl.Tensor(rng.standard_normal(p.shape).astype(np.float32))
    saved.step()
    checkpoint = saved.state_dict()
    recordings.clear()

    def load(opt, step):
        if step == 8:
            opt.load_state_dict(checkpoint)

    expected = _train(OPTIMIZERS["adam"], fused=False, change=load)
    got = _train(OPTIMIZERS["adam"], fused=None, change=load)
    assert len(recordings) == 2
    _assert_same(expected, got)


@needs_numba
def test_the_default_fuses_from_the_size_where_it_pays(monkeypatch, fused_calls):
    n = sum(int(np.prod(s)) for s in SHAPES)
    monkeypatch.setattr(optimizer_module, "EAGER_FUSE_MIN_ELEMENTS", n + 1)
    small = _train(OPTIMIZERS["adam"], fused=None, steps=3)
    assert fused_calls == []
    assert _train(OPTIMIZERS["adam"], fused=True, steps=3) and fused_calls == [True] * 3
    fused_calls.clear()
    monkeypatch.setattr(optimizer_module, "EAGER_FUSE_MIN_ELEMENTS", n)
    _assert_same(small, _train(OPTIMIZERS["adam"], fused=None, steps=3))
    assert fused_calls == [True] * 3


@needs_numba
def test_fused_false_opts_out(fused_calls):
    _train(OPTIMIZERS["adam"], fused=False, steps=3)
    assert fused_calls == []


def test_without_numba_the_default_runs_numpy(monkeypatch, fused_calls):
    expected = _train(OPTIMIZERS["adam"], fused=False, steps=5)
    monkeypatch.setattr(fused_update, "_numba", lambda: None)
    got = _train(OPTIMIZERS["adam"], fused=None, steps=5)
    assert fused_calls == [False] * 5
    _assert_same(expected, got)


@needs_numba
def test_the_kept_recording_dies_with_its_optimizer():
    import gc
    import weakref

    rng = np.random.default_rng(0)
    params = _params(rng)
    opt = optim.Adam(params, lr=1e-2)
    for p in params:
        p.grad = ndl.Tensor(rng.standard_normal(p.shape).astype(np.float32))
    opt.step()
    opt.step()
    assert opt._fused_rule.kernel is not None
    state_array = weakref.ref(opt._flat.state["v"])
    del opt, params, p
    gc.collect()
    assert state_array() is None
