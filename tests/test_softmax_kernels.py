"""The cache-blocked logsumexp and softmax (kernels/softmax.py) give the plain NumPy formulas'
bits on loss-sized arrays, hand non-finite rows back to the careful formula, and the ops that
use them (logsumexp, softmax, SoftmaxLoss) agree with torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needle as ndl
from needle import nn, ops
from needle.kernels import softmax as kernels


def _plain_logsumexp(x: np.ndarray) -> np.ndarray:
    peak = np.maximum.reduce(x, axis=-1, keepdims=True)
    return np.log(np.add.reduce(np.exp(x - peak), axis=-1, keepdims=True)) + peak


def _plain_softmax(x: np.ndarray) -> np.ndarray:
    out = np.exp(x - np.max(x, axis=-1, keepdims=True))
    out /= np.sum(out, axis=-1, keepdims=True)
    return out


@pytest.mark.parametrize("shape", [(700, 1000), (3, 50, 777), (70000,)])
def test_blocked_kernels_give_the_plain_formulas_bits(shape):
    x = (np.random.default_rng(0).standard_normal(shape) * 4).astype(np.float32)
    assert x.size >= kernels.MIN_SIZE  # the blocked path runs
    np.testing.assert_array_equal(kernels.logsumexp_last_axis(x), _plain_logsumexp(x))
    np.testing.assert_array_equal(kernels.softmax_last_axis(x), _plain_softmax(x))


def test_kernels_step_aside_where_they_do_not_apply():
    big = np.zeros((400, 400), np.float32)
    assert kernels.logsumexp_last_axis(big[:, ::2]) is None  # not contiguous
    assert kernels.softmax_last_axis(np.zeros((10, 10), np.float32)) is None  # small
    assert kernels.logsumexp_last_axis(np.zeros((400, 400), np.int64)) is None
    big[399, 3] = np.inf
    assert kernels.logsumexp_last_axis(big) is None  # a non-finite row maximum


def test_logsumexp_op_keeps_inf_and_minus_inf_rows_exact():
    x = np.zeros((300, 300), np.float32)
    x[5, 7] = np.inf
    x[9] = -np.inf
    out = ops.logsumexp(ndl.Tensor(x), axes=(1,)).numpy()
    assert out[5] == np.inf and out[9] == -np.inf
    np.testing.assert_allclose(out[0], np.log(300.0), rtol=1e-6)


def test_large_softmax_loss_matches_torch():
    """A vocabulary-sized loss (the blocked path) against torch: value and logits gradient."""
    rng = np.random.default_rng(1)
    z = (rng.standard_normal((256, 3000)) * 3).astype(np.float32)
    y = rng.integers(0, 3000, 256)
    logits = ndl.Tensor(z, requires_grad=True)
    loss = nn.SoftmaxLoss()(logits, ndl.Tensor(y, requires_grad=False))
    loss.backward()
    tz = torch.tensor(z, requires_grad=True)
    t_loss = torch.nn.functional.cross_entropy(tz, torch.tensor(y))
    t_loss.backward()
    np.testing.assert_allclose(loss.numpy(), t_loss.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(logits.grad.numpy(), tz.grad.numpy(), rtol=1e-5, atol=1e-9)
