"""Winograd F(4x4, 3x3) convolutions (kernels/winograd.py) against exact references and PyTorch.

Winograd rounds differently from im2col: its float32 results are compared with the float64
im2col result, with a bound on the error relative to the output's largest value (measured
2e-6 to 8e-6 on these shapes; im2col's own is about 10x smaller).
"""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch

import needle as ndl
import needle.nn as nn
from needle.backend import cpu_threads
from needle.core.ops_conv import Conv, ConvInputGrad, ConvWeightGrad
from needle.kernels import blas_threads, winograd

needs_numba = pytest.mark.skipif(winograd._kernels() is None,
                                 reason="numba is not installed or NEEDLE_NUMBA=0")

#: error bound relative to the reference's largest magnitude
RELATIVE_BOUND = 3e-5

# (N, H, W, C_in, C_out, padding): odd sizes (partial tiles at the edges), every padding the
# path takes, a problem smaller than one block and one of many blocks with a partial last one
SHAPES = [(2, 9, 7, 8, 8, 1), (3, 10, 11, 8, 16, 0), (3, 10, 11, 16, 8, 2),
          (1, 4, 4, 8, 12, 1), (5, 23, 17, 12, 9, 1)]


def _relative_error(got: np.ndarray, exact: np.ndarray) -> float:
    return float(np.abs(got - exact).max() / np.abs(exact).max())


def _problem(shape, seed=0):
    n, h, w, c_in, c_out, padding = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, c_in)).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, c_in, c_out)) / np.sqrt(9 * c_in)).astype(np.float32)
    g = rng.standard_normal((n, h + 2 * padding - 2, w + 2 * padding - 2, c_out))
    return x, kernel, g.astype(np.float32), padding


def _exact(op, *arrays):
    """The op's im2col result in float64 (Winograd takes float32 only)."""
    return op.compute(*(a.astype(np.float64) for a in arrays))


@needs_numba
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_both_adjoints_match_float64(shape):
    x, kernel, g, p = _problem(shape)
    h, w = x.shape[1:3]
    assert _relative_error(winograd.conv3x3(x, kernel, p),
                           _exact(Conv(1, p), x, kernel)) < RELATIVE_BOUND
    assert _relative_error(winograd.conv3x3_input_grad(g, kernel, p),
                           _exact(ConvInputGrad(1, p, (h, w)), g, kernel)) < RELATIVE_BOUND
    assert _relative_error(winograd.conv3x3_weight_grad(x, g, p),
                           _exact(ConvWeightGrad((3, 3), 1, p), x, g)) < RELATIVE_BOUND


@needs_numba
@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 4, 24, 40, 1), (2, 3, 3, 32, 32, 1),
                                   (4, 9, 7, 16, 24, 0)])
def test_both_kernel_gradient_paths_match_float64(shape, whole, monkeypatch):
    """The kernel gradient over all tiles at once (wide channels, few tiles) and by blocks."""
    monkeypatch.setattr(winograd, "_whole_pays", lambda *args: whole)
    calls = []
    original = winograd._weight_grad_whole
    monkeypatch.setattr(winograd, "_weight_grad_whole",
                        lambda *a: calls.append(1) or original(*a))
    x, _, g, p = _problem(shape)
    got = winograd.conv3x3_weight_grad(x, g, p)
    assert len(calls) == int(whole) and got.dtype == np.float32
    assert _relative_error(got, _exact(ConvWeightGrad((3, 3), 1, p), x, g)) < RELATIVE_BOUND


@needs_numba
def test_maps_smaller_than_min_map_keep_im2col():
    """A 2x2 map is one 4x4 tile for 4 outputs: im2col is faster there."""
    x, kernel, g, _ = _problem((4, 2, 2, 16, 16, 1))
    assert not winograd.applies(x, kernel, (3, 3), 1, 1, 16, 16)
    assert not winograd.applies(x, g, (3, 3), 1, 1, 16, 16)
    x, kernel, g, _ = _problem((4, 3, 3, 16, 16, 1))
    assert winograd.applies(x, kernel, (3, 3), 1, 1, 16, 16)


def test_wide_layers_on_small_maps_take_the_whole_kernel_gradient():
    """ResidualCNN's 128 x 128 layer on a 4x4 map (64 tiles): over all tiles at once; the
    benchmark CNN's 16 -> 32 layer on 32x32 maps (4096 tiles): by blocks."""
    block = winograd._block_tiles(64, 128, 128)
    assert winograd._whole_pays(64, 128, 128, block, 4)
    block = winograd._block_tiles(64 * 64, 16, 32)
    assert not winograd._whole_pays(64 * 64, 16, 32, block, 4)


def test_kernel_transform_and_its_adjoint():
    """U = G w G^T per channel pair, and <U(w), dU> = <w, adjoint(dU)> (float64)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((3, 3, 4, 5))
    du = rng.standard_normal((36, 4, 5))
    u = winograd._kernel_transform(w)
    expected = np.einsum("ai,ijco,bj->abco", winograd._G, w, winograd._G).reshape(36, 4, 5)
    np.testing.assert_allclose(u, expected, rtol=1e-12, atol=1e-12)
    assert np.isclose((u * du).sum(), (w * winograd._kernel_adjoint(du, w.dtype)).sum(),
                      rtol=1e-12)


@needs_numba
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("c_in,c_out", [(128, 128), (8, 12), (9, 11), (64, 130)])
def test_compiled_kernel_transforms_give_blas_bits(c_in, c_out, parallel, monkeypatch):
    """The float32 transforms by numba_winograd.transform_columns (column tiles of 32, the rest
    one by one; on TBB's threads or not) give the bits of the held BLAS product they replace,
    infinities and NaNs included."""
    monkeypatch.setattr(winograd, "_TRANSFORM_PRANGE_COLUMNS", 1 if parallel else 1 << 30)
    rng = np.random.default_rng(c_in * c_out)
    w = (rng.standard_normal((3, 3, c_in, c_out)) * 100).astype(np.float32)
    w.reshape(-1)[[0, 7, 40]] = [np.inf, np.nan, -np.inf]
    du = rng.standard_normal((36, c_in, c_out)).astype(np.float32)
    with blas_threads.hold(), np.errstate(invalid="ignore"):
        want_u = (winograd._GG.astype(np.float32) @ w.reshape(9, -1)).reshape(36, c_in, c_out)
        want_dw = (winograd._GG.T.astype(np.float32) @ du.reshape(36, -1)).reshape(w.shape)
    ran = []
    loops = winograd._transform_loops
    real_call = loops.call
    monkeypatch.setattr(loops, "call", lambda fn, *a: ran.append(fn) or real_call(fn, *a))
    got_u = winograd._kernel_transform(w)
    got_dw = winograd._kernel_adjoint(du, np.float32)
    assert len(ran) == (0 if parallel and winograd.parallel_loops.parallel_threads() else 2)
    assert np.array_equal(got_u.view(np.int32), want_u.view(np.int32))
    assert np.array_equal(got_dw.view(np.int32), want_dw.view(np.int32))



@needs_numba
@pytest.mark.parametrize("channels", [8, 16, 40])
def test_vector_tile_transforms_give_the_one_channel_bits(channels):
    """The tile transforms run 16 channels at once (numba_winograd_rows' vector intrinsics)
    and the rest one channel at a time: each channel of a 40-channel transform (two vector
    runs and 8 single channels) is that channel transformed alone, bit for bit (the vector
    path's loads, lanes and stores against the scalar one)."""
    from needle.kernels import numba_winograd as loops

    rng = np.random.default_rng(channels)
    x = rng.standard_normal((2, 9, 10, channels)).astype(np.float32)
    th, tw = winograd._tile_grid(9, 10)
    n_tiles = 2 * th * tw
    none = np.empty(0, np.float32)
    tiles = np.empty((n_tiles, 36, channels), np.float32)
    loops.input_tiles(x, 1, th, tw, 0, tiles, none, none)
    out = np.empty((2, 9, 10, channels), np.float32)
    loops.output_tiles(tiles, th, tw, 0, out, none)
    grads = np.empty((n_tiles, 36, channels), np.float32)
    loops.gradient_tiles(x, th, tw, 0, grads)
    for c in (0, channels // 2, channels - 1):
        one = np.ascontiguousarray(x[..., c:c + 1])
        alone = np.empty((n_tiles, 36, 1), np.float32)
        loops.input_tiles(one, 1, th, tw, 0, alone, none, none)
        assert np.array_equal(alone[..., 0].view(np.int32), tiles[..., c].view(np.int32))
        back = np.empty((2, 9, 10, 1), np.float32)
        loops.output_tiles(np.ascontiguousarray(tiles[..., c:c + 1]), th, tw, 0, back, none)
        assert np.array_equal(back[..., 0].view(np.int32), out[..., c].view(np.int32))
        loops.gradient_tiles(one, th, tw, 0, alone)
        assert np.array_equal(alone[..., 0].view(np.int32), grads[..., c].view(np.int32))

@needs_numba
def test_the_kernel_transforms_run_with_blas_held_to_one_thread(monkeypatch):
    """OpenBLAS threads the (36, 9) @ (9, C_in C_out) product, and its spinning worker then
    took the second core from the tile threads: the convolutions' products, and the
    transforms where BLAS makes them (not float32 with numba), hold BLAS to one thread."""
    import contextlib

    held = []

    @contextlib.contextmanager
    def recording():
        held.append(True)
        yield

    monkeypatch.setattr(blas_threads, "hold", recording)
    x, kernel, g, p = _problem((2, 8, 8, 8, 8, 1))
    winograd.conv3x3(x, kernel, p)
    assert held
    held.clear()
    winograd.conv3x3_weight_grad(x, g, p)
    assert held


@needs_numba
def test_the_ops_take_the_winograd_path_only_where_it_applies(monkeypatch):
    calls = []
    for name in ("conv3x3", "conv3x3_input_grad", "conv3x3_weight_grad"):
        original = getattr(winograd, name)
        monkeypatch.setattr(winograd, name,
                            lambda *a, _name=name, _f=original: calls.append(_name) or _f(*a))
    x, kernel, g, p = _problem((2, 8, 8, 8, 8, 1))
    Conv(1, 1).compute(x, kernel)
    ConvInputGrad(1, 1, (8, 8)).compute(g, kernel)
    ConvWeightGrad((3, 3), 1, 1).compute(x, g)
    # (conv3x3_input_grad runs conv3x3 on the flipped kernel)
    assert set(calls) == {"conv3x3", "conv3x3_input_grad", "conv3x3_weight_grad"}
    calls.clear()
    Conv(2, 1).compute(x, kernel)  # stride 2
    Conv(1, 1).compute(x.astype(np.float64), kernel.astype(np.float64))  # float64
    Conv(1, 0).compute(x, kernel[:1, :1])  # 1x1 kernel
    Conv(1, 1).compute(x[..., :4], kernel[:, :, :4])  # too few channels
    wide = np.zeros((3, 3, 8, winograd.MAX_CHANNEL_PRODUCT // 8 + 1), np.float32)
    Conv(1, 1).compute(x, wide)  # too many: im2col's one product is faster
    ConvWeightGrad((3, 3), 1, 3).compute(x, np.zeros((2, 12, 12, 8), np.float32))  # padding 3
    assert calls == []


@needs_numba
def test_turning_it_off_gives_the_im2col_result(monkeypatch):
    x, kernel, _, p = _problem((2, 9, 9, 8, 16, 1))
    fast = Conv(1, p).compute(x, kernel)
    monkeypatch.setattr(winograd, "ENABLED", False)
    slow = Conv(1, p).compute(x, kernel)
    assert not np.array_equal(fast, slow)  # they round differently ...
    np.testing.assert_allclose(fast, slow, atol=RELATIVE_BOUND * np.abs(slow).max())


@needs_numba
@pytest.mark.parametrize("threads", [1, 3])
def test_any_thread_count_gives_the_same_bits(threads, monkeypatch):
    """Each tile is computed by one thread whatever the split, so the forward is
    bit-identical; the kernel gradient sums chunks of tiles fixed by the shape (or, without
    OpenBLAS's gemm, adds float32 block products in float64, where such sums are exact), so
    it is bit-identical too: training does not depend on which thread took which block."""
    x, kernel, g, p = _problem((6, 16, 16, 8, 8, 1))  # 96 tiles: several blocks of 16
    monkeypatch.setattr(winograd, "BLOCK_TILES", 16)
    reference = winograd.conv3x3(x, kernel, p), winograd.conv3x3_weight_grad(x, g, p)
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", threads)
    np.testing.assert_array_equal(winograd.conv3x3(x, kernel, p), reference[0])
    np.testing.assert_array_equal(winograd.conv3x3_weight_grad(x, g, p), reference[1])


@needs_numba
@pytest.mark.parametrize("threads", [1, 3])
def test_the_whole_kernel_gradient_gives_the_same_bits_on_any_thread_count(threads,
                                                                           monkeypatch):
    """Each of its 36 products runs over all tiles on one thread, whichever thread."""
    monkeypatch.setattr(winograd, "_whole_pays", lambda *args: True)
    x, _, g, p = _problem((6, 8, 8, 16, 24, 1))
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 1)
    reference = winograd.conv3x3_weight_grad(x, g, p)
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", threads)
    np.testing.assert_array_equal(winograd.conv3x3_weight_grad(x, g, p), reference)


@needs_numba
@pytest.mark.parametrize("stride", [1, 2])
def test_nn_conv_forward_and_backward_match_torch(stride):
    """nn.Conv with enough channels for the fast path (stride 1), beside stride 2 (im2col)."""
    rng = np.random.default_rng(3)
    np.random.seed(3)
    conv = nn.Conv(16, 24, 3, stride=stride, bias=True)
    x = rng.standard_normal((4, 16, 13, 13)).astype(np.float32)
    ours_x = ndl.Tensor(x, requires_grad=True)
    out = conv(ours_x)
    weights = np.random.default_rng(4).standard_normal(out.shape).astype(np.float32)
    (out * ndl.Tensor(weights)).sum().backward()

    reference = torch.nn.Conv2d(16, 24, 3, stride=stride, padding=1)
    with torch.no_grad():  # needle keeps (kh, kw, C_in, C_out), torch (C_out, C_in, kh, kw)
        reference.weight.copy_(torch.from_numpy(conv.weight.numpy().transpose(3, 2, 0, 1)))
        reference.bias.copy_(torch.from_numpy(conv.bias.numpy().reshape(-1)))
    torch_x = torch.from_numpy(x).requires_grad_()
    torch_out = reference(torch_x)
    (torch_out * torch.from_numpy(weights)).sum().backward()

    scale = float(torch_out.detach().abs().max())
    np.testing.assert_allclose(out.numpy(), torch_out.detach().numpy(), atol=3e-5 * scale)
    np.testing.assert_allclose(ours_x.grad.numpy(), torch_x.grad.numpy(),
                               atol=3e-5 * float(torch_x.grad.abs().max()))
    weight_grad = reference.weight.grad.numpy().transpose(2, 3, 1, 0)
    np.testing.assert_allclose(conv.weight.grad.numpy(), weight_grad,
                               atol=3e-5 * float(np.abs(weight_grad).max()))


def _conv_in_child(queue) -> None:
    x, kernel, _, p = _problem((4, 16, 16, 8, 8, 1))
    queue.put(winograd.conv3x3(x, kernel, p))


@needs_numba
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_fresh_worker_threads(monkeypatch):
    """Threads do not survive fork: a child that inherited the pool must make its own."""
    monkeypatch.setattr(winograd, "BLOCK_TILES", 16)
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)
    x, kernel, _, p = _problem((4, 16, 16, 8, 8, 1))
    expected = winograd.conv3x3(x, kernel, p)  # the parent's pool now exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_conv_in_child, args=(queue,))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    np.testing.assert_array_equal(got, expected)


@needs_numba
def test_a_transform_numba_cannot_compile_falls_back_to_im2col(monkeypatch):
    from numba.core.errors import TypingError

    class Broken:
        def __getattr__(self, name):
            def fail(*args):
                raise TypingError("cannot compile here")
            return fail

    monkeypatch.setattr(winograd, "_disabled", [])
    monkeypatch.setattr(winograd, "_kernels", lambda: Broken())
    x, kernel, _, p = _problem((2, 8, 8, 8, 8, 1))
    assert winograd.conv3x3(x, kernel, p) is None
    assert winograd._disabled and not winograd.applies(x, kernel, (3, 3), 1, 1, 8, 8)
    np.testing.assert_allclose(Conv(1, p).compute(x, kernel), _exact(Conv(1, p), x, kernel),
                               rtol=1e-5, atol=1e-5)


def test_without_numba_the_path_steps_aside(monkeypatch):
    monkeypatch.setattr(winograd, "_kernels", lambda: None)
    x, kernel, _, _ = _problem((2, 8, 8, 8, 8, 1))
    assert not winograd.applies(x, kernel, (3, 3), 1, 1, 8, 8)
