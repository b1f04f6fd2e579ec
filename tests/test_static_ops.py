"""Every op of the op table in a declared graph: lazy nodes, static shapes, Session values and
symbolic gradients equal to eager mode's (bitwise: the same ops run in the same order)."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.static as st

from .helpers import leaves
from .op_table import all_cases

CASES = all_cases()
IDS = [f"{case.op}-{i}" for i, (case, *_rest) in enumerate(CASES)]


@pytest.mark.parametrize(("case", "fn", "ref", "sample"), CASES, ids=IDS)
def test_op_in_graph_matches_eager(case, fn, ref, sample):
    rng = np.random.default_rng(3)
    arrays = sample(rng)
    eager_inputs = leaves(arrays)
    eager_out = fn(*eager_inputs)
    with st.Graph():
        xs = [st.placeholder(a.shape, dtype=a.dtype, name=f"in{i}") for i, a in enumerate(arrays)]
        out = fn(*xs)
        # a node, not a value, with the static shape and dtype eager mode computes
        assert out._data is None
        assert out.shape == eager_out.shape
        assert out.dtype == eager_out.dtype
        feeds = dict(zip(xs, arrays))
        if case.op == "bernoulli_like":
            np.random.seed(5)  # the mask is drawn when the graph runs
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
