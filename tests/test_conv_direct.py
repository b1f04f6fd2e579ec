"""conv's direct loops (kernels/numba_direct_conv.py; kernels/conv.py ``_direct_conv``,
``_direct_weight_grad``, ``_direct_input_grad``): the forward, kernel gradient and input
gradient of float32 NHWC convolutions with 16, 32, 48 or 64 output (input, for the input
gradient) channels, no im2col matrix and no BLAS.

They must run where they apply (counted through conv's latch), agree with PyTorch on strides,
paddings, kernel sizes and widths that leave a partial block of 8 positions, give the same bits
in one prange region as one block after another (``parallel_threads()`` 0) on uneven blocks,
and leave the shapes they do not take to im2col.
"""

from __future__ import annotations

import numpy as np
import pytest

from needle.backend import cpu_threads, parallel_loops
from needle.backend.numba_support import numba_module

from .helpers import loops_that_ran

torch = pytest.importorskip("torch")
pytest.importorskip("numba")
if numba_module() is None:
    pytest.skip("the direct loops need numba (NEEDLE_NUMBA=0)", allow_module_level=True)
from needle.kernels import conv as conv_kernels  # noqa: E402

# (label, N, C_in, H, W, C_out, k, stride, padding, NCHW memory)
CASES = [("s2_c16_32", 13, 16, 32, 32, 32, 3, 2, 1, False),
         ("s2_c32_64", 5, 32, 16, 16, 64, 3, 2, 1, False),
         ("s1_odd_width", 3, 6, 9, 13, 48, 3, 1, 1, False),
         ("s3_k5_pad2", 4, 6, 17, 25, 16, 5, 3, 2, True),
         ("k1_s1", 2, 24, 7, 11, 32, 1, 1, 0, False),
         ("s2_pad0_nchw", 6, 5, 15, 19, 16, 3, 2, 0, True)]
IDS = [case[0] for case in CASES]


def _inputs(case, seed: int = 0):
    _, n, c_in, h, w, c_out, k, stride, padding, nchw = case
    rng = np.random.default_rng(seed + n * c_in)
    x = rng.standard_normal((n, c_in, h, w)).astype(np.float32)
    a = x.transpose(0, 2, 3, 1) if nchw else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    kernel = (rng.standard_normal((k, k, c_in, c_out)) * 0.2).astype(np.float32)
    bias = rng.standard_normal(c_out).astype(np.float32)
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    g = rng.standard_normal((n, ho, wo, c_out)).astype(np.float32)
    return x, a, kernel, bias, g


def _torch_conv(x, kernel, bias, stride, padding):
    return torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))),
        None if bias is None else torch.from_numpy(bias), stride, padding
    ).numpy().transpose(0, 2, 3, 1)


def _torch_weight_grad(x, kernel, g, stride, padding):
    grads = torch.ops.aten.convolution_backward(
        torch.from_numpy(np.ascontiguousarray(g.transpose(0, 3, 1, 2))), torch.from_numpy(x),
        torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))), None,
        [stride, stride], [padding, padding], [1, 1], False, [0, 0], 1, [False, True, False])
    return grads[1].numpy().transpose(2, 3, 1, 0)


def _ran(monkeypatch) -> list[str]:
    """Names of the direct loops that ran (through conv's latch for them)."""
    return loops_that_ran(monkeypatch, conv_kernels._direct_loops)


@pytest.fixture
def serial(monkeypatch):
    """Turns numba's parallel loops off for the duration (the blocks then run one after
    another on this thread)."""
    def off():
        monkeypatch.setattr(parallel_loops, "tbb_layer", lambda: False)
    return off


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_matches_torch(case, with_bias, monkeypatch):
    x, a, kernel, bias, _ = _inputs(case)
    stride, padding = case[7], case[8]
    ran = _ran(monkeypatch)
    got = conv_kernels.conv2d(a, kernel, stride, padding, bias if with_bias else None)
    assert ran and ran[0] in ("_forward_blocks", "forward32", "forward16")
    assert got.flags.c_contiguous and got.dtype == np.float32
    want = _torch_conv(x, kernel, bias if with_bias else None, stride, padding)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _torch_input_grad(x, kernel, g, stride, padding):
    grads = torch.ops.aten.convolution_backward(
        torch.from_numpy(np.ascontiguousarray(g.transpose(0, 3, 1, 2))), torch.from_numpy(x),
        torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))), None,
        [stride, stride], [padding, padding], [1, 1], False, [0, 0], 1, [True, False, False])
    return grads[0].numpy().transpose(0, 2, 3, 1)


# (label, N, C_in, H, W, C_out, k, stride, padding, NCHW memory): C_in a multiple of 16
INPUT_GRAD_CASES = [("s2_c16_32", 13, 16, 32, 32, 32, 3, 2, 1, False),
                    ("s2_c32_64_odd", 3, 32, 17, 19, 64, 3, 2, 1, False),
                    ("s3_k5_pad2", 2, 16, 20, 26, 16, 5, 3, 2, False),
                    ("s1_k5_pad0", 2, 48, 11, 12, 16, 5, 1, 0, False),
                    ("s2_k1", 3, 16, 18, 18, 32, 1, 2, 0, False)]


@pytest.mark.parametrize("case", INPUT_GRAD_CASES, ids=[c[0] for c in INPUT_GRAD_CASES])
def test_input_grad_matches_torch(case, monkeypatch, serial):
    x, _, kernel, _, g = _inputs(case)
    stride, padding, h, w = case[7], case[8], case[3], case[4]
    ran = _ran(monkeypatch)
    got = conv_kernels.conv2d_input_grad(g, kernel, stride, padding, (h, w))
    assert ran and ran[0] in ("_input_grad_blocks", "input_grad32", "input_grad16")
    assert got.flags.c_contiguous and got.shape == (case[1], h, w, case[2])
    np.testing.assert_allclose(got, _torch_input_grad(x, kernel, g, stride, padding),
                               rtol=1e-4, atol=1e-4)
    serial()  # one image after another: the same bits
    np.testing.assert_array_equal(
        conv_kernels.conv2d_input_grad(g, kernel, stride, padding, (h, w)), got)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_weight_grad_matches_torch(case, monkeypatch):
    x, a, kernel, _, g = _inputs(case)
    stride, padding, k = case[7], case[8], case[6]
    ran = _ran(monkeypatch)
    got = conv_kernels.conv2d_weight_grad(a, g, (k, k), stride, padding)
    want = _torch_weight_grad(x, kernel, g, stride, padding)
    assert ran and ran[0] in ("_weight_grad_blocks", "weight_grad64", "weight_grad32",
                              "weight_grad16")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


FIRST_LAYER = ("first_layer_nchw", 13, 3, 32, 32, 16, 3, 1, 1, True)


@pytest.mark.parametrize("case", CASES[:3] + [FIRST_LAYER], ids=IDS[:3] + [FIRST_LAYER[0]])
def test_prange_same_bits_as_serial(case, monkeypatch, serial):
    """One prange region over uneven blocks of images (13 images in 8 blocks) gives what the
    blocks one after another give, bit for bit."""
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)
    if not parallel_loops.parallel_threads():
        pytest.skip("numba's parallel loops do not run on TBB here (tbb wheel missing?)")
    _, a, kernel, bias, g = _inputs(case)
    stride, padding, k = case[7], case[8], case[6]
    ran = _ran(monkeypatch)
    forward = conv_kernels.conv2d(a, kernel, stride, padding, bias)
    weight_grad = conv_kernels.conv2d_weight_grad(a, g, (k, k), stride, padding)
    assert ran[0] == ("_forward_few_channels_blocks" if case[2] <= 4 else "_forward_blocks")
    if case[5] <= conv_kernels.DIRECT_WEIGHT_GRAD_MAX_COUT:
        assert ran[1] == "_weight_grad_blocks"
    serial()
    ran.clear()
    np.testing.assert_array_equal(conv_kernels.conv2d(a, kernel, stride, padding, bias), forward)
    np.testing.assert_array_equal(
        conv_kernels.conv2d_weight_grad(a, g, (k, k), stride, padding), weight_grad)
    assert ran and not any(name.endswith("_blocks") for name in ran)


def test_shapes_not_taken_go_to_im2col(monkeypatch):
    """C_out not a multiple of 16 or over 64, float64, a first layer's 3 channels at stride 2
    or with fewer than 16 positions a row, fewer than 8 positions a row: im2col."""
    ran = _ran(monkeypatch)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 9, 9, 8)).astype(np.float32)
    conv_kernels.conv2d(a, rng.standard_normal((3, 3, 8, 24)).astype(np.float32), 1, 1)
    conv_kernels.conv2d(a.astype(np.float64), rng.standard_normal((3, 3, 8, 32)), 1, 1)
    first = rng.standard_normal((2, 20, 20, 3)).astype(np.float32)
    conv_kernels.conv2d(first, rng.standard_normal((3, 3, 3, 16)).astype(np.float32), 2, 1)
    narrow = rng.standard_normal((2, 9, 9, 3)).astype(np.float32)  # Wo < 16: no full tile
    conv_kernels.conv2d(narrow, rng.standard_normal((3, 3, 3, 16)).astype(np.float32), 1, 1)
    conv_kernels.conv2d(a[:, :, :7], rng.standard_normal((3, 3, 8, 32)).astype(np.float32), 1,
                        1)  # Wo < 8
    wide = rng.standard_normal((2, 5, 5, 80)).astype(np.float32)  # C_out over DIRECT_MAX_COUT
    conv_kernels.conv2d_weight_grad(a, wide, (3, 3), 2, 1)
    assert ran == []


@pytest.mark.parametrize("nchw", [True, False])
def test_first_layer_forward_matches_torch(nchw, monkeypatch):
    """A first layer (3 channels, stride 1) takes forward_few_channels, vectorized over
    positions; Wo = 20 leaves a last tile overlapping the one before."""
    case = ("first", 3, 3, 18, 20, 16, 3, 1, 1, nchw)
    x, a, kernel, bias, _ = _inputs(case)
    ran = _ran(monkeypatch)
    got = conv_kernels.conv2d(a, kernel, 1, 1, bias)
    assert ran and ran[0] in ("_forward_few_channels_blocks", "forward_few_channels")
    np.testing.assert_allclose(got, _torch_conv(x, kernel, bias, 1, 1), rtol=1e-4, atol=1e-4)


def test_disabled_gives_im2col_within_tolerance(monkeypatch):
    """The switch for A/B runs: DIRECT_ENABLED False takes im2col, the same values to float32
    rounding (the sums run in another order)."""
    case = CASES[0]
    _, a, kernel, bias, g = _inputs(case)
    direct = conv_kernels.conv2d(a, kernel, 2, 1, bias)
    direct_grad = conv_kernels.conv2d_weight_grad(a, g, (3, 3), 2, 1)
    monkeypatch.setattr(conv_kernels, "DIRECT_ENABLED", False)
    ran = _ran(monkeypatch)
    np.testing.assert_allclose(conv_kernels.conv2d(a, kernel, 2, 1, bias), direct,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(conv_kernels.conv2d_weight_grad(a, g, (3, 3), 2, 1),
                               direct_grad, rtol=1e-4, atol=1e-3)
    assert ran == []
