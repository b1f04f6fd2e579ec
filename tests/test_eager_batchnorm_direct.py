"""Eager training BatchNorm computes its batch statistics and running averages with no nodes
(nn/basic.py ``_train_forward``: ``batch_norm``'s gradient carries the statistics'
dependence on x itself). It must give the node path's values, gradients and running
statistics bit for bit; traces, declared graphs and profiles must still see the nodes. The
tuple-item tests pin down what the node path hands BatchNorm: an eager item with no
gradient to record is a leaf, one with a gradient stays a node."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
from needle import nn, ops
from needle.core.context import recording


def _model(kind: str) -> nn.Module:
    np.random.seed(0)
    if kind == "bn1d":
        return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4),
                             nn.BatchNorm1d(4))
    if kind == "bn1d_3d":
        return nn.Sequential(nn.BatchNorm1d(3))
    return nn.Sequential(nn.Conv(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv(4, 4, 3),
                         nn.BatchNorm2d(4))


_SHAPES = {"bn1d": (8, 6), "bn1d_3d": (7, 3, 5), "bn2d": (2, 3, 6, 6)}


def _steps(kind: str, context) -> list[np.ndarray]:
    """Three training steps (SGD): every output, input gradient, parameter and buffer."""
    model = _model(kind)
    opt = ndl.optim.SGD(model.parameters(), lr=0.1)
    rng = np.random.default_rng(1)
    seen = []
    for _ in range(3):
        x = ndl.Tensor(rng.standard_normal(_SHAPES[kind]).astype(np.float32))
        seed = rng.standard_normal()
        with context():
            out = model(x)
            loss = (out * out).sum() * seed
            opt.reset_grad()
            loss.backward()
        opt.step()
        seen += [out.numpy(), x.grad.numpy()]
        seen += [p.numpy().copy() for p in model.parameters()]
        seen += [b.numpy().copy() for b in model.buffers()]
    return seen


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("kind", sorted(_SHAPES))
@pytest.mark.parametrize("node_path", ["recording", "profile"])
def test_direct_path_gives_the_node_paths_bits(kind: str, node_path: str) -> None:
    direct = _steps(kind, _Nothing)
    nodes = _steps(kind, recording if node_path == "recording" else ndl.profile)
    assert len(direct) == len(nodes)
    for a, b in zip(direct, nodes):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def test_eager_batchnorm_statistics_are_constants() -> None:
    """The direct path ran: batch_norm's mean and var inputs are leaves with no gradient, and
    the running averages moved as the nodes would move them."""
    bn = nn.BatchNorm1d(4)
    x = ndl.Tensor(np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32))
    out = bn(x)
    assert out.op is not None and out.op.name == "batch_norm"
    mean, var = out.inputs[3], out.inputs[4]
    assert mean.op is None and var.op is None
    assert not mean.requires_grad and not var.requires_grad
    data = x.numpy()
    np.testing.assert_allclose(bn.running_mean.numpy(), 0.1 * data.mean(0), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(bn.running_var.numpy(), 0.9 + 0.1 * data.var(0), rtol=1e-6)


def test_recorded_and_profiled_batchnorm_keep_their_nodes() -> None:
    bn = nn.BatchNorm1d(4)
    x = ndl.Tensor(np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32))
    with recording():
        out = bn(x)
    assert out.inputs[3].op is not None and out.inputs[3].op.name == "tuple_get_item"
    with ndl.profile() as prof:
        bn(x)
    table = prof.table()
    for name in ("batch_stats", "batch_norm", "store"):
        assert name in table


def test_jitted_batchnorm_updates_running_statistics_every_call() -> None:
    bn = nn.BatchNorm1d(3)
    step = ndl.jit(lambda x: bn(x))
    rng = np.random.default_rng(2)
    reference = nn.BatchNorm1d(3)
    for _ in range(3):
        x = rng.standard_normal((5, 3)).astype(np.float32)
        np.testing.assert_array_equal(step(ndl.Tensor(x)).numpy(),
                                      reference(ndl.Tensor(x)).numpy())
        np.testing.assert_array_equal(bn.running_mean.numpy(), reference.running_mean.numpy())
        np.testing.assert_array_equal(bn.running_var.numpy(), reference.running_var.numpy())


def test_tuple_items_without_a_gradient_are_leaves() -> None:
    x = ndl.Tensor(np.arange(12, dtype=np.float32).reshape(4, 3), requires_grad=False)
    stats = ops.batch_stats(x, axes=(0,))
    mean = stats[0]
    assert mean.op is None and mean.inputs == () and not mean.requires_grad
    np.testing.assert_array_equal(mean.numpy(), x.numpy().mean(0, keepdims=True))
    np.testing.assert_array_equal(stats[-1].numpy(), x.numpy().var(0, keepdims=True))
    with pytest.raises(IndexError):
        stats[2]


def test_tuple_items_with_a_gradient_stay_nodes() -> None:
    """An item of a tuple that requires a gradient keeps its node (the gradient flows back
    through it), unless grad mode is off."""
    x = ndl.Tensor(np.random.default_rng(3).standard_normal((5, 2)).astype(np.float32))
    stats = ops.batch_stats(x, axes=(0,))
    var = stats[1]
    assert var.op is not None and var.requires_grad
    var.sum().backward()
    data = x.numpy()
    np.testing.assert_allclose(x.grad.numpy(), 2 * (data - data.mean(0)) / 5, rtol=1e-5,
                               atol=1e-6)
    with ndl.no_grad():
        assert stats[1].op is None


def test_a_subclass_with_its_own_running_update_still_gets_it() -> None:
    class Counting(nn.BatchNorm1d):
        calls = 0

        def _update_running(self, mean, var, out):
            Counting.calls += 1
            super()._update_running(mean, var, out)

    bn, reference = Counting(3), nn.BatchNorm1d(3)
    x = np.random.default_rng(4).standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_array_equal(bn(ndl.Tensor(x)).numpy(), reference(ndl.Tensor(x)).numpy())
    assert Counting.calls == 1
    np.testing.assert_array_equal(bn.running_var.numpy(), reference.running_var.numpy())
