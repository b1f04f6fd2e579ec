"""ndl.jit: eager and jitted runs agree (outputs, gradients, parameters after training)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import needle as ndl
import needle.nn as nn
from needle import ops
from needle.apps.models import MLPResNet, ResidualCNN


def _params(model):
    return [p.numpy().copy() for p in model.parameters()]


def _sgd(params):
    return ndl.optim.SGD(params, lr=0.05, momentum=0.9)


def _train_step(model, opt):
    """The issue's training step, written as a user would: forward, loss, reset_grad,
    backward, step."""
    loss_fn = nn.SoftmaxLoss()

    def train_step(x, y):
        loss = loss_fn(model(x), y)
        opt.reset_grad()
        loss.backward()
        opt.step()
        return loss

    return train_step


def _train(model_fn, make_batch, steps: int, jitted: bool, make_opt=_sgd):
    """Train a freshly built model for ``steps`` steps; return losses and final parameters.

    NOTE: SGD, not Adam: a parameter whose true gradient is 0 (a Linear bias right before a
    BatchNorm) gets float noise as gradient, which Adam scales up to full-size steps; the
    JIT's buffer reuse changes array alignment and hence NumPy's summation rounding.
    """
    np.random.seed(0)
    model = model_fn()
    train_step = _train_step(model, make_opt(model.parameters()))
    step = ndl.jit(train_step) if jitted else train_step
    rng = np.random.default_rng(1)
    losses = []
    for _ in range(steps):
        x, y = make_batch(rng)
        losses.append(float(step(x, y).numpy()))
    buffers = [b.numpy().copy() for b in model.buffers()]
    return losses, _params(model), buffers, step


def _images(shape, classes=10):
    def make(rng):
        x = ndl.Tensor(rng.standard_normal(shape).astype(np.float32), requires_grad=False)
        return x, ndl.Tensor(rng.integers(0, classes, shape[0]))
    return make


class _LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 12, num_layers=2)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        out, _ = self.lstm(ops.permute(x, (1, 0, 2)))  # (B, T, F) -> (T, B, F)
        return self.head(out[-1])


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                                  nn.Linear(32, 10)), _images((16, 8, 8, 1))),
    "mlp-resnet-batchnorm": (lambda: MLPResNet(64, hidden=32, num_blocks=2, drop_prob=0.0),
                             _images((16, 8, 8, 1))),
    "cnn": (lambda: ResidualCNN(1, width=4), _images((8, 8, 8, 1))),
    # 8 and 16 channels: its stride-1 3x3 convs take the Winograd path (kernels/winograd.py)
    "cnn-winograd": (lambda: ResidualCNN(1, width=8), _images((8, 12, 12, 1))),
    "lstm": (_LSTMClassifier, _images((8, 5, 6))),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_training_steps_match_eager(name):
    model_fn, batches = MODELS[name]
    eager_losses, eager_params, eager_buffers, _ = _train(model_fn, batches, 20, jitted=False)
    jit_losses, jit_params, jit_buffers, step = _train(model_fn, batches, 20, jitted=True)
    np.testing.assert_allclose(jit_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(jit_params, eager_params):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(jit_buffers, eager_buffers):  # BatchNorm running statistics
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    report = step.explain()
    assert report.traces == 1 and report.cache_entries[0].calls == 20
    assert report.cache_entries[0].effects >= 1  # the optimizer step is part of the plan


def test_adam_training_matches_eager():
    model_fn, batches = MODELS["mlp"]

    def adam(params):
        return ndl.optim.Adam(params, lr=1e-2, weight_decay=1e-3)

    eager = _train(model_fn, batches, 10, False, adam)
    jitted = _train(model_fn, batches, 10, True, adam)
    for a, b in zip(jitted[1], eager[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "lstm"])
def test_jitted_module_outputs_and_gradients_match_eager(name):
    model_fn, batches = MODELS[name]
    np.random.seed(0)
    model = model_fn()
    compiled = ndl.jit(model)
    x, _ = batches(np.random.default_rng(2))
    x = ndl.Tensor(x.numpy())  # requires a gradient
    eager_out = model(x)
    eager_out.sum().backward()
    eager_grads = [p.grad.numpy().copy() for p in model.parameters()]
    eager_x_grad = x.grad.numpy().copy()
    out = compiled(x)
    np.testing.assert_allclose(out.numpy(), eager_out.numpy(), rtol=1e-5, atol=1e-6)
    for p in model.parameters():
        p.grad = None
    out.sum().backward()
    for p, g in zip(model.parameters(), eager_grads):
        np.testing.assert_allclose(p.grad.numpy(), g, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), eager_x_grad, rtol=1e-4, atol=1e-6)


def test_jitted_module_sees_parameter_updates_made_between_calls():
    np.random.seed(0)
    model = nn.Linear(3, 2)
    compiled = ndl.jit(model)
    x = ndl.Tensor(np.ones((1, 3), np.float32), requires_grad=False)
    before = compiled(x).numpy().copy()
    model.weight.data = model.weight.data * 2.0  # replaces the array object
    model.bias.cached_data[...] = 0  # and in place
    np.testing.assert_allclose(compiled(x).numpy(), model(x).numpy(), rtol=1e-6)
    assert not np.allclose(before, compiled(x).numpy())


def test_second_order_gradient_through_a_compiled_function():
    f = ndl.jit(lambda a: ops.tanh(a) * a)
    x = ndl.Tensor(np.array([0.3, -0.8], dtype=np.float64))
    f(x).sum().backward()
    g = x.grad
    g.sum().backward()
    t = np.tanh(x.numpy())
    first = t + x.numpy() * (1 - t**2)
    second = 2 * (1 - t**2) - 2 * x.numpy() * t * (1 - t**2)
    np.testing.assert_allclose(g.numpy(), first, rtol=1e-10)
    np.testing.assert_allclose(x.grad.numpy(), second, rtol=1e-8)


def test_optimize_false_gives_identical_results():
    model_fn, batches = MODELS["mlp-resnet-batchnorm"]
    results = []
    for optimize in (True, False):
        np.random.seed(0)
        model = model_fn()
        fn = ndl.jit(model, optimize=optimize)
        x, _ = batches(np.random.default_rng(3))
        results.append(fn(x).numpy())
    np.testing.assert_array_equal(results[0], results[1])


def test_explain_reports_passes_and_node_counts():
    f = ndl.jit(lambda a: ops.exp(a) + ops.exp(a))  # a common subexpression
    f(ndl.Tensor(np.ones(3, np.float32)))
    entry = f.explain().cache_entries[0]
    assert entry.nodes_before == 3 and entry.nodes_after == 2
    assert any(p.startswith("cse") for p in entry.passes)


# -- random op graphs ----------------------------------------------------------------------------
UNARY = [ops.exp, ops.tanh, ops.sigmoid, ops.relu, lambda a: a * 1.5, lambda a: -a,
         lambda a: ops.summation(a, axes=(1,), keepdims=True) + a]
BINARY = [lambda a, b: a + b, lambda a, b: a * b, lambda a, b: a - b, ops.maximum]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6), st.integers(0, 10),
                          st.integers(0, 10)), min_size=1, max_size=12),
       st.integers(0, 2**31 - 1))
def test_random_op_graphs_match_eager(program, seed):
    def run(a, b):
        values = [a, b]
        for kind, which, i, j in program:
            x, y = values[i % len(values)], values[j % len(values)]
            values.append(UNARY[which](x) if kind == 0 else BINARY[which % len(BINARY)](x, y))
        return ops.summation(values[-1] * values[-1]) + ops.summation(values[-2])

    rng = np.random.default_rng(seed)
    a_np, b_np = rng.uniform(-1, 1, (2, 3)), rng.uniform(-1, 1, (2, 3))
    a, b = ndl.Tensor(a_np), ndl.Tensor(b_np)
    eager = run(a, b)
    eager.backward()
    a2, b2 = ndl.Tensor(a_np), ndl.Tensor(b_np)
    out = ndl.jit(run)(a2, b2)
    out.backward()
    np.testing.assert_allclose(out.numpy(), eager.numpy(), rtol=1e-10)
    for jitted, reference in ((a2, a), (b2, b)):
        expected = 0.0 if reference.grad is None else reference.grad.numpy()  # unused input
        np.testing.assert_allclose(jitted.grad.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_memory_stays_flat_over_many_jitted_training_steps():
    import gc

    model_fn, batches = MODELS["mlp-resnet-batchnorm"]
    np.random.seed(0)
    model = model_fn()
    step = ndl.jit(_train_step(model, _sgd(model.parameters())))

    x, y = batches(np.random.default_rng(5))
    for _ in range(20):
        step(x, y)
    gc.collect()
    before = ndl.autograd.TENSOR_COUNTER
    for _ in range(300):
        step(x, y)
    gc.collect()
    assert ndl.autograd.TENSOR_COUNTER == before
    assert step.explain().traces == 1


def test_backward_inside_a_jitted_function_sets_grad_as_eager_does():
    """A jitted ``loss.backward()`` gives the arguments and the captured tensors the
    gradients eager code gives them, on every call (before: an argument's ``.grad`` stayed
    None, a captured tensor's was a trace node with no value)."""
    rng = np.random.default_rng(0)
    w = ndl.Tensor(rng.standard_normal((4, 3)).astype(np.float32), requires_grad=True)

    def loss_of(x):
        loss = ops.summation(ops.tanh(x @ w))
        loss.backward()
        return loss

    jitted = ndl.jit(loss_of)
    for _ in range(3):
        data = rng.standard_normal((5, 4)).astype(np.float32)
        x_eager = ndl.Tensor(data, requires_grad=True)
        loss_of(x_eager)
        w_grad = w.grad.numpy().copy()
        w.grad = None
        x_jit = ndl.Tensor(data, requires_grad=True)
        jitted(x_jit)
        np.testing.assert_allclose(x_jit.grad.numpy(), x_eager.grad.numpy(), rtol=1e-6)
        np.testing.assert_allclose(w.grad.numpy(), w_grad, rtol=1e-6)
        assert not w.grad.requires_grad


def test_a_jitted_training_step_leaves_the_gradients_it_used():
    np.random.seed(0)
    model = nn.Linear(3, 2)
    opt = ndl.optim.SGD(model.parameters(), lr=0.1)

    def step(x):
        opt.reset_grad()
        loss = ops.summation(model(x))
        loss.backward()
        opt.step()
        return loss

    jitted = ndl.jit(step)
    x = np.ones((4, 3), np.float32)
    for _ in range(2):
        jitted(x)
        # d sum(x W + b) / dW = x.sum(0) per output column; / db = 4
        np.testing.assert_allclose(model.weight.grad.numpy(), np.full((3, 2), 4.0))
        np.testing.assert_allclose(model.bias.grad.numpy(), np.full(model.bias.shape, 4.0))
