"""Every op of the op table in a declared graph: lazy nodes, static shapes, Session values and
symbolic gradients equal to eager mode's (bitwise: the same ops run in the same order)."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.static as st

from .helpers import leaves
from .op_table import params


@pytest.mark.parametrize(("case", "sample"), params("session"))
def test_op_in_graph_matches_eager(case, sample):
    rng = np.random.default_rng(3)
    arrays = sample.make(rng)
    eager_inputs = leaves(arrays)
    case.reseed()
    eager_out = case.call(sample, *eager_inputs)
    with st.Graph():
        xs = [st.placeholder(a.shape, dtype=a.dtype, name=f"in{i}") for i, a in enumerate(arrays)]
        out = case.call(sample, *xs)
        # a node, not a value, with the static shape and dtype eager mode computes
        assert out._data is None
        assert out.shape == eager_out.shape
        assert out.dtype == eager_out.dtype
        feeds = dict(zip(xs, arrays))
        case.reseed()  # a random op draws when the graph runs
        value = st.Session().run(out, feed_dict=feeds)
        np.testing.assert_array_equal(value, eager_out.numpy())
        if not case.differentiable:
            return
        weights = rng.standard_normal(eager_out.shape).astype(eager_out.dtype)
        grads = st.gradients(out, xs, grad_ys=[st.constant(weights)])
        values = st.Session().run(grads, feed_dict=feeds)
    eager_out.backward(ndl.Tensor(weights, requires_grad=False))
    for x, g in zip(eager_inputs, values):
        assert g.shape == x.shape and g.dtype == x.dtype
        np.testing.assert_array_equal(g, x.grad.numpy())


def test_indexing_a_placeholder_with_several_unknown_dims_keeps_them_unknown():
    # two unknown dims once stood in as 2**40 each, whose product NumPy refused
    import needle.static as st
    from needle import ops

    with st.Graph():
        x = st.placeholder((None, None, 5))
        assert ops.getitem(x, (slice(None), slice(0, 2))).shape == (None, 2, 5)
        assert ops.getitem(x, (0,)).shape == (None, 5)
        out = st.Session().run(ops.getitem(x, (slice(None), slice(0, 2))),
                               {x: np.arange(30, dtype=np.float32).reshape(2, 3, 5)})
    np.testing.assert_array_equal(out, np.arange(30, dtype=np.float32).reshape(2, 3, 5)[:, :2])
