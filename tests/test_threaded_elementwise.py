"""kernels/threaded_elementwise.py: ReLU, ReLU's adjoint and the bias add on large arrays as
one compiled pass split across needle's threads. Each must give, bit for bit, what the NumPy
formulas give (NaN, -0.0 and infinities included), for every memory layout an NCHW model
makes, on any number of threads; with numba absent or failing, the NumPy path runs."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
from needle.backend import cpu_threads
from needle.backend.numba_support import numba_module
from needle.kernels import layout, threaded_elementwise

ops = ndl.ops

needs_numba = pytest.mark.skipif(numba_module() is None,
                                 reason="numba is not installed or NEEDLE_NUMBA=0")

_SPECIAL = [0.0, -0.0, 1.0, -1.0, np.nan, -np.nan, np.inf, -np.inf, 1e-45, -1e-45, 3.5, -2.25]

#: an NCHW activation of nn.Conv: channels-last memory behind an NCHW view (110592 values:
#: seven uneven blocks with the fixture's block size)
SHAPE_NHWC = (9, 16, 16, 48)


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    """Split arrays of 2**15 values or more into blocks of 2**14 (the defaults need 16 MB
    arrays to split into several blocks; the tests stay small)."""
    monkeypatch.setattr(threaded_elementwise, "SPLIT_MIN_ELEMENTS", 1 << 15)
    monkeypatch.setattr(threaded_elementwise, "BLOCK_ELEMENTS", 1 << 14)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint8)


def _with_specials(rng: np.random.Generator, shape: tuple, dtype) -> np.ndarray:
    """Random values with every special value sprinkled in."""
    x = rng.standard_normal(shape).astype(dtype)
    flat = x.reshape(-1)
    idx = rng.choice(flat.size, 40 * len(_SPECIAL), replace=False)
    flat[idx] = np.tile(np.array(_SPECIAL, dtype), 40)
    return x


def _numpy_relu(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, np.zeros((), a.dtype))


def _numpy_relu_grad(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return (a > 0).astype(g.dtype) * g


def _layouts(rng: np.random.Generator, dtype) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, a, g) with a and g of one shape and layout."""
    a = _with_specials(rng, SHAPE_NHWC, dtype)
    g = _with_specials(rng, SHAPE_NHWC, dtype)
    return [("nhwc", a, g),
            ("nchw view of nhwc memory", a.transpose(0, 3, 1, 2), g.transpose(0, 3, 1, 2)),
            ("flat", a.reshape(-1), g.reshape(-1)),
            ("three images", a[:3], g[:3])]


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_and_relu_grad_match_numpy_bitwise_in_every_layout(dtype):
    rng = np.random.default_rng(0)
    for name, a, g in _layouts(rng, dtype):
        out = threaded_elementwise.relu(a)
        assert out is not None, name
        assert out.shape == a.shape and out.strides == a.strides, name
        np.testing.assert_array_equal(_bits(out), _bits(_numpy_relu(a)), err_msg=name)
        grad = threaded_elementwise.relu_grad(a, g)
        assert grad is not None, name
        assert grad.strides == g.strides and grad.dtype == g.dtype, name
        np.testing.assert_array_equal(_bits(grad), _bits(_numpy_relu_grad(a, g)), err_msg=name)


@needs_numba
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_results_do_not_depend_on_the_thread_count(monkeypatch, threads):
    rng = np.random.default_rng(1)
    a = _with_specials(rng, SHAPE_NHWC, np.float32).transpose(0, 3, 1, 2)
    g = _with_specials(rng, SHAPE_NHWC, np.float32).transpose(0, 3, 1, 2)
    b = rng.standard_normal(SHAPE_NHWC[-1]).astype(np.float32)
    xm = np.ascontiguousarray(a.transpose(0, 2, 3, 1)).reshape(-1, SHAPE_NHWC[-1])
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", threads)
    np.testing.assert_array_equal(_bits(threaded_elementwise.relu(a)), _bits(_numpy_relu(a)))
    np.testing.assert_array_equal(_bits(threaded_elementwise.relu_grad(a, g)),
                                  _bits(_numpy_relu_grad(a, g)))
    np.testing.assert_array_equal(_bits(threaded_elementwise.add_row(xm, b)), _bits(xm + b))


@needs_numba
def test_bias_add_matches_numpy_bitwise():
    rng = np.random.default_rng(2)
    a = _with_specials(rng, SHAPE_NHWC, np.float32)
    b = np.array(_SPECIAL * 4, np.float32)  # 48 channels of special values
    with np.errstate(invalid="ignore"):
        expected = a + b
        np.testing.assert_array_equal(_bits(layout.add(a, b)), _bits(expected))
        np.testing.assert_array_equal(_bits(layout.add(b, a)), _bits(expected))
        np.testing.assert_array_equal(_bits(ops.add(ndl.Tensor(a), ndl.Tensor(b)).numpy()),
                                      _bits(expected))


@needs_numba
@pytest.mark.parametrize("small_shape", [(9, 48, 1, 1), (1, 48, 1, 1), (9, 48, 16, 1),
                                         (9, 1, 16, 16)])
def test_relu_grad_with_a_broadcast_gradient_matches_numpy_bitwise(small_shape):
    """g broadcast to a's shape (a global average pool's gradient is (N, C, 1, 1) broadcast):
    the loop reads the small array; broadcast along a's innermost axis in memory (the
    channels of channels-last memory) NumPy runs. Either way the NumPy formula's bits."""
    rng = np.random.default_rng(7)
    a = _with_specials(rng, SHAPE_NHWC, np.float32).transpose(0, 3, 1, 2)  # (9, 48, 16, 16)
    g = np.broadcast_to(_with_specials(rng, small_shape, np.float32)
                        if np.prod(small_shape) > 40 * len(_SPECIAL)
                        else rng.standard_normal(small_shape).astype(np.float32), a.shape)
    out = threaded_elementwise.relu_grad(a, g)
    if small_shape[1] == 1:  # broadcast along the channels, innermost in a's memory
        assert out is None
        out = ndl.ops.relu_grad(ndl.Tensor(a), ndl.Tensor(g)).numpy()
    else:
        assert out is not None and out.strides == a.strides
    np.testing.assert_array_equal(_bits(out), _bits(_numpy_relu_grad(a, g)))


@needs_numba
def test_relu_then_global_average_pool_gradient_against_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    a = rng.standard_normal(SHAPE_NHWC).astype(np.float32).transpose(0, 3, 1, 2)
    w = rng.standard_normal((9, 48)).astype(np.float32)
    x = ndl.Tensor(a)
    (ops.mean(ops.relu(x), axes=(2, 3)) * ndl.Tensor(w, requires_grad=False)).sum().backward()
    tx = torch.tensor(np.ascontiguousarray(a), requires_grad=True)
    (torch.relu(tx).mean(dim=(2, 3)) * torch.from_numpy(w)).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy(), rtol=1e-6, atol=1e-9)


def test_inputs_the_loops_cannot_take_return_none():
    rng = np.random.default_rng(3)
    a = rng.standard_normal(SHAPE_NHWC).astype(np.float32)
    g = rng.standard_normal(SHAPE_NHWC).astype(np.float32)
    assert threaded_elementwise.relu(a[:, ::2]) is None  # not one dense block
    assert threaded_elementwise.relu(a.astype(np.float16)) is None
    assert threaded_elementwise.relu(a[:1, :2]) is None  # too small to pay
    assert threaded_elementwise.relu_grad(a, g.astype(np.float64)) is None  # mixed dtypes
    assert threaded_elementwise.relu_grad(a, np.ascontiguousarray(
        g.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)) is None  # different layouts
    assert threaded_elementwise.relu_grad(a, g[:1]) is None  # broadcasting
    assert threaded_elementwise.add_row(a.reshape(-1, 48), np.ones(48)) is None  # dtypes


def test_numpy_path_when_numba_fails(monkeypatch):
    """A numba that cannot compile the loops latches them off; the ops still give the NumPy
    results (the path NEEDLE_NUMBA=0 and a missing numba take)."""
    rng = np.random.default_rng(4)
    a = _with_specials(rng, SHAPE_NHWC, np.float32).transpose(0, 3, 1, 2)
    g = _with_specials(rng, SHAPE_NHWC, np.float32).transpose(0, 3, 1, 2)
    monkeypatch.setattr(threaded_elementwise._loops, "failed", ["relu"])
    assert threaded_elementwise.relu(a) is None
    x = ndl.Tensor(a)
    y = ops.relu(x)
    with np.errstate(invalid="ignore"):
        y.backward(ndl.Tensor(g, requires_grad=False))
    np.testing.assert_array_equal(_bits(y.numpy()), _bits(_numpy_relu(a)))
    np.testing.assert_array_equal(_bits(x.grad.numpy()), _bits(_numpy_relu_grad(a, g)))


@needs_numba
def test_relu_forward_and_gradient_against_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    a = rng.standard_normal(SHAPE_NHWC).astype(np.float32).transpose(0, 3, 1, 2)
    g = rng.standard_normal(a.shape).astype(np.float32)
    x = ndl.Tensor(a)
    y = ops.relu(x)
    y.backward(ndl.Tensor(g, requires_grad=False))
    tx = torch.tensor(np.ascontiguousarray(a), requires_grad=True)
    ty = torch.relu(tx)
    ty.backward(torch.from_numpy(g))
    np.testing.assert_array_equal(y.numpy(), ty.detach().numpy())
    np.testing.assert_array_equal(x.grad.numpy(), tx.grad.numpy())


def test_relu_gradient_by_finite_differences():
    """float64, away from the kink: the eager gradient (the compiled loop where numba is
    present) matches central differences of sum(relu(x) * w)."""
    rng = np.random.default_rng(6)
    a = rng.standard_normal((4, 16, 16, 64))
    a[np.abs(a) < 1e-3] = 0.5
    w = rng.standard_normal(a.shape)
    x = ndl.Tensor(a)
    (ops.relu(x) * ndl.Tensor(w, requires_grad=False)).sum().backward()
    eps = 1e-6
    for index in [(0, 0, 0, 0), (1, 3, 5, 7), (3, 15, 15, 63), (2, 8, 1, 30)]:
        plus, minus = a.copy(), a.copy()
        plus[index] += eps
        minus[index] -= eps
        numeric = (np.sum(np.maximum(plus, 0) * w) - np.sum(np.maximum(minus, 0) * w)) / (2 * eps)
        assert x.grad.numpy()[index] == pytest.approx(numeric, rel=1e-5, abs=1e-8)
