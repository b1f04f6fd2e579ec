"""The shortcuts on ndl.jit's call path keep every guard's meaning: a guarded value that is
the very object read at trace time passes at once, and anything else (an equal value of
another type, another value, another tuple of other objects) still retraces; outputs picked
from a plan's result are the same graph nodes as before (gradients flow through them)."""

from __future__ import annotations

import numpy as np

import needle as ndl


class _Config:
    def __init__(self) -> None:
        self.flag = True
        self.count = 2
        self.scale = 0.5
        self.name = "double"
        self.pair: tuple = (object(), object())


def _x() -> ndl.Tensor:
    return ndl.Tensor(np.arange(3, dtype=np.float32), requires_grad=False)


def _jitted(cfg: _Config):
    def f(x):
        y = x * cfg.scale * cfg.count
        if cfg.flag:
            y = y + 1.0
        if cfg.name == "double":
            y = y * 2.0
        return y + float(len(cfg.pair))

    return ndl.jit(f)


def _expected(cfg: _Config, x: ndl.Tensor) -> np.ndarray:
    y = x.numpy() * cfg.scale * cfg.count
    if cfg.flag:
        y = y + 1.0
    if cfg.name == "double":
        y = y * 2.0
    return y + float(len(cfg.pair))


def test_unchanged_and_equal_immutable_values_replay_the_plan():
    cfg = _Config()
    f, x = _jitted(cfg), _x()
    f(x)
    cfg.count = int("2")  # an equal int, maybe another object: still the same plan
    cfg.scale = float("0.5")  # an equal float, another object
    cfg.name = "".join(["dou", "ble"])  # an equal string, another object
    cfg.pair = tuple(cfg.pair)  # the same items
    np.testing.assert_allclose(f(x).numpy(), _expected(cfg, x), rtol=1e-6)
    assert f.explain().traces == 1


def test_bool_replaced_by_an_equal_int_retraces():
    cfg = _Config()
    f, x = _jitted(cfg), _x()
    f(x)
    cfg.flag = 1  # == True, but not a bool: the guard compares type and value
    np.testing.assert_allclose(f(x).numpy(), _expected(cfg, x), rtol=1e-6)
    assert f.explain().traces == 2
    assert "flag changed from True to 1" in f.explain().retraces[-1].reason


def test_int_replaced_by_an_equal_float_or_another_int_retraces():
    cfg = _Config()
    f, x = _jitted(cfg), _x()
    f(x)
    cfg.count = 2.0  # == 2, but a float
    f(x)
    assert f.explain().traces == 2
    cfg.count = 3
    np.testing.assert_allclose(f(x).numpy(), _expected(cfg, x), rtol=1e-6)
    assert f.explain().traces == 3


def test_changed_float_and_string_retrace():
    cfg = _Config()
    f, x = _jitted(cfg), _x()
    f(x)
    cfg.scale = 0.25
    np.testing.assert_allclose(f(x).numpy(), _expected(cfg, x), rtol=1e-6)
    cfg.name = "single"
    np.testing.assert_allclose(f(x).numpy(), _expected(cfg, x), rtol=1e-6)
    assert f.explain().traces == 3


def test_tuple_of_other_objects_retraces():
    cfg = _Config()
    f, x = _jitted(cfg), _x()
    f(x)
    cfg.pair = (cfg.pair[0], object())  # same length, another item
    f(x)
    assert f.explain().traces == 2
    assert "pair" in f.explain().retraces[-1].reason


def test_gradients_flow_through_every_output_of_a_plan():
    a = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    f = ndl.jit(lambda w: (w.exp().sum(), (w * 3.0).sum()))
    for _ in range(3):  # traced, then replayed
        w = ndl.Tensor(a, requires_grad=True)
        first, second = f(w)
        (first + second * 2.0).backward()
        np.testing.assert_allclose(w.grad.numpy(), np.exp(a) + 6.0, rtol=1e-5)
    assert f.explain().traces == 1
