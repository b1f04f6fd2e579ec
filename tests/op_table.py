"""One row per registered op: how to call it, the torch reference, and sample inputs.

Samples cover broadcasting, size-1 dims, 0-d scalars and batched matmul; input domains keep
away from kinks (0 for relu/abs, ties for max/maximum) so finite differences are meaningful.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

import needle as ndl
from needle import ops

Sample = Callable[[np.random.Generator], list[np.ndarray]]


def normal(*shapes: tuple) -> Sample:
    return lambda rng: [rng.standard_normal(s).astype(np.float32) for s in shapes]


def positive(*shapes: tuple, low: float = 0.5, high: float = 2.0) -> Sample:
    return lambda rng: [rng.uniform(low, high, s).astype(np.float32) for s in shapes]


def away_from_zero(*shapes: tuple) -> Sample:
    """Values in +-[0.2, 1.5]: no kink at 0 within finite-difference reach."""

    def make(rng):
        out = []
        for s in shapes:
            mag = rng.uniform(0.2, 1.5, s)
            out.append((mag * rng.choice([-1.0, 1.0], s)).astype(np.float32))
        return out

    return make


def distinct(*shapes: tuple) -> Sample:
    """Values with no near-ties (a shuffled grid), for max and maximum."""

    def make(rng):
        out = []
        offset = 0.0
        for s in shapes:
            n = int(np.prod(s))
            vals = (np.arange(n) * 0.37 + offset) % 3.7 - 1.85
            offset += 0.11
            out.append(rng.permutation(vals).reshape(s).astype(np.float32))
        return out

    return make


@dataclass
class OpCase:
    """How to test one op: ``fn(*tensors)`` in needle, ``ref(*torch_tensors)`` in torch."""

    op: str
    fn: Callable
    ref: Callable
    samples: list[Sample]
    differentiable: bool = True
    rtol: float = 1e-5
    atol: float = 1e-6
    fd_rtol: float = 1e-5
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.op


def _torch_dilate(x, axes, d):
    shape = list(x.shape)
    for ax in axes:
        shape[ax] *= 1 + d
    out = torch.zeros(shape, dtype=x.dtype)
    index = [slice(None)] * x.ndim
    for ax in axes:
        index[ax] = slice(None, None, 1 + d)
    out[tuple(index)] = x
    return out


def _batch_norm(x, w, b, axes, eps):
    """batch_norm with x's own statistics, as BatchNorm1d/2d call it in training."""
    return ops.batch_norm(x, w, b, ops.mean(x, axes, keepdims=True),
                          ops.variance(x, axes, keepdims=True), axes=axes, eps=eps)


def _batch_norm_grad(g, x, w, axes):
    """batch_norm_grad with x's own statistics, its (dx, dweight, dbias) as dx + 2 dw + 3 db."""
    dx, dw, db = ops.batch_norm_grad(g, x, w, ops.mean(x, axes, keepdims=True),
                                     ops.variance(x, axes, keepdims=True), axes=axes, eps=1e-5)
    return dx + dw * 2.0 + db * 3.0


def _torch_batch_norm_grad(g, x, w):
    """The same combination of torch's training-mode batch_norm adjoints, differentiable."""
    b = torch.zeros_like(w, requires_grad=True)
    x_in = x if x.requires_grad else x.detach().requires_grad_(True)
    w_in = w if w.requires_grad else w.detach().requires_grad_(True)
    y = torch.nn.functional.batch_norm(x_in, None, None, w_in.reshape(-1), b.reshape(-1),
                                       training=True, eps=1e-5)
    dx, dw, db = torch.autograd.grad(y, [x_in, w_in, b], g, create_graph=True)
    return dx + dw * 2.0 + db * 3.0


def _torch_conv(x, w, stride, padding):
    out = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2).contiguous(),
                                     w.permute(3, 2, 0, 1).contiguous(),
                                     stride=stride, padding=padding)
    return out.permute(0, 2, 3, 1)


def _torch_conv_weight_grad(a, g, kernel_hw, stride, padding):
    """The kernel adjoint of conv, differentiable in ``a`` and ``g`` (conv is bilinear)."""
    w0 = torch.zeros((*kernel_hw, a.shape[3], g.shape[3]), dtype=a.dtype, requires_grad=True)
    out = _torch_conv(a, w0, stride, padding)
    return torch.autograd.grad(out, w0, g, create_graph=True)[0]


def _torch_conv_input_grad(g, b, stride, padding, in_hw):
    """The input adjoint of conv, differentiable in ``g`` and ``b``."""
    x0 = torch.zeros((g.shape[0], *in_hw, b.shape[2]), dtype=g.dtype, requires_grad=True)
    out = _torch_conv(x0, b, stride, padding)
    return torch.autograd.grad(out, x0, g, create_graph=True)[0]


def _torch_scatter(x, index, shape):
    out = torch.zeros(shape, dtype=x.dtype)
    return out.index_put(index, x, accumulate=True) if isinstance(index, tuple) else out


_IDX = np.array([2, 0, 2, 1])
_COND = np.array([[True, False, True, True], [False, False, True, False], [True] * 4])


OP_TABLE: list[OpCase] = [
    # -- elementwise arithmetic (broadcasting, size-1 dims, 0-d) --
    OpCase("add", lambda a, b: a + b, lambda a, b: a + b,
           [normal((3, 4), (3, 4)), normal((3, 1), (1, 4)), normal((2, 3, 4), (4,)),
            normal((), (2, 3))]),
    OpCase("add_scalar", lambda a: a + 1.5, lambda a: a + 1.5, [normal((3, 4)), normal(())]),
    OpCase("multiply", lambda a, b: a * b, lambda a, b: a * b,
           [normal((3, 4), (3, 4)), normal((4, 1, 3), (2, 1)), normal((), (5,))]),
    OpCase("mul_scalar", lambda a: a * -2.5, lambda a: a * -2.5, [normal((2, 3))]),
    OpCase("divide", lambda a, b: a / b, lambda a, b: a / b,
           [lambda rng: normal((3, 4))(rng) + away_from_zero((3, 4))(rng),
            lambda rng: normal((2, 3))(rng) + away_from_zero((3,))(rng)]),
    OpCase("divide_scalar", lambda a: a / 4.0, lambda a: a / 4.0, [normal((3, 2))]),
    OpCase("power", lambda a, b: a**b, lambda a, b: a**b,
           [lambda rng: positive((3, 4))(rng) + normal((3, 4))(rng),
            lambda rng: positive((2, 3))(rng) + normal((3,))(rng)]),
    OpCase("power_scalar", lambda a: a**3, lambda a: a**3, [normal((3, 4))],
           extra={"more": [(lambda a: a**0.5, lambda a: a**0.5, positive((4,))),
                           (lambda a: a**-1, lambda a: a**-1, positive((2, 2))),
                           (lambda a: a**2, lambda a: a**2, normal((5,)))]}),
    OpCase("negate", lambda a: -a, lambda a: -a, [normal((3, 4)), normal(())]),
    # -- transcendental / activations --
    OpCase("log", ops.log, torch.log, [positive((3, 4))]),
    OpCase("exp", ops.exp, torch.exp, [normal((3, 4))]),
    OpCase("relu", ops.relu, torch.relu, [away_from_zero((3, 4))]),
    OpCase("tanh", ops.tanh, torch.tanh, [normal((3, 4))]),
    OpCase("sigmoid", ops.sigmoid, torch.sigmoid, [normal((3, 4))]),
    OpCase("sqrt", ops.sqrt, torch.sqrt, [positive((3, 4))]),
    OpCase("abs", ops.abs, torch.abs, [away_from_zero((3, 4))]),
    OpCase("erf", ops.erf, torch.erf, [normal((4, 5))], atol=2e-7),
    OpCase("maximum", ops.maximum, torch.maximum,
           [distinct((3, 4), (3, 4)), distinct((3, 4), (4,))]),
    OpCase("where", lambda a, b: ops.where(ndl.Tensor(_COND, requires_grad=False), a, b),
           lambda a, b: torch.where(torch.tensor(_COND), a, b),
           [normal((3, 4), (3, 4)), normal((3, 4), (4,))]),
    # -- non-differentiable --
    OpCase("compare", lambda a, b: ops.compare(a, b, "lt"), lambda a, b: a < b,
           [normal((3, 4), (3, 4)), normal((3, 4), (4,))], differentiable=False),
    OpCase("compare_scalar", lambda a: ops.compare_scalar(a, 0.1, "ge"), lambda a: a >= 0.1,
           [normal((3, 4))], differentiable=False),
    OpCase("sign", ops.sign, torch.sign, [away_from_zero((3, 4))], differentiable=False),
    OpCase("full_like", lambda a: ops.full_like(a, 2.5), lambda a: torch.full_like(a, 2.5),
           [normal((3, 4))], differentiable=False),
    OpCase("bernoulli_like", lambda a: (np.random.seed(5), ops.bernoulli_like(a, 0.3))[1],
           lambda a: torch.tensor((np.random.seed(5),
                                   np.random.rand(*a.shape).astype(np.float32) <= 0.3)[1]).float(),
           [normal((4, 5))], differentiable=False),
    OpCase("to_device", lambda a: ops.to_device(a, ndl.cpu()), lambda a: a.clone(),
           [normal((3, 4))]),
    OpCase("stop_gradient", ops.stop_gradient, lambda a: a.detach(), [normal((3, 4))],
           differentiable=False),
    # a check: identity on valid class ids (bad ones: tests/test_checks.py)
    OpCase("check_class_ids", lambda a: ops.check_class_ids(a, 4), lambda a: a.clone(),
           [lambda rng: [rng.integers(0, 4, (6,)).astype(np.float32)]], differentiable=False,
           extra={"more": [(lambda a: ops.check_class_ids(a, classes=4, what="labels"),
                            lambda a: a.clone(), lambda rng: [rng.integers(0, 4, (2, 3))])]}),
    OpCase("store", lambda a: ops.store(a * 2, target=ndl.Tensor(np.zeros(a.shape, np.float32),
                                                                 requires_grad=False)),
           lambda a: a * 2, [normal((2, 3))], differentiable=False,
           extra={"more": [(lambda a: ops.store(a, target=ndl.Tensor(
                               np.ones(6, np.float32), requires_grad=False), momentum=0.25),
                            lambda a: 0.75 + 0.25 * a.reshape(6), normal((2, 3))),
                           (lambda a: ops.store(a[0], a * 2, target=ndl.Tensor(
                               np.ones(3, np.float32), requires_grad=False), momentum=0.5),
                            lambda a: 0.5 + 0.5 * a[0], normal((4, 3)))]}),
    OpCase("astype", lambda a: ops.astype(a, "float64"), lambda a: a.double(), [normal((3, 4))]),
    # -- linear algebra --
    OpCase("matmul", lambda a, b: a @ b, lambda a, b: a @ b,
           [normal((3, 4), (4, 5)), normal((2, 3, 4), (4, 5)), normal((2, 1, 3, 4), (5, 4, 2)),
            normal((1, 1), (1, 3)),
            # 1-D operands as np.matmul: vector @ matrix, matrix @ vector, vector @ vector,
            # and vectors against batched matrices
            normal((4,), (4, 2)), normal((3, 4), (4,)), normal((4,), (4,)),
            normal((2, 3, 4), (4,)), normal((4,), (2, 4, 3))], rtol=1e-4, atol=1e-5),
    # -- reductions --
    OpCase("summation", lambda a: ops.summation(a, axes=(0, 2)), lambda a: a.sum((0, 2)),
           [normal((2, 3, 4))],
           extra={"more": [(lambda a: a.sum(), lambda a: a.sum(), normal((3, 4))),
                           (lambda a: ops.summation(a, 1, keepdims=True),
                            lambda a: a.sum(1, keepdim=True), normal((3, 4))),
                           (lambda a: ops.summation(a, -1), lambda a: a.sum(-1),
                            normal((2, 1, 4)))]}),
    OpCase("mean", lambda a: ops.mean(a, axes=(1,)), lambda a: a.mean(1), [normal((3, 4, 2))],
           extra={"more": [(lambda a: a.mean(), lambda a: a.mean(), normal((3, 4)))]}),
    OpCase("max", lambda a: ops.max(a, axes=(1,)), lambda a: a.amax(1), [distinct((3, 4, 2))],
           extra={"more": [(lambda a: a.max(), lambda a: a.amax(), distinct((3, 4))),
                           (lambda a: ops.max(a, 0, keepdims=True),
                            lambda a: a.amax(0, keepdim=True), distinct((3, 4)))]}),
    OpCase("logsumexp", lambda a: ops.logsumexp(a, axes=(1,)), lambda a: a.logsumexp(1),
           [normal((3, 4))],
           extra={"more": [(lambda a: ops.logsumexp(a), lambda a: a.logsumexp((0, 1)),
                            normal((2, 5)))]}),
    OpCase("variance", lambda a: ops.variance(a, axes=(0,)), lambda a: a.var(0, unbiased=False),
           [normal((5, 3))], rtol=1e-5, atol=1e-6,
           extra={"more": [(lambda a: ops.variance(a, (0, 2), keepdims=True),
                            lambda a: a.var((0, 2), unbiased=False, keepdim=True),
                            normal((3, 2, 4)))]}),
    OpCase("normalize", lambda a: ops.normalize(a, axes=(0,), eps=1e-5),
           lambda a: (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + 1e-5),
           [normal((6, 4))], rtol=1e-4, atol=1e-5, fd_rtol=1e-4,
           extra={"more": [(lambda a: ops.normalize(a, ops.mean(a, (0,), keepdims=True),
                                                    ops.variance(a, (0,), keepdims=True),
                                                    axes=(0,), eps=1e-5),
                            lambda a: (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False)
                                                                  + 1e-5),
                            normal((6, 4))),
                           (lambda a: ops.normalize(a, axes=(0, 2, 3), eps=1e-3),
                            lambda a: (a - a.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
                                a.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-3),
                            normal((3, 2, 2, 3)))]}),
    OpCase("normalize_grad", lambda g, y, a: ops.normalize_grad(g, y, a, axes=(0,), eps=1e-5),
           lambda g, y, a: (g - g.mean(0) - y * (g * y).mean(0))
           / torch.sqrt(a.var(0, unbiased=False) + 1e-5),
           [normal((6, 4), (6, 4), (6, 4))], rtol=1e-4, atol=1e-5, fd_rtol=1e-4,
           extra={"more": [(lambda g, y, v: ops.normalize_grad(g, y, v, axes=(0,), eps=1e-5,
                                                              given_var=True),
                            lambda g, y, v: (g - g.mean(0) - y * (g * y).mean(0))
                            / torch.sqrt(v + 1e-5),
                            lambda rng: [*normal((6, 4), (6, 4))(rng),
                                         *positive((1, 4))(rng)])]}),
    OpCase("batch_norm", lambda x, w, b: _batch_norm(x, w, b, (0,), 1e-5),
           lambda x, w, b: torch.nn.functional.batch_norm(x, None, None, w, b, training=True,
                                                          eps=1e-5),
           [lambda rng: [*normal((6, 4), (4,), (4,))(rng)]], rtol=1e-4, atol=1e-5,
           fd_rtol=1e-4,
           extra={"more": [(lambda x, w, b: _batch_norm(x, w, b, (0, 2, 3), 1e-3),
                            lambda x, w, b: torch.nn.functional.batch_norm(
                                x, None, None, w.reshape(-1), b.reshape(-1), training=True,
                                eps=1e-3),
                            normal((3, 2, 2, 3), (1, 2, 1, 1), (1, 2, 1, 1)))]}),
    # all three adjoints in one output, so every input gets a gradient (db needs neither x nor w)
    OpCase("batch_norm_grad", lambda g, x, w: _batch_norm_grad(g, x, w, (0,)),
           lambda g, x, w: _torch_batch_norm_grad(g, x, w),
           [normal((6, 4), (6, 4), (4,))], rtol=1e-4, atol=1e-5, fd_rtol=1e-4,
           extra={"more": [(lambda g, x, w: _batch_norm_grad(g, x, w, (0, 2, 3)),
                            _torch_batch_norm_grad,
                            normal((3, 2, 2, 3), (3, 2, 2, 3), (1, 2, 1, 1)))]}),
    OpCase("inv_std", lambda a: ops.inv_std(a, (1,), 1e-5),
           lambda a: 1 / torch.sqrt(a.var(1, unbiased=False, keepdim=True) + 1e-5),
           [normal((3, 5))], rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    OpCase("logsoftmax", ops.logsoftmax, lambda a: torch.log_softmax(a, -1), [normal((3, 5))]),
    OpCase("softmax", lambda a: ops.softmax(a, axis=0), lambda a: torch.softmax(a, 0),
           [normal((3, 5))]),
    # -- shape --
    OpCase("reshape", lambda a: ops.reshape(a, (4, 3)), lambda a: a.reshape(4, 3),
           [normal((2, 6))],
           extra={"more": [(lambda a: a.reshape((-1,)), lambda a: a.reshape(-1), normal((2, 3)))]}),
    OpCase("broadcast_to", lambda a: ops.broadcast_to(a, (2, 3, 4)),
           lambda a: a.broadcast_to((2, 3, 4)), [normal((3, 1)), normal((4,)), normal(())]),
    OpCase("sum_to", lambda a: ops.sum_to(a, (3, 1)), lambda a: a.sum((0, 2), keepdim=True)[0],
           [normal((2, 3, 4))]),
    OpCase("transpose", ops.transpose, lambda a: a.transpose(-1, -2), [normal((2, 3, 4))],
           extra={"more": [(lambda a: ops.transpose(a, (0, 2)), lambda a: a.transpose(0, 2),
                            normal((2, 3, 4)))]}),
    OpCase("permute", lambda a: ops.permute(a, (2, 0, 1)), lambda a: a.permute(2, 0, 1),
           [normal((2, 3, 4))]),
    OpCase("stack", lambda a, b: ops.stack([a, b, a], 1), lambda a, b: torch.stack([a, b, a], 1),
           [normal((3, 4), (3, 4))]),
    OpCase("concatenate", lambda a, b: ops.concatenate([a, b, a], 1),
           lambda a, b: torch.cat([a, b, a], 1), [normal((3, 2), (3, 4)), normal((2, 1, 3),
                                                                            (2, 2, 3))]),
    OpCase("split", lambda a: ops.split(a, 1)[2] * 2 + ops.split(a, 1)[0],
           lambda a: a[:, 2] * 2 + a[:, 0], [normal((3, 4, 2))]),
    OpCase("make_tuple", lambda a, b: ops.make_tuple(a, b)[1] - ops.make_tuple(a, b)[0] * 3,
           lambda a, b: b - a * 3, [normal((3, 2), (3, 2))]),
    OpCase("tuple_get_item", lambda a: ops.split(a, 0)[1] * ops.split(a, 0)[1],
           lambda a: a[1] * a[1], [normal((3, 4))]),
    OpCase("flip", lambda a: ops.flip(a, (0, 2)), lambda a: a.flip((0, 2)), [normal((2, 3, 4))]),
    OpCase("dilate", lambda a: ops.dilate(a, (0, 1), 2), lambda a: _torch_dilate(a, (0, 1), 2),
           [normal((2, 3))]),
    OpCase("undilate", lambda a: ops.undilate(a, (1,), 1), lambda a: a[:, ::2], [normal((3, 5))]),
    OpCase("getitem", lambda a: a[1:, ::2], lambda a: a[1:, ::2], [normal((3, 5))],
           extra={"more": [
               (lambda a: a[_IDX], lambda a: a[torch.tensor(_IDX)], normal((3, 2))),
               (lambda a: a[None, -1, 1:3], lambda a: a[None, -1, 1:3], normal((4, 5))),
               (lambda a: a[np.arange(3), np.array([0, 2, 1])],
                lambda a: a[torch.arange(3), torch.tensor([0, 2, 1])], normal((3, 3))),
               (lambda a: a[..., 0], lambda a: a[..., 0], normal((2, 3, 2)))]}),
    OpCase("scatter", lambda a: ops.scatter(a, (_IDX,), (3, 2)),
           lambda a: _torch_scatter(a, (torch.tensor(_IDX),), (3, 2)), [normal((4, 2))],
           extra={"more": [(lambda a: ops.scatter(a, (slice(1, 3),), (4, 2)),
                            lambda a: torch.nn.functional.pad(a, (0, 0, 1, 1)),
                            normal((2, 2)))]}),
    OpCase("pad", lambda a: ops.pad(a, ((1, 2), (0, 1))),
           lambda a: torch.nn.functional.pad(a, (0, 1, 1, 2)), [normal((2, 3))]),
    OpCase("conv", lambda a, b: ops.conv(a, b, stride=1, padding=1),
           lambda a, b: _torch_conv(a, b, 1, 1), [normal((2, 5, 5, 3), (3, 3, 3, 4))],
           rtol=1e-4, atol=1e-5,
           extra={"more": [(lambda a, b: ops.conv(a, b, stride=2, padding=1),
                            lambda a, b: _torch_conv(a, b, 2, 1),
                            normal((2, 6, 7, 2), (3, 3, 2, 3))),
                           (lambda a, b: ops.conv(a, b, stride=2),
                            lambda a, b: _torch_conv(a, b, 2, 0),
                            normal((1, 5, 5, 2), (2, 2, 2, 1))),
                           # an NCHW input seen through a permute (nn.Conv): output stored NCHW
                           (lambda a, b: ops.conv(ops.permute(a, (0, 2, 3, 1)), b, stride=2,
                                                  padding=1),
                            lambda a, b: _torch_conv(a.permute(0, 2, 3, 1), b, 2, 1),
                            normal((2, 3, 6, 5), (3, 3, 3, 2))),
                           # ... with a map of >= 256 positions: the per-image NCHW products
                           (lambda a, b: ops.conv(ops.permute(a, (0, 2, 3, 1)), b, stride=1,
                                                  padding=1),
                            lambda a, b: _torch_conv(a.permute(0, 2, 3, 1), b, 1, 1),
                            normal((2, 3, 16, 17), (3, 3, 3, 2))),
                           (lambda a, b: ops.conv(ops.permute(a, (0, 2, 3, 1)), b, stride=2,
                                                  padding=1),
                            lambda a, b: _torch_conv(a.permute(0, 2, 3, 1), b, 2, 1),
                            normal((1, 2, 33, 32), (3, 3, 2, 3)))]}),
    # the conv adjoints; (1, 5, 5) with kernel 2 and stride 2 leaves a row and column unused
    OpCase("conv_weight_grad",
           lambda a, g: ops.conv_weight_grad(a, g, (3, 3), stride=1, padding=1),
           lambda a, g: _torch_conv_weight_grad(a, g, (3, 3), 1, 1),
           [normal((2, 5, 5, 3), (2, 5, 5, 4))], rtol=1e-4, atol=1e-5,
           extra={"more": [(lambda a, g: ops.conv_weight_grad(a, g, (3, 3), stride=2, padding=1),
                            lambda a, g: _torch_conv_weight_grad(a, g, (3, 3), 2, 1),
                            normal((2, 6, 7, 2), (2, 3, 4, 3))),
                           (lambda a, g: ops.conv_weight_grad(a, g, (2, 2), stride=2),
                            lambda a, g: _torch_conv_weight_grad(a, g, (2, 2), 2, 0),
                            normal((1, 5, 5, 2), (1, 2, 2, 1))),
                           # a and g stored NCHW with >= 256 positions: the NCHW products
                           (lambda a, g: ops.conv_weight_grad(
                               ops.permute(a, (0, 2, 3, 1)), ops.permute(g, (0, 2, 3, 1)),
                               (3, 3), stride=2, padding=1),
                            lambda a, g: _torch_conv_weight_grad(
                                a.permute(0, 2, 3, 1), g.permute(0, 2, 3, 1), (3, 3), 2, 1),
                            normal((2, 2, 32, 33), (2, 3, 16, 17)))]}),
    OpCase("conv_input_grad",
           lambda g, b: ops.conv_input_grad(g, b, stride=1, padding=1, in_hw=(5, 5)),
           lambda g, b: _torch_conv_input_grad(g, b, 1, 1, (5, 5)),
           [normal((2, 5, 5, 4), (3, 3, 3, 4))], rtol=1e-4, atol=1e-5,
           extra={"more": [(lambda g, b: ops.conv_input_grad(g, b, stride=2, padding=1,
                                                             in_hw=(6, 7)),
                            lambda g, b: _torch_conv_input_grad(g, b, 2, 1, (6, 7)),
                            normal((2, 3, 4, 3), (3, 3, 2, 3))),
                           (lambda g, b: ops.conv_input_grad(g, b, stride=2, in_hw=(5, 5)),
                            lambda g, b: _torch_conv_input_grad(g, b, 2, 0, (5, 5)),
                            normal((1, 2, 2, 1), (2, 2, 2, 1))),
                           # g stored NCHW (as nn.Conv's backward passes it)
                           (lambda g, b: ops.conv_input_grad(ops.permute(g, (0, 2, 3, 1)), b,
                                                             stride=2, padding=1, in_hw=(6, 7)),
                            lambda g, b: _torch_conv_input_grad(g.permute(0, 2, 3, 1), b, 2, 1,
                                                                (6, 7)),
                            normal((2, 3, 3, 4), (3, 3, 2, 3))),
                           # ... with >= 256 positions: the per-image NCHW products
                           (lambda g, b: ops.conv_input_grad(ops.permute(g, (0, 2, 3, 1)), b,
                                                             stride=2, padding=1,
                                                             in_hw=(32, 33)),
                            lambda g, b: _torch_conv_input_grad(g.permute(0, 2, 3, 1), b, 2, 1,
                                                                (32, 33)),
                            normal((2, 3, 16, 17), (3, 3, 2, 3))),
                           # in_hw=None: the smallest input, (3 - 1) * 2 + 3 - 2 = 5
                           (lambda g, b: ops.conv_input_grad(g, b, stride=2, padding=1),
                            lambda g, b: _torch_conv_input_grad(g, b, 2, 1, (5, 5)),
                            normal((2, 3, 3, 2), (3, 3, 4, 2)))]}),
]


def all_cases() -> list[tuple[OpCase, Callable, Callable, Sample]]:
    """Every (case, needle fn, torch fn, sample) combination, the extra variants included."""
    out = []
    for case in OP_TABLE:
        for sample in case.samples:
            out.append((case, case.fn, case.ref, sample))
        for fn, ref, sample in case.extra.get("more", []):
            out.append((case, fn, ref, sample))
    return out
