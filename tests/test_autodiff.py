"""Reverse mode: topological order, accumulation, un-broadcasting, higher order, memory."""

from __future__ import annotations

import gc
import resource
import sys

import numpy as np
import pytest
import torch

import needle as ndl
from needle import ops
from needle.autograd import find_topo_sort

from .helpers import to_torch


def test_find_topo_sort_is_post_order_with_inputs_in_argument_order():
    a = ndl.Tensor([1.0])
    b = ndl.Tensor([2.0])
    c = a * b
    d = c + a
    e = d * c
    assert find_topo_sort([e]) == [a, b, c, d, e]


def test_find_topo_sort_handles_graphs_deeper_than_the_recursion_limit():
    x = ndl.Tensor(np.ones(3, dtype=np.float32))
    y = x
    for _ in range(sys.getrecursionlimit() + 500):
        y = y + 1.0
    assert len(find_topo_sort([y])) == sys.getrecursionlimit() + 501
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.ones(3))


def test_adjoints_accumulate_for_a_node_used_many_times():
    x = ndl.Tensor([1.5, -2.0])
    y = x * x * x + x * 2.0 + x
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 3 * x.numpy() ** 2 + 3, rtol=1e-6)


@pytest.mark.parametrize(("sa", "sb"), [((3, 1), (1, 4)), ((2, 3, 4), (4,)), ((), (2, 3)),
                                        ((5, 1, 3), (2, 1))])
def test_broadcast_gradients_are_summed_back_to_input_shapes(sa, sb):
    rng = np.random.default_rng(0)
    a_np, b_np = rng.standard_normal(sa), rng.standard_normal(sb)
    a, b = ndl.Tensor(a_np), ndl.Tensor(b_np)
    (a * b + a).sum().backward()
    ta, tb = to_torch(a_np), to_torch(b_np)
    (ta * tb + ta).sum().backward()
    assert a.grad.shape == sa and b.grad.shape == sb
    np.testing.assert_allclose(a.grad.numpy(), ta.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(b.grad.numpy(), tb.grad.numpy(), rtol=1e-10)


def test_backward_without_argument_seeds_ones_also_for_non_scalar_outputs():
    x = ndl.Tensor([[1.0, 2.0], [3.0, 4.0]])
    (x * 3.0).backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.full((2, 2), 3.0))


def test_backward_sets_grad_rather_than_accumulating_across_calls():
    x = ndl.Tensor([2.0])
    (x * 3.0).backward()
    (x * 5.0).backward()
    np.testing.assert_array_equal(x.grad.numpy(), [5.0])


def test_intermediate_grad_kept_only_when_retained():
    x = ndl.Tensor([2.0])
    h = x * 3.0
    h.retain_grad()
    k = x * 4.0
    (h * k).backward()
    np.testing.assert_allclose(h.grad.numpy(), [8.0])
    assert k.grad is None


SECOND_ORDER = [
    ("exp", ops.exp, torch.exp, [(3, 4)]),
    ("tanh", ops.tanh, torch.tanh, [(3, 4)]),
    ("sigmoid", ops.sigmoid, torch.sigmoid, [(3, 4)]),
    ("mul", lambda a, b: a * b * a, lambda a, b: a * b * a, [(3, 4), (3, 4)]),
    ("matmul", lambda a, b: (a @ b) * (a @ b), lambda a, b: (a @ b) * (a @ b), [(3, 4), (4, 3)]),
    ("logsumexp", lambda a: ops.logsumexp(a, axes=(1,)), lambda a: a.logsumexp(1), [(3, 4)]),
]


@pytest.mark.parametrize(("name", "fn", "ref", "shapes"), SECOND_ORDER,
                         ids=[s[0] for s in SECOND_ORDER])
def test_second_order_gradients_match_torch(name, fn, ref, shapes):
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(s) for s in shapes]
    weights = rng.standard_normal
    xs = [ndl.Tensor(a) for a in arrays]
    ts = [to_torch(a) for a in arrays]
    out = fn(*xs)
    w = weights(out.shape)
    out.backward(ndl.Tensor(w, requires_grad=False))
    first = [x.grad for x in xs]
    v = [weights(s) for s in shapes]
    total = sum(((g * ndl.Tensor(vi, requires_grad=False)).sum() for g, vi in zip(first, v)),
                start=ndl.Tensor(0.0, dtype="float64", requires_grad=False))
    total.backward()

    t_first = torch.autograd.grad(ref(*ts), ts, torch.tensor(w), create_graph=True)
    t_total = sum((g * torch.tensor(vi)).sum() for g, vi in zip(t_first, v))
    t_second = torch.autograd.grad(t_total, ts)
    for x, g2 in zip(xs, t_second):
        np.testing.assert_allclose(x.grad.numpy(), g2.numpy(), rtol=1e-8, atol=1e-10)


def test_gradient_of_gradient_via_grad_backward():
    x = ndl.Tensor([0.3, -1.2], dtype="float64")
    (x ** 3).sum().backward()
    g = x.grad  # 3 x^2, itself differentiable
    g.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 6 * np.array([0.3, -1.2]))


def test_create_graph_false_records_nothing_for_gradients():
    x = ndl.Tensor([1.0, 2.0])
    (x * x).sum().backward(create_graph=False)
    assert not x.grad.requires_grad and x.grad.op is None


def test_no_grad_records_no_graph():
    x = ndl.Tensor([1.0, 2.0])
    with ndl.no_grad():
        y = ops.exp(x) * 2.0
    assert not y.requires_grad and y.op is None and y.inputs == ()
    with pytest.raises(RuntimeError, match="does not require a gradient"):
        y.backward()


def test_gradient_dtype_follows_input_dtype():
    x32 = ndl.Tensor(np.ones(3, dtype=np.float32))
    x64 = ndl.Tensor(np.ones(3, dtype=np.float64))
    (x32 * x64).sum().backward()
    assert x32.grad.dtype == np.float32 and x64.grad.dtype == np.float64


def _train_steps(n: int, w: ndl.Tensor, b: ndl.Tensor, x: ndl.Tensor, y: ndl.Tensor) -> None:
    for _ in range(n):
        logits = ops.relu(x @ w) @ b
        loss = ops.summation(ops.logsumexp(logits, axes=(1,))) / 32.0 - (logits * y).sum() / 32.0
        w.grad = b.grad = None
        loss.backward()
        w.data = w.data - w.grad.data * 0.01
        b.data = b.data - b.grad.data * 0.01


def test_memory_stays_flat_over_1000_training_iterations():
    rng = np.random.default_rng(0)
    x = ndl.Tensor(rng.standard_normal((32, 20)).astype(np.float32), requires_grad=False)
    y = ndl.Tensor(np.eye(5, dtype=np.float32)[rng.integers(0, 5, 32)], requires_grad=False)
    w = ndl.Tensor(rng.standard_normal((20, 16)).astype(np.float32) * 0.1)
    b = ndl.Tensor(rng.standard_normal((16, 5)).astype(np.float32) * 0.1)
    _train_steps(20, w, b, x, y)
    gc.collect()
    tensors_before = ndl.autograd.TENSOR_COUNTER
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _train_steps(1000, w, b, x, y)
    gc.collect()
    assert ndl.autograd.TENSOR_COUNTER == tensors_before
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 8 * 1024, f"peak RSS grew by {grown_kib} KiB over 1000 iterations"


def test_graph_is_freed_by_reference_counting_alone():
    gc.collect()
    before = ndl.autograd.TENSOR_COUNTER
    gc.disable()
    try:
        x = ndl.Tensor(np.ones((4, 4), dtype=np.float32))
        w = ndl.Tensor(np.ones((4, 4), dtype=np.float32))
        loss = ops.tanh(x @ w).sum()
        loss.backward(create_graph=False)
        del x, w, loss
        assert ndl.autograd.TENSOR_COUNTER == before
    finally:
        gc.enable()


def test_a_float32_training_step_never_promotes_to_float64():
    import needle.core.registry as registry
    import needle.nn as nn
    from needle.apps.models import MLPResNet

    seen = []
    make = registry._NODE_FACTORY[0]

    def recording(op, inputs):
        node = make(op, inputs)
        if not op.returns_tuple:
            seen.append((op.name, node.dtype))
        return node

    np.random.seed(0)
    model = MLPResNet(64, hidden=16, num_blocks=1)
    opt = ndl.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)
    x = ndl.Tensor(np.random.rand(8, 64).astype(np.float32), requires_grad=False)
    y = ndl.Tensor(np.random.randint(0, 10, 8))
    registry._NODE_FACTORY[0] = recording
    try:
        opt.minimize(nn.SoftmaxLoss()(model(x), y))
    finally:
        registry._NODE_FACTORY[0] = make
    promoted = sorted({name for name, dtype in seen if dtype == np.float64})
    assert seen and not promoted, f"ops that produced float64: {promoted}"
    assert all(p.dtype == np.float32 and p.grad.dtype == np.float32 for p in model.parameters())


def test_tensors_freed_at_interpreter_shutdown_print_nothing(monkeypatch):
    """At shutdown module globals are set to None before the last Tensors die; freeing one
    must not print 'Exception ignored in Value.__del__' (seen with Tensors kept in globals,
    when a __del__ kept the counter): freeing a node runs no Python code now."""
    import sys

    raised = []
    monkeypatch.setattr(sys, "unraisablehook", raised.append)
    t = ndl.Tensor(np.ones(3, np.float32))
    monkeypatch.setattr(ndl.autograd, "Value", None)  # (as at shutdown)
    del t
    assert raised == []


def test_tensor_counter_counts_nodes_when_read():
    """TENSOR_COUNTER is counted when read (no per-node __del__): made and freed nodes, lazy
    and tuple nodes included, and it is an int."""
    gc.collect()
    before = ndl.autograd.TENSOR_COUNTER
    assert isinstance(before, int)
    x = ndl.Tensor(np.ones((2, 3), np.float32))
    parts = ops.split(x * 2.0, 0)
    first = parts[0]
    assert ndl.autograd.TENSOR_COUNTER == before + 4  # x, x * 2, the tuple, its item
    del parts
    assert ndl.autograd.TENSOR_COUNTER == before + 4  # (the item keeps its graph)
    del first
    assert ndl.autograd.TENSOR_COUNTER == before + 1
    del x
    assert ndl.autograd.TENSOR_COUNTER == before
