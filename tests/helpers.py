"""Shared test helpers: torch conversion, finite-difference gradient checks, data paths."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import needle as ndl

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"


def loops_that_ran(monkeypatch, *latches) -> list[str]:
    """Names of the compiled loops that ran through these NumbaLoops latches (each latch's
    ``call`` counted for the test), in call order: a test's proof that its fast path ran."""
    calls: list[str] = []
    for latch in latches:
        real = latch.call

        def counting(loop, *args, real=real):
            ran = real(loop, *args)
            if ran:
                calls.append(loop.__name__)
            return ran

        monkeypatch.setattr(latch, "call", counting)
    return calls


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


def second_order_gradients(fn: Callable, arrays: list[np.ndarray], weights: np.ndarray,
                           v: list[np.ndarray | None]) -> tuple[list[np.ndarray], np.ndarray]:
    """needle's gradient of a gradient (gradgradcheck's quantity), both by autodiff.

    With y = fn(*x), the seed w as a leaf and g_i = d<y, w>/dx_i (first order, built with
    ops: ``backward`` records a graph for gradients, needle's default), returns the gradients
    of s = sum_i <g_i, v_i> with respect to every x_i (a Hessian-vector product, zeros where s
    does not depend on x_i: linear ops) and with respect to w (a Jacobian-vector product,
    J v: for a linear op, the derivative of its gradient rule by its seed)."""
    inputs = leaves(arrays)
    out = fn(*inputs)
    seed = ndl.Tensor(weights, dtype=out.dtype, requires_grad=True)
    out.backward(seed)
    firsts = [x.grad for x in inputs]
    terms = [(g * ndl.Tensor(vi, dtype=g.dtype, requires_grad=False)).sum()
             for g, vi in zip(firsts, v) if vi is not None and g is not None]
    assert terms, "no input got a first-order gradient"
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    for x in inputs:  # backward sets .grad only on the leaves it reaches
        x.grad = None
    assert total.requires_grad, "first-order gradients do not depend on their seed"
    total.backward()
    for x in inputs:
        assert x.grad is None or (x.grad.shape == x.shape and x.grad.dtype == x.dtype)
    assert seed.grad is not None and seed.grad.shape == seed.shape
    second = [x.grad.numpy() if x.grad is not None else np.zeros(a.shape, a.dtype)
              for x, a in zip(inputs, arrays)]
    return second, seed.grad.numpy()


def projected_gradient(fn: Callable, arrays: list[np.ndarray], weights: np.ndarray,
                       v: list[np.ndarray | None]) -> float:
    """sum_i <d<fn(x), w>/dx_i, v_i> in float64, the gradients made as in
    ``second_order_gradients`` (``backward``'s default, create_graph=True)."""
    inputs = leaves(arrays)
    out = fn(*inputs)
    out.backward(ndl.Tensor(weights, dtype=out.dtype, requires_grad=False))
    return sum(float(np.sum(x.grad.numpy().astype(np.float64) * vi))
               for x, vi in zip(inputs, v) if vi is not None and x.grad is not None)


def check_second_order_fd(fn: Callable, arrays: list[np.ndarray], rng: np.random.Generator,
                          rtol: float = 1e-6, atol: float = 1e-7, eps: float = 1e-6) -> None:
    """needle's gradient of sum_i <g_i, v_i> (``second_order_gradients``) agrees with a float64
    central difference of that projected first-order gradient along a random direction in
    (x, w) jointly (one scalar check covers every input and the seed at once)."""
    arrays = [a.astype(np.float64) if a.dtype.kind == "f" else a for a in arrays]
    with ndl.no_grad():
        out_shape = fn(*leaves(arrays)).shape
    weights = rng.standard_normal(out_shape)
    v = [rng.standard_normal(a.shape) if a.dtype.kind == "f" else None for a in arrays]
    dx = [rng.standard_normal(a.shape) if a.dtype.kind == "f" else None for a in arrays]
    dw = rng.standard_normal(out_shape)
    second_x, second_w = second_order_gradients(fn, arrays, weights, v)
    analytic = float(np.sum(second_w * dw)) + sum(
        float(np.sum(h * d)) for h, d in zip(second_x, dx) if d is not None)

    def objective(sign: float) -> float:
        shifted = [a + sign * eps * d if d is not None else a for a, d in zip(arrays, dx)]
        return projected_gradient(fn, shifted, weights + sign * eps * dw, v)

    numeric = (objective(1.0) - objective(-1.0)) / (2 * eps)
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


def sum_loss_step(model, opt):
    """A user's training step on the sum of the model's output: forward, reset_grad,
    backward, step (plain eager code, for ndl.jit or export to take)."""

    def step(x):
        loss = model(x).sum()
        opt.reset_grad()
        loss.backward()
        opt.step()
        return loss

    return step


def damaged_copies(path: Path, directory: Path) -> tuple[Path, Path]:
    """Two broken copies of the archive at ``path``: cut in half, and with one byte flipped
    inside an array member (its SHA-256 no longer matches)."""
    import zipfile

    data = path.read_bytes()
    cut = directory / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if i.filename.endswith(".npy"))
        offset = member.header_offset + 30 + len(member.filename) + len(member.extra)
    corrupted = bytearray(data)
    corrupted[offset + member.file_size - 1] ^= 0xFF
    flipped = directory / "flip.npz"
    flipped.write_bytes(bytes(corrupted))
    return cut, flipped
