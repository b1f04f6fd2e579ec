"""Bias gradients (``sum_to``): kernels/column_sums.py.

Small (batch, features) matrices: the rows added in order must give ``np.add.reduce``'s bits
in every mode (eager compute, a jitted plan's emitted call, without numba, on inputs the loop
does not take). Large channel matrices (a conv's NHWC gradient summed to its bias): row
blocks fixed by the shape, so 1 and 2 threads give the same bits, at least as accurate as
NumPy's float32 sum against a float64 reference, and what PyTorch gives for conv2d's bias.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needle as ndl
import needle.nn as nn
from needle import ops
from needle.backend import cpu_threads
from needle.kernels import column_sums

needs_numba = pytest.mark.skipif(column_sums._loops.module() is None,
                                 reason="numba is not installed or NEEDLE_NUMBA=0")

SHAPES = [(100, 100), (100, 50), (100, 10), (1, 7), (3, 1), (257, 33), (64, 10), (2, 4000)]


def _matrix(shape, dtype, seed=0):
    """Values of many magnitudes and both signs: an order change would show in the bits."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 4, shape)).astype(dtype)


def _same_bits(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_sum_rows_bit_for_bit_with_numpy(shape, dtype):
    a = _matrix(shape, dtype)
    ref = np.add.reduce(a, axis=(0,), keepdims=True)
    _same_bits(column_sums.sum_rows(a, (1, shape[1])), ref)
    _same_bits(column_sums.sum_rows(a, (shape[1],)), ref.reshape(-1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 25, 100), (10, 10, 50), (2, 3, 7), (3, 5, 4, 6),
                                   (5, 1, 9), (1, 40, 33)])
def test_sum_rows_over_leading_axes_bit_for_bit(shape, dtype):
    a = _matrix(shape, dtype, seed=4)
    axes = tuple(range(len(shape) - 1))
    assert column_sums.in_order(shape, axes)
    ref = np.add.reduce(a, axis=axes, keepdims=True)
    _same_bits(column_sums.sum_rows(a, ref.shape), ref)
    _same_bits(column_sums.sum_rows(a, (shape[-1],)), ref.reshape(-1))
    _same_bits(ops.sum_to(ndl.Tensor(a, dtype=dtype), (shape[-1],)).numpy(), ref.reshape(-1))
    view = a.swapaxes(0, 1)  # not C-contiguous: NumPy's own reduction
    _same_bits(column_sums.sum_rows(view, (1,) * (len(shape) - 1) + (shape[-1],)),
               np.add.reduce(view, axis=axes, keepdims=True))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_rows_without_the_loop_is_numpy(dtype, monkeypatch):
    """Inputs the loop does not take (views, other dtypes) and no numba: NumPy's bits."""
    base = _matrix((60, 80), dtype)
    for a in (base.T, base[:, ::2], np.asfortranarray(base), base[::3]):
        ref = np.add.reduce(a, axis=(0,), keepdims=True)
        _same_bits(column_sums.sum_rows(a, (1, a.shape[1])), ref)
    ints = np.arange(12, dtype=np.int8).reshape(3, 4)
    np.testing.assert_array_equal(column_sums.sum_rows(ints, (1, 4)),
                                  np.sum(ints, axis=0, keepdims=True))
    empty = np.zeros((0, 5), dtype)
    _same_bits(column_sums.sum_rows(empty, (1, 5)), np.add.reduce(empty, axis=0, keepdims=True))
    monkeypatch.setattr(column_sums._loops, "failed", ["forced"])  # as without numba
    _same_bits(column_sums.sum_rows(base, (1, 80)), np.add.reduce(base, axis=0, keepdims=True))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_to_eager_and_jit_bit_for_bit(dtype):
    """The op in eager mode and in a jitted plan (which calls the loop by name) agree with
    NumPy bit for bit; the plan's source shows the bound helper."""
    a = _matrix((100, 50), dtype)

    def fn(x):
        return ops.sum_to(x * 2.0, (1, 50)), ops.sum_to(x, (50,))

    ref = np.add.reduce(a * dtype(2.0), axis=0, keepdims=True)
    eager = fn(ndl.Tensor(a, dtype=dtype))
    _same_bits(eager[0].numpy(), ref)
    _same_bits(eager[1].numpy(), np.add.reduce(a, axis=0))
    jitted = ndl.jit(fn)
    for _ in range(3):
        out = jitted(ndl.Tensor(a, dtype=dtype))
        _same_bits(out[0].numpy(), ref)
        _same_bits(out[1].numpy(), np.add.reduce(a, axis=0))


def test_plan_calls_the_bound_helper():
    from needle.core.ops_shape import SumTo

    calls = []
    original = column_sums.sum_rows

    def counting(a, shape):
        calls.append(shape)
        return original(a, shape)

    SumTo.emit_helpers = {"_sum_to_rows": counting}
    try:
        jitted = ndl.jit(lambda x: ops.sum_to(x * 3.0, (1, 20)))
        x = ndl.Tensor(_matrix((30, 20), np.float32))
        for _ in range(2):
            out = jitted(x)
    finally:
        SumTo.emit_helpers = {"_sum_to_rows": original}
    assert calls and calls[-1] == (1, 20)  # the plan called the helper codegen bound
    _same_bits(out.numpy(), np.add.reduce(x.numpy() * np.float32(3), axis=0, keepdims=True))


def _float64_error(sums, m):
    return np.abs(sums.astype(np.float64) - m.astype(np.float64).sum(axis=0))


@needs_numba
@pytest.mark.parametrize("shape", [(4096, 64), (65536, 16), (1000, 300), (20001, 13)])
def test_blocked_sums_same_bits_on_any_thread_count(shape, monkeypatch):
    monkeypatch.setattr(column_sums, "SPLIT_MIN_ELEMENTS", 1 << 16)
    monkeypatch.setattr(column_sums, "BLOCK_ELEMENTS", 1 << 14)
    m = _matrix(shape, np.float32, seed=1)
    outs = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(cpu_threads, "NUM_THREADS", threads)
        outs.append(column_sums.blocked_column_sums(m))
    assert outs[0] is not None and outs[0].dtype == np.float32
    _same_bits(outs[0], outs[1])
    _same_bits(outs[0], outs[2])
    # float64 block sums rounded once: at most one float32 step from the exact sum, and never
    # worse than NumPy's float32 sum
    ref = m.astype(np.float64).sum(axis=0)
    assert np.all(_float64_error(outs[0], m) <= np.spacing(np.abs(ref).astype(np.float32)))
    numpy_error = _float64_error(np.add.reduce(m, axis=0), m)
    assert _float64_error(outs[0], m).max() <= numpy_error.max()


def test_numpy_fallback_of_large_sums_close_to_float64(monkeypatch):
    """Without numba the channel-matrix sums are layout.column_sums's NumPy/BLAS sums (a
    different order than the blocks): float32 rounding of the float64 sum."""
    monkeypatch.setattr(column_sums._loops, "failed", ["forced"])
    x = _matrix((16, 32, 32, 16), np.float32, seed=2)
    got = ops.sum_to(ndl.Tensor(x), (16,)).numpy()
    ref = x.astype(np.float64).sum(axis=(0, 1, 2))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(x).sum(axis=(0, 1, 2)).max())


@pytest.mark.parametrize("threads", [1, 2])
def test_conv_bias_gradient_against_torch(threads, monkeypatch):
    """nn.Conv's bias gradient (sum_to of its NHWC output gradient) through the blocked sums."""
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", threads)
    monkeypatch.setattr(column_sums, "SPLIT_MIN_ELEMENTS", 1 << 12)
    monkeypatch.setattr(column_sums, "BLOCK_ELEMENTS", 1 << 11)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 4, 16, 16)).astype(np.float32)
    conv = nn.Conv(4, 16, 3, stride=1)
    # the output gradient in NHWC memory (seen as NCHW), as a CNN's backward gives it
    g_nhwc = rng.standard_normal((8, 16, 16, 16)).astype(np.float32)
    g = g_nhwc.transpose(0, 3, 1, 2)
    calls = []
    blocked = column_sums.blocked_column_sums
    monkeypatch.setattr(column_sums, "blocked_column_sums",
                        lambda m: calls.append(m.shape) or blocked(m))
    out = conv(ndl.Tensor(x))
    (ops.permute(out, (0, 2, 3, 1)) * ndl.Tensor(g_nhwc)).sum().backward()
    if column_sums._loops.module() is not None:
        assert (2048, 16) in calls  # the bias gradient's (N*H*W, C) channel matrix
    t_conv = torch.nn.Conv2d(4, 16, 3, padding=1)
    with torch.no_grad():
        t_conv.weight.copy_(torch.tensor(conv.weight.numpy()).permute(3, 2, 0, 1))
        t_conv.bias.copy_(torch.tensor(conv.bias.numpy()).reshape(-1))
    (t_conv(torch.tensor(x)) * torch.tensor(g)).sum().backward()
    got = conv.bias.grad.numpy().reshape(-1)
    np.testing.assert_allclose(got, t_conv.bias.grad.numpy(), rtol=1e-5, atol=1e-4)
    ref = g.astype(np.float64).sum(axis=(0, 2, 3))
    if column_sums._loops.module() is not None:  # blocked float64 sums: one float32 step
        assert np.all(np.abs(got - ref) <= np.spacing(np.abs(ref).astype(np.float32)))
