"""transposed_matmul: matmul's and linear's gradient products as one node (issue #20).

The op's values and gradients in every mode are the op table's (tests/op_table.py); here:
the eager backward of a matmul / linear makes no transpose nodes, gradients still match
PyTorch, and the ONNX export runs in onnxruntime as needle computes.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

import needle as ndl
import needle.nn as nn
from needle import ops
from needle.core import registry


def _count_backward_nodes(loss) -> collections.Counter:
    """The op names of the nodes ``loss.backward()`` makes."""
    made: collections.Counter = collections.Counter()
    factory = registry._NODE_FACTORY[0]

    def counting(op, inputs):
        made[op.name] += 1
        return factory(op, inputs)

    registry._NODE_FACTORY[0] = counting
    try:
        loss.backward()
    finally:
        registry._NODE_FACTORY[0] = factory
    return made


@pytest.mark.parametrize("use_linear", [False, True])
def test_backward_of_matmul_and_linear_makes_no_transpose_nodes(use_linear):
    rng = np.random.default_rng(0)
    x_np, w_np, b_np = (rng.standard_normal(s).astype(np.float32)
                        for s in ((4, 3), (3, 5), (1, 5)))
    x, w, b = ndl.Tensor(x_np), ndl.Tensor(w_np), ndl.Tensor(b_np)
    out = ops.linear(x, w, b) if use_linear else x @ w + b
    made = _count_backward_nodes((out * out).sum())
    assert made["transpose"] == 0, made
    assert made["transposed_matmul"] == 2, made
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x_np, w_np, b_np))
    ((tx @ tw + tb) ** 2).sum().backward()
    for mine, ref in ((x, tx), (w, tw), (b, tb)):
        np.testing.assert_allclose(mine.grad.numpy(), ref.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_transposed_matmul_shape_errors_name_the_op():
    a, b = ndl.Tensor(np.ones((3, 4), np.float32)), ndl.Tensor(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="transposed_matmul: inner dimensions differ"):
        ops.transposed_matmul(a, b)
    with pytest.raises(ValueError, match="transposed_matmul: inputs must have at least 2 dims"):
        ops.transposed_matmul(ndl.Tensor(np.ones(4, np.float32)), b, False, True)
    assert ops.transposed_matmul(a, b, False, True).shape == (3, 3)


class _TransposedProduct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(np.random.default_rng(1).standard_normal((6, 4))
                                   .astype(np.float32))

    def forward(self, x):
        return ops.transposed_matmul(ops.transposed_matmul(x, self.weight, False, True),
                                     self.weight, False, False)


def test_onnx_export_of_transposed_matmul_runs_in_onnxruntime():
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    nox = pytest.importorskip("needle.onnx")
    model = _TransposedProduct()
    example = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    other = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    proto = nox.export(model, [ndl.Tensor(example)], None)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for x in (example, other):
        (got,) = sess.run(None, {"input": x})
        np.testing.assert_allclose(got, model(ndl.Tensor(x)).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transpose_a,transpose_b", [(False, True), (True, False), (True, True)])
def test_caffe_op_layer_gradient_of_transposed_matmul(transpose_a, transpose_b):
    import needle.caffe as cf

    a_shape = (2, 4, 3) if transpose_a else (2, 3, 4)
    b_shape = (5, 4) if transpose_b else (4, 5)
    layer = cf.OpLayer("transposed_matmul", transpose_a=transpose_a, transpose_b=transpose_b)
    report = cf.check_gradient(layer, [a_shape, b_shape])
    assert report.max_error < 1e-6, str(report)
