"""nn.MultiHeadAttention and nn.TransformerLayer against PyTorch with copied weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needle as ndl
import needle.nn as nn

ATOL, RTOL = 2e-5, 1e-4
B, T, D, HEADS = 2, 5, 8, 2


def _close(ours, theirs, atol=ATOL, rtol=RTOL) -> None:
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    np.testing.assert_allclose(ours.numpy(), theirs, atol=atol, rtol=rtol)


def _randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _torch_mha() -> torch.nn.MultiheadAttention:
    torch.manual_seed(0)
    tm = torch.nn.MultiheadAttention(D, HEADS, batch_first=True)
    with torch.no_grad():  # torch starts with zero biases: make them count
        tm.in_proj_bias.normal_()
        tm.out_proj.bias.normal_()
    return tm


def _copy_linear(ours, theirs) -> None:
    ours.weight.data = theirs.weight.detach().numpy().T.copy()
    ours.bias.data = theirs.bias.detach().numpy().reshape(1, -1).copy()


def _copy_mha(ours, theirs) -> None:
    ours.in_proj_weight.data = theirs.in_proj_weight.detach().numpy().T.copy()
    ours.in_proj_bias.data = theirs.in_proj_bias.detach().numpy().copy()
    _copy_linear(ours.out_proj, theirs.out_proj)


def _check_mha_grads(ours, theirs) -> None:
    _close(ours.in_proj_weight.grad, theirs.in_proj_weight.grad.numpy().T)
    _close(ours.in_proj_bias.grad, theirs.in_proj_bias.grad)
    _close(ours.out_proj.weight.grad, theirs.out_proj.weight.grad.numpy().T)
    _close(ours.out_proj.bias.grad, theirs.out_proj.bias.grad.numpy().reshape(1, -1))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_self_attention_matches_torch(causal, padded):
    rng = np.random.default_rng(0)
    tm = _torch_mha()
    mha = nn.MultiHeadAttention(D, HEADS, causal=causal)
    _copy_mha(mha, tm)
    x = _randn(rng, B, T, D)
    pad = np.zeros((B, T), dtype=bool)
    pad[1, -2:] = True  # the second sequence ends two steps early
    X, tx = ndl.Tensor(x), torch.tensor(x, requires_grad=True)
    out, weights = mha(X, key_padding_mask=pad if padded else None)
    causal_mask = torch.ones(T, T, dtype=torch.bool).triu(1) if causal else None
    tout, tweights = tm(tx, tx, tx, key_padding_mask=torch.tensor(pad) if padded else None,
                        attn_mask=causal_mask)
    assert out.shape == (B, T, D) and weights.shape == (B, T, T)
    _close(out, tout)
    _close(weights, tweights)
    if causal:
        assert np.all(np.triu(weights.numpy(), k=1) == 0)
    g = _randn(rng, B, T, D)
    (out * ndl.Tensor(g)).sum().backward()
    (tout * torch.tensor(g)).sum().backward()
    _close(X.grad, tx.grad)
    _check_mha_grads(mha, tm)


@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_matches_torch(causal):
    rng = np.random.default_rng(1)
    tm = _torch_mha()
    mha = nn.MultiHeadAttention(D, HEADS)
    _copy_mha(mha, tm)
    s = 7
    q, k, v = _randn(rng, B, T, D), _randn(rng, B, s, D), _randn(rng, B, s, D)
    Q, K, V = ndl.Tensor(q), ndl.Tensor(k), ndl.Tensor(v)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    mask = np.triu(np.ones((T, s), dtype=bool), k=1)  # top-left aligned, as is_causal
    out, weights = mha(Q, K, V, is_causal=causal, average_attn_weights=False)
    tout, tweights = tm(tq, tk, tv, attn_mask=torch.tensor(mask) if causal else None,
                        average_attn_weights=False)
    assert weights.shape == (B, HEADS, T, s)
    _close(out, tout)
    _close(weights, tweights)
    g = _randn(rng, B, T, D)
    (out * ndl.Tensor(g)).sum().backward()
    (tout * torch.tensor(g)).sum().backward()
    for ours, theirs in [(Q, tq), (K, tk), (V, tv)]:
        _close(ours.grad, theirs.grad)
    _check_mha_grads(mha, tm)


def test_float_attn_mask_is_added_to_the_logits():
    rng = np.random.default_rng(2)
    tm = _torch_mha()
    mha = nn.MultiHeadAttention(D, HEADS)
    _copy_mha(mha, tm)
    x, bias = _randn(rng, B, T, D), _randn(rng, T, T)
    out, _ = mha(ndl.Tensor(x), attn_mask=bias, need_weights=False)
    tx = torch.tensor(x)
    tout, _ = tm(tx, tx, tx, attn_mask=torch.tensor(bias), need_weights=False)
    _close(out, tout)


def test_attention_defaults_and_errors():
    mha = nn.MultiHeadAttention(D, HEADS)
    assert [name for name, _ in mha.named_parameters()] == [
        "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    assert mha.in_proj_weight.shape == (D, 3 * D)
    np.testing.assert_array_equal(mha.in_proj_bias.numpy(), 0)  # torch's zero biases
    out, weights = mha(ndl.Tensor(np.zeros((B, T, D), dtype=np.float32)), need_weights=False)
    assert out.shape == (B, T, D) and weights is None
    assert len(nn.MultiHeadAttention(D, HEADS, bias=False).parameters()) == 2
    with pytest.raises(ValueError, match="not divisible"):
        nn.MultiHeadAttention(6, 4)
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(ndl.Tensor(np.zeros((B, T, D), dtype=np.float32)),
            key_padding_mask=np.zeros((B, T + 1), dtype=bool))


def _layer_pair(causal: bool, dropout: float = 0.0):
    torch.manual_seed(1)
    tl = torch.nn.TransformerEncoderLayer(D, HEADS, 16, dropout=dropout, norm_first=True,
                                          batch_first=True, activation="relu")
    layer = nn.TransformerLayer(D, HEADS, 16, dropout=dropout, causal=causal)
    with torch.no_grad():  # move every parameter away from its (ones / zeros) default
        for p in (tl.norm1.weight, tl.norm1.bias, tl.norm2.weight, tl.norm2.bias,
                  tl.self_attn.in_proj_bias, tl.self_attn.out_proj.bias):
            p.normal_()
    _copy_mha(layer.self_attn, tl.self_attn)
    _copy_linear(layer.linear1, tl.linear1)
    _copy_linear(layer.linear2, tl.linear2)
    for ours, theirs in [(layer.norm1, tl.norm1), (layer.norm2, tl.norm2)]:
        ours.weight.data = theirs.weight.detach().numpy().copy()
        ours.bias.data = theirs.bias.detach().numpy().copy()
    return layer, tl


@pytest.mark.parametrize("causal", [False, True])
def test_transformer_layer_matches_torch(causal):
    rng = np.random.default_rng(3)
    layer, tl = _layer_pair(causal)
    x = _randn(rng, B, T, D)
    X, tx = ndl.Tensor(x), torch.tensor(x, requires_grad=True)
    out = layer(X)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(T) if causal else None
    tout = tl(tx, src_mask=mask, is_causal=causal)
    _close(out, tout)
    g = _randn(rng, B, T, D)
    (out * ndl.Tensor(g)).sum().backward()
    (tout * torch.tensor(g)).sum().backward()
    _close(X.grad, tx.grad)
    _check_mha_grads(layer.self_attn, tl.self_attn)
    for name in ("linear1", "linear2"):
        _close(getattr(layer, name).weight.grad, getattr(tl, name).weight.grad.numpy().T)
    for name in ("norm1", "norm2"):
        _close(getattr(layer, name).weight.grad, getattr(tl, name).weight.grad)
        _close(getattr(layer, name).bias.grad, getattr(tl, name).bias.grad)


def test_transformer_layer_dropout_only_in_training():
    rng = np.random.default_rng(4)
    layer, tl = _layer_pair(causal=False, dropout=0.5)
    x = _randn(rng, B, T, D)
    layer.eval()
    tl.eval()
    _close(layer(ndl.Tensor(x)), tl(torch.tensor(x)))  # eval: no dropout anywhere
    layer.train()
    np.random.seed(0)
    first = layer(ndl.Tensor(x)).numpy()
    second = layer(ndl.Tensor(x)).numpy()
    assert not np.allclose(first, second)


def test_transformer_layer_runs_on_a_declared_graph():
    st = pytest.importorskip("needle.static")
    np.random.seed(3)
    layer = nn.TransformerLayer(D, HEADS, 16, dropout=0.0, causal=True)
    x = np.random.randn(B, T, D).astype(np.float32)
    pad = np.zeros((B, T), dtype=bool)
    pad[0, -1] = True
    expected = layer(ndl.Tensor(x), key_padding_mask=pad).numpy()
    with st.Graph():
        X = st.placeholder((None, T, D))
        got = st.Session().run(layer(X, key_padding_mask=pad), feed_dict={X: x})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
