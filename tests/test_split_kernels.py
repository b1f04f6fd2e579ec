"""BatchNorm and max-pool kernels split into blocks across needle's CPU threads, and the chunk
runner under them (backend/cpu_threads.run_chunks).

A split pass computes each block with the same loop as the whole one, and its float64 column
sums are added in block order (blocks depend on the shape only), so float32 results equal the
unsplit kernels' and do not depend on the thread count; checked against the unsplit kernels,
PyTorch and finite differences.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import needle as ndl
import needle.nn as nn
from needle.backend import cpu_threads
from needle.kernels import cpu_kernels

from .helpers import check_gradient_fd

needs_kernels = pytest.mark.skipif(cpu_kernels._kernels() is None,
                                   reason="numba is not installed or NEEDLE_NUMBA=0")


# -- run_chunks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_run_chunks_runs_every_chunk_once(parts):
    seen = []
    lock = threading.Lock()

    def chunk(i):
        with lock:
            seen.append(i)

    cpu_threads.run_chunks(chunk, 11, parts)
    assert sorted(seen) == list(range(11))


def test_run_chunks_raises_a_chunks_error():
    def chunk(i):
        if i == 3:
            raise ValueError("chunk 3 failed")

    with pytest.raises(ValueError, match="chunk 3 failed"):
        cpu_threads.run_chunks(chunk, 6, 2)
    cpu_threads.run_chunks(lambda i: None, 4, 2)  # the pool still works afterwards


def test_run_chunks_does_not_wait_for_a_helper_that_has_not_started():
    """Every pool thread busy: the calling thread runs all chunks and returns at once (a
    helper that starts late finds nothing left), where waiting for it would take 5 s."""
    executor = cpu_threads._Pool.get(1)
    release = threading.Event()
    for _ in range(cpu_threads._Pool.workers):
        executor.submit(release.wait, 5.0)
    try:
        done = []
        start = time.perf_counter()
        cpu_threads.run_chunks(done.append, 5, 2)
        elapsed = time.perf_counter() - start
    finally:
        release.set()
    assert sorted(done) == list(range(5))
    assert elapsed < 2.0


def test_in_parallel_does_not_wait_for_a_helper_that_has_not_started():
    """The same for in_parallel (the convolutions' splits): the results are this thread's
    only, and the late helper does not run ``work`` at all."""
    executor = cpu_threads._Pool.get(1)
    release = threading.Event()
    for _ in range(cpu_threads._Pool.workers):
        executor.submit(release.wait, 5.0)
    ran = []
    try:
        start = time.perf_counter()
        results = cpu_threads.in_parallel(lambda shared: ran.append(1) or list(shared),
                                          range(6), 2)
        elapsed = time.perf_counter() - start
    finally:
        release.set()
    assert results == [list(range(6))]
    assert elapsed < 2.0
    executor.submit(lambda: None).result(timeout=5)  # the queued helper has run by now
    assert ran == [1]


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_in_parallel_covers_every_item_once(parts):
    results = cpu_threads.in_parallel(lambda shared: [i for i in shared], range(50), parts)
    assert 1 <= len(results) <= parts
    assert sorted(i for part in results for i in part) == list(range(50))


# -- BatchNorm kernels --------------------------------------------------------------------------
@pytest.fixture
def split_small(monkeypatch):
    """Split even small matrices, into many uneven blocks."""
    monkeypatch.setattr(cpu_kernels, "SPLIT_MIN_ELEMENTS", 0)
    monkeypatch.setattr(cpu_kernels, "BLOCK_ELEMENTS", 96)


def _bn_kernels(xm, gm, weight):
    mean, var = cpu_kernels.column_moments(xm)
    inv = (1 / np.sqrt(var.astype(np.float64) + 1e-5)).astype(xm.dtype)
    y = cpu_kernels.column_affine(xm, weight * inv, -mean * weight * inv)
    return (mean, var, y, *cpu_kernels.batch_norm_grad(gm, xm, mean, inv, weight),
            cpu_kernels.column_sums(gm))


@needs_kernels
@pytest.mark.parametrize("shape", [(1000, 7), (257, 40), (3, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_batchnorm_kernels_match_the_whole_ones(shape, dtype, split_small, monkeypatch):
    rng = np.random.default_rng(0)
    xm = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    gm = rng.standard_normal(shape).astype(dtype)
    weight = rng.standard_normal(shape[1]).astype(dtype)
    with monkeypatch.context() as m:  # the whole loops
        m.setattr(cpu_kernels, "SPLIT_MIN_ELEMENTS", 1 << 62)
        assert cpu_kernels.row_blocks(xm) is None
        whole = _bn_kernels(xm, gm, weight)
    results = {}
    for threads in (1, 2, 3):
        monkeypatch.setattr(cpu_threads, "NUM_THREADS", threads)
        assert len(cpu_kernels.row_blocks(xm)) > 2
        results[threads] = _bn_kernels(xm, gm, weight)
    for a, b, c in zip(results[1], results[2], results[3]):  # blocks: the shape's only
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    for a, b in zip(results[2], whole):  # float64 sums in another order: rounding apart
        if dtype == np.float32:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())
        else:
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())
    # and against float64 NumPy: the statistics and the affine map
    x64 = xm.astype(np.float64)
    np.testing.assert_allclose(results[2][0], x64.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[2][1], x64.var(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[2][-1], gm.astype(np.float64).sum(0), rtol=1e-5,
                               atol=1e-5)


@needs_kernels
def test_split_batchnorm2d_layer_matches_torch(split_small, monkeypatch):
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)
    rng = np.random.default_rng(1)
    # large enough for the channel-matrix path (kernels/reduce.py)
    x = rng.standard_normal((8, 5, 24, 19)).astype(np.float32) * 2 + 1
    g = rng.standard_normal(x.shape).astype(np.float32)
    calls = []
    original = cpu_kernels._run_blocks
    monkeypatch.setattr(cpu_kernels, "_run_blocks",
                        lambda name, *a: calls.append(name) or original(name, *a))
    bn = nn.BatchNorm2d(5)
    # channels-last memory behind an NCHW view, as nn.Conv's outputs are
    nx = ndl.Tensor(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), requires_grad=True)
    out = bn(ndl.ops.permute(nx, (0, 3, 1, 2)))
    (out * ndl.Tensor(g)).sum().backward()
    assert {"shifted_sums", "affine", "bn_grad_sums", "bn_grad_dx"} <= set(calls)
    tbn = torch.nn.BatchNorm2d(5)
    tx = torch.tensor(x, requires_grad=True)
    tout = tbn(tx)
    (tout * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(nx.grad.numpy().transpose(0, 3, 1, 2), tx.grad.numpy(),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.weight.grad.numpy(), tbn.weight.grad.numpy(), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(bn.bias.grad.numpy(), tbn.bias.grad.numpy(), rtol=1e-4,
                               atol=1e-4)


@needs_kernels
def test_split_batch_norm_op_gradient_finite_differences(split_small, monkeypatch):
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)
    calls = []
    original = cpu_kernels._run_blocks
    monkeypatch.setattr(cpu_kernels, "_run_blocks",
                        lambda name, *a: calls.append(name) or original(name, *a))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 48, 64, 3))  # NHWC memory, float64, seen as NCHW below
    axes = (0, 2, 3)

    def layer(a, w, b):
        a = ndl.ops.permute(a, (0, 3, 1, 2))
        mean = ndl.ops.mean(a, axes=axes, keepdims=True)
        var = ndl.ops.variance(a, axes=axes, keepdims=True)
        return ndl.ops.batch_norm(a, ndl.ops.reshape(w, (1, 3, 1, 1)),
                                  ndl.ops.reshape(b, (1, 3, 1, 1)), mean, var, axes=axes,
                                  eps=1e-5)

    check_gradient_fd(layer, [x, rng.standard_normal(3), rng.standard_normal(3)], rng)
    assert {"centered_square_sums", "affine", "bn_grad_dx"} <= set(calls)


# -- max pooling --------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("k, stride", [(2, 2), (3, 2), (3, 1)])
def test_split_max_pool_matches_the_whole_one_and_torch(k, stride, split_small, monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 11, 11, 4)).astype(np.float32).transpose(0, 3, 1, 2)
    ho = (11 - k) // stride + 1
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 1)
    y1 = cpu_kernels.max_pool(x, k, stride, ho, ho)
    g = rng.standard_normal(y1.shape).astype(np.float32)
    dx1 = cpu_kernels.max_pool_scatter(x, y1, g, k, stride)
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 3)
    assert len(cpu_kernels.row_blocks(x.transpose(0, 2, 3, 1))) > 1
    y3 = cpu_kernels.max_pool(x, k, stride, ho, ho)
    dx3 = cpu_kernels.max_pool_scatter(x, y3, g, k, stride)
    np.testing.assert_array_equal(y3, y1)
    np.testing.assert_array_equal(dx3, dx1)
    tx = torch.tensor(np.ascontiguousarray(x), requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, k, stride)
    ty.backward(torch.tensor(g))
    np.testing.assert_array_equal(y3, ty.detach().numpy())
    np.testing.assert_allclose(dx3, tx.grad.numpy(), rtol=1e-6, atol=1e-6)
