"""The language models' shared tail as fewer, cheaper steps: SoftmaxLoss as one
``softmax_cross_entropy`` node, nn.Linear as one ``linear`` node, an Embedding's backward as a
compiled row scatter, and optimizer steps that read large gradients in place. Each must give
the same values as the form it replaced (bit for bit where the arithmetic is the same) and
PyTorch's; the ops' generic checks (finite differences, second order, JIT, Session) are rows
of tests/op_table.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needle as ndl
import needle.static as st
from needle import nn, ops
from needle.core.registry import ShapeError, get_op
from needle.kernels import cross_entropy, index_add, recycle
from needle.optim import optimizer as optimizer_module


def _const(array) -> ndl.Tensor:
    return ndl.Tensor(array, requires_grad=False)


def _graph_ops(root) -> list[str]:
    names, stack, seen = [], [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen or node.op is None:
            continue
        seen.add(id(node))
        names.append(node.op.name)
        stack.extend(node.inputs)
    return names


# -- SoftmaxLoss ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 5), (300, 400)])
def test_softmax_loss_is_one_node_with_the_values_of_logsumexp_minus_the_pick(shape):
    """(300, 400): NumPy's blocked kernels, the same bits as the two-op form, where numba is
    missing, else kernels/numba_loss_rows.py's rows; (7, 5): the compiled rows where numba
    is installed (float64 sums, numba's exp: equal to float rounding)."""
    exact = cross_entropy._loops() is None or (shape[0] * shape[1] > cross_entropy.MAX_SIZE
                                               and cross_entropy.LARGE_LOOPS.module() is None)
    rng = np.random.default_rng(0)
    z = (rng.standard_normal(shape) * 3).astype(np.float32)
    y = _const(rng.integers(0, shape[1], shape[0]))
    fused, composite = ndl.Tensor(z), ndl.Tensor(z)
    loss = nn.SoftmaxLoss()(fused, y)
    assert _graph_ops(loss).count("softmax_cross_entropy") == 1
    assert "logsumexp" not in _graph_ops(loss)
    picked = ops.reshape(ops.take_along_axis(composite, ops.reshape(y, (-1, 1)), 1), (-1,))
    want = ops.mean(ops.logsumexp(composite, axes=(1,)) - picked)
    loss.backward()
    want.backward()
    if exact:
        assert np.array_equal(loss.numpy(), want.numpy())
        assert np.array_equal(fused.grad.numpy(), composite.grad.numpy())
    np.testing.assert_allclose(loss.numpy(), want.numpy(), rtol=1e-6)
    np.testing.assert_allclose(fused.grad.numpy(), composite.grad.numpy(), rtol=1e-5,
                               atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_loss_rows_agree_with_numpy_and_step_aside_for_infinite_rows(dtype,
                                                                              monkeypatch):
    if cross_entropy._loops() is None:
        pytest.skip("numba (the fast extra) is not installed")
    rng = np.random.default_rng(8)
    z = (rng.standard_normal((64, 10)) * 4).astype(dtype)
    ids = rng.integers(0, 10, 64)
    g = rng.uniform(0.5, 2.0, 64).astype(dtype)
    op, grad_op = get_op("softmax_cross_entropy").cls(), get_op("softmax_cross_entropy_grad").cls()
    compiled = op.compute(z, ids), grad_op.compute(z, ids, g)
    monkeypatch.setattr(cross_entropy, "_loops", lambda: None)
    plain = op.compute(z, ids), grad_op.compute(z, ids, g)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    for got, want in zip(compiled, plain):
        assert got.dtype == want.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    monkeypatch.undo()
    z[3, 2], z[5, :] = np.inf, -np.inf  # non-finite row maxima: NumPy's careful formulas
    with np.errstate(invalid="ignore"):
        got = op.compute(z, ids), grad_op.compute(z, ids, g)
        monkeypatch.setattr(cross_entropy, "_loops", lambda: None)
        want = op.compute(z, ids), grad_op.compute(z, ids, g)
    for a, b in zip(got, want):
        assert np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_softmax_loss_matches_torch_in_every_reduction(reduction):
    rng = np.random.default_rng(1)
    z = rng.standard_normal((6, 9)).astype(np.float32)
    y = rng.integers(0, 9, 6)
    nz, tz = ndl.Tensor(z), torch.tensor(z, requires_grad=True)
    got = nn.SoftmaxLoss(reduction=reduction)(nz, _const(y))
    want = torch.nn.functional.cross_entropy(tz, torch.tensor(y), reduction=reduction)
    (got.sum() if reduction == "none" else got).backward()
    (want.sum() if reduction == "none" else want).backward()
    np.testing.assert_allclose(got.numpy(), want.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nz.grad.numpy(), tz.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_softmax_cross_entropy_refuses_bad_ids_and_shapes():
    z = ndl.Tensor(np.zeros((3, 4), np.float32))
    with pytest.raises(IndexError, match=r"ids must lie in \[0, 4\)"):
        ops.softmax_cross_entropy(z, _const(np.array([0, 4, 1])))
    with pytest.raises(ShapeError, match=r"expected logits \(B, C\) and ids \(B,\)"):
        ops.softmax_cross_entropy(z, _const(np.array([0, 1])))


def test_softmax_loss_in_a_session_with_an_unknown_batch_matches_eager():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((5, 7)).astype(np.float32)
    y = rng.integers(0, 7, 5)
    with st.Graph():
        pz = st.placeholder((None, 7))
        py = st.placeholder((None,), dtype="int64")
        loss = nn.SoftmaxLoss()(pz, py)
        (grad,) = st.gradients(loss, [pz])
        got_loss, got_grad = st.Session().run([loss, grad], {pz: z, py: y})
    nz = ndl.Tensor(z)
    want = nn.SoftmaxLoss()(nz, _const(y))
    want.backward()
    np.testing.assert_allclose(got_loss, want.numpy(), rtol=1e-6)
    np.testing.assert_allclose(got_grad, nz.grad.numpy(), rtol=1e-6, atol=1e-8)


# -- Linear --------------------------------------------------------------------------------------
def test_linear_module_is_one_node_with_the_bits_of_matmul_plus_bias():
    rng = np.random.default_rng(3)
    x_data = rng.standard_normal((2, 6, 8)).astype(np.float32)
    layer = nn.Linear(8, 5)
    x, x2 = ndl.Tensor(x_data), ndl.Tensor(x_data)
    out = layer(x)
    assert out.shape == (2, 6, 5)
    assert _graph_ops(out).count("linear") == 1 and "matmul" not in _graph_ops(out)
    out.sum().backward()
    got = (out.numpy(), x.grad.numpy(), layer.weight.grad.numpy(), layer.bias.grad.numpy())
    w, b = layer.weight.detach(), layer.bias.detach()
    w.requires_grad = b.requires_grad = True
    want = ops.reshape(ops.reshape(x2, (-1, 8)) @ w + b, (2, 6, 5))
    want.sum().backward()
    for g, expected in zip(got, (want.numpy(), x2.grad.numpy(), w.grad.numpy(),
                                 b.grad.numpy())):
        assert np.array_equal(g, expected)
    assert layer.bias.grad.shape == (1, 5)


def test_linear_matches_torch_and_jit_equals_eager():
    rng = np.random.default_rng(4)
    x_data = rng.standard_normal((4, 3)).astype(np.float32)
    layer = nn.Linear(3, 2)
    t_layer = torch.nn.Linear(3, 2)
    with torch.no_grad():
        t_layer.weight.copy_(torch.tensor(layer.weight.numpy().T))
        t_layer.bias.copy_(torch.tensor(layer.bias.numpy()[0]))
    x = ndl.Tensor(x_data, requires_grad=False)
    np.testing.assert_allclose(layer(x).numpy(), t_layer(torch.tensor(x_data)).detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    jitted = ndl.jit(lambda t: layer(t))
    jitted(x)
    assert np.array_equal(jitted(x).numpy(), layer(x).numpy())


def test_linear_op_refuses_shapes_that_do_not_fit():
    x = ndl.Tensor(np.ones((3, 4), np.float32))
    with pytest.raises(ShapeError, match="inner dimensions differ"):
        ops.linear(x, ndl.Tensor(np.ones((5, 2), np.float32)), ndl.Tensor(np.ones(2, np.float32)))
    w = ndl.Tensor(np.ones((4, 2), np.float32))
    with pytest.raises(ShapeError, match="do not broadcast"):
        ops.linear(x, w, ndl.Tensor(np.ones((3, 3), np.float32)))
    with pytest.raises(ShapeError, match=r"bias of shape \(2, 1, 2\) does not broadcast"):
        ops.linear(x, w, ndl.Tensor(np.ones((2, 1, 2), np.float32)))


def test_linear_with_a_wider_bias_dtype_promotes_like_the_add():
    x = ndl.Tensor(np.ones((2, 3), np.float32))
    w = ndl.Tensor(np.ones((3, 2), np.float32))
    b = ndl.Tensor(np.full((1, 2), 0.5, np.float64))
    out = ops.linear(x, w, b)
    assert out.dtype == np.float64 and np.array_equal(out.numpy(), np.full((2, 2), 3.5))


# -- Embedding's backward ------------------------------------------------------------------------
@pytest.mark.parametrize("compiled", [True, False])
def test_embedding_gradient_adds_repeated_rows_in_order(compiled, monkeypatch):
    if compiled and index_add._loop() is None:
        pytest.skip("numba (the fast extra) is not installed")
    if not compiled:
        monkeypatch.setattr(index_add, "_loop", lambda: None)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 50, (35, 4))
    ids[:3] = 7  # repeats
    emb = nn.Embedding(50, 6)
    t_emb = torch.nn.Embedding(50, 6)
    with torch.no_grad():
        t_emb.weight.copy_(torch.tensor(emb.weight.numpy()))
    seed = rng.standard_normal((35, 4, 6)).astype(np.float32)
    emb(_const(ids)).backward(_const(seed))
    t_emb(torch.tensor(ids)).backward(torch.tensor(seed))
    want = np.zeros((50, 6), np.float32)
    np.add.at(want, ids.reshape(-1), seed.reshape(-1, 6))
    assert np.array_equal(emb.weight.grad.numpy(), want)
    np.testing.assert_allclose(emb.weight.grad.numpy(), t_emb.weight.grad.numpy(), rtol=1e-6,
                               atol=1e-6)


# -- optimizer steps that read large gradients in place ------------------------------------------
def _params(rng, shapes, grad_dtype=np.float32):
    params = [nn.Parameter(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    grads = [rng.standard_normal(s).astype(grad_dtype) for s in shapes]
    return params, grads


@pytest.mark.parametrize("make", [
    lambda p: ndl.optim.SGD(p, lr=0.1),
    lambda p: ndl.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda p: ndl.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
], ids=["sgd", "sgd_momentum_decay", "adam"])
@pytest.mark.parametrize("fused", [None, False])
def test_segmented_step_gives_the_bits_of_one_flat_update(make, fused, monkeypatch):
    rng = np.random.default_rng(6)
    # large gradients (read in place) between runs of small ones (copied into the flat buffer)
    shapes = [(3,), (700, 512), (4, 5), (2,), (512, 700), (7,)]
    start, grads = _params(rng, shapes)
    float64_grads = [g.astype(np.float64) for g in grads]  # cast while copied, as before
    results = []
    for segmented in (True, False):
        monkeypatch.setattr(optimizer_module, "SEGMENT_MIN_ELEMENTS",
                            1 << 18 if segmented else 1 << 62)
        params = [nn.Parameter(p.numpy().copy()) for p in start]
        opt = make(params)
        opt.fused = fused
        for step_grads in (grads, grads[::-1][::-1], float64_grads):
            for p, g in zip(params, step_grads):
                p.grad = _const(g)
            opt.step()
        results.append([p.numpy().copy() for p in params])
    for got, want in zip(*results):
        assert np.array_equal(got, want)


def test_segmented_step_keeps_state_across_a_state_dict_round_trip():
    rng = np.random.default_rng(7)
    params, grads = _params(rng, [(3,), (600, 500), (4,), (5,)])
    opt = ndl.optim.Adam(params, lr=1e-2)
    twin_params = [nn.Parameter(p.numpy().copy()) for p in params]
    twin = ndl.optim.Adam(twin_params, lr=1e-2)
    for step in range(3):
        for p, q, g in zip(params, twin_params, grads):
            p.grad, q.grad = _const(g * (step + 1)), _const(g * (step + 1))
        opt.step()
        twin.step()
        if step == 0:  # the twin's state goes through a state dict (its segments rebuilt)
            twin.load_state_dict(twin.state_dict())
    for p, q in zip(params, twin_params):
        assert np.array_equal(p.numpy(), q.numpy())


# -- the new ops as Caffe layers -----------------------------------------------------------------
def test_linear_and_the_loss_op_run_as_caffe_op_layers():
    import needle.caffe as cf

    report = cf.check_gradient(cf.OpLayer("linear"), [(3, 4), (4, 2), (1, 2)])
    assert report.max_error < 1e-6, str(report)
    rng = np.random.default_rng(9)
    z = rng.standard_normal((3, 4)).astype(np.float32)
    ids = np.array([0.0, 3.0, 1.0], np.float32)  # whole-valued float labels (a Caffe blob)
    layer = cf.OpLayer("softmax_cross_entropy")
    layer.ensure_setup([z.shape, ids.shape])
    assert [tuple(s) for s in layer.reshape([z.shape, ids.shape])] == [(3,)]
    (top,) = layer.forward([z, ids])
    want = torch.nn.functional.cross_entropy(torch.tensor(z), torch.tensor([0, 3, 1]),
                                             reduction="none")
    np.testing.assert_allclose(top, want.numpy(), rtol=1e-6)


# -- large outputs recycled between steps --------------------------------------------------------
@pytest.fixture
def small_recycling(monkeypatch):
    """Recycling from 1 KiB up (the real bound is 32 MiB), with an empty pool of its own."""
    monkeypatch.setattr(recycle, "MIN_BYTES", 1024)
    monkeypatch.setattr(recycle, "_pool", [])
    monkeypatch.delenv("NEEDLE_RECYCLE_LARGE", raising=False)


def test_a_recycled_array_is_handed_out_only_when_nothing_else_refers_to_it(small_recycling,
                                                                             monkeypatch):
    a = recycle.empty((64, 16), np.float32)
    b = recycle.empty((64, 16), np.float32)
    assert not np.shares_memory(a, b)  # both still referenced here
    view = a[1:]
    del a
    c = recycle.empty((64, 16), np.float32)
    assert not np.shares_memory(c, view) and not np.shares_memory(c, b)  # a view keeps it
    base = view.base
    del view, base
    d = recycle.empty((64, 16), np.float32)
    assert not np.shares_memory(d, b) and not np.shares_memory(d, c)
    assert recycle.empty((3,), np.float32).size == 3  # small: never pooled
    assert len(recycle._pool) <= recycle.MAX_ARRAYS
    for _ in range(2 * recycle.MAX_ARRAYS):  # held arrays: new ones, the pool stays bounded
        recycle.empty((128, 16), np.float32)
    assert len(recycle._pool) <= recycle.MAX_ARRAYS
    monkeypatch.setenv("NEEDLE_RECYCLE_LARGE", "0")
    assert all(e is not recycle.empty((64, 16), np.float32) for e in recycle._pool)


def test_the_recycling_pool_keeps_at_most_max_bytes(small_recycling, monkeypatch):
    monkeypatch.setattr(recycle, "MAX_BYTES", 3 * 64 * 16 * 4)
    for _ in range(3):
        recycle.empty((64, 16), np.float32)  # dropped at once: each may be reused
    assert sum(a.nbytes for a in recycle._pool) <= recycle.MAX_BYTES
    kept = [recycle.empty((64, 16), np.float32) for _ in range(5)]
    assert sum(a.nbytes for a in recycle._pool) <= recycle.MAX_BYTES
    giant = recycle.empty((64, 64), np.float32)  # above MAX_BYTES alone: never kept
    assert all(a is not giant for a in recycle._pool)
    del kept


def test_linear_outputs_and_loss_gradients_never_share_memory_while_alive(small_recycling):
    rng = np.random.default_rng(10)
    layer = nn.Linear(8, 300)
    x = ndl.Tensor(rng.standard_normal((256, 8)).astype(np.float32))
    y = _const(rng.integers(0, 300, 256))
    loss_fn = nn.SoftmaxLoss()
    kept = []
    for _ in range(3):  # each step's logits kept by the caller: fresh arrays every time
        logits = layer(x)
        kept.append((logits, logits.numpy().copy()))
        loss_fn(logits, y).backward()
    for i, (logits, values) in enumerate(kept):
        assert np.array_equal(logits.numpy(), values)
        assert not any(np.shares_memory(logits.numpy(), other.numpy())
                       for other, _ in kept[i + 1:])
    first = None
    for _ in range(3):  # nothing kept: the step reuses its arrays, with the same results
        loss = loss_fn(layer(x), y)
        loss.backward()
        grads = (x.grad.numpy().copy(), layer.weight.grad.numpy().copy())
        first = first or grads
        assert all(np.array_equal(g, f) for g, f in zip(grads, first))
