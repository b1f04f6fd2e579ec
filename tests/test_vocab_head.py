"""The fused vocabulary head + softmax cross-entropy (core/ops_vocab_head.py,
kernels/vocab_head.py, nn/vocab_head.py, compiler/vocab_head_rewrite.py): against PyTorch,
against needle's separate ops (non-finite logits), as a Caffe layer, and the JIT rewrite of
``Linear`` -> ``SoftmaxLoss`` into it. (The op table rows check eager, Session and JIT
values, gradients against torch and finite differences, and second order.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needle as ndl
import needle.caffe as cf
from needle import nn, ops
from needle.compiler import vocab_head_rewrite
from needle.compiler.vocab_head_rewrite import rewrite_vocab_heads
from needle.kernels import vocab_head


def _data(rows: int, k: int, classes: int, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = (rng.standard_normal((k, classes)) * 0.3).astype(np.float32)
    b = (rng.standard_normal((1, classes)) * 0.3).astype(np.float32)
    ids = rng.integers(0, classes, rows)
    return x, w, b, ids


def _torch_loss_and_grads(x, w, b, ids):
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    loss = torch.nn.functional.cross_entropy(tx @ tw + tb, torch.from_numpy(ids))
    loss.backward()
    return loss.item(), tx.grad.numpy(), tw.grad.numpy(), tb.grad.numpy()


def test_module_matches_torch_on_many_row_blocks_split_over_threads(monkeypatch):
    # 1,100 x 1,000 logits: above PARALLEL_MIN_SIZE, so the row blocks go to two threads
    monkeypatch.setattr(vocab_head.cpu_threads, "NUM_THREADS", 2)
    x, w, b, ids = _data(1100, 16, 1000)
    head = nn.LinearSoftmaxLoss(16, 1000)
    head.weight.data, head.bias.data = ndl.Tensor(w), ndl.Tensor(b)
    nx = ndl.Tensor(x)
    loss = head(nx, ndl.Tensor(ids, requires_grad=False))
    loss.backward()
    t_loss, t_dx, t_dw, t_db = _torch_loss_and_grads(x, w, b, ids)
    assert abs(loss.numpy().item() - t_loss) < 1e-5 * abs(t_loss)
    for got, want in ((nx.grad, t_dx), (head.weight.grad, t_dw), (head.bias.grad, t_db)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-7)


def test_only_the_wanted_adjoints_are_computed():
    x, w, b, ids = _data(5, 3, 7)
    nx, nw, nb = ndl.Tensor(x, requires_grad=False), ndl.Tensor(w), ndl.Tensor(b)
    losses = nn.linear_softmax_cross_entropy(nx, nw, nb, ndl.Tensor(ids, requires_grad=False))
    losses.sum().backward()
    _, _, t_dw, t_db = _torch_loss_and_grads(x, w, b, ids)
    assert nx.grad is None
    np.testing.assert_allclose(nw.grad.numpy(), t_dw * len(ids), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nb.grad.numpy(), t_db * len(ids), rtol=1e-5, atol=1e-6)


def test_non_finite_logits_give_what_the_separate_ops_give():
    x, w, b, ids = _data(4, 3, 6)
    b = b.copy()
    b[0, 2] = np.inf      # a row maximum of inf: the careful formulas, as the separate ops
    fused = [ndl.Tensor(a) for a in (x, w, b)]
    plain = [ndl.Tensor(a) for a in (x, w, b)]
    label = ndl.Tensor(ids, requires_grad=False)
    with np.errstate(all="ignore"):
        got = nn.linear_softmax_cross_entropy(*fused, label)
        want = ops.softmax_cross_entropy(ops.linear(*plain), label)
        got.sum().backward()
        want.sum().backward()
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    for a, c in zip(fused, plain):
        np.testing.assert_allclose(a.grad.numpy(), c.grad.numpy(), rtol=1e-6)


def test_bad_ids_and_shapes_are_named():
    x, w, b, ids = _data(4, 3, 6)
    with pytest.raises(IndexError, match=r"vocab_head_softmax: ids must lie in \[0, 6\)"):
        nn.linear_softmax_cross_entropy(ndl.Tensor(x), ndl.Tensor(w), ndl.Tensor(b),
                                        ndl.Tensor(ids + 3, requires_grad=False))
    with pytest.raises(ops.ShapeError, match="vocab_head_softmax: the bias must be"):
        nn.linear_softmax_cross_entropy(ndl.Tensor(x), ndl.Tensor(w), ndl.Tensor(b[:, :4]),
                                        ndl.Tensor(ids, requires_grad=False))


def test_caffe_op_layers_forward_and_backward_match_torch():
    x, w, b, ids = _data(4, 3, 6)
    head = cf.OpLayer("vocab_head_softmax")
    bottoms = [x, w, b, ids]
    head.ensure_setup([a.shape for a in bottoms])
    losses, s = head.forward(bottoms)
    loss_layer = cf.OpLayer("vocab_head_loss")
    loss_bottoms = [x, w, b, ids, losses, s]
    loss_layer.ensure_setup([a.shape for a in loss_bottoms])
    (out,) = loss_layer.forward(loss_bottoms)
    diffs = loss_layer.backward([np.full(4, 0.25, np.float32)], [True] * 3 + [False] * 3)
    t_loss, t_dx, t_dw, t_db = _torch_loss_and_grads(x, w, b, ids)
    assert abs(out.mean() - t_loss) < 1e-5
    for got, want in zip(diffs[:3], (t_dx, t_dw, t_db)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# -- the JIT rewrite ---------------------------------------------------------------------------
@pytest.fixture
def with_rewrite(monkeypatch):
    """The pipeline's rewrite (compiler/passes.optimize) for heads of any size."""
    monkeypatch.setattr(vocab_head_rewrite, "MIN_LOGITS", 0)


class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 50)

    def forward(self, ids: ndl.Tensor) -> ndl.Tensor:
        return self.head(ops.tanh(self.body(self.embedding(ids))))


def _steps(jitted: bool, fetch_logits: bool = False):
    np.random.seed(3)
    model = _TinyLM()
    opt = ndl.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = nn.SoftmaxLoss()

    def step(ids, targets):
        logits = model(ids)
        loss = opt.minimize(loss_fn(logits, targets))
        return (loss, logits) if fetch_logits else loss

    return model, (ndl.jit(step) if jitted else step)


def test_jit_rewrites_linear_and_softmax_loss_into_the_fused_ops(with_rewrite):
    rng = np.random.default_rng(1)
    ids = ndl.Tensor(rng.integers(0, 50, 12), requires_grad=False)
    targets = ndl.Tensor(rng.integers(0, 50, 12), requires_grad=False)
    eager_model, eager_step = _steps(False)
    jit_model, jit_step = _steps(True)
    names = [s.op.name for s in jit_step.lower(ids, targets).steps]
    assert "vocab_head_softmax" in names and "vocab_head_loss_grad" in names
    assert "softmax_cross_entropy_grad" not in names and "linear" in names  # (the body's)
    for _ in range(3):
        np.testing.assert_allclose(jit_step(ids, targets).numpy(),
                                   eager_step(ids, targets).numpy(), rtol=1e-5)
    for p, q in zip(jit_model.parameters(), eager_model.parameters()):
        np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=1e-5, atol=1e-6)


def test_jit_leaves_small_heads_to_the_separate_ops(monkeypatch):
    rng = np.random.default_rng(1)
    ids = ndl.Tensor(rng.integers(0, 50, 12), requires_grad=False)
    _, jit_step = _steps(True)
    program = jit_step.lower(ids, ids)
    assert rewrite_vocab_heads(program) == 0  # 12 x 50 logits: below MIN_LOGITS
    monkeypatch.setattr(vocab_head_rewrite, "MIN_LOGITS", 600)
    assert rewrite_vocab_heads(program) == 1  # (the pattern was there)


def test_jit_leaves_the_head_alone_when_the_logits_are_fetched(with_rewrite):
    rng = np.random.default_rng(1)
    ids = ndl.Tensor(rng.integers(0, 50, 12), requires_grad=False)
    targets = ndl.Tensor(rng.integers(0, 50, 12), requires_grad=False)
    _, jit_step = _steps(True, fetch_logits=True)
    names = [s.op.name for s in jit_step.lower(ids, targets).steps]
    assert "vocab_head_softmax" not in names and "softmax_cross_entropy_grad" in names
