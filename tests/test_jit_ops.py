"""Every op of the op table under ndl.jit: values and gradients equal to eager mode's.

Compiled plans call ufuncs directly, write into dead buffers and inline ops' NumPy
expressions (``op.emit``): each of those paths is exercised here, op by op.
"""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl

from .helpers import leaves
from .op_table import all_cases

# store's rows make their target inside the function: a trace keeps the one it made, so
# replays blend into it (the JIT's documented capture of tensors made while tracing)
CASES = [c for c in all_cases() if c[0].op != "store"]
IDS = [f"{case.op}-{i}" for i, (case, *_rest) in enumerate(CASES)]


@pytest.mark.parametrize(("case", "fn", "ref", "sample"), CASES, ids=IDS)
def test_op_under_jit_matches_eager(case, fn, ref, sample):
    rng = np.random.default_rng(4)
    arrays = sample(rng)
    eager_inputs = leaves(arrays)
    np.random.seed(5)
    eager_out = fn(*eager_inputs)
    weights = rng.standard_normal(eager_out.shape).astype(eager_out.dtype)
    seed = ndl.Tensor(weights, requires_grad=False)

    def step(*xs):
        out = fn(*xs)
        # (out * weights).sum() differentiates like backward(weights), inside the trace
        loss = (out * seed).sum() if case.differentiable else out
        return out, loss

    compiled = ndl.jit(step)
    jit_inputs = leaves(arrays)
    for _ in range(2):  # the trace, then a replay of the compiled plan
        np.random.seed(5)
        out, loss = compiled(*jit_inputs)
        np.testing.assert_allclose(out.numpy(), eager_out.numpy(), rtol=1e-6, atol=1e-7)
    if not case.differentiable:
        return
    loss.backward()
    eager_out.backward(seed)
    for x, e in zip(jit_inputs, eager_inputs):
        if e.grad is None:
            continue
        assert x.grad.shape == e.grad.shape and x.grad.dtype == e.grad.dtype
        np.testing.assert_allclose(x.grad.numpy(), e.grad.numpy(), rtol=1e-5, atol=1e-6)
