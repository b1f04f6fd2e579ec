"""caffe solvers: Caffe's lr policies and updates, snapshots, and training on the digits."""

from __future__ import annotations

import math

import numpy as np
import pytest

import needle.caffe as cf
from needle.data import DigitsDataset


def _linear_net(seed: int = 0, **layer) -> cf.Net:
    np.random.seed(seed)
    return cf.Net([
        {"name": "input", "type": "Input", "top": ["data", "label"], "shape": [[None, 4], [None]]},
        {"name": "ip", "type": "InnerProduct", "bottom": "data", "top": "ip", "num_output": 3,
         **layer},
        {"name": "loss", "type": "SoftmaxWithLoss", "bottom": ["ip", "label"], "top": "loss"},
    ])


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {"data": rng.random((8, 4)).astype(np.float32), "label": rng.integers(0, 3, 8)}


@pytest.mark.parametrize("policy,settings,expected", [
    ("fixed", {}, lambda it: 0.1),
    ("step", {"gamma": 0.5, "stepsize": 3}, lambda it: 0.1 * 0.5 ** (it // 3)),
    ("exp", {"gamma": 0.9}, lambda it: 0.1 * 0.9**it),
    ("inv", {"gamma": 0.1, "power": 0.75}, lambda it: 0.1 * (1 + 0.1 * it) ** -0.75),
    ("multistep", {"gamma": 0.1, "stepvalue": [2, 5]},
     lambda it: 0.1 * 0.1 ** ((it >= 2) + (it >= 5))),
    ("poly", {"power": 2.0, "max_iter": 10}, lambda it: 0.1 * (1 - it / 10) ** 2),
    ("sigmoid", {"gamma": -0.5, "stepsize": 4},
     lambda it: 0.1 / (1 + math.exp(0.5 * (it - 4)))),
])
def test_lr_policies_follow_caffe(policy, settings, expected):
    solver = cf.SGDSolver(_linear_net(), base_lr=0.1, lr_policy=policy, **settings)
    for it in range(8):
        solver.iter = it
        assert solver.get_learning_rate() == pytest.approx(expected(it), rel=1e-12)


def test_lr_policy_errors():
    with pytest.raises(ValueError, match="unknown lr_policy 'cosine'"):
        cf.SGDSolver(_linear_net(), lr_policy="cosine")
    with pytest.raises(ValueError, match="'step' needs stepsize"):
        cf.SGDSolver(_linear_net(), lr_policy="step")


def test_sgd_solver_is_caffes_momentum_with_lr_and_decay_multipliers():
    net = _linear_net(lr_mult=[1.0, 2.0], decay_mult=[1.0, 0.0])
    solver = cf.SGDSolver(net, base_lr=0.1, momentum=0.9, weight_decay=0.01,
                          lr_policy="step", gamma=0.5, stepsize=1)
    weight, bias = net.params["ip"]
    w, b = weight.data.astype(np.float64), bias.data.astype(np.float64)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for it in range(3):
        batch = _batch(it)
        # the gradient at the current weights, taken with a separate forward/backward
        net.clear_param_diffs()
        net.forward(**batch)
        net.backward()
        gw, gb = weight.diff.astype(np.float64), bias.diff.astype(np.float64)
        rate = 0.1 * 0.5**it
        vw = 0.9 * vw + rate * 1.0 * (gw + 0.01 * 1.0 * w)
        vb = 0.9 * vb + rate * 2.0 * (gb + 0.01 * 0.0 * b)
        w, b = w - vw, b - vb
        solver.step(1, feed=batch)
        np.testing.assert_allclose(weight.data, w, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(bias.data, b, rtol=1e-5, atol=1e-7)
    assert solver.iter == 3


def test_frozen_blobs_do_not_move():
    net = _linear_net(lr_mult=0)
    before = [b.data.copy() for b in net.params["ip"]]
    cf.SGDSolver(net, base_lr=1.0, momentum=0.9, weight_decay=0.1).step(2, feed=_batch())
    for blob, old in zip(net.params["ip"], before):
        np.testing.assert_array_equal(blob.data, old)


def test_adam_solver_matches_torch_adam():
    import torch

    net = _linear_net()
    weight, bias = net.params["ip"]
    tw = torch.tensor(weight.data.copy(), requires_grad=True)
    tb = torch.tensor(bias.data.copy(), requires_grad=True)
    opt = torch.optim.Adam([tw, tb], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    solver = cf.AdamSolver(net, base_lr=0.01)
    for it in range(3):
        batch = _batch(it)
        opt.zero_grad()
        logits = torch.tensor(batch["data"]) @ tw + tb
        torch.nn.functional.cross_entropy(logits, torch.tensor(batch["label"])).backward()
        opt.step()
        solver.step(1, feed=batch)
    np.testing.assert_allclose(weight.data, tw.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bias.data, tb.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_iter_size_and_clipping():
    batch = _batch()
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    one = _linear_net()
    cf.SGDSolver(one, base_lr=0.5).step(1, feed=batch)
    two = _linear_net()
    batches = iter(halves)
    cf.SGDSolver(two, base_lr=0.5, iter_size=2).step(1, feed=lambda it: next(batches))
    for a, b in zip(one.params["ip"], two.params["ip"]):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-7)
    clipped = _linear_net()
    start = [b.data.copy() for b in clipped.params["ip"]]
    cf.SGDSolver(clipped, base_lr=1.0, clip_gradients=1e-3).step(1, feed=batch)
    moved = math.sqrt(sum(float(np.sum((b.data - s) ** 2))
                          for b, s in zip(clipped.params["ip"], start)))
    assert moved == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("solver_cls", [cf.SGDSolver, cf.AdamSolver])
def test_snapshot_and_restore_resume_exactly(tmp_path, solver_cls):
    path = tmp_path / "solver.npz"
    feed = _batch
    net = _linear_net()
    solver = solver_cls(net, base_lr=0.05, momentum=0.9, weight_decay=0.001)
    solver.step(2, feed=feed)
    solver.snapshot(path)
    solver.step(2, feed=feed)
    expected = [b.data.copy() for b in net.params["ip"]]
    fresh = _linear_net(seed=9)
    resumed = solver_cls(fresh, base_lr=0.05, momentum=0.9, weight_decay=0.001)
    resumed.restore(path)
    assert resumed.iter == 2
    resumed.step(2, feed=feed)
    for blob, value in zip(fresh.params["ip"], expected):
        np.testing.assert_array_equal(blob.data, value)
    other = cf.AdamSolver if solver_cls is cf.SGDSolver else cf.SGDSolver
    with pytest.raises(ValueError, match="snapshot cannot restore"):
        other(_linear_net()).restore(path)


def test_solver_trains_the_mlp_resnet_on_the_digits():
    """A MemoryData layer feeds the solver; the test net shares the trained weights."""
    train, test = DigitsDataset(train=True), DigitsDataset(train=False)
    np.random.seed(0)
    body = cf.mlp_resnet_spec(64, 64, 10, num_blocks=2, drop_prob=0.1,
                              moving_average_fraction=0.9, accuracy=True)[1:]
    data = {"name": "data", "type": "MemoryData", "source": train, "batch_size": 100,
            "top": ["data", "label"]}
    net = cf.Net([data, *body])
    assert net.inputs == [] and net.layers[0].type == "MemoryData"
    solver = cf.SGDSolver(net, base_lr=0.05, momentum=0.9, weight_decay=1e-4,
                          lr_policy="step", gamma=0.5, stepsize=100)
    first = solver.step(1)
    last = solver.step(299)
    assert last < first / 5
    test_net = cf.Net(cf.mlp_resnet_spec(64, 64, 10, num_blocks=2, accuracy=True),
                      phase="test")
    test_net.load_state_dict(net.state_dict())
    out = test_net.forward(data=test.images.reshape(len(test), -1), label=test.labels)
    assert out["accuracy"] >= 0.95
