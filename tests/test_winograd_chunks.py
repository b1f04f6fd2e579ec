"""The Winograd kernel gradient in float32 partial sums over chunks of tiles fixed by the shape
(kernels/winograd.py ``_chunked_weight_grad``, numba_winograd.weight_grad_chunk,
numba_parallel_winograd.py): its prange loop runs where TBB and NumPy's OpenBLAS are, gives
bit for bit what the same chunks give on needle's threads or on one thread, and agrees with
float64 and PyTorch; without OpenBLAS's gemm the float64 blocks take over.
"""

from __future__ import annotations

import numpy as np
import pytest

from needle.backend import cpu_threads, parallel_loops
from needle.backend.numba_support import numba_module

pytest.importorskip("numba")
if numba_module() is None:
    pytest.skip("the Winograd path needs numba (NEEDLE_NUMBA=0)", allow_module_level=True)
from needle.core.ops_conv import ConvWeightGrad  # noqa: E402
from needle.kernels import blas_threads, openblas_gemm, winograd  # noqa: E402

#: error bound relative to the float64 result's largest magnitude (tests/test_winograd.py)
RELATIVE_BOUND = 3e-5

# (N, H, W, C_in, C_out, padding): chunks of uneven block counts and a short last block
# (13 x 5 x 5 = 325 tiles: blocks of 41, 8 chunks; 3 x 8 x 8 = 192 tiles), one chunk only
# (2 x 2 x 2 tiles), padding 0 and 2
SHAPES = [(13, 17, 19, 24, 40, 1), (3, 30, 30, 8, 16, 1), (2, 7, 6, 16, 8, 0),
          (5, 9, 12, 8, 24, 2)]


def _problem(shape):
    n, h, w, c_in, c_out, padding = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((n, h, w, c_in)).astype(np.float32)
    g = rng.standard_normal((n, h + 2 * padding - 2, w + 2 * padding - 2, c_out))
    return x, g.astype(np.float32), padding


def _needs_gemm():
    if openblas_gemm.gemm(np.float32) is None or not blas_threads.available():
        pytest.skip("NumPy's BLAS is not OpenBLAS (or cannot be held on one thread)")


@pytest.fixture(autouse=True)
def _chunked_not_whole(monkeypatch):
    """These shapes are to take the chunks, not the kernel gradient over all tiles at once."""
    monkeypatch.setattr(winograd, "_whole_pays", lambda *args: False)


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_chunks_match_float64(shape, monkeypatch):
    _needs_gemm()
    calls = []
    original = winograd._chunked_weight_grad
    monkeypatch.setattr(winograd, "_chunked_weight_grad",
                        lambda *a: calls.append(1) or original(*a))
    x, g, p = _problem(shape)
    got = winograd.conv3x3_weight_grad(x, g, p)
    exact = ConvWeightGrad((3, 3), 1, p).compute(x.astype(np.float64), g.astype(np.float64))
    assert calls and got.dtype == np.float32 and got.shape == exact.shape
    assert np.abs(got - exact).max() / np.abs(exact).max() < RELATIVE_BOUND


@pytest.mark.parametrize("block_tiles", [16, winograd.BLOCK_TILES])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_prange_gives_the_bits_of_the_same_chunks_on_any_thread_count(shape, block_tiles,
                                                                      monkeypatch):
    """Blocks of 16 tiles: chunks of 2 or 3 blocks (325 tiles: 21 blocks, the last of 5)."""
    _needs_gemm()
    monkeypatch.setattr(winograd, "BLOCK_TILES", block_tiles)
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)
    if not parallel_loops.parallel_threads():
        pytest.skip("numba's parallel loops do not run on TBB here (tbb wheel missing?)")
    ran: list[str] = []
    real = winograd._winograd_loops.call
    monkeypatch.setattr(winograd._winograd_loops, "call",
                        lambda loop, *args: ran.append(loop.__name__) or real(loop, *args))
    x, g, p = _problem(shape)
    got = winograd.conv3x3_weight_grad(x, g, p)
    assert ran == ["_weight_grad_chunks"]
    assert winograd._winograd_loops.module().weight_grad.signatures
    for threads in (1, 2, 3):  # needle's threads (or none) drawing the same chunks
        with monkeypatch.context() as m:
            m.setattr(parallel_loops, "tbb_layer", lambda: False)
            m.setattr(cpu_threads, "NUM_THREADS", threads)
            np.testing.assert_array_equal(winograd.conv3x3_weight_grad(x, g, p), got)
    assert ran == ["_weight_grad_chunks"]  # those did not take the prange loop


def test_the_blocks_and_chunks_depend_on_the_shape_alone(monkeypatch):
    blocks = set()
    for threads in (1, 2, 8):
        monkeypatch.setattr(cpu_threads, "NUM_THREADS", threads)
        blocks.add(winograd._chunk_block(4096, 32, 64))
    assert blocks == {128}
    assert winograd._chunk_block(325, 24, 40) == 41  # 8 chunks of whole blocks
    assert winograd._chunk_block(8, 16, 8) == 8


def test_without_openblas_the_float64_blocks_take_over(monkeypatch):
    x, g, p = _problem(SHAPES[0])
    monkeypatch.setattr(openblas_gemm, "gemm", lambda dtype: None)
    got = winograd.conv3x3_weight_grad(x, g, p)
    exact = ConvWeightGrad((3, 3), 1, p).compute(x.astype(np.float64), g.astype(np.float64))
    assert np.abs(got - exact).max() / np.abs(exact).max() < RELATIVE_BOUND


def test_against_torch():
    torch = pytest.importorskip("torch")
    _needs_gemm()
    x, g, p = _problem((4, 32, 32, 16, 32, 1))
    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    tg = torch.from_numpy(np.ascontiguousarray(g.transpose(0, 3, 1, 2)))
    weight = torch.zeros((32, 16, 3, 3))
    _, expected, _ = torch.ops.aten.convolution_backward(
        tg, tx, weight, None, [1, 1], [p, p], [1, 1], False, [0, 0], 1, [False, True, False])
    expected = expected.numpy().transpose(2, 3, 1, 0)
    got = winograd.conv3x3_weight_grad(x, g, p)
    np.testing.assert_allclose(got, expected, atol=RELATIVE_BOUND * np.abs(expected).max())


def test_on_another_thread_the_same_chunks_give_the_same_bits(monkeypatch):
    """A plan running the op on a worker thread (a served Session's) takes the same chunks
    and gets what the main thread gets."""
    import threading

    _needs_gemm()
    x, g, p = _problem(SHAPES[0])
    expected = winograd.conv3x3_weight_grad(x, g, p)
    ran: list = []
    original = winograd._chunked_weight_grad
    monkeypatch.setattr(winograd, "_chunked_weight_grad",
                        lambda *args: ran.append(1) or original(*args))
    got: list = []
    worker = threading.Thread(target=lambda: got.append(winograd.conv3x3_weight_grad(x, g, p)))
    worker.start()
    worker.join(timeout=120)
    assert ran and got
    np.testing.assert_array_equal(got[0], expected)
