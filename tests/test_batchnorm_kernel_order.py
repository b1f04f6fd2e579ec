"""BatchNorm's numba loops against NumPy transcriptions of their arithmetic, bit for bit.

The gradient sums (numba_kernels.bn_grad_sums and the fused BN+ReLU
numba_batchnorm_relu.bn_relu_grad_sums) cut the rows into spans of 8 wide rows (as many whole
rows as fit in 64 values), add each value with the same position of the span's other 7 in
the arrays' dtype as a fixed tree, then the spans' sums, and the rows after the last span,
in float64 in row order;
the statistics' shifted sums add every row in float64 in row order (8 rows a column in
registers); the elementwise passes (affine, the gradient's dx, the fused dx with its conv-bias
sums) run in tiles of whole rows. Each test transcribes that order in NumPy (whose float32
and float64 adds and products round as IEEE says, one operation at a time) on block bounds
that cut chunks and tiles unevenly, so a change of order or of float operations shows.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from needle.kernels import numba_batchnorm_relu as nbr  # noqa: E402
from needle.kernels import numba_kernels as nk  # noqa: E402

CHUNK = nk.GRAD_SUM_CHUNK


def _tree_chunk_sums(v: np.ndarray) -> np.ndarray:
    """Column sums of v's rows as the gradient sums add them (see the module docstring)."""
    m, c = v.shape
    sub = max(1, nk.GRAD_SUM_WIDTH // c)  # rows per wide row
    span = CHUNK * sub
    acc = np.zeros(c, np.float64)
    whole = m - m % span
    for i in range(0, whole, span):
        r = v[i:i + span].reshape(CHUNK, sub, c)  # 8 wide rows of sub rows each
        part = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for q in range(sub):
            acc += part[q].astype(np.float64)
    for i in range(whole, m):
        acc += v[i].astype(np.float64)
    return acc


def _arrays(m: int, c: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((m, c)) * 2 + 0.5).astype(dtype)
    g = rng.standard_normal((m, c)).astype(dtype)
    alpha, beta, mean = (rng.standard_normal(c).astype(dtype) for _ in range(3))
    return g, x, alpha, beta, mean


SHAPES = [(203, 16), (61, 5), (97, 50), (8, 3), (7, 16), (300, 128), (130, 32)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,c", SHAPES)
def test_grad_sums_add_chunks_of_rows_as_a_tree(dtype, m, c):
    g, x, _, _, mean = _arrays(m, c, dtype)
    sum_g, sum_gc = np.empty(c), np.empty(c)
    nk.bn_grad_sums(g, x, mean, sum_g, sum_gc)
    np.testing.assert_array_equal(sum_g, _tree_chunk_sums(g))
    np.testing.assert_array_equal(sum_gc, _tree_chunk_sums(g * (x - mean)))
    # and they stay float64-accurate: far closer to the exact sums than float32 rounding
    exact = (g.astype(np.float64) * (x - mean)).sum(axis=0)
    scale = np.abs(g.astype(np.float64) * (x - mean)).sum(axis=0)
    assert np.all(np.abs(sum_gc - exact) <= 4 * np.finfo(dtype).eps * scale + 1e-300)


def _masked(g: np.ndarray, x: np.ndarray, alpha, beta) -> np.ndarray:
    return g * ((x * alpha + beta) > 0).astype(g.dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,c", SHAPES)
@pytest.mark.parametrize("per", [1, 3, 16])
def test_fused_grad_sums_are_the_pairs_sums_of_a_block(dtype, m, c, per):
    """Rows [s, e) of a block (s not on a chunk's edge), g read at row i // per."""
    rows = -(-m // per)
    g_small, x, alpha, beta, mean = _arrays(m, c, dtype, seed=per)
    g_small = g_small[:rows]
    full = np.repeat(g_small, per, axis=0)[:m]
    s, e = min(3, m - 1), m
    sum_g, sum_gc = np.empty(c), np.empty(c)
    nbr.bn_relu_grad_sums(g_small, per, x, alpha, beta, mean, s, e, sum_g, sum_gc)
    r = _masked(full[s:e], x[s:e], alpha, beta)
    np.testing.assert_array_equal(sum_g, _tree_chunk_sums(r))
    np.testing.assert_array_equal(sum_gc, _tree_chunk_sums(r * (x[s:e] - mean)))
    # the unfused loop on relu_grad's output gives the same bits
    pair_g, pair_gc = np.empty(c), np.empty(c)
    nk.bn_grad_sums(np.ascontiguousarray(r), np.ascontiguousarray(x[s:e]), mean, pair_g,
                    pair_gc)
    np.testing.assert_array_equal(sum_g, pair_g)
    np.testing.assert_array_equal(sum_gc, pair_gc)


@pytest.mark.parametrize("m,c", SHAPES)
def test_shifted_sums_add_every_row_in_order(m, c):
    _, x, _, _, _ = _arrays(m, c, np.float32)
    shift = x[0].astype(np.float64)
    s1, s2 = np.empty(c), np.empty(c)
    nk.shifted_sums(x, shift, s1, s2)
    acc1, acc2 = np.zeros(c), np.zeros(c)
    for i in range(m):
        d = x[i].astype(np.float64) - shift
        acc1 += d
        acc2 += d * d
    np.testing.assert_array_equal(s1, acc1)
    np.testing.assert_array_equal(s2, acc2)
    mean, var = np.empty(c, np.float32), np.empty(c, np.float32)
    nk.one_pass_moments(x, mean, var)
    np.testing.assert_array_equal(mean, (shift + acc1 / m).astype(np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,c", SHAPES)
def test_elementwise_passes_in_tiles_give_each_values_arithmetic(dtype, m, c):
    g, x, alpha, beta, mean = _arrays(m, c, dtype)
    a, b, k = (v[::-1].copy() for v in (alpha, beta, mean))
    s, e = min(5, m - 1), m - 1 if m > 6 else m
    out = np.full_like(x, 7.0)
    nk.affine_rows(x, alpha, beta, s, e, out)
    np.testing.assert_array_equal(out[s:e], x[s:e] * alpha + beta)
    assert np.all(out[:s] == 7.0) and np.all(out[e:] == 7.0)
    dx = np.full_like(x, 7.0)
    nk.bn_grad_dx_rows(g, x, mean, a, b, k, s, e, dx)
    want = g[s:e] * a + (x[s:e] - mean) * b + k
    np.testing.assert_array_equal(dx[s:e], want)
    assert np.all(dx[:s] == 7.0) and np.all(dx[e:] == 7.0)
    for sums in (np.empty(0), np.empty(c)):
        fused = np.full_like(x, 7.0)
        nbr.bn_relu_grad_dx(g, 1, x, alpha, beta, mean, a, b, k, s, e, fused, sums)
        r = _masked(g[s:e], x[s:e], alpha, beta)
        want = r * a + (x[s:e] - mean) * b + k
        np.testing.assert_array_equal(fused[s:e], want)
        assert np.all(fused[:s] == 7.0) and np.all(fused[e:] == 7.0)
        if sums.size:
            acc = np.zeros(c)
            for row in want:
                acc += row.astype(np.float64)
            np.testing.assert_array_equal(sums, acc)
