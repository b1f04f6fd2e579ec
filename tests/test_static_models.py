"""Whole models in a Session: eager/graph training equivalence, optimize on/off equivalence,
and the memory plan's effect on the peak bytes of a deep MLP's forward + backward."""

from __future__ import annotations

import numpy as np

import needle as ndl
import needle.nn as nn
import needle.static as st
from needle.compiler import fusion


def residual_block(dim: int, hidden: int, drop_prob: float) -> nn.Module:
    return nn.Sequential(
        nn.Residual(nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(drop_prob),
            nn.Linear(hidden, dim), nn.BatchNorm1d(dim))),
        nn.ReLU())


def mlp_resnet(seed: int, drop_prob: float = 0.0) -> nn.Module:
    """Linear(784, 100) -> ReLU -> 3 x ResidualBlock(100, 50) -> Linear(100, 10)."""
    np.random.seed(seed)
    return nn.Sequential(nn.Linear(784, 100), nn.ReLU(),
                         *[residual_block(100, 50, drop_prob) for _ in range(3)],
                         nn.Linear(100, 10))


def _batches(steps: int, batch: int = 100):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((steps, batch, 784)).astype(np.float32)
    labels = rng.integers(0, 10, (steps, batch))
    return list(zip(images, labels))


def test_mlp_resnet_trains_identically_in_eager_mode_and_in_a_session():
    steps = 50
    batches = _batches(steps)
    loss_fn = nn.SoftmaxLoss()

    eager = mlp_resnet(seed=1)  # dropout off with p = 0; BatchNorm in training mode
    opt = ndl.optim.Adam(eager.parameters(), lr=1e-3)
    eager_losses = []
    for images, labels in batches:
        opt.reset_grad()
        loss = loss_fn(eager(ndl.Tensor(images, requires_grad=False)),
                       ndl.Tensor(labels, requires_grad=False))
        loss.backward()
        opt.step()
        eager_losses.append(loss.numpy())

    graph_model = mlp_resnet(seed=1)
    with st.Graph():
        x = st.placeholder((100, 784), name="images")
        y = st.placeholder((100,), dtype="int64", name="labels")
        loss = loss_fn(graph_model(x), y)
        train = st.minimize(ndl.optim.Adam(graph_model.parameters(), lr=1e-3), loss)
        sess = st.Session()
        graph_losses = [sess.run([train, loss], {x: images, y: labels})[1]
                        for images, labels in batches]

    assert eager_losses[-1] < eager_losses[0]
    np.testing.assert_allclose(graph_losses, eager_losses, rtol=1e-6, atol=1e-6)
    params = list(zip(eager.parameters(), graph_model.parameters()))
    assert len(params) == 2 + 3 * 8 + 2
    for a, b in params:
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-6)
    # NOTE: the same ops run in the same order, so in fact the parameters are bitwise equal
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in params)
    # the train op also runs BatchNorm's running-statistics updates, as the eager step does
    buffers = list(zip(eager.buffers(), graph_model.buffers()))
    assert len(buffers) == 3 * 2 * 2
    for a, b in buffers:
        np.testing.assert_array_equal(b.numpy(), a.numpy())


def test_optimized_and_unoptimized_sessions_train_bitwise_identically():
    batches = _batches(5, batch=32)
    results = []
    for optimize in (True, False):
        model = mlp_resnet(seed=2, drop_prob=0.1)
        with st.Graph():
            x = st.placeholder((32, 784))
            y = st.placeholder((32,), dtype="int64")
            logits = model(x)
            loss = nn.SoftmaxLoss()(logits, y)
            train = st.minimize(ndl.optim.Adam(model.parameters(), lr=1e-3), loss)
            sess = st.Session(optimize=optimize)
            np.random.seed(7)  # the dropout masks are drawn in the same order either way
            losses = [sess.run([train, loss], {x: xb, y: yb})[1] for xb, yb in batches]
            results.append((losses, sess.run(logits, {x: batches[0][0]}),
                            [p.numpy() for p in model.parameters()]))
    (losses_a, logits_a, params_a), (losses_b, logits_b, params_b) = results
    np.testing.assert_array_equal(losses_a, losses_b)
    np.testing.assert_array_equal(logits_a, logits_b)
    for a, b in zip(params_a, params_b):
        np.testing.assert_array_equal(a, b)


def test_memory_plan_lowers_peak_bytes_of_a_deep_mlp_forward_and_backward():
    np.random.seed(3)
    layers = []
    for _ in range(20):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    model = nn.Sequential(*layers)
    data = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    with st.Graph():
        x = st.placeholder((64, 256))
        loss = (model(x) * model(x)).mean()
        grads = st.gradients(loss, model.parameters())
        peaks, predicted, values = {}, {}, {}
        for optimize in (True, False):
            sess = st.Session(optimize=optimize)
            meta = st.RunMetadata()
            values[optimize] = sess.run(grads, {x: data}, run_metadata=meta)
            peaks[optimize] = meta.peak_bytes
            plan = sess.plan(grads, {x: data})
            predicted[optimize] = plan.peak_bytes_with_reuse
    print(f"\n20-layer MLP forward+backward, batch 64, width 256: measured peak bytes of "
          f"intermediates {peaks[True]} with the memory plan, {peaks[False]} without "
          f"({peaks[False] / peaks[True]:.1f}x); predicted {predicted[True]} with, "
          f"{plan.peak_bytes_without_reuse} without")
    activation = 64 * 256 * 4
    assert peaks[False] > 3 * peaks[True]
    # without frees every forward value and every gradient is held: far over 40 activations
    assert peaks[False] > 60 * activation
    # the prediction (each value its own buffer, no views) bounds the measurement from above
    assert peaks[True] <= predicted[True]
    for a, b in zip(values[True], values[False]):
        np.testing.assert_array_equal(a, b)


def test_memory_stays_flat_over_many_session_train_steps():
    import gc
    import resource

    np.random.seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(32, 5))
    opt = ndl.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((16, 20)).astype(np.float32)
    Y = rng.integers(0, 5, 16)
    with st.Graph():
        x, y = st.placeholder((16, 20)), st.placeholder((16,), dtype="int64")
        loss = nn.SoftmaxLoss()(model(x), y)
        train = opt.minimize(loss)
        sess = st.Session()
        # warm up past the call that compiles the plan's fused regions (a one-off: numba's
        # compiler allocates a few MB, which the steady state must not be charged with)
        for _ in range(fusion.FUSE_AFTER_CALLS + 10):
            sess.run([train, loss], {x: X, y: Y})
        gc.collect()
        tensors = ndl.autograd.TENSOR_COUNTER
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(500):
            sess.run([train, loss], {x: X, y: Y})
        gc.collect()
        assert ndl.autograd.TENSOR_COUNTER == tensors
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 8 * 1024  # KiB
