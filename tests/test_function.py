"""Custom Functions (hand-written backward) agree with autodiff in eager mode, in Session
graphs, and as Caffe layers through as_module; caffe layers run as nn.Modules."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.caffe as cf
import needle.static as st
from needle.function import Function

from .helpers import swish_function

Swish = swish_function()


def swish_ops(x):
    return x * ndl.sigmoid(x)


class ScaledProduct(Function):
    """Two outputs from two tensors and a constant: (a * b * k, a - b)."""

    @staticmethod
    def forward(ctx, a, k, b):
        ctx.save_for_backward(a, b)
        ctx.k = k
        return a * b * k, a - b

    @staticmethod
    def backward(ctx, g_prod, g_diff):
        a, b = ctx.saved_tensors
        return g_prod * b * ctx.k + g_diff, None, g_prod * a * ctx.k - g_diff


def _data(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _grads_of(fn, arrays, weights):
    tensors = [ndl.Tensor(a) for a in arrays]
    out = fn(*tensors)
    outs = out if isinstance(out, tuple) else (out,)
    total = None
    for o, w in zip(outs, weights):
        term = ndl.summation(o * ndl.Tensor(w, requires_grad=False))
        total = term if total is None else total + term
    total.backward()
    return [o.numpy() for o in outs], [t.grad.numpy() for t in tensors]


# -- eager --------------------------------------------------------------------------------------
def test_function_agrees_with_autodiff_in_eager_mode():
    x, w = _data(4, 5), _data(4, 5, seed=1)
    (y_fn,), (g_fn,) = _grads_of(Swish.apply, [x], [w])
    (y_ops,), (g_ops,) = _grads_of(swish_ops, [x], [w])
    np.testing.assert_allclose(y_fn, y_ops, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g_fn, g_ops, rtol=1e-5, atol=1e-6)


def test_multiple_outputs_constants_and_none_gradients():
    a, b = _data(3, 4), _data(3, 4, seed=1)
    w1, w2 = _data(3, 4, seed=2), _data(3, 4, seed=3)
    outs, grads = _grads_of(lambda x, y: ScaledProduct.apply(x, 2.5, y), [a, b], [w1, w2])
    ref_outs, ref_grads = _grads_of(lambda x, y: (x * y * 2.5, x - y), [a, b], [w1, w2])
    for got, want in zip(outs + grads, ref_outs + ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_function_inside_a_bigger_graph_and_only_used_outputs():
    a, b = _data(3, 4), _data(3, 4, seed=1)
    ta, tb = ndl.Tensor(a), ndl.Tensor(b)
    prod, _ = ScaledProduct.apply(ta, 1.0, tb)  # the second output gets a zero adjoint
    ndl.summation(ndl.exp(prod)).backward()
    np.testing.assert_allclose(ta.grad.numpy(), np.exp(a * b) * b, rtol=1e-5)
    np.testing.assert_allclose(tb.grad.numpy(), np.exp(a * b) * a, rtol=1e-5)


def test_function_errors_name_the_function():
    class WrongShape(Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return np.ones((7,), np.float32)

    x = ndl.Tensor(_data(2, 3))
    with pytest.raises(ValueError, match="WrongShape.backward: gradient 0 has shape"):
        ndl.summation(WrongShape.apply(x)).backward()
    y = Swish.apply(ndl.Tensor(_data(2, 3)))
    t = ndl.Tensor(_data(2, 3))
    z = Swish.apply(t)
    ndl.summation(z * z).backward()
    with pytest.raises(NotImplementedError, match="Swish: the backward of a custom Function"):
        ndl.summation(t.grad).backward()
    with pytest.raises(TypeError, match="needs at least one Tensor"):
        Swish.apply(np.ones(3))
    assert y.shape == (2, 3)


# -- Session graphs -------------------------------------------------------------------------------
def test_function_in_a_session_graph_agrees_with_autodiff():
    X = _data(6, 5)
    with st.Graph():
        x = st.placeholder((None, 5))
        w = st.Variable(_data(1, 5, seed=1))
        y_fn = Swish.apply(x * w)
        y_ops = swish_ops(x * w)
        assert y_fn.shape == (None, 5)  # inferred by running forward on zeros
        loss_fn, loss_ops = ndl.summation(y_fn * y_fn), ndl.summation(y_ops * y_ops)
        g_fn = st.gradients(loss_fn, [w])[0]
        g_ops = st.gradients(loss_ops, [w])[0]
        sess = st.Session()
        for scale in (1.0, -2.0):  # a second run must not reuse the first run's ctx
            got = sess.run([loss_fn, g_fn], feed_dict={x: X * scale})
            want = sess.run([loss_ops, g_ops], feed_dict={x: X * scale})
            np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
            np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)


def test_function_shape_rule_and_tuple_outputs_in_a_graph():
    class Halves(Function):
        @staticmethod
        def forward(ctx, x):
            n = x.shape[1] // 2
            return x[:, :n] * 1, x[:, n:] * 3

        @staticmethod
        def backward(ctx, g1, g2):
            return np.concatenate([g1, g2 * 3], axis=1)

        @staticmethod
        def shape(x_shape):
            half = x_shape[1] // 2
            return [(x_shape[0], half), (x_shape[0], x_shape[1] - half)]

    X = _data(3, 4)
    with st.Graph():
        x = st.Variable(X)
        left, right = Halves.apply(x)
        assert left.shape == (3, 2) and right.shape == (3, 2)
        loss = ndl.summation(left * right)
        (g,) = st.gradients(loss, [x])
        value = st.Session().run(g)
    # d/dleft = right = 3 x[:, 2:], d/dright = left = x[:, :2], and right = 3 x[:, 2:]
    np.testing.assert_allclose(value, np.concatenate([3 * X[:, 2:], 3 * X[:, :2]], axis=1),
                               rtol=1e-5)


# -- caffe layers as nn.Modules ------------------------------------------------------------------
class SwishLayer(cf.Layer):
    """Swish as a classic Caffe layer: NumPy forward, hand-written backward."""

    def reshape(self, bottom_shapes):
        return [bottom_shapes[0]]

    def forward(self, bottom):
        x = bottom[0]
        self.x, self.s = x, 1 / (1 + np.exp(-x))
        return [x * self.s]

    def backward(self, top_diff, propagate_down):
        x, s = self.x, self.s
        return [top_diff[0] * (s + x * s * (1 - s))]


@pytest.mark.parametrize("layer_cls", [SwishLayer, lambda: cf.FunctionLayer(Swish)],
                         ids=["hand-written layer", "FunctionLayer"])
def test_custom_backward_as_a_caffe_layer_through_as_module(layer_cls):
    layer = layer_cls()
    assert cf.check_gradient(layer, [(3, 4)]).passed
    module = cf.as_module(layer)
    x, w = _data(4, 5), _data(4, 5, seed=1)
    (y_mod,), (g_mod,) = _grads_of(module, [x], [w])
    (y_ops,), (g_ops,) = _grads_of(swish_ops, [x], [w])
    np.testing.assert_allclose(y_mod, y_ops, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g_mod, g_ops, rtol=1e-5, atol=1e-6)


def test_as_module_exposes_parameters_sharing_memory_and_trains():
    np.random.seed(0)
    layer = cf.InnerProduct(3)
    module = cf.as_module(layer, [(8, 4)])
    names = [n for n, _ in module.named_parameters()]
    assert names == ["weight", "bias"]
    assert module.weight._data is layer.params[0].data
    X, y = _data(8, 4), np.arange(8) % 3
    x = ndl.Tensor(X)
    loss = ndl.nn.SoftmaxLoss()(module(x), ndl.Tensor(y))
    loss.backward()
    W, b = ndl.Tensor(module.weight.numpy()), ndl.Tensor(module.bias.numpy())
    ndl.nn.SoftmaxLoss()(ndl.Tensor(X) @ W + b, ndl.Tensor(y)).backward()
    np.testing.assert_allclose(module.weight.grad.numpy(), W.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(module.bias.grad.numpy(), b.grad.numpy(), rtol=1e-5, atol=1e-6)
    opt = ndl.optim.SGD(module.parameters(), lr=0.5)
    before = layer.params[0].data.copy()
    opt.step()
    assert not np.allclose(layer.params[0].data, before)  # the blob moved with the Parameter
    # load_state_dict replaces the Parameter's array: the layer follows on the next call
    module.load_state_dict({"weight": np.zeros((4, 3)), "bias": np.ones(3)})
    np.testing.assert_allclose(module(x).numpy(), np.ones((8, 3)))


def test_as_module_batchnorm_keeps_buffers_and_phase():
    module = cf.as_module(cf.BatchNorm(moving_average_fraction=0.0), [(6, 3)])
    assert module.parameters() == []
    assert [n for n, _ in module.named_buffers()] == ["mean", "variance", "scale_factor"]
    X = _data(6, 3) * 2 + 1
    module(ndl.Tensor(X))
    module.eval()
    out = module(ndl.Tensor(X)).numpy()
    expected = (X - X.mean(0)) / np.sqrt(X.var(0) * 6 / 5 + 1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_as_module_in_a_session_graph():
    np.random.seed(1)
    module = cf.as_module(cf.InnerProduct(2), [(5, 3)])
    X = _data(5, 3)
    with st.Graph():
        x = st.placeholder((None, 3))
        out = module(x)
        assert out.shape == (None, 2)
        (g,) = st.gradients(ndl.summation(out * out), [module.weight])
        value = st.Session().run(g, feed_dict={x: X})
    W, b = module.weight.numpy(), module.bias.numpy()
    np.testing.assert_allclose(value, X.T @ (2 * (X @ W + b)), rtol=1e-4, atol=1e-5)


def test_a_layer_called_twice_before_backward_gets_both_gradients_right():
    module = cf.as_module(SwishLayer())
    a, b = ndl.Tensor(_data(3, 4)), ndl.Tensor(_data(3, 4, seed=1))
    ya, yb = module(a), module(b)  # the layer's saved state is now b's
    ndl.summation(ya * 2 + yb * 3).backward()
    for t, k in ((a, 2), (b, 3)):
        x = ndl.Tensor(t.numpy())
        ndl.summation(swish_ops(x) * k).backward()
        np.testing.assert_allclose(t.grad.numpy(), x.grad.numpy(), rtol=1e-5, atol=1e-6)
