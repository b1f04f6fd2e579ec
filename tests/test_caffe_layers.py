"""Caffe layers: every built-in passes check_gradient, forwards match references, the checker
catches wrong backwards, and OpLayer / FunctionLayer bring ops and Functions in as layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import needle.caffe as cf

from .helpers import swish_function


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# -- every built-in layer passes the gradient checker ------------------------------------------
LABELS = np.array([0, 1, 3, 2, 1])

BUILTIN_CASES = [
    ("InnerProduct", lambda: cf.InnerProduct(4), [(3, 5)], None),
    ("InnerProduct axis=1 of 3-d", lambda: cf.InnerProduct(4, axis=1), [(2, 3, 2)], None),
    ("InnerProduct axis=-1", lambda: cf.InnerProduct(3, axis=-1), [(2, 3, 2)], None),
    ("InnerProduct no bias", lambda: cf.InnerProduct(3, bias_term=False), [(2, 4)], None),
    ("Convolution", lambda: cf.Convolution(3, 3, pad=1), [(2, 2, 5, 5)], None),
    ("Convolution stride 2", lambda: cf.Convolution(2, 2, stride=2), [(1, 2, 5, 5)], None),
    ("Pooling MAX", lambda: cf.Pooling("MAX", 2, stride=2), [(2, 2, 4, 4)], None),
    ("Pooling AVE", lambda: cf.Pooling("AVE", 2), [(2, 2, 4, 4)], None),
    ("Pooling global", lambda: cf.Pooling("AVE", global_pooling=True), [(2, 3, 3, 3)], None),
    ("ReLU", cf.ReLU, [(3, 4)], None),
    ("ReLU leaky", lambda: cf.ReLU(negative_slope=0.1), [(3, 4)], None),
    ("Sigmoid", cf.Sigmoid, [(3, 4)], None),
    ("TanH", cf.TanH, [(3, 4)], None),
    ("Dropout", lambda: cf.Dropout(0.4), [(4, 5)], None),
    ("BatchNorm 2-d", cf.BatchNorm, [(6, 4)], None),
    ("BatchNorm NCHW", cf.BatchNorm, [(3, 2, 2, 2)], None),
    ("Scale with bias", lambda: cf.Scale(bias_term=True), [(3, 4)], None),
    ("Scale by a bottom", cf.Scale, [(3, 4, 2), (4,)], None),
    ("Softmax", cf.Softmax, [(3, 4)], None),
    ("SoftmaxWithLoss", cf.SoftmaxWithLoss, None,
     lambda rng: [rng.standard_normal((5, 4)), LABELS]),
    ("EuclideanLoss", cf.EuclideanLoss, [(3, 4), (3, 4)], None),
    ("Flatten", cf.Flatten, [(2, 3, 2)], None),
    ("Eltwise SUM", lambda: cf.Eltwise("SUM", coeff=[1.0, -2.0]), [(3, 4), (3, 4)], None),
    ("Eltwise PROD", lambda: cf.Eltwise("PROD"), [(3, 4)] * 3, None),
    ("Eltwise MAX", lambda: cf.Eltwise("MAX"), [(3, 4), (3, 4)], None),
    ("Concat", lambda: cf.Concat(axis=1), [(2, 3, 2), (2, 1, 2), (2, 2, 2)], None),
    ("Split", cf.Split, [(3, 4)], None),
]


@pytest.mark.parametrize("label,make,shapes,bottoms", BUILTIN_CASES,
                         ids=[c[0] for c in BUILTIN_CASES])
def test_builtin_layer_passes_check_gradient(label, make, shapes, bottoms):
    layer = make()
    if isinstance(layer, cf.Split):
        layer.num_tops = 3
    report = cf.check_gradient(layer, shapes, bottoms(_rng(1)) if bottoms else None)
    assert report.passed and report.max_error < 1e-6, str(report)
    assert report.checked > 0
    # every trainable parameter blob was checked too
    for blob in layer.params:
        if blob.lr_mult != 0:
            assert f"param {blob.name!r}" in report.errors


def test_every_builtin_type_is_covered_by_the_gradient_cases():
    covered = {c[0].split()[0] for c in BUILTIN_CASES}
    # Accuracy and MemoryData have no gradient; Op and Function have tests of their own
    builtin = set(cf.LAYER_TYPES) - {"Op", "Function", "Accuracy", "MemoryData"}
    assert builtin <= covered, builtin - covered


# -- the checker catches wrong backwards --------------------------------------------------------
class Cube(cf.Layer):
    """y = x^3 with a hand-written NumPy backward (the classic Caffe style)."""

    def reshape(self, bottom_shapes):
        return [bottom_shapes[0]]

    def forward(self, bottom):
        self.x = bottom[0]
        return [bottom[0] ** 3]

    def backward(self, top_diff, propagate_down):
        return [3 * self.x**2 * top_diff[0] if propagate_down[0] else None]


class WrongCube(Cube):
    def backward(self, top_diff, propagate_down):
        return [2 * self.x**2 * top_diff[0]]  # deliberately wrong: 2 instead of 3


class AddBias(cf.Layer):
    """y = x + b with a learned (C,) bias; ``wrong`` doubles the bias diff."""

    def __init__(self, wrong: bool = False):
        super().__init__()
        self.wrong = wrong

    def setup(self, bottom_shapes):
        self.add_param("bias", (bottom_shapes[0][1],), None, {"type": "gaussian"})

    def reshape(self, bottom_shapes):
        return [bottom_shapes[0]]

    def forward(self, bottom):
        return [bottom[0] + self.params[0].data]

    def backward(self, top_diff, propagate_down):
        factor = 2.0 if self.wrong else 1.0
        self.params[0].diff += factor * top_diff[0].sum(axis=0)
        return [top_diff[0]]


def test_check_gradient_passes_a_correct_hand_written_layer():
    assert cf.check_gradient(Cube(), [(3, 4)]).passed
    assert cf.check_gradient(AddBias(), [(3, 4)]).passed


def test_check_gradient_fails_on_a_wrong_bottom_diff():
    with pytest.raises(cf.GradientCheckError, match=r"WrongCube.*FAILED.*bottom 0"):
        cf.check_gradient(WrongCube(), [(3, 4)])
    report = cf.check_gradient(WrongCube(), [(3, 4)], raise_on_fail=False)
    assert not report.passed and report.max_error > 0.1
    assert abs(report.analytic / report.numeric - 2 / 3) < 1e-4


def test_check_gradient_fails_on_a_wrong_parameter_diff():
    report = cf.check_gradient(AddBias(wrong=True), [(3, 4)], raise_on_fail=False)
    assert not report.passed
    assert report.worst.startswith("param 'bias'")
    assert report.errors["bottom 0"] < 1e-8  # the bottom diff is right


def test_check_gradient_restores_the_layer_and_the_rng():
    layer = cf.BatchNorm()
    layer.ensure_setup([(6, 4)])
    before = [b.data.copy() for b in layer.params]
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    cf.check_gradient(layer, [(6, 4)])
    assert np.random.rand() == expected
    for blob, old in zip(layer.params, before):
        assert blob.data.dtype == np.float32
        np.testing.assert_array_equal(blob.data, old)


# -- forward semantics --------------------------------------------------------------------------
def _run(layer, *bottoms):
    bottoms = [np.asarray(b) for b in bottoms]
    layer.ensure_setup([b.shape for b in bottoms])
    shapes = layer.reshape([b.shape for b in bottoms])
    tops = layer.forward(bottoms)
    assert [tuple(np.shape(t)) for t in tops] == [tuple(s) for s in shapes]
    return tops


def test_inner_product_weight_layout_and_default_fill_follow_nn_linear():
    from needle import nn

    x = _rng().standard_normal((4, 6)).astype(np.float32)
    np.random.seed(3)
    (y,) = _run(cf.InnerProduct(5), x)
    np.random.seed(3)
    linear = nn.Linear(6, 5)
    np.testing.assert_allclose(y, x @ linear.weight.numpy() + linear.bias.numpy(), rtol=1e-6)


def test_convolution_and_pooling_match_torch():
    rng = _rng()
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    conv = cf.Convolution(4, 3, stride=2, pad=1)
    (y,) = _run(conv, x)
    w = torch.tensor(conv.params[0].data).permute(3, 2, 0, 1)  # (k, k, in, out) -> torch's
    ref = torch.nn.functional.conv2d(torch.tensor(x), w, torch.tensor(conv.params[1].data),
                                     stride=2, padding=1)
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-4, atol=1e-5)
    (m,) = _run(cf.Pooling("MAX", 3, stride=2), x)
    np.testing.assert_allclose(m, torch.nn.functional.max_pool2d(torch.tensor(x), 3, 2).numpy())
    (a,) = _run(cf.Pooling("AVE", 2, stride=1), x)
    np.testing.assert_allclose(a, torch.nn.functional.avg_pool2d(torch.tensor(x), 2, 1).numpy(),
                               rtol=1e-6, atol=1e-6)


def test_batchnorm_keeps_caffe_statistics_and_uses_them_in_the_test_phase():
    rng = _rng()
    layer = cf.BatchNorm(moving_average_fraction=0.5)
    batches = [rng.standard_normal((8, 3)).astype(np.float32) * 2 + 1 for _ in range(2)]
    for b in batches:
        (y,) = _run(layer, b)
    mean, var = batches[-1].mean(0), batches[-1].var(0)
    np.testing.assert_allclose(y, (batches[-1] - mean) / np.sqrt(var + 1e-5), rtol=1e-5,
                               atol=1e-5)
    m = 8
    mean_sum = 0.5 * batches[0].mean(0) + batches[1].mean(0)
    var_sum = (0.5 * batches[0].var(0) + batches[1].var(0)) * m / (m - 1)
    np.testing.assert_allclose(layer.params[0].data, mean_sum, rtol=1e-5)
    np.testing.assert_allclose(layer.params[1].data, var_sum, rtol=1e-5)
    np.testing.assert_allclose(layer.params[2].data, [1.5])
    layer.training = False
    x = rng.standard_normal((4, 3)).astype(np.float32)
    (z,) = _run(layer, x)
    np.testing.assert_allclose(z, (x - mean_sum / 1.5) / np.sqrt(var_sum / 1.5 + 1e-5),
                               rtol=1e-5, atol=1e-6)
    assert all(b.lr_mult == 0 for b in layer.params)


def test_dropout_scales_in_training_and_is_identity_in_test():
    x = np.ones((50, 40), np.float32)
    layer = cf.Dropout(0.25)
    (y,) = _run(layer, x)
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert 0.15 < (y == 0).mean() < 0.35
    layer.training = False
    (z,) = _run(layer, x)
    np.testing.assert_array_equal(z, x)


def test_losses_and_accuracy_match_references():
    rng = _rng()
    scores = rng.standard_normal((5, 4)).astype(np.float32)
    (loss,) = _run(cf.SoftmaxWithLoss(), scores, LABELS)
    ref = torch.nn.functional.cross_entropy(torch.tensor(scores), torch.tensor(LABELS))
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-6)
    (loss2,) = _run(cf.SoftmaxWithLoss(), scores, LABELS.reshape(5, 1).astype(np.float32))
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    a, b = rng.standard_normal((2, 3, 4)).astype(np.float32)
    (e,) = _run(cf.EuclideanLoss(), a, b)
    np.testing.assert_allclose(e, ((a - b) ** 2).sum() / (2 * 3), rtol=1e-6)
    (acc,) = _run(cf.Accuracy(), scores, LABELS)
    assert acc == pytest.approx((scores.argmax(1) == LABELS).mean())
    (acc2,) = _run(cf.Accuracy(top_k=4), scores, LABELS)
    assert acc2 == 1.0


def test_concat_eltwise_flatten_match_numpy():
    rng = _rng()
    a, b = rng.standard_normal((2, 2, 3)), rng.standard_normal((2, 4, 3))
    (c,) = _run(cf.Concat(axis=1), a, b)
    np.testing.assert_allclose(c, np.concatenate([a, b], axis=1))
    x, y = rng.standard_normal((2, 3, 4))
    np.testing.assert_allclose(_run(cf.Eltwise("SUM", coeff=[2, -1]), x, y)[0], 2 * x - y)
    np.testing.assert_allclose(_run(cf.Eltwise("PROD"), x, y)[0], x * y)
    np.testing.assert_allclose(_run(cf.Eltwise("MAX"), x, y)[0], np.maximum(x, y))
    assert _run(cf.Flatten(), rng.standard_normal((2, 3, 4, 5)))[0].shape == (2, 60)
    assert _run(cf.Flatten(axis=1, end_axis=2), rng.standard_normal((2, 3, 4, 5)))[0].shape \
        == (2, 12, 5)


def test_layer_errors_name_the_layer():
    with pytest.raises(ValueError, match="Eltwise 'e'.*SUM, PROD or MAX"):
        cf.Eltwise("DIFF", name="e")
    with pytest.raises(ValueError, match="Pooling 'p'.*MAX or AVE"):
        cf.Pooling("MIN", 2, name="p")
    with pytest.raises(ValueError, match="unknown filler"):
        cf.InnerProduct(3, weight_filler={"type": "lecun"}).ensure_setup([(2, 4)])


def test_fillers():
    np.random.seed(0)
    layer = cf.InnerProduct(50, weight_filler={"type": "constant", "value": 0.5},
                            bias_filler={"type": "gaussian", "std": 0.01})
    layer.ensure_setup([(2, 40)])
    assert np.all(layer.params[0].data == 0.5)
    assert layer.params[1].data.std() < 0.05
    xavier = cf.InnerProduct(30, weight_filler={"type": "xavier"})
    xavier.ensure_setup([(2, 300)])
    assert np.abs(xavier.params[0].data).max() <= np.sqrt(3 / 300) + 1e-7


# -- OpLayer: any registry op as a layer --------------------------------------------------------
OP_CASES = [
    ("tanh", {}, [(3, 4)]),
    ("exp", {}, [(3, 4)]),
    ("multiply", {}, [(3, 4), (1, 4)]),
    ("matmul", {}, [(2, 3, 4), (4, 2)]),
    ("summation", {"axes": [1]}, [(3, 4, 2)]),
    ("logsumexp", {"axes": (1,)}, [(3, 4)]),
    ("logsoftmax", {"axis": -1}, [(3, 5)]),
    ("reshape", {"shape": [4, 3]}, [(2, 6)]),
    ("permute", {"axes": (2, 0, 1)}, [(2, 3, 4)]),
    ("pad", {"pad_width": [[1, 0], [0, 2]]}, [(2, 3)]),
    ("conv", {"stride": 1, "padding": 1}, [(1, 4, 4, 2), (3, 3, 2, 2)]),
    ("stack", {"axis": 1}, [(3, 2), (3, 2), (3, 2)]),
    ("split", {"axis": 0}, [(3, 2)]),
]


@pytest.mark.parametrize("op,attrs,shapes", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_layer_gradient_is_the_op_gradient(op, attrs, shapes):
    layer = cf.OpLayer(op, **attrs)
    report = cf.check_gradient(layer, shapes)
    assert report.max_error < 1e-6, str(report)


def test_op_layer_forward_equals_the_op_and_rejects_unknown_attributes():
    import needle as ndl

    x = _rng().standard_normal((3, 4)).astype(np.float32)
    (y,) = _run(cf.OpLayer("summation", axes=(0,)), x)
    np.testing.assert_allclose(y, ndl.summation(ndl.Tensor(x), axes=(0,)).numpy())
    tops = _run(cf.OpLayer("split", axis=1), x)
    assert len(tops) == 4 and tops[2].shape == (3,)
    with pytest.raises(TypeError, match="OpLayer\\('tanh'\\): unknown attributes"):
        cf.OpLayer("tanh", axis=1)
    with pytest.raises(KeyError, match="unknown op 'tanhh'"):
        cf.OpLayer("tanhh")


# -- FunctionLayer: a custom Function as a layer ------------------------------------------------
Swish = swish_function()


def test_function_layer_passes_check_gradient():
    layer = cf.FunctionLayer(Swish)
    assert cf.check_gradient(layer, [(3, 4)]).passed
    x = _rng().standard_normal((3, 4))
    np.testing.assert_allclose(_run(layer, x)[0], x / (1 + np.exp(-x)))


def test_memory_data_batches_wrap_around_epochs():
    X = np.arange(10, dtype=np.float64).reshape(5, 2)
    y = np.arange(5)
    layer = cf.MemoryData((X, y), batch_size=3, shuffle=False)
    assert layer.reshape([]) == [(3, 2), (3,)]
    batches = [layer.forward([]) for _ in range(3)]
    assert [b[1].tolist() for b in batches] == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]
    assert batches[0][0].dtype == np.float32 and batches[0][1].dtype == y.dtype
    shuffled = cf.MemoryData((X, y), batch_size=5, seed=1)
    epoch = shuffled.forward([])[1]
    assert sorted(epoch.tolist()) == [0, 1, 2, 3, 4] and epoch.tolist() != [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="different lengths"):
        cf.MemoryData((X, y[:3]), batch_size=2)
