"""An eager ``step()``'s fused update with its checks in one pass (``_held_grad_pieces``):
the same bits as the general path and as NumPy's update, and every case the one pass cannot
vouch for (a missing gradient, a parameter off its flat view, a gradient that may alias the
flat parameters, another dtype, read-only arrays) left to the general path."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.nn as nn
from needle import optim
from needle.autograd import Tensor, new_leaf
from needle.compiler import fused_update
from needle.optim.optimizer import Optimizer

needs_numba = pytest.mark.skipif(not fused_update.available(),
                                 reason="numba is not installed or NEEDLE_NUMBA=0")

SHAPES = [(6, 5), (6, 5), (5,), (1, 4), (7,)]


def _spy_held(monkeypatch) -> list[bool]:
    """Record whether each eager step's one-pass check accepted the gradients."""
    taken: list[bool] = []
    original = Optimizer._held_grad_pieces

    def spy(self, flat):
        pieces = original(self, flat)
        taken.append(pieces is not None)
        return pieces

    monkeypatch.setattr(Optimizer, "_held_grad_pieces", spy)
    return taken


def _train(fused, steps: int = 60):
    """An MLP-ResNet-like model trained eagerly; its parameters and Adam state."""
    np.random.seed(0)
    model = nn.Sequential(
        nn.Linear(20, 32), nn.ReLU(),
        nn.Residual(nn.Sequential(nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                  nn.Dropout(0.1), nn.Linear(16, 32), nn.BatchNorm1d(32))),
        nn.ReLU(), nn.Linear(32, 5))
    opt = optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3, fused=fused)
    loss_fn = nn.SoftmaxLoss()
    rng = np.random.default_rng(1)
    model.train()
    for _ in range(steps):
        x = ndl.Tensor(rng.standard_normal((16, 20)).astype(np.float32))
        y = ndl.Tensor(rng.integers(0, 5, 16))
        opt.minimize(loss_fn(model(x), y))
    state = [np.array(a) for entry in opt.state.values() for a in entry.values()]
    return [p.numpy().copy() for p in model.parameters()] + state


@needs_numba
def test_eager_steps_keep_the_bits_of_the_general_path_and_numpy(monkeypatch):
    taken = _spy_held(monkeypatch)
    fast = _train(True)
    assert len(taken) == 60 and all(taken), "the one-pass check did not accept the gradients"
    monkeypatch.setattr(Optimizer, "_held_grad_pieces", lambda self, flat: None)
    general = _train(True)
    monkeypatch.undo()
    numpy = _train(False)
    assert len(fast) == len(general) == len(numpy)
    for a, b, c in zip(fast, general, numpy):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def _params() -> list:
    rng = np.random.default_rng(0)
    return [nn.Parameter(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]


def _grads(step: int) -> list[np.ndarray]:
    rng = np.random.default_rng(step + 1)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _odd_grads(case: str, opt: Optimizer, params: list, step: int) -> list:
    """This step's gradient arrays (None: no gradient), with the case's odd one in."""
    grads: list = list(_grads(step))
    if case == "missing_grad":
        grads[2] = None
    elif case == "other_param":  # a view of the flat parameters, updated before it is read
        grads[1] = params[0]._data
    elif case == "state_m" and step > 0:
        grads[1] = opt.state[0]["m"]
    elif case == "float64_grad":
        grads[4] = grads[4].astype(np.float64)
    elif case == "read_only_grad":
        grads[3].flags.writeable = False
    elif case == "strided_grad":
        grads[2] = np.repeat(grads[2], 2)[::2]
    return grads


def _run_case(case: str, fused) -> tuple[list, Optimizer]:
    params = _params()
    opt = optim.Adam(params, lr=1e-2, weight_decay=1e-2, fused=fused)
    if case == "foreign_array":  # a parameter given an array of its own after the adoption
        params[3]._data = params[3]._data.copy()
    elif case == "read_only_view":
        params[0]._data.flags.writeable = False
    for step in range(4):
        for p, g in zip(params, _odd_grads(case, opt, params, step)):
            p.grad = None if g is None else new_leaf(Tensor, g, device=p.device)
        opt.step()
    return [p.numpy().copy() for p in params], opt


@needs_numba
@pytest.mark.parametrize("case", ["missing_grad", "foreign_array", "other_param", "state_m",
                                  "float64_grad", "read_only_grad", "read_only_view"])
def test_what_the_one_pass_cannot_vouch_for_goes_the_general_way(case, monkeypatch):
    taken = _spy_held(monkeypatch)
    fused, _ = _run_case(case, True)
    assert taken and not any(taken[1:] if case == "state_m" else taken), \
        "the one-pass check accepted gradients it cannot vouch for"
    monkeypatch.undo()
    numpy, _ = _run_case(case, False)
    for a, b in zip(fused, numpy):
        np.testing.assert_array_equal(a, b)


@needs_numba
def test_a_strided_gradient_is_read_from_a_copy(monkeypatch):
    """Not contiguous: the one pass takes a contiguous copy (as ``_grad_pieces`` does)."""
    taken = _spy_held(monkeypatch)
    fused, _ = _run_case("strided_grad", True)
    assert taken == [True] * 4
    monkeypatch.undo()
    numpy, _ = _run_case("strided_grad", False)
    for a, b in zip(fused, numpy):
        np.testing.assert_array_equal(a, b)
