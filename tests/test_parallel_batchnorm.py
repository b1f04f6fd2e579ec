"""BatchNorm's passes, the fused BatchNorm+ReLU gradient and max pooling as numba prange loops
on TBB (kernels/numba_parallel_batchnorm.py, run by cpu_kernels.run_in_blocks).

Large matrices run in row blocks fixed by the shape (cpu_kernels.row_blocks), each block the
same serial loop whichever way the blocks run (one prange call, needle's threads, or one after
the other in one call), their float64 sums added in block order: the results must be the same
bits every way and on any thread count. Blocks here are small and uneven (the defaults need
arrays of 2**17 values), and each test checks that the prange loops really ran (a loop that
fails to compile falls back to the serial one with the same bits, unseen otherwise).
"""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
from needle import nn
from needle.backend import cpu_threads, parallel_loops
from needle.kernels import batchnorm, batchnorm_relu, column_sums, cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels._kernels() is None,
                                reason="numba is not installed or NEEDLE_NUMBA=0")

AXES = (0, 2, 3)


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    """Blocks of 2**8+ values from 2**10, prange from any size, needle's threads never (the
    tests that want them turn them on); two threads."""
    monkeypatch.setattr(cpu_kernels, "SPLIT_MIN_ELEMENTS", 1 << 10)
    monkeypatch.setattr(cpu_kernels, "BLOCK_ELEMENTS", 1 << 8)
    monkeypatch.setattr(cpu_kernels, "PRANGE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(cpu_kernels, "THREADS_MIN_ELEMENTS", 1 << 62)
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)


@pytest.fixture
def prange_calls(monkeypatch):
    """The names of the prange loops that ran; None where prange cannot run here (no TBB:
    the other ways are still compared)."""
    if not parallel_loops.parallel_threads():
        return None
    parallel = cpu_kernels._parallel.module()
    assert parallel is not None
    calls: list[str] = []
    for name in ("column_sums", "shifted_sums", "centered_square_sums", "affine",
                 "bn_grad_sums", "bn_grad_dx", "max_pool", "max_pool_scatter",
                 "bn_relu_grad_sums", "bn_relu_grad_dx"):
        loop = getattr(parallel, name)

        def counted(*args, _loop=loop, _name=name):
            calls.append(_name)
            return _loop(*args)

        monkeypatch.setattr(parallel, name, counted)
    return calls


def _ways(monkeypatch, compute):
    """``compute()`` run with prange (where it runs here), then serially (prange off:
    NEEDLE_PARALLEL_LOOPS=0's path), on one thread, and on needle's threads."""
    results = {"prange": compute()} if parallel_loops.parallel_threads() else {}
    with monkeypatch.context() as m:
        m.setattr(parallel_loops, "tbb_layer", lambda: False)
        assert parallel_loops.parallel_threads() == 0
        results["serial"] = compute()
        m.setattr(cpu_threads, "NUM_THREADS", 1)
        results["one thread"] = compute()
        m.setattr(cpu_threads, "NUM_THREADS", 2)
        m.setattr(cpu_kernels, "THREADS_MIN_ELEMENTS", 0)
        m.setattr(cpu_kernels, "THREADS_CHUNK_ELEMENTS", 1 << 9)
        results["needle threads"] = compute()
    return results


def _assert_same_bits(results):
    first = next(iter(results.values()))
    for way, got in results.items():
        assert len(got) == len(first)
        for a, b in zip(got, first):
            assert a.dtype == b.dtype and a.shape == b.shape, way
            assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), way


def _matrix(rng, shape, dtype, loc=3.0):
    xm = (rng.standard_normal(shape) * 2 + loc).astype(dtype)
    xm[5, 1] = np.nan  # one column's statistics NaN: every way must agree on it too
    return xm


@pytest.mark.parametrize("shape", [(1003, 7), (211, 40)])
def test_batchnorm_passes_give_the_same_bits_every_way(monkeypatch, prange_calls, shape):
    rng = np.random.default_rng(0)
    xm = _matrix(rng, shape, np.float32)
    gm = rng.standard_normal(shape).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, shape[1]).astype(np.float32)
    bounds = cpu_kernels.row_blocks(xm)
    assert bounds is not None and len(bounds) > 3
    assert len(set(np.diff(bounds))) > 1 or shape[0] % (len(bounds) - 1)  # uneven blocks

    def compute():
        mean, var = cpu_kernels.column_statistics(xm)
        var = np.nan_to_num(var, nan=1.0)
        return (mean, var, *cpu_kernels.column_moments(xm),
                cpu_kernels.column_affine(xm, weight, -weight),
                *cpu_kernels.batch_norm_grad_given_var(gm, xm, mean, var, 1e-5, weight),
                *cpu_kernels.batch_norm_grad(gm, xm, mean, 1 / np.sqrt(var + 1e-5), weight))

    _assert_same_bits(_ways(monkeypatch, compute))
    assert prange_calls is None or {"shifted_sums", "column_sums", "centered_square_sums",
                                    "affine", "bn_grad_sums", "bn_grad_dx"} <= set(prange_calls)
    # against float64 NumPy (the statistics of the columns without the NaN)
    mean, var = cpu_kernels.column_statistics(xm)
    x64 = xm.astype(np.float64)
    finite = np.arange(shape[1]) != 1
    np.testing.assert_allclose(mean[finite], x64.mean(0)[finite], rtol=1e-6)
    np.testing.assert_allclose(var[finite], x64.var(0)[finite], rtol=1e-5)
    assert np.isnan(mean[1]) and np.isnan(var[1])


def test_blocked_results_match_the_whole_loops_to_rounding(monkeypatch):
    """Blocks change the float64 sums' order only: within rounding of the whole loops."""
    rng = np.random.default_rng(1)
    xm = (rng.standard_normal((997, 13)) * 2 + 1).astype(np.float32)
    gm = rng.standard_normal(xm.shape).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, 13).astype(np.float32)

    def compute():
        mean, var = cpu_kernels.column_statistics(xm)
        return (mean, var, *cpu_kernels.batch_norm_grad_given_var(gm, xm, mean, var, 1e-5,
                                                                   weight))

    blocked = compute()
    monkeypatch.setattr(cpu_kernels, "SPLIT_MIN_ELEMENTS", 1 << 62)
    for a, b in zip(blocked, compute()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())


def test_float64_statistics_and_gradient(monkeypatch, prange_calls):
    rng = np.random.default_rng(2)
    xm = rng.standard_normal((601, 9)) * 3 + 100
    gm = rng.standard_normal(xm.shape)
    weight = rng.uniform(0.5, 1.5, 9)

    def compute():
        mean, var = cpu_kernels.column_statistics(xm)
        return (mean, var, *cpu_kernels.batch_norm_grad_given_var(gm, xm, mean, var, 1e-5,
                                                                   weight))

    results = _ways(monkeypatch, compute)
    _assert_same_bits(results)
    assert prange_calls is None or {"column_sums", "centered_square_sums",
                                    "bn_grad_sums"} <= set(prange_calls)
    np.testing.assert_allclose(results["serial"][0], xm.mean(0), rtol=1e-14)
    np.testing.assert_allclose(results["serial"][1], xm.var(0), rtol=1e-12)


def _bn_relu_arrays(rng, shape_nhwc):
    """(g, x, weight, bias, mean, var) of an NCHW model (channels-last memory behind NCHW
    views); a NaN in x, some -0.0 in g, channel 0 with weight and bias 0."""
    n, h, w, c = shape_nhwc
    x = (rng.standard_normal(shape_nhwc) * 2 + 0.5).astype(np.float32).transpose(0, 3, 1, 2)
    g = rng.standard_normal(shape_nhwc).astype(np.float32).transpose(0, 3, 1, 2)
    x[1, 1, 0, 0] = np.nan
    g[0, 2, :2, :2] = -0.0
    weight = rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32)
    bias = rng.uniform(-1.0, 1.0, (1, c, 1, 1)).astype(np.float32)
    weight[0, 0] = bias[0, 0] = 0.0
    mean, var = batchnorm.statistics(x, AXES)
    return g, x, weight, bias, mean, var


@pytest.mark.parametrize("channel_sums, pooled", [(False, False), (True, False), (False, True)],
                         ids=["dx", "dx_and_bias_sums", "gradient_of_a_global_pool"])
def test_fused_batchnorm_relu_grad_gives_the_same_bits_every_way(monkeypatch, prange_calls,
                                                                 channel_sums, pooled):
    rng = np.random.default_rng(3)
    arrays = _bn_relu_arrays(rng, (6, 20, 23, 8))  # (channel matrices from 2**14)
    if pooled:  # g broadcast from (N, C, 1, 1): read small, blocks starting mid image
        small = rng.standard_normal((6, 8, 1, 1)).astype(np.float32)
        arrays = (np.broadcast_to(small, arrays[1].shape), *arrays[1:])
        assert batchnorm_relu._grad_rows(arrays[0], 1)[1] == 20 * 23
    # the conv bias sums: blocks of column_sums.py (uneven too), which the dx pass follows
    monkeypatch.setattr(column_sums, "SPLIT_MIN_ELEMENTS", 1 << 11)
    monkeypatch.setattr(column_sums, "BLOCK_ELEMENTS", 1 << 10)

    def compute():
        return batchnorm_relu.backward(*arrays, 1e-5, AXES, channel_sums)

    results = _ways(monkeypatch, compute)
    _assert_same_bits(results)
    assert prange_calls is None or {"bn_relu_grad_sums", "bn_relu_grad_dx"} <= set(prange_calls)
    # and the bits of the unfused ops (batch_norm, relu_grad, batch_norm_grad, sum_to)
    g, x, weight, bias, mean, var = arrays
    y = batchnorm.forward(x, weight, bias, mean, var, 1e-5, AXES)
    r = g * (y > 0)
    want = batchnorm.backward_given_var(r, x, weight, mean, var, 1e-5, AXES)
    for a, b in zip(results["serial"][:3], want):
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    if channel_sums:
        summed = ndl.ops.sum_to(ndl.Tensor(want[0].transpose(0, 2, 3, 1)), (8,)).numpy()
        assert results["serial"][3].tobytes() == summed.tobytes()


def test_max_pooling_gives_the_same_bits_every_way(monkeypatch, prange_calls):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((7, 12, 10, 6)).astype(np.float32)
    x[2, 3, 4, 1] = np.nan
    x = x.transpose(0, 3, 1, 2)  # channels-last memory, as nn.Conv's outputs
    g = rng.standard_normal((7, 6, 6, 5)).astype(np.float32)
    g3 = rng.standard_normal((7, 6, 5, 4)).astype(np.float32)

    def compute():
        y = cpu_kernels.max_pool(x, 2, 2, 6, 5)
        y3 = cpu_kernels.max_pool(x, 3, 2, 5, 4)  # overlapping windows: dx zeroed, added
        return (y, cpu_kernels.max_pool_scatter(x, y, g[:, :, :, :5], 2, 2),
                y3, cpu_kernels.max_pool_scatter(x, y3, g3[:, :, :5, :4], 3, 2))

    results = _ways(monkeypatch, compute)
    _assert_same_bits(results)
    assert prange_calls is None or {"max_pool", "max_pool_scatter"} <= set(prange_calls)
    torch = pytest.importorskip("torch")
    tx = torch.tensor(np.ascontiguousarray(x), requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, 3, 2)
    ty.backward(torch.tensor(g3[:, :, :5, :4]))
    np.testing.assert_array_equal(results["serial"][2], ty.detach().numpy())
    np.testing.assert_allclose(results["serial"][3], tx.grad.numpy(), rtol=1e-6, atol=1e-6)


def test_a_prange_loop_numba_cannot_compile_leaves_the_serial_loops(monkeypatch, prange_calls):
    if prange_calls is None:
        pytest.skip("numba's TBB threading layer is not available")
    from numba.core.errors import TypingError

    def broken(*args):
        raise TypingError("cannot compile here")

    monkeypatch.setattr(cpu_kernels._parallel.module(), "affine", broken)
    monkeypatch.setattr(cpu_kernels._parallel, "failed", [])
    rng = np.random.default_rng(5)
    xm = rng.standard_normal((300, 5)).astype(np.float32)
    scale, shift = rng.standard_normal(5).astype(np.float32), np.ones(5, np.float32)
    got = cpu_kernels.column_affine(xm, scale, shift)
    assert cpu_kernels._parallel.failed == ["broken"]
    assert cpu_kernels._parallel.module() is None  # latched: the serial loops from now on
    assert got.tobytes() == (xm * scale + shift).tobytes()
    assert cpu_kernels.column_statistics(xm) is not None and not cpu_kernels._disabled


def test_cnn_layers_on_prange_match_torch(monkeypatch, prange_calls):
    """conv -> BatchNorm2d -> ReLU -> max pool, trained one step with prange, against PyTorch."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    x = rng.standard_normal((8, 3, 16, 18)).astype(np.float32)  # (channel matrices from 2**14)
    w = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    conv = nn.Conv(3, 8, 3, bias=False)
    conv.weight = nn.Parameter(ndl.Tensor(w.transpose(2, 3, 1, 0).copy()))
    bn = nn.BatchNorm2d(8)
    out = ndl.ops.max_pool2d(nn.ReLU()(bn(conv(ndl.Tensor(x)))), kernel_size=2, stride=2)
    g = rng.standard_normal(out.shape).astype(np.float32)
    (out * ndl.Tensor(g)).sum().backward()
    tconv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    tconv.weight.data = torch.tensor(w)
    tbn = torch.nn.BatchNorm2d(8)
    tout = torch.nn.functional.max_pool2d(torch.relu(tbn(tconv(torch.tensor(x)))), 2)
    (tout * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(conv.weight.grad.numpy().transpose(3, 2, 0, 1),
                               tconv.weight.grad.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(bn.weight.grad.numpy().reshape(-1), tbn.weight.grad.numpy(),
                               rtol=1e-4, atol=1e-4)
    assert prange_calls is None or {"shifted_sums", "affine", "bn_grad_sums", "bn_grad_dx",
                                    "max_pool", "max_pool_scatter"} <= set(prange_calls)
