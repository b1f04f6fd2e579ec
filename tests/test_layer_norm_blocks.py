"""LayerNorm's row loops split over numba's prange threads (kernels/numba_parallel_layernorm.py):
the same bits as the one-thread loops (prange off) on shapes with uneven blocks, the
backward's weight and bias sums in blocks of rows fixed by the shape, checks that the prange
loops ran, and values against float64."""

from __future__ import annotations

import numpy as np
import pytest

from needle.backend import parallel_loops
from needle.kernels import layernorm

pytest.importorskip("numba")

needs_prange = pytest.mark.skipif(
    not parallel_loops.parallel_threads() or layernorm.LOOPS.module() is None,
    reason="prange or numba not available")


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    w, b = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))
    return x, g, w, b


def _counted(monkeypatch):
    ran: list[str] = []
    real = layernorm.PARALLEL_LOOPS.call

    def call(loop, *args):
        done = real(loop, *args)
        if done:
            ran.append(loop.__name__)
        return done

    monkeypatch.setattr(layernorm.PARALLEL_LOOPS, "call", call)
    return ran


def _reference(x, g, w, b, eps):
    x64, g64, w64 = (a.astype(np.float64) for a in (x, g, w))
    d = x.shape[-1]
    xm, gm = x64.reshape(-1, d), g64.reshape(-1, d)
    mean = xm.mean(axis=1, keepdims=True)
    inv = 1 / np.sqrt(((xm - mean) ** 2).mean(axis=1, keepdims=True) + eps)
    xhat = (xm - mean) * inv
    gw = gm * w64
    dx = inv * (gw - gw.mean(axis=1, keepdims=True) - xhat * (gw * xhat).mean(axis=1,
                                                                               keepdims=True))
    return (xhat * w64 + b).reshape(x.shape), dx.reshape(x.shape), (gm * xhat).sum(0), gm.sum(0)


@needs_prange
@pytest.mark.parametrize("shape", [(16, 64, 128), (1000, 96), (3, 320, 70), (517, 130)])
def test_prange_rows_give_the_one_thread_bits(monkeypatch, shape):
    x, g, w, b = _data(shape)
    ran = _counted(monkeypatch)
    monkeypatch.setattr(layernorm, "FORWARD_PRANGE_MIN_ELEMENTS", layernorm.PRANGE_MIN_ELEMENTS)
    split = [layernorm.layer_norm(x, w, b, 1e-5), *layernorm.layer_norm_grad(g, x, w, 1e-5)]
    assert ran == ["_layer_norm_blocks", "_layer_norm_grad_blocks"]
    with monkeypatch.context() as m:
        m.setattr(parallel_loops, "tbb_layer", lambda: False)
        assert parallel_loops.parallel_threads() == 0
        serial = [layernorm.layer_norm(x, w, b, 1e-5), *layernorm.layer_norm_grad(g, x, w,
                                                                                  1e-5)]
    assert ran == ["_layer_norm_blocks", "_layer_norm_grad_blocks"]  # nothing more ran
    for got, want in zip(split, serial):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(split, _reference(x, g, w, b, 1e-5)):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@needs_prange
def test_small_activations_stay_on_one_thread(monkeypatch):
    x, g, w, b = _data((8, 128))
    ran = _counted(monkeypatch)
    layernorm.layer_norm(x, w, b, 1e-5)
    layernorm.layer_norm_grad(g, x, w, 1e-5)
    assert ran == []


def test_block_sums_match_a_float64_sum_per_block():
    # the one-thread loop's weight and bias sums: float64 per block of GRAD_BLOCK_ROWS rows,
    # the blocks added in order (an independent transcription of that order)
    loops = layernorm.LOOPS.module()
    if loops is None:
        pytest.skip("numba turned off")
    x, g, w, _ = _data((300, 40), seed=3)
    _, dweight, dbias = layernorm.layer_norm_grad(g, x, w, 1e-5)
    _, _, terms_w, terms_b = _reference(x, g, w, np.zeros_like(w), 1e-5)
    rows = loops.GRAD_BLOCK_ROWS
    assert rows < 300
    np.testing.assert_allclose(dweight, terms_w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dbias, terms_b, rtol=1e-5, atol=1e-5)
    gm = g.astype(np.float64)
    blocks = [gm[s:s + rows].sum(0) for s in range(0, 300, rows)]
    total = blocks[0]
    for part in blocks[1:]:
        total = total + part
    np.testing.assert_allclose(dbias, total.astype(np.float32), rtol=0, atol=2e-6)
