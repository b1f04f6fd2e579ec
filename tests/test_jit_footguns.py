"""One named test per known tracing pitfall: a compiled plan must never be replayed stale."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

import needle as ndl
import needle.nn as nn
from needle import ops
from needle.jit import JitError


def _t(*shape, dtype=np.float32, seed=0):
    return ndl.Tensor(np.random.default_rng(seed).standard_normal(shape).astype(dtype),
                      requires_grad=False)


def test_changed_batch_size_retraces():
    f = ndl.jit(lambda x: ops.summation(x, axes=(0,)))
    assert f(_t(4, 3)).shape == (3,)
    out = f(_t(7, 3, seed=1))
    np.testing.assert_allclose(out.numpy(), _t(7, 3, seed=1).numpy().sum(0), rtol=1e-6)
    report = f.explain()
    assert report.traces == 2 and report.num_cache_entries == 2
    assert "shape changed from (4, 3) to (7, 3)" in report.retraces[0].reason


def test_changed_dtype_retraces():
    f = ndl.jit(lambda x: x * 2.0)
    assert f(_t(3)).dtype == np.float32
    assert f(_t(3, dtype=np.float64)).dtype == np.float64
    assert "dtype changed" in f.explain().retraces[0].reason


def test_python_scalar_argument_that_changes_retraces():
    f = ndl.jit(lambda x, scale: x * scale)
    x = _t(3)
    np.testing.assert_allclose(f(x, 2.0).numpy(), x.numpy() * 2, rtol=1e-6)
    np.testing.assert_allclose(f(x, 3.0).numpy(), x.numpy() * 3, rtol=1e-6)
    assert "Python value changed from 2.0 to 3.0" in f.explain().retraces[0].reason


def test_list_argument_whose_length_changes_retraces():
    f = ndl.jit(lambda xs: ops.stack(xs, 0).sum(axes=(0,)))
    a, b, c = _t(2), _t(2, seed=1), _t(2, seed=2)
    np.testing.assert_allclose(f([a, b]).numpy(), a.numpy() + b.numpy(), rtol=1e-6)
    np.testing.assert_allclose(f([a, b, c]).numpy(), a.numpy() + b.numpy() + c.numpy(),
                               rtol=1e-6)
    assert "list length changed from 2 to 3" in f.explain().retraces[0].reason


def test_train_eval_switch_retraces_and_uses_running_statistics():
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    f = ndl.jit(model)
    x = _t(5, 3)
    train_out = f(x).numpy()
    model.eval()
    eval_out = f(x).numpy()
    np.testing.assert_allclose(eval_out, model(x).numpy(), rtol=1e-6)
    assert not np.allclose(train_out, eval_out)
    assert f.explain().traces == 2


def test_train_eval_switch_of_a_closed_over_module_retraces():
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5))
    f = ndl.jit(lambda x: model(x))  # the module is not an argument: guarded via the trace
    x = _t(5, 3)
    f(x)
    model.eval()
    np.testing.assert_allclose(f(x).numpy(), model(x).numpy(), rtol=1e-6)
    assert f.explain().traces == 2


def test_returning_the_same_output_twice_gives_arrays_the_user_can_keep():
    f = ndl.jit(lambda x: (x * 2.0, x * 2.0))  # CSE merges the two
    first, second = f(_t(3))
    assert first.numpy() is not second.numpy()
    kept = first.numpy().copy()
    first.numpy()[:] = 0  # the user scribbles on one output
    np.testing.assert_array_equal(second.numpy(), kept)
    again, _ = f(_t(3))  # and the next call does not hand back the same buffer
    np.testing.assert_array_equal(again.numpy(), kept)
    assert again.numpy() is not first.numpy()


def test_data_dependent_if_falls_back_to_eager_and_records_why():
    def clipped(x):
        if x.sum() > 0:  # Python bool of a traced tensor: data-dependent control flow
            return x * 2.0
        return x * -1.0

    f = ndl.jit(clipped)
    pos, neg = _t(3) * 0 + 1.0, _t(3) * 0 - 1.0
    np.testing.assert_array_equal(f(pos).numpy(), [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(f(neg).numpy(), [1.0, 1.0, 1.0])  # correct, not replayed
    report = f.explain()
    assert len(report.fallbacks) == 1
    fallback = report.fallbacks[0]
    assert fallback.reason == "bool()" and "test_jit_footguns.py" in fallback.source
    assert report.cache_entries[0].fallback and report.cache_entries[0].calls == 2


def test_data_dependent_if_in_strict_mode_names_the_line_and_the_fixes():
    def clipped(x):
        if x.sum() > 0:
            return x * 2.0
        return x

    f = ndl.jit(clipped, strict=True)
    with pytest.raises(JitError) as info:
        f(_t(3))
    message = str(info.value)
    assert "test_jit_footguns.py:" in message and "bool()" in message
    assert "static_argnames" in message and "cond" in message


def test_item_and_print_of_traced_tensors_are_detected():
    f = ndl.jit(lambda x: x * float(x.sum().item()), strict=True)
    with pytest.raises(JitError, match=r"item\(\)"):
        f(_t(3))
    g = ndl.jit(lambda x: print(x) or x, strict=True)
    with pytest.raises(JitError, match="printing"):
        g(_t(3))


def test_static_argnames_turns_a_tensor_flag_into_a_guarded_constant():
    def maybe_negate(x, flag):
        return -x if flag else x

    f = ndl.jit(maybe_negate, strict=True, static_argnames=("flag",))
    x = _t(3)
    yes, no = ndl.Tensor(True), ndl.Tensor(False)
    np.testing.assert_array_equal(f(x, yes).numpy(), -x.numpy())
    np.testing.assert_array_equal(f(x, no).numpy(), x.numpy())
    assert f.explain().traces == 2


def test_dropout_masks_differ_between_calls():
    np.random.seed(0)
    layer = nn.Dropout(0.5)
    f = ndl.jit(layer)
    x = ndl.Tensor(np.ones((50, 40), np.float32), requires_grad=False)
    first, second = f(x).numpy(), f(x).numpy()
    assert not np.array_equal(first, second)
    for out in (first, second):
        assert 0.4 < np.mean(out == 0) < 0.6
    assert f.explain().traces == 1


def test_dropout_draws_match_eager_under_the_same_seed():
    layer = nn.Dropout(0.3)
    x = ndl.Tensor(np.ones((6, 7), np.float32), requires_grad=False)
    np.random.seed(4)
    eager = [layer(x).numpy() for _ in range(3)]
    f = ndl.jit(layer)
    np.random.seed(4)
    jitted = [f(x).numpy() for _ in range(3)]
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(a, b)


def test_dropout_gradient_uses_the_mask_of_the_same_call():
    np.random.seed(0)
    f = ndl.jit(nn.Dropout(0.5))
    for _ in range(3):  # the trace, then replays
        x = ndl.Tensor(np.ones((20, 30), np.float32))
        out = f(x)
        out.sum().backward()
        # the backward must not draw a new mask: it sees exactly the forward's zeros
        np.testing.assert_array_equal(x.grad.numpy(), (out.numpy() != 0) * np.float32(2.0))


def test_a_librarys_clock_reads_while_tracing_are_not_baked_values():
    # logging stamps each record with time.time() inside the standard library: strict mode
    # refused the trace (a garbage-collector callback timing itself did the same, by chance)
    def logged_double(x):
        logging.makeLogRecord({"msg": "tracing"})
        return x * 2

    f = ndl.jit(logged_double, strict=True)
    x = _t(3)
    np.testing.assert_array_equal(f(x).numpy(), x.numpy() * 2)


def test_the_users_own_clock_reads_still_refuse_a_strict_trace():
    def stamped(x):
        return x * time.perf_counter()

    with pytest.raises(JitError, match="time.perf_counter called while tracing"):
        ndl.jit(stamped, strict=True)(_t(3))
