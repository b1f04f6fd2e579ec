"""Every op of the op table under ndl.jit: values and gradients equal to eager mode's.

Compiled plans call ufuncs directly, write into dead buffers and inline ops' NumPy
expressions (``op.emit``): each of those paths is exercised here, op by op. Rows with
``supports_jit=False`` are left out (the row says why).
"""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl

from .helpers import leaves
from .op_table import params, samples

CASES = [(case, sample) for case, sample in samples() if case.supports_jit]


@pytest.mark.parametrize(("case", "sample"), params("jit", CASES))
def test_op_under_jit_matches_eager(case, sample):
    rng = np.random.default_rng(4)
    arrays = sample.make(rng)
    eager_inputs = leaves(arrays)
    case.reseed()
    eager_out = case.call(sample, *eager_inputs)
    weights = rng.standard_normal(eager_out.shape).astype(eager_out.dtype)
    seed = ndl.Tensor(weights, requires_grad=False)

    def step(*xs):
        out = case.call(sample, *xs)
        # (out * weights).sum() differentiates like backward(weights), inside the trace
        loss = (out * seed).sum() if case.differentiable else out
        return out, loss

    compiled = ndl.jit(step)
    jit_inputs = leaves(arrays)
    for _ in range(2):  # the trace, then a replay of the compiled plan
        case.reseed()
        out, loss = compiled(*jit_inputs)
        np.testing.assert_allclose(out.numpy(), eager_out.numpy(), rtol=1e-6, atol=1e-7)
    if not case.differentiable:
        return
    loss.backward()
    eager_out.backward(seed)
    for x, e in zip(jit_inputs, eager_inputs):
        if not e.requires_grad:  # integer inputs
            continue
        assert e.grad is not None and x.grad is not None
        assert x.grad.shape == e.grad.shape and x.grad.dtype == e.grad.dtype
        np.testing.assert_allclose(x.grad.numpy(), e.grad.numpy(), rtol=1e-5, atol=1e-6)
