"""ndl.register_op: an op defined outside the package works in every front-end."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.caffe as cf
import needle.static as st
from needle.core.registry import REGISTRY


@ndl.register_op("test_cube_plus", inputs=("a", "b"), methods=("test_cube_plus",))
class CubePlus(ndl.ops.Op):
    """a ** 3 + b (a user op with two inputs)."""

    def compute(self, a, b):
        return a * a * a + b

    def gradient(self, out_grad, node):
        a, _ = node.inputs
        return out_grad * 3.0 * a * a, out_grad

    def infer(self, a, b):
        return a


A = np.array([[0.5, -1.0, 2.0]], dtype=np.float32)
B = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)


def test_the_registered_op_has_its_functions_and_method():
    assert REGISTRY["test_cube_plus"].cls is CubePlus
    assert ndl.test_cube_plus is ndl.ops.test_cube_plus
    assert ndl.ops.CubePlus is CubePlus
    out = ndl.Tensor(A).test_cube_plus(ndl.Tensor(B))
    np.testing.assert_allclose(out.numpy(), A ** 3 + B, rtol=1e-6)


def test_eager_gradient_matches_the_derivative():
    a, b = ndl.Tensor(A), ndl.Tensor(B)
    ndl.test_cube_plus(a, b).sum().backward()
    np.testing.assert_allclose(a.grad.numpy(), 3 * A ** 2, rtol=1e-6)
    np.testing.assert_allclose(b.grad.numpy(), np.ones_like(B))


def test_session_and_jit_give_the_eager_values():
    with st.Graph():
        pa, pb = st.placeholder((None, 3)), st.placeholder((None, 3))
        out = st.Session().run(ndl.test_cube_plus(pa, pb), {pa: A, pb: B})
    np.testing.assert_allclose(out, A ** 3 + B, rtol=1e-6)
    jitted = ndl.jit(lambda a, b: ndl.test_cube_plus(a, b))
    np.testing.assert_allclose(jitted(ndl.Tensor(A), ndl.Tensor(B)).numpy(), A ** 3 + B,
                               rtol=1e-6)


def test_caffe_op_layer_backward_passes_the_gradient_check():
    report = cf.check_gradient(cf.OpLayer("test_cube_plus"),
                               bottoms=[A.astype(np.float64), B.astype(np.float64)])
    assert report.passed


def test_bad_registrations_say_what_was_wrong():
    with pytest.raises(TypeError, match="subclass of needle.ops.Op"):
        ndl.register_op("test_not_an_op")(object)
    with pytest.raises(ValueError, match="already has the methods"):
        @ndl.register_op("test_clash", methods=("sum",))
        class Clash(ndl.ops.Op):
            pass
