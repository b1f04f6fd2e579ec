"""The reverse sweep's own topological sort visits nodes in ``find_topo_sort``'s order.

The order decides in which order adjoints are summed, so any other order could change
gradients in the last bit; the sweep's faster sort must give exactly the same list.
"""

from __future__ import annotations

import numpy as np

import needle as ndl
from needle.core.autodiff import _grad_topo_sort, find_topo_sort


def _random_graph(seed: int) -> ndl.Tensor:
    """A DAG with shared sub-expressions, constants that need no gradient and unary ops."""
    rng = np.random.default_rng(seed)
    leaves = [ndl.Tensor(rng.standard_normal((3, 4)).astype(np.float32),
                         requires_grad=bool(i % 3)) for i in range(5)]
    nodes = list(leaves)
    for _ in range(40):
        a, b = (nodes[int(i)] for i in rng.integers(0, len(nodes), 2))
        kind = int(rng.integers(0, 4))
        nodes.append(a + b if kind == 0 else a * b if kind == 1 else ndl.ops.relu(a)
                     if kind == 2 else (a - b).sum(axes=(0,)).reshape((1, 4)) + b)
    out = nodes[-1]
    for extra in nodes[-6:-1]:  # several consumers of late nodes
        out = out + extra
    return out.sum()


def test_grad_topo_sort_matches_find_topo_sort():
    for seed in range(6):
        out = _random_graph(seed)
        expected = find_topo_sort([out], requires_grad_only=True)
        got = _grad_topo_sort([out])
        assert len(got) == len(expected)
        assert all(a is b for a, b in zip(got, expected))


def test_several_outputs_share_one_order():
    a = _random_graph(7)
    b = _random_graph(8)
    c = a * 2.0
    expected = find_topo_sort([a, c, b, a], requires_grad_only=True)
    got = _grad_topo_sort([a, c, b, a])
    assert [id(n) for n in got] == [id(n) for n in expected]
