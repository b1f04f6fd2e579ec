"""caffe.Net: specs (dicts, JSON, YAML), wiring checks, DAGs and in-place layers, the backward
plan, and agreement with the same model written as nn.Modules."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pytest

import needle as ndl
import needle.caffe as cf
from needle import nn


def mlp_resnet_module(dim, hidden, classes, blocks, drop):
    """The nn version of ``cf.mlp_resnet_spec`` (the needle course's MLPResNet)."""

    def block():
        inner = nn.Sequential(nn.Linear(hidden, hidden // 2), nn.BatchNorm1d(hidden // 2),
                              nn.ReLU(), nn.Dropout(drop), nn.Linear(hidden // 2, hidden),
                              nn.BatchNorm1d(hidden))
        return nn.Sequential(nn.Residual(inner), nn.ReLU())

    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), *[block() for _ in range(blocks)],
                         nn.Linear(hidden, classes))


def copy_module_weights(model, net):
    """Give the Net the module's parameter values; (Parameter, Blob) pairs in matching order."""
    blobs = [b for b in net.learnable_params if b.lr_mult != 0]
    params = model.parameters()
    assert len(blobs) == len(params)
    for param, blob in zip(params, blobs):
        blob.data[...] = param.numpy().reshape(blob.shape)
    return list(zip(params, blobs))


def _xy(n=20, dim=12, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, dim)).astype(np.float32), rng.integers(0, classes, n)


def _eager_loss_and_grads(model, X, y, seed):
    """Loss and parameter gradients of ``model`` in eager needle (same dropout draws)."""
    np.random.seed(seed)
    loss = nn.SoftmaxLoss()(model(ndl.Tensor(X)), ndl.Tensor(y))
    loss.backward()
    return loss.item()


# -- the MLP-ResNet as a Net equals the nn.Module ----------------------------------------------
def test_mlp_resnet_spec_matches_nn_module_loss_and_gradients():
    dim, hidden, classes = 12, 16, 5
    np.random.seed(0)
    model = mlp_resnet_module(dim, hidden, classes, blocks=2, drop=0.1)
    net = cf.Net(cf.mlp_resnet_spec(dim, hidden, classes, num_blocks=2, drop_prob=0.1))
    pairs = copy_module_weights(model, net)
    X, y = _xy(dim=dim, classes=classes)
    for step in range(2):  # the second step also exercises the accumulated BN statistics
        np.random.seed(10 + step)
        out = net.forward(data=X, label=y)
        net.clear_param_diffs()
        net.backward()
        for p in model.parameters():
            p.grad = None
        ref = _eager_loss_and_grads(model, X, y, seed=10 + step)
        assert out["loss"] == pytest.approx(ref, rel=1e-5, abs=1e-6)
        for param, blob in pairs:
            np.testing.assert_allclose(blob.diff, param.grad.numpy().reshape(blob.shape),
                                       rtol=1e-5, atol=1e-5)


def test_from_module_lowers_the_model_with_the_same_parameters():
    dim, hidden, classes = 12, 16, 5
    np.random.seed(1)
    model = mlp_resnet_module(dim, hidden, classes, blocks=2, drop=0.1)
    X, y = _xy(dim=dim, classes=classes, seed=2)
    net = cf.Net.from_module(model, X, loss="SoftmaxWithLoss")
    types = [layer.type for layer in net.layers]
    assert types.count("Eltwise") == 2 and types.count("BatchNorm") == 4
    assert types.count("Scale") == 4 and types[-1] == "SoftmaxWithLoss"
    np.random.seed(3)
    out = net.forward(data=X, label=y)
    net.backward()
    ref = _eager_loss_and_grads(model, X, y, seed=3)
    assert out["loss"] == pytest.approx(ref, rel=1e-5, abs=1e-6)
    blobs = [b for b in net.learnable_params if b.lr_mult != 0]
    params = model.parameters()
    assert len(blobs) == len(params)
    for param, blob in zip(params, blobs):
        np.testing.assert_allclose(blob.data, param.numpy().reshape(blob.shape))
        np.testing.assert_allclose(blob.diff, param.grad.numpy().reshape(blob.shape),
                                   rtol=1e-5, atol=1e-5)


def test_from_module_in_eval_mode_uses_the_running_statistics():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3),
                          nn.Softmax())
    X = np.random.default_rng(0).random((10, 4)).astype(np.float32)
    model(ndl.Tensor(X))  # one training pass fills the running statistics
    model.eval()
    net = cf.Net.from_module(model, X)
    assert net.phase == "test"
    out = net.forward(data=X)
    np.testing.assert_allclose(out[net.outputs[0]], model(ndl.Tensor(X)).numpy(), rtol=1e-5,
                               atol=1e-6)


def test_from_module_names_what_it_cannot_lower():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm1d(4))
    with pytest.raises(NotImplementedError, match="LayerNorm1d at 1"):
        cf.Net.from_module(model, np.zeros((2, 4), np.float32))


# -- in place ----------------------------------------------------------------------------------
def _small_spec(in_place: bool) -> list:
    relu_top = "ip1" if in_place else "relu1"
    return [
        {"name": "input", "type": "Input", "top": ["data", "label"], "shape": [[None, 6], [None]]},
        {"name": "ip1", "type": "InnerProduct", "bottom": "data", "top": "ip1", "num_output": 8},
        {"name": "relu1", "type": "ReLU", "bottom": "ip1", "top": relu_top},
        {"name": "ip2", "type": "InnerProduct", "bottom": relu_top, "top": "ip2",
         "num_output": 3},
        {"name": "loss", "type": "SoftmaxWithLoss", "bottom": ["ip2", "label"], "top": "loss"},
    ]


def test_in_place_relu_gives_the_same_gradients_as_out_of_place():
    X, y = _xy(n=10, dim=6, classes=3)
    nets = []
    for in_place in (True, False):
        np.random.seed(7)
        net = cf.Net(_small_spec(in_place), force_backward=True)
        out = net.forward(data=X, label=y)
        net.backward()
        nets.append((net, out["loss"]))
    (a, loss_a), (b, loss_b) = nets
    assert loss_a == loss_b
    for name in ("ip1", "ip2"):
        for blob_a, blob_b in zip(a.params[name], b.params[name]):
            np.testing.assert_array_equal(blob_a.diff, blob_b.diff)
    # the in-place blob holds the latest data (after ReLU) and the first value's diff
    np.testing.assert_array_equal(a.blobs["ip1"].data, b.blobs["relu1"].data)
    np.testing.assert_array_equal(a.blobs["ip1"].diff, b.blobs["ip1"].diff)
    np.testing.assert_array_equal(a.blobs["data"].diff, b.blobs["data"].diff)
    assert np.abs(a.blobs["data"].diff).sum() > 0


def test_force_backward_input_diff_matches_finite_differences():
    X, y = _xy(n=4, dim=6, classes=3)
    np.random.seed(0)
    net = cf.Net(_small_spec(True), dtype="float64", force_backward=True)
    net.forward(data=X, label=y)
    net.backward()
    analytic = net.blobs["data"].diff.copy()
    eps, i, j = 1e-6, 2, 3
    Xp, Xm = X.astype(np.float64), X.astype(np.float64)
    Xp = Xp.copy()
    Xp[i, j] += eps
    Xm = Xm.copy()
    Xm[i, j] -= eps
    numeric = (net.forward(data=Xp, label=y)["loss"] - net.forward(data=Xm, label=y)["loss"]
               ) / (2 * eps)
    assert analytic[i, j] == pytest.approx(numeric, rel=1e-5, abs=1e-8)


# -- specs: dicts, JSON, YAML ------------------------------------------------------------------
def test_json_text_and_caffe_style_nested_params():
    spec = {"name": "tiny", "input": ["data"], "input_shape": [{"dim": [-1, 4]}],
            "layer": [{"name": "ip", "type": "InnerProduct", "bottom": "data", "top": "ip",
                       "inner_product_param": {"num_output": 2},
                       "param": [{"lr_mult": 1}, {"lr_mult": 2, "decay_mult": 0}]},
                      {"name": "out", "type": "TanH", "bottom": "ip", "top": "out"}]}
    net = cf.Net(json.dumps(spec))
    assert net.inputs == ["data"] and net.outputs == ["out"]
    weight, bias = net.params["ip"]
    assert (weight.lr_mult, weight.decay_mult, bias.lr_mult, bias.decay_mult) == (1, 1, 2, 0)
    out = net.forward(data=np.ones((3, 4), np.float32))["out"]
    np.testing.assert_allclose(out, np.tanh(np.ones((3, 4)) @ weight.data + bias.data),
                               rtol=1e-6)


YAML_SPEC = """
layer:
  - {name: input, type: Input, top: [data, label], shape: [[null, 4], [null]]}
  - {name: ip, type: InnerProduct, bottom: data, top: ip, num_output: 3}
  - {name: loss, type: SoftmaxWithLoss, bottom: [ip, label], top: loss}
"""


def test_yaml_text_when_pyyaml_is_installed():
    pytest.importorskip("yaml")
    net = cf.Net(YAML_SPEC)
    assert [layer.type for layer in net.layers] == ["InnerProduct", "SoftmaxWithLoss"]
    assert net.forward(data=np.ones((2, 4)), label=np.array([0, 2]))["loss"] > 0


def test_yaml_without_pyyaml_says_so(monkeypatch):
    real_import = builtins.__import__

    def no_yaml(name, *args, **kwargs):
        if name == "yaml":
            raise ImportError("No module named 'yaml'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_yaml)
    with pytest.raises(cf.NetSpecError, match="not valid JSON.*PyYAML.*not installed"):
        cf.Net(YAML_SPEC)


# -- wiring checks -----------------------------------------------------------------------------
def test_wiring_errors_name_the_layer():
    base = _small_spec(False)
    bad_bottom = [dict(e) for e in base]
    bad_bottom[3]["bottom"] = "relu_1"
    with pytest.raises(cf.NetSpecError, match=r"layer 'ip2' \(InnerProduct\): unknown bottom "
                                              r"blob 'relu_1'.*known blobs: .*relu1"):
        cf.Net(bad_bottom)
    bad_count = [dict(e) for e in base]
    bad_count[4]["bottom"] = ["ip2"]
    with pytest.raises(cf.NetSpecError, match=r"layer 'loss' \(SoftmaxWithLoss\): takes "
                                              r"exactly 2 bottom"):
        cf.Net(bad_count)
    twice = [dict(e) for e in base]
    twice[3]["top"] = "ip1"
    with pytest.raises(cf.NetSpecError, match="layer 'ip2'.*top 'ip1' is already produced by "
                                              "layer 'ip1'"):
        cf.Net(twice)
    dup = [*base, dict(base[2], top="x")]
    with pytest.raises(cf.NetSpecError, match="layer 'relu1'.*name is used twice"):
        cf.Net(dup)
    with pytest.raises(cf.NetSpecError, match="layer 'ip1'.*unknown layer type"):
        cf.Net([dict(base[0]), dict(base[1], type="InnerProdcut")])
    with pytest.raises(cf.NetSpecError, match="layer 'ip1' \\(InnerProduct\\).*num_outputs"):
        cf.Net([dict(base[0]), {"name": "ip1", "type": "InnerProduct", "bottom": "data",
                                "top": "ip1", "num_outputs": 3}])


def test_shape_errors_at_run_time_name_the_layer():
    net = cf.Net(_small_spec(False))
    with pytest.raises(ValueError, match="input 'data' has shape"):
        net.forward(data=np.ones((2, 5), np.float32), label=np.zeros(2, np.int64))
    spec = _small_spec(False)
    spec[0] = {"name": "input", "type": "Input", "top": ["data", "label"]}  # shapes unknown
    loose = cf.Net(spec)
    loose.forward(data=np.ones((2, 6), np.float32), label=np.zeros(2, np.int64))
    with pytest.raises(cf.LayerError, match="layer 'ip1' \\(InnerProduct\\)"):
        loose.forward(data=np.ones((2, 7), np.float32), label=np.zeros(2, np.int64))


# -- the backward plan -------------------------------------------------------------------------
def test_backward_skips_layers_no_loss_needs_and_data_inputs():
    spec = [
        {"name": "input", "type": "Input", "top": ["data", "label"], "shape": [[None, 4], [None]]},
        {"name": "scale_in", "type": "Op", "op": "mul_scalar", "scalar": 2.0, "bottom": "data",
         "top": "x2"},
        {"name": "ip", "type": "InnerProduct", "bottom": "x2", "top": "ip", "num_output": 3},
        {"name": "side", "type": "InnerProduct", "bottom": "ip", "top": "side",
         "num_output": 2},
        {"name": "frozen", "type": "InnerProduct", "bottom": "ip", "top": "frozen",
         "num_output": 3, "lr_mult": 0},
        {"name": "loss", "type": "SoftmaxWithLoss", "bottom": ["frozen", "label"],
         "top": "loss"},
        {"name": "acc", "type": "Accuracy", "bottom": ["frozen", "label"], "top": "acc"},
    ]
    net = cf.Net(spec)
    plan = {layer.name: layer.needs_backward for layer in net.layers}
    # nothing trainable behind the data scaling; 'side' and 'acc' feed no loss
    assert plan == {"scale_in": False, "ip": True, "side": False, "frozen": True,
                    "loss": True, "acc": False}
    assert net.layer_dict["frozen"].bottom_needs_diff == [True]
    assert net.layer_dict["ip"].bottom_needs_diff == [False]
    assert net.layer_dict["loss"].bottom_needs_diff == [True, False]
    out = net.forward(data=np.ones((4, 4)), label=np.array([0, 1, 2, 0]))
    assert set(out) == {"side", "acc", "loss"}
    net.backward()
    assert np.abs(net.params["ip"][0].diff).sum() > 0
    assert not np.any(net.params["side"][0].diff)
    assert not np.any(net.params["frozen"][0].diff)  # lr_mult 0: no diff
    assert not np.any(net.blobs["data"].diff)


def test_loss_weight_scales_the_loss_and_its_gradients():
    X, y = _xy(n=6, dim=6, classes=3)
    results = []
    for weight in (1.0, 0.5):
        spec = _small_spec(False)
        spec[-1] = dict(spec[-1], loss_weight=weight)
        np.random.seed(4)
        net = cf.Net(spec)
        out = net.forward(data=X, label=y)
        net.backward()
        results.append((out["loss"], net.params["ip1"][0].diff.copy()))
    assert results[1][0] == pytest.approx(0.5 * results[0][0])
    np.testing.assert_allclose(results[1][1], 0.5 * results[0][1], rtol=1e-6)


def test_forward_from_to_reruns_part_of_the_net():
    X, y = _xy(n=6, dim=6, classes=3)
    np.random.seed(4)
    net = cf.Net(_small_spec(False))
    full = net.forward(data=X, label=y)
    tail = net.forward_from_to("ip2", "loss")
    assert set(tail) == {"ip2", "loss"}
    assert tail["loss"] == pytest.approx(full["loss"])
    net.blobs["relu1"].data = np.zeros((6, 8), np.float32)  # only later layers see it
    changed = net.forward_from_to(2, 3)
    bias = net.params["ip2"][1].data
    np.testing.assert_allclose(changed["ip2"], np.broadcast_to(bias, (6, 3)))
    assert np.abs(net.blobs["ip1"].data).sum() > 0
    with pytest.raises(ValueError, match="comes after"):
        net.forward_from_to("loss", "ip1")


def test_residual_dag_with_split_and_concat():
    """A blob read by two layers gets the sum of both diffs, with or without a Split."""
    X, y = _xy(n=5, dim=4, classes=3)
    for with_split in (False, True):
        spec = [
            {"name": "input", "type": "Input", "top": ["data", "label"],
             "shape": [[None, 4], [None]]},
            {"name": "ip", "type": "InnerProduct", "bottom": "data", "top": "h",
             "num_output": 4},
        ]
        a, b = "h", "h"
        if with_split:
            spec.append({"name": "split", "type": "Split", "bottom": "h", "top": ["h1", "h2"]})
            a, b = "h1", "h2"
        spec += [
            {"name": "t", "type": "TanH", "bottom": a, "top": "t"},
            {"name": "cat", "type": "Concat", "bottom": ["t", b], "top": "cat"},
            {"name": "out", "type": "InnerProduct", "bottom": "cat", "top": "out",
             "num_output": 3},
            {"name": "loss", "type": "SoftmaxWithLoss", "bottom": ["out", "label"],
             "top": "loss"},
        ]
        np.random.seed(5)
        net = cf.Net(spec)
        net.forward(data=X, label=y)
        net.backward()
        if not with_split:
            first = net.params["ip"][0].diff.copy()
        else:
            np.testing.assert_allclose(net.params["ip"][0].diff, first, rtol=1e-6)
    # against eager autodiff of the same computation
    W, c = (ndl.Tensor(b.data) for b in net.params["ip"])
    V, d = (ndl.Tensor(b.data) for b in net.params["out"])
    h = ndl.Tensor(X) @ W + c
    logits = ndl.ops.matmul(ndl.ops.reshape(ndl.stack([ndl.tanh(h), h], 1), (5, 8)), V) + d
    nn.SoftmaxLoss()(logits, ndl.Tensor(y)).backward()
    np.testing.assert_allclose(first, W.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_state_dict_roundtrip_and_checkpoint(tmp_path):
    np.random.seed(0)
    net = cf.Net(_small_spec(False))
    path = tmp_path / "net.npz"
    ndl.save(path, net=net)
    np.random.seed(1)
    other = cf.Net(_small_spec(False))
    assert not np.allclose(other.params["ip1"][0].data, net.params["ip1"][0].data)
    other.load_state_dict(ndl.load(path)["net"])
    for name in ("ip1", "ip2"):
        for x, z in zip(net.params[name], other.params[name]):
            np.testing.assert_array_equal(x.data, z.data)
    with pytest.raises(KeyError, match="missing keys"):
        other.load_state_dict({"ip1.0": net.params["ip1"][0].data})
