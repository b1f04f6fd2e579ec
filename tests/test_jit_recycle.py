"""A jitted training step reuses the recycled head outputs and loss gradients (issue #20, H1).

Eager steps hand their vocabulary-sized arrays (a Linear head's product, the softmax
cross-entropy gradient) back to ``kernels/recycle.py`` once nothing refers to them. A compiled
plan that kept a reference to them (codegen locals, the memory plan, snapshot or fetch copies)
would make every step allocate and page-fault fresh arrays; these tests pin that it does not.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

import needle as ndl
from needle import nn, ops
from needle.compiler import fused_update
from needle.kernels import recycle


@pytest.fixture
def small_recycling(monkeypatch):
    """Recycling from 1 KiB up (the real bound is 32 MiB), with an empty pool of its own."""
    monkeypatch.setattr(recycle, "MIN_BYTES", 1024)
    monkeypatch.setattr(recycle, "_pool", [])
    monkeypatch.delenv("NEEDLE_RECYCLE_LARGE", raising=False)


def _lm_tail_step(jitted: bool):
    """A language model's tail: Linear head -> softmax cross-entropy -> SGD, (256, 300) logits."""
    np.random.seed(3)
    head = nn.Linear(8, 300)
    optimizer = ndl.optim.SGD(head.parameters(), lr=0.1)
    loss_fn = nn.SoftmaxLoss()

    def step(x: ndl.Tensor, y: ndl.Tensor) -> ndl.Tensor:
        return optimizer.minimize(loss_fn(head(x), y))

    return (ndl.jit(step) if jitted else step), head


def _inputs():
    rng = np.random.default_rng(11)
    x = ndl.Tensor(rng.standard_normal((256, 8)).astype(np.float32), requires_grad=False)
    y = ndl.Tensor(rng.integers(0, 300, 256), requires_grad=False)
    return x, y


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_a_training_step_allocates_no_new_large_arrays_after_warm_up(small_recycling, jitted):
    step, _ = _lm_tail_step(jitted)
    x, y = _inputs()
    for _ in range(3):  # warm-up: trace, compile, fill the pool
        step(x, y)
    assert recycle._pool, "the head's product should come from the recycling pool"
    kept = [weakref.ref(a) for a in recycle._pool]  # (a weak reference leaves refcounts alone)
    for _ in range(4):
        step(x, y)
    # the same array objects, still pooled: every step took them again, none was added
    assert [r() for r in kept] == [a for a in recycle._pool]
    assert len(recycle._pool) == len(kept)


def test_the_jitted_step_matches_eager_with_recycling(small_recycling):
    (eager, eager_head), (jitted, jit_head) = _lm_tail_step(False), _lm_tail_step(True)
    x, y = _inputs()
    for _ in range(4):
        want, got = eager(x, y), jitted(x, y)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jit_head.weight.numpy(), eager_head.weight.numpy(), rtol=1e-5,
                               atol=1e-6)


# -- no reference cycles per step (they keep a step's gradients alive until the cyclic GC) ---
@pytest.mark.skipif(not fused_update.available(), reason="the fused update needs numba")
@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_training_step_leaves_no_garbage_cycles(jitted, optimizer):
    """An embedding gradient large enough (>= 2**18 elements) for the optimizer to read it in
    place: each step's new array made the kept recording stale, and the dropped recording
    kept that array (and its page-faulted memory) alive until ``gc`` ran."""
    np.random.seed(0)
    embedding = nn.Embedding(2100, 128)
    head = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 50))
    params = [*embedding.parameters(), *head.parameters()]
    opt = (ndl.optim.SGD(params, lr=0.1) if optimizer == "sgd"
           else ndl.optim.Adam(params, lr=1e-3))
    loss_fn = nn.SoftmaxLoss()

    def step(ids: ndl.Tensor, y: ndl.Tensor) -> ndl.Tensor:
        return opt.minimize(loss_fn(head(ops.reshape(embedding(ids), (-1, 128))), y))

    run = ndl.jit(step) if jitted else step
    rng = np.random.default_rng(0)
    ids = ndl.Tensor(rng.integers(0, 2100, (8, 16)), requires_grad=False)
    y = ndl.Tensor(rng.integers(0, 50, 128), requires_grad=False)
    for _ in range(3):
        run(ids, y)
    gc.collect()
    gc.disable()
    try:
        run(ids, y)
        run(ids, y)
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert unreachable == 0
