"""Dropout's mask (kernels/random_mask.py), broadcast_to's direct view and the loss mean's
gradient: the same bits as the NumPy formulas they replace, read-only views, torch's grads."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import needle as ndl
from needle import ops
from needle.kernels import random_mask

SHAPES = [(100, 50), (3, 4, 5), (7,), (1,), (2, 1, 33)]
PS = [0.9, 0.5, 0.1, 1 / 3, 0.0, 1.0, 0.9999999]


def _reference_mask(shape: tuple, p: float, dtype) -> np.ndarray:
    """The formula bernoulli_like computed before the fused loop (and init.randb's)."""
    draw = np.asarray(np.random.rand(*shape))
    return np.asarray((draw.astype(np.float32) <= p).astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_mask_bits_match_numpy_formula(shape, dtype):
    for seed in (0, 1, 12345):
        for p in PS:
            np.random.seed(seed)
            want = _reference_mask(shape, p, dtype)
            after_want = np.random.rand()
            np.random.seed(seed)
            got = ops.bernoulli_like(ndl.Tensor(np.zeros(shape, dtype), dtype=dtype), p)
            after_got = np.random.rand()  # exactly one draw of the shape was taken
            assert got.dtype == want.dtype and got.shape == shape
            np.testing.assert_array_equal(got.numpy(), want)
            assert after_got == after_want


def test_mask_of_a_0d_input():
    """A 0-d input: np.random.rand() returns a Python float (this used to raise)."""
    np.random.seed(3)
    want = _reference_mask((), 0.5, np.float32)
    np.random.seed(3)
    got = ops.bernoulli_like(ndl.Tensor(np.float32(1.0)), 0.5)
    assert got.shape == () and float(got.numpy()) == float(want)


def test_numpy_fallback_gives_the_same_bits(monkeypatch):
    monkeypatch.setattr(random_mask.LOOPS, "failed", ["forced NumPy path"])
    monkeypatch.setattr(random_mask.STREAM_LOOPS, "failed", ["forced NumPy path"])
    np.random.seed(7)
    want = _reference_mask((100, 50), 0.9, np.float32)
    np.random.seed(7)
    got = random_mask.bernoulli_mask(np, (100, 50), 0.9, np.float32)
    np.testing.assert_array_equal(got, want)


def test_loop_at_the_float32_threshold():
    """Draws at, just beside and halfway between p's float32 neighbours (ties round to even):
    the loop rounds each draw to float32 as NumPy's astype does."""
    loops = random_mask.LOOPS.module()
    if loops is None:
        pytest.skip("numba not installed or turned off")
    for p in (0.9, 0.1, 1 / 3, 0.5):
        p32 = np.float32(p)
        up, down = np.nextafter(p32, np.float32(1)), np.nextafter(p32, np.float32(0))
        draws = [float(p32), float(up), float(down), p, (float(p32) + float(up)) / 2,
                 (float(p32) + float(down)) / 2]
        draws += [np.nextafter(d, 1.0) for d in draws] + [np.nextafter(d, 0.0) for d in draws]
        draw = np.array(draws)
        for dtype in (np.float32, np.float64):
            out = np.empty(draw.shape, dtype)
            loops.bernoulli_mask(draw, np.float32(p), out)
            np.testing.assert_array_equal(out, (draw.astype(np.float32) <= p).astype(dtype))


def test_mask_bits_without_numba():
    """NEEDLE_NUMBA=0 (NumPy only) gives the mask the numba loop gives."""
    code = ("import numpy as np, needle as ndl; from needle import ops; np.random.seed(5); "
            "m = ops.bernoulli_like(ndl.Tensor(np.zeros((64, 33), np.float32)), 0.7); "
            "import sys; sys.stdout.write(m.numpy().tobytes().hex())")
    env = dict(os.environ, NEEDLE_NUMBA="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    np.random.seed(5)
    want = _reference_mask((64, 33), 0.7, np.float32)
    assert bytes.fromhex(out) == want.tobytes()


@pytest.mark.parametrize("value, shape", [
    (np.ones((1,), np.float32), (100,)),
    (np.float32(0.25), (100,)),                      # a NumPy scalar (a 0-d op result)
    (np.array(2.0), (3, 4)),
    (np.arange(3.0).reshape(3, 1), (2, 3, 4)),
    (np.arange(6, dtype=np.float32).reshape(2, 3), (2, 3)),
    (np.array([True, False]), (3, 2)),
    (np.arange(12.0).reshape(3, 4)[:, ::2], (5, 3, 2)),  # strided: np.broadcast_to's path
])
def test_broadcast_to_is_numpys_read_only_view(value, shape):
    from needle.core.ops_shape import BroadcastTo

    _check_view(BroadcastTo(shape).compute(value), np.broadcast_to(value, shape))
    x = ndl.Tensor(value, dtype=np.asarray(value).dtype)  # (a copy)
    _check_view(ops.broadcast_to(x, shape).cached_data, np.broadcast_to(x.cached_data, shape))


def _check_view(got, want):
    np.testing.assert_array_equal(got, want)
    assert got.dtype == want.dtype and got.strides == want.strides
    assert not got.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        got[...] = 0


def test_broadcast_compute_rejects_what_numpy_rejects():
    from needle.core.ops_shape import BroadcastTo

    with pytest.raises(ValueError):
        BroadcastTo((4,)).compute(np.ones(3))
    with pytest.raises(ValueError):
        BroadcastTo((3,)).compute(np.ones((2, 3)))


@pytest.mark.parametrize("axes, keepdims", [(None, False), (0, False), ((0, 1), False),
                                            (1, False), (2, False), ((0, 2), True), (None, True)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mean_gradient_matches_torch(axes, keepdims, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, 4)).astype(dtype)
    x_t = torch.tensor(x, requires_grad=True)
    x_n = ndl.Tensor(x, dtype=dtype, requires_grad=True)
    m_t = x_t.mean() if axes is None and not keepdims else x_t.mean(
        dim=tuple(range(3)) if axes is None else axes, keepdims=keepdims)
    m_n = ops.mean(x_n, axes, keepdims=keepdims)
    w = rng.standard_normal(tuple(m_t.shape)).astype(dtype)
    (m_t * torch.tensor(w)).sum().backward()
    ops.summation(m_n * ndl.Tensor(w, dtype=dtype)).backward()
    np.testing.assert_array_equal(x_n.grad.numpy(), x_t.grad.numpy())


def test_loss_mean_gradient_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((100, 10)).astype(np.float32)
    y = rng.integers(0, 10, 100)
    z_t = torch.tensor(logits, requires_grad=True)
    torch.nn.functional.cross_entropy(z_t, torch.tensor(y)).backward()
    z_n = ndl.Tensor(logits, requires_grad=True)
    ndl.nn.SoftmaxLoss()(z_n, ndl.Tensor(y)).backward()
    np.testing.assert_allclose(z_n.grad.numpy(), z_t.grad.numpy(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("axes, keepdims", [(0, False), ((0, 1), False), (None, False),
                                            (0, True), ((0, 2), True)])
def test_mean_and_sum_gradients_in_a_graph_with_unknown_dims(axes, keepdims):
    """A declared graph (needle.static) with an unknown batch dim: the adjoint of a reduction
    over leading axes is broadcast back without a reshape; the same values as eager."""
    import needle.static as st

    rng = np.random.default_rng(2)
    x_val = rng.standard_normal((6, 5, 4)).astype(np.float32)
    for reduce in (ops.mean, ops.summation):
        with st.Graph():
            x = st.placeholder((None, 5, None), name="x")
            out = reduce(x * 1.5, axes, keepdims=keepdims)
            w = ndl.Tensor(np.float32(rng.standard_normal()))  # (an adjoint other than 1)
            loss = ops.summation(out * w)
            (grad,) = st.gradients(loss, [x])
            with st.Session() as sess:
                got = sess.run(grad, {x: x_val})
        xe = ndl.Tensor(x_val, requires_grad=True)
        ops.summation(reduce(xe * 1.5, axes, keepdims=keepdims) * w).backward()
        np.testing.assert_array_equal(got, xe.grad.numpy())


@pytest.mark.parametrize("p", [0.1, 0.5, 1 / 3])
def test_dropout_is_one_node_with_the_two_op_bits(p):
    """Dropout's output is one apply_mask node; it and the input's gradient are bit for bit
    (x * mask) / (1 - p) and (g / (1 - p)) * mask, the product-then-division it replaced,
    on values with zeros of both signs, NaN and inf in x and in the seed gradient."""
    rng = np.random.default_rng(3)
    x_np = rng.standard_normal((64, 33)).astype(np.float32) * 1e3
    g_np = rng.standard_normal((64, 33)).astype(np.float32)
    x_np.flat[:4] = [0.0, -0.0, np.nan, np.inf]
    g_np.flat[4:8] = [-0.0, np.nan, -np.inf, 1e-40]
    x = ndl.Tensor(x_np, requires_grad=True)
    np.random.seed(7)
    out = ndl.nn.Dropout(p)(x)
    np.random.seed(7)
    mask = _reference_mask(x_np.shape, 1 - p, np.float32)
    assert out.op.name == "apply_mask"
    keep = 1 - p
    np.testing.assert_array_equal(out.numpy(), x_np * mask / keep)
    out.backward(ndl.Tensor(g_np))
    got, expected = x.grad.numpy(), g_np / keep * mask
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
