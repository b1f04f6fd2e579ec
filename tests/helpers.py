"""Shared test helpers: torch conversion, finite-difference gradient checks, data paths."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import needle as ndl

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"


def to_torch(array: np.ndarray, requires_grad: bool = True):
    """A torch tensor copy of a NumPy array (float arrays require grad)."""
    import torch

    t = torch.tensor(np.array(array))
    if requires_grad and t.is_floating_point():
        t.requires_grad_(True)
    return t


def leaves(arrays: Sequence[np.ndarray], dtype=None) -> list[ndl.Tensor]:
    """needle leaf tensors (float ones require a gradient) holding copies of ``arrays``."""
    return [ndl.Tensor(a, dtype=dtype, requires_grad=a.dtype.kind == "f") for a in arrays]


def directional_fd(fn: Callable, arrays: list[np.ndarray], direction: list[np.ndarray],
                   weights: np.ndarray, eps: float = 1e-6) -> float:
    """Central difference of sum(fn(x) * weights) along ``direction``, in float64."""

    def objective(sign: float) -> float:
        shifted = [a + sign * eps * d if d is not None else a
                   for a, d in zip(arrays, direction)]
        with ndl.no_grad():
            out = fn(*leaves(shifted))
        return float(np.sum(out.numpy().astype(np.float64) * weights))

    return (objective(1.0) - objective(-1.0)) / (2 * eps)


def check_gradient_fd(fn: Callable, arrays: list[np.ndarray], rng: np.random.Generator,
                      rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """needle's gradient of sum(fn(x) * w) agrees with a float64 central difference along a
    random direction (one scalar check covers every input at once)."""
    arrays = [a.astype(np.float64) if a.dtype.kind == "f" else a for a in arrays]
    inputs = leaves(arrays)
    out = fn(*inputs)
    weights = rng.standard_normal(out.shape)
    out.backward(ndl.Tensor(weights, dtype=out.dtype, requires_grad=False))
    direction = [rng.standard_normal(a.shape) if a.dtype.kind == "f" else None for a in arrays]
    analytic = sum(float(np.sum(t.grad.numpy() * d)) for t, d in zip(inputs, direction)
                   if d is not None and t.grad is not None)
    numeric = directional_fd(fn, arrays, direction, weights)
    np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol)


def swish_function():
    """A custom ``ndl.autograd.Function`` with a hand-written backward (x * sigmoid(x))."""
    from needle.function import Function

    class Swish(Function):
        """y = x * sigmoid(x); dy/dx = s + x s (1 - s)."""

        @staticmethod
        def forward(ctx, x):
            s = 1 / (1 + np.exp(-x))
            ctx.save_for_backward(x, s)
            return x * s

        @staticmethod
        def backward(ctx, out_grad):
            x, s = ctx.saved_tensors
            return out_grad * (s + x * s * (1 - s))

    return Swish
