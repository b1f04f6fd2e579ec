"""The language models' softmax passes run whole in numba, their rows split over numba's
prange threads (kernels/numba_exp.py; numba_vocab_head.py, numba_attention.py,
numba_loss_rows.py and their numba_parallel_* twins): numba's exp and row maximum against
float64 and NumPy, and the same bits with prange on and off (blocks of uneven size), with a
check that the prange loops ran."""

from __future__ import annotations

import numpy as np
import pytest

from needle.backend import parallel_loops
from needle.kernels import attention, cross_entropy, vocab_head

exp_loops = pytest.importorskip("needle.kernels.numba_exp")
numba = pytest.importorskip("numba")


@numba.njit
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = exp_loops.exp_f32(x[i])


@numba.njit
def _peak(row):
    return exp_loops.row_peak_f32(row)


def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def test_exp_is_within_one_ulp_of_the_correctly_rounded_value():
    x = np.concatenate([np.linspace(-110, 90, 400_001, dtype=np.float32),
                        np.float32([-87.33, -87.34, -103.97, -103.98, 88.72, 88.7228])])
    got = np.empty_like(x)
    _exp_all(x, got)
    with np.errstate(over="ignore", under="ignore"):
        want = np.exp(x.astype(np.float64)).astype(np.float32)
    assert np.array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    assert _ulps(got[finite], want[finite]).max() <= 1
    assert (got[x < -104] == 0).all() and (got[(x > -103.9) & (x < 0)] > 0).all()


def test_exp_of_special_values():
    x = np.float32([-np.inf, np.inf, np.nan, 0.0, -0.0, 1.0])
    got = np.empty_like(x)
    _exp_all(x, got)
    assert got[0] == 0 and got[1] == np.inf and np.isnan(got[2])
    assert got[3] == 1 and got[4] == 1 and got[5] == np.float32(np.e)


@numba.njit
def _scaled_both_ways(p, k, by_factors, by_ldexp):
    for i in range(p.shape[0]):
        for j in range(k.shape[0]):
            by_factors[i, j] = exp_loops.times_power_of_two_by_factors(p[i], k[j])
            by_ldexp[i, j] = exp_loops.times_power_of_two_by_ldexp(p[i], k[j])


def test_exp_scaling_by_ldexp_gives_the_two_factors_bits():
    # every exponent exp_f32 makes, on mantissas over its polynomial's range (the results
    # span the denormals, their rounding included, and overflow)
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0.5, 2.0, 2000), [0.5, 0.70710677, 1.0, 1.4142135,
                                                      1.9999999]]).astype(np.float32)
    k = np.arange(-150, 130, dtype=np.int32)
    by_factors = np.empty((p.size, k.size), np.float32)
    by_ldexp = np.empty_like(by_factors)
    with np.errstate(over="ignore"):
        _scaled_both_ways(p, k, by_factors, by_ldexp)
    assert np.array_equal(by_factors.view(np.int32), by_ldexp.view(np.int32))
    want = np.ldexp(p.astype(np.float64)[:, None], k[None, :]).astype(np.float32)
    assert np.array_equal(by_factors.view(np.int32), want.view(np.int32))  # rounded once
    assert (by_factors == 0).any() and (np.abs(by_factors) < 1.2e-38).any()  # denormals met


@pytest.mark.parametrize("row", [
    [3.0, -1.0, 2.5, 0.0], [-3.0, -1.0, -2.5, -7.0], [-0.0, -1.0], [-2.0, 0.0, -0.0],
    [-np.inf, -np.inf], [-np.inf, -5.0], [1.0, np.inf, 2.0], [1.0, np.nan, 2.0],
    [-1.0, np.nan], [1e-45, -1e-45], [-3e38, 3e38], [7.0]])
def test_row_peak_is_numpys_max(row):
    r = np.float32(row)
    got, want = _peak(r), np.max(r)
    assert (np.isnan(got) and np.isnan(want)) or (got == want)


def test_row_peak_on_long_random_rows():
    rng = np.random.default_rng(0)
    for width in (1, 7, 64, 1001):
        for shift in (-50.0, 0.0, 50.0):
            r = (rng.standard_normal(width) * 10 + shift).astype(np.float32)
            assert _peak(r) == r.max()


class _Counting:
    """A NumbaLoops wrapper counting the prange loops that ran."""

    def __init__(self, loops):
        self.loops, self.ran = loops, []

    def __getattr__(self, name):
        return getattr(self.loops, name)

    def call(self, loop, *args):
        done = self.loops.call(loop, *args)
        if done:
            self.ran.append(loop.__name__)
        return done


def _without_prange(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(parallel_loops, "tbb_layer", lambda: False)
        assert parallel_loops.parallel_threads() == 0
        return fn()


def _vocab_data(rows, k, classes, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = (rng.standard_normal((k, classes)) * 0.5).astype(np.float32)
    b = (rng.standard_normal(classes) * 0.5).astype(np.float32)
    return x, w, b, rng.integers(0, classes, rows)


def _vocab_forward(x, w, b, ids):
    losses, s = vocab_head.forward(x, w, b, ids)
    return losses.copy(), s.copy()


def test_vocab_head_rows_split_over_threads_give_the_one_thread_bits(monkeypatch):
    if vocab_head.LOOPS.module() is None:
        pytest.skip("numba turned off")
    x, w, b, ids = _vocab_data(333, 16, 1001)        # 333k logits, rows of uneven length
    assert x.shape[0] * w.shape[1] >= vocab_head.PRANGE_MIN_SIZE
    counting = _Counting(vocab_head.PARALLEL_LOOPS)
    monkeypatch.setattr(vocab_head, "PARALLEL_LOOPS", counting)
    monkeypatch.setattr(vocab_head.cpu_threads, "NUM_THREADS", 2)
    split = _vocab_forward(x, w, b, ids)
    if parallel_loops.parallel_threads():
        assert counting.ran == ["_softmax_minus_onehot_rows"]
    counting.ran.clear()
    serial = _without_prange(monkeypatch, lambda: _vocab_forward(x, w, b, ids))
    assert counting.ran == []
    monkeypatch.setattr(vocab_head.cpu_threads, "NUM_THREADS", 1)
    one = _vocab_forward(x, w, b, ids)
    for got in (serial, one):
        np.testing.assert_array_equal(got[0], split[0])
        np.testing.assert_array_equal(got[1], split[1])


@pytest.mark.parametrize("bad", [np.inf, np.nan, -np.nan])
def test_vocab_head_rows_with_inf_or_nan_logits_give_none(bad):
    x, w, b, ids = _vocab_data(20, 4, 7000)
    w[:, 3] = 0
    b[3] = bad                                       # column 3 of every row is `bad`
    assert vocab_head.forward(x, w, b, ids) is None


def test_vocab_head_minus_inf_logits_are_probability_zero():
    x, w, b, ids = _vocab_data(20, 4, 7000, seed=1)
    b[5] = -np.inf
    ids[ids == 5] = 6
    losses, s = vocab_head.forward(x, w, b, ids)
    assert np.isfinite(losses).all() and (s[:, 5] == 0).all()
    np.testing.assert_allclose(s.sum(axis=1), 0, atol=2e-6)


def _attention_data(b, t, heads, d, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((b, t, heads * d)).astype(np.float32) for _ in range(4)]


def _attention_reference(q, k, v, mask, heads, scale):
    """softmax(scale q k^T + mask) v per head in float64."""
    b, t, width = q.shape
    split = [a.astype(np.float64).reshape(b, -1, heads, width // heads).transpose(0, 2, 1, 3)
             for a in (q, k, v)]
    s = scale * split[0] @ split[1].swapaxes(-1, -2) + (0 if mask is None else mask)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ split[2]).transpose(0, 2, 1, 3).reshape(b, t, width)


@pytest.mark.parametrize("whole", [True, False], ids=["whole_slabs", "softmax_slabs"])
@pytest.mark.parametrize("masked", [True, False])
def test_attention_slabs_split_over_threads_give_the_one_thread_bits(monkeypatch, masked,
                                                                     whole):
    if attention.LOOPS.module() is None:
        pytest.skip("numba turned off")
    heads, t, d = 5, 45, 8
    q, k, v, g = _attention_data(7, t, heads, d)    # 7 * 5 * 45 * 45 = 70,875 logits
    mask = np.triu(np.full((t, t), -np.inf, np.float32), 1) if masked else None
    scale = d ** -0.5
    counting = _Counting(attention.PARALLEL_LOOPS)
    monkeypatch.setattr(attention, "PARALLEL_LOOPS", counting)
    # whole: products and softmax per slab (tests/test_attention_slabs.py); else the batched
    # products with only the softmax passes split
    monkeypatch.setattr(attention, "SLABS", whole)

    def both():
        return ([attention.attention(q, k, v, mask, heads, scale)]
                + [a for a in attention.attention_grad(g, q, k, v, mask, heads, scale)
                   if a is not None])

    split = both()
    if parallel_loops.parallel_threads():
        assert attention._slab_blocks(np.empty((7, heads, t, t), np.float32)) == 4
        assert counting.ran == (
            ["_attention_slabs", "_attention_grad_slabs"] if whole and attention._slab_kernels(
                q, k, v, g, mask, heads, scale) is not None
            else ["_softmax_slabs", "_softmax_slabs", "_softmax_grad_slabs"])
    serial = _without_prange(monkeypatch, both)
    for got, want in zip(serial, split):
        np.testing.assert_array_equal(got, want)
    want = _attention_reference(q, k, v, mask, heads, scale)
    np.testing.assert_allclose(split[0], want, rtol=1e-5, atol=1e-6)


def test_attention_numba_and_numpy_paths_agree():
    if attention.LOOPS.module() is None:
        pytest.skip("numba turned off")
    heads, t, d = 4, 16, 8
    q, k, v, g = _attention_data(3, t, heads, d, seed=2)
    mask = np.triu(np.full((t, t), -1e9, np.float32), 1)
    fast = attention.attention_grad(g, q, k, v, mask, heads, 0.3)
    attention.LOOPS.failed.append("forced off by the test")
    try:
        plain = attention.attention_grad(g, q, k, v, mask, heads, 0.3)
    finally:
        attention.LOOPS.failed.remove("forced off by the test")
    for a, b in zip(fast, plain):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def _loss_reference(z, ids, g):
    z64 = z.astype(np.float64)
    peak = z64.max(axis=1, keepdims=True)
    e = np.exp(z64 - peak)
    total = e.sum(axis=1)
    here = np.arange(len(ids))
    grad = e / total[:, None] * g[:, None]
    grad[here, ids] -= g
    return np.log(total) + peak[:, 0] - z64[here, ids], grad


def test_large_loss_rows_split_over_threads_give_the_one_thread_bits(monkeypatch):
    if cross_entropy.LARGE_LOOPS.module() is None:
        pytest.skip("numba turned off")
    rng = np.random.default_rng(4)
    z = (rng.standard_normal((301, 1003)) * 3).astype(np.float32)   # uneven row blocks
    ids = rng.integers(0, 1003, 301)
    g = np.broadcast_to(np.float32(1 / 301), (301,))                  # the mean's adjoint
    counting = _Counting(cross_entropy.PARALLEL_LOOPS)
    monkeypatch.setattr(cross_entropy, "PARALLEL_LOOPS", counting)

    def both():
        return cross_entropy.loss_rows(z, ids), cross_entropy.loss_rows_grad_blocked(z, ids, g)

    losses, grad = (a.copy() for a in both())
    if parallel_loops.parallel_threads():
        assert counting.ran == ["_loss_blocks", "_loss_grad_blocks"]
    serial = _without_prange(monkeypatch, both)
    np.testing.assert_array_equal(serial[0], losses)
    np.testing.assert_array_equal(serial[1], grad)
    want_losses, want_grad = _loss_reference(z, ids, np.asarray(g, np.float64))
    np.testing.assert_allclose(losses, want_losses, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-10)


def test_large_loss_rows_step_aside_for_bad_ids_and_infinite_rows():
    if cross_entropy.LARGE_LOOPS.module() is None:
        pytest.skip("numba turned off")
    rng = np.random.default_rng(5)
    z = rng.standard_normal((200, 1000)).astype(np.float32)
    ids = rng.integers(0, 1000, 200)
    assert cross_entropy.loss_rows(z, ids) is not None
    bad = ids.copy()
    bad[7] = 1000
    assert cross_entropy.loss_rows(z, bad) is None                    # the op raises then
    for value in (np.inf, np.nan, -np.nan):
        odd = z.copy()
        odd[3, 5] = value
        assert cross_entropy.loss_rows(odd, ids) is None              # the careful formula
