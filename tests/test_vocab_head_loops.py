"""The vocabulary head's softmax pass (kernels/vocab_head.py) with its numba loops
(kernels/numba_vocab_head.py) and with the NumPy fallback: the same losses and S to a few
float32 roundings (their exps differ in the last bit or two), both summing in float64 (a
float64 reference, not the old float32 pairwise sums, is what they are held to), on one
thread and with the row blocks split over two."""

from __future__ import annotations

import numpy as np
import pytest

from needle.kernels import vocab_head


def _data(rows: int, k: int, classes: int, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = (rng.standard_normal((k, classes)) * 0.5).astype(np.float32)
    b = (rng.standard_normal(classes) * 0.5).astype(np.float32)
    ids = rng.integers(0, classes, rows).astype(np.int32)  # not intp: the loops convert
    return x, w, b, ids


def _reference(x, w, b, ids):
    """losses and softmax - onehot in float64."""
    z = x.astype(np.float64) @ w.astype(np.float64) + b.astype(np.float64)
    peak = z.max(axis=1, keepdims=True)
    e = np.exp(z - peak)
    total = e.sum(axis=1, keepdims=True)
    here = np.arange(len(ids))
    losses = np.log(total[:, 0]) + peak[:, 0] - z[here, ids]
    s = e / total
    s[here, ids] -= 1
    return losses, s


def _forward(x, w, b, ids, numba: bool):
    loops = vocab_head.LOOPS
    saved = list(loops.failed)
    if not numba:
        loops.failed.append("forced off by the test")
    try:
        losses, s = vocab_head.forward(x, w, b, ids)
        return losses.copy(), s.copy()
    finally:
        loops.failed[:] = saved


@pytest.mark.parametrize("threads", [1, 2])
def test_numba_loops_and_numpy_fallback_agree_with_a_float64_reference(monkeypatch, threads):
    monkeypatch.setattr(vocab_head.cpu_threads, "NUM_THREADS", threads)
    x, w, b, ids = _data(300, 16, 4000)   # 1.2M logits: threaded where threads == 2
    want_losses, want_s = _reference(x, w, b, ids)
    plain = _forward(x, w, b, ids, numba=False)
    if vocab_head.LOOPS.module() is None:  # numba missing or turned off: the fallback alone
        fast = plain
    else:
        fast = _forward(x, w, b, ids, numba=True)
        assert not vocab_head.LOOPS.failed
    for losses, s in (fast, plain):
        assert losses.dtype == np.float32 and s.dtype == np.float32
        np.testing.assert_allclose(losses, want_losses, rtol=2e-6, atol=2e-6)
        np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-7)
    # the two differ by their exp (numba_exp's within 1 ulp of the correctly rounded value,
    # NumPy's within 2) and the float64 sums' order: a few float32 roundings at most
    np.testing.assert_allclose(fast[0], plain[0], rtol=4e-7, atol=0)
    np.testing.assert_allclose(fast[1], plain[1], rtol=4e-7, atol=1e-9)


def test_row_sums_are_float64_accumulations():
    numba_loops = pytest.importorskip("needle.kernels.numba_vocab_head")
    # 1 then 10,000 tiny terms: each is lost against 1 in float32, not in float64
    tiny = np.float32(1e-8)
    e = np.full((2, 10_001), tiny, np.float32)
    e[:, 0] = 1
    e[1, 0] = 2
    sums = np.empty(2, np.float64)
    numba_loops.row_sums_f64(e, sums)
    np.testing.assert_allclose(sums, np.array([1, 2]) + 10_000 * np.float64(tiny), rtol=1e-12)


def test_scale_and_onehot_loop_is_numpys_broadcast_product():
    numba_loops = pytest.importorskip("needle.kernels.numba_vocab_head")
    rng = np.random.default_rng(3)
    e = rng.random((5, 37), dtype=np.float32)
    inverse = (1 / rng.random(5, dtype=np.float32)).astype(np.float32)
    ids = np.array([0, 36, 5, 5, 17], np.intp)
    want = e * inverse[:, None]
    want[np.arange(5), ids] -= 1
    got = e.copy()
    numba_loops.scale_rows_minus_onehot(got, inverse, ids, np.float32(1))
    np.testing.assert_array_equal(got, want)


def test_bias_added_per_block_where_it_is_not_a_product_row():
    # float32 weights with float64 inputs: the logits are float64 and the bias is added
    # block by block (not folded into the product); the picked logits include it
    x, w, b, ids = _data(40, 8, 3000, seed=5)
    x64 = x.astype(np.float64)
    want_losses, want_s = _reference(x64, w, b, ids)
    for numba in (True, False):
        losses, s = _forward(x64, w, b, ids, numba=numba)
        assert s.dtype == np.float64
        np.testing.assert_allclose(losses, want_losses, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(s, want_s, rtol=1e-10, atol=1e-15)


def _adjacent_head(k: int, classes: int, seed: int = 0) -> tuple:
    """w (k, classes) and b (1, classes) as consecutive views of one buffer, as an
    optimizer's flat parameters lay out a Linear's weight and bias."""
    rng = np.random.default_rng(seed)
    flat = (rng.standard_normal(k * classes + classes) * 0.3).astype(np.float32)
    return flat[:k * classes].reshape(k, classes), flat[k * classes:].reshape(1, classes)


def test_weight_and_bias_rows_read_the_parameters_in_place():
    w, b = _adjacent_head(4, 9)
    rows = vocab_head.weight_and_bias_rows(w, b)
    assert rows is not None and rows.shape == (5, 9) and not rows.flags.writeable
    assert rows.flags.c_contiguous and np.shares_memory(rows, w) and np.shares_memory(rows, b)
    np.testing.assert_array_equal(rows, np.concatenate([w, b]))
    # anything else is copied: not adjacent, the other order, other dtypes or sizes
    assert vocab_head.weight_and_bias_rows(w.copy(), b) is None
    assert vocab_head.weight_and_bias_rows(w, b.copy()) is None
    assert vocab_head.weight_and_bias_rows(w[:, :8], b[:, :8]) is None  # (a strided w)
    flat = np.zeros(45, np.float32)
    assert vocab_head.weight_and_bias_rows(flat[9:].reshape(4, 9), flat[:9]) is None
    assert vocab_head.weight_and_bias_rows(w, b.astype(np.float64)) is None


def test_forward_on_adjacent_parameters_gives_the_copied_rows_bits():
    w, b = _adjacent_head(16, 3000, seed=2)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((70, 16)).astype(np.float32)
    ids = rng.integers(0, 3000, 70)
    in_place = vocab_head.forward(x, w, b, ids)
    copied = vocab_head.forward(x, w.copy(), b.copy(), ids)
    for got, want in zip(in_place, copied):
        np.testing.assert_array_equal(got, want)
    # and both are the loss and softmax - onehot of x @ w + b
    z = x.astype(np.float64) @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(in_place[0], -np.log(p[np.arange(70), ids]), rtol=1e-5)
    p[np.arange(70), ids] -= 1
    np.testing.assert_allclose(in_place[1], p, atol=1e-6)
