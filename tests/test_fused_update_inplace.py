"""The fused update reading gradients where they are (``run_fused(parts=...)``), and the
one-pass ``run_update`` of a jitted step: the same bits as the gathered (copied) gradient,
and a gradient that might alias what the update writes is still copied first."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.nn as nn
from needle import optim
from needle.apps.trainer import make_train_step
from needle.backend import array_module
from needle.compiler import fused_update
from needle.optim.optimizer import Optimizer

needs_numba = pytest.mark.skipif(not fused_update.available(),
                                 reason="numba is not installed or NEEDLE_NUMBA=0")

#: two parameters of one shape, so one's array can stand as the other's gradient
SHAPES = [(6, 5), (6, 5), (5,), (3, 4), (7,)]


def _adam_like(p, g, m, v):
    xp = array_module(p)
    xp.multiply(m, 0.9, out=m)
    scratch = xp.empty_like(p)
    xp.multiply(g, 0.1, out=scratch)
    xp.add(m, scratch, out=m)
    xp.multiply(g, g, out=scratch)
    xp.multiply(scratch, 0.001, out=scratch)
    xp.multiply(v, 0.999, out=v)
    xp.add(v, scratch, out=v)
    xp.sqrt(v, out=scratch)
    xp.add(scratch, 1e-8, out=scratch)
    xp.divide(m, scratch, out=scratch)
    xp.multiply(scratch, 0.01, out=scratch)
    xp.subtract(p, scratch, out=p)


@needs_numba
def test_pieces_read_in_place_give_the_gathered_bits():
    rng = np.random.default_rng(0)
    sizes = [30, 1, 7, 1000, 3]
    n = sum(sizes)
    pieces = tuple((rng.standard_normal(k) * rng.choice([0, 1e-6, 50])).astype(np.float32)
                   for k in sizes)
    start = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    start[2] = np.abs(start[2])
    gathered = [a.copy() for a in start]
    assert fused_update.run_fused(lambda p, g: _adam_like(p, g, gathered[1], gathered[2]),
                                  gathered[0], np.concatenate(pieces))
    numpy = [a.copy() for a in start]
    _adam_like(numpy[0], np.concatenate(pieces), numpy[1], numpy[2])
    parted = [a.copy() for a in start]
    stand_in = np.empty(n, np.float32)  # (only its shape is used)
    cache = fused_update.FusedRule()
    for _ in range(2):  # the first call records and compiles, the second replays
        assert fused_update.run_fused(lambda p, g: _adam_like(p, g, parted[1], parted[2]),
                                      parted[0], stand_in, cache=cache, parts={1: pieces})
    assert cache.parted == (1,)
    _adam_like(numpy[0], np.concatenate(pieces), numpy[1], numpy[2])
    assert fused_update.run_fused(lambda p, g: _adam_like(p, g, gathered[1], gathered[2]),
                                  gathered[0], np.concatenate(pieces))
    for a, b, c in zip(parted, gathered, numpy):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


@needs_numba
def test_pieces_that_do_not_add_up_are_refused():
    p, g = np.zeros(10, np.float32), np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="do not add up"):
        fused_update.run_fused(lambda a, b: array_module(a).add(a, b, out=a), p, g,
                               parts={1: (np.ones(4, np.float32), np.ones(5, np.float32))})
    np.testing.assert_array_equal(p, 0)


@needs_numba
def test_a_rule_writing_the_parted_array_is_not_fused():
    p, g = np.zeros(6, np.float32), np.zeros(6, np.float32)
    pieces = (np.ones(2, np.float32), np.ones(4, np.float32))
    assert not fused_update.run_fused(lambda a, b: array_module(a).add(a, b, out=b), p, g,
                                      parts={1: pieces})
    np.testing.assert_array_equal(pieces[0], 1)
    np.testing.assert_array_equal(pieces[1], 1)


def _params(seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [nn.Parameter(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]


def _grads(seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _run(fused, make_grads, steps: int = 4) -> tuple[list, Optimizer]:
    params = _params()
    opt = optim.Adam(params, lr=1e-2, weight_decay=1e-2, fused=fused)
    for step in range(steps):
        grads = make_grads(opt, params, step)
        opt.run_update(tuple(params), tuple(grads), fuse_rule=True)
    return [p.numpy().copy() for p in params], opt


@needs_numba
def test_run_update_in_place_matches_numpy_and_sets_grad(monkeypatch):
    def fresh(opt, params, step):
        return _grads(step)

    fast_calls: list[bool] = []
    original = Optimizer._fast_run_update

    def spy(self, params, grads):
        done = original(self, params, grads)
        fast_calls.append(done)
        return done

    monkeypatch.setattr(Optimizer, "_fast_run_update", spy)
    fused, opt = _run(None, fresh)
    assert fast_calls == [True] * 4, "the one-pass update did not run"
    numpy, _ = _run(False, fresh)
    for a, b in zip(fused, numpy):
        np.testing.assert_array_equal(a, b)
    for p, g in zip(opt.params, _grads(3)):  # .grad holds the last step's gradients
        np.testing.assert_array_equal(p.grad.numpy(), g)


@needs_numba
@pytest.mark.parametrize("alias", ["other_param", "own_param", "state_m", "transposed",
                                   "strided", "read_only"])
def test_gradients_that_might_alias_are_copied_first(alias, monkeypatch):
    """A gradient that is a view of the flat parameters or state (or not contiguous) is read
    from a copy, as NumPy's gathered update reads it: reading it in place would see the
    update of parameter 0 when updating parameter 1."""

    def aliased(opt, params, step):
        grads = _grads(step)
        if alias == "other_param":
            grads[1] = params[0]._data  # a view of the flat parameters, updated before it
        elif alias == "own_param":
            grads[0] = params[0]._data
        elif alias == "state_m" and step > 0:
            grads[1] = opt.state[0]["m"]
        elif alias == "transposed":
            grads[3] = np.ascontiguousarray(grads[3].T).T
        elif alias == "strided":  # a 1-D view with gaps (the loop takes contiguous pieces)
            grads[2] = np.repeat(grads[2], 2)[::2]
        elif alias == "read_only":  # (numba types it apart from the others: gathered)
            grads[2].flags.writeable = False
        return grads

    fused_calls: list[bool] = []
    original = fused_update.run_fused

    def spy(*args, **kwargs):
        fused_calls.append(original(*args, **kwargs))
        return fused_calls[-1]

    monkeypatch.setattr(fused_update, "run_fused", spy)
    fused, _ = _run(True, aliased)
    assert fused_calls and all(fused_calls), "the fused loop did not run"
    numpy, _ = _run(False, aliased)
    for a, b in zip(fused, numpy):
        np.testing.assert_array_equal(a, b)


@needs_numba
def test_jitted_steps_keep_the_bits_of_the_gathered_update(monkeypatch):
    """An MLP-ResNet-like jitted step over 30 steps: the same parameters and state whether
    the update reads the gradients in place or from the gathered copy."""

    def train(in_place: bool):
        if not in_place:
            monkeypatch.setattr(Optimizer, "_grad_pieces", staticmethod(lambda *args: None))
        np.random.seed(0)
        model = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(),
                              nn.Dropout(0.1), nn.Linear(32, 5))
        opt = optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
        step = ndl.jit(make_train_step(model, nn.SoftmaxLoss(), opt))
        rng = np.random.default_rng(1)
        for _ in range(30):
            step(ndl.Tensor(rng.standard_normal((16, 20)).astype(np.float32)),
                 ndl.Tensor(rng.integers(0, 5, 16)))
        monkeypatch.undo()
        state = [np.array(a) for entry in opt.state.values() for a in entry.values()]
        return [p.numpy().copy() for p in model.parameters()] + state

    for a, b in zip(train(True), train(False)):
        np.testing.assert_array_equal(a, b)
