"""Basic layers: Identity, Linear, Flatten, activations, Sequential, Residual, norms, Dropout.

Forward passes use only needle ops, so the layers also run on lazy graph tensors (Session,
JIT). The one exception is eager training BatchNorm where nothing records the graph: its
batch statistics and running averages are computed at once, with no nodes (no gradient reads
them), the values the ``batch_stats`` and ``store`` ops give.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import init, ops
from ..autograd import Tensor
from ..core.context import active_trace, unobserved_eager
from ..core.ops_norm import batch_statistics
from ..core.ops_state import store_into
from .module import Buffer, Module, Parameter

__all__ = [
    "GELU", "BatchNorm1d", "BatchNorm2d", "Dropout", "Flatten", "Identity", "LayerNorm1d",
    "Linear", "ReLU", "Residual", "Sequential", "Sigmoid", "Softmax", "Tanh",
]


def _prod(dims: tuple) -> int:
    return int(np.prod(dims)) if dims else 1


def _check_last_dim(module: str, x: Tensor, dim: int, what: str) -> None:
    if len(x.shape) == 0 or x.shape[-1] != dim:
        raise ValueError(f"{module}: expected input with last dim {what}={dim}, got shape "
                         f"{tuple(x.shape)}")


# -- simple layers ----------------------------------------------------------------------------
class Identity(Module):
    """y = x."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class Linear(Module):
    """y = X @ W + b, W (in_features, out_features), b (1, out_features).

    W is drawn first with ``kaiming_uniform(in, out)``, then b with ``kaiming_uniform(out, 1)``
    reshaped to (1, out) (needle's order, so a seeded RNG gives needle's weights). X may have
    any leading dims: (..., in) -> (..., out).

    >>> layer = Linear(3, 2)
    >>> layer(Tensor(np.ones((4, 3)))).shape
    (4, 2)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Any = None, dtype: Any = "float32") -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = Parameter(init.kaiming_uniform(in_features, out_features, device=device,
                                                     dtype=dtype))
        self.bias = None
        if bias:
            b = init.kaiming_uniform(out_features, 1, device=device, dtype=dtype)
            self.bias = Parameter(ops.reshape(b, (1, out_features)))

    def forward(self, X: Tensor) -> Tensor:
        shape = X.shape
        if len(shape) == 2 and shape[1] == self.in_features:  # (B, in): checked in one look
            if self.bias is not None:  # one node, as below
                return ops.linear(X, self.weight, self.bias)
            return ops.matmul(X, self.weight)
        _check_last_dim("Linear", X, self.in_features, "in_features")
        lead = tuple(X.shape[:-1])
        # -1 rather than prod(lead): a lazy graph may not know the batch size
        flat = X if len(X.shape) == 2 else ops.reshape(X, (-1, self.in_features))
        if self.bias is not None:
            # one node: the product and b (1, out) added in place into it (b broadcasts, also
            # over a batch size a lazy graph may not know; the engine sums its gradient back)
            out = ops.linear(flat, self.weight, self.bias)
        else:
            out = ops.matmul(flat, self.weight)
        if len(X.shape) != 2:
            out = ops.reshape(out, (*(-1 if d is None else d for d in lead), self.out_features))
        return out


class Flatten(Module):
    """(B, d1, d2, ...) -> (B, d1 * d2 * ...)."""

    def forward(self, X: Tensor) -> Tensor:
        if len(X.shape) == 0:
            raise ValueError("Flatten: expected an input with a batch dim, got a 0-d tensor")
        batch = X.shape[0]
        return ops.reshape(X, (-1 if batch is None else batch, _prod(tuple(X.shape[1:]))))


class ReLU(Module):
    """y = max(x, 0)."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.relu(x)


class Tanh(Module):
    """y = tanh(x)."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.tanh(x)


class Sigmoid(Module):
    """y = 1 / (1 + exp(-x))."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.sigmoid(x)


class GELU(Module):
    """y = 0.5 x (1 + erf(x / sqrt 2)), or with ``approximate="tanh"``
    y = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) (PyTorch's two forms)."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        if self.approximate == "tanh":
            inner = (x + ops.power_scalar(x, 3) * 0.044715) * math.sqrt(2.0 / math.pi)
            return x * 0.5 * (ops.tanh(inner) + 1.0)
        return x * 0.5 * (ops.erf(x * (1.0 / math.sqrt(2.0))) + 1.0)


class Softmax(Module):
    """y = exp(x) / sum(exp(x)) along ``dim`` (stable)."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return ops.softmax(x, axis=self.dim)


# -- composition ------------------------------------------------------------------------------
class Sequential(Module):
    """Modules applied in order: ``Sequential(f, g)(x) = g(f(x))``.

    The modules are kept in the tuple ``.modules`` (needle's attribute name).
    NOTE: that attribute hides ``Module.modules()`` on this instance, so ``train`` and
    ``named_modules`` here go through ``named_children`` instead of the method.
    """

    modules: tuple[Module, ...]  # type: ignore[assignment]  # hides Module.modules(), as above

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential: item {i} is a {type(m).__name__}, not a Module")
        self.modules = modules

    def forward(self, x: Any) -> Any:
        modules = self.modules
        last = len(modules) - 1
        i = 0
        while i <= last:
            module = modules[i]
            # a BatchNorm2d and the ReLU right after it: one node in eager training
            if type(module) is BatchNorm2d and i < last and type(modules[i + 1]) is ReLU:
                x = module.forward_relu(x, modules[i + 1])
                i += 2
                continue
            x = module(x)
            i += 1
        return x

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, index: int) -> Module:
        return self.modules[index]

    def __iter__(self):
        return iter(self.modules)


class Residual(Module):
    """y = fn(x) + x."""

    def __init__(self, fn: Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


# -- normalization ----------------------------------------------------------------------------
class BatchNorm1d(Module):
    """y = weight * (x - mean) / sqrt(var + eps) + bias per feature of (B, C) or (B, C, L) input.

    Training uses the batch mean and biased variance and updates
    ``running = (1 - momentum) * running + momentum * batch_stat`` (needle's rule: the running
    variance takes the *biased* batch variance, where PyTorch takes the unbiased one).
    Evaluation uses ``running_mean`` / ``running_var``, which are Buffers (in ``state_dict``,
    not trained).

    NOTE: the running statistics are written with ``ops.store``, an effect: eagerly and under
    the JIT it runs on every training call; in a declared graph (Session) it runs with the
    train op of ``st.minimize`` / ``opt.minimize``, or with ``st.state_updates(y)``.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1, device: Any = None,
                 dtype: Any = "float32") -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.momentum = momentum
        self.weight = Parameter(init.ones(dim, device=device, dtype=dtype))
        self.bias = Parameter(init.zeros(dim, device=device, dtype=dtype))
        self.running_mean = Buffer(init.zeros(dim, device=device, dtype=dtype))
        self.running_var = Buffer(init.ones(dim, device=device, dtype=dtype))

    def _check(self, x: Tensor) -> tuple[int, ...]:
        """The reduced axes (all but the channel axis 1); a clear error for a wrong shape."""
        shape = x.shape
        if len(shape) not in (2, 3) or shape[1] != self.dim:
            raise ValueError(f"BatchNorm1d({self.dim}): expected a (B, {self.dim}) or "
                             f"(B, {self.dim}, L) input, got shape {tuple(shape)}")
        return (0,) if len(shape) == 2 else (0, 2)

    def _per_channel(self, t: Tensor, ndim: int) -> Tensor:
        """A (C,) tensor shaped to broadcast against the input, e.g. (1, C, 1, 1)."""
        if ndim == 2:  # (B, C) broadcasts against (C,) as it is: no reshape node
            return t
        return ops.reshape(t, (1, self.dim) + (1,) * (ndim - 2))

    def forward(self, x: Tensor) -> Tensor:
        axes = self._check(x)
        ndim = len(axes) + 1  # (every axis but the channel axis is reduced)
        if ndim == 2:  # (B, C) broadcasts against (C,) as it is (_per_channel's case, inline)
            weight: Tensor = self.weight
            bias: Tensor = self.bias
        else:
            weight = self._per_channel(self.weight, ndim)
            bias = self._per_channel(self.bias, ndim)
        if self.training:
            return self._train_forward(x, axes, weight, bias, ops.batch_norm)
        centered = x - self._per_channel(self.running_mean, ndim)
        normed = centered / ops.sqrt(self._per_channel(self.running_var, ndim) + self.eps)
        return weight * normed + bias

    def forward_relu(self, x: Tensor, relu: Module) -> Tensor:
        """``relu(self(x))``, ``relu`` being the module that follows this one.

        Eager training on NCHW input runs both as one ``batch_norm_relu`` node (the same
        values; its gradient takes two passes over the activations where ``relu_grad`` and
        ``batch_norm_grad`` take eight: ~0.4 ms of a 9 ms strided CNN step). Elsewhere the
        two modules run as they are: in evaluation; on (B, C) input, where the fused gradient
        is slower; under a JIT trace or on a declared graph, whose compiler fuses the pair
        itself (compiler/batchnorm_relu_rewrite.py); and where either module is a subclass
        or ``relu`` is not a ReLU.
        """
        if not (self.training and type(relu) is ReLU
                and type(self).forward is BatchNorm1d.forward
                and type(self)._check is BatchNorm2d._check  # (NCHW input only)
                and getattr(x, "_data", None) is not None
                and active_trace() is None):
            return relu(self(x))
        return self._train_forward(x, self._check(x), self._per_channel(self.weight, 4),
                                   self._per_channel(self.bias, 4), ops.batch_norm_relu)

    def _train_forward(self, x: Tensor, axes: tuple[int, ...], weight: Tensor, bias: Tensor,
                       normalize: Any) -> Tensor:
        """Training mode: the batch statistics, once (one op, one pass), for ``normalize``
        (``ops.batch_norm`` or ``ops.batch_norm_relu``) and the running averages.

        Eagerly, with nothing recording the graph (``unobserved_eager``), the statistics
        and the running averages are computed at once, with no nodes: ``normalize``'s
        gradient carries the statistics' dependence on x itself (none flows to its mean and
        var inputs), so the statistics enter it as constants and the backward is the same.
        Four nodes fewer per layer (batch_stats, its two items, two stores): ~5 us each
        layer of an eager step. Traces, declared graphs and profiles see the nodes, and so
        does a subclass with its own ``_update_running``."""
        data = getattr(x, "_data", None)
        if data is not None and unobserved_eager() \
                and type(self)._update_running is BatchNorm1d._update_running:
            mean_data, var_data = batch_statistics(data, axes)
            out = normalize(x, weight, bias, Tensor.make_const(mean_data),
                            Tensor.make_const(var_data), axes=axes, eps=self.eps)
            store_into(self.running_mean._data, mean_data, float(self.momentum))
            store_into(self.running_var._data, var_data, float(self.momentum))
            return out
        stats = ops.batch_stats(x, axes=axes)
        mean, var = stats[0], stats[1]  # (indexing: cheaper than unpacking the tuple)
        out = normalize(x, weight, bias, mean, var, axes=axes, eps=self.eps)
        self._update_running(mean, var, out)
        return out

    def _update_running(self, mean: Tensor, var: Tensor, out: Tensor) -> None:
        """running = (1 - m) running + m batch_stat, written in place with ``ops.store``.

        No gradient flows here (``store`` is not differentiable: its node never requires a
        gradient, so no ``no_grad()`` block is needed). Eagerly the buffers change at once; in
        a traced graph (JIT) the store is an effect that runs on every call; a declared graph
        runs it when fetched.
        """
        # ``out`` ties each store to this forward pass (a control dependency)
        ops.store(mean, out, target=self.running_mean, momentum=self.momentum)
        ops.store(var, out, target=self.running_var, momentum=self.momentum)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm2d(BatchNorm1d):
    """BatchNorm1d per channel of NCHW input (statistics over N, H and W)."""

    def _check(self, x: Tensor) -> tuple[int, ...]:
        if len(x.shape) != 4 or x.shape[1] != self.dim:
            raise ValueError(f"BatchNorm2d({self.dim}): expected NCHW input with {self.dim} "
                             f"channels, got shape {tuple(x.shape)}")
        return (0, 2, 3)


class LayerNorm1d(Module):
    """y = weight * (x - mean) / sqrt(var + eps) + bias over the last axis (biased variance)."""

    def __init__(self, dim: int, eps: float = 1e-5, device: Any = None,
                 dtype: Any = "float32") -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = Parameter(init.ones(dim, device=device, dtype=dtype))
        self.bias = Parameter(init.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        _check_last_dim(f"LayerNorm1d({self.dim})", x, self.dim, "dim")
        # one op each way (kernels/layernorm.py), not normalize + multiply + add
        return ops.layer_norm(x, self.weight, self.bias, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


# -- regularization ---------------------------------------------------------------------------
class Dropout(Module):
    """Training: y = x * mask / (1 - p) with ``mask = rand(*x.shape) <= 1 - p`` (one draw
    from NumPy's global RNG per call, as ``init.randb``); evaluation: y = x. With p = 1 the
    output is zeros. The mask is an op (``bernoulli_like``), so graphs and the JIT draw a fresh
    one on every run."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must lie in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        mask = ops.bernoulli_like(x, 1 - self.p)
        if self.p == 1.0:
            return x * ops.zeros_like(mask)  # every unit dropped; avoid 0 / 0
        return ops.apply_mask(x, mask, 1 - self.p)  # x * mask / (1 - p), one node

    def extra_repr(self) -> str:
        return f"p={self.p}"
