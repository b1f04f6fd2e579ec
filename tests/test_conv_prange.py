"""conv's im2col forward and its two gradients, and the Winograd forward (conv and input
gradient), as one numba prange region each (kernels/conv.py ``_prange_conv``,
``_prange_weight_grad``, ``_prange_input_grad``; kernels/winograd.py ``_prange_conv3x3``;
kernels/numba_parallel_conv.py): patches and product (and col2im, or the tile transforms)
per block on numba's TBB threads, the products by NumPy's own OpenBLAS gemm
(kernels/openblas_gemm.py).

It must run where TBB and NumPy's OpenBLAS are (the loop's compiled signatures show it ran),
give bit for bit what the path without it gives (``parallel_threads()`` 0: one product per
block of images on one thread, or split across needle's two threads), on shapes whose blocks
are uneven, whatever numba's thread count, and agree with PyTorch.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from needle.backend import cpu_threads, parallel_loops
from needle.backend.numba_support import numba_module

from .helpers import loops_that_ran

pytest.importorskip("numba")
if numba_module() is None:
    pytest.skip("the prange loops need numba (NEEDLE_NUMBA=0)", allow_module_level=True)
from needle.kernels import blas_threads, openblas_gemm  # noqa: E402
from needle.kernels import conv as conv_kernels  # noqa: E402

# (label, NCHW input shape, C_out, stride, NCHW memory): each at least SPLIT_MIN_MACS
# multiply-adds, in blocks of uneven sizes (13 images in 3 blocks, 11 in 2 or 8, 13 in 8);
# inputs with at most 4 channels take the NCHW patches (conv._use_nchw), NHWC memory too
CASES = [("nhwc_s2", (13, 16, 32, 32), 32, 2, False),
         ("nhwc_s1_few_c", (11, 6, 24, 24), 32, 1, False),
         ("nhwc_s3_odd", (13, 7, 47, 49), 65, 3, False),
         ("nchw_first_layer", (11, 3, 32, 32), 16, 1, True),
         ("nhwc_first_layer", (11, 3, 32, 32), 16, 1, False),
         ("nchw_c1_s2", (13, 1, 45, 47), 72, 2, True)]


@pytest.fixture(autouse=True)
def _two_threads(monkeypatch):
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)
    # the im2col paths under test, not the direct loops (tests/test_conv_direct.py)
    monkeypatch.setattr(conv_kernels, "DIRECT_ENABLED", False)
    if not parallel_loops.parallel_threads():
        pytest.skip("numba's parallel loops do not run on TBB here (tbb wheel missing?)")
    if not blas_threads.available():
        pytest.skip("BLAS's thread count cannot be set: it cannot be held on one thread")
    if openblas_gemm.gemm(np.float32) is None:
        pytest.skip("NumPy's BLAS is not OpenBLAS")


def _inputs(case, dtype=np.float32, bias=True):
    _, shape, c_out, stride, nchw = case
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(dtype)
    a = x.transpose(0, 2, 3, 1) if nchw else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    w = (rng.standard_normal((3, 3, shape[1], c_out)) * 0.2).astype(dtype)
    b = rng.standard_normal(c_out).astype(dtype) if bias else None
    return a, w, b, stride


def _nchw_patches(case) -> bool:
    """Whether conv reads this case's input through the NCHW im2col (conv._use_nchw)."""
    return case[4] or case[1][1] <= conv_kernels.NCHW_MAX_CHANNELS


def _prange_ran(monkeypatch) -> list[str]:
    """Names of the prange loops that ran (through conv's NumbaLoops latch)."""
    return loops_that_ran(monkeypatch, conv_kernels._parallel_loops)


def _without_prange(a, w, b, stride, monkeypatch, threads: int):
    with monkeypatch.context() as m:
        m.setattr(parallel_loops, "tbb_layer", lambda: False)
        m.setattr(cpu_threads, "NUM_THREADS", threads)
        assert parallel_loops.parallel_threads() == 0
        return conv_kernels.conv2d(a, w, stride, 1, b)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("bias", [True, False])
def test_same_bits_as_without_prange(case, bias, monkeypatch):
    a, w, b, stride = _inputs(case, bias=bias)
    ran = _prange_ran(monkeypatch)
    got = conv_kernels.conv2d(a, w, stride, 1, b)
    loop = "_conv_channels_first_blocks" if _nchw_patches(case) else "_conv_rows_blocks"
    assert ran == [loop]
    module = conv_kernels._parallel_loops.module()
    assert getattr(module, loop.strip("_").replace("_blocks", "")).signatures
    assert got.flags.c_contiguous
    for threads in (1, 2):
        np.testing.assert_array_equal(got, _without_prange(a, w, b, stride, monkeypatch, threads))


NHWC_CASES = [c for c in CASES if not _nchw_patches(c)]


@pytest.mark.parametrize("case", NHWC_CASES, ids=[c[0] for c in NHWC_CASES])
def test_gradients_same_bits_as_without_prange(case, monkeypatch):
    a, w, b, stride = _inputs(case)
    g = np.random.default_rng(1).standard_normal(
        conv_kernels.conv2d(a, w, stride, 1, b).shape).astype(np.float32)
    ran = _prange_ran(monkeypatch)
    weight_grad = conv_kernels.conv2d_weight_grad(a, g, (3, 3), stride, 1)
    input_grad = conv_kernels.conv2d_input_grad(g, w, stride, 1, a.shape[1:3])
    assert ran == ["_weight_grad_rows_blocks", "_input_grad_blocks"]
    module = conv_kernels._parallel_loops.module()
    assert module.weight_grad_rows.signatures and module.input_grad.signatures
    for threads in (1, 2):
        with monkeypatch.context() as m:
            m.setattr(parallel_loops, "tbb_layer", lambda: False)
            m.setattr(cpu_threads, "NUM_THREADS", threads)
            np.testing.assert_array_equal(
                weight_grad, conv_kernels.conv2d_weight_grad(a, g, (3, 3), stride, 1))
            np.testing.assert_array_equal(
                input_grad, conv_kernels.conv2d_input_grad(g, w, stride, 1, a.shape[1:3]))


NCHW_CASES = [c for c in CASES if _nchw_patches(c)]


@pytest.mark.parametrize("case", NCHW_CASES, ids=[c[0] for c in NCHW_CASES])
def test_nchw_weight_grad_same_bits_as_without_prange(case, monkeypatch):
    a, w, b, stride = _inputs(case)
    g = np.random.default_rng(1).standard_normal(
        conv_kernels.conv2d(a, w, stride, 1, b).shape).astype(np.float32)
    ran = _prange_ran(monkeypatch)
    got = conv_kernels.conv2d_weight_grad(a, g, (3, 3), stride, 1)
    assert ran == ["_weight_grad_channels_first_blocks"]
    assert conv_kernels._parallel_loops.module().weight_grad_channels_first.signatures
    for threads in (1, 2):
        with monkeypatch.context() as m:
            m.setattr(parallel_loops, "tbb_layer", lambda: False)
            m.setattr(cpu_threads, "NUM_THREADS", threads)
            np.testing.assert_array_equal(
                got, conv_kernels.conv2d_weight_grad(a, g, (3, 3), stride, 1))


# (N, H, W, C_in, C_out): Winograd's stride-1 3x3 convolutions, uneven last blocks of tiles
WINOGRAD = [(13, 17, 19, 24, 40), (5, 4, 5, 128, 128), (3, 30, 30, 8, 16)]


@pytest.mark.parametrize("shape", WINOGRAD, ids=[str(s) for s in WINOGRAD])
def test_winograd_same_bits_as_without_prange(shape, monkeypatch):
    from needle.kernels import winograd

    n, h, w_, c_in, c_out = shape
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, h, w_, c_in)).astype(np.float32)
    w = (rng.standard_normal((3, 3, c_in, c_out)) * 0.2).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)
    ran: list[str] = []
    real = winograd._parallel_loops.call
    monkeypatch.setattr(winograd._parallel_loops, "call",
                        lambda loop, *args: ran.append(loop.__name__) or real(loop, *args))
    out = conv_kernels.conv2d(x, w, 1, 1, b)
    g = rng.standard_normal(out.shape).astype(np.float32)
    input_grad = conv_kernels.conv2d_input_grad(g, w, 1, 1, (h, w_))
    if not winograd.applies(x, w, (3, 3), 1, 1, c_in, c_out):
        pytest.skip("the Winograd path does not take this convolution here")
    # (a 128 x 128 kernel's transforms run as TBB blocks too: _transform_columns_blocks)
    assert [name for name in ran if name != "_transform_columns_blocks"] == \
        ["_winograd_blocks"] * 2
    assert winograd._parallel_loops.module().winograd.signatures
    for threads in (1, 2):
        with monkeypatch.context() as m:
            m.setattr(parallel_loops, "tbb_layer", lambda: False)
            m.setattr(cpu_threads, "NUM_THREADS", threads)
            np.testing.assert_array_equal(out, conv_kernels.conv2d(x, w, 1, 1, b))
            np.testing.assert_array_equal(
                input_grad, conv_kernels.conv2d_input_grad(g, w, 1, 1, (h, w_)))


def test_gradients_against_torch():
    torch = pytest.importorskip("torch")
    a, w, b, stride = _inputs(CASES[0])
    ta = torch.tensor(np.ascontiguousarray(a.transpose(0, 3, 1, 2)), requires_grad=True)
    tw = torch.tensor(np.ascontiguousarray(w.transpose(3, 2, 0, 1)), requires_grad=True)
    out = torch.nn.functional.conv2d(ta, tw, stride=stride, padding=1)
    g = np.random.default_rng(2).standard_normal(out.shape).astype(np.float32)
    out.backward(torch.from_numpy(g))
    g_nhwc = np.ascontiguousarray(g.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(conv_kernels.conv2d_weight_grad(a, g_nhwc, (3, 3), stride, 1),
                               tw.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(conv_kernels.conv2d_input_grad(g_nhwc, w, stride, 1,
                                                              a.shape[1:3]),
                               ta.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


def test_same_bits_on_one_numba_thread(monkeypatch):
    """The blocks are fixed by the shape: numba on one thread gives the same bits."""
    import numba

    a, w, b, stride = _inputs(CASES[0])
    got = conv_kernels.conv2d(a, w, stride, 1, b)
    count = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        monkeypatch.setattr(parallel_loops, "parallel_threads", lambda: 1)
        again = conv_kernels.conv2d(a, w, stride, 1, b)
    finally:
        numba.set_num_threads(count)
    np.testing.assert_array_equal(got, again)


def test_float64(monkeypatch):
    if openblas_gemm.gemm(np.float64) is None:
        pytest.skip("no dgemm")
    a, w, b, stride = _inputs(CASES[0], np.float64)
    ran = _prange_ran(monkeypatch)
    got = conv_kernels.conv2d(a, w, stride, 1, b)
    assert ran == ["_conv_rows_blocks"] and got.dtype == np.float64
    np.testing.assert_array_equal(got, _without_prange(a, w, b, stride, monkeypatch, 2))


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=[CASES[0][0], CASES[3][0]])
def test_against_torch(case):
    torch = pytest.importorskip("torch")
    a, w, b, stride = _inputs(case)
    got = conv_kernels.conv2d(a, w, stride, 1, b)
    expected = torch.nn.functional.conv2d(
        torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))),
        torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))), torch.from_numpy(b),
        stride=stride, padding=1).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_openblas_gemm_is_numpys_product(dtype):
    """The ctypes gemm, called from Python on a row block and transposed, gives NumPy's
    matmul bit for bit (its BLAS, the same kernels)."""
    gemm = openblas_gemm.gemm(dtype)
    if gemm is None:
        pytest.skip("no gemm for this dtype")
    rng = np.random.default_rng(3)
    a = rng.standard_normal((300, 70)).astype(dtype)
    b = rng.standard_normal((70, 40)).astype(dtype)
    c = np.empty((300, 40), dtype)
    gemm(openblas_gemm.ROW_MAJOR, openblas_gemm.NO_TRANS, openblas_gemm.NO_TRANS, 300, 40, 70,
         1.0, a.ctypes.data, 70, b.ctypes.data, 40, 0.0, c.ctypes.data, 40)
    np.testing.assert_array_equal(c, a @ b)
    t = np.empty((70, 40), dtype)
    g = rng.standard_normal((300, 40)).astype(dtype)
    gemm(openblas_gemm.ROW_MAJOR, openblas_gemm.TRANS, openblas_gemm.NO_TRANS, 70, 40, 300,
         1.0, a.ctypes.data, 70, g.ctypes.data, 40, 0.0, t.ctypes.data, 40)
    np.testing.assert_array_equal(t, a.T @ g)


def test_falls_back(monkeypatch):
    """No OpenBLAS gemm, mixed dtypes or a small conv: the path without prange (the same
    results), the prange loop not run; on another thread the prange loop runs, with the
    same bits."""
    a, w, b, stride = _inputs(CASES[0])
    reference = _without_prange(a, w, b, stride, monkeypatch, 2)
    ran = _prange_ran(monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(openblas_gemm, "gemm", lambda dtype: None)
        np.testing.assert_array_equal(conv_kernels.conv2d(a, w, stride, 1, b), reference)
    np.testing.assert_allclose(conv_kernels.conv2d(a, w.astype(np.float64), stride, 1, b),
                               reference, rtol=1e-5, atol=1e-5)
    conv_kernels.conv2d(a[:1, :6, :6], w, stride, 1, b)  # below SPLIT_MIN_MACS
    assert ran == []
    results = []
    worker = threading.Thread(target=lambda: results.append(
        conv_kernels.conv2d(a, w, stride, 1, b)))
    worker.start()
    worker.join()
    np.testing.assert_array_equal(results[0], reference)
    assert ran
