"""Attention's probabilities kept from the forward for the backward (kernels/attention.py
``keep_probs`` / ``probs``, the ops ``attention_with_probs`` and ``attention_grad_probs``,
compiler/attention_probs_rewrite.py), and the mask gradient made only where it is wanted.
Each must give, bit for bit, what the recomputing path gives, by slabs and by the
NumPy-ordered path; the op table (tests/op_table.py) checks the ops against PyTorch."""

from __future__ import annotations

import math

import numpy as np
import pytest

import needle as ndl
from needle import nn, ops
from needle.compiler import passes
from needle.kernels import attention, blas_policy


def _inputs(b, t, heads, d, seed=0):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((b, t, 3, heads * d)).astype(np.float32)
    g = rng.standard_normal((b, t, heads * d)).astype(np.float32)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], g


def _same_bits(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and \
        np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


@pytest.mark.parametrize("slabs", [True, False], ids=["slabs", "batched"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "nomask"])
@pytest.mark.parametrize("shape", [(16, 64, 4, 32), (3, 10, 2, 8)])  # (slabs from 2^16 logits)
def test_kept_probabilities_give_the_recomputed_bits(monkeypatch, slabs, causal, shape):
    b, t, heads, d = shape
    q, k, v, g = _inputs(b, t, heads, d)
    mask = np.triu(np.full((t, t), -1e9, np.float32), 1) if causal else None
    scale = 1.0 / math.sqrt(d)
    monkeypatch.setattr(attention, "SLABS", slabs)
    with blas_policy.hold_one_thread():
        out = attention.attention(q, k, v, mask, heads, scale)
        kept_out, probs = attention.attention(q, k, v, mask, heads, scale, keep_probs=True)
        want = attention.attention_grad(g, q, k, v, mask, heads, scale)
        given = probs.copy()
        got = attention.attention_grad(g, q, k, v, mask, heads, scale, probs=probs)
        no_mask_grad = attention.attention_grad(g, q, k, v, mask, heads, scale, probs=probs,
                                                mask_grad=False)
    assert _same_bits(kept_out, out)
    assert _same_bits(probs, attention.probabilities(q, k, mask, heads, scale))
    assert _same_bits(probs, given)  # read, never written
    for a, w in zip(got, want):
        assert (a is None and w is None) or _same_bits(a, w)
    assert no_mask_grad[3] is None
    for a, w in zip(no_mask_grad[:3], want[:3]):
        assert _same_bits(a, w)


def _layer_step(rewrite: bool, monkeypatch, mask_param: bool = False):
    """A jitted training step of one causal TransformerLayer (2^16 logits: the slab size),
    its program, and the parameters after three steps."""
    if not rewrite:
        monkeypatch.setattr(passes, "rewrite_attention_probs", lambda program: 0)
    np.random.seed(0)
    b, t, dim, heads = 4, 64, 64, 4
    layer = nn.TransformerLayer(dim, heads, 128, dropout=0.0, causal=not mask_param)
    params = list(layer.parameters())
    mask = None
    if mask_param:  # a learned additive bias on the logits: its gradient is wanted
        mask = nn.Parameter(np.zeros((t, t), np.float32))
        params.append(mask)
    opt = ndl.optim.SGD(params, lr=0.05)
    x = ndl.Tensor(np.random.default_rng(2).standard_normal((b, t, dim)).astype(np.float32),
                   requires_grad=False)

    def forward(x):
        if mask is None:
            return layer(x)
        q = k = v = x
        return ops.attention(q, k, v, mask, heads=heads, scale=0.125) + layer(x)

    @ndl.jit
    def step(x):
        return opt.minimize(ops.summation(forward(x) ** 2) / x.size)

    for _ in range(3):
        step(x)
    program = step.lower(x)
    monkeypatch.undo()
    return program, [p.numpy().copy() for p in params]


@pytest.mark.parametrize("mask_param", [False, True], ids=["causal", "learned_mask"])
def test_rewrite_keeps_the_probabilities_and_the_bits(monkeypatch, mask_param):
    plain_program, plain = _layer_step(False, monkeypatch, mask_param)
    program, fused = _layer_step(True, monkeypatch, mask_param)
    names = [s.op.name for s in program.steps]
    assert "attention_with_probs" in names and "attention_grad_probs" in names
    assert "attention_with_probs" not in [s.op.name for s in plain_program.steps]
    mask_grads = {s.op.mask_grad for s in program.steps if s.op.name == "attention_grad_probs"}
    # the causal mask is a constant (no dmask made); the learned one's gradient is read
    assert mask_grads == ({False, True} if mask_param else {False})
    assert all(_same_bits(a, w) for a, w in zip(fused, plain))


def test_inference_keeps_the_plain_attention():
    layer = nn.TransformerLayer(64, 4, 128, dropout=0.0, causal=True)
    layer.eval()
    x = ndl.Tensor(np.ones((4, 64, 64), np.float32), requires_grad=False)
    names = [s.op.name for s in ndl.jit(layer).lower(x).steps]
    assert "attention" in names and "attention_with_probs" not in names


def _ops_behind(tensor) -> list:
    """The ops of the graph behind ``tensor``."""
    seen, todo, found = set(), [tensor], []
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op is not None:
            found.append(node.op)
        todo.extend(node.inputs)
    return found


@pytest.mark.parametrize("learned", [False, True])
def test_backward_makes_the_mask_gradient_only_where_wanted(learned):
    q, k, v, _ = _inputs(2, 5, 2, 4)
    qt, kt, vt = (ndl.Tensor(a.copy()) for a in (q, k, v))
    mask = ndl.Tensor(np.triu(np.full((5, 5), -1e9, np.float32), 1), requires_grad=learned)
    out = ops.attention(qt, kt, vt, mask, heads=2, scale=0.5)
    (out * out).sum().backward(create_graph=True)
    grad_ops = [op for op in _ops_behind(qt.grad) if op.name == "attention_grad"]
    assert [op.mask_grad for op in grad_ops] == [learned]
    assert (mask.grad is not None) == learned


def test_a_session_train_op_takes_the_rewrites_and_equals_eager():
    """A declared graph with fully known shapes runs the same passes (Session and JIT share
    the compiler): its train op keeps the probabilities and runs the feed-forward's ReLU in
    the product, and trains the layer exactly as eager mode does."""
    from needle import static as st

    b, t, dim, heads = 4, 64, 64, 4
    batches = [np.random.default_rng(i).standard_normal((b, t, dim)).astype(np.float32)
               for i in range(3)]

    def layer():
        np.random.seed(0)
        return nn.TransformerLayer(dim, heads, 512, dropout=0.0, causal=True)

    eager = layer()
    opt = ndl.optim.Adam(eager.parameters(), lr=1e-3)
    for xb in batches:
        opt.reset_grad()
        out = eager(ndl.Tensor(xb, requires_grad=False))
        (ops.summation(out * out) / out.size).backward()
        opt.step()
    declared = layer()
    with st.Graph():
        x = st.placeholder((b, t, dim))
        out = declared(x)
        train = st.minimize(ndl.optim.Adam(declared.parameters(), lr=1e-3),
                            ops.summation(out * out) / float(b * t * dim))
        sess = st.Session()
        for xb in batches:
            sess.run(train, {x: xb})
    names = {s.op.name for runner in sess._runners.values() for s in runner.program.steps}
    assert {"attention_with_probs", "attention_grad_probs", "linear_relu"} <= names
    for a, w in zip(declared.parameters(), eager.parameters()):
        np.testing.assert_array_equal(a.numpy(), w.numpy())


def test_long_sequences_keep_recomputing_the_probabilities(monkeypatch):
    """Kept probabilities grow with T * S per layer: past MAX_PROBS_BYTES the backward
    recomputes them (the plain attention_grad)."""
    from needle.compiler import attention_probs_rewrite

    monkeypatch.setattr(attention_probs_rewrite, "MAX_PROBS_BYTES", 1 << 16)
    program, _ = _layer_step(True, monkeypatch)
    names = [s.op.name for s in program.steps]
    assert "attention_with_probs" not in names and "attention_grad" in names
