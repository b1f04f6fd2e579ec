"""Fused update rules (compiler/fused_update.py): one compiled loop, bit-for-bit NumPy's result.

The fused loop must give exactly the arrays the rule's NumPy calls give (same float32
operations in the same order), must really run where it is asked for, and must step aside
(NumPy runs the rule) where numba is missing or the rule does something it cannot record.
"""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.nn as nn
from needle import optim
from needle.apps.trainer import make_train_step
from needle.backend import array_module
from needle.compiler import fused_update
from needle.optim.optimizer import _FLAT

#: the fused loop needs numba (needle[fast], in the test extra); NEEDLE_NUMBA=0 turns it off
needs_numba = pytest.mark.skipif(not fused_update.available(),
                                 reason="numba is not installed or NEEDLE_NUMBA=0")

# sizes that span several parameters, so the flat (all-parameters) path is taken
SHAPES = [(7, 5), (5,), (5, 3), (3,), (2, 2, 2)]

OPTIMIZERS = {
    "adam": lambda ps, fused: optim.Adam(ps, lr=1e-2, fused=fused),
    "adam_weight_decay": lambda ps, fused: optim.Adam(ps, lr=1e-2, weight_decay=0.1,
                                                      fused=fused),
    "adamw": lambda ps, fused: optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=fused),
    "sgd": lambda ps, fused: optim.SGD(ps, lr=0.1, fused=fused),
    "sgd_momentum_decay": lambda ps, fused: optim.SGD(ps, lr=0.1, momentum=0.9,
                                                      weight_decay=1e-2, fused=fused),
    "sgd_nesterov": lambda ps, fused: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                                fused=fused),
}


@pytest.fixture
def fused_calls(monkeypatch) -> list[bool]:
    """Records what every run_fused call returned (True: the compiled loop ran)."""
    calls: list[bool] = []
    original = fused_update.run_fused

    def spy(*args, **kwargs):
        done = original(*args, **kwargs)
        calls.append(done)
        return done

    monkeypatch.setattr(fused_update, "run_fused", spy)
    return calls


def _train(make_opt, fused, steps: int = 12) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    params = [nn.Parameter(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
    opt = make_opt(params, fused)
    for _ in range(steps):
        for p in params:
            # gradients with zeros, tiny and large values (division by sqrt(v) + eps near 0)
            g = rng.standard_normal(p.shape).astype(np.float32) * rng.choice([0, 1e-6, 1, 50])
            p.grad = ndl.Tensor(g)
        opt.step()
    state = [a for entry in opt.state.values() for a in entry.values()]
    return [p.numpy().copy() for p in params] + [np.array(a) for a in state]


@needs_numba
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_step_is_bit_identical_to_numpy(name, fused_calls):
    numpy_result = _train(OPTIMIZERS[name], fused=False)
    assert fused_calls == []
    fused_result = _train(OPTIMIZERS[name], fused=True)
    assert fused_calls and all(fused_calls), "the fused loop did not run"
    assert len(numpy_result) == len(fused_result)
    for a, b in zip(numpy_result, fused_result):
        np.testing.assert_array_equal(a, b)


@needs_numba
def test_default_eager_step_of_a_small_model_is_not_fused(fused_calls):
    """(below optimizer.EAGER_FUSE_MIN_ELEMENTS; tests/test_fused_update_cache.py has the rest)"""
    _train(OPTIMIZERS["adam"], fused=None, steps=2)
    assert fused_calls == []


def _jit_training(fused, optimize=True, steps=6):
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3, fused=fused)
    step = ndl.jit(make_train_step(model, nn.SoftmaxLoss(), opt), optimize=optimize)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        x = ndl.Tensor(rng.standard_normal((8, 12)).astype(np.float32))
        y = ndl.Tensor(rng.integers(0, 4, 8))
        step(x, y)
    return step, [p.numpy().copy() for p in model.parameters()]


def _check_fused_against_numpy(train, fused_calls) -> list[str]:
    """``train(fused)`` -> (passes, parameters): fused by default (the pass applied, the loop
    ran), and bit for bit the parameters of the same plans with the rule run by NumPy."""
    passes, fused_params = train(None)
    assert "fuse_update_rules (1 optimizer steps fused)" in passes
    assert fused_calls and all(fused_calls)
    fused_calls.clear()
    _, numpy_params = train(False)
    assert fused_calls == []
    for a, b in zip(fused_params, numpy_params):
        np.testing.assert_array_equal(a, b)
    return passes


@needs_numba
def test_jit_fuses_the_optimizer_step(fused_calls):
    def train(fused):
        step, params = _jit_training(fused=fused)
        return step.explain().cache_entries[0].passes, params

    _check_fused_against_numpy(train, fused_calls)


@needs_numba
def test_jit_without_optimization_does_not_fuse(fused_calls):
    step, _ = _jit_training(fused=None, optimize=False, steps=2)
    assert fused_calls == []
    assert not any("fuse_update_rules" in p for p in step.explain().cache_entries[0].passes)


def test_without_numba_everything_runs_unfused(monkeypatch, fused_calls):
    monkeypatch.setattr(fused_update, "_numba", lambda: None)
    assert not fused_update.available()
    with pytest.raises(ImportError, match=r"Adam\(fused=True\) needs numba.*needle\[fast\]"):
        optim.Adam([nn.Parameter(np.zeros(3, np.float32))], fused=True)
    step, params = _jit_training(fused=None, steps=3)
    passes = step.explain().cache_entries[0].passes
    assert "fuse_update_rules (skipped: numba is not installed)" in passes
    assert all(np.isfinite(p).all() for p in params)
    assert not any(fused_calls)


@needs_numba
def test_rule_outside_the_recorded_calls_falls_back(fused_calls):
    class ClippedSGD(optim.SGD):
        """Uses xp.clip, which the recorder does not cover."""

        def _update(self, index, param, grad):
            xp = array_module(param)
            scratch = self._buffer(index, param, 0)
            xp.clip(grad, -0.5, 0.5, out=scratch)
            xp.multiply(scratch, self.lr, out=scratch)
            xp.subtract(param, scratch, out=param)

    rng = np.random.default_rng(0)
    params = [nn.Parameter(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
    before = [p.numpy().copy() for p in params]
    grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    for p, g in zip(params, grads):
        p.grad = ndl.Tensor(g)
    ClippedSGD(params, lr=0.1, fused=True).step()
    assert fused_calls == [False]
    for p, b, g in zip(params, before, grads):
        np.testing.assert_allclose(p.numpy(), b - 0.1 * np.clip(g, -0.5, 0.5), rtol=1e-6)


@needs_numba
def test_run_fused_matches_numpy_on_inf_and_nan():
    """error_model='numpy': 1/0 is inf and 0/0 nan, as in NumPy (no exception)."""
    def rule(a, b):
        xp = array_module(a)
        xp.divide(a, b, out=a)
        xp.sqrt(a, out=b)
        xp.negative(b, out=b)

    a = np.array([1.0, 0.0, -1.0, 4.0, 2.5], np.float32)
    b = np.array([0.0, 0.0, 0.0, 2.0, -1.0], np.float32)
    expected_a, expected_b = a.copy(), b.copy()
    with np.errstate(all="ignore"):
        rule(expected_a, expected_b)
    assert fused_update.run_fused(rule, a, b)
    np.testing.assert_array_equal(a, expected_a)
    np.testing.assert_array_equal(b, expected_b)


@needs_numba
def test_run_fused_refuses_shared_memory_and_direct_numpy():
    base = np.zeros(10, np.float32)

    def rule(a, b):
        array_module(a).add(a, b, out=a)

    assert not fused_update.run_fused(rule, base[:5], base[3:8])  # overlapping halves
    assert not fused_update.run_fused(rule, base, base[::1])  # the same memory twice
    assert not fused_update.run_fused(rule, base[::2], base[1::2])  # not contiguous

    def direct(a, b):
        np.add(a, b, out=a)  # computes on the stand-ins instead of recording

    a, b = np.ones(4, np.float32), np.ones(4, np.float32)
    assert not fused_update.run_fused(direct, a, b)
    np.testing.assert_array_equal(a, np.ones(4, np.float32))


@needs_numba
def test_fused_source_reads_and_writes_each_array_once():
    rng = np.random.default_rng(0)
    params = [nn.Parameter(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
    opt = optim.Adam(params, lr=1e-3)
    flat = opt._flat
    opt._flat_state()
    opt.step_count = 1
    opt._scratch = {}  # scratch asked for while recording becomes registers
    source = fused_update.fused_source(lambda p, g: opt._update(_FLAT, p, g), flat.param,
                                       flat.grad)
    loads = [line for line in source.splitlines() if "[i]" in line and "= m" in line]
    stores = [line for line in source.splitlines() if line.strip().startswith("m")]
    # param, grad, m, v read once each; param, m, v written once each
    assert len(loads) == 4 and len(stores) == 3, source


def _session_training(fused):
    import needle.static as st

    np.random.seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    rng = np.random.default_rng(1)
    with st.Graph():
        x = st.placeholder((8, 12))
        y = st.placeholder((8,), dtype="int64")
        loss = nn.SoftmaxLoss()(model(x), y)
        opt = optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3, fused=fused)
        train_op = opt.minimize(loss)
        sess = st.Session()
        feeds = {x: rng.standard_normal((8, 12)).astype(np.float32),
                 y: rng.integers(0, 4, 8)}
        passes = sess.plan(train_op, feeds).passes
        for _ in range(5):
            sess.run(train_op, {x: rng.standard_normal((8, 12)).astype(np.float32),
                                y: rng.integers(0, 4, 8)})
    return passes, [p.numpy().copy() for p in model.parameters()]


@needs_numba
def test_session_train_op_fuses_the_update(fused_calls):
    _check_fused_against_numpy(_session_training, fused_calls)


@needs_numba
def test_float16_parameters_fall_back_to_numpy(fused_calls):
    """numba has no float16 arithmetic: the rule runs as NumPy calls, with NumPy's results."""
    def train(fused):
        rng = np.random.default_rng(0)
        params = [nn.Parameter(rng.standard_normal(s).astype(np.float16)) for s in SHAPES]
        opt = optim.Adam(params, lr=1e-2, fused=fused)
        for _ in range(3):
            for p in params:
                p.grad = ndl.Tensor(rng.standard_normal(p.shape).astype(np.float16))
            opt.step()
        return [p.numpy().copy() for p in params]

    expected = train(fused=False)
    got = train(fused=True)
    assert fused_calls == [False, False, False]
    for a, b in zip(expected, got):
        assert a.dtype == np.float16
        np.testing.assert_array_equal(a, b)


@needs_numba
def test_fused_updates_keep_no_optimizer_memory_alive():
    """The fused path's caches hold no reference to an optimizer's arrays once it is gone."""
    import gc
    import weakref

    rng = np.random.default_rng(0)
    params = [nn.Parameter(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
    opt = optim.Adam(params, lr=1e-2, fused=True)
    for p in params:
        p.grad = ndl.Tensor(rng.standard_normal(p.shape).astype(np.float32))
    opt.step()
    state_array = weakref.ref(opt._flat.state["m"])
    del opt, params, p
    gc.collect()
    assert state_array() is None
