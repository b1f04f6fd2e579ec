"""Library guards: optimizer state dicts checked as constructors are, closed Sessions, runaway
while_loops, DataLoader threads after ``break``, lossy conversions, packaging metadata."""

from __future__ import annotations

import gc
import re
import threading
from pathlib import Path

import numpy as np
import pytest

import needle as ndl
import needle.static as st
import needle.static.control as control
from needle import nn, optim
from needle.data import DataLoader, NDArrayDataset

ROOT = Path(__file__).resolve().parents[1]


# -- Optimizer.load_state_dict refuses what the constructors refuse ----------------------------
def _params():
    return [nn.Parameter(np.ones((2, 3), np.float32)), nn.Parameter(np.zeros(3, np.float32))]


@pytest.mark.parametrize(("make", "key", "value"), [
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.5), "lr", float("nan")),
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.5), "lr", -5.0),
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.5), "momentum", 1.5),
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.5), "weight_decay", float("inf")),
    (lambda ps: optim.Adam(ps, lr=0.01), "beta1", 5.0),
    (lambda ps: optim.Adam(ps, lr=0.01), "beta2", -0.1),
    (lambda ps: optim.Adam(ps, lr=0.01), "eps", float("nan")),
    (lambda ps: optim.AdamW(ps, lr=0.01), "lr", -5),
])
def test_load_state_dict_refuses_what_the_constructor_refuses(make, key, value):
    params = _params()
    opt = make(params)
    saved = opt.state_dict()
    name = type(opt).__name__
    bad = {**saved, "hyperparams": {**saved["hyperparams"], key: value}}
    before = {h: getattr(opt, h) for h in opt.hyperparams}
    with pytest.raises(ValueError, match=rf"{name}\.load_state_dict: {key} must be .*got"):
        opt.load_state_dict(bad)
    assert {h: getattr(opt, h) for h in opt.hyperparams} == before  # nothing changed
    opt.load_state_dict(saved)  # the good one still loads


def test_constructors_refuse_nan_lr_with_the_same_rule():
    for make in (optim.SGD, optim.Adam, optim.AdamW):
        with pytest.raises(ValueError, match=r"lr must be a finite number >= 0, got nan"):
            make(_params(), lr=float("nan"))
    with pytest.raises(ValueError, match=r"SGD.load_state_dict: nesterov=True needs momentum"):
        opt = optim.SGD(_params(), lr=0.1, momentum=0.5, nesterov=True)
        saved = opt.state_dict()
        opt.load_state_dict({**saved, "hyperparams": {**saved["hyperparams"], "momentum": 0.0}})


# -- Session.variables / load_variables after close() -----------------------------------------
def test_closed_session_refuses_variables_and_load_variables():
    with st.Graph():
        v = st.Variable(np.zeros(2, np.float32), name="v")
        step = st.assign_add(v, np.ones(2, np.float32))
        sess = st.Session()
        sess.run(step)
        assert sess.variables()["v"].tolist() == [1.0, 1.0]
        sess.close()
        with pytest.raises(RuntimeError, match="Session is closed"):
            sess.variables()
        with pytest.raises(RuntimeError, match="Session is closed"):
            sess.load_variables({"v": np.full(2, 5.0, np.float32)})


# -- while_loop without maximum_iterations is guarded -----------------------------------------
def test_runaway_while_loop_raises_naming_the_loop_and_line():
    with st.Graph():
        x = st.Variable(np.ones(1, np.float32))
        line = _line_of("stuck = st.while_loop")
        stuck = st.while_loop(lambda a: a.sum() < 20, lambda a: a * 1.0, x, name="stuck",
                              iteration_limit=50)
        fine = st.while_loop(lambda a: a.sum() < 20, lambda a: a * 2.0, x, iteration_limit=5)
        sess = st.Session()
        np.testing.assert_array_equal(sess.run(fine), [32.0])  # 5 iterations: the limit is ok
        with pytest.raises(RuntimeError, match=rf"while_loop 'stuck' \(created at "
                                               rf".*test_library_guards.py:{line}\) ran 50 "
                                               r"iterations and cond_fn is still true"):
            sess.run(stuck)


def test_while_loop_default_cap_is_documented_and_overridable(monkeypatch):
    assert control.MAX_UNBOUNDED_ITERATIONS == 1_000_000
    assert "MAX_UNBOUNDED_ITERATIONS" in st.while_loop.__doc__
    monkeypatch.setattr(control, "MAX_UNBOUNDED_ITERATIONS", 30)
    with st.Graph():
        x = st.Variable(np.ones(1, np.float32))
        stuck = st.while_loop(lambda a: a.sum() < 20, lambda a: a + 0.0, x)
        bounded = st.while_loop(lambda a: a.sum() < 20, lambda a: a + 0.0, x,
                                maximum_iterations=100)  # the user's own bound wins
        sess = st.Session()
        np.testing.assert_array_equal(sess.run(bounded), [1.0])
        with pytest.raises(RuntimeError, match="ran 30 iterations"):
            sess.run(stuck)
    with pytest.raises(ValueError, match="iteration_limit must be an int >= 0"):
        st.while_loop(lambda a: a.sum() < 1, lambda a: a, x, iteration_limit=-1)


def _line_of(text: str) -> int:
    for number, line in enumerate(Path(__file__).read_text().splitlines(), 1):
        if text in line and "_line_of" not in line:
            return number
    raise AssertionError(text)


# -- DataLoader workers stop when the iterator is abandoned -----------------------------------
def _data_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("needle-data-") and t.is_alive()]


def test_dataloader_workers_stop_after_break():
    ds = NDArrayDataset(np.arange(40000, dtype=np.float32).reshape(-1, 4), np.arange(10000))
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2)
    assert _data_threads() == []
    for i, _batch in enumerate(loader):
        assert len(_data_threads()) == 2
        if i == 2:
            break
    gc.collect()
    assert _data_threads() == []
    # the position survives the iterator, for checkpoints
    assert loader.state_dict()["batch_index"] == 3
    it = iter(loader)
    next(it)
    del it
    assert _data_threads() == []
    assert sum(1 for _ in loader) == len(loader)  # and the loader still works
    assert _data_threads() == []


# -- lossy conversions are refused -------------------------------------------------------------
def test_integer_placeholder_refuses_non_whole_floats():
    with st.Graph():
        y = st.placeholder((None,), dtype="int64", name="labels")
        out = y * 2
        sess = st.Session()
        np.testing.assert_array_equal(sess.run(out, feed_dict={y: np.array([1.0, 3.0])}), [2, 6])
        for bad, why in [([1.0, 2.5], "2.5 is not a whole number"),
                         ([np.nan], "nan is not finite"), ([1e30], "out of range for int64")]:
            with pytest.raises(ValueError, match=rf"feed for placeholder 'labels' \(int64\): "
                                                 rf".*{re.escape(why)}"):
                sess.run(out, feed_dict={y: np.array(bad)})
        small = st.placeholder((2,), dtype="uint8", name="small")
        with pytest.raises(ValueError, match="300 is out of range for uint8"):
            sess.run(small + 0, feed_dict={small: np.array([1, 300])})


def test_module_load_state_dict_refuses_overflow_naming_the_key():
    model = nn.Linear(2, 3)
    state = {k: np.array(v) for k, v in model.state_dict().items()}
    before = model.weight.numpy().copy()
    bad = {**state, "weight": np.full((2, 3), 1e300)}
    with pytest.raises(ValueError, match=r"load_state_dict\(Linear\): 'weight': .*1e\+300 "
                                         r"overflows float32"):
        model.load_state_dict(bad)
    np.testing.assert_array_equal(model.weight.numpy(), before)  # nothing changed
    model.load_state_dict({**state, "weight": np.full((2, 3), 0.1)})  # float64 rounds: fine
    assert model.weight.dtype == np.float32
    np.testing.assert_array_equal(model.weight.numpy(), np.full((2, 3), 0.1, np.float32))


# -- packaging ---------------------------------------------------------------------------------
def test_pyproject_license_and_numpy_floor():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    (setuptools_req,) = meta["build-system"]["requires"]
    assert int(re.fullmatch(r"setuptools>=(\d+).*", setuptools_req).group(1)) >= 77
    # NumPy 1.24-1.26 fail the suite (value-based promotion turns float32 math float64)
    (numpy_req,) = [d for d in project["dependencies"] if d.startswith("numpy")]
    floor = tuple(int(x) for x in re.fullmatch(r"numpy>=([\d.]+)", numpy_req).group(1)
                  .split("."))
    assert floor >= (2, 0)
    assert tuple(int(x) for x in np.__version__.split(".")[:2]) >= floor[:2]
    # the behaviour the floor stands for: a Python float keeps float32 math float32
    assert (np.array(1.0, np.float32) / 3.0).dtype == np.float32
    assert ndl.ops.divide_scalar(ndl.Tensor(np.float32(3.0)), 2.0).dtype == np.float32


@pytest.mark.parametrize("cls", [optim.Adam, optim.AdamW])
@pytest.mark.parametrize("kwargs", [{"eps": float("nan")}, {"beta1": float("nan")},
                                    {"beta2": 1.0}, {"weight_decay": float("inf")}])
def test_adam_constructor_refuses_what_load_state_dict_refuses(cls, kwargs):
    """One rule table for constructors and load_state_dict: Adam's own checks let NaN eps
    and NaN betas through (comparisons with NaN are False)."""
    params = [ndl.Tensor(np.zeros(3, dtype=np.float32), requires_grad=True)]
    (key,) = kwargs
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {key} must be"):
        cls(params, **kwargs)
    state = cls(params).state_dict()
    state["hyperparams"][key] = kwargs[key]
    with pytest.raises(ValueError, match=rf"{key} must be"):
        cls(params).load_state_dict(state)
