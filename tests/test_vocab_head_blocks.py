"""The vocabulary head's softmax pass by blocks of rows, each row prefetching the next and
asking for 512-bit vectors (kernels/numba_vocab_head.py, numba_parallel_vocab_head.py): the
same bits as a plain transcription of the pass (no prefetch, LLVM's default vectors), on
rows of every length around the prefetch chunk and with non-finite rows inside a block; the
same bits whatever the rows per block, the thread count, or with prange off; and a check
that the block loop ran."""

from __future__ import annotations

import numpy as np
import pytest

from needle.backend import parallel_loops
from needle.kernels import vocab_head

from .helpers import loops_that_ran

numba = pytest.importorskip("numba")
loops = pytest.importorskip("needle.kernels.numba_vocab_head")
exp_loops = pytest.importorskip("needle.kernels.numba_exp")


@numba.njit(fastmath={"reassoc", "contract"}, error_model="numpy")
def _plain_pass(z, ids, one, peaks, totals):
    """The pass as it was before the prefetch (a transcription): per row the maximum, the
    exps, their float64 sum rounded to float32, the scaling by its reciprocal, the one-hot."""
    for r in range(z.shape[0]):
        row = z[r]
        peak = exp_loops.row_peak_f32(row)
        peaks[r] = peak
        if not np.isfinite(peak):
            totals[r] = np.nan
            continue
        for j in range(row.shape[0]):
            row[j] = exp_loops.exp_f32(row[j] - peak)
        total = 0.0
        for j in range(row.shape[0]):
            total += row[j]
        rounded = np.float32(total)
        totals[r] = rounded
        inverse = one / rounded
        for j in range(row.shape[0]):
            row[j] *= inverse
        row[ids[r]] -= one


def _logits(rows: int, width: int, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((rows, width)) * 4).astype(np.float32)
    if rows > 3:
        z[2, width // 2] = np.inf                    # non-finite rows inside a block
        z[3, 0] = np.nan
    if rows > 5:
        z[5, :] -= 200                               # exps that vanish or go denormal
        z[5, width - 1] = 0
    return z, rng.integers(0, width, rows).astype(np.intp)


def _run(fn, z, ids, *extra) -> tuple:
    z = z.copy()
    peaks, totals = np.empty(len(z), np.float32), np.empty(len(z), np.float32)
    fn(z, ids, np.float32(1), peaks, totals, *extra)
    return z, peaks, totals


def _assert_same_bits(got: tuple, want: tuple) -> None:
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.view(np.int32), b.view(np.int32))


@pytest.mark.parametrize("width", [1, 17, 255, 256, 257, 1001, 4096, 10_000])
def test_prefetching_row_loop_gives_the_plain_loops_bits(width):
    z, ids = _logits(9, width)
    want = _run(_plain_pass, z, ids)
    _assert_same_bits(_run(loops.softmax_minus_onehot_rows, z, ids), want)
    assert np.isnan(want[2][2]) and np.isnan(want[2][3])   # the non-finite rows were skipped
    assert np.isfinite(want[0][[0, 1, 4, 5]]).all()


def _parallel():
    if not parallel_loops.parallel_threads():
        pytest.skip("numba's parallel loops are off here (NEEDLE_PARALLEL_LOOPS=0, or no TBB)")
    return pytest.importorskip("needle.kernels.numba_parallel_vocab_head")


@pytest.mark.parametrize("rows_per_block", [1, 3, 16, 40])
def test_blocks_of_rows_give_the_same_bits_whatever_their_size(rows_per_block):
    parallel = _parallel()
    z, ids = _logits(37, 1001, seed=1)               # 37 rows: a short last block
    want = _run(_plain_pass, z, ids)
    _assert_same_bits(_run(parallel.softmax_minus_onehot_rows, z, ids, rows_per_block), want)


def _forward(x, w, b, ids):
    losses, s = vocab_head.forward(x, w, b, ids)
    return losses.copy(), s.copy()


def test_forward_by_blocks_gives_the_serial_bits_on_any_thread_count(monkeypatch):
    if vocab_head.LOOPS.module() is None:
        pytest.skip("numba turned off")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((301, 24)).astype(np.float32)       # 301 x 1001 >= 2^17 logits
    w = (rng.standard_normal((24, 1001)) * 0.5).astype(np.float32)
    b = (rng.standard_normal(1001) * 0.5).astype(np.float32)
    ids = rng.integers(0, 1001, 301)
    assert x.shape[0] * w.shape[1] >= vocab_head.PRANGE_MIN_SIZE
    ran = loops_that_ran(monkeypatch, vocab_head.PARALLEL_LOOPS, vocab_head.LOOPS)
    monkeypatch.setattr(vocab_head, "PRANGE_ROWS_PER_BLOCK", 7)
    blocks = _forward(x, w, b, ids)
    if parallel_loops.parallel_threads():
        assert [name for name in ran if "softmax" in name] == ["_softmax_minus_onehot_rows"]
    ran.clear()
    with monkeypatch.context() as m:                 # prange off: the one-thread loop
        m.setattr(parallel_loops, "tbb_layer", lambda: False)
        assert parallel_loops.parallel_threads() == 0
        serial = _forward(x, w, b, ids)
    assert [name for name in ran if "softmax" in name] == ["softmax_minus_onehot_rows"]
    monkeypatch.setattr(vocab_head.cpu_threads, "NUM_THREADS", 1)
    one = _forward(x, w, b, ids)
    for got in (serial, one):
        _assert_same_bits(got, blocks)
    # and against float64 (the exps within an ulp, the sums in float64)
    z = x.astype(np.float64) @ w.astype(np.float64) + b
    e = np.exp(z - z.max(axis=1, keepdims=True))
    s = e / e.sum(axis=1, keepdims=True)
    s[np.arange(301), ids] -= 1
    np.testing.assert_allclose(blocks[1], s, rtol=1e-5, atol=1e-7)
