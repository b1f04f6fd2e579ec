"""``batch_norm_relu_grad`` (core/ops_batchnorm_relu.py) and its rewrite in compiled plans
(compiler/batchnorm_relu_rewrite.py): BatchNorm's adjoint through the ReLU after it, the
masked gradient never written. It must give, bit for bit, what ``relu_grad`` followed by
``batch_norm_grad`` gives, on every layout an NCHW model makes, with a gradient broadcast
from a global average pool, split in row blocks or whole, on 1 or 2 threads, and with the
loops unavailable (NumPy); PyTorch's ReLU + BatchNorm backward is the independent check, the
op table (tests/op_table.py) its gradients."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
from needle import nn
from needle.backend import cpu_threads
from needle.backend.numba_support import numba_module
from needle.compiler import (
    batchnorm_relu_conv_rewrite,
    batchnorm_relu_mean_rewrite,
    batchnorm_relu_rewrite,
    fusion,
    passes,
)
from needle.core.ops_batchnorm_relu import BatchNormReluGrad
from needle.core.ops_elementwise import ReLUGrad
from needle.core.ops_norm import BatchNorm, BatchNormGrad
from needle.core.ops_shape import Permute, SumTo
from needle.kernels import batchnorm, batchnorm_relu, column_sums, cpu_kernels, reduce

AXES = (0, 2, 3)
_SPECIAL = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, -1e-45]


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    """Matrices of 2**14 values or more split into blocks of 2**13 (the defaults need 4 MB
    arrays), so small tests take the split paths too."""
    monkeypatch.setattr(cpu_kernels, "SPLIT_MIN_ELEMENTS", 1 << 14)
    monkeypatch.setattr(cpu_kernels, "BLOCK_ELEMENTS", 1 << 13)
    monkeypatch.setattr(batchnorm_relu, "DX_SPLIT_MIN_ELEMENTS", 1 << 12)
    monkeypatch.setattr(batchnorm_relu, "DX_BLOCK_ELEMENTS", 1 << 11)


def _bits(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x).tobytes()


def _arrays(shape_nhwc: tuple, dtype, seed: int = 0, nchw_memory: bool = False):
    """(g, x, weight, bias, mean, var) of an NCHW model: channels-last memory behind NCHW
    views (or NCHW memory); channel 0 has weight and bias 0 (BatchNorm's output all +-0:
    masked everywhere), channel 1 a NaN in x, g some -0.0."""
    rng = np.random.default_rng(seed)
    n, h, w, c = shape_nhwc

    def act(scale=1.0):
        a = (rng.standard_normal(shape_nhwc) * scale).astype(dtype)
        return np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if nchw_memory \
            else a.transpose(0, 3, 1, 2)

    x = act(2.0) + dtype(0.5)
    x = np.ascontiguousarray(x) if nchw_memory else x
    g = act()
    x[1, 1, 0, 0] = np.nan
    # (a view of g's memory: the write reaches it)
    flat_g = g.transpose(0, 2, 3, 1).reshape(-1) if not nchw_memory else g.reshape(-1)
    flat_g[rng.choice(flat_g.size, 20, replace=False)] = -0.0
    weight = rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(dtype)
    bias = rng.uniform(-1.0, 1.0, (1, c, 1, 1)).astype(dtype)
    weight[0, 0] = bias[0, 0] = 0.0
    mean, var = batchnorm.statistics(x, AXES)
    return g, x, weight, bias, mean, var


def _pair(g, x, weight, bias, mean, var):
    """BatchNorm's forward, relu_grad and batch_norm_grad as the unfused plan runs them."""
    y = BatchNorm(AXES).compute(x, weight, bias, mean, var)
    return BatchNormGrad(AXES).compute(ReLUGrad().compute(y, g), x, weight, mean, var)


def _assert_same_bits(got, want):
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _bits(a) == _bits(b)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(8, 12, 12, 16), (3, 7, 9, 5), (2, 40, 40, 8)],
                         ids=["split", "whole", "dx_split_only"])
def test_fused_op_gives_the_pairs_bits(monkeypatch, threads, dtype, shape):
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", threads)
    if shape == (2, 40, 40, 8):  # sums whole (below the split size), the dx pass split
        monkeypatch.setattr(cpu_kernels, "SPLIT_MIN_ELEMENTS", 1 << 20)
    arrays = _arrays(shape, dtype)
    got = BatchNormReluGrad(AXES).compute(*arrays)
    _assert_same_bits(got, _pair(*arrays))


@pytest.mark.parametrize("channel_sums", [False, True])
def test_the_compiled_loops_run(channel_sums):
    # a loop that does not compile sends every call to the NumPy ops (the same bits, so the
    # tests above cannot tell): the kernel must answer, with and without the column sums
    if numba_module() is None:
        pytest.skip("numba is not installed or NEEDLE_NUMBA=0")
    g, x, weight, bias, mean, var = _arrays((8, 12, 12, 16), np.float32)
    got = batchnorm_relu.backward(g, x, weight, bias, mean, var, 1e-5, AXES, channel_sums)
    assert got is not None
    assert len(got) == (4 if channel_sums else 3)


def _pair_and_bias_grad(g, x, weight, bias, mean, var):
    """The pair, then the conv bias gradient as the plan computes it: sum_to(permute(dx))."""
    dx, dw, db = _pair(g, x, weight, bias, mean, var)
    return dx, dw, db, SumTo((x.shape[1],)).compute(Permute((0, 2, 3, 1)).compute(dx))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(8, 12, 12, 16), (3, 7, 9, 5), (2, 40, 40, 8),
                                   (2, 10, 10, 8)],
                         ids=["split", "whole_small", "dx_split_only", "whole"])
def test_channel_sums_give_the_bits_of_summing_dx_afterwards(monkeypatch, threads, shape):
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", threads)
    if shape == (2, 40, 40, 8):  # sums whole, the dx pass split: dx is summed afterwards
        monkeypatch.setattr(cpu_kernels, "SPLIT_MIN_ELEMENTS", 1 << 20)
    if shape == (2, 10, 10, 8):  # below every split size, large enough to fold: one block
        monkeypatch.setattr(cpu_kernels, "SPLIT_MIN_ELEMENTS", 1 << 20)
        monkeypatch.setattr(batchnorm_relu, "DX_SPLIT_MIN_ELEMENTS", 1 << 20)
        monkeypatch.setattr(reduce, "EINSUM_MIN_SIZE", 1 << 10)
        monkeypatch.setattr(column_sums, "IN_ORDER_MAX_SIZE", 1 << 10)  # (the same rule)
        monkeypatch.setattr(batchnorm_relu, "EINSUM_MIN_SIZE", 1 << 10)
    for dtype in (np.float32, np.float64):
        arrays = _arrays(shape, dtype, seed=7)
        got = BatchNormReluGrad(AXES, channel_sums=True).compute(*arrays)
        want = _pair_and_bias_grad(*arrays)
        assert len(got) == 4 and got[3].shape == (shape[3],)
        _assert_same_bits(got[:3], want[:3])
        assert _bits(got[3]) == _bits(want[3])
        np.testing.assert_allclose(got[3], want[0].sum(axis=AXES), rtol=1e-3, atol=1e-3)


def test_channel_sums_gradient_matches_the_composite():
    rng = np.random.default_rng(8)
    g, x = (ndl.Tensor(rng.standard_normal((3, 2, 4, 4)), requires_grad=True) for _ in range(2))
    w = ndl.Tensor(rng.uniform(0.5, 1.5, (1, 2, 1, 1)), requires_grad=True)
    b = ndl.Tensor(rng.uniform(-0.5, 0.5, (1, 2, 1, 1)), requires_grad=True)
    mean, var = ndl.ops.batch_stats(x, AXES)
    seeds = [rng.standard_normal(s) for s in ((3, 2, 4, 4), (1, 2, 1, 1), (1, 2, 1, 1), (2,))]

    def total(parts):
        return sum((parts[i] * ndl.Tensor(seeds[i])).sum() for i in range(4))

    fused = ndl.ops.batch_norm_relu_grad(g, x, w, b, mean, var, axes=AXES, channel_sums=True)
    total(fused).backward()
    got = [t.grad.numpy() for t in (g, x, w)]
    for t in (g, x, w):
        t.grad = None
    y = ndl.ops.batch_norm(x, w, b, mean, var, axes=AXES)
    parts = ndl.ops.batch_norm_grad(ndl.ops.relu_grad(y, g), x, w, mean, var, axes=AXES)
    composite = [parts[0], parts[1], parts[2],
                 ndl.ops.sum_to(ndl.ops.permute(parts[0], (0, 2, 3, 1)), (2,))]
    total(composite).backward()
    want = [t.grad.numpy() for t in (g, x, w)]
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block", [1 << 13, 6144], ids=["aligned", "blocks_start_mid_image"])
def test_gradient_broadcast_from_a_global_pool_is_read_small(monkeypatch, threads, block):
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", threads)
    monkeypatch.setattr(cpu_kernels, "BLOCK_ELEMENTS", block)
    _, x, weight, bias, mean, var = _arrays((8, 12, 12, 16), np.float32, seed=1)
    small = np.random.default_rng(2).standard_normal((8, 16, 1, 1)).astype(np.float32)
    g = np.broadcast_to(small, x.shape)
    rows, per = batchnorm_relu._grad_rows(g, 1)
    if numba_module() is not None:
        assert rows.shape == (8, 16) and per == 144
    _assert_same_bits(BatchNormReluGrad(AXES).compute(g, x, weight, bias, mean, var),
                      _pair(g, x, weight, bias, mean, var))


def test_other_layouts_and_the_numpy_fallback_give_the_pairs_bits(monkeypatch):
    arrays = _arrays((4, 10, 10, 8), np.float32, seed=3, nchw_memory=True)
    _assert_same_bits(BatchNormReluGrad(AXES).compute(*arrays), _pair(*arrays))
    arrays = _arrays((8, 12, 12, 16), np.float32, seed=4)
    monkeypatch.setattr(batchnorm_relu._loops, "failed", ["forced"])  # as if numba failed
    assert batchnorm_relu.backward(*arrays, 1e-5, AXES) is None
    _assert_same_bits(BatchNormReluGrad(AXES).compute(*arrays), _pair(*arrays))


def test_matches_pytorch_relu_batchnorm_backward():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((6, 8, 9, 9)) * 2 + 1).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 8).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    ty = torch.nn.functional.batch_norm(tx, None, None, tw, tb, training=True, eps=1e-5)
    torch.relu(ty).backward(torch.tensor(g))
    xn = x.transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2)  # channels-last memory
    mean, var = batchnorm.statistics(xn, AXES)
    dx, dw, db = BatchNormReluGrad(AXES).compute(g, xn, w.reshape(1, 8, 1, 1),
                                                 b.reshape(1, 8, 1, 1), mean, var)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw.reshape(-1), tw.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db.reshape(-1), tb.grad.numpy(), rtol=1e-4, atol=1e-4)


# -- the rewrite in compiled plans -----------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(ndl.ops.mean(self.features(x), axes=(2, 3)))


def _train(steps: int, rewrite: bool, monkeypatch, jit: bool = True) -> tuple:
    np.random.seed(0)
    model = _Net()
    opt = ndl.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.SoftmaxLoss()
    rng = np.random.default_rng(0)
    x = ndl.from_numpy(rng.standard_normal((8, 3, 24, 24)).astype(np.float32))
    y = ndl.from_numpy(rng.integers(0, 4, 8))

    def step(x, y):
        return opt.minimize(loss_fn(model(x), y))

    fn = ndl.jit(step) if jit else step
    with monkeypatch.context() as m:
        if not rewrite:
            m.setattr(passes, "rewrite_batchnorm_relu_grads", lambda program: 0)
        for _ in range(steps):
            fn(x, y)
    return [p.numpy().copy() for p in model.parameters()], fn, (x, y)


def test_jitted_step_runs_the_fused_op_and_keeps_the_unfused_bits(monkeypatch):
    monkeypatch.setattr(fusion, "FUSE_AFTER_CALLS", 1)
    # (the plan as this rewrite leaves it: batchnorm_relu_conv_rewrite would take the first
    # BatchNorm's output away; tests/test_batchnorm_relu_conv.py tests the two together)
    monkeypatch.setattr(batchnorm_relu_conv_rewrite, "ENABLED", False)
    # (and batchnorm_relu_mean_rewrite the last one's: tests/test_batchnorm_relu_mean.py)
    monkeypatch.setattr(batchnorm_relu_mean_rewrite, "ENABLED", False)
    assert batchnorm_relu_rewrite.MIN_ELEMENTS <= 8 * 8 * 24 * 24
    fused, fn, args = _train(4, True, monkeypatch)
    program = fn.lower(*args)
    names = [s.op.name for s in program.steps]
    assert names.count("batch_norm_relu_grad") == 2 and "relu_grad" not in names
    # the fused op reads x, not BatchNorm's output, and the running statistics' stores name
    # the relu's output as their control dependency: BatchNorm's output is read by its relu only
    relu_outs = {s.out for s in program.steps if s.op.name == "relu"}
    bn_outs = {s.out for s in program.steps if s.op.name == "batch_norm"}
    assert len(bn_outs) == 2
    for step in program.steps:
        if bn_outs & set(step.inputs):
            assert step.op.name == "relu"
        if step.op.name == "store":
            assert relu_outs & set(step.inputs[1:])
    # the conv biases' gradients come out of the fused ops' dx pass
    assert all(s.op.channel_sums for s in program.steps if s.op.name == "batch_norm_relu_grad")
    assert [s.op.shape for s in program.steps if s.op.name == "sum_to"] == [(1, 4)]
    assert any(p.startswith("batchnorm_relu_rewrite (2 ") for p in program.passes)
    plain, fn0, _ = _train(4, False, monkeypatch)
    assert "relu_grad" in [s.op.name for s in fn0.lower(*args).steps]
    for a, b in zip(fused, plain):
        assert _bits(a) == _bits(b)
    eager, _, _ = _train(4, True, monkeypatch, jit=False)
    for a, b in zip(fused, eager):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_relu_grad_read_elsewhere_is_not_rewritten():
    rng = np.random.default_rng(6)
    x = ndl.Tensor(rng.standard_normal((8, 8, 24, 24)).astype(np.float32))
    w = ndl.Tensor(np.ones((1, 8, 1, 1), np.float32))
    b = ndl.Tensor(np.zeros((1, 8, 1, 1), np.float32))

    def block(x, g, read_r_again):
        mean, var = ndl.ops.batch_stats(x, AXES)
        r = ndl.ops.relu_grad(ndl.ops.batch_norm(x, w, b, mean, var, axes=AXES), g)
        dx = ndl.ops.batch_norm_grad(r, x, w, mean, var, axes=AXES)[0]
        return dx + r if read_r_again else dx

    for read_r_again in (False, True):
        program = ndl.jit(lambda x, g, again=read_r_again: block(x, g, again)).lower(x, x)
        names = [s.op.name for s in program.steps]
        assert ("batch_norm_relu_grad" in names) is not read_r_again
        assert ("relu_grad" in names) is read_r_again
