"""One OpInfo row per registered op (and call form): how to call it, the torch reference,
typed sample inputs and flags that say which checks apply.

In the spirit of PyTorch's OpInfo: a row is ``OpInfo(op, fn, ref, samples, flags...)``; each
sample is a ``SampleInput(make, name, kind, args, kwargs)``: ``make(rng)`` gives the arrays,
``fn(*tensors, *args, **kwargs)`` runs needle and ``ref(*torch_tensors, *args, **kwargs)``
torch. Sample kinds (``Kind``) say what a sample is there for (broadcasting, size-1 dims,
0-d, batched, a memory layout, an attribute variant); ``tests/test_ops.py`` checks each kind
holds. Consumers (``tests/test_ops*.py``, ``test_jit_ops.py``, ``test_static_ops.py``)
never test an op by name: what differs between ops is a flag on its row.

Input domains keep away from kinks (0 for relu/abs, ties for max/maximum) so finite
differences, first and second order, are meaningful.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pytest
import torch

import needle as ndl
from needle import ops

from . import lstm_reference as lstm_ref
from . import vocab_head_reference as vocab_ref

Make = Callable[[np.random.Generator], list[np.ndarray]]

# the seed consumers give NumPy's global RNG before running a ``nondeterministic`` row
RANDOM_SEED = 5


def normal(*shapes: tuple) -> Make:
    return lambda rng: [rng.standard_normal(s).astype(np.float32) for s in shapes]


def positive(*shapes: tuple, low: float = 0.5, high: float = 2.0) -> Make:
    return lambda rng: [rng.uniform(low, high, s).astype(np.float32) for s in shapes]


def away_from_zero(*shapes: tuple) -> Make:
    """Values in +-[0.2, 1.5]: no kink at 0 within finite-difference reach."""

    def make(rng):
        out = []
        for s in shapes:
            mag = rng.uniform(0.2, 1.5, s)
            out.append((mag * rng.choice([-1.0, 1.0], s)).astype(np.float32))
        return out

    return make


def distinct(*shapes: tuple) -> Make:
    """Values with no ties and no near-ties, within an array and across arrays: one evenly
    spaced grid over [-1.85, 1.85], shuffled and dealt to the arrays (for max and maximum)."""

    def make(rng):
        sizes = [int(np.prod(s)) for s in shapes]
        total = sum(sizes)
        grid = rng.permutation(np.linspace(-1.85, 1.85, total))
        out, start = [], 0
        for s, n in zip(shapes, sizes):
            out.append(grid[start:start + n].reshape(s).astype(np.float32))
            start += n
        return out

    return make


def joined(*makes: Make) -> Make:
    """The arrays of several makers, in order (inputs with different domains)."""
    return lambda rng: [a for make in makes for a in make(rng)]


class Kind(enum.Enum):
    """What a sample is there for; ``tests/test_ops.py`` checks that each holds."""

    BASIC = "basic"            # plain shapes
    BROADCAST = "broadcast"    # inputs of different shapes, broadcast against each other
    SIZE_ONE = "size_one"      # some input has a dimension of size 1
    SCALAR = "scalar"          # some input is 0-d
    BATCHED = "batched"        # some input has leading batch dimensions (3 or more dims)
    VECTOR = "vector"          # some input is 1-d where the op takes matrices (matmul)
    LAYOUT = "layout"          # an input seen through a permute (kwargs nchw=True)
    ATTRS = "attrs"            # the same shapes class, other attributes (args / kwargs)


@dataclass(frozen=True)
class SampleInput:
    """One sample: ``make(rng)`` gives the arrays; ``args`` and ``kwargs`` follow them in the
    calls of both ``fn`` and ``ref`` (attributes: axes, strides, indices, exponents)."""

    make: Make
    name: str
    kind: Kind = Kind.BASIC
    args: tuple = ()
    kwargs: Mapping = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.name


def S(make: Make, name: str, kind: Kind = Kind.BASIC, *args, **kwargs) -> SampleInput:
    """Shorthand for a SampleInput: ``S(normal((3, 4)), "basic")``."""
    return SampleInput(make, name, kind, args, kwargs)


@dataclass
class OpInfo:
    """How to test one op (one call form of it, if ``variant`` is set).

    Flags (what the consumers read instead of an op's name):
    - ``differentiable``: gradients exist (else: the output must not require a gradient).
      Every differentiable row also gets its gradient of the gradient checked, against
      torch's double backward and float64 finite differences
      (``tests/test_ops_second_order.py``); there is no opting out, only ``xfails``.
    - ``second_order_ref``: the torch function whose double backward is the reference, where
      ``ref``'s own is wrong or missing in torch (None: ``ref``).
    - ``second_order_sample``: the sample (by name) the second-order check uses (None: the
      first sample); one sample per row keeps that check cheap.
    - ``xfails``: known bugs, ``{check: reason}``; the consumer of that check marks the
      (row, sample) ``xfail(strict=True)`` (``marks(case, check)``), so the bug stays
      visible and the test turns red once it is fixed. Checks: see ``CHECKS``.
    - ``supports_jit``: ``tests/test_jit_ops.py`` runs the row under ``ndl.jit``.
    - ``nondeterministic``: the op draws from NumPy's global RNG; consumers seed it with
      ``RANDOM_SEED`` (``reseed()``) before every evaluation, eager, graph, jit and torch.
    """

    op: str
    fn: Callable
    ref: Callable
    samples: list[SampleInput]
    variant: str = ""
    differentiable: bool = True
    second_order_ref: Callable | None = None
    second_order_sample: str | None = None
    xfails: Mapping[str, str] = field(default_factory=dict)
    supports_jit: bool = True
    nondeterministic: bool = False
    rtol: float = 1e-5
    atol: float = 1e-6
    fd_rtol: float = 1e-5

    @property
    def name(self) -> str:
        """The row's id: the op, and the call form after a dot (``summation.method``)."""
        return f"{self.op}.{self.variant}" if self.variant else self.op

    def __repr__(self) -> str:
        return self.name

    def call(self, sample: SampleInput, *inputs):
        """needle: ``fn(*inputs, *sample.args, **sample.kwargs)``."""
        return self.fn(*inputs, *sample.args, **sample.kwargs)

    def call_ref(self, sample: SampleInput, *inputs, second_order: bool = False):
        """torch: ``ref`` (or ``second_order_ref``) on torch tensors, the same attributes."""
        ref = self.second_order_ref if second_order and self.second_order_ref else self.ref
        return ref(*inputs, *sample.args, **sample.kwargs)

    def reseed(self) -> None:
        """Seed NumPy's global RNG if this op draws from it (a no-op otherwise)."""
        if self.nondeterministic:
            np.random.seed(RANDOM_SEED)

    def marks(self, check: str) -> list:
        """pytest marks for this row in ``check``: a strict xfail where ``xfails`` names it."""
        assert check in CHECKS, check
        reason = self.xfails.get(check)
        return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []

    def sample_for_second_order(self) -> SampleInput:
        if self.second_order_sample is None:
            return self.samples[0]
        return next(s for s in self.samples if s.name == self.second_order_sample)


# the checks a row's ``xfails`` may name (the test functions that read them)
CHECKS = ("forward", "gradient_torch", "gradient_fd", "gradient_without_graph", "jit",
          "session", "second_order_torch", "second_order_fd")


# -- torch references ---------------------------------------------------------------------------
def _dims(a, axes) -> tuple:
    """needle's ``axes`` (None, an int or a tuple) as torch's ``dim`` tuple."""
    if axes is None:
        return tuple(range(a.ndim))
    return (axes,) if isinstance(axes, int) else tuple(axes)


def _torch_index(index):
    """A NumPy-style index with NumPy arrays in it, with torch tensors instead."""
    if isinstance(index, np.ndarray):
        return torch.tensor(index)
    if isinstance(index, tuple):
        return tuple(torch.tensor(i) if isinstance(i, np.ndarray) else i for i in index)
    return index


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


def _torch_scatter(x, index, shape):
    """Zeros of ``shape`` with x added at ``index`` (repeated indices accumulate)."""
    index = _torch_index(index)
    out = torch.zeros(shape, dtype=x.dtype)
    if any(isinstance(i, torch.Tensor) for i in index):
        return out.index_put(index, x, accumulate=True)
    out[index] = x
    return out


def _torch_take(a, ids, axis=0):
    """``np.take(a, ids, axis)`` with index_select (which takes 1-d ids)."""
    flat = torch.index_select(a, axis, torch.tensor(ids).reshape(-1))
    return flat.reshape(*a.shape[:axis], *ids.shape, *a.shape[axis + 1:])


def _torch_unsqueeze(a, axes):
    """np.expand_dims's axes (counted in the output) as successive torch unsqueezes."""
    rank = a.dim() + len(axes)
    for axis in sorted(x % rank for x in axes):
        a = a.unsqueeze(axis)
    return a


def _torch_index_add(v, ids, size, axis=0):
    """Zeros with ``size`` along ``axis``, the slices of v added at ids (torch.index_add)."""
    flat = v.reshape(*v.shape[:axis], ids.size, *v.shape[axis + ids.ndim:])
    out = torch.zeros(*v.shape[:axis], size, *v.shape[axis + ids.ndim:], dtype=v.dtype)
    return out.index_add(axis, torch.tensor(ids).reshape(-1), flat)


def _torch_scatter_add(v, ids, size, axis=-1):
    shape = list(v.shape)
    shape[axis] = size
    return torch.zeros(shape, dtype=v.dtype).scatter_add(axis, torch.tensor(ids), v)


def _torch_normalize(a, axes=None, eps=1e-5, given_stats=False):
    dims = _dims(a, axes)
    return (a - a.mean(dims, keepdim=True)) / torch.sqrt(
        a.var(dims, unbiased=False, keepdim=True) + eps)


def _torch_normalize_grad(g, y, s, axes, eps=1e-5, given_var=False):
    var = s if given_var else s.var(axes, unbiased=False, keepdim=True)
    return ((g - g.mean(axes, keepdim=True) - y * (g * y).mean(axes, keepdim=True))
            / torch.sqrt(var + eps))


def _torch_batch_norm(x, w, b, axes=(0,), eps=1e-5):
    """Training-mode batch norm (the channel axis is 1, the only one not in ``axes``)."""
    return torch.nn.functional.batch_norm(x, None, None, w.reshape(-1), b.reshape(-1),
                                          training=True, eps=eps)


def _torch_batch_norm_composite(x, w, b, axes=(0,), eps=1e-5):
    """The same as elementary torch ops, differentiable to any order (torch's own
    ``batch_norm`` double backward treats the saved batch statistics as constants, so its
    third derivative in x is wrong: ``torch.autograd.gradgradcheck`` of
    ``_torch_batch_norm_grad`` fails)."""
    shape = [1] * x.ndim
    shape[1] = -1
    mean = x.mean(axes, keepdim=True)
    var = x.var(axes, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w.reshape(shape) + b.reshape(shape)


def _torch_batch_norm_grad(g, x, w, axes=(0,), batch_norm=_torch_batch_norm):
    """dx + 2 dw + 3 db of training-mode batch norm, differentiable (create_graph)."""
    b = torch.zeros_like(w, requires_grad=True)
    x_in = x if x.requires_grad else x.detach().requires_grad_(True)
    w_in = w if w.requires_grad else w.detach().requires_grad_(True)
    y = batch_norm(x_in, w_in, b, axes=axes, eps=1e-5)
    dx, dw, db = torch.autograd.grad(y, [x_in, w_in, b], g, create_graph=True)
    return dx + dw * 2.0 + db * 3.0


def _torch_layer_norm(x, w, b, eps=1e-5):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps)


def _torch_layer_norm_composite(x, w, b, eps=1e-5):
    """The same as elementary torch ops (the second-order reference)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _torch_layer_norm_grad(g, x, w, eps=1e-5, layer_norm=_torch_layer_norm):
    """dx + 2 dw + 3 db of layer norm, differentiable (create_graph)."""
    b = torch.zeros_like(w, requires_grad=True)
    x_in = x if x.requires_grad else x.detach().requires_grad_(True)
    w_in = w if w.requires_grad else w.detach().requires_grad_(True)
    y = layer_norm(x_in, w_in, b, eps=eps)
    dx, dw, db = torch.autograd.grad(y, [x_in, w_in, b], g, create_graph=True)
    return dx + dw * 2.0 + db * 3.0


def _layer_norm_grad(g, x, w, eps=1e-5):
    """layer_norm_grad's (dx, dweight, dbias) as dx + 2 dw + 3 db."""
    dx, dw, db = ops.layer_norm_grad(g, x, w, eps=eps)
    return dx + dw * 2.0 + db * 3.0


def _torch_heads(x, heads):
    """(B, L, heads * d) -> (B, heads, L, d)."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _torch_merged(x, like):
    """(B, heads, L, d) -> (B, L, heads * d), shaped as ``like``."""
    return x.transpose(1, 2).reshape(like.shape)


def _torch_probs(q, k, mask, heads, scale):
    """Per-head softmax(scale q k^T + mask) (B, heads, T, S)."""
    logits = scale * _torch_heads(q, heads) @ _torch_heads(k, heads).transpose(-1, -2)
    if mask:
        logits = logits + mask[0]
    return torch.softmax(logits, -1)


def _torch_attention(q, k, v, *mask, heads=1, scale=1.0):
    """Per-head softmax(scale q k^T + mask) v, heads concatenated (B, T, heads * dv)."""
    out = _torch_probs(q, k, mask, heads, scale) @ _torch_heads(v, heads)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], v.shape[2])


def _torch_attention_grad(g, q, k, v, *mask, heads=1, scale=1.0, mask_grad=True):
    """attention_grad's outputs (dq, dk, dv[, dmask]) flattened into one vector."""
    leaves = [x if x.requires_grad else x.detach().requires_grad_(True) for x in (q, k, v, *mask)]
    out = _torch_attention(*leaves[:3], *leaves[3:], heads=heads, scale=scale)
    grads = torch.autograd.grad(out, leaves, g, create_graph=True)[:4 if mask_grad else 3]
    return torch.cat([grad.reshape(-1) for grad in grads])


def _attention_grad(g, q, k, v, *mask, heads=1, scale=1.0, mask_grad=True):
    grads = ops.attention_grad(g, q, k, v, *mask, heads=heads, scale=scale,
                               mask_grad=mask_grad)
    n = 4 if mask and mask_grad else 3
    if mask and mask[0].shape != (q.shape[0], heads, q.shape[1], k.shape[1]):
        raise AssertionError("the samples give attention_grad full-shape masks")
    return ops.concatenate([ops.reshape(grads[i], (-1,)) for i in range(n)], axis=0)


def _attention_with_probs(q, k, v, *mask, heads=1, scale=1.0):
    both = ops.attention_with_probs(q, k, v, *mask, heads=heads, scale=scale)
    return ops.concatenate([ops.reshape(both[0], (-1,)), ops.reshape(both[1], (-1,))], axis=0)


def _torch_attention_with_probs(q, k, v, *mask, heads=1, scale=1.0):
    """(attention, its probabilities) flattened into one vector."""
    p = _torch_probs(q, k, mask, heads, scale)
    out = (p @ _torch_heads(v, heads)).transpose(1, 2).reshape(q.shape[0], q.shape[1],
                                                                v.shape[2])
    return torch.cat([out.reshape(-1), p.reshape(-1)])


#: attention_grad_probs's mask: with p given it only says whether there is one (the mask
#: made p), so it is a constant here (its gradient is zero)
_ATTENTION_MASK = np.triu(np.full((3, 3), -1e9, np.float32), 1)


def _attention_grad_probs(g, q, k, v, p, masked=False, heads=1, scale=1.0, mask_grad=True):
    mask = (_const(_ATTENTION_MASK),) if masked else ()
    grads = ops.attention_grad_probs(g, q, k, v, p, *mask, heads=heads, scale=scale,
                                     mask_grad=mask_grad)
    n = 4 if mask and mask_grad else 3
    return ops.concatenate([ops.reshape(grads[i], (-1,)) for i in range(n)], axis=0)


def _torch_attention_grad_probs(g, q, k, v, p, masked=False, heads=1, scale=1.0,
                                mask_grad=True):
    """attention's adjoint formulas with the probabilities p given: (dq, dk, dv[, ds])."""
    gh, qh, kh, vh = (_torch_heads(x, heads) for x in (g, q, k, v))
    dv = p.transpose(-1, -2) @ gh
    dp = gh @ vh.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    parts = [_torch_merged(scale * ds @ kh, q),
             _torch_merged(scale * ds.transpose(-1, -2) @ qh, k), _torch_merged(dv, v)]
    if masked and mask_grad:
        parts.append(ds)
    return torch.cat([x.reshape(-1) for x in parts])


def _nhwc(t):
    """An NCHW array seen as NHWC (the permute nn.Conv applies)."""
    return t.permute(0, 2, 3, 1)


def _torch_conv(x, w, stride=1, padding=0, nchw=False):
    x = _nhwc(x) if nchw else x
    out = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2).contiguous(),
                                     w.permute(3, 2, 0, 1).contiguous(),
                                     stride=stride, padding=padding)
    return out.permute(0, 2, 3, 1)


def _torch_conv_weight_grad(a, g, kernel_hw, stride=1, padding=0, nchw=False):
    """The kernel adjoint of conv, differentiable in ``a`` and ``g`` (conv is bilinear)."""
    a, g = (_nhwc(a), _nhwc(g)) if nchw else (a, g)
    w0 = torch.zeros((*kernel_hw, a.shape[3], g.shape[3]), dtype=a.dtype, requires_grad=True)
    out = _torch_conv(a, w0, stride, padding)
    return torch.autograd.grad(out, w0, g, create_graph=True)[0]


def _torch_conv_input_grad(g, b, stride=1, padding=0, in_hw=None, nchw=False):
    """The input adjoint of conv, differentiable in ``g`` and ``b``; ``in_hw=None`` is the
    smallest input that gives g's size, ``(h - 1) * stride + k - 2 * padding``."""
    g = _nhwc(g) if nchw else g
    if in_hw is None:
        in_hw = tuple((g.shape[1 + i] - 1) * stride + b.shape[i] - 2 * padding for i in (0, 1))
    x0 = torch.zeros((g.shape[0], *in_hw, b.shape[2]), dtype=g.dtype, requires_grad=True)
    out = _torch_conv(x0, b, stride, padding)
    return torch.autograd.grad(out, x0, g, create_graph=True)[0]


# -- needle call forms --------------------------------------------------------------------------
def _batch_norm(x, w, b, axes=(0,), eps=1e-5):
    """batch_norm with x's own statistics, as BatchNorm1d/2d call it in training."""
    return ops.batch_norm(x, w, b, ops.mean(x, axes, keepdims=True),
                          ops.variance(x, axes, keepdims=True), axes=axes, eps=eps)


def _batch_norm_relu(x, w, b, axes=(0,), eps=1e-5):
    """batch_norm_relu with x's own statistics (eager BatchNorm2d then ReLU in training)."""
    return ops.batch_norm_relu(x, w, b, ops.mean(x, axes, keepdims=True),
                               ops.variance(x, axes, keepdims=True), axes=axes, eps=eps)


def _torch_batch_norm_relu(x, w, b, axes=(0,), eps=1e-5):
    return torch.relu(_torch_batch_norm(x, w, b, axes=axes, eps=eps))


def _batch_norm_grad(g, x, w, axes=(0,)):
    """batch_norm_grad with x's own statistics, its (dx, dweight, dbias) as dx + 2 dw + 3 db."""
    dx, dw, db = ops.batch_norm_grad(g, x, w, ops.mean(x, axes, keepdims=True),
                                     ops.variance(x, axes, keepdims=True), axes=axes, eps=1e-5)
    return dx + dw * 2.0 + db * 3.0


def _relu_bias(shape: tuple) -> np.ndarray:
    """A fixed BatchNorm bias for batch_norm_relu_grad rows (like relu_grad's a, a constant:
    its gradient, through the ReLU's mask only, is 0)."""
    return np.linspace(-0.6, 0.6, int(np.prod(shape))).reshape(shape).astype(np.float32)


def _batch_norm_relu_grad(g, x, w, axes=(0,)):
    """batch_norm_relu_grad with x's own statistics, its (dx, dweight, dbias) as
    dx + 2 dw + 3 db."""
    dx, dw, db = ops.batch_norm_relu_grad(g, x, w, _const(_relu_bias(tuple(w.shape))),
                                          ops.mean(x, axes, keepdims=True),
                                          ops.variance(x, axes, keepdims=True), axes=axes,
                                          eps=1e-5)
    return dx + dw * 2.0 + db * 3.0


def _torch_batch_norm_relu_grad(g, x, w, axes=(0,), batch_norm=_torch_batch_norm):
    """_torch_batch_norm_grad of g masked where BatchNorm's output is positive."""
    b = torch.tensor(_relu_bias(tuple(w.shape)), dtype=w.dtype)
    mask = (batch_norm(x, w, b, axes=axes, eps=1e-5).detach() > 0).to(g.dtype)
    return _torch_batch_norm_grad(g * mask, x, w, axes, batch_norm)


def _batch_stats(x, axes=(0,)):
    """batch_stats's (mean, variance) as mean + 2 variance (one output: both get gradients)."""
    mean, var = ops.batch_stats(x, axes)
    return mean + var * 2.0


def _torch_batch_stats(x, axes=(0,)):
    return x.mean(axes, keepdim=True) + x.var(axes, unbiased=False, keepdim=True) * 2.0


def _normalize(a, axes=None, eps=1e-5, given_stats=False):
    """normalize with its own statistics (``given_stats``: passed in, as BatchNorm does)."""
    if given_stats:
        return ops.normalize(a, ops.mean(a, axes, keepdims=True),
                             ops.variance(a, axes, keepdims=True), axes=axes, eps=eps)
    return ops.normalize(a, axes=axes, eps=eps)


def _torch_max_pool_scatter(x, g, kernel_size, stride):
    """torch's max_pool2d backward: ``g`` at each window's first maximum (differentiable in g)."""
    x0 = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = torch.nn.functional.max_pool2d(x0, kernel_size, stride)
        (dx,) = torch.autograd.grad(y, x0, g, create_graph=True)
    return dx + 0 * x  # no gradient through x (the argmax is piecewise constant)


def _torch_max_pool_gather(x, a, kernel_size, stride):
    """``a`` read at each window's first maximum of ``x`` (torch's pooling indices)."""
    _, index = torch.nn.functional.max_pool2d(x.detach(), kernel_size, stride,
                                              return_indices=True)
    picked = a.flatten(2).gather(2, index.flatten(2)).view(index.shape)
    return picked + 0 * x.sum()


def _max_pool_scatter(x, g, **attrs):
    # + 0 * x, as in the torch reference: x gets a (zero) gradient in both
    return ops.max_pool2d_scatter(x, ops.max_pool2d(x, **attrs), g, **attrs) + 0 * x


def _max_pool_gather(x, a, **attrs):
    return ops.max_pool2d_gather(x, ops.max_pool2d(x, **attrs), a, **attrs) + 0 * x.sum()


def _conv(a, b, nchw=False, **attrs):
    return ops.conv(ops.permute(a, (0, 2, 3, 1)) if nchw else a, b, **attrs)


def _conv_bias(a, b, c, nchw=False, **attrs):
    return ops.conv_bias(ops.permute(a, (0, 2, 3, 1)) if nchw else a, b, c, **attrs)


def _torch_conv_bias(x, w, c, stride=1, padding=0, nchw=False):
    return _torch_conv(x, w, stride, padding, nchw) + c


def _conv_weight_grad(a, g, kernel_hw, nchw=False, **attrs):
    if nchw:
        a, g = ops.permute(a, (0, 2, 3, 1)), ops.permute(g, (0, 2, 3, 1))
    return ops.conv_weight_grad(a, g, kernel_hw, **attrs)


def _conv_input_grad(g, b, nchw=False, **attrs):
    """(``nchw``: g stored NCHW, as nn.Conv's backward passes it)."""
    return ops.conv_input_grad(ops.permute(g, (0, 2, 3, 1)) if nchw else g, b, **attrs)


def _nhwc_batch_stats(x):
    """BatchNorm2d's statistics of NHWC ``x`` (its NCHW view over N, H, W), (1, C, 1, 1)."""
    xn = ops.permute(x, (0, 3, 1, 2))
    return ops.mean(xn, (0, 2, 3), keepdims=True), ops.variance(xn, (0, 2, 3), keepdims=True)


def _batch_norm_relu_conv_bias(x, w, b, c, **attrs):
    """batch_norm_relu_conv_bias with x's own statistics and a fixed BatchNorm bias."""
    mean, var = _nhwc_batch_stats(x)
    return ops.batch_norm_relu_conv_bias(x, w, _const(_relu_bias(tuple(w.shape))), mean, var,
                                         b, c, eps=1e-5, **attrs)


def _batch_norm_relu_conv_weight_grad(x, w, g, kernel_hw, **attrs):
    mean, var = _nhwc_batch_stats(x)
    return ops.batch_norm_relu_conv_weight_grad(x, w, _const(_relu_bias(tuple(w.shape))),
                                                mean, var, g, kernel_hw, eps=1e-5, **attrs)


def _torch_bn_relu_nhwc(x, w, batch_norm=_torch_batch_norm):
    """relu(BatchNorm2d(x)) of NHWC x, NHWC (the bias: _relu_bias)."""
    bias = torch.tensor(_relu_bias(tuple(w.shape)), dtype=w.dtype)
    y = batch_norm(x.permute(0, 3, 1, 2), w, bias, axes=(0, 2, 3), eps=1e-5)
    return torch.relu(y).permute(0, 2, 3, 1)


def _torch_batch_norm_relu_conv_bias(x, w, b, c, stride=1, padding=0,
                                     batch_norm=_torch_batch_norm):
    return _torch_conv_bias(_torch_bn_relu_nhwc(x, w, batch_norm), b, c, stride, padding)


def _torch_batch_norm_relu_conv_weight_grad(x, w, g, kernel_hw, stride=1, padding=0,
                                            batch_norm=_torch_batch_norm):
    return _torch_conv_weight_grad(_torch_bn_relu_nhwc(x, w, batch_norm), g, kernel_hw, stride,
                                   padding)


def _batch_norm_relu_mean(x, w):
    """batch_norm_relu_mean with x's own statistics and a fixed BatchNorm bias."""
    mean, var = _nhwc_batch_stats(x)
    return ops.batch_norm_relu_mean(x, w, _const(_relu_bias(tuple(w.shape))), mean, var,
                                    eps=1e-5)


def _torch_batch_norm_relu_mean(x, w, batch_norm=_torch_batch_norm):
    return _torch_bn_relu_nhwc(x, w, batch_norm).mean(dim=(1, 2))


def _bn_relu_nchw(x, w):
    """(NCHW view of NHWC ``x``, BatchNorm's weight, fixed bias, x's statistics)."""
    mean, var = _nhwc_batch_stats(x)
    return ops.permute(x, (0, 3, 1, 2)), w, _const(_relu_bias(tuple(w.shape))), mean, var


def _batch_norm_relu_max_pool2d(x, w, **attrs):
    """batch_norm_relu_max_pool2d of NHWC x's NCHW view (a conv's output), its own
    statistics, a fixed BatchNorm bias."""
    return ops.batch_norm_relu_max_pool2d(*_bn_relu_nchw(x, w), eps=1e-5, **attrs)


def _torch_batch_norm_relu_max_pool2d(x, w, kernel_size, stride,
                                      batch_norm=_torch_batch_norm):
    act = _torch_bn_relu_nhwc(x, w, batch_norm).permute(0, 3, 1, 2)
    return torch.nn.functional.max_pool2d(act, kernel_size, stride)


def _batch_norm_relu_max_pool2d_grad(g, x, w, **attrs):
    """batch_norm_relu_max_pool2d_grad for the pool of NHWC x's block (as
    _batch_norm_relu_max_pool2d makes it), its (dx, dweight, dbias) as dx + 2 dw + 3 db."""
    xn, w, b, mean, var = _bn_relu_nchw(x, w)
    y = ops.batch_norm_relu_max_pool2d(xn, w, b, mean, var, eps=1e-5, **attrs)
    dx, dw, db = ops.batch_norm_relu_max_pool2d_grad(g, y, xn, w, b, mean, var, eps=1e-5,
                                                     **attrs)
    return dx + dw * 2.0 + db * 3.0


def _torch_batch_norm_relu_max_pool2d_grad(g, x, w, kernel_size, stride,
                                           batch_norm=_torch_batch_norm):
    """_torch_batch_norm_relu_grad of the pool's gradient g scattered to its input."""
    act = _torch_bn_relu_nhwc(x, w, batch_norm).permute(0, 3, 1, 2)
    scattered = _torch_max_pool_scatter(act, g, kernel_size, stride)
    return _torch_batch_norm_relu_grad(scattered, x.permute(0, 3, 1, 2), w, (0, 2, 3),
                                       batch_norm)


def _const(array) -> ndl.Tensor:
    return ndl.Tensor(array, requires_grad=False)


_IDX = np.array([2, 0, 2, 1])
_COND = np.array([[True, False, True, True], [False, False, True, False], [True] * 4])
_RELU_AT = np.array([[0.5, -1.0, 0.0, 2.0], [-0.0, 1e-3, -2.5, 3.0], [np.nan, -1e-3, 1.0, -0.5]],
                    np.float32)  # relu_grad's a: both signs, zeros and NaN (gradient 0 there)

B, BC, S1, SC, BT, V, L, A = (Kind.BASIC, Kind.BROADCAST, Kind.SIZE_ONE, Kind.SCALAR,
                              Kind.BATCHED, Kind.VECTOR, Kind.LAYOUT, Kind.ATTRS)


OP_TABLE: list[OpInfo] = [
    # -- elementwise arithmetic (broadcasting, size-1 dims, 0-d) --
    OpInfo("add", lambda a, b: a + b, lambda a, b: a + b,
           [S(normal((3, 4), (3, 4)), "basic"), S(normal((3, 1), (1, 4)), "size_one", S1),
            S(normal((2, 3, 4), (4,)), "broadcast", BC), S(normal((), (2, 3)), "scalar", SC)],
           second_order_sample="broadcast"),
    OpInfo("add_scalar", lambda a: a + 1.5, lambda a: a + 1.5,
           [S(normal((3, 4)), "basic"), S(normal(()), "scalar", SC)]),
    OpInfo("multiply", lambda a, b: a * b, lambda a, b: a * b,
           [S(normal((3, 4), (3, 4)), "basic"), S(normal((4, 1, 3), (2, 1)), "size_one", S1),
            S(normal((), (5,)), "scalar", SC)],
           second_order_sample="size_one"),
    OpInfo("mul_scalar", lambda a: a * -2.5, lambda a: a * -2.5, [S(normal((2, 3)), "basic")]),
    OpInfo("divide", lambda a, b: a / b, lambda a, b: a / b,
           [S(joined(normal((3, 4)), away_from_zero((3, 4))), "basic"),
            S(joined(normal((2, 3)), away_from_zero((3,))), "broadcast", BC)],
           second_order_sample="broadcast"),
    OpInfo("divide_scalar", lambda a: a / 4.0, lambda a: a / 4.0, [S(normal((3, 2)), "basic")]),
    OpInfo("apply_mask", lambda a, m: ops.apply_mask(a, m, 0.8), lambda a, m: a * m / 0.8,
           [S(normal((3, 4), (3, 4)), "basic"), S(normal((2, 3), (3,)), "broadcast", BC)]),
    OpInfo("power", lambda a, b: a**b, lambda a, b: a**b,
           [S(joined(positive((3, 4)), normal((3, 4))), "basic"),
            S(joined(positive((2, 3)), normal((3,))), "broadcast", BC)],
           second_order_sample="broadcast"),
    OpInfo("power_scalar", lambda a, exponent: a**exponent, lambda a, exponent: a**exponent,
           [S(normal((3, 4)), "cube", A, exponent=3), S(positive((4,)), "sqrt", A, exponent=0.5),
            S(positive((2, 2)), "reciprocal", A, exponent=-1),
            S(normal((5,)), "square", A, exponent=2)]),
    OpInfo("negate", lambda a: -a, lambda a: -a,
           [S(normal((3, 4)), "basic"), S(normal(()), "scalar", SC)]),
    # -- transcendental / activations --
    OpInfo("log", ops.log, torch.log, [S(positive((3, 4)), "basic")]),
    OpInfo("exp", ops.exp, torch.exp, [S(normal((3, 4)), "basic")]),
    OpInfo("relu", ops.relu, torch.relu, [S(away_from_zero((3, 4)), "basic")]),
    OpInfo("relu_grad", lambda g: ops.relu_grad(_const(_RELU_AT), g),
           lambda g: g * (torch.tensor(_RELU_AT) > 0), [S(normal((3, 4)), "basic")]),
    OpInfo("tanh", ops.tanh, torch.tanh, [S(normal((3, 4)), "basic")]),
    OpInfo("sigmoid", ops.sigmoid, torch.sigmoid, [S(normal((3, 4)), "basic")]),
    OpInfo("sqrt", ops.sqrt, torch.sqrt, [S(positive((3, 4)), "basic")]),
    OpInfo("abs", ops.abs, torch.abs, [S(away_from_zero((3, 4)), "basic")]),
    OpInfo("erf", ops.erf, torch.erf, [S(normal((4, 5)), "basic")], atol=2e-7),
    OpInfo("maximum", ops.maximum, torch.maximum,
           [S(distinct((3, 4), (3, 4)), "basic"), S(distinct((3, 4), (4,)), "broadcast", BC)],
           second_order_sample="broadcast"),
    OpInfo("where", lambda a, b: ops.where(_const(_COND), a, b),
           lambda a, b: torch.where(torch.tensor(_COND), a, b),
           [S(normal((3, 4), (3, 4)), "basic"), S(normal((3, 4), (4,)), "broadcast", BC)],
           second_order_sample="broadcast"),
    # -- non-differentiable --
    OpInfo("compare", lambda a, b: ops.compare(a, b, "lt"), lambda a, b: a < b,
           [S(normal((3, 4), (3, 4)), "basic"), S(normal((3, 4), (4,)), "broadcast", BC)],
           differentiable=False),
    OpInfo("compare_scalar", lambda a: ops.compare_scalar(a, 0.1, "ge"), lambda a: a >= 0.1,
           [S(normal((3, 4)), "basic")], differentiable=False),
    OpInfo("sign", ops.sign, torch.sign, [S(away_from_zero((3, 4)), "basic")],
           differentiable=False),
    OpInfo("full_like", lambda a: ops.full_like(a, 2.5), lambda a: torch.full_like(a, 2.5),
           [S(normal((3, 4)), "basic")], differentiable=False),
    OpInfo("bernoulli_like", lambda a: ops.bernoulli_like(a, 0.3),
           lambda a: torch.tensor(np.random.rand(*a.shape).astype(np.float32) <= 0.3).float(),
           [S(normal((4, 5)), "basic")], differentiable=False, nondeterministic=True),
    OpInfo("to_device", lambda a: ops.to_device(a, ndl.cpu()), lambda a: a.clone(),
           [S(normal((3, 4)), "basic")]),
    OpInfo("stop_gradient", ops.stop_gradient, lambda a: a.detach(),
           [S(normal((3, 4)), "basic")], differentiable=False),
    # collectives across MPI ranks: in the test process (a world of one) each is the identity,
    # and so is its gradient; several ranks: tests/test_distributed.py (closed forms)
    OpInfo("all_reduce", ops.all_reduce, lambda a, op="sum": a.clone(),
           [S(normal((3, 4)), "basic"), S(normal((2, 3)), "mean", A, op="mean")]),
    OpInfo("broadcast", ops.broadcast, lambda a, root=0: a.clone(),
           [S(normal((3, 4)), "basic")]),
    OpInfo("reduce_to_root", ops.reduce_to_root, lambda a, root=0: a.clone(),
           [S(normal((3, 4)), "basic")]),
    OpInfo("all_gather", ops.all_gather, lambda a: a.clone(), [S(normal((3, 4)), "basic")]),
    OpInfo("reduce_scatter", ops.reduce_scatter, lambda a: a.clone(),
           [S(normal((3, 4)), "basic")]),
    # a check: identity on valid class ids (bad ones: tests/test_checks.py)
    OpInfo("check_class_ids", ops.check_class_ids, lambda a, *args, **kwargs: a.clone(),
           [S(lambda rng: [rng.integers(0, 4, (6,)).astype(np.float32)], "float_ids", B, 4),
            S(lambda rng: [rng.integers(0, 4, (2, 3))], "int_labels", A, classes=4,
              what="labels")],
           differentiable=False),
    # store makes its target inside fn: a trace keeps the one it made, so jit replays blend
    # into it (the JIT's documented capture of tensors made while tracing)
    OpInfo("store", lambda a: ops.store(a * 2, target=_const(np.zeros(a.shape, np.float32))),
           lambda a: a * 2, [S(normal((2, 3)), "basic")], differentiable=False,
           supports_jit=False),
    OpInfo("store", lambda a: ops.store(a, target=_const(np.ones(6, np.float32)), momentum=0.25),
           lambda a: 0.75 + 0.25 * a.reshape(6), [S(normal((2, 3)), "basic")],
           variant="momentum", differentiable=False, supports_jit=False),
    OpInfo("store", lambda a: ops.store(a[0], a * 2, target=_const(np.ones(3, np.float32)),
                                        momentum=0.5),
           lambda a: 0.5 + 0.5 * a[0], [S(normal((4, 3)), "basic")],
           variant="after", differentiable=False, supports_jit=False),
    OpInfo("astype", lambda a: ops.astype(a, "float64"), lambda a: a.double(),
           [S(normal((3, 4)), "basic")]),
    # -- linear algebra --
    OpInfo("matmul", lambda a, b: a @ b, lambda a, b: a @ b,
           [S(normal((3, 4), (4, 5)), "basic"), S(normal((2, 3, 4), (4, 5)), "batched", BT),
            S(normal((2, 1, 3, 4), (5, 4, 2)), "batched_broadcast", BT),
            S(normal((1, 1), (1, 3)), "size_one", S1),
            # 1-D operands as np.matmul: vector @ matrix, matrix @ vector, vector @ vector,
            # and vectors against batched matrices
            S(normal((4,), (4, 2)), "vec_mat", V), S(normal((3, 4), (4,)), "mat_vec", V),
            S(normal((4,), (4,)), "vec_vec", V), S(normal((2, 3, 4), (4,)), "batched_vec", V),
            S(normal((4,), (2, 4, 3)), "vec_batched", V)],
           rtol=1e-4, atol=1e-5,
           second_order_sample="batched_broadcast"),
    # matmul's and linear's gradient products (g @ b^T, a^T @ g) as one node
    OpInfo("transposed_matmul", ops.transposed_matmul,
           lambda a, b, ta=False, tb=False: (a.transpose(-1, -2) if ta else a)
           @ (b.transpose(-1, -2) if tb else b),
           [S(normal((3, 4), (5, 4)), "b_swapped", B, False, True),
            S(normal((4, 3), (4, 5)), "a_swapped", B, True, False),
            S(normal((4, 3), (5, 4)), "both_swapped", B, True, True),
            S(normal((3, 4), (4, 5)), "none_swapped", B),
            S(normal((2, 1, 4, 3), (5, 2, 4)), "batched_broadcast", BT, True, True)],
           rtol=1e-4, atol=1e-5, second_order_sample="batched_broadcast"),
    # nn.Linear's product and bias in one node
    OpInfo("linear", ops.linear, lambda x, w, b: x @ w + b,
           [S(normal((3, 4), (4, 5), (1, 5)), "row_bias", BC),
            S(normal((3, 4), (4, 5), (5,)), "vector_bias", V),
            S(normal((3, 4), (4, 5), (3, 5)), "full_bias", B)],
           rtol=1e-4, atol=1e-5),
    # a jitted plan's linear with the ReLU or the residual add after it, one node each
    OpInfo("linear_relu", ops.linear_relu, lambda x, w, b: torch.relu(x @ w + b),
           [S(normal((3, 4), (4, 5), (1, 5)), "row_bias", BC),
            S(normal((3, 4), (4, 5), (5,)), "vector_bias", V)],
           rtol=1e-4, atol=1e-5),
    OpInfo("linear_residual", ops.linear_residual, lambda x, w, b, r: r + (x @ w + b),
           [S(normal((3, 4), (4, 5), (1, 5), (3, 5)), "row_bias", BC),
            S(normal((3, 4), (4, 5), (5,), (3, 5)), "vector_bias", V)],
           rtol=1e-4, atol=1e-5),
    # -- reductions --
    OpInfo("summation", ops.summation,
           lambda a, axes=None, keepdims=False: a.sum(_dims(a, axes), keepdim=keepdims),
           [S(normal((2, 3, 4)), "axes", A, axes=(0, 2)),
            S(normal((3, 4)), "keepdims", A, 1, keepdims=True),
            S(normal((2, 1, 4)), "negative_axis", S1, -1)]),
    OpInfo("summation", lambda a: a.sum(), lambda a: a.sum(), [S(normal((3, 4)), "all")],
           variant="method"),
    OpInfo("mean", ops.mean,
           lambda a, axes=None, keepdims=False: a.mean(_dims(a, axes), keepdim=keepdims),
           [S(normal((3, 4, 2)), "axes", A, axes=(1,))]),
    OpInfo("mean", lambda a: a.mean(), lambda a: a.mean(), [S(normal((3, 4)), "all")],
           variant="method"),
    OpInfo("max", ops.max,
           lambda a, axes=None, keepdims=False: a.amax(_dims(a, axes), keepdim=keepdims),
           [S(distinct((3, 4, 2)), "axes", A, axes=(1,)),
            S(distinct((3, 4)), "keepdims", A, 0, keepdims=True)]),
    OpInfo("max", lambda a: a.max(), lambda a: a.amax(), [S(distinct((3, 4)), "all")],
           variant="method"),
    OpInfo("logsumexp", ops.logsumexp,
           lambda a, axes=None, keepdims=False: a.logsumexp(_dims(a, axes), keepdim=keepdims),
           [S(normal((3, 4)), "axes", A, axes=(1,)), S(normal((2, 5)), "all")]),
    OpInfo("variance", ops.variance,
           lambda a, axes=None, keepdims=False: a.var(_dims(a, axes), unbiased=False,
                                                      keepdim=keepdims),
           [S(normal((5, 3)), "axes", A, axes=(0,)),
            S(normal((3, 2, 4)), "keepdims", A, (0, 2), keepdims=True)]),
    OpInfo("normalize", _normalize, _torch_normalize,
           [S(normal((6, 4)), "axes", A, axes=(0,), eps=1e-5),
            S(normal((6, 4)), "given_stats", A, axes=(0,), eps=1e-5, given_stats=True),
            S(normal((3, 2, 2, 3)), "nchw_axes", A, axes=(0, 2, 3), eps=1e-3)],
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    OpInfo("normalize_grad", ops.normalize_grad, _torch_normalize_grad,
           [S(normal((6, 4), (6, 4), (6, 4)), "axes", A, axes=(0,), eps=1e-5),
            S(joined(normal((6, 4), (6, 4)), positive((1, 4))), "given_var", BC, axes=(0,),
              eps=1e-5, given_var=True)],
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    OpInfo("batch_stats", _batch_stats, _torch_batch_stats,
           [S(normal((6, 4)), "axes", A, axes=(0,)),
            S(normal((3, 2, 2, 3)), "nchw_axes", A, axes=(0, 2, 3))],
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    OpInfo("batch_norm", _batch_norm, _torch_batch_norm,
           [S(normal((6, 4), (4,), (4,)), "axes", BC, axes=(0,), eps=1e-5),
            S(normal((3, 2, 2, 3), (1, 2, 1, 1), (1, 2, 1, 1)), "nchw_axes", A,
              axes=(0, 2, 3), eps=1e-3)],
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    OpInfo("batch_norm_relu", _batch_norm_relu, _torch_batch_norm_relu,
           [S(normal((6, 4), (4,), (4,)), "axes", BC, axes=(0,), eps=1e-5),
            S(normal((3, 2, 2, 3), (1, 2, 1, 1), (1, 2, 1, 1)), "nchw_axes", A,
              axes=(0, 2, 3), eps=1e-3)],
           second_order_ref=lambda x, w, b, axes=(0,), eps=1e-5: torch.relu(
               _torch_batch_norm_composite(x, w, b, axes=axes, eps=eps)),
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    # all three adjoints in one output, so every input gets a gradient (db needs neither x nor w)
    OpInfo("batch_norm_grad", _batch_norm_grad, _torch_batch_norm_grad,
           [S(normal((6, 4), (6, 4), (4,)), "axes", BC, axes=(0,)),
            S(normal((3, 2, 2, 3), (3, 2, 2, 3), (1, 2, 1, 1)), "nchw_axes", A,
              axes=(0, 2, 3))],
           second_order_ref=partial(_torch_batch_norm_grad,
                                    batch_norm=_torch_batch_norm_composite),
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    # batch_norm_grad through the ReLU after the BatchNorm (the fused op compiled plans run)
    OpInfo("batch_norm_relu_grad", _batch_norm_relu_grad, _torch_batch_norm_relu_grad,
           [S(normal((6, 4), (6, 4), (4,)), "axes", BC, axes=(0,)),
            S(normal((3, 2, 2, 3), (3, 2, 2, 3), (1, 2, 1, 1)), "nchw_axes", A,
              axes=(0, 2, 3))],
           second_order_ref=partial(_torch_batch_norm_relu_grad,
                                    batch_norm=_torch_batch_norm_composite),
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    OpInfo("layer_norm", ops.layer_norm, _torch_layer_norm,
           [S(normal((6, 5), (5,), (5,)), "rows", BC, eps=1e-5),
            S(normal((2, 3, 4), (4,), (4,)), "batched", BT, eps=1e-3)],
           second_order_ref=_torch_layer_norm_composite,
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    # all three adjoints in one output, so every input gets a gradient
    OpInfo("layer_norm_grad", _layer_norm_grad, _torch_layer_norm_grad,
           [S(normal((6, 5), (6, 5), (5,)), "rows", BC),
            S(normal((2, 3, 4), (2, 3, 4), (4,)), "batched", BT, eps=1e-3)],
           second_order_ref=partial(_torch_layer_norm_grad,
                                    layer_norm=_torch_layer_norm_composite),
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    OpInfo("inv_std", lambda a: ops.inv_std(a, (1,), 1e-5),
           lambda a: 1 / torch.sqrt(a.var(1, unbiased=False, keepdim=True) + 1e-5),
           [S(normal((3, 5)), "basic")], rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    OpInfo("logsoftmax", ops.logsoftmax, lambda a: torch.log_softmax(a, -1),
           [S(normal((3, 5)), "basic")]),
    OpInfo("softmax", lambda a: ops.softmax(a, axis=0), lambda a: torch.softmax(a, 0),
           [S(normal((3, 5)), "basic")]),
    # logsumexp's adjoint: softmax times one scale per row (a large sample: the blocked kernel)
    OpInfo("scaled_softmax", ops.scaled_softmax,
           lambda a, s, axis=-1: torch.softmax(a, axis) * s,
           [S(normal((4, 6), (4, 1)), "rows", BC),
            S(normal((3, 5), (1, 5)), "axis0", A, axis=0),
            S(normal((300, 250), (300, 1)), "blocked", BC)],
           second_order_sample="rows"),
    # SoftmaxLoss as one node, and its gradient (ids a constant input; a large sample: the
    # blocked kernels)
    OpInfo("softmax_cross_entropy",
           lambda z, ids: ops.softmax_cross_entropy(z, _const(ids)),
           lambda z, ids: torch.nn.functional.cross_entropy(z, torch.tensor(ids),
                                                            reduction="none"),
           [S(normal((4, 6)), "rows", A, ids=np.array([5, 0, 2, 5])),
            S(normal((300, 250)), "blocked", A, ids=np.arange(300) % 250)],
           second_order_sample="rows"),
    OpInfo("softmax_cross_entropy_grad",
           lambda z, g, ids: ops.softmax_cross_entropy_grad(z, _const(ids), g),
           lambda z, g, ids: (torch.softmax(z, -1) - torch.nn.functional.one_hot(
               torch.tensor(ids), z.shape[1]).to(z.dtype)) * g[:, None],
           [S(normal((4, 6), (4,)), "rows", A, ids=np.array([5, 0, 2, 5])),
            S(normal((300, 250), (300,)), "blocked", A, ids=np.arange(300) % 250)],
           second_order_sample="rows"),
    # a vocabulary head and its loss fused: (losses, S = softmax - onehot), not
    # differentiable; the losses carrying the gradient; the gradient from S (ids constants;
    # a large sample: several row blocks)
    OpInfo("vocab_head_softmax", vocab_ref.softmax_flat, vocab_ref.torch_softmax_flat,
           [S(normal((4, 3), (3, 6), (6,)), "rows", A, ids=np.array([5, 0, 2, 5])),
            S(normal((3, 2), (2, 5), (1, 5)), "bias_row", BC, ids=np.array([4, 0, 1]))],
           differentiable=False),
    OpInfo("vocab_head_loss", vocab_ref.loss, vocab_ref.torch_losses,
           [S(normal((4, 3), (3, 6), (6,)), "rows", A, ids=np.array([5, 0, 2, 5])),
            S(normal((3, 2), (2, 5), (1, 5)), "bias_row", BC, ids=np.array([4, 0, 1])),
            S(normal((60, 4), (4, 1200), (1200,)), "blocked", A, ids=np.arange(60) * 19 % 1200)],
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4, second_order_sample="rows"),
    OpInfo("vocab_head_loss_grad", vocab_ref.loss_grad_flat, vocab_ref.torch_loss_grad_flat,
           [S(normal((4, 3), (3, 6), (6,), (4,)), "rows", A, ids=np.array([5, 0, 2, 5])),
            S(normal((3, 2), (2, 5), (1, 5), (3,)), "w_and_b", BC, ids=np.array([4, 0, 1]),
              parts="wb")],
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    # attention: heads as strided views of (batch, length, heads * head_dim)
    OpInfo("attention", ops.attention, _torch_attention,
           [S(normal((2, 3, 4), (2, 5, 4), (2, 5, 6)), "heads", A, heads=2, scale=0.5),
            S(normal((2, 3, 4), (2, 3, 4), (2, 3, 4), (3, 3)), "mask", BC, heads=2,
              scale=0.7),
            S(normal((1, 4, 3), (1, 4, 3), (1, 4, 3), (1, 1, 1, 4)), "padding_mask", S1,
              heads=1, scale=1.0)],
           rtol=1e-4, atol=1e-5, second_order_sample="mask"),
    OpInfo("attention_grad", _attention_grad, _torch_attention_grad,
           [S(normal((2, 3, 6), (2, 3, 4), (2, 5, 4), (2, 5, 6)), "heads", A, heads=2,
              scale=0.5),
            S(normal((1, 3, 4), (1, 3, 4), (1, 3, 4), (1, 3, 4), (1, 2, 3, 3)), "mask", BT,
              heads=2, scale=0.7),
            S(normal((1, 3, 4), (1, 3, 4), (1, 3, 4), (1, 3, 4), (1, 2, 3, 3)),
              "constant_mask", BT, heads=2, scale=0.7, mask_grad=False)],
           rtol=1e-4, atol=1e-5),
    # a jitted plan's attention keeping its probabilities for the backward
    OpInfo("attention_with_probs", _attention_with_probs, _torch_attention_with_probs,
           [S(normal((2, 3, 4), (2, 5, 4), (2, 5, 6)), "heads", A, heads=2, scale=0.5),
            S(normal((2, 3, 4), (2, 3, 4), (2, 3, 4), (3, 3)), "mask", BC, heads=2,
              scale=0.7)],
           rtol=1e-4, atol=1e-5),
    OpInfo("attention_grad_probs", _attention_grad_probs, _torch_attention_grad_probs,
           [S(normal((2, 3, 6), (2, 3, 4), (2, 5, 4), (2, 5, 6), (2, 2, 3, 5)), "heads", A,
              heads=2, scale=0.5),
            S(normal((1, 3, 4), (1, 3, 4), (1, 3, 4), (1, 3, 4), (1, 2, 3, 3)), "mask", BT,
              True, heads=2, scale=0.7),
            S(normal((1, 3, 4), (1, 3, 4), (1, 3, 4), (1, 3, 4), (1, 2, 3, 3)),
              "constant_mask", BT, True, heads=2, scale=0.7, mask_grad=False)],
           rtol=1e-4, atol=1e-5),
    # -- shape --
    OpInfo("reshape", lambda a: ops.reshape(a, (4, 3)), lambda a: a.reshape(4, 3),
           [S(normal((2, 6)), "basic")]),
    OpInfo("reshape", lambda a: a.reshape((-1,)), lambda a: a.reshape(-1),
           [S(normal((2, 3)), "flatten")], variant="method"),
    OpInfo("expand_dims", lambda a, axes: ops.expand_dims(a, axes),
           lambda a, axes: _torch_unsqueeze(a, axes),
           [S(normal((2, 3)), "basic", B, (0, 2)), S(normal((2, 3)), "negative", A, (-1, 1)),
            S(normal(()), "scalar", SC, (0,))]),
    OpInfo("broadcast_to", lambda a: ops.broadcast_to(a, (2, 3, 4)),
           lambda a: a.broadcast_to((2, 3, 4)),
           [S(normal((3, 1)), "size_one", S1), S(normal((4,)), "new_axes"),
            S(normal(()), "scalar", SC)]),
    OpInfo("sum_to", lambda a: ops.sum_to(a, (3, 1)), lambda a: a.sum((0, 2), keepdim=True)[0],
           [S(normal((2, 3, 4)), "basic")]),
    OpInfo("transpose", ops.transpose, lambda a, axes=(-1, -2): a.transpose(*axes),
           [S(normal((2, 3, 4)), "last_two"), S(normal((2, 3, 4)), "axes", A, (0, 2))]),
    OpInfo("permute", lambda a, axes=(2, 0, 1): ops.permute(a, axes),
           lambda a, axes=(2, 0, 1): a.permute(*axes),
           [S(normal((2, 3, 4)), "basic"),
            # negative axes: the adjoint once permuted by np.argsort of them (a wrong gradient)
            S(normal((2, 3, 4, 5)), "negative_axes", A, (0, -1, 1, 2))]),
    OpInfo("stack", lambda a, b: ops.stack([a, b, a], 1), lambda a, b: torch.stack([a, b, a], 1),
           [S(normal((3, 4), (3, 4)), "basic")]),
    OpInfo("concatenate", lambda a, b: ops.concatenate([a, b, a], 1),
           lambda a, b: torch.cat([a, b, a], 1),
           [S(normal((3, 2), (3, 4)), "basic"), S(normal((2, 1, 3), (2, 2, 3)), "size_one", S1)]),
    OpInfo("split", lambda a: ops.split(a, 1)[2] * 2 + ops.split(a, 1)[0],
           lambda a: a[:, 2] * 2 + a[:, 0], [S(normal((3, 4, 2)), "basic")]),
    OpInfo("make_tuple", lambda a, b: ops.make_tuple(a, b)[1] - ops.make_tuple(a, b)[0] * 3,
           lambda a, b: b - a * 3, [S(normal((3, 2), (3, 2)), "basic")]),
    OpInfo("tuple_get_item", lambda a: ops.split(a, 0)[1] * ops.split(a, 0)[1],
           lambda a: a[1] * a[1], [S(normal((3, 4)), "basic")]),
    OpInfo("flip", lambda a: ops.flip(a, (0, 2)), lambda a: a.flip((0, 2)),
           [S(normal((2, 3, 4)), "basic")]),
    OpInfo("dilate", lambda a: ops.dilate(a, (0, 1), 2), lambda a: _torch_dilate(a, (0, 1), 2),
           [S(normal((2, 3)), "basic")]),
    OpInfo("undilate", lambda a: ops.undilate(a, (1,), 1), lambda a: a[:, ::2],
           [S(normal((3, 5)), "basic")]),
    OpInfo("getitem", lambda a, index: a[index], lambda a, index: a[_torch_index(index)],
           [S(normal((3, 5)), "slices", A, index=np.s_[1:, ::2]),
            S(normal((3, 2)), "int_array", A, index=_IDX),
            S(normal((4, 5)), "newaxis", A, index=np.s_[None, -1, 1:3]),
            S(normal((3, 3)), "two_arrays", A, index=(np.arange(3), np.array([0, 2, 1]))),
            S(normal((2, 3, 2)), "ellipsis", A, index=np.s_[..., 0])],
           second_order_sample="int_array"),
    OpInfo("scatter", ops.scatter, _torch_scatter,
           [S(normal((4, 2)), "int_array", A, (_IDX,), (3, 2)),
            S(normal((2, 2)), "slice", A, (slice(1, 3),), (4, 2))]),
    # gathers by integer ids (a constant input here; placeholder ids: tests/test_gather_ops.py)
    OpInfo("take", lambda a, ids, axis=0: ops.take(a, _const(ids), axis),
           _torch_take,
           [S(normal((5, 3)), "rows_repeated", A, ids=np.array([4, 0, 4, 2])),
            S(normal((2, 5, 3)), "axis1_2d_ids", BT, ids=np.array([[1, 4], [1, 0]]), axis=1)]),
    OpInfo("index_add", lambda v, ids, size, axis=0: ops.index_add(v, _const(ids), size, axis),
           _torch_index_add,
           [S(normal((4, 3)), "rows_repeated", A, ids=np.array([4, 0, 4, 2]), size=5),
            S(normal((2, 2, 2, 3)), "axis1_2d_ids", BT, ids=np.array([[1, 4], [1, 0]]),
              size=5, axis=1)]),
    OpInfo("take_along_axis", lambda a, ids, axis=-1: ops.take_along_axis(a, _const(ids), axis),
           lambda a, ids, axis=-1: torch.gather(a, axis, torch.tensor(ids)),
           [S(normal((4, 6)), "one_per_row", A, ids=np.array([[5], [0], [2], [5]])),
            S(normal((3, 4)), "axis0_repeated", A, ids=np.array([[2, 0, 0, 1], [2, 2, 1, 0]]),
              axis=0)]),
    OpInfo("scatter_add",
           lambda v, ids, size, axis=-1: ops.scatter_add(v, _const(ids), size, axis),
           lambda v, ids, size, axis=-1: _torch_scatter_add(v, ids, size, axis),
           [S(normal((4, 1)), "one_per_row", S1, ids=np.array([[5], [0], [2], [5]]), size=6),
            S(normal((2, 4)), "axis0_repeated", A, ids=np.array([[2, 0, 0, 1], [2, 2, 1, 0]]),
              size=3, axis=0)]),
    OpInfo("pad", lambda a: ops.pad(a, ((1, 2), (0, 1))),
           lambda a: torch.nn.functional.pad(a, (0, 1, 1, 2)), [S(normal((2, 3)), "basic")]),
    OpInfo("conv", _conv, _torch_conv,
           [S(normal((2, 5, 5, 3), (3, 3, 3, 4)), "same", A, stride=1, padding=1),
            S(normal((2, 6, 7, 2), (3, 3, 2, 3)), "stride2", A, stride=2, padding=1),
            S(normal((1, 5, 5, 2), (2, 2, 2, 1)), "stride2_unpadded", S1, stride=2),
            # an NCHW input seen through a permute (nn.Conv): output stored NCHW
            S(normal((2, 3, 6, 5), (3, 3, 3, 2)), "nchw", L, stride=2, padding=1, nchw=True),
            # ... with a map of >= 256 positions: the per-image NCHW products
            S(normal((2, 3, 16, 17), (3, 3, 3, 2)), "nchw_large", L, stride=1, padding=1,
              nchw=True),
            S(normal((1, 2, 33, 32), (3, 3, 2, 3)), "nchw_large_stride2", L, stride=2,
              padding=1, nchw=True)],
           rtol=1e-4, atol=1e-5,
           second_order_sample="stride2"),
    # conv with its bias added where the output is written (nn.Conv with bias=True)
    OpInfo("conv_bias", _conv_bias, _torch_conv_bias,
           [S(normal((2, 5, 5, 3), (3, 3, 3, 4), (4,)), "same", A, stride=1, padding=1),
            S(normal((2, 6, 7, 2), (3, 3, 2, 3), (3,)), "stride2", A, stride=2, padding=1),
            # an NCHW input with >= 256 positions: the per-image NCHW products
            S(normal((2, 3, 16, 17), (3, 3, 3, 2), (2,)), "nchw_large", L, stride=1,
              padding=1, nchw=True)],
           rtol=1e-4, atol=1e-5,
           second_order_sample="stride2"),
    # the conv adjoints; (1, 5, 5) with kernel 2 and stride 2 leaves a row and column unused
    OpInfo("conv_weight_grad", _conv_weight_grad, _torch_conv_weight_grad,
           [S(normal((2, 5, 5, 3), (2, 5, 5, 4)), "same", A, (3, 3), stride=1, padding=1),
            S(normal((2, 6, 7, 2), (2, 3, 4, 3)), "stride2", A, (3, 3), stride=2, padding=1),
            S(normal((1, 5, 5, 2), (1, 2, 2, 1)), "stride2_unused", S1, (2, 2), stride=2),
            # a and g stored NCHW with >= 256 positions: the NCHW products
            S(normal((2, 2, 32, 33), (2, 3, 16, 17)), "nchw_large", L, (3, 3), stride=2,
              padding=1, nchw=True)],
           rtol=1e-4, atol=1e-5,
           second_order_sample="stride2"),
    # a conv (and its kernel gradient) reading relu(batch_norm(x)) (the fused ops compiled
    # plans run for strided layers; these small shapes take the ops' own computations)
    OpInfo("batch_norm_relu_conv_bias", _batch_norm_relu_conv_bias,
           _torch_batch_norm_relu_conv_bias,
           [S(normal((3, 6, 7, 2), (1, 2, 1, 1), (3, 3, 2, 3), (3,)), "stride2", A, stride=2,
              padding=1)],
           second_order_ref=partial(_torch_batch_norm_relu_conv_bias,
                                    batch_norm=_torch_batch_norm_composite),
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    OpInfo("batch_norm_relu_conv_weight_grad", _batch_norm_relu_conv_weight_grad,
           _torch_batch_norm_relu_conv_weight_grad,
           [S(normal((3, 6, 7, 2), (1, 2, 1, 1), (3, 3, 4, 3)), "stride2", A, (3, 3), stride=2,
              padding=1)],
           second_order_ref=partial(_torch_batch_norm_relu_conv_weight_grad,
                                    batch_norm=_torch_batch_norm_composite),
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    # a CNN's last BatchNorm2d + ReLU + global average pool (compiled plans' fused op; a
    # large x takes its kernel)
    OpInfo("batch_norm_relu_mean", _batch_norm_relu_mean, _torch_batch_norm_relu_mean,
           [S(normal((3, 6, 7, 2), (1, 2, 1, 1)), "small", S1),
            S(normal((4, 16, 16, 64), (1, 64, 1, 1)), "kernel", BT)],
           second_order_ref=partial(_torch_batch_norm_relu_mean,
                                    batch_norm=_torch_batch_norm_composite),
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    # a BatchNorm2d + ReLU + max pool block, forward and backward (compiled plans' fused
    # ops; NHWC x seen NCHW, as a conv's output): windows that tile the map, overlap and
    # leave a row out. The forward's kernel runs on these; the backward's takes larger
    # arrays only (its bits against the ops': tests/test_batchnorm_relu_pool.py)
    OpInfo("batch_norm_relu_max_pool2d", _batch_norm_relu_max_pool2d,
           _torch_batch_norm_relu_max_pool2d,
           [S(joined(distinct((2, 4, 6, 3)), positive((1, 3, 1, 1))), "tiled", S1,
              kernel_size=2, stride=2),
            S(joined(distinct((2, 5, 7, 2)), positive((1, 2, 1, 1))), "overlapping", A,
              kernel_size=3, stride=2)],
           second_order_ref=partial(_torch_batch_norm_relu_max_pool2d,
                                    batch_norm=_torch_batch_norm_composite),
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    OpInfo("batch_norm_relu_max_pool2d_grad", _batch_norm_relu_max_pool2d_grad,
           _torch_batch_norm_relu_max_pool2d_grad,
           [S(joined(normal((2, 3, 2, 3)), distinct((2, 4, 6, 3)), positive((1, 3, 1, 1))),
              "tiled", S1, kernel_size=2, stride=2),
            S(joined(normal((2, 2, 2, 3)), distinct((2, 5, 7, 2)), positive((1, 2, 1, 1))),
              "overlapping", A, kernel_size=3, stride=2)],
           second_order_ref=partial(_torch_batch_norm_relu_max_pool2d_grad,
                                    batch_norm=_torch_batch_norm_composite),
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    OpInfo("conv_input_grad", _conv_input_grad, _torch_conv_input_grad,
           [S(normal((2, 5, 5, 4), (3, 3, 3, 4)), "same", A, stride=1, padding=1, in_hw=(5, 5)),
            S(normal((2, 3, 4, 3), (3, 3, 2, 3)), "stride2", A, stride=2, padding=1,
              in_hw=(6, 7)),
            S(normal((1, 2, 2, 1), (2, 2, 2, 1)), "stride2_unpadded", S1, stride=2,
              in_hw=(5, 5)),
            # g stored NCHW (as nn.Conv's backward passes it)
            S(normal((2, 3, 3, 4), (3, 3, 2, 3)), "nchw", L, stride=2, padding=1, in_hw=(6, 7),
              nchw=True),
            # ... with >= 256 positions: the per-image NCHW products
            S(normal((2, 3, 16, 17), (3, 3, 2, 3)), "nchw_large", L, stride=2, padding=1,
              in_hw=(32, 33), nchw=True),
            # in_hw=None: the smallest input, (3 - 1) * 2 + 3 - 2 = 5
            S(normal((2, 3, 3, 2), (3, 3, 4, 2)), "smallest_input", A, stride=2, padding=1)],
           rtol=1e-4, atol=1e-5,
           second_order_sample="stride2"),
    # max pooling: distinct values (no ties within finite-difference reach); windows that
    # tile the map (k = s), overlap (s < k) and leave a row and column unused
    OpInfo("max_pool2d", lambda x, **k: ops.max_pool2d(x, **k),
           lambda x, kernel_size, stride: torch.nn.functional.max_pool2d(x, kernel_size, stride),
           [S(distinct((2, 3, 6, 4)), "tiled", A, kernel_size=2, stride=2),
            S(distinct((1, 2, 7, 6)), "overlapping", A, kernel_size=3, stride=2),
            S(distinct((2, 1, 5, 5)), "leftover", A, kernel_size=2, stride=2)]),
    OpInfo("max_pool2d_scatter", _max_pool_scatter, _torch_max_pool_scatter,
           [S(joined(distinct((2, 3, 6, 4)), normal((2, 3, 3, 2))), "tiled", A, kernel_size=2,
              stride=2),
            S(joined(distinct((1, 2, 7, 6)), normal((1, 2, 3, 2))), "overlapping", A,
              kernel_size=3, stride=2)]),
    OpInfo("max_pool2d_gather", _max_pool_gather, _torch_max_pool_gather,
           [S(distinct((2, 3, 6, 4), (2, 3, 6, 4)), "tiled", A, kernel_size=2, stride=2),
            S(distinct((1, 2, 7, 6), (1, 2, 7, 6)), "overlapping", A, kernel_size=3,
              stride=2)]),
    # a whole LSTM layer (x_proj (seq, batch, 4h), w_hh (h, 4h)[, h0, c0]); outputs flattened
    OpInfo("lstm_sequence", lstm_ref.lstm_sequence_flat, lstm_ref.torch_lstm_sequence_flat,
           [S(normal((3, 2, 12), (3, 12), (2, 3), (2, 3)), "state"),
            S(normal((2, 2, 12), (3, 12)), "zero_state")],
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
    OpInfo("lstm_sequence_grad", lstm_ref.lstm_sequence_grad_flat,
           lstm_ref.torch_lstm_sequence_grad_flat,
           [S(normal((2, 2, 3), (2, 2, 3), (2, 2, 12), (3, 12), (2, 3), (2, 3)), "state"),
            S(normal((2, 2, 3), (2, 2, 3), (2, 2, 12), (3, 12), (2, 2, 12)), "zero_state_dacts",
              A, with_state=False, with_dacts=True)],
           rtol=1e-4, atol=1e-5, fd_rtol=1e-4),
]


def samples(table: list[OpInfo] | None = None) -> list[tuple[OpInfo, SampleInput]]:
    """Every (row, sample) pair of the table."""
    return [(case, sample) for case in (OP_TABLE if table is None else table)
            for sample in case.samples]


def sample_id(case: OpInfo, sample: SampleInput) -> str:
    """The test id of a (row, sample) pair: ``op[.variant]-sample``."""
    return f"{case.name}-{sample.name}"


def params(check: str, pairs: list[tuple[OpInfo, SampleInput]] | None = None) -> list:
    """``pytest.param(row, sample)`` for each pair (default: all), with its id and the strict
    xfail marks the row's ``xfails`` gives ``check``."""
    return [pytest.param(case, sample, id=sample_id(case, sample), marks=case.marks(check))
            for case, sample in (samples() if pairs is None else pairs)]


def all_cases() -> list[tuple[OpInfo, Callable, Callable, Make]]:
    """Every (row, needle fn, torch fn, make) with the sample's attributes bound: the flat
    form older consumers use (``fn(*tensors)``, ``ref(*torch_tensors)``, ``make(rng)``)."""
    out = []
    for case, sample in samples():
        out.append((case, partial(case.call, sample), partial(case.call_ref, sample),
                    sample.make))
    return out
