"""A linear's ReLU or residual add in the product's epilogue: the kernel (kernels/linear.py,
the blocks' ``numba_kernels.linear_epilogue``) and its rewrite in compiled plans
(compiler/linear_epilogue_rewrite.py). Each must give, bit for bit, what ``linear`` followed
by ``relu`` or ``add`` gives, split into blocks or whole; the op table (tests/op_table.py)
checks the ops' values and gradients against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
from needle import nn, ops
from needle.compiler import linear_epilogue_rewrite, passes
from needle.core.ops_elementwise import ReLU
from needle.core.ops_linalg import Linear
from needle.kernels import blas_policy, linear, recycle

SPECIAL = [0.0, -0.0, np.nan, np.inf, -np.inf]


def _operands(rows: int, inner: int, cols: int, seed: int = 0) -> tuple:
    """x, w, a (1, cols) bias and a residual, float32, with NaN, infinities and zeros of both
    signs where the bias and residual meet products of both signs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, inner)).astype(np.float32)
    w = rng.standard_normal((inner, cols)).astype(np.float32)
    b = rng.standard_normal((1, cols)).astype(np.float32)
    r = rng.standard_normal((rows, cols)).astype(np.float32)
    b[0, :len(SPECIAL)] = SPECIAL
    r[3, :len(SPECIAL)] = SPECIAL
    r[rows - 1, -len(SPECIAL):] = SPECIAL
    x[5, 0] = np.nan
    return x, w, b, r


def _separate(x, w, b, r, relu: bool):
    """What the unfused plan runs: linear, then add(residual, .), then relu."""
    out = Linear().compute(x, w, b)
    if r is not None:
        out = np.add(r, out)
    return ReLU().compute(out) if relu else out


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and \
        np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


@pytest.mark.parametrize("shape", [(256, 128, 512), (1024, 64, 192), (96, 512, 1024),
                                   (8, 16, 24)])
@pytest.mark.parametrize("held", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_epilogue_gives_the_separate_ops_bits(shape, held, residual, relu):
    x, w, b, r = _operands(*shape)
    r = r if residual else None
    before = blas_policy.CALLS[0]
    if held:
        with blas_policy.hold_one_thread():
            got = linear.forward(x, w, b, residual=r, relu=relu)
            want = _separate(x, w, b, r, relu)
    else:
        got = linear.forward(x, w, b, residual=r, relu=relu)
        want = _separate(x, w, b, r, relu)
    assert _same_bits(got, want)
    if held and shape[0] * shape[1] * shape[2] >= blas_policy.MIN_MACS \
            and blas_policy._can_hold():
        assert blas_policy.CALLS[0] > before  # the blocks (and their epilogue) ran


def test_epilogue_of_a_vector_bias_and_a_wider_bias():
    """A (cols,) bias takes the blocks; a float64 bias widens the result (NumPy's rule)."""
    x, w, b, r = _operands(256, 128, 512)
    with blas_policy.hold_one_thread():
        assert _same_bits(linear.forward(x, w, b[0], relu=True), _separate(x, w, b[0], None,
                                                                          True))
        wide = b.astype(np.float64)
        got = linear.forward(x, w, wide, residual=r)
        assert got.dtype == np.float64 and _same_bits(got, _separate(x, w, wide, r, False))


class _Block(nn.Module):
    """A pre-norm feed-forward block: x + W2 relu(W1 LN(x) + b1) + b2, then a linear whose
    value is also returned (a pair that must not fuse)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm1d(dim)
        self.up, self.down, self.out = nn.Linear(dim, hidden), nn.Linear(hidden, dim), \
            nn.Linear(dim, dim)

    def forward(self, x):
        shape = x.shape
        flat = ops.reshape(x, (-1, shape[-1]))
        h = x + ops.reshape(self.down(ops.relu(self.up(self.norm(flat)))), shape)
        return self.out(ops.reshape(h, (-1, shape[-1])))


def _train(x_shape: tuple, rewrite: bool, monkeypatch, steps: int = 3) -> tuple:
    """Parameters after ``steps`` jitted SGD steps of _Block, with the rewrite on or off,
    and the program the plan runs."""
    if not rewrite:
        monkeypatch.setattr(passes, "rewrite_linear_epilogues", lambda program: (0, 0))
    np.random.seed(0)
    model = _Block(64, 512)
    opt = ndl.optim.SGD(model.parameters(), lr=0.05)
    rng = np.random.default_rng(1)
    x = ndl.Tensor(rng.standard_normal(x_shape).astype(np.float32), requires_grad=False)

    @ndl.jit
    def step(x):
        return opt.minimize(ops.summation(model(x) ** 2) / float(np.prod(x_shape)))

    for _ in range(steps):
        assert np.isfinite(step(x).numpy())
    program = step.lower(x)
    monkeypatch.undo()
    return [p.numpy().copy() for p in model.parameters()], program


@pytest.mark.parametrize("x_shape", [(1024, 64), (8, 128, 64)])
def test_rewrite_fires_and_keeps_the_bits(x_shape, monkeypatch):
    plain, plain_program = _train(x_shape, False, monkeypatch)
    fused, program = _train(x_shape, True, monkeypatch)
    names = [step.op.name for step in program.steps]
    assert names.count("linear_relu") == 1 and names.count("linear_residual") == 1
    assert "relu" not in names and "linear_relu" not in [s.op.name for s in
                                                        plain_program.steps]
    assert all(_same_bits(a, b) for a, b in zip(plain, fused))


def test_pairs_that_must_stay_apart(monkeypatch):
    """Small outputs, and a linear whose value something else reads, keep their own steps."""
    monkeypatch.setattr(linear_epilogue_rewrite, "MIN_ELEMENTS", 1 << 30)
    _, program = _train((1024, 64), True, monkeypatch, steps=1)
    names = [step.op.name for step in program.steps]
    assert "linear_relu" not in names and "linear_residual" not in names

    lin = nn.Linear(64, 512)

    @ndl.jit
    def both(x):
        y = lin(x)
        return ops.relu(y), y * 2.0

    x = ndl.Tensor(np.ones((256, 64), np.float32), requires_grad=False)
    r, y2 = both(x)
    assert "linear_relu" not in [s.op.name for s in both.lower(x).steps]
    np.testing.assert_array_equal(r.numpy(), np.maximum(y2.numpy() / 2.0, 0))


def test_split_products_recycle_their_large_outputs(monkeypatch):
    """A product split into blocks writes a large output into a recycled array once nothing
    else refers to the last one (a 4096 x 4096 weight gradient is not page-faulted in every
    step), and never into one still referenced."""
    monkeypatch.setattr(recycle, "MIN_BYTES", 1 << 16)
    monkeypatch.setattr(recycle, "_pool", [])
    monkeypatch.delenv("NEEDLE_RECYCLE_LARGE", raising=False)
    x, _, _, g = _operands(512, 128, 512)  # x^T @ g: a (128, 512) weight gradient
    if not blas_policy._can_hold():
        pytest.skip("products are not split here (no numba TBB threads or OpenBLAS gemm)")
    with blas_policy.hold_one_thread():
        first = blas_policy.transposed_matmul(x, g, True, False)
        assert any(a is first for a in recycle._pool)
        kept = first.copy()
        second = blas_policy.transposed_matmul(x, g, True, False)
        assert second.ctypes.data != first.ctypes.data  # first is still referenced
        np.testing.assert_array_equal(first, kept)
        address = first.ctypes.data
        del first
        third = blas_policy.transposed_matmul(x, g, True, False)
    assert third.ctypes.data == address and any(a is third for a in recycle._pool)
    np.testing.assert_array_equal(third, kept)
    np.testing.assert_allclose(kept, x.T.astype(np.float64) @ g, rtol=1e-4, atol=1e-3)


def test_split_products_refuse_operands_that_do_not_fit():
    """Inside a hold, mismatched inner dimensions raise NumPy's error (the blocks would
    read past the smaller operand)."""
    x, w, _, _ = _operands(512, 128, 512)
    with blas_policy.hold_one_thread(), pytest.raises(ValueError):
        blas_policy.transposed_matmul(x, w, True, False)
