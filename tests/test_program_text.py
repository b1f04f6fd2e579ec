"""The printable IR: a Program as jaxpr-style text, from ndl.jit(f).lower(...) and sess.plan."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.static as st
from needle import ops
from needle.jit import JitError


def test_lower_prints_one_line_per_step_with_types_attributes_and_inputs():
    w = ndl.Tensor(np.ones((3, 4), np.float32), requires_grad=False)

    def f(x):
        return ops.summation(ops.relu(x @ w), axes=(1,))

    text = str(ndl.jit(f).lower(ndl.Tensor(np.ones((2, 3), np.float32))))
    assert text == (
        "{ lambda s1:f32[3,4] ; arg0:f32[2,3] . let\n"
        "    a:f32[2,4] = matmul arg0 s1\n"
        "    b:f32[2,4] = relu a\n"
        "    c:f32[2] = summation[axes=(1), keepdims=False] b\n"
        "  in (c) }")


def test_lower_does_not_run_the_function_and_reuses_the_plan():
    calls = []

    def f(x):
        calls.append(1)
        return x * 2.0

    jitted = ndl.jit(f)
    x = ndl.Tensor(np.ones(3, np.float32))
    program = jitted.lower(x)
    assert "mul_scalar[scalar=2.0] arg0" in str(program)
    jitted(x)
    assert len(calls) == 1 and jitted.explain().traces == 1


def test_lower_of_a_function_that_needs_values_says_it_has_no_program():
    f = ndl.jit(lambda x: x * 2.0 if float(x.sum()) > 0 else x)
    with pytest.raises(JitError, match="no program"):
        f.lower(ndl.Tensor(np.ones(3, np.float32)))


def test_session_plan_prints_the_program_with_unknown_dims_and_folded_constants():
    with st.Graph():
        x = st.placeholder((None, 3), name="x")
        y = ops.summation(x * 2.0 + st.constant(np.ones(3, np.float32)), axes=(1,))
        plan = st.Session().plan(y, {x: np.ones((5, 3), np.float32)})
    text = str(plan)
    assert "{ lambda c0:f32[3] ; x:f32[?,3] . let" in text
    assert "a:f32[?,3] = mul_scalar[scalar=2.0] x" in text
    assert "b:f32[?,3] = add a c0" in text
    assert "in (c) }" in text
    assert plan.program is not None and len(plan.program.steps) == 3


def test_many_steps_get_two_letter_names():
    def f(x):
        for _ in range(30):
            x = ops.exp(x)
        return x

    lines = str(ndl.jit(f, optimize=False).lower(ndl.Tensor(np.ones(2, np.float32))))
    lines = lines.splitlines()
    assert lines[27].startswith("    ba:f32[2] = exp z")
    assert lines[-1] == "  in (bd) }"
