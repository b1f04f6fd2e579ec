"""Every op of the registry against torch (forward, gradient) and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needle as ndl
from needle.core.registry import REGISTRY

from .helpers import check_gradient_fd, leaves, to_torch
from .op_table import OP_TABLE, all_cases

CASES = all_cases()
IDS = [f"{case.op}-{i}" for i, (case, *_rest) in enumerate(CASES)]


def test_every_registered_op_has_a_table_row():
    assert {case.op for case in OP_TABLE} == set(REGISTRY)


@pytest.mark.parametrize(("case", "fn", "ref", "sample"), CASES, ids=IDS)
def test_forward_matches_torch(case, fn, ref, sample):
    arrays = sample(np.random.default_rng(0))
    out = fn(*leaves(arrays))
    expected = ref(*[to_torch(a, requires_grad=False) for a in arrays])
    assert out.shape == tuple(expected.shape)
    assert out.dtype == expected.detach().numpy().dtype
    np.testing.assert_allclose(out.numpy(), expected.detach().numpy(), rtol=case.rtol,
                               atol=case.atol)


@pytest.mark.parametrize(("case", "fn", "ref", "sample"), CASES, ids=IDS)
def test_gradient_matches_torch(case, fn, ref, sample):
    rng = np.random.default_rng(1)
    arrays = sample(rng)
    inputs = leaves(arrays)
    out = fn(*inputs)
    if not case.differentiable:
        assert not out.requires_grad
        return
    weights = rng.standard_normal(out.shape).astype(out.dtype)
    out.backward(ndl.Tensor(weights, requires_grad=False))
    t_inputs = [to_torch(a) for a in arrays]
    ref(*t_inputs).backward(torch.tensor(weights))
    for x, t in zip(inputs, t_inputs):
        assert x.grad is not None
        assert x.grad.shape == x.shape
        assert x.grad.dtype == x.dtype
        np.testing.assert_allclose(x.grad.numpy(), t.grad.numpy(), rtol=case.rtol * 10,
                                   atol=case.atol * 10)


DIFFERENTIABLE = [(c, i) for c, i in zip(CASES, IDS) if c[0].differentiable]


@pytest.mark.parametrize(("case", "fn", "ref", "sample"), [c for c, _ in DIFFERENTIABLE],
                         ids=[i for _, i in DIFFERENTIABLE])
def test_gradient_matches_finite_differences(case, fn, ref, sample):
    rng = np.random.default_rng(2)
    check_gradient_fd(fn, sample(rng), rng, rtol=case.fd_rtol)
