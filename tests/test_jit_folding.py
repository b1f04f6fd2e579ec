"""Shape-only constant folding under ndl.jit: ``full_like`` (the seed of ``loss.backward()``)
and the chain that scales and broadcasts it become plan-time constants, with every result
equal to eager's; Sessions, whose shapes may change between runs, keep those steps."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.nn as nn
import needle.static as st
from needle.compiler.passes import reads_only_shapes
from needle.core.ops_elementwise import FullLike
from needle.core.ops_random import BernoulliLike
from needle.core.registry import REGISTRY


def test_only_ops_whose_scalar_form_ignores_the_operands_read_only_shapes():
    assert reads_only_shapes(FullLike(1.0), 1)
    assert reads_only_shapes(FullLike(0, dtype="float32"), 1)
    assert not reads_only_shapes(REGISTRY["negate"].cls(), 1)
    assert not reads_only_shapes(REGISTRY["add"].cls(), 2)
    assert not reads_only_shapes(REGISTRY["matmul"].cls(), 2)  # no scalar form at all
    assert not reads_only_shapes(BernoulliLike(0.5), 1)  # random: never folded


def _model_and_batches():
    rng = np.random.default_rng(0)
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    batches = [(ndl.Tensor(rng.standard_normal((5, 6)).astype(np.float32)),
                ndl.Tensor(rng.integers(0, 3, 5))) for _ in range(3)]
    return model, batches


def _grads_step(model):
    loss_fn = nn.SoftmaxLoss()

    def step(x, y):
        for p in model.parameters():
            p.grad = None
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return step


def test_the_backward_seed_is_folded_and_gradients_equal_eager():
    eager_model, batches = _model_and_batches()
    jit_model, _ = _model_and_batches()
    eager, jitted = _grads_step(eager_model), ndl.jit(_grads_step(jit_model))
    for x, y in batches:
        want = eager(x, y)
        got = jitted(x, y)
        np.testing.assert_array_equal(got.numpy(), want.numpy())
        for p, q in zip(jit_model.parameters(), eager_model.parameters()):
            np.testing.assert_array_equal(p.grad.numpy(), q.grad.numpy())
    program = jitted.lower(*batches[0])
    ops_run = {s.op.name for s in program.steps}
    assert "full_like" not in ops_run and "broadcast_to" not in ops_run, ops_run
    assert any(p.startswith("constant_folding (") and not p.startswith("constant_folding (0 ")
               for p in program.passes), program.passes


def test_folded_values_follow_the_traced_shape_of_each_signature():
    f = ndl.jit(lambda x: ndl.ops.full_like(x, 2.5) * 2 + x)
    for shape in ((2, 3), (4, 3), (4, 3)):
        x = ndl.Tensor(np.arange(np.prod(shape), dtype=np.float32).reshape(shape))
        np.testing.assert_array_equal(f(x).numpy(), np.full(shape, 5.0, np.float32) + x.numpy())
    assert "full_like" not in {s.op.name for s in f.lower(x).steps}


def test_a_session_keeps_shape_only_steps_of_an_unknown_batch():
    x = st.placeholder((None, 3), name="x")
    out = ndl.ops.full_like(x, 1.0) + x
    with st.Session() as sess:
        for n in (2, 5):
            feed = np.ones((n, 3), np.float32)
            np.testing.assert_array_equal(sess.run(out, {x: feed}), feed + 1)


def test_a_folded_constant_feeds_a_fused_region_and_is_never_written(monkeypatch):
    pytest.importorskip("numba")
    from needle.compiler import fusion

    monkeypatch.setattr(fusion, "FUSE_AFTER_CALLS", 0)
    f = ndl.jit(lambda x: (ndl.ops.full_like(x, 2.0) * x + x) * x)
    x = ndl.Tensor(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4))
    want = (2.0 * x.numpy() + x.numpy()) * x.numpy()
    for _ in range(3):
        np.testing.assert_array_equal(f(x).numpy(), want)
    program = f.lower(x)
    assert "full_like" not in {s.op.name for s in program.steps}
    for value in program.constants.values():  # shared by every call: read-only
        assert not getattr(value, "flags", np.zeros(1).flags).writeable or np.ndim(value) == 0


def test_a_fetched_shape_only_value_is_a_new_array_on_every_call():
    f = ndl.jit(lambda x: ndl.ops.full_like(x, 0.0))
    x = ndl.Tensor(np.ones((2, 2), np.float32))
    first = f(x).numpy()
    first[...] = 7.0  # the caller owns what it got
    np.testing.assert_array_equal(f(x).numpy(), np.zeros((2, 2), np.float32))
