"""The fused ``attention`` and ``layer_norm`` ops: against PyTorch, in every front-end (eager,
Session, JIT, Caffe OpLayer), on strided inputs, and the numba kernels against their NumPy
fallbacks. (tests/op_table.py's rows add finite differences, first and second order.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import needle as ndl
import needle.caffe as cf
import needle.static as st
from needle import nn, ops
from needle.kernels import attention as attention_kernel
from needle.kernels import layernorm as layernorm_kernel


def _torch_attention(q, k, v, mask, heads, scale):
    def split(x):
        return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    logits = scale * split(q) @ split(k).transpose(-1, -2)
    if mask is not None:
        logits = logits + mask
    out = torch.softmax(logits, -1) @ split(v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], v.shape[2])


def _causal(t: int, s: int) -> np.ndarray:
    return np.triu(np.full((t, s), -1e9, np.float32), k=1)


MASKS = {
    "none": None,
    "causal": lambda rng, b, h, t, s: _causal(t, s),
    "padding": lambda rng, b, h, t, s: np.where(rng.random((b, 1, 1, s)) < 0.3, -1e9,
                                                0.0).astype(np.float32),
    "per_head": lambda rng, b, h, t, s: rng.standard_normal((b, h, t, s)).astype(np.float32),
}


@pytest.mark.parametrize("numba_on", [True, False], ids=["numba", "numpy"])
@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_attention_forward_and_gradients_match_torch(mask_kind, numba_on, monkeypatch):
    if not numba_on:
        monkeypatch.setattr(attention_kernel.LOOPS, "failed", ["off"])
    rng = np.random.default_rng(0)
    b, t, s, h, dk, dv = 3, 7, 9, 2, 4, 3
    q, k = (rng.standard_normal((b, n, h * dk)).astype(np.float32) for n in (t, s))
    v = rng.standard_normal((b, s, h * dv)).astype(np.float32)
    g = rng.standard_normal((b, t, h * dv)).astype(np.float32)
    make = MASKS[mask_kind]
    mask = None if make is None else make(rng, b, h, t, s)
    scale = 1 / math.sqrt(dk)
    tensors = [ndl.Tensor(a) for a in (q, k, v)]
    masks = () if mask is None else (ndl.Tensor(mask, requires_grad=False),)
    out = ops.attention(*tensors, *masks, heads=h, scale=scale)
    (out * ndl.Tensor(g)).sum().backward()
    refs = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    ref = _torch_attention(*refs, None if mask is None else torch.tensor(mask), h, scale)
    (ref * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(tensors, refs):
        np.testing.assert_allclose(mine.grad.numpy(), theirs.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_attention_on_strided_views_of_a_packed_projection():
    # q, k, v as the module makes them: views of one (B, T, 3, D) array
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    packed = ndl.Tensor(qkv)
    q, k, v = ops.split(packed, 2)
    out = ops.attention(q, k, v, heads=4, scale=0.3)
    out.sum().backward()
    ref_in = torch.tensor(qkv, requires_grad=True)
    ref = _torch_attention(ref_in[:, :, 0], ref_in[:, :, 1], ref_in[:, :, 2], None, 4, 0.3)
    ref.sum().backward()
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(packed.grad.numpy(), ref_in.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_attention_in_a_session_the_jit_and_a_caffe_layer():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 4, 6)).astype(np.float64) for _ in range(3))
    mask = _causal(4, 4).astype(np.float64)
    eager = ops.attention(*(ndl.Tensor(a) for a in (q, k, v, mask)), heads=3, scale=0.5)
    with st.Graph():
        ph = [st.placeholder((None, 4, 6), dtype="float64") for _ in range(3)]
        node = ops.attention(*ph, ndl.Tensor(mask, requires_grad=False), heads=3, scale=0.5)
        graph_out = st.Session().run(node, dict(zip(ph, (q, k, v))))
    jitted = ndl.jit(lambda a, b, c: ops.attention(a, b, c, ndl.Tensor(mask), heads=3,
                                                   scale=0.5))
    jit_out = jitted(*(ndl.Tensor(a) for a in (q, k, v))).numpy()
    np.testing.assert_allclose(graph_out, eager.numpy(), rtol=1e-12)
    np.testing.assert_allclose(jit_out, eager.numpy(), rtol=1e-12)
    layer = cf.OpLayer("attention", heads=3, scale=0.5)
    report = cf.check_gradient(layer, bottoms=[q, k, v, rng.standard_normal((4, 4))])
    assert report.max_error < 1e-6, str(report)


def test_second_order_with_one_tensor_as_q_k_and_v():
    # x passed three times: each position's adjoint must be counted once, at both orders
    rng = np.random.default_rng(6)
    x_np = rng.standard_normal((2, 4, 6))
    mask = rng.standard_normal((4, 4))
    x = ndl.Tensor(x_np)
    out = ops.attention(x, x, x, ndl.Tensor(mask, requires_grad=False), heads=3, scale=0.4)
    (out * out).sum().backward()  # builds the gradient's graph (needle's default)
    grad = x.grad
    (grad * grad).sum().backward()  # sets x.grad to the second-order result
    tx = torch.tensor(x_np, requires_grad=True)
    ref = _torch_attention(tx, tx, tx, torch.tensor(mask), 3, 0.4)
    (tgrad,) = torch.autograd.grad((ref * ref).sum(), [tx], create_graph=True)
    (tgrad * tgrad).sum().backward()
    np.testing.assert_allclose(grad.numpy(), tgrad.detach().numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy(), rtol=1e-9, atol=1e-10)


def test_attention_shape_errors_name_the_op():
    x = ndl.Tensor(np.ones((2, 3, 6), np.float32))
    with pytest.raises(ValueError, match="attention: widths must divide into 4 heads"):
        ops.attention(x, x, x, heads=4)
    with pytest.raises(ValueError, match="attention: mask .* does not broadcast"):
        ops.attention(x, x, x, ndl.Tensor(np.ones((2, 2), np.float32)), heads=2)
    with pytest.raises(ValueError, match="attention: q, k and v must be"):
        ops.attention(ndl.Tensor(np.ones((3, 6))), x, x, heads=2)


@pytest.mark.parametrize("causal", [False, True])
def test_module_fused_path_equals_the_composite_path(causal):
    # need_weights=True runs the composite graph (it returns the weights); False the op
    np.random.seed(3)
    layer = nn.MultiHeadAttention(8, 2, causal=causal)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    pad = rng.random((2, 5)) < 0.3
    pad[:, 0] = False
    outs, grads = [], []
    for need_weights in (True, False):
        xt = ndl.Tensor(x)
        out, _ = layer(xt, key_padding_mask=pad, need_weights=need_weights)
        (out * out).sum().backward()
        outs.append(out.numpy())
        grads.append([xt.grad.numpy(), layer.in_proj_weight.grad.numpy()])
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for fused, composite in zip(grads[1], grads[0]):
        np.testing.assert_allclose(fused, composite, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("numba_on", [True, False], ids=["numba", "numpy"])
def test_layer_norm_matches_torch_on_strided_input(numba_on, monkeypatch):
    if not numba_on:
        monkeypatch.setattr(layernorm_kernel.LOOPS, "failed", ["off"])
    rng = np.random.default_rng(4)
    base = rng.standard_normal((6, 3, 16)).astype(np.float32) * 3 + 1
    w, b = (rng.standard_normal(16).astype(np.float32) for _ in range(2))
    g = rng.standard_normal((3, 6, 16)).astype(np.float32)
    xb = ndl.Tensor(base)
    x = ops.permute(xb, (1, 0, 2))  # a non-contiguous input
    wt, bt = ndl.Tensor(w), ndl.Tensor(b)
    y = ops.layer_norm(x, wt, bt, eps=1e-5)
    (y * ndl.Tensor(g)).sum().backward()
    tb = torch.tensor(base, requires_grad=True)
    tw, tbias = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    ref = torch.nn.functional.layer_norm(tb.permute(1, 0, 2), (16,), tw, tbias, 1e-5)
    (ref * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(y.numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    for mine, theirs in ((xb, tb), (wt, tw), (bt, tbias)):
        np.testing.assert_allclose(mine.grad.numpy(), theirs.grad.numpy(), rtol=1e-4,
                                   atol=1e-4)


def test_layer_norm_numba_and_numpy_paths_agree_in_float64():
    if layernorm_kernel.LOOPS.module() is None:
        pytest.skip("numba (the fast extra) is not installed")
    rng = np.random.default_rng(5)
    x, g = rng.standard_normal((2, 50, 32)), rng.standard_normal((2, 50, 32))
    w, b = rng.standard_normal(32), rng.standard_normal(32)
    fast = [layernorm_kernel.layer_norm(x, w, b, 1e-5),
            *layernorm_kernel.layer_norm_grad(g, x, w, 1e-5)]
    layernorm_kernel.LOOPS.failed.append("off")
    try:
        plain = [layernorm_kernel.layer_norm(x, w, b, 1e-5),
                 *layernorm_kernel.layer_norm_grad(g, x, w, 1e-5)]
    finally:
        layernorm_kernel.LOOPS.failed.remove("off")
    for a, c in zip(fast, plain):
        np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-12)


def test_layer_norm_shape_errors_name_the_op():
    x = ndl.Tensor(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"layer_norm: weight must have shape \(4,\)"):
        ops.layer_norm(x, ndl.Tensor(np.ones(3, np.float32)), ndl.Tensor(np.ones(4, np.float32)))


@pytest.mark.parametrize("opset", [13, 17])
def test_onnx_export_of_the_fused_layer_runs_in_onnxruntime(opset):
    ort = pytest.importorskip("onnxruntime")
    nox = pytest.importorskip("needle.onnx")
    np.random.seed(7)
    layer = nn.TransformerLayer(8, 2, 16, causal=True)
    layer.eval()
    x = np.random.default_rng(7).standard_normal((3, 5, 8)).astype(np.float32)
    proto = nox.export(layer, [x[:2]], None, opset=opset)  # run at another batch size
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, layer(ndl.Tensor(x)).numpy(), rtol=1e-5, atol=1e-5)
