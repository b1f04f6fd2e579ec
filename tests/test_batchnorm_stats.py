"""``batch_stats``: BatchNorm's batch mean and biased variance in one op and, with numba, one
pass (kernels/cpu_kernels.column_statistics), checked against float64 NumPy, the NumPy
fallback, any thread count, and BatchNorm's modes (eager, ndl.jit, a Session)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needle as ndl
import needle.nn as nn
import needle.static as st
from needle import ops
from needle.backend import cpu_threads
from needle.kernels import batchnorm, cpu_kernels, layout
from needle.kernels.reduce import moments

needs_kernels = pytest.mark.skipif(cpu_kernels._kernels() is None,
                                   reason="numba is not installed or NEEDLE_NUMBA=0")


def _channels_last(rng, n, c, h, w, loc=0.0):
    """An NCHW array with NHWC memory (as nn.Conv's outputs are)."""
    data = (rng.standard_normal((n, h, w, c)) * 2.0 + loc).astype(np.float32)
    return data.transpose(0, 3, 1, 2)


CASES = [  # (shape maker, axes): the MLP's (B, C), a blocked (M, C), channels-last NCHW, NCHW
    (lambda rng, loc: (rng.standard_normal((100, 50)) * 2 + loc).astype(np.float32), (0,)),
    (lambda rng, loc: (rng.standard_normal((2100, 512)) * 2 + loc).astype(np.float32), (0,)),
    (lambda rng, loc: _channels_last(rng, 8, 16, 32, 32, loc), (0, 2, 3)),
    (lambda rng, loc: (rng.standard_normal((4, 3, 5, 5)) * 2 + loc).astype(np.float32),
     (0, 2, 3)),
]


@pytest.mark.parametrize("loc", [0.0, 1000.0])  # far from 0: a naive one-pass sum cancels
@pytest.mark.parametrize("case", range(len(CASES)))
def test_statistics_match_float64(case, loc):
    make, axes = CASES[case]
    x = make(np.random.default_rng(case), loc)
    mean, var = ops.batch_stats(ndl.Tensor(x), axes=axes)
    x64 = x.astype(np.float64)
    want_mean, want_var = x64.mean(axis=axes, keepdims=True), x64.var(axis=axes, keepdims=True)
    assert mean.shape == want_mean.shape and var.shape == want_var.shape
    assert mean.dtype == np.float32 and var.dtype == np.float32
    # (NumPy's float32 sums, without numba, are within a few float32 roundings)
    rtol = 1e-6 if cpu_kernels._kernels() is not None else 5e-6
    np.testing.assert_allclose(mean.numpy(), want_mean, rtol=rtol, atol=1e-6)
    # the two-pass float32 variance is this close too (its centered values are float32)
    np.testing.assert_allclose(var.numpy(), want_var, rtol=2e-6 if loc == 0 else 5e-4)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_statistics_match_the_numpy_path_and_mean_variance(case):
    make, axes = CASES[case]
    x = make(np.random.default_rng(10 + case), 3.0)
    mean, var = batchnorm.statistics(x, axes)
    ref_mean, _, ref_var = moments(x, axes)  # the NumPy path (no numba)
    np.testing.assert_allclose(mean, ref_mean, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=2e-6)
    t = ndl.Tensor(x)
    np.testing.assert_allclose(var, ops.variance(t, axes, keepdims=True).numpy(), rtol=2e-6)


@needs_kernels
def test_blocked_statistics_do_not_depend_on_the_thread_count(monkeypatch):
    """Large matrices are summed in row blocks fixed by the shape: one thread and two give
    the same bits."""
    x = np.random.default_rng(3).standard_normal((4096, 300)).astype(np.float32) + 5.0
    assert cpu_kernels.row_blocks(x) is not None
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(cpu_threads, "NUM_THREADS", threads)
        results.append(cpu_kernels.column_statistics(x))
    for mean, var in results[1:]:
        np.testing.assert_array_equal(mean, results[0][0])
        np.testing.assert_array_equal(var, results[0][1])


@needs_kernels
def test_compiled_paths_are_taken():
    """The MLP's (B, C) and a channels-last NCHW array take the one-pass kernel."""
    rng = np.random.default_rng(4)
    assert batchnorm._compiled_matrix(np.ones((100, 50), np.float32), (0,)) is not None
    x = _channels_last(rng, 8, 16, 32, 32)
    assert layout.channel_matrix(x, 1) is not None
    assert batchnorm._compiled_matrix(x, (0, 2, 3)) is not None


def test_float64_statistics_are_the_two_pass_ones():
    x = np.random.default_rng(5).standard_normal((64, 7)) * 3 + 100
    mean, var = batchnorm.statistics(x, (0,))
    np.testing.assert_allclose(mean, x.mean(0, keepdims=True), rtol=1e-15)
    np.testing.assert_allclose(var, x.var(0, keepdims=True), rtol=1e-13)


def test_gradient_matches_torch():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 2, 2)).astype(np.float64)
    gm, gv = rng.standard_normal((2, 1, 4, 1, 1))
    t = ndl.Tensor(x, requires_grad=True, dtype="float64")
    mean, var = ops.batch_stats(t, axes=(0, 2, 3))
    (mean * ndl.Tensor(gm, dtype="float64") + var * ndl.Tensor(gv, dtype="float64")).sum() \
        .backward()
    tx = torch.tensor(x, requires_grad=True)
    tm, tv = tx.mean((0, 2, 3), keepdim=True), tx.var((0, 2, 3), unbiased=False, keepdim=True)
    (tm * torch.tensor(gm) + tv * torch.tensor(gv)).sum().backward()
    np.testing.assert_allclose(t.grad.numpy(), tx.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_shape_errors_name_the_op():
    with pytest.raises(Exception, match="batch_stats"):
        ops.batch_stats(ndl.Tensor(np.ones((3, 4), np.float32)), axes=(2,))


def _torch_bn_step(x, bn_cls, c):
    tbn = bn_cls(c, momentum=0.1)
    y = tbn(torch.tensor(x))
    return y.detach().numpy(), tbn.running_mean.numpy()


@pytest.mark.parametrize("two_d", [True, False])
def test_batchnorm_training_eager_jit_session_agree(two_d):
    """BatchNorm's output and running statistics in eager, under ndl.jit (the stores run on
    every call) and in a Session (the stores run with st.state_updates)."""
    rng = np.random.default_rng(7)
    if two_d:
        x = (rng.standard_normal((32, 6)) * 3 + 2).astype(np.float32)
        make, tcls = (lambda: nn.BatchNorm1d(6)), torch.nn.BatchNorm1d
    else:
        x = (rng.standard_normal((4, 3, 5, 5)) * 3 + 2).astype(np.float32)
        make, tcls = (lambda: nn.BatchNorm2d(3)), torch.nn.BatchNorm2d
    want_y, want_mean = _torch_bn_step(x, tcls, x.shape[1])

    eager = make()
    y = eager(ndl.Tensor(x))
    np.testing.assert_allclose(y.numpy(), want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eager.running_mean.numpy(), want_mean, rtol=1e-6, atol=1e-7)

    jitted_bn = make()
    fn = ndl.jit(lambda t: jitted_bn(t))
    for _ in range(2):
        y_jit = fn(ndl.Tensor(x))
    np.testing.assert_allclose(y_jit.numpy(), y.numpy(), rtol=1e-6, atol=1e-6)
    twice = 0.9 * want_mean + want_mean  # torch's one update is 0.1 * batch mean
    np.testing.assert_allclose(jitted_bn.running_mean.numpy(), twice, rtol=1e-5, atol=1e-6)

    with st.Graph():
        declared = make()
        p = st.placeholder(x.shape)
        out = declared(p)
        updates = st.state_updates(out)
        assert len(updates) == 2
        sess = st.Session()
        y_st = sess.run([out, *updates], {p: x})[0]
    np.testing.assert_allclose(np.asarray(y_st), y.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(declared.running_mean.numpy(), want_mean, rtol=1e-6, atol=1e-7)


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(100, 50), (7, 3)])
def test_one_call_kernels_are_bit_identical_to_the_formulas(dtype, shape, monkeypatch):
    """batch_norm's one-call kernel (alpha and beta inside) against the NumPy formulas, and
    batch_norm_grad's (inv inside) against the kernel given NumPy's inv: the same bits."""
    from needle.core.ops_norm import BatchNorm, BatchNormGrad

    rng = np.random.default_rng(8)
    x, g = (rng.standard_normal(shape).astype(dtype) * 3 + 1 for _ in range(2))
    weight, bias = rng.uniform(0.5, 2, shape[1]).astype(dtype), rng.standard_normal(
        shape[1]).astype(dtype)
    mean, var = batchnorm.statistics(x, (0,))
    y = BatchNorm((0,), 1e-5).compute(x, weight, bias, mean, var)
    grads = BatchNormGrad((0,), 1e-5).compute(g, x, weight, mean, var)
    inv = 1.0 / np.sqrt(var + 1e-5)
    want_grads = cpu_kernels.batch_norm_grad(g, x, mean, inv, weight)
    for got, want in zip(grads, want_grads):
        np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(cpu_kernels, "_kernels", lambda: None)  # the NumPy formulas
    want_y = BatchNorm((0,), 1e-5).compute(x, weight, bias, mean, var)
    assert y.dtype == want_y.dtype == dtype
    np.testing.assert_array_equal(y, want_y)


def test_onnx_export_of_batch_statistics_matches_onnxruntime():
    """batch_stats exports as ReduceMean/Sub/Mul (two outputs); a batch-statistics
    normalization runs in onnxruntime as in needle, at another batch size too."""
    ort = pytest.importorskip("onnxruntime")
    nox = pytest.importorskip("needle.onnx")

    class BatchStandardize(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(ndl.Tensor(np.linspace(0.5, 2, 5).astype(np.float32)))
            self.bias = nn.Parameter(ndl.Tensor(np.linspace(-1, 1, 5).astype(np.float32)))

        def forward(self, x):
            mean, var = ops.batch_stats(x, axes=(0,))
            return ops.batch_norm(x, self.weight, self.bias, mean, var, axes=(0,)) + var

    model = BatchStandardize()
    rng = np.random.default_rng(9)
    example, other = (rng.standard_normal((n, 5)).astype(np.float32) * 2 + 3 for n in (8, 13))
    proto = nox.export(model, [ndl.Tensor(example)], None, batch_axis=0)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for x in (example, other):
        (got,) = sess.run(None, {"input": x})
        np.testing.assert_allclose(got, model(ndl.Tensor(x)).numpy(), rtol=1e-5, atol=1e-5)


def test_caffe_op_layer_gradient_check():
    """batch_stats as a Caffe OpLayer (two tops): its backward passes Caffe's gradient check."""
    import needle.caffe as cf

    layer = cf.OpLayer("batch_stats", axes=(0, 2, 3))
    x = np.random.default_rng(11).standard_normal((3, 2, 2, 2)) * 2 + 1
    report = cf.check_gradient(layer, bottoms=[x])  # (raises on a failure)
    assert report.checked == x.size and report.max_error <= 1e-6, report
