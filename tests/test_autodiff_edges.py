"""The reverse sweep's unrolled edge handling gives what the general sweep gives, bit for bit.

``reverse_mode`` handles the last edge of one- and two-input nodes inline (the hot loop) and
the others through ``_add_edge``. Here a transcription of the general sweep (every node's
adjoints from ``Op.gradient_as_tuple``, summed in ``find_topo_sort``'s order) runs beside
``Tensor.backward`` on random graphs with shared nodes, repeated inputs (``x * x``),
constants that need no gradient, broadcasting, mixed dtypes and three-input ops: the
gradients must have the same bits and, with ``create_graph``, the same graph.
"""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
from needle.core.autodiff import find_topo_sort


def _reference_grads(out: ndl.Tensor, leaves: list) -> list:
    """Each leaf's adjoint from the general sweep (the engine's rules, no fast path)."""
    adjoints: dict = {out: ndl.ops.full_like(out, 1)}
    for node in reversed(find_topo_sort([out], requires_grad_only=True)):
        grad = adjoints.pop(node, None)
        if grad is None or node.op is None:
            adjoints[node] = grad
            continue
        for inp, in_grad in zip(node.inputs, node.op.gradient_as_tuple(grad, node)):
            if in_grad is None or not inp.requires_grad:
                continue
            previous = adjoints.get(inp)
            adjoints[inp] = in_grad if previous is None else previous + in_grad
    return [adjoints.get(leaf) for leaf in leaves]


def _random_graph(seed: int) -> tuple:
    """(scalar output, leaves): a DAG mixing the cases the sweep treats differently."""
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (3, 4), (4,), (1, 4), (3, 4)]
    leaves = [ndl.Tensor(rng.uniform(-1.5, 1.5, shape).astype(np.float32),
                         requires_grad=i != 1) for i, shape in enumerate(shapes)]
    leaves.append(ndl.Tensor(rng.uniform(-1.5, 1.5, (3, 4)), requires_grad=True))  # float64
    weight = ndl.Tensor(rng.uniform(-1, 1, (4, 4)).astype(np.float32), requires_grad=True)
    leaves.append(weight)
    nodes = list(leaves[:-1])
    for _ in range(30):
        a, b = (nodes[int(i)] for i in rng.integers(0, len(nodes), 2))
        kind = int(rng.integers(0, 7))
        if kind == 0:
            node = a + b  # broadcasting when one of them is (4,) or (1, 4)
        elif kind == 1:
            node = a * b
        elif kind == 2:
            node = a * a  # one input twice
        elif kind == 3:
            node = ndl.ops.relu(a)
        elif kind == 4:
            node = ndl.ops.tanh(a) - b
        elif kind == 5:  # three inputs: x, w, b
            x = a if len(a.shape) == 2 and a.shape[0] == 3 else a + leaves[0]
            node = ndl.ops.linear(x.astype("float32"), weight, leaves[2])
        else:
            node = (a / (b * b + 1.0)).sum(axes=(0,)).reshape((1, 4)) + b
        nodes.append(node)
    out = nodes[-1]
    for extra in nodes[-5:-1]:  # three and more consumers of late nodes
        out = out + extra
    return out.sum(), leaves


def _signature(grad: ndl.Tensor) -> list:
    """The gradient's graph: (op name, positions of its inputs) in topological order."""
    order = find_topo_sort([grad])
    position = {id(n): i for i, n in enumerate(order)}
    return [(n.op.name if n.op is not None else "leaf",
             tuple(position[id(x)] for x in n.inputs)) for n in order]


@pytest.mark.parametrize("seed", range(12))
def test_backward_matches_the_general_sweep(seed):
    out, leaves = _random_graph(seed)
    expected = _reference_grads(out, leaves)
    out.backward()
    for leaf, want in zip(leaves, expected):
        if not leaf.requires_grad or want is None:
            assert leaf.grad is None
            continue
        got = leaf.grad
        assert got.shape == leaf.shape and got.dtype == leaf.dtype
        assert got.numpy().tobytes() == want.numpy().tobytes()
        assert _signature(got) == _signature(want)


def test_create_graph_false_gives_the_same_bits():
    out, leaves = _random_graph(3)
    expected = _reference_grads(out, leaves)
    out.backward(create_graph=False)
    for leaf, want in zip(leaves, expected):
        if want is not None:
            assert leaf.grad.numpy().tobytes() == want.numpy().tobytes()
            assert leaf.grad.op is None  # no graph recorded


def test_gradients_of_a_three_input_op_reach_every_input():
    x = ndl.Tensor(np.arange(6, dtype=np.float32).reshape(2, 3) / 7, requires_grad=True)
    w = ndl.Tensor(np.arange(12, dtype=np.float32).reshape(3, 4) / 11, requires_grad=True)
    b = ndl.Tensor(np.arange(4, dtype=np.float32) / 5, requires_grad=True)
    (ndl.ops.linear(x, w, b) * ndl.ops.linear(x, w, b)).sum().backward()
    y = x.numpy() @ w.numpy() + b.numpy()
    np.testing.assert_allclose(b.grad.numpy(), (2 * y).sum(axis=0), rtol=1e-6)
    np.testing.assert_allclose(w.grad.numpy(), x.numpy().T @ (2 * y), rtol=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), (2 * y) @ w.numpy().T, rtol=1e-6)
