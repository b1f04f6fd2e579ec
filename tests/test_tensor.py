"""The Tensor front-end: construction, data access, operators, errors, devices."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.backend_ndarray as nd
from needle import ops
from needle.ops import ShapeError


def test_dtype_rules_of_construction():
    assert ndl.Tensor([1.0, 2.0]).dtype == "float32"
    assert ndl.Tensor(3.0).dtype == np.float32 and ndl.Tensor(3.0).shape == ()
    assert ndl.Tensor([1, 2]).dtype == np.int64
    assert ndl.Tensor(np.ones(2)).dtype == "float64"  # NumPy data keeps its dtype
    assert ndl.Tensor(np.ones(2), dtype="float32").dtype == "float32"
    assert ndl.Tensor(np.float64(2.0)).dtype == "float64"
    labels = ndl.Tensor(np.array([0, 3, 1], dtype=np.uint8))
    assert labels.dtype == np.uint8 and not labels.requires_grad


def test_construction_copies_while_from_numpy_shares():
    arr = np.zeros(3, dtype=np.float32)
    copied, shared = ndl.Tensor(arr), ndl.from_numpy(arr)
    arr[0] = 7
    assert copied.numpy()[0] == 0 and shared.numpy()[0] == 7


def test_tensor_from_tensor_and_ndarray():
    x = ndl.Tensor([[1.0, 2.0]])
    assert np.array_equal(ndl.Tensor(x).numpy(), x.numpy())
    assert np.array_equal(ndl.Tensor(x.cached_data).numpy(), x.numpy())
    assert np.array_equal(ndl.Tensor(nd.array(np.eye(2))).numpy(), np.eye(2))


def test_cached_data_is_an_ndarray_view_that_writes_through():
    x = ndl.Tensor(np.zeros((2, 3), dtype=np.float32))
    view = x.cached_data
    assert isinstance(view, nd.NDArray)
    view.flat[4] += 0.5
    assert x.numpy()[1, 1] == 0.5
    np.testing.assert_array_equal(np.array(view), x.numpy())
    assert (view == x.numpy()).all()
    assert view.device == ndl.cpu() and view.size == 6
    assert view.pad(((1, 0), (0, 1))).shape == (3, 4)
    assert isinstance(view.numpy(), np.ndarray) and not isinstance(view.numpy(), nd.NDArray)
    assert x.realize_cached_data().shape == (2, 3)


def test_data_getter_detaches_and_setter_keeps_the_object():
    x = ndl.Tensor([1.0, 2.0])
    y = x * 2.0
    d = y.data
    assert not d.requires_grad and d.op is None
    x.data = ndl.Tensor([5.0, 6.0])
    assert x.numpy().tolist() == [5.0, 6.0] and x.requires_grad
    assert y.detach().inputs == ()


def test_operators_build_needle_ops():
    a, b = ndl.Tensor([2.0]), ndl.Tensor([4.0])
    cases = {
        "add": a + b, "add_scalar": a + 1, "multiply": a * b, "mul_scalar": 3 * a,
        "power_scalar": a**2, "divide": a / b, "divide_scalar": a / 2, "matmul":
        ndl.Tensor([[1.0]]) @ ndl.Tensor([[2.0]]), "negate": -a, "power": a**b,
    }
    for name, t in cases.items():
        assert t.op.name == name
    assert (a - b).op.name == "add" and (a - b).inputs[1].op.name == "negate"
    assert (a - 1).op.name == "add_scalar" and (a - 1).numpy()[0] == 1.0
    assert (1 - a).numpy()[0] == -1.0
    assert (8 / a).numpy()[0] == 4.0
    assert (2 ** ndl.Tensor([3.0])).numpy()[0] == pytest.approx(8.0)
    assert type(a).__name__ == "Tensor" and type(ndl.ops.EWiseAdd()) is ndl.ops.EWiseAdd


def test_numpy_arrays_on_the_left_defer_to_tensor():
    a = ndl.Tensor([1.0, 2.0])
    out = np.array([1.0, 1.0], dtype=np.float32) + a
    assert isinstance(out, ndl.Tensor) and out.numpy().tolist() == [2.0, 3.0]


def test_comparisons_are_not_differentiable_and_equality_is_identity():
    a = ndl.Tensor([1.0, 2.0, 3.0])
    b = ndl.Tensor([2.0, 2.0, 2.0])
    assert (a < b).numpy().tolist() == [True, False, False]
    assert (a >= 2).numpy().tolist() == [False, True, True]
    assert (a <= b).numpy().tolist() == [True, True, False]
    assert (a > 1.5).numpy().tolist() == [False, True, True]
    assert not (a < b).requires_grad
    assert (a == a) is True and (a == ndl.Tensor([1.0, 2.0, 3.0])) is False
    assert (a, b) == (a, b)
    assert len({a, b, a}) == 2


def test_method_forms():
    x = ndl.Tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert x.sum().numpy() == 15 and x.sum(axes=0).shape == (3,)
    assert x.reshape((3, 2)).shape == (3, 2)
    assert x.broadcast_to((4, 2, 3)).shape == (4, 2, 3)
    assert x.transpose().shape == (3, 2)
    assert x.max(axes=1).numpy().tolist() == [2.0, 5.0]
    assert x.mean().numpy() == 2.5
    assert x.permute((1, 0)).shape == (3, 2)
    assert np.allclose(x.exp().log().numpy(), x.numpy(), atol=1e-6)


def test_getitem_basic_and_array_indexing_are_differentiable():
    x = ndl.Tensor(np.arange(12, dtype=np.float32).reshape(3, 4))
    assert x[1].numpy().tolist() == [4, 5, 6, 7]
    assert x[:, 1:3].shape == (3, 2)
    idx = ndl.Tensor(np.array([0, 0, 2]))
    picked = x[idx, 1]
    assert picked.numpy().tolist() == [1.0, 1.0, 9.0]
    picked.sum().backward()
    expected = np.zeros((3, 4))
    expected[0, 1] = 2
    expected[2, 1] = 1
    np.testing.assert_array_equal(x.grad.numpy(), expected)
    with pytest.raises(ShapeError, match="getitem"):
        _ = x[5]


def test_item_len_bool_and_iteration():
    x = ndl.Tensor([[1.5, 2.0]])
    assert len(x) == 1 and x[0, 1].item() == 2.0 and float(x[0, 0]) == 1.5
    assert bool(ndl.Tensor([1.0]))
    with pytest.raises(ValueError, match="ambiguous"):
        bool(ndl.Tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="item"):
        x.item()
    with pytest.raises(TypeError, match="0-d"):
        len(ndl.Tensor(1.0))
    assert [t.shape for t in x] == [(2,)]


def test_repr_is_readable():
    x = ndl.Tensor([[1.0, 2.0]])
    assert repr(x) == "Tensor([[1., 2.]], dtype=float32, requires_grad=True)"
    assert "Tensor([3], dtype=int64)" == repr(ndl.Tensor([3]))
    assert str(x) == "[[1. 2.]]"


def test_errors_name_the_op_and_shapes():
    a = ndl.Tensor(np.ones((3, 4)))
    with pytest.raises(ShapeError, match=r"matmul: inner dimensions differ: \(3, 4\) @ \(5, 2\)"):
        a @ ndl.Tensor(np.ones((5, 2)))
    with pytest.raises(ShapeError, match=r"add: shapes \(3, 4\) and \(3,\) do not broadcast"):
        a + ndl.Tensor(np.ones(3))
    with pytest.raises(ShapeError, match=r"reshape: cannot reshape \(3, 4\) \(12 elements\)"):
        a.reshape((5, 2))
    with pytest.raises(ShapeError, match="summation: axis 2 is out of range for a 2-d input"):
        a.sum(axes=2)
    with pytest.raises(ShapeError, match="broadcast_to: cannot broadcast"):
        a.broadcast_to((2, 3))
    with pytest.raises(ShapeError, match="conv: input .* has 3 channels"):
        ops.conv(ndl.Tensor(np.ones((1, 4, 4, 3))), ndl.Tensor(np.ones((3, 3, 2, 1))))
    with pytest.raises(TypeError, match="add: expected Tensor inputs, got list"):
        ops.add(a, [1, 2])
    with pytest.raises(RuntimeError, match="does not require a gradient"):
        ndl.Tensor([1.0], requires_grad=False).backward()
    with pytest.raises(ShapeError, match="out_grad shape"):
        (a * 2).backward(ndl.Tensor(np.ones(3)))


def test_logsumexp_and_softmax_are_stable_for_huge_inputs():
    x = ndl.Tensor(np.array([[1e4, 1e4 - 1.0, -1e4]], dtype=np.float32))
    out = ops.logsumexp(x, axes=(1,))
    out.backward()
    assert np.isfinite(out.numpy()).all() and np.isfinite(x.grad.numpy()).all()
    np.testing.assert_allclose(out.numpy(), [1e4 + np.log1p(np.exp(-1.0))], rtol=1e-6)
    assert np.isfinite(ops.logsoftmax(x).numpy()).all()
    assert np.isfinite(ops.sigmoid(ndl.Tensor([-1e4, 1e4])).numpy()).all()
    neg_inf = ops.logsumexp(ndl.Tensor(np.full((1, 3), -np.inf, dtype=np.float32)), axes=(1,))
    assert neg_inf.numpy()[0] == -np.inf


def test_devices():
    assert str(ndl.cpu()) == "cpu()" and str(ndl.cuda()) == "cuda()"
    assert ndl.cpu() == ndl.cpu() and ndl.cpu() != ndl.cuda()
    assert ndl.default_device() == ndl.cpu()
    assert ndl.cpu().enabled()
    x = ndl.Tensor([1.0])
    assert x.device == ndl.cpu() and x.to(ndl.cpu()) is x


def test_cuda_enabled_is_false_without_a_gpu_and_never_raises():
    enabled = ndl.cuda().enabled()
    assert isinstance(enabled, bool)
    if not enabled:
        with pytest.raises(RuntimeError, match="CuPy"):
            ndl.Tensor([1.0], device=ndl.cuda())


def test_tensor_tuple():
    x = ndl.Tensor(np.arange(6, dtype=np.float32).reshape(3, 2))
    parts = ops.split(x, 0)
    assert len(parts) == 3 and parts[-1].numpy().tolist() == [4.0, 5.0]
    assert [p.shape for p in parts.tuple()] == [(2,)] * 3
    with pytest.raises(IndexError):
        parts[3]
    assert len(parts.numpy()) == 3


def test_tensor_counter_counts_live_tensors():
    before = ndl.autograd.TENSOR_COUNTER
    x = ndl.Tensor([1.0])
    y = x + 1.0
    assert ndl.autograd.TENSOR_COUNTER == before + 2
    del x, y
    assert ndl.autograd.TENSOR_COUNTER == before


def test_numpy_functions_see_the_values_through_array_protocol():
    t = ndl.Tensor([[1.0, 2.0]])
    np.testing.assert_array_equal(np.array(t), [[1.0, 2.0]])
    assert np.asarray(t, dtype=np.float64).dtype == np.float64
    np.testing.assert_allclose(t, [[1.0, 2.0]])
