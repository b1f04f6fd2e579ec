"""Caffe Nets as needle programs: ``ndl.export(net, ...)`` writes a Net's inference part
(test phase, losses and accuracies dropped) as a program; loaded with ``ndl.load_program``,
it computes bit for bit what ``net.forward`` computes in the test phase."""

from __future__ import annotations

import numpy as np
import pytest

import needle as ndl
import needle.caffe as cf
from needle.caffe.inference import NetExportError


def _trained_mlp_resnet() -> tuple[cf.Net, np.ndarray, np.ndarray]:
    """A few solver steps, so BatchNorm's statistics and the weights are not the fillers'."""
    np.random.seed(0)
    net = cf.Net(cf.mlp_resnet_spec(64, 32, accuracy=True))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 64)).astype(np.float32)
    y = rng.integers(0, 10, 100)
    solver = cf.SGDSolver(net, base_lr=0.05, momentum=0.9)
    solver.step(5, feed=lambda it: {"data": x[it * 20:(it + 1) * 20],
                                    "label": y[it * 20:(it + 1) * 20]})
    return net, x, y


def _cnn_net() -> cf.Net:
    """Convolution, both poolings, global pooling, Concat, Eltwise MAX / PROD, an Op layer,
    Flatten, Softmax: the vision layers a deploy net uses."""
    np.random.seed(1)
    spec = [
        {"name": "input", "type": "Input", "top": ["data", "label"],
         "shape": [[None, 2, 10, 10], [None]]},
        {"name": "conv1", "type": "Convolution", "bottom": "data", "top": "conv1",
         "num_output": 4, "kernel_size": 3, "pad": 1},
        {"name": "bn1", "type": "BatchNorm", "bottom": "conv1", "top": "conv1"},
        {"name": "relu1", "type": "ReLU", "bottom": "conv1", "top": "conv1",
         "negative_slope": 0.1},
        {"name": "max", "type": "Pooling", "bottom": "conv1", "top": "max", "pool": "MAX",
         "kernel_size": 2, "stride": 2},
        {"name": "ave", "type": "Pooling", "bottom": "conv1", "top": "ave", "pool": "AVE",
         "kernel_size": 2, "stride": 2},
        {"name": "both", "type": "Eltwise", "bottom": ["max", "ave"], "top": "both",
         "operation": "MAX"},
        {"name": "prod", "type": "Eltwise", "bottom": ["max", "ave"], "top": "prod",
         "operation": "PROD"},
        {"name": "cat", "type": "Concat", "bottom": ["both", "prod"], "top": "cat"},
        {"name": "tanh", "type": "Op", "op": "tanh", "bottom": "cat", "top": "cat"},
        {"name": "conv2", "type": "Convolution", "bottom": "cat", "top": "conv2",
         "num_output": 6, "kernel_size": 3, "stride": 2},
        {"name": "gmax", "type": "Pooling", "bottom": "conv2", "top": "gmax",
         "global_pooling": True},
        {"name": "flat", "type": "Flatten", "bottom": "gmax", "top": "flat"},
        {"name": "drop", "type": "Dropout", "bottom": "flat", "top": "flat"},
        {"name": "fc", "type": "InnerProduct", "bottom": "flat", "top": "scores",
         "num_output": 5},
        {"name": "prob", "type": "Softmax", "bottom": "scores", "top": "prob"},
        {"name": "loss", "type": "SoftmaxWithLoss", "bottom": ["scores", "label"],
         "top": "loss"},
    ]
    net = cf.Net(spec)
    rng = np.random.default_rng(1)
    # one training forward: BatchNorm accumulates statistics (scale_factor becomes 1)
    net.forward(data=rng.standard_normal((8, 2, 10, 10)).astype(np.float32),
                label=rng.integers(0, 5, 8))
    return net


def test_mlp_resnet_net_round_trips_bit_identically(tmp_path):
    net, x, y = _trained_mlp_resnet()
    prog = ndl.export(net, x[:8])  # dynamic batch: any batch size later
    assert prog.input_names == ["data"]
    assert prog.spec["training"] is False
    path = tmp_path / "mlp_resnet.npz"
    prog.save(path)
    loaded = ndl.load_program(path)
    assert net.phase == "train"  # exporting ran the test phase and left the Net as it was
    net.phase = "test"
    for n in (1, 13):
        net.forward(data=x[:n], label=y[:n])
        out = loaded(x[:n]).numpy()
        assert out.shape == (n, 10)
        assert np.array_equal(out, net.blobs["logits"].data)
    # under the JIT too
    assert np.array_equal(ndl.jit(loaded)(ndl.Tensor(x[:13])).numpy(),
                          net.blobs["logits"].data)


def test_cnn_net_round_trips_with_two_outputs_and_no_example(tmp_path):
    net = _cnn_net()
    # no example inputs: zeros of the spec's declared shapes stand in
    prog = ndl.export(net.inference_function(outputs=["scores", "prob"]))
    path = tmp_path / "cnn.npz"
    prog.save(path)
    loaded = ndl.load_program(path)
    net.phase = "test"
    x = np.random.default_rng(2).standard_normal((5, 2, 10, 10)).astype(np.float32)
    net.forward(data=x, label=np.zeros(5))
    scores, prob = loaded(x)
    assert np.array_equal(scores.numpy(), net.blobs["scores"].data)
    assert np.array_equal(prob.numpy(), net.blobs["prob"].data)
    # by default the outputs are the tops no kept layer reads: the loss's scores feed Softmax
    assert net.inference_function().output_names == ["prob"]


def test_default_outputs_drop_losses_accuracy_and_labels():
    net, _, _ = _trained_mlp_resnet()
    fn = net.inference_function()
    assert fn.input_names == ["data"] and fn.output_names == ["logits"]
    assert "loss" not in [layer.name for layer in (net.layers[i] for i in fn.layer_indices)]
    # an inner blob as the output keeps only the layers before it
    inner = net.inference_function(outputs="fc0")
    assert [net.layers[i].name for i in inner.layer_indices] == ["fc0", "relu0"]


def test_the_inference_function_runs_in_the_test_phase_whatever_the_net_phase():
    net = _cnn_net()
    assert net.phase == "train"
    fn = net.inference_function("flat")
    x = np.random.default_rng(3).standard_normal((4, 2, 10, 10)).astype(np.float32)
    first, second = fn(x).numpy(), fn(x).numpy()
    assert np.array_equal(first, second)  # no dropout mask drawn
    net.phase = "test"
    net.forward(data=x, label=np.zeros(4))
    assert np.array_equal(first, net.blobs["flat"].data)


class _NumpyDouble(cf.Layer):
    """A classic layer on NumPy arrays: its forward is not made of ops."""

    def reshape(self, bottom_shapes):
        return [bottom_shapes[0]]

    def forward(self, bottom):
        return [2 * bottom[0]]

    def backward(self, top_diff, propagate_down):
        return [2 * top_diff[0]]


def test_a_numpy_layer_on_the_path_is_refused_by_name():
    spec = [{"name": "input", "type": "Input", "top": "data", "shape": [None, 3]},
            {"name": "double", "type": _NumpyDouble, "bottom": "data", "top": "y"},
            {"name": "fc", "type": "InnerProduct", "bottom": "y", "top": "z", "num_output": 2}]
    net = cf.Net(spec)
    with pytest.raises(NetExportError, match=r"layer 'double' \(_NumpyDouble\)"):
        ndl.export(net, np.ones((2, 3), np.float32))
    # an output must be a blob some layer makes
    with pytest.raises(NetExportError, match="not blobs a layer"):
        net.inference_function(outputs="nothing")


def test_a_net_without_declared_shapes_needs_examples_or_a_forward():
    spec = [{"name": "input", "type": "Input", "top": "data"},
            {"name": "fc", "type": "InnerProduct", "bottom": "data", "top": "z",
             "num_output": 2}]
    net = cf.Net(spec)
    with pytest.raises(NetExportError, match="not set up"):
        ndl.export(net, np.ones((2, 3), np.float32))
    x = np.random.default_rng(4).standard_normal((3, 3))  # float64: cast like forward does
    out = net.forward(data=x)["z"]
    prog = ndl.export(net, x)
    assert prog.spec["inputs"][0]["dtype"] == "float32"
    assert np.array_equal(prog(x.astype(np.float32)).numpy(), out)
