"""Second-order gradients of every differentiable op of the op table (gradgradcheck-style).

For y = f(x) and a seed w, needle's first-order gradient g_i = d<y, w>/dx_i is itself a graph
(``backward`` records one: needle's default). The gradient of s = sum_i <g_i, v_i> (random
projections v_i) with respect to each x_i and to w is checked

- against torch's double backward (``torch.autograd.grad(..., create_graph=True)`` twice), in
  float64, with the row's ``second_order_ref`` where torch's own ``ref`` gets it wrong;
- against float64 central differences of s along a random direction in (x, w).

Linear ops get the check too: their x-part must be zero and their w-part (the derivative of
the gradient rule by its seed, J v) must match. One sample per row (``second_order_sample``),
with domains away from kinks; checks a row's ``xfails`` names are strict xfails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .helpers import check_second_order_fd, second_order_gradients
from .op_table import OP_TABLE, params

ROWS = [case for case in OP_TABLE if case.differentiable]
PAIRS = [(case, case.sample_for_second_order()) for case in ROWS]


def _float64(arrays):
    return [a.astype(np.float64) if a.dtype.kind == "f" else a for a in arrays]


def test_every_differentiable_op_has_a_second_order_check():
    differentiable = {case.op for case in OP_TABLE if case.differentiable}
    assert {case.op for case in ROWS} == differentiable


def _torch_second_order(case, sample, arrays, weights, v):
    """torch's gradients of sum_i <g_i, v_i> with respect to every x_i and the seed w."""
    inputs = [torch.tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]
    floats = [t for t in inputs if t.requires_grad]
    seed = torch.tensor(weights, requires_grad=True)
    out = case.call_ref(sample, *inputs, second_order=True)
    firsts = torch.autograd.grad(out, floats, seed, create_graph=True, allow_unused=True,
                                 materialize_grads=True)
    vs = [torch.tensor(vi) for vi in v if vi is not None]
    total = sum((g * vi).sum() for g, vi in zip(firsts, vs))
    seconds = torch.autograd.grad(total, [*floats, seed], allow_unused=True,
                                  materialize_grads=True)
    seconds = [t.detach().numpy(force=True) for t in seconds]  # force: torch's ZeroTensors
    it = iter(seconds[:-1])
    return [next(it) if a.dtype.kind == "f" else None for a in arrays], seconds[-1]


@pytest.mark.parametrize(("case", "sample"), params("second_order_torch", PAIRS))
def test_second_order_matches_torch(case, sample):
    rng = np.random.default_rng(11)
    arrays = _float64(sample.make(rng))
    fn = lambda *xs: case.call(sample, *xs)  # noqa: E731
    out_shape = case.call_ref(sample, *[torch.tensor(a) for a in arrays]).shape
    weights = rng.standard_normal(tuple(out_shape))
    v = [rng.standard_normal(a.shape) if a.dtype.kind == "f" else None for a in arrays]
    got_x, got_w = second_order_gradients(fn, arrays, weights, v)
    want_x, want_w = _torch_second_order(case, sample, arrays, weights, v)
    pairs = [(g, w) for g, w in zip(got_x, want_x) if w is not None] + [(got_w, want_w)]
    for got, want in pairs:
        assert got.shape == want.shape and got.dtype == want.dtype
        scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9 * scale)


@pytest.mark.parametrize(("case", "sample"), params("second_order_fd", PAIRS))
def test_second_order_matches_finite_differences(case, sample):
    rng = np.random.default_rng(12)
    check_second_order_fd(lambda *xs: case.call(sample, *xs), sample.make(rng), rng)
