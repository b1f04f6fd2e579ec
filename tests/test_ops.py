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
    # ops registered by user code (ndl.register_op, as tests of it do) are theirs to test
    builtin = {name for name, record in REGISTRY.items()
               if record.cls.__module__.startswith("needle.") and not record.internal}
    assert {case.op for case in OP_TABLE} == builtin


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


# -- large partial sums take np.einsum (see kernels/reduce.py, einsum_sum_spec) -----------------
@pytest.mark.parametrize("shape, axes", [
    ((64, 8, 16, 16), (0, 2, 3)),   # BatchNorm2d statistics over an NCHW array
    ((16, 16, 16, 8), (0, 1, 2)),   # the same over NHWC (channels innermost)
    ((300, 100), (0,)),             # a bias gradient
    ((8, 40, 60), (1,)),
    ((40000,), (0,)),               # a full reduction stays np.add.reduce
])
@pytest.mark.parametrize("keepdims", [False, True])
def test_large_sums_and_means_match_float64_eager_and_jit(shape, axes, keepdims):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = x.astype(np.float64).sum(axis=axes, keepdims=keepdims)
    count = int(np.prod([shape[i] for i in axes]))
    for fn, expected in [(lambda t: ndl.ops.summation(t, axes=axes, keepdims=keepdims), want),
                         (lambda t: ndl.ops.mean(t, axes=axes, keepdims=keepdims),
                          want / count)]:
        for run in (fn, ndl.jit(fn)):
            got = run(ndl.Tensor(x)).numpy()
            assert got.dtype == np.float32 and got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=2e-5,
                                       atol=2e-5 * np.abs(expected).max())


def test_large_broadcast_gradient_sums_back_eager_and_jit():
    """sum_to (the gradient of a broadcast bias) over a large NCHW array, eager and jit."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 16, 8, 8)).astype(np.float32)
    bias = rng.standard_normal((1, 16, 1, 1)).astype(np.float32)
    weights = rng.standard_normal(x.shape).astype(np.float32)

    def grad_of_bias(xt, bt):
        ((xt + bt) * ndl.Tensor(weights)).sum().backward()
        return bt.grad

    want = weights.astype(np.float64).sum(axis=(0, 2, 3), keepdims=True)
    for run in (grad_of_bias, ndl.jit(grad_of_bias)):
        got = run(ndl.Tensor(x), ndl.Tensor(bias, requires_grad=True)).numpy()
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-4)
