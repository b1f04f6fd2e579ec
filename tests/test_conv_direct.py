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
@pytest.mark.parametrize("width,c_out", [(20, 16), (40, 32)])
def test_first_layer_forward_matches_torch(nchw, width, c_out, monkeypatch):
    """A first layer (3 channels, stride 1) takes forward_few_channels, vectorized over
    positions: Wo = 20 in 16 x 4 tiles, Wo = 40 in 32 x 8 tiles stored transposed
    (forward_few_channels32, store_tile_columns); each leaves a last tile overlapping the
    one before."""
    case = ("first", 3, 3, 18, width, c_out, 3, 1, 1, nchw)
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


# -- the padded scratch and the first layer's kernel gradient ------------------------------------
def _layouts(n: int, h: int, w: int, c: int, seed: int = 3) -> dict:
    """One batch as NHWC (C-contiguous), as an NCHW array's NHWC view, and as a strided
    NHWC slice (every other column of a wider batch)."""
    rng = np.random.default_rng(seed + c)
    nhwc = rng.standard_normal((n, h, w, c)).astype(np.float32)
    nchw = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    wide = np.repeat(nhwc, 2, axis=2)[:, :, ::2]
    return {"nhwc": nhwc, "nchw_view": nchw, "strided": wide}


@pytest.mark.parametrize("c", [1, 3, 5, 16])
@pytest.mark.parametrize("padding", [0, 1, 2])
def test_pad_image_is_np_pad(c, padding):
    """pad_image zeroes only the border and copies the rows (one run each for C-contiguous
    images, value by value for views): the scratch is np.pad's, wherever it held garbage."""
    from needle.kernels import numba_direct_conv as nd
    for layout, a in _layouts(3, 7, 9, c).items():
        xp = np.full((7 + 2 * padding, 9 + 2 * padding, c), np.nan, np.float32)
        for b in range(a.shape[0]):
            nd.pad_image(a, b, padding, xp)
            want = np.pad(a[b], ((padding, padding), (padding, padding), (0, 0)))
            np.testing.assert_array_equal(xp, want, err_msg=f"{layout} image {b}")



@pytest.mark.parametrize("c", [3, 16])
@pytest.mark.parametrize("padding", [0, 1, 2])
def test_pad_image_bn_relu_is_relu_of_the_affine_padded(c, padding):
    """pad_image_bn_relu stores relu(a * alpha + beta) (two float32 roundings, NaN kept,
    -0.0 made +0.0) inside a zero border, for every layout of a (flat rows for C-contiguous
    images, value by value for views), wherever the scratch held garbage."""
    from needle.kernels import numba_direct_conv as nd
    rng = np.random.default_rng(c + padding)
    alpha = rng.standard_normal(c).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    for layout, a in _layouts(3, 7, 9, c).items():
        a = a.copy() if layout == "nhwc" else a
        if layout == "nhwc":
            a[0, 0, 0, :2] = [np.nan, -0.0]
        alpha_used, beta_used = alpha.copy(), beta.copy()
        alpha_used[1], beta_used[1] = 1.0, -0.0  # -0.0 * 1 + -0.0: a -0.0 for relu to clear
        xp = np.full((7 + 2 * padding, 9 + 2 * padding, c), np.nan, np.float32)
        for b in range(a.shape[0]):
            nd.pad_image_bn_relu(a, b, padding, xp, alpha_used, beta_used)
            v = a[b] * alpha_used + beta_used
            v = np.where((v > 0) | np.isnan(v), v, np.float32(0.0))
            want = np.pad(v, ((padding, padding), (padding, padding), (0, 0)))
            assert np.array_equal(xp.view(np.int32), want.view(np.int32)), f"{layout} image {b}"


@pytest.mark.parametrize("kh,kw", [(3, 3), (3, 1), (1, 2)])
def test_pad_gradient_is_np_pad(kh, kw):
    """The input gradient loops' scratch: g's image inside kh zero rows and kw zero columns on
    each side (only the border zeroed, the rows copied), wherever it held garbage."""
    from needle.kernels import numba_direct_conv as nd
    g = np.random.default_rng(kh * 7 + kw).standard_normal((2, 5, 6, 16)).astype(np.float32)
    gp = np.full((5 + 2 * kh, 6 + 2 * kw, 16), np.nan, np.float32)
    for b in range(2):
        nd.pad_gradient(g, b, kh, kw, gp)
        np.testing.assert_array_equal(gp, np.pad(g[b], ((kh, kh), (kw, kw), (0, 0))))

def _fma_sums(cols: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Per image, from zero, sum over positions in order of cols[n, p, t] * g[n, p, k], each
    step one float32 fused multiply-add (the product is exact in float64, the add rounded
    once more to float32: the same bits as an FMA but for double-rounding ties, which these
    fixed inputs do not meet); (N, taps, C_out)."""
    acc = np.zeros((cols.shape[0], cols.shape[2], g.shape[2]), np.float32)
    for p in range(cols.shape[1]):
        acc = (acc.astype(np.float64) + cols[:, p, :, None].astype(np.float64)
               * g[:, p, None, :].astype(np.float64)).astype(np.float32)
    return acc


def _first_layer_weight_grad_order(a, g, stride: int, padding: int) -> np.ndarray:
    """The direct kernel gradient's order for a first layer, in NumPy: blocks of images fixed
    by N (DIRECT_WEIGHT_GRAD_BLOCKS), within a block each image's sums (``_fma_sums``) added
    to the block's float32 part in image order, the parts added in block order."""
    n, h, w, c = a.shape
    _, ho, wo, c_out = g.shape
    xp = np.pad(a, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    cols = np.empty((n, ho, wo, 3, 3, c), np.float32)  # (i, j, c) taps
    for i in range(3):
        for j in range(3):
            cols[:, :, :, i, j] = xp[:, i:i + stride * (ho - 1) + 1:stride,
                                     j:j + stride * (wo - 1) + 1:stride]
    sums = _fma_sums(cols.reshape(n, ho * wo, 9 * c), g.reshape(n, ho * wo, c_out))
    count = min(n, conv_kernels.DIRECT_WEIGHT_GRAD_BLOCKS)
    total = None
    for blk in range(count):
        part = np.zeros((9 * c, c_out), np.float32)
        for image in range(n * blk // count, n * (blk + 1) // count):
            part += sums[image]
        total = part if total is None else total + part
    return total.reshape(3, 3, c, c_out)


# (label, N, C_in, H, W, C_out, stride, padding, layout)
FIRST_LAYER_CASES = [("s1_p1_nchw", 11, 3, 9, 13, 16, 1, 1, "nchw_view"),
                     ("s1_p1_nhwc_c32", 3, 3, 8, 10, 32, 1, 1, "nhwc"),
                     ("s2_p0_odd", 9, 3, 11, 9, 16, 2, 0, "nhwc"),
                     ("s2_p2_strided", 4, 3, 7, 12, 16, 2, 2, "strided"),
                     ("one_channel_s1_p1", 10, 1, 9, 11, 16, 1, 1, "nchw_view"),
                     ("one_channel_s2_p2_c32", 3, 1, 8, 7, 32, 2, 2, "nhwc")]


@pytest.mark.parametrize("case", FIRST_LAYER_CASES, ids=[c[0] for c in FIRST_LAYER_CASES])
def test_first_layer_weight_grad_order(case, monkeypatch, serial):
    """A first layer's kernel gradient (3x3 over 3 or 1 channels: weight_grad16 hands it to
    the 27 x 16 or 9 x 16 tile) is the transcribed order's sums, bit for bit, in one prange
    region and one block after another, and agrees with PyTorch."""
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)  # (a prange region where TBB runs)
    _, n, c, h, w, c_out, stride, padding, layout = case
    a = _layouts(n, h, w, c)[layout]
    ho, wo = (h + 2 * padding - 3) // stride + 1, (w + 2 * padding - 3) // stride + 1
    g = np.random.default_rng(n).standard_normal((n, ho, wo, c_out)).astype(np.float32)
    want = _first_layer_weight_grad_order(a, g, stride, padding)
    ran = _ran(monkeypatch)
    got = conv_kernels.conv2d_weight_grad(a, g, (3, 3), stride, padding)
    assert ran and ran[0] in ("_weight_grad_blocks", "weight_grad16")
    np.testing.assert_array_equal(got, want)
    x = np.ascontiguousarray(a.transpose(0, 3, 1, 2))
    kernel = np.zeros((3, 3, c, c_out), np.float32)
    np.testing.assert_allclose(got, _torch_weight_grad(x, kernel, g, stride, padding),
                               rtol=1e-4, atol=1e-4)
    serial()
    np.testing.assert_array_equal(conv_kernels.conv2d_weight_grad(a, g, (3, 3), stride,
                                                                  padding), want)


def test_first_layer_tiles_take_3x3_kernels_over_3_or_1_channels_only():
    """weight_grad16 hands over to the 27- or 9-tap tile only for offsets of a 3x3 kernel
    over 3 or 1 channels ((i, j, c) order); 1x9 and 9x1 kernels (as many taps) and 3x3 over
    other channel counts keep the 8-tap tiles."""
    from needle.kernels import numba_direct_conv as nd

    def offsets(kh: int, kw: int, c: int, wp: int) -> np.ndarray:
        taps = kh * kw * c
        off = np.zeros(-(-taps // 8) * 8, np.int64)
        off[:taps] = (np.arange(kh)[:, None, None] * (wp * c) + np.arange(kw)[None, :, None]
                      * c + np.arange(c)).reshape(-1)
        return off

    assert nd._first_layer_taps(offsets(3, 3, 3, 34), 34, 3)
    assert nd._first_layer_taps(offsets(3, 3, 3, 11), 11, 3)
    assert not nd._first_layer_taps(offsets(1, 9, 3, 34), 34, 3)
    assert not nd._first_layer_taps(offsets(9, 1, 3, 34), 34, 3)
    assert not nd._first_layer_taps(offsets(3, 3, 2, 34), 34, 2)
    assert not nd._first_layer_taps(offsets(3, 3, 4, 34), 34, 4)
    assert nd._first_layer_taps(offsets(3, 3, 1, 30), 30, 1)
    assert not nd._first_layer_taps(offsets(1, 9, 1, 30), 30, 1)
    assert not nd._first_layer_taps(offsets(9, 1, 1, 30), 30, 1)
