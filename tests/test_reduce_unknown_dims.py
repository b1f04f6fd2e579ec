"""Gradients of reductions over non-leading axes of inputs with unknown (None) dims.

A reduction's gradient puts the reduced axes back as size 1 before broadcasting. It once did
that with a reshape to the kept shape, whose None dims copy the input's dim at the SAME
position: wrong once a middle axis is gone ((None, 5, None) summed over axis 1 failed in a
Session; (None, 5, None, 7) read 7 for the second unknown dim). It now uses expand_dims.
Every case is checked against torch in a Session, eagerly and under the JIT.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needle as ndl
import needle.static as st
from needle import ops

_NEEDLE = {"sum": ops.summation, "mean": ops.mean, "max": ops.max,
           "logsumexp": ops.logsumexp, "variance": ops.variance}
_TORCH = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax,
          "logsumexp": torch.logsumexp,
          "variance": lambda t, dim, keepdim: torch.var(t, dim, correction=0, keepdim=keepdim)}

# (reduction, placeholder shape, fed shape, axes, keepdims)
CASES = [
    ("sum", (None, 5, None), (2, 5, 3), (1,), False),
    ("sum", (None, 5, None), (2, 5, 3), (1,), True),
    ("sum", (None, 5, None, 7), (2, 5, 3, 7), (1,), False),  # not 7 for the unknown dim
    ("sum", (None, 5, None, 7), (2, 5, 3, 7), (1, 3), False),
    ("sum", (None, 5, None, 7), (2, 5, 3, 7), (1, 3), True),
    ("mean", (None, 5, None, 7), (2, 5, 3, 7), (1,), False),
    ("mean", (None, None, 4), (2, 3, 4), (1,), False),  # the reduced dim itself unknown
    ("max", (None, 5, None), (2, 5, 3), (1,), False),
    ("max", (None, 5, None, 7), (2, 5, 3, 7), (1, 3), False),
    ("max", (None, 5, None, 7), (2, 5, 3, 7), (1, 3), True),
    ("logsumexp", (None, 5, None), (2, 5, 3), (1,), False),
    ("logsumexp", (None, 5, None, 7), (2, 5, 3, 7), (1, 3), False),
    ("logsumexp", (None, 5, None, 7), (2, 5, 3, 7), (1,), True),
    ("variance", (None, 5, None, 7), (2, 5, 3, 7), (1,), False),
]
IDS = [f"{r}-{len(p)}d-axes{''.join(map(str, a))}-{'keep' if k else 'drop'}"
       for r, p, _, a, k in CASES]


def _data(fed: tuple, axes: tuple, keepdims: bool) -> tuple[np.ndarray, np.ndarray]:
    """An input, and an output adjoint (the weights of the loss sum(y * w))."""
    rng = np.random.default_rng(len(fed) * 10 + len(axes))
    x = rng.standard_normal(fed).astype(np.float32)
    out = tuple(1 if i in axes else d for i, d in enumerate(fed) if keepdims or i not in axes)
    return x, rng.standard_normal(out).astype(np.float32)


def _unknown_out(declared: tuple, axes: tuple, keepdims: bool) -> tuple:
    return tuple(1 if i in axes else d for i, d in enumerate(declared)
                 if keepdims or i not in axes)


def _torch_grad(reduction: str, x: np.ndarray, w: np.ndarray, axes, keepdims) -> np.ndarray:
    xt = torch.tensor(x, requires_grad=True)
    (_TORCH[reduction](xt, axes, keepdim=keepdims) * torch.tensor(w)).sum().backward()
    return xt.grad.numpy()


@pytest.mark.parametrize(("reduction", "declared", "fed", "axes", "keepdims"), CASES, ids=IDS)
def test_session_gradient_with_unknown_dims_matches_torch(reduction, declared, fed, axes,
                                                          keepdims):
    xv, wv = _data(fed, axes, keepdims)
    with st.Graph():
        x = st.placeholder(declared, name="x")
        w = st.placeholder(_unknown_out(declared, axes, keepdims), name="w")
        loss = ops.summation(_NEEDLE[reduction](x, axes, keepdims=keepdims) * w)
        (grad,) = st.gradients(loss, [x])
        with st.Session() as sess:
            got = sess.run(grad, feed_dict={x: xv, w: wv})
    np.testing.assert_allclose(got, _torch_grad(reduction, xv, wv, axes, keepdims),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("reduction", "declared", "fed", "axes", "keepdims"), CASES, ids=IDS)
def test_eager_and_jit_gradients_match_torch(reduction, declared, fed, axes, keepdims):
    xv, wv = _data(fed, axes, keepdims)
    expected = _torch_grad(reduction, xv, wv, axes, keepdims)

    def loss_of(x, w):
        return ops.summation(_NEEDLE[reduction](x, axes, keepdims=keepdims) * w)

    for run in (loss_of, ndl.jit(loss_of)):
        x = ndl.Tensor(xv, requires_grad=True)
        run(x, ndl.Tensor(wv, requires_grad=False)).backward()
        np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("reduction", "axes"), [("logsumexp", (1,)), ("logsumexp", (1, 3)),
                                                 ("variance", (1,))])
def test_session_second_order_with_unknown_dims_matches_torch(reduction, axes):
    # the gradient of the gradient differentiates expand_dims itself (its None-dim form)
    xv, wv = _data((2, 5, 3, 7), axes, False)
    with st.Graph():
        x = st.placeholder((None, 5, None, 7), name="x")
        w = st.placeholder(_unknown_out((None, 5, None, 7), axes, False), name="w")
        (grad,) = st.gradients(ops.summation(_NEEDLE[reduction](x, axes) * w), [x])
        (grad2,) = st.gradients(ops.summation(grad * grad), [x])
        with st.Session() as sess:
            got = sess.run(grad2, feed_dict={x: xv, w: wv})
    xt = torch.tensor(xv, requires_grad=True)
    loss = (_TORCH[reduction](xt, axes, keepdim=False) * torch.tensor(wv)).sum()
    (g,) = torch.autograd.grad(loss, xt, create_graph=True)
    (g2,) = torch.autograd.grad((g * g).sum(), xt)
    np.testing.assert_allclose(got, g2.numpy(), rtol=1e-4, atol=1e-5)


def test_expand_dims_keeps_unknown_dims_in_place_in_a_session():
    xv = np.arange(30, dtype=np.float32).reshape(2, 5, 3)
    with st.Graph():
        x = st.placeholder((None, 5, None), name="x")
        y = ops.expand_dims(x, (0, 2, -1))
        assert y.shape == (1, None, 1, 5, None, 1)
        (grad,) = st.gradients(ops.summation(y * y), [x])
        with st.Session() as sess:
            got, got_grad = sess.run([y, grad], feed_dict={x: xv})
    np.testing.assert_array_equal(got, np.expand_dims(xv, (0, 2, -1)))
    np.testing.assert_array_equal(got_grad, 2 * xv)


def test_expand_dims_refuses_an_axis_out_of_range_naming_it():
    with pytest.raises(ndl.ops.ShapeError, match="expand_dims: axis 3 is out of range for "
                                                 "the 3-d output"):
        ops.expand_dims(ndl.Tensor(np.zeros((2, 3), np.float32)), (3,))


def test_expand_dims_exports_to_onnx_unsqueeze_with_a_dynamic_batch():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import needle.onnx as nx

    def fn(x):
        return ops.expand_dims(x, (1, -1)) * 2.0

    example = np.ones((2, 3), np.float32)
    model = nx.export(fn, [example])
    assert "Unsqueeze" in [n.op_type for n in model.graph.node]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    xv = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    (got,) = session.run(None, {session.get_inputs()[0].name: xv})
    np.testing.assert_array_equal(got, np.expand_dims(xv, (1, -1)) * 2.0)
    imported = nx.import_model(model)  # Unsqueeze of a run-time value: expand_dims again
    np.testing.assert_array_equal(imported(ndl.Tensor(xv)).numpy(), got)


def test_expand_dims_round_trips_a_saved_program_with_a_dynamic_batch(tmp_path):
    def fn(x):
        return ops.summation(ops.expand_dims(x, (1,)) * x.reshape((-1, 1, 3)), axes=(2,))

    ndl.export(fn, ndl.Tensor(np.ones((2, 3), np.float32))).save(tmp_path / "p.npz")
    loaded = ndl.load_program(tmp_path / "p.npz")
    xv = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(xv).numpy(), (xv * xv).sum(1, keepdims=True), rtol=1e-6)


def test_expand_dims_as_a_caffe_op_layer_passes_check_gradient():
    import needle.caffe as cf

    layer = cf.OpLayer("expand_dims", axes=(0, 2))
    cf.check_gradient(layer, bottom_shapes=[(3, 4)])  # (raises on a failure)
