"""softmax_cross_entropy on small logits checks its ids inside the compiled loop: in-range ids
of any integer dtype give PyTorch's loss and gradient, and ids outside [0, C) raise the same
error as before, in the forward and in the gradient op, without reading out of bounds."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.ops as ops
from needle.core.ops_index import IdsOutOfRangeError

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8])
def test_loss_and_gradient_match_torch(dtype):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((7, 5)).astype(np.float32)
    ids = rng.integers(0, 5, 7).astype(dtype)
    g = rng.standard_normal(7).astype(np.float32)
    x = ndl.Tensor(z)
    loss = ops.softmax_cross_entropy(x, ndl.Tensor(ids, requires_grad=False))
    (loss * ndl.Tensor(g, requires_grad=False)).sum().backward()
    tz = torch.tensor(z, requires_grad=True)
    tloss = torch.nn.functional.cross_entropy(tz, torch.tensor(ids.astype(np.int64)),
                                              reduction="none")
    (tloss * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(loss.numpy(), tloss.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), tz.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 5, 1 << 40])
def test_ids_out_of_range_raise_in_both_ops(bad):
    z = np.zeros((4, 5), np.float32)
    ids = np.array([0, 1, bad, 2])
    shown = rf"\[{bad}\]"
    with pytest.raises(IdsOutOfRangeError,
                       match=rf"softmax_cross_entropy: ids must lie in \[0, 5\), got {shown}"):
        ops.softmax_cross_entropy(ndl.Tensor(z), ndl.Tensor(ids, requires_grad=False))
    with pytest.raises(IdsOutOfRangeError,
                       match=rf"softmax_cross_entropy_grad: ids must lie in \[0, 5\), got "
                             rf"{shown}"):
        ops.softmax_cross_entropy_grad(ndl.Tensor(z), ndl.Tensor(ids, requires_grad=False),
                                       ndl.Tensor(np.ones(4, np.float32)))


def test_whole_float_ids_still_work_and_fractional_ones_raise():
    z = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    want = ops.softmax_cross_entropy(ndl.Tensor(z), ndl.Tensor(np.array([0, 3, 1]))).numpy()
    got = ops.softmax_cross_entropy(ndl.Tensor(z), ndl.Tensor(np.array([0.0, 3.0, 1.0])))
    np.testing.assert_array_equal(got.numpy(), want)
    with pytest.raises(IdsOutOfRangeError, match="float ids must be whole numbers"):
        ops.softmax_cross_entropy(ndl.Tensor(z), ndl.Tensor(np.array([0.5, 3.0, 1.0])))
