"""``conv_bias``: a convolution whose bias is added where the output is written.

The bias goes in where each path writes its output (the Winograd output transform; the im2col
product, as a kernel row times a column of ones), so the result must equal ``conv(a, b) + c``
(bit for bit on the Winograd path), agree with PyTorch's conv2d with a bias, and be what
nn.Conv, Caffe's Convolution and ONNX's Conv with a B input build.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needle as ndl
import needle.nn as nn
from needle import ops
from needle.backend import cpu_threads
from needle.kernels import conv as conv_kernels
from needle.kernels import winograd

needs_numba = pytest.mark.skipif(winograd._kernels() is None,
                                 reason="numba is not installed or NEEDLE_NUMBA=0")

# (N, H, W, C_in, C_out, stride, padding, path): Winograd with whole and border tiles; im2col
# NHWC split across threads; the NCHW im2col (few input channels, a large map)
CASES = [(2, 12, 12, 16, 16, 1, 1, "winograd"), (2, 13, 11, 16, 24, 1, 0, "winograd"),
         (8, 32, 32, 16, 16, 2, 1, "im2col"), (2, 24, 24, 3, 8, 1, 1, "nchw")]


def _problem(case, seed=0):
    n, h, w, c_in, c_out = case[:5]
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, h, w, c_in)).astype(np.float32),
            rng.standard_normal((3, 3, c_in, c_out)).astype(np.float32),
            rng.standard_normal(c_out).astype(np.float32))


def _torch_conv_bias(x, w, c, stride, padding):
    out = torch.nn.functional.conv2d(torch.tensor(x).permute(0, 3, 1, 2),
                                     torch.tensor(w).permute(3, 2, 0, 1), torch.tensor(c),
                                     stride=stride, padding=padding)
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("case", CASES, ids=[c[-1] + str(i) for i, c in enumerate(CASES)])
def test_equals_conv_plus_bias_bit_for_bit_and_torch(case, monkeypatch):
    monkeypatch.setattr(cpu_threads, "NUM_THREADS", 2)
    monkeypatch.setattr(conv_kernels, "SPLIT_MIN_MACS", 1)  # the split by images, too
    x, w, c = _problem(case)
    stride, padding = case[5], case[6]
    if case[-1] == "winograd" and winograd._kernels() is None:
        pytest.skip("numba is not installed or NEEDLE_NUMBA=0")
    fused = conv_kernels.conv2d(x, w, stride, padding, c)
    plain = conv_kernels.conv2d(x, w, stride, padding)
    if case[-1] == "winograd":  # the output transform adds c to each finished value
        np.testing.assert_array_equal(fused, plain + c)
    else:  # c is one more term of the product (a column of ones): rounding may differ
        assert np.abs(fused - (plain + c)).max() <= 1e-6 * np.abs(plain).max()
    ref = _torch_conv_bias(x, w, c, stride, padding)
    assert np.abs(fused - ref).max() <= 3e-5 * np.abs(ref).max()


@needs_numba
def test_the_winograd_path_adds_the_bias_in_its_output_transform(monkeypatch):
    seen = []
    real = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3",
                        lambda x, w, p, bias=None: seen.append(bias) or real(x, w, p, bias))
    x, w, c = _problem(CASES[0])
    ops.conv_bias(ndl.Tensor(x), ndl.Tensor(w), ndl.Tensor(c), padding=1).numpy()
    assert len(seen) == 1 and seen[0] is not None


def test_a_wider_bias_widens_the_result():
    x, w, c = _problem(CASES[3])
    y = ops.conv_bias(ndl.Tensor(x), ndl.Tensor(w), ndl.Tensor(c.astype(np.float64)),
                      padding=1)
    assert y.dtype == np.float64 and y.numpy().dtype == np.float64
    np.testing.assert_allclose(y.numpy(), _torch_conv_bias(x, w, c, 1, 1), rtol=1e-4,
                               atol=1e-4)


def test_a_bias_of_the_wrong_length_is_one_clear_error():
    x, w, _ = _problem(CASES[3])
    with pytest.raises(ValueError, match="conv_bias: bias"):
        ops.conv_bias(ndl.Tensor(x), ndl.Tensor(w), ndl.Tensor(np.zeros(3, np.float32)))


def test_nn_conv_builds_one_conv_bias_and_its_gradients_match_torch():
    conv = nn.Conv(16, 8, 3)
    x = np.random.default_rng(1).standard_normal((2, 16, 9, 9)).astype(np.float32)
    xt = ndl.Tensor(x, requires_grad=True)
    y = conv(xt)
    assert y.op.name == "permute" and y.inputs[0].op.name == "conv_bias"
    (y * y).sum().backward()
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(conv.weight.numpy().transpose(3, 2, 0, 1).copy(), requires_grad=True)
    tb = torch.tensor(conv.bias.numpy(), requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tw, tb, padding=1)
    (ty * ty).sum().backward()
    np.testing.assert_allclose(y.numpy(), ty.detach().numpy(), rtol=1e-4, atol=1e-4)
    for got, want in ((xt.grad, tx.grad), (conv.bias.grad, tb.grad),
                      (conv.weight.grad, tw.grad.permute(2, 3, 1, 0))):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-3,
                                   atol=1e-3 * float(want.abs().max()))


def test_caffe_convolution_uses_conv_bias():
    from needle.caffe.layers import Convolution

    layer = Convolution(num_output=4, kernel_size=3, pad=1, name="c")
    layer.setup([(2, 3, 6, 6)])
    x = np.random.default_rng(2).standard_normal((2, 3, 6, 6)).astype(np.float32)
    w = np.random.default_rng(3).standard_normal((3, 3, 3, 4)).astype(np.float32)
    b = np.arange(4, dtype=np.float32)
    (y,) = layer.compute([ndl.Tensor(x)], [ndl.Tensor(w), ndl.Tensor(b)])
    assert y.inputs[0].op.name == "conv_bias"
    ref = _torch_conv_bias(x.transpose(0, 2, 3, 1), w, b, 1, 1).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_onnx_round_trip_keeps_the_bias_in_the_conv(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from needle.onnx import export, import_model

    model = nn.Sequential(nn.Conv(3, 8, 3), nn.ReLU(), nn.Conv(8, 4, 3, stride=2))
    x = np.random.default_rng(4).standard_normal((2, 3, 10, 10)).astype(np.float32)
    path = tmp_path / "m.onnx"
    export(model, (ndl.Tensor(x),), str(path))
    graph = onnx.load(str(path)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 and all(len(n.input) == 3 for n in convs)
    assert not [n for n in graph.node if n.op_type == "Add"]
    want = model(ndl.Tensor(x)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    out = import_model(str(path))(ndl.Tensor(x))
    names, stack = [], [out]
    while stack:
        node = stack.pop()
        if node.op is not None:
            names.append(node.op.name)
            stack.extend(node.inputs)
    assert names.count("conv_bias") == 2 and "conv" not in names and "add" not in names
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4)


def test_saved_graphs_with_conv_plus_add_and_with_conv_bias_load_and_agree(tmp_path):
    """A graph in the form earlier versions saved (a 2-input conv, then an add) still loads
    and runs, and one with conv_bias round-trips; both give the same values."""
    import needle.static as st

    rng = np.random.default_rng(5)
    w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    feed = rng.standard_normal((2, 7, 7, 3)).astype(np.float32)
    results = []
    for form in ("conv+add", "conv_bias"):
        with st.Graph() as g:
            x = st.placeholder((None, 7, 7, 3), name="x")
            kw, kb = st.Variable(w, name="w"), st.Variable(b, name="b")
            y = (ops.conv(x, kw, padding=1) + kb if form == "conv+add"
                 else ops.conv_bias(x, kw, kb, padding=1))
        g.save(tmp_path / f"{form}.npz", names={"x": x, "y": y})
        loaded = st.load_graph(tmp_path / f"{form}.npz")
        got = st.Session(loaded).run(loaded.get("y"), {loaded.get("x"): feed})
        np.testing.assert_array_equal(got, st.Session(g).run(y, {x: feed}))
        results.append(got)
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_allclose(results[1], _torch_conv_bias(feed, w, b, 1, 1), rtol=1e-4,
                               atol=1e-4)
