"""ReLU's gradient is one ``relu_grad`` node that gives, bit for bit, ``g * (a > 0)``: the
value of the compare + multiply pair it replaced (0 where a is 0, -0 or NaN; -0.0 from a
negative g; NaN from an infinite or NaN g), eagerly, in a Session, under ndl.jit with region
fusion on and off, and for its second-order gradient."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.static as st

ops = ndl.ops

_SPECIAL = [0.0, -0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e-45, -1e-45, 3.5]


def _pairs(dtype) -> tuple[np.ndarray, np.ndarray]:
    """Every (a, g) pair of special values, as two flat arrays of ``dtype``."""
    with np.errstate(over="ignore"):
        vals = np.array(_SPECIAL, np.float64).astype(dtype)
    return np.repeat(vals, len(vals)), np.tile(vals, len(vals))


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint8)


def _reference(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return g * (a > 0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_eager_relu_backward_is_bitwise_g_times_mask(dtype):
    a, g = _pairs(dtype)
    x = ndl.Tensor(a)
    y = ops.relu(x)
    with np.errstate(invalid="ignore"):
        y.backward(ndl.Tensor(g, requires_grad=False))
    expected = _reference(a, g)
    assert x.grad.dtype == expected.dtype
    np.testing.assert_array_equal(_bits(x.grad.numpy()), _bits(expected))
    np.testing.assert_array_equal(_bits(y.numpy()), _bits(np.maximum(a, 0)))


def test_relu_gradient_is_one_node():
    x = ndl.Tensor(np.array([[-1.0, 2.0]], np.float32))
    ops.relu(x).sum().backward()
    assert x.grad.op.name == "relu_grad"
    np.testing.assert_array_equal(x.grad.numpy(), [[0.0, 1.0]])


def test_session_relu_grad_matches_eager_bitwise():
    a, g = _pairs(np.float32)
    with st.Graph():
        pa, pg = st.placeholder(a.shape), st.placeholder(g.shape)
        out = ops.relu_grad(pa, pg)
        with np.errstate(invalid="ignore"):
            got = st.Session().run(out, {pa: a, pg: g})
    np.testing.assert_array_equal(_bits(np.asarray(got)), _bits(_reference(a, g)))


@pytest.mark.parametrize("fusion_on", ["1", "0"])
def test_jit_relu_grad_fused_and_plain_match_eager_bitwise(monkeypatch, fusion_on):
    from needle.backend.numba_support import numba_module
    from needle.compiler import fusion

    if numba_module() is None:  # not installed, or NEEDLE_NUMBA=0: no region fusion
        pytest.skip("region fusion needs numba")
    monkeypatch.setattr(fusion, "FUSE_AFTER_CALLS", 0)
    monkeypatch.setenv("NEEDLE_FUSION", fusion_on)
    a, g = _pairs(np.float32)
    a, g = a.reshape(10, 10), g.reshape(10, 10)

    def fn(a, g):  # two members: relu_grad joins a region with the multiply after it
        return ops.relu_grad(a, g) * 2.0

    jitted = ndl.jit(fn)
    ta, tg = ndl.Tensor(a, requires_grad=False), ndl.Tensor(g, requires_grad=False)
    with np.errstate(invalid="ignore", over="ignore"):
        jitted(ta, tg)
        got = jitted(ta, tg).numpy()  # the replay (fused when on)
        expected = _reference(a, g) * np.float32(2.0)
    np.testing.assert_array_equal(_bits(got), _bits(expected))
    if fusion_on == "1":
        assert any("region_fusion (1 regions" in p for p in jitted.lower(ta, tg).passes)


def test_mixed_dtypes_compare_in_the_wider_type():
    """a float64 below float32's range stays positive: the result is the common dtype."""
    a = ndl.Tensor(np.array([1e-50, -1e-50, 0.0]), requires_grad=False)
    g = ndl.Tensor(np.array([2.0, 2.0, 2.0], np.float32), requires_grad=False)
    out = ops.relu_grad(a, g)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out.numpy(), [2.0, 0.0, 0.0])


def test_second_order_gradient_flows_to_g_only():
    """d relu_grad(a, g) / dg = the mask; a gets none (the mask is piecewise constant)."""
    a = ndl.Tensor(np.array([[-1.0, 0.5, 2.0]], np.float32))
    g = ndl.Tensor(np.array([[3.0, -4.0, 5.0]], np.float32))
    out = ops.relu_grad(a, g)
    out.backward(ndl.Tensor(np.array([[7.0, 8.0, 9.0]], np.float32), requires_grad=False))
    np.testing.assert_array_equal(g.grad.numpy(), [[0.0, 8.0, 9.0]])
    assert a.grad is None
