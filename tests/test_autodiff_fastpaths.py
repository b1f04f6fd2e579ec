"""The eager fast paths of the autodiff engine compute what the general code does.

``_grad_topo_sort`` (the reverse sweep's DFS) must give ``find_topo_sort``'s order exactly:
the order decides in which order a node's adjoint contributions are added, so any other
order changes gradients in the last bits. ``full_like`` (every backward's seed) must give
``np.full_like``'s array. ``Tensor.backward`` sets the thread's grad mode for the sweep and
puts it back, also when the sweep raises.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest

import needle as ndl
from needle.core import autodiff
from needle.core.registry import get_op


class _Node:
    """A stand-in graph node: all the topological sort reads."""

    __slots__ = ("inputs", "requires_grad")

    def __init__(self, inputs: tuple, requires_grad: bool) -> None:
        self.inputs = inputs
        self.requires_grad = requires_grad


def _random_graph(rng: random.Random) -> list:
    nodes: list = []
    for _ in range(rng.randint(1, 50)):
        # leaves, unary, binary, ternary and wider nodes; repeated inputs (x * x) included
        n_inputs = rng.choice([0, 0, 1, 1, 2, 2, 2, 3, 4]) if nodes else 0
        inputs = tuple(rng.choice(nodes) for _ in range(n_inputs))
        requires_grad = (any(x.requires_grad for x in inputs) if inputs
                         else rng.random() < 0.7)
        if rng.random() < 0.05:  # made under no_grad
            requires_grad = False
        nodes.append(_Node(inputs, requires_grad))
    return [rng.choice(nodes) for _ in range(rng.randint(1, 3))]


def test_grad_topo_sort_is_find_topo_sort_order_on_random_graphs():
    rng = random.Random(0)
    for _ in range(2000):
        outputs = _random_graph(rng)
        assert autodiff._grad_topo_sort(outputs) == autodiff.find_topo_sort(
            outputs, requires_grad_only=True)


def test_grad_topo_sort_on_a_diamond_visits_inputs_in_argument_order():
    x = _Node((), True)
    c = _Node((), False)
    a = _Node((x, c), True)
    b = _Node((x,), True)
    d = _Node((a, b, b), True)  # a first: x is reached through a; b once
    assert autodiff._grad_topo_sort([d]) == [x, a, b, d]


def test_gradients_of_a_many_times_used_leaf_are_bitwise_those_of_the_general_sweep():
    # a leaf used by many consumers: its adjoint is a sum of many float32 terms, whose value
    # depends on the order they are added in; stop_at_wrt takes find_topo_sort's path
    rng = np.random.default_rng(0)
    x = ndl.Tensor(rng.standard_normal((4, 5)).astype(np.float32))
    w = ndl.Tensor(rng.standard_normal((4, 5)).astype(np.float32))
    terms = []
    y = x
    for i in range(12):
        y = ndl.ops.relu(y * w + x * float(i + 1)) if i % 3 else (y + x) * w
        terms.append((y * x).sum() if i % 2 else (y / 3.0).sum())
    loss = terms[0]
    for t in terms[1:]:
        loss = loss + t
    fast = autodiff.gradients([loss], [x, w])
    general = autodiff.gradients([loss], [x, w], stop_at_wrt=True)
    for f, g in zip(fast, general):
        assert f.numpy().tobytes() == g.numpy().tobytes()


_LAYOUTS = [
    np.ones((3, 4), np.float32),
    np.ones((4, 3), np.float64).T,  # Fortran order
    np.ones((2, 3, 4), np.int64)[:, ::2],  # strided
    np.ones((), np.float16),
    np.zeros((0, 3), np.int32),
    np.ones(5, bool),
]


@pytest.mark.parametrize("dtype", [None, "float32", "int64", "bool", "int8"])
def test_full_like_is_numpy_full_like(dtype):
    for a in _LAYOUTS:
        for value in (0, 1, -1, 2.7, -0.0, True, 1e10):  # 1e10: too big for int8 / int32
            op = get_op("full_like").cls(value, dtype)
            with warnings.catch_warnings(record=True) as got_warnings:
                warnings.simplefilter("always")
                got = op.compute(a)
            with warnings.catch_warnings(record=True) as want_warnings:
                warnings.simplefilter("always")
                want = np.full_like(a, op.fill_value, dtype=op.dtype)
            assert (got.dtype, got.shape, got.strides) == (want.dtype, want.shape, want.strides)
            assert got.tobytes() == want.tobytes(), (a.dtype, value, dtype)
            assert len(got_warnings) == len(want_warnings)


def test_backward_under_no_grad_records_no_graph_and_keeps_the_mode():
    x = ndl.Tensor([1.0, 2.0, 3.0])
    y = (x * x).sum()
    with ndl.no_grad():
        y.backward()  # create_graph=True, but grad mode is off here
        assert not ndl.is_grad_enabled()
    assert ndl.is_grad_enabled()
    assert x.grad.op is None and not x.grad.requires_grad
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0, 6.0])


def test_backward_restores_grad_mode_when_a_gradient_raises(monkeypatch):
    x = ndl.Tensor([1.0, 2.0])
    y = ndl.ops.exp(x).sum()
    seen = []

    def failing_gradient(self, out_grad, node):
        seen.append(ndl.is_grad_enabled())
        raise RuntimeError("gradient failed")

    monkeypatch.setattr(type(y.inputs[0].op), "gradient", failing_gradient)
    with pytest.raises(RuntimeError, match="gradient failed"):
        y.backward(create_graph=False)
    assert seen == [False]  # the sweep ran without recording
    assert ndl.is_grad_enabled()
    with ndl.no_grad(), pytest.raises(RuntimeError, match="gradient failed"):
        y.backward()
    assert ndl.is_grad_enabled()
