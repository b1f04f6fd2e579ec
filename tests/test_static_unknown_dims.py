"""Gradients through shape ops of a declared graph whose placeholders have unknown dims."""

import numpy as np
import pytest
import torch

import needle.static as st
from needle import ops
from needle.core.registry import ShapeError


def test_reshape_gradient_with_an_unknown_middle_dim_matches_torch():
    # the reshape's gradient once copied the output gradient's dim into the unknown one
    # (a (6, 7, 7) gradient for a (6, 4, 7) input): an error at run time
    rng = np.random.default_rng(0)
    xv = rng.standard_normal((6, 4, 7)).astype(np.float32)
    wv = rng.standard_normal((7, 3)).astype(np.float32)
    with st.Graph():
        x = st.placeholder((6, None, 7), name="x")
        w = st.Variable(wv, name="w")
        y = ops.reshape(x, (-1, 7)) @ w
        grad = st.gradients(ops.summation(y * y), [x])[0]
        with st.Session() as sess:
            got = sess.run(grad, {x: xv})
    xt = torch.tensor(xv, requires_grad=True)
    ((xt.reshape(-1, 7) @ torch.tensor(wv)) ** 2).sum().backward()
    np.testing.assert_allclose(got, xt.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_reshape_gradient_with_two_unknown_dims_is_refused_with_one_line():
    with st.Graph():
        x = st.placeholder((None, None, 7), name="x")
        y = ops.reshape(x, (-1, 7))
        with pytest.raises(ShapeError, match="more than one unknown dim"):
            st.gradients(ops.summation(y), [x])
