"""ndl.jit never replays a plan whose inputs changed: arguments by value, every value the
trace read guarded or reported, bounded caches. Each test is a way a user met a stale plan."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest

import needle as ndl
import needle.nn as nn
from needle.jit import JitError

from .helpers import sum_loss_step


def _t(*shape, seed=0):
    return ndl.Tensor(np.random.default_rng(seed).standard_normal(shape).astype(np.float32),
                      requires_grad=False)


# -- 1. NumPy arrays are arguments like tensors ------------------------------------------------
def test_many_numpy_arrays_through_one_jitted_function():
    predict = ndl.jit(lambda x: x * 2.0 + 1.0)
    for _ in range(20):  # a new array each call: ids of freed arrays are reused by Python
        a = np.random.rand(4, 3).astype(np.float32)
        np.testing.assert_allclose(predict(a).numpy(), a * 2.0 + 1.0, rtol=1e-6)
    assert predict.explain().traces == 1


def test_numpy_array_changed_in_place_between_calls_is_seen():
    f = ndl.jit(lambda x: x.sum())
    a = np.ones((4, 3), np.float32)
    assert f(a).numpy() == 12
    a[:] = 5
    assert f(a).numpy() == 60


# -- 4. values read by the trace: guarded (retrace) or reported --------------------------------
SCALE = 2.0
WEIGHT = ndl.Tensor(np.eye(3, dtype=np.float32), requires_grad=False)


def test_global_python_scalar_read_by_the_trace_is_guarded():
    global SCALE
    f = ndl.jit(lambda x: x * SCALE)
    x = _t(3)
    try:
        np.testing.assert_allclose(f(x).numpy(), x.numpy() * 2.0, rtol=1e-6)
        SCALE = 3.0
        np.testing.assert_allclose(f(x).numpy(), x.numpy() * 3.0, rtol=1e-6)
    finally:
        SCALE = 2.0
    assert "global 'SCALE' changed from 2.0 to 3.0" in f.explain().retraces[-1].reason


def test_closure_scalar_read_by_the_trace_is_guarded():
    factor = 2.0

    @ndl.jit
    def f(x):
        return x * factor

    x = _t(3)
    np.testing.assert_allclose(f(x).numpy(), x.numpy() * 2.0, rtol=1e-6)
    factor = 5.0  # noqa: F841 - read by f through its closure
    np.testing.assert_allclose(f(x).numpy(), x.numpy() * 5.0, rtol=1e-6)
    assert "closure variable 'factor'" in f.explain().retraces[-1].reason


def test_attribute_of_a_plain_object_is_guarded():
    class Config:
        def __init__(self):
            self.offset = 1.0

    cfg = Config()
    f = ndl.jit(lambda x: x + cfg.offset)
    x = _t(3)
    np.testing.assert_allclose(f(x).numpy(), x.numpy() + 1.0, rtol=1e-6)
    cfg.offset = -4.0
    np.testing.assert_allclose(f(x).numpy(), x.numpy() - 4.0, rtol=1e-6)
    assert "offset changed from 1.0 to -4.0" in f.explain().retraces[-1].reason


def test_dropout_probability_changed_between_calls_retraces():
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5))
    f = ndl.jit(model)
    x = _t(8, 3)
    f(x)
    model.modules[1].p = 0.0  # no dropout any more: the output is the linear layer's
    np.testing.assert_allclose(f(x).numpy(), model.modules[0](x).numpy(), rtol=1e-6)
    assert "Dropout.p changed from 0.5 to 0.0" in f.explain().retraces[-1].reason


def test_batchnorm_momentum_changed_between_calls_retraces():
    bn = nn.BatchNorm1d(3)
    reference = nn.BatchNorm1d(3)
    f = ndl.jit(bn)
    x = _t(6, 3)
    f(x)
    reference(x)
    bn.momentum = reference.momentum = 0.5
    f(x)
    reference(x)
    np.testing.assert_allclose(bn.running_mean.numpy(), reference.running_mean.numpy(),
                               rtol=1e-6)
    assert "BatchNorm1d.momentum changed from 0.1 to 0.5" in f.explain().retraces[-1].reason


def test_rebound_global_tensor_retraces():
    global WEIGHT
    f = ndl.jit(lambda x: x @ WEIGHT)
    x = _t(2, 3)
    np.testing.assert_allclose(f(x).numpy(), x.numpy(), rtol=1e-6)
    saved = WEIGHT
    try:
        WEIGHT = ndl.Tensor(2 * np.eye(3, dtype=np.float32), requires_grad=False)
        np.testing.assert_allclose(f(x).numpy(), 2 * x.numpy(), rtol=1e-6)
    finally:
        WEIGHT = saved
    assert "global 'WEIGHT' is another object" in f.explain().retraces[-1].reason


def test_replaced_parameter_object_retraces():
    np.random.seed(0)
    layer = nn.Linear(3, 2)
    f = ndl.jit(lambda x: layer(x))
    x = _t(4, 3)
    f(x)
    layer.weight = nn.Parameter(np.zeros((3, 2), np.float32))
    np.testing.assert_allclose(f(x).numpy(), layer(x).numpy(), rtol=1e-6)
    assert "Linear.weight is another object" in f.explain().retraces[-1].reason


def test_layer_appended_to_a_list_retraces():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(3, 3)]

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    np.random.seed(0)
    model = Stack()
    f = ndl.jit(model)
    x = _t(2, 3)
    f(x)
    model.layers.append(nn.Linear(3, 3))
    np.testing.assert_allclose(f(x).numpy(), model(x).numpy(), rtol=1e-6)
    assert "Stack.layers changed" in f.explain().retraces[-1].reason


def test_numpy_random_inside_the_function_is_reported_and_refused_in_strict_mode():
    def noisy(x):
        return x + ndl.Tensor(np.random.rand(3).astype(np.float32), requires_grad=False)

    f = ndl.jit(noisy)
    f(_t(3))
    report = f.explain()
    assert len(report.unguarded) == 1
    assert "np.random" in report.unguarded[0].what
    assert report.unguarded[0].source.startswith(__file__)
    assert report.cache_entries[0].unguarded
    with pytest.raises(JitError, match="np.random"):
        ndl.jit(noisy, strict=True)(_t(3))


def test_numpy_array_read_from_a_global_is_reported():
    table = np.arange(3, dtype=np.float32)
    f = ndl.jit(lambda x: x * table)
    f(_t(3))
    assert any("NumPy array" in u.what for u in f.explain().unguarded)


def test_explain_lists_the_guarded_values():
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1))
    f = ndl.jit(lambda x: model(x))
    f(_t(2, 3))
    guards = f.explain().cache_entries[0].guards
    assert {"closure variable 'model'", "Dropout.p", "Dropout.training",
            "Linear.weight"} <= set(guards)


def test_unchanged_values_do_not_retrace():
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.1))
    opt = ndl.optim.SGD(model.parameters(), lr=0.1)

    step = ndl.jit(sum_loss_step(model, opt))

    for seed in range(5):
        step(_t(8, 3, seed=seed))
    assert step.explain().traces == 1


# -- 5. bounded caches ------------------------------------------------------------------------
def test_distinct_scalars_keep_memory_flat_and_the_cache_bounded():
    f = ndl.jit(lambda x, s: x * s, cache_size=16)
    x = _t(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for k in range(1000):
            f(x, float(k))
        gc.collect()
        objects_before, bytes_before = len(gc.get_objects()), _resident_bytes()
        for k in range(1000, 5000):
            f(x, float(k))
        gc.collect()
        objects_grown = len(gc.get_objects()) - objects_before
        bytes_grown = _resident_bytes() - bytes_before
    report = f.explain()
    assert report.num_cache_entries == 16
    assert len(report.retraces) <= 100
    # each cached plan holds hundreds of objects and ~16 KB: 4,000 kept would show plainly
    assert objects_grown < 2000, f"{objects_grown} more objects after 4,000 traces"
    assert bytes_grown < 30_000_000, f"resident memory grew by {bytes_grown} bytes"
    np.testing.assert_allclose(f(x, 4999.0).numpy(), x.numpy() * 4999.0, rtol=1e-6)


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as stats:
            return int(stats.read().split()[1]) * 4096
    except OSError:  # not Linux: the object count above still tells
        return 0


def test_nan_scalar_does_not_retrace_on_every_call():
    f = ndl.jit(lambda x, s: x * s)
    for _ in range(5):
        f(_t(3), float("nan"))
    assert f.explain().traces == 1


def test_retracing_again_and_again_warns_once_naming_the_guard():
    f = ndl.jit(lambda x, s: x * s)
    with pytest.warns(RuntimeWarning, match=r"call\[0\]\[1\]") as record:
        for k in range(20):
            f(_t(3), float(k))
    assert len([w for w in record if "keeps failing" in str(w.message)]) == 1


def test_least_recently_used_plan_is_dropped_first():
    f = ndl.jit(lambda x, s: x * s, cache_size=2)
    x = _t(3)
    f(x, 1.0)
    f(x, 2.0)
    f(x, 1.0)  # 1.0 is now the most recent
    f(x, 3.0)  # drops 2.0
    traces = f.explain().traces
    f(x, 1.0)
    assert f.explain().traces == traces
    f(x, 2.0)
    assert f.explain().traces == traces + 1


def test_cache_size_must_be_positive():
    with pytest.raises(ValueError, match="cache_size"):
        ndl.jit(lambda x: x, cache_size=0)


# -- 7. the fallback names the user's line -----------------------------------------------------
def test_fallback_names_the_users_file_and_line():
    def pick(x, index):
        return x[index]  # a tensor index needs its values: falls back to eager

    f = ndl.jit(pick)
    x = ndl.Tensor(np.arange(6.0, dtype=np.float32))
    np.testing.assert_allclose(f(x, ndl.Tensor(np.array([1, 2]))).numpy(), [1.0, 2.0])
    source = f.explain().fallbacks[0].source
    assert source == f"{__file__}:{pick.__code__.co_firstlineno + 1}"
