"""needle.onnx.export: onnxruntime runs the exported models as needle does, at other batch sizes.

Every model is exported at one batch size and run by onnxruntime at another, and compared with
needle's eager output (max abs difference relative to the output's scale <= 1e-5, float32).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import needle as ndl
import needle.nn as nn
from needle import ops
from needle.apps.models import MLPResNet, ResidualCNN, build_model

from .models import LSTMLanguageModel, TransformerLanguageModel

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
nox = pytest.importorskip("needle.onnx")

TOL = 1e-5


def _randomize_state(model: nn.Module, rng: np.random.Generator) -> None:
    """Non-trivial BatchNorm statistics, so eval-mode normalization is tested for real."""
    for name, buf in model.named_buffers():
        if name.endswith("running_var"):
            buf.data = rng.uniform(0.5, 1.5, buf.shape).astype(buf.dtype)
        elif name.endswith("running_mean"):
            buf.data = (0.2 * rng.standard_normal(buf.shape)).astype(buf.dtype)


def _ort_run(model, feeds: dict) -> list:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    assert ref.shape == got.shape, (ref.shape, got.shape)
    return float(np.abs(ref - got).max() / max(np.abs(ref).max(), 1e-30))


def _check(model: nn.Module, example: np.ndarray, other: np.ndarray, batch_axis: int = 0,
           opset: int | None = None, tmp_path=None):
    """Export at ``example``'s batch size, run onnxruntime at ``other``'s, compare."""
    model.eval()
    path = None if tmp_path is None else tmp_path / "model.onnx"
    proto = nox.export(model, [ndl.Tensor(example)], path, batch_axis=batch_axis, opset=opset)
    onnx.checker.check_model(proto, full_check=True)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[batch_axis].dim_param == "batch"
    assert other.shape[batch_axis] != example.shape[batch_axis]
    for x in (other, example):
        ref = model(ndl.Tensor(x)).numpy()
        (got,) = _ort_run(proto, {"input": x})
        assert _rel_err(ref, got) <= TOL
    return proto


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv(4, 6, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Dropout(0.3),
        nn.Linear(6, 10))


def test_mlp_resnet_matches_onnxruntime_at_another_batch_size(tmp_path):
    rng = np.random.default_rng(0)
    np.random.seed(0)
    model = MLPResNet(48, hidden=16, num_blocks=2)
    _randomize_state(model, rng)
    x = rng.random((4, 6, 8)).astype(np.float32)  # Flatten inside: (B, 6, 8) -> (B, 48)
    _check(model, x, rng.random((7, 6, 8)).astype(np.float32), tmp_path=tmp_path)
    loaded = onnx.load(str(tmp_path / "model.onnx"))
    assert loaded.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.training is False  # _check put it in eval mode; export restores modes


def test_cnn_from_apps_models_matches_onnxruntime():
    """The "cnn" model of the command line (ResidualCNN, NHWC input) in eval mode."""
    rng = np.random.default_rng(1)
    np.random.seed(1)
    model = build_model("cnn", (8, 8, 1), 10)
    assert isinstance(model, ResidualCNN)
    _randomize_state(model, rng)
    proto = _check(model, rng.random((2, 8, 8, 1)).astype(np.float32),
                   rng.random((5, 8, 8, 1)).astype(np.float32))
    # nn.Conv's NHWC <-> NCHW permutes cancel against the Conv's own: one Transpose is left,
    # the model's NHWC input going to NCHW
    kinds = [n.op_type for n in proto.graph.node]
    assert kinds.count("Conv") == 4 and kinds.count("Transpose") == 1


def test_residual_cnn_with_width_and_opset_18():
    rng = np.random.default_rng(2)
    np.random.seed(2)
    model = ResidualCNN(3, num_classes=4, width=4)
    _randomize_state(model, rng)
    _check(model, rng.random((3, 6, 6, 3)).astype(np.float32),
           rng.random((2, 6, 6, 3)).astype(np.float32), opset=18)


def test_plain_cnn_exports_as_nchw_convs_with_bias():
    """Conv+bias becomes one Conv node with B; no layout Transposes remain."""
    rng = np.random.default_rng(3)
    np.random.seed(3)
    model = _small_cnn()
    _randomize_state(model, rng)
    proto = _check(model, rng.random((3, 1, 12, 12)).astype(np.float32),
                   rng.random((6, 1, 12, 12)).astype(np.float32))
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 and all(len(n.input) == 3 for n in convs)
    assert not any(n.op_type == "Transpose" for n in proto.graph.node)
    weights = {t.name: t for t in proto.graph.initializer}
    assert list(weights["modules.0.weight"].dims) == [4, 1, 3, 3]  # OIHW, ONNX's layout


def test_lstm_language_model_with_batch_on_axis_1():
    rng = np.random.default_rng(4)
    np.random.seed(4)
    model = LSTMLanguageModel()
    ids = rng.integers(0, 13, (5, 3))
    other = rng.integers(0, 13, (5, 4))
    proto = _check(model, ids, other, batch_axis=1)
    # nn.Embedding's traced one-hot product is written as a Gather
    kinds = [n.op_type for n in proto.graph.node]
    assert "Gather" in kinds and "Equal" not in kinds


def test_transformer_language_model():
    rng = np.random.default_rng(5)
    np.random.seed(5)
    model = TransformerLanguageModel()
    proto = _check(model, rng.integers(0, 13, (3, 6)), rng.integers(0, 13, (5, 6)))
    assert any(n.op_type == "LayerNormalization" for n in proto.graph.node)
    # opset 13 has no LayerNormalization: the normalization is written out
    proto13 = nox.export(model, [rng.integers(0, 13, (3, 6))], None, opset=13)
    assert not any(n.op_type == "LayerNormalization" for n in proto13.graph.node)
    x = rng.integers(0, 13, (4, 6))
    assert _rel_err(model(ndl.Tensor(x)).numpy(), _ort_run(proto13, {"input": x})[0]) <= TOL


def test_many_ops_in_a_function_with_several_inputs_and_outputs():
    rng = np.random.default_rng(6)
    w = ndl.Tensor(rng.standard_normal((6, 4)).astype(np.float32))

    def f(x, y):
        a = ops.exp(x * 0.1) + ops.log(ops.abs(x) + 1.0) - ops.sqrt(ops.abs(y) + 0.5)
        b = ops.maximum(a, y) / (ops.power_scalar(x, 2) + 1.0)
        c = ops.where(ops.compare(x, y, "gt"), b, ops.erf(a))
        c = c + ops.astype(ops.compare_scalar(x, 0.0, "ne"), "float32") * ops.sign(y)
        d = ops.flip(c, (1,))
        e = ops.pad(d, ((0, 0), (1, 2)))[:, 1:-2]
        cat = ops.concatenate([e, c], axis=1)
        s = ops.stack([c, d], axis=1)
        p0, p1 = ops.split(s, 1)
        g = s @ ops.reshape(p0 - p1, (-1, 6, 1))
        h = ops.logsumexp(cat, axes=(1,), keepdims=True) + ops.variance(cat, axes=(1,),
                                                                        keepdims=True)
        m = ops.max(cat, axes=(1,)) + ops.summation(cat * cat, axes=(1,))
        k = ops.broadcast_to(ops.reshape(m, (-1, 1)), (x.shape[0], 3))
        q = x[:, 2] + x[:, None, 3].reshape((-1,)) + x[:, np.array([0, 2, 5])].sum(axes=(1,))
        r = ops.logsoftmax(x @ w, axis=-1) + ops.softmax(x @ w, axis=0)
        t = ops.normalize(x, axes=(1,), eps=1e-3) + ops.inv_std(x, axes=(1,), eps=1e-3)
        u = ops.relu(ops.mean(g, axes=(1, 2)) - ops.negate(q))
        return h, (k, q), [r, t, ops.tanh(cat) * ops.sigmoid(cat), u]

    x, y = (rng.standard_normal((3, 6)).astype(np.float32) for _ in range(2))
    proto = nox.export(f, [x, y], None, input_names=["x", "y"])
    assert [i.name for i in proto.graph.input] == ["x", "y"]
    assert len(proto.graph.output) == 7
    xx, yy = (rng.standard_normal((8, 6)).astype(np.float32) for _ in range(2))
    h, (k, q), rest = f(ndl.Tensor(xx), ndl.Tensor(yy))
    for ref, got in zip([h, k, q, *rest], _ort_run(proto, {"x": xx, "y": yy})):
        assert _rel_err(ref.numpy(), got) <= TOL


def test_static_batch_keeps_the_example_shape():
    model = nn.Sequential(nn.Linear(4, 3), nn.Softmax())
    proto = nox.export(model, ndl.Tensor(np.ones((2, 4), np.float32)), None,
                       dynamic_batch=False, output_names=["probs"])
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 4]
    assert proto.graph.output[0].name == "probs"


def test_export_restores_training_mode_and_uses_eval_graph():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    proto = nox.export(model, [np.ones((3, 4), np.float32)], None)
    assert all(m.training for _, m in model.named_modules())
    kinds = {n.op_type for n in proto.graph.node}
    assert "RandomUniformLike" not in kinds and len(proto.graph.output) == 1
    buffers = dict((p.key, p.value) for p in proto.metadata_props)["needle.buffers"]
    assert set(buffers.split(",")) == {"modules.1.running_mean", "modules.1.running_var"}


def test_unsupported_ops_are_listed_together_and_nothing_is_written(tmp_path):
    dropout = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))  # training mode: random mask

    def f(x):
        return ops.dilate(dropout(x), axes=(1,), dilation=1)

    path = tmp_path / "never.onnx"
    with pytest.raises(nox.OnnxError) as err:
        nox.export(f, [np.ones((2, 4), np.float32)], path)
    message = str(err.value)
    assert "2 op(s)" in message and "bernoulli_like" in message and "dilate" in message
    assert "Dropout" in message and "test_onnx_export.py" in message  # where they came from
    assert not path.exists()


def test_an_attribute_that_bakes_the_batch_size_is_refused():
    def f(x):
        return x.sum(axes=(0,)) / x.shape[0]  # a Python number: the example's batch size

    with pytest.raises(nox.OnnxError, match="depends on the batch size"):
        nox.export(f, [np.ones((2, 4), np.float32)], None)
    proto = nox.export(f, [np.ones((2, 4), np.float32)], None, dynamic_batch=False)
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [2, 4]


def test_mapping_table_lists_every_registered_op():
    from needle.core.registry import REGISTRY

    table = nox.export_table()
    assert set(table) == set(REGISTRY)
    assert table["conv"].startswith("Conv") and table["matmul"] == "MatMul"
    assert table["bernoulli_like"] == "" and table["store"] == ""


def test_import_needle_does_not_import_onnx_and_missing_onnx_is_one_clear_error():
    code = (
        "import sys\n"
        "import needle, needle.onnx\n"
        "assert 'onnx' not in sys.modules, 'import needle imported onnx'\n"
        "sys.modules['onnx'] = None  # as if it were not installed\n"
        "import numpy as np\n"
        "for call in (lambda: needle.onnx.export(needle.nn.ReLU(), [np.ones((1, 2))], None),\n"
        "             lambda: needle.onnx.import_model(b'')):\n"
        "    try:\n"
        "        call()\n"
        "    except ImportError as exc:\n"
        "        assert \"pip install 'needle[onnx]'\" in str(exc), exc\n"
        "    else:\n"
        "        raise AssertionError('no ImportError')\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
