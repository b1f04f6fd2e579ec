"""Two kernels of the MLP-ResNet step: the optimizer's fused update as a numba prange loop over
blocks (compiler/fused_update.py) and dropout's mask drawn from NumPy's MT19937 state directly
(kernels/numba_mt19937.py). Each must give bit for bit what the path without it gives, and
must actually run (a numba kernel that fails falls back to the same bits unseen)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import needle as ndl
from needle.backend import cpu_threads, parallel_loops
from needle.backend.numba_support import numba_module

pytest.importorskip("numba")
if numba_module() is None:
    pytest.skip("these kernels need numba (NEEDLE_NUMBA=0)", allow_module_level=True)
from needle.compiler import fused_update  # noqa: E402
from needle.kernels import random_mask  # noqa: E402


# -- the fused update on numba's threads ----------------------------------------------------------
@pytest.fixture
def two_threads_small_blocks(monkeypatch):
    """Two threads, and the prange loop from 2**12 elements in blocks of 1000 (uneven: pieces
    end inside blocks); skip where numba's parallel loops do not run on TBB."""
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)
    if not parallel_loops.parallel_threads():
        pytest.skip("numba's parallel loops do not run on TBB here (tbb wheel missing?)")
    monkeypatch.setattr(fused_update, "PARALLEL_MIN_ELEMENTS", 1 << 12)
    monkeypatch.setattr(fused_update, "PARALLEL_BLOCK", 1000)
    fused_update._compile_parallel.cache_clear()


SIZES = [2500, 7, 1000, 3001, 1, 999, 64]  # 7572 elements: blocks end mid-piece and between


@pytest.fixture
def prange_kernels(monkeypatch):
    """The prange loops compiled (they have signatures once they ran)."""
    kernels: list = []
    real = fused_update._compile_parallel

    def counting(*args):
        kernel = real(*args)
        kernels.append(kernel)
        return kernel

    monkeypatch.setattr(fused_update, "_compile_parallel", counting)
    return kernels


def _train(opt_class, kwargs: dict, jitted: bool, steps: int = 3) -> list[np.ndarray]:
    """Parameters after ``steps`` steps of a tiny model whose parameters have SIZES."""
    rng = np.random.default_rng(0)
    params = [ndl.Tensor(rng.standard_normal(n).astype(np.float32)) for n in SIZES]
    x = ndl.Tensor(rng.standard_normal(7).astype(np.float32), requires_grad=False)
    opt = opt_class(params, fused=True, **kwargs)

    def step():
        loss = sum(((p * p).sum() + (p.sum() * x).sum()) for p in params)
        opt.minimize(loss)
        return loss

    fn = ndl.jit(step) if jitted else step
    for _ in range(steps):
        fn()
    return [p.numpy().copy() for p in params]


@pytest.mark.parametrize("jitted", [False, True])
@pytest.mark.parametrize("opt_class,kwargs", [
    (ndl.optim.Adam, {"lr": 1e-2, "weight_decay": 1e-3}),
    (ndl.optim.AdamW, {"lr": 1e-2}),
    (ndl.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-4}),
])
def test_fused_update_on_blocks_gives_the_one_thread_bits(two_threads_small_blocks, monkeypatch,
                                                          prange_kernels, opt_class, kwargs,
                                                          jitted):
    with_prange = _train(opt_class, kwargs, jitted)
    assert prange_kernels and all(k.signatures for k in prange_kernels), \
        "the prange loop did not run"
    monkeypatch.setattr(parallel_loops, "tbb_layer", lambda: False)
    one_thread = _train(opt_class, kwargs, jitted)
    for a, b in zip(with_prange, one_thread):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_blocks_cover_each_piece_once():
    sizes = (5, 0, 12, 3)
    offsets = np.cumsum([0, *sizes[:-1]])
    covered = []
    for piece, start, n, base in fused_update._blocks(sizes).tolist():
        assert 0 < n <= fused_update.PARALLEL_BLOCK
        covered.extend((piece, start + j, base + j) for j in range(n))
    assert covered == [(k, i, int(offsets[k]) + i) for k, n in enumerate(sizes)
                       for i in range(n)]


def test_run_fused_on_whole_arrays_on_blocks(two_threads_small_blocks, prange_kernels):
    """run_fused without pieces (an optimizer's flat gradient): the same bits as one thread."""
    rng = np.random.default_rng(1)

    def rule(p, g):
        xp = ndl.backend.array_module(p)
        xp.multiply(g, 0.5, out=g)
        xp.sqrt(g, out=g)
        xp.subtract(p, g, out=p)

    arrays = [np.abs(rng.standard_normal(5003)).astype(np.float32) for _ in range(2)]
    one = [a.copy() for a in arrays]
    assert fused_update.run_fused(rule, *arrays)
    assert prange_kernels and prange_kernels[0].signatures
    fused_update._PARALLEL_FAILED.append("forced one thread (test)")
    try:
        assert fused_update.run_fused(rule, *one)
    finally:
        fused_update._PARALLEL_FAILED.pop()
    for a, b in zip(arrays, one):
        np.testing.assert_array_equal(a, b)


# -- dropout's mask from the MT19937 state --------------------------------------------------------
def _numpy_mask(shape: tuple, p: float, dtype) -> np.ndarray:
    return (np.random.rand(*shape).astype(np.float32) <= p).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mask_from_the_generator_state_is_numpys_draw(dtype):
    """Across twist boundaries (624 words), odd read positions and sizes: the same mask, and
    the generator where np.random.rand leaves it."""
    loops = random_mask.STREAM_LOOPS.module()
    for seed in (0, 5, 2**31 - 1):
        for skip in (0, 1, 311, 312, 623):
            for shape in [(100, 50), (1,), (311,), (312,), (313,), (3, 1000), (2, 1, 7)]:
                np.random.seed(seed)
                np.random.rand(skip)
                state = np.random.get_state()
                want = _numpy_mask(shape, 0.9, dtype)
                want_next = np.random.rand(5)
                np.random.set_state(state)
                got = random_mask.bernoulli_mask(np, shape, 0.9, dtype)
                assert got.dtype == dtype and got.shape == shape
                np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(np.random.rand(5), want_next)
    assert loops.bernoulli_mask.signatures, "the stream loop did not run"
    assert not random_mask.STREAM_LOOPS.failed


def test_doubles_from_the_generator_state_are_numpys_draws():
    """The doubles themselves, bit for bit, across twist boundaries (the mask compares them
    with p in numba_random_mask's loop, tested at p's float32 neighbours)."""
    loops = random_mask.STREAM_LOOPS.module()
    views = random_mask._global_mt19937()
    assert views is not None
    _, key, pos = views
    for seed in (1, 99):
        for skip in (0, 1, 623):
            for n in (1, 311, 312, 313, 2000):
                np.random.seed(seed)
                np.random.rand(skip)
                state = np.random.get_state()
                want = np.random.rand(n)
                want_next = np.random.rand(2)
                np.random.set_state(state)
                got = np.empty(n, np.float64)
                loops.next_doubles(key, pos, got)
                np.testing.assert_array_equal(got.view(np.uint64), want.view(np.uint64))
                np.testing.assert_array_equal(np.random.rand(2), want_next)


def test_mask_with_another_bit_generator_draws_through_numpy():
    """np.random.set_bit_generator(PCG64): rand draws from that one; so does the mask."""
    saved = np.random.get_bit_generator()
    try:
        np.random.set_bit_generator(np.random.PCG64(3))
        want = _numpy_mask((40, 5), 0.5, np.float32)
        np.random.set_bit_generator(np.random.PCG64(3))
        got = random_mask.bernoulli_mask(np, (40, 5), 0.5, np.float32)
        np.testing.assert_array_equal(got, want)
    finally:
        np.random.set_bit_generator(saved)
    np.random.seed(4)  # (the views follow the generator back)
    want = _numpy_mask((10, 3), 0.5, np.float32)
    np.random.seed(4)
    np.testing.assert_array_equal(random_mask.bernoulli_mask(np, (10, 3), 0.5, np.float32), want)


def test_masks_drawn_in_threads_take_distinct_words():
    """The generator's lock is held: masks drawn in two threads at once use every word once
    (together they are the words of one sequential draw, in some order of whole masks)."""
    np.random.seed(11)
    words = np.random.rand(2 * 4000)  # the 8000 draws two threads of 4000 take together
    np.random.seed(11)
    results: dict[int, np.ndarray] = {}

    def draw(i):
        results[i] = random_mask.bernoulli_mask(np, (4000,), 0.5, np.float64)

    threads = [threading.Thread(target=draw, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first, second = (words[:4000].astype(np.float32) <= 0.5), (words[4000:].astype(np.float32)
                                                              <= 0.5)
    got = {results[0].tobytes(), results[1].tobytes()}
    assert got == {first.astype(np.float64).tobytes(), second.astype(np.float64).tobytes()}
