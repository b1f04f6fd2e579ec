"""Gather ops (take, take_along_axis and their scatter-add adjoints) against torch, and the
layers built on them, nn.Embedding and SoftmaxLoss, against torch in eager mode, a Session
(ids and labels fed through placeholders) and ndl.jit. The op table (tests/op_table.py) runs
the ops through the generic checks too (finite differences, second order)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needle as ndl
import needle.static as st
from needle import nn, ops
from needle.core.ops_index import IdsOutOfRangeError


def _const(array) -> ndl.Tensor:
    return ndl.Tensor(array, requires_grad=False)


def _close(got, want, atol=1e-5):
    got = got.numpy() if isinstance(got, ndl.Tensor) else np.asarray(got)
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


# -- the ops -----------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_take_with_repeated_ids_matches_torch_index_select(axis):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 5, 3)).astype(np.float32)
    ids = np.array([[2, 0], [2, 2], [1, 0]])  # repeats: their adjoints add up
    x = ndl.Tensor(a, requires_grad=True)
    out = ops.take(x, _const(ids), axis=axis)
    t = torch.tensor(a, requires_grad=True)
    dim = axis % 3
    t_out = torch.index_select(t, dim, torch.tensor(ids).reshape(-1)).reshape(
        *a.shape[:dim], *ids.shape, *a.shape[dim + 1:])
    _close(out, t_out)
    g = rng.standard_normal(out.shape).astype(np.float32)
    out.backward(_const(g))
    t_out.backward(torch.tensor(g))
    _close(x.grad, t.grad)


def test_take_along_axis_with_repeated_ids_matches_torch_gather():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 6)).astype(np.float32)
    ids = np.array([[5, 5, 0], [1, 1, 1], [0, 2, 5]])
    x = ndl.Tensor(a, requires_grad=True)
    out = ops.take_along_axis(x, _const(ids), axis=1)
    t = torch.tensor(a, requires_grad=True)
    t_out = torch.gather(t, 1, torch.tensor(ids))
    _close(out, t_out)
    g = rng.standard_normal(out.shape).astype(np.float32)
    out.backward(_const(g))
    t_out.backward(torch.tensor(g))
    _close(x.grad, t.grad)


def test_scatter_adds_have_the_gathers_as_gradient_to_second_order():
    """d/dv of index_add(v, ids) is take (and of scatter_add, take_along_axis): the gradient
    of a gather's gradient is a gather again, as torch's double backward gives."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((5, 3)).astype(np.float32)
    ids = np.array([4, 1, 4])
    x = ndl.Tensor(a, requires_grad=True)
    (ops.take(x, _const(ids)) ** 2).sum().backward()  # records the gradient's graph
    grad = x.grad
    t = torch.tensor(a, requires_grad=True)
    (t_grad,) = torch.autograd.grad((t[torch.tensor(ids)] ** 2).sum(), [t], create_graph=True)
    _close(grad, t_grad)
    w = rng.standard_normal(a.shape).astype(np.float32)
    x.grad = None
    (grad * _const(w)).sum().backward()
    (t2,) = torch.autograd.grad((t_grad * torch.tensor(w)).sum(), [t])
    _close(x.grad, t2)


@pytest.mark.parametrize("fn", [
    lambda x, ids: ops.take(x, ids),
    lambda x, ids: ops.take_along_axis(x, ops.reshape(ids, (-1, 1)), axis=1),
], ids=["take", "take_along_axis"])
@pytest.mark.parametrize("bad", [[0, 4], [-1, 2]], ids=["too_large", "negative"])
def test_out_of_range_ids_raise_one_error_in_every_mode(fn, bad):
    """No wrap-around of negative ids and no silent clip: the same IndexError (a CheckError)
    with the same message, eagerly, on a Session run and on a JIT call."""
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    ids = np.array(bad)
    with pytest.raises(IdsOutOfRangeError) as eager:
        fn(_const(a), _const(ids))
    assert isinstance(eager.value, IndexError)
    assert "[0, " in str(eager.value) and str(bad[1] if bad[0] == 0 else bad[0]) in str(
        eager.value)
    with st.Graph():
        p = st.placeholder((None,), dtype="int64")
        out = fn(_const(a), p)
        with pytest.raises(IdsOutOfRangeError) as graph:
            st.Session().run(out, {p: ids})
    compiled = ndl.jit(fn)
    compiled(_const(a), _const(np.array([0, 1])))  # trace with good ids, then replay bad ones
    with pytest.raises(IdsOutOfRangeError) as jitted:
        compiled(_const(a), _const(ids))
    assert str(eager.value) == str(graph.value) == str(jitted.value)


def test_non_integral_float_ids_are_refused():
    with pytest.raises(IdsOutOfRangeError, match="whole numbers"):
        ops.take(_const(np.ones((3, 2), np.float32)), _const(np.array([0.5])))


def test_shapes_with_unknown_dims_in_a_declared_graph():
    with st.Graph():
        ids = st.placeholder((None, None), dtype="int64")
        table = st.placeholder((7, 3))
        looked = ops.take(table, ids)
        assert tuple(looked.shape) == (None, None, 3)
        logits = st.placeholder((None, 5))
        labels = st.placeholder((None, 1), dtype="int64")
        picked = ops.take_along_axis(logits, labels, axis=1)
        assert tuple(picked.shape) == (None, 1)
        (g_logits,) = st.gradients(picked, [logits])
        assert tuple(g_logits.shape) == (None, 5)
        rng = np.random.default_rng(3)
        z = rng.standard_normal((4, 5)).astype(np.float32)
        y = np.array([[4], [0], [4], [2]])
        got_picked, got_grad = st.Session().run([picked, g_logits], {logits: z, labels: y})
    np.testing.assert_array_equal(got_picked, np.take_along_axis(z, y, 1))
    want = np.zeros_like(z)
    np.put_along_axis(want, y, 1.0, 1)
    np.testing.assert_array_equal(got_grad, want)


def test_take_rejects_mismatched_shapes_by_name():
    with pytest.raises(ops.ShapeError, match="take_along_axis"):
        ops.take_along_axis(_const(np.ones((2, 3), np.float32)), _const(np.zeros((3, 1), int)))
    with pytest.raises(ops.ShapeError, match="take: ids must be integers"):
        ops.take(_const(np.ones((2, 3), np.float32)), _const(np.array([True])))


# -- nn.Embedding in every mode ----------------------------------------------------------------
def _embedding_and_torch(rng):
    emb = nn.Embedding(11, 4)
    t_weight = torch.tensor(emb.weight.numpy(), requires_grad=True)
    ids = rng.integers(0, 11, (6, 3))
    ids[0] = 9  # repeated ids
    g = rng.standard_normal((6, 3, 4)).astype(np.float32)
    t_out = torch.nn.functional.embedding(torch.tensor(ids), t_weight)
    (t_out * torch.tensor(g)).sum().backward()
    return emb, ids, g, t_out, t_weight.grad


def test_embedding_matches_torch_in_eager_session_and_jit():
    rng = np.random.default_rng(4)
    emb, ids, g, t_out, t_grad = _embedding_and_torch(rng)
    # eager
    out = emb(_const(ids))
    (out * _const(g)).sum().backward()
    _close(out, t_out)
    _close(emb.weight.grad, t_grad)
    # Session: ids are a placeholder with an unknown batch size
    with st.Graph():
        x = st.placeholder((6, None), dtype="int64")
        y = emb(x)
        (grad,) = st.gradients(y * _const(g), [emb.weight])
        got, got_grad = st.Session().run([y, grad], {x: ids})
    _close(got, t_out)
    _close(got_grad, t_grad)

    # JIT: ids are an argument, so new ids give new rows (not a constant from the trace)
    def step(x, seed):
        emb.weight.grad = None
        y = emb(x)
        (y * seed).sum().backward()
        return y, emb.weight.grad

    compiled = ndl.jit(step)
    compiled(_const(np.zeros_like(ids)), _const(g))  # the trace, with other ids
    got, got_grad = compiled(_const(ids), _const(g))
    _close(got, t_out)
    _close(got_grad, t_grad)


def test_embedding_graph_is_a_gather_not_a_one_hot_product():
    with st.Graph():
        x = st.placeholder((None, 3), dtype="int64")
        y = nn.Embedding(1000, 8)(x)
    assert y.op.name == "take"


# -- SoftmaxLoss in every mode ------------------------------------------------------------------
def _loss_case(rng, smoothing, reduction):
    z = rng.standard_normal((5, 7)).astype(np.float32) * 3
    y = np.array([6, 0, 3, 6, 2])
    tz = torch.tensor(z, requires_grad=True)
    t_loss = torch.nn.functional.cross_entropy(tz, torch.tensor(y), reduction=reduction,
                                               label_smoothing=smoothing)
    g = rng.standard_normal(t_loss.shape).astype(np.float32)
    (t_loss * torch.tensor(g)).sum().backward()
    return z, y, g, t_loss, tz.grad


@pytest.mark.parametrize("smoothing, reduction", [(0.0, "mean"), (0.0, "none"), (0.2, "sum"),
                                                  (0.1, "none")])
def test_softmax_loss_matches_torch_in_eager_session_and_jit(smoothing, reduction):
    rng = np.random.default_rng(5)
    z, y, g, t_loss, t_grad = _loss_case(rng, smoothing, reduction)
    loss_fn = nn.SoftmaxLoss(label_smoothing=smoothing, reduction=reduction)
    # eager
    logits = ndl.Tensor(z, requires_grad=True)
    loss = loss_fn(logits, _const(y))
    (loss * _const(g)).sum().backward()
    _close(loss, t_loss)
    _close(logits.grad, t_grad)
    # Session: logits and labels fed, batch size unknown
    with st.Graph():
        pz = st.placeholder((None, 7))
        py = st.placeholder((None,), dtype="int64")
        out = loss_fn(pz, py)
        (grad,) = st.gradients((out * _const(g)).sum(), [pz])
        got, got_grad = st.Session().run([out, grad], {pz: z, py: y})
    _close(got, t_loss)
    _close(got_grad, t_grad)

    # JIT (its output differentiates back into the arguments)
    compiled = ndl.jit(lambda logits, labels: loss_fn(logits, labels))
    for _ in range(2):  # the trace, then a replay
        logits = ndl.Tensor(z, requires_grad=True)
        got = compiled(logits, _const(y))
        (got * _const(g)).sum().backward()
        _close(got, t_loss)
        _close(logits.grad, t_grad)


def test_softmax_loss_keeps_the_label_check_in_front():
    """Bad labels meet check_class_ids (its message names the loss), not the gather."""
    loss_fn = nn.SoftmaxLoss()
    with pytest.raises(ops.CheckError, match="SoftmaxLoss: class ids must lie in"):
        loss_fn(_const(np.zeros((2, 3), np.float32)), _const(np.array([0, 3])))
    with st.Graph():
        pz = st.placeholder((None, 3))
        py = st.placeholder((None,), dtype="int64")
        out = loss_fn(pz, py)
        with pytest.raises(ops.CheckError, match="SoftmaxLoss: class ids must lie in"):
            st.Session().run(out, {pz: np.zeros((2, 3), np.float32), py: np.array([-1, 0])})


def test_softmax_loss_builds_no_batch_by_classes_one_hot():
    """The label term is one pick per row (inside the one softmax_cross_entropy node): no
    compare against the class ids (a (B, C) one-hot matrix) anywhere in the loss's graph."""
    with st.Graph():
        pz = st.placeholder((None, 50))
        py = st.placeholder((None,), dtype="int64")
        loss = nn.SoftmaxLoss()(pz, py)
        names, stack, seen = set(), [loss], set()
        while stack:
            node = stack.pop()
            if id(node) in seen or node.op is None:
                continue
            seen.add(id(node))
            names.add(node.op.name)
            stack.extend(node.inputs)
    assert "softmax_cross_entropy" in names
    assert "compare" not in names


# -- interchange ---------------------------------------------------------------------------------
def test_take_along_axis_exports_to_onnx_gather_elements_and_back(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from needle import onnx as ndl_onnx

    rng = np.random.default_rng(6)
    z = rng.standard_normal((4, 6)).astype(np.float32)
    y = np.array([[5], [0], [2], [5]])
    table = ndl.Tensor(rng.standard_normal((6, 3)).astype(np.float32), requires_grad=True)

    def fn(logits, labels):
        return ops.take_along_axis(logits, labels, axis=1) + ops.take(table, labels)[:, 0, :1]

    path = str(tmp_path / "gather.onnx")
    ndl_onnx.export(fn, [_const(z), _const(y)], path, input_names=["logits", "labels"])
    model = __import__("onnx").load(path)
    kinds = {n.op_type for n in model.graph.node}
    assert {"Gather", "GatherElements"} <= kinds
    want = np.take_along_axis(z, y, 1) + table.numpy()[y[:, 0], :1]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"logits": z, "labels": y})
    np.testing.assert_allclose(got, want, rtol=1e-6)
    imported = ndl_onnx.import_model(path)
    out = imported(_const(z), _const(y))
    out = out[0] if isinstance(out, list | tuple) else out
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-6)
