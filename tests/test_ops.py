"""Every op of the registry against torch (forward, gradient) and finite differences; the
op table's structure (sample kinds hold, ids unique, every differentiable op checked)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needle as ndl
from needle.core.registry import REGISTRY

from .helpers import check_gradient_fd, leaves, to_torch
from .op_table import CHECKS, OP_TABLE, Kind, params, sample_id, samples

CASES = samples()
IDS = [sample_id(case, sample) for case, sample in CASES]
DIFFERENTIABLE = [(c, s) for c, s in CASES if c.differentiable]


def test_every_registered_op_has_a_table_row():
    # ops registered by user code (ndl.register_op, as tests of it do) are theirs to test
    builtin = {name for name, record in REGISTRY.items()
               if record.cls.__module__.startswith("needle.") and not record.internal}
    assert {case.op for case in OP_TABLE} == builtin


def test_table_rows_and_samples_are_well_formed():
    assert len(set(IDS)) == len(IDS), "a (row, sample) id is repeated"
    assert len({case.name for case in OP_TABLE}) == len(OP_TABLE), "a row name is repeated"
    for case in OP_TABLE:
        assert case.samples, case
        # flags that only mean something for differentiable ops
        if not case.differentiable:
            assert case.second_order_ref is None, case
        assert set(case.xfails) <= set(CHECKS), case
        case.sample_for_second_order()  # names an existing sample (StopIteration otherwise)


def _has(arrays, predicate) -> bool:
    return any(predicate(a) for a in arrays)


KIND_HOLDS = {
    Kind.BASIC: lambda arrays, sample: True,
    Kind.ATTRS: lambda arrays, sample: bool(sample.args or sample.kwargs),
    Kind.BROADCAST: lambda arrays, sample: len({a.shape for a in arrays}) > 1,
    Kind.SIZE_ONE: lambda arrays, sample: _has(arrays, lambda a: 1 in a.shape),
    Kind.SCALAR: lambda arrays, sample: _has(arrays, lambda a: a.ndim == 0),
    Kind.BATCHED: lambda arrays, sample: _has(arrays, lambda a: a.ndim >= 3),
    Kind.VECTOR: lambda arrays, sample: _has(arrays, lambda a: a.ndim == 1),
    Kind.LAYOUT: lambda arrays, sample: sample.kwargs.get("nchw") is True,
}


@pytest.mark.parametrize(("case", "sample"), CASES, ids=IDS)
def test_sample_is_of_its_kind(case, sample):
    arrays = sample.make(np.random.default_rng(0))
    assert arrays and all(isinstance(a, np.ndarray) for a in arrays)
    assert KIND_HOLDS[sample.kind](arrays, sample), f"{sample.name} is not {sample.kind}"


def test_the_table_covers_every_sample_kind():
    assert {sample.kind for _case, sample in CASES} == set(Kind)


@pytest.mark.parametrize(("case", "sample"), params("forward"))
def test_forward_matches_torch(case, sample):
    arrays = sample.make(np.random.default_rng(0))
    case.reseed()
    out = case.call(sample, *leaves(arrays))
    case.reseed()
    expected = case.call_ref(sample, *[to_torch(a, requires_grad=False) for a in arrays])
    assert out.shape == tuple(expected.shape)
    assert out.dtype == expected.detach().numpy().dtype
    np.testing.assert_allclose(out.numpy(), expected.detach().numpy(), rtol=case.rtol,
                               atol=case.atol)


@pytest.mark.parametrize(("case", "sample"), params("gradient_torch"))
def test_gradient_matches_torch(case, sample):
    rng = np.random.default_rng(1)
    arrays = sample.make(rng)
    inputs = leaves(arrays)
    case.reseed()
    out = case.call(sample, *inputs)
    if not case.differentiable:
        assert not out.requires_grad
        return
    weights = rng.standard_normal(out.shape).astype(out.dtype)
    out.backward(ndl.Tensor(weights, requires_grad=False))
    t_inputs = [to_torch(a) for a in arrays]
    case.call_ref(sample, *t_inputs).backward(torch.tensor(weights))
    for x, t in zip(inputs, t_inputs):
        assert x.grad is not None
        assert x.grad.shape == x.shape
        assert x.grad.dtype == x.dtype
        np.testing.assert_allclose(x.grad.numpy(), t.grad.numpy(), rtol=case.rtol * 10,
                                   atol=case.atol * 10)


@pytest.mark.parametrize(("case", "sample"), params("gradient_fd", DIFFERENTIABLE))
def test_gradient_matches_finite_differences(case, sample):
    rng = np.random.default_rng(2)
    check_gradient_fd(lambda *xs: case.call(sample, *xs), sample.make(rng), rng,
                      rtol=case.fd_rtol)


@pytest.mark.parametrize(("case", "sample"), params("gradient_without_graph", DIFFERENTIABLE))
def test_gradient_without_create_graph_equals_the_recorded_one(case, sample):
    """backward(create_graph=False) records nothing for the gradients and gives the values
    backward() gives (the same ops in the same order: bitwise)."""
    rng = np.random.default_rng(6)
    arrays = sample.make(rng)
    recorded, plain = leaves(arrays), leaves(arrays)
    out = case.call(sample, *recorded)
    weights = ndl.Tensor(rng.standard_normal(out.shape).astype(out.dtype), requires_grad=False)
    out.backward(weights)
    case.call(sample, *plain).backward(weights, create_graph=False)
    for r, p in zip(recorded, plain):
        assert p.grad is not None, "no gradient without create_graph"
        assert not p.grad.requires_grad and p.grad.op is None
        np.testing.assert_array_equal(p.grad.numpy(), r.grad.numpy())


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
