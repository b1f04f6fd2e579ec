"""Course and PyTorch compatibility: op gradients called directly, NDArray(...), Tensor dtypes,
1-D matmul operands in every mode, SGD's dampening against torch.optim.SGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needle as ndl
import needle.backend_ndarray as nd
import needle.static as st
from needle import nn, optim

from .helpers import check_gradient_fd


# -- Op.gradient_as_tuple, as course code calls it ---------------------------------------------
def test_gradient_as_tuple_sums_batched_matmul_back_to_each_input():
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((6, 6, 5, 4)).astype(np.float32)
    b_np = rng.standard_normal((4, 3)).astype(np.float32)
    a, b = ndl.Tensor(a_np), ndl.Tensor(b_np)
    out = ndl.matmul(a, b)
    g_np = rng.standard_normal(out.shape).astype(np.float32)
    grad_a, grad_b = out.op.gradient_as_tuple(ndl.Tensor(g_np), out)

    ta, tb = torch.tensor(a_np, requires_grad=True), torch.tensor(b_np, requires_grad=True)
    (ta @ tb).backward(torch.tensor(g_np))
    assert grad_a.shape == (6, 6, 5, 4) and grad_b.shape == (4, 3)
    np.testing.assert_allclose(grad_a.numpy(), ta.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_b.numpy(), tb.grad.numpy(), rtol=1e-5, atol=1e-4)
    # gradient() itself still returns the broadcast adjoint; the engine's result is unchanged
    assert out.op.gradient(ndl.Tensor(g_np), out)[1].shape == (6, 6, 4, 3)
    out.backward(ndl.Tensor(g_np))
    np.testing.assert_array_equal(b.grad.numpy(), grad_b.numpy())


def test_gradient_as_tuple_fits_broadcast_and_dtype_of_each_input():
    """(3, 1) float32 + (4,) float64: adjoints of shape (3, 1) and (4,), each its own dtype;
    None entries and one-input ops pass through."""
    a = ndl.Tensor(np.ones((3, 1), np.float32))
    b = ndl.Tensor(np.arange(4.0))
    out = a + b
    grads = out.op.gradient_as_tuple(ndl.Tensor(np.ones((3, 4))), out)
    assert [g.shape for g in grads] == [(3, 1), (4,)]
    assert [g.dtype for g in grads] == [np.float32, np.float64]
    np.testing.assert_array_equal(grads[0].numpy(), np.full((3, 1), 4.0))
    np.testing.assert_array_equal(grads[1].numpy(), np.full(4, 3.0))
    # one-input ops still give a 1-tuple; inputs needing no gradient keep None
    x = ndl.Tensor(np.ones((2, 3), np.float32))
    s = ndl.summation(x, axes=(1,))
    (g,) = s.op.gradient_as_tuple(ndl.Tensor(np.ones(2, np.float32)), s)
    assert g.shape == (2, 3)
    w = ndl.Tensor(np.ones((3, 2), np.float32))
    y = ndl.matmul(ndl.Tensor(np.ones((2, 3), np.float32), requires_grad=False), w)
    none, gw = y.op.gradient_as_tuple(ndl.Tensor(np.ones((2, 2), np.float32)), y)
    assert none is None and gw.shape == (3, 2)


# -- NDArray(...) -----------------------------------------------------------------------------
def test_ndarray_constructor_copies_like_the_course():
    src = np.arange(6.0).reshape(2, 3)
    a = nd.NDArray(src, device=ndl.cpu())
    assert isinstance(a, nd.NDArray) and a.shape == (2, 3) and a.device == ndl.cpu()
    np.testing.assert_array_equal(a, src)
    a[0, 0] = 100.0  # a copy: the source is untouched
    assert src[0, 0] == 0.0
    b = nd.NDArray(a)  # from an NDArray, also a copy
    b[0, 1] = -1.0
    assert a[0, 1] == 1.0 and b.dtype == src.dtype
    assert nd.NDArray([1.0, 2.0], dtype="float32").dtype == np.float32
    np.testing.assert_array_equal(nd.NDArray(3.5), 3.5)
    # what the engine hands out is still a view that writes through
    t = ndl.Tensor(np.zeros(3, np.float32))
    t.cached_data.flat[1] += 2.0
    np.testing.assert_array_equal(t.numpy(), [0.0, 2.0, 0.0])
    assert ndl.Tensor(nd.NDArray(src, device=ndl.cpu())).dtype == np.float64


# -- Tensor dtypes (PyTorch's rules) ------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Creating a tensor from a list of numpy")
@pytest.mark.parametrize("data", [
    np.float64(0.25), [np.float64(1.0), 2.0], [[1.0], [np.float64(2.0)]], (np.float64(1.0),),
    [np.ones(2), np.ones(2)], np.float32(1.5), [np.float32(1.0), 2.0], [np.int64(1), 2.5],
    [np.float16(1.0), np.float64(2.0)], [np.int32(3)], [np.int32(3), 4], 1.5, [1.0, 2.0], 3,
    [1, 2], True, [True, False],
], ids=lambda d: repr(d)[:40])
def test_tensor_dtype_follows_torch_tensor(data):
    want = torch.tensor(data).numpy().dtype
    t = ndl.Tensor(data)
    assert t.dtype == want
    # floats require a gradient by default; integer and bool tensors never do (course labels)
    assert t.requires_grad is (want.kind == "f")


def test_python_random_scalars_and_numpy_scalars():
    assert ndl.Tensor(np.random.randn()).dtype == np.float32  # a Python float
    assert ndl.Tensor(np.random.randn(3).sum()).dtype == np.float64  # a NumPy float64
    assert ndl.Tensor([ndl.Tensor(np.float64(1.0))]).dtype == np.float64
    assert not ndl.Tensor(np.int64(3), requires_grad=True).requires_grad


# -- matmul with 1-D operands in every mode --------------------------------------------------
VECTOR_SHAPES = [((4,), (4, 2)), ((3, 4), (4,)), ((4,), (4,)), ((2, 3, 4), (4,)),
                 ((4,), (2, 4, 3)), ((5,), (2, 1, 5, 3))]


def _torch_matmul(a_np, b_np, g_np):
    ta, tb = torch.tensor(a_np, requires_grad=True), torch.tensor(b_np, requires_grad=True)
    out = torch.matmul(ta, tb)
    out.backward(torch.tensor(g_np))
    return out.detach().numpy(), ta.grad.numpy(), tb.grad.numpy()


@pytest.mark.parametrize("shapes", VECTOR_SHAPES, ids=str)
def test_matmul_with_vectors_matches_torch_eager_jit_and_session(shapes):
    rng = np.random.default_rng(7)
    a_np, b_np = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    out_shape = np.matmul(a_np, b_np).shape
    g_np = rng.standard_normal(out_shape).astype(np.float32)
    want, want_a, want_b = _torch_matmul(a_np, b_np, g_np)

    def eager(a, b):
        out = a @ b
        out.backward(ndl.Tensor(g_np, requires_grad=False))
        return out, a.grad, b.grad

    for run in (eager, ndl.jit(eager)):
        out, ga, gb = run(ndl.Tensor(a_np), ndl.Tensor(b_np))
        assert out.shape == out_shape and ga.shape == shapes[0] and gb.shape == shapes[1]
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ga.numpy(), want_a, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gb.numpy(), want_b, rtol=1e-5, atol=1e-5)

    with st.Graph():
        # batch dims unknown where there are any: the gradient must not need them
        a_ph = st.placeholder((None,) * (len(shapes[0]) - 1) + shapes[0][-1:], name="a")
        b_ph = st.placeholder(shapes[1], name="b")
        out = a_ph @ b_ph
        grads = st.gradients(out, [a_ph, b_ph], grad_ys=[st.constant(g_np)])
        value, ga, gb = st.Session().run([out, *grads], feed_dict={a_ph: a_np, b_ph: b_np})
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ga, want_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gb, want_b, rtol=1e-5, atol=1e-5)


def test_vector_matmul_backward_regression_and_finite_differences():
    """``ones(4) @ ones((4, 2))`` used to fail in backward ("transpose: needs at least 2 dims")."""
    x = ndl.init.ones(4, requires_grad=True)
    (x @ ndl.init.ones(4, 2)).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.full(4, 2.0))
    rng = np.random.default_rng(3)
    check_gradient_fd(lambda a, b: (a @ b) * (a @ b), [rng.standard_normal(4),
                                                      rng.standard_normal((2, 4, 3))], rng)


def test_matmul_shape_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"matmul: inner dimensions differ: \(3,\) @ \(4,\)"):
        ndl.Tensor(np.ones(3)) @ ndl.Tensor(np.ones(4))
    with pytest.raises(ValueError, match=r"matmul: inputs must have at least 1 dim"):
        ndl.matmul(ndl.Tensor(np.float32(2.0)), ndl.Tensor(np.ones(2, np.float32)))


# -- SGD dampening vs torch.optim.SGD --------------------------------------------------------
def _sgd_runs(needle_kw, torch_kw, steps=6):
    rng = np.random.default_rng(11)
    shapes = [(4, 3), (3,), (2, 2, 2), (5,)]  # four params: the flat (all-at-once) path too
    inits = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(steps)]
    params = [nn.Parameter(a) for a in inits]
    opt = optim.SGD(params, **needle_kw)
    tparams = [torch.tensor(a, requires_grad=True) for a in inits]
    topt = torch.optim.SGD(tparams, **torch_kw)
    for step_grads in grads:
        for p, tp, g in zip(params, tparams, step_grads):
            p.grad = ndl.Tensor(g, requires_grad=False)
            tp.grad = torch.tensor(g)
        opt.step()
        topt.step()
    return [p.numpy() for p in params], [tp.detach().numpy() for tp in tparams]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_sgd_dampening_zero_matches_torch(nesterov, weight_decay):
    kw = dict(lr=0.1, momentum=0.9, weight_decay=weight_decay, nesterov=nesterov, dampening=0)
    ours, theirs = _sgd_runs(kw, kw)
    for a, b in zip(ours, theirs):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sgd_default_is_needles_damped_rule_and_dampening_generalizes_it():
    """dampening=None is dampening=momentum; other values follow u = m u + (1 - d) g, u0 = 0
    (torch's buffer starts at the first gradient, so from step 2 on the torch run with the
    same dampening is the needle run with its first gradient scaled by 1 / (1 - d))."""
    default, _ = _sgd_runs(dict(lr=0.1, momentum=0.9), dict(lr=0.1))
    explicit, _ = _sgd_runs(dict(lr=0.1, momentum=0.9, dampening=0.9), dict(lr=0.1))
    for a, b in zip(default, explicit):
        np.testing.assert_array_equal(a, b)
    # a transcription of the equations for dampening=0.3, with and without nesterov
    for nesterov in (False, True):
        rng = np.random.default_rng(2)
        p0 = rng.standard_normal(5).astype(np.float32)
        gs = [rng.standard_normal(5).astype(np.float32) for _ in range(4)]
        p = nn.Parameter(p0)
        opt = optim.SGD([p], lr=0.2, momentum=0.5, dampening=0.3, nesterov=nesterov)
        want, u = p0.astype(np.float64), np.zeros(5)
        for g in gs:
            p.grad = ndl.Tensor(g, requires_grad=False)
            opt.step()
            u = 0.5 * u + 0.7 * g
            want = want - 0.2 * ((0.5 * u + 0.7 * g) if nesterov else u)
        np.testing.assert_allclose(p.numpy(), want, rtol=1e-5, atol=1e-6)


def test_sgd_dampening_in_state_dict_and_validation():
    params = [nn.Parameter(np.ones(3, np.float32))]
    torch_like = optim.SGD(params, momentum=0.9, dampening=0.0)
    saved = torch_like.state_dict()
    assert saved["hyperparams"]["dampening"] == 0.0
    fresh = optim.SGD(params, momentum=0.9)
    assert fresh.dampening is None
    # the default leaves dampening out: the state dict of needle before it existed
    assert "dampening" not in fresh.state_dict()["hyperparams"]
    fresh.load_state_dict(saved)
    assert fresh.dampening == 0.0
    torch_like.load_state_dict(optim.SGD(params, momentum=0.9).state_dict())
    assert torch_like.dampening is None
    with pytest.raises(ValueError, match=r"SGD: dampening must be None or in \[0, 1\], got 2"):
        optim.SGD(params, momentum=0.9, dampening=2)
