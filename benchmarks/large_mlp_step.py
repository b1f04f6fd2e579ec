"""A GEMM-bound training step: MLP 1024-4096-4096-10, batch 512, ReLU, softmax cross-entropy,
plain SGD (lr 0.01), in needle eager, ``ndl.jit``, PyTorch eager, ``jax.jit`` and NumPy by hand.

Issue #20's goal: needle (eager and jit) within 3% of the faster of jax.jit and NumPy by hand,
since almost all the work is the six (512 x 1024..4096) products of forward and backward.
NumPy by hand is the same step written with ``@``, ``np.maximum`` and in-place updates (the
floor of what any NumPy-based framework can do). Best times over rounds; a round runs each
variant in turn (an untimed call, then ``repeat`` timed calls). jax.jit's column is "n/a"
without ``pip install "jax[cpu]"``.
Run: python benchmarks/large_mlp_step.py [--rounds N] [--repeat N]
"""

from __future__ import annotations

# isort: off
import common  # first: it pins BLAS threads before NumPy, torch and JAX load

# isort: on
import argparse
import math
from collections.abc import Callable

import numpy as np

import needle as ndl
from needle import nn

SIZES = (1024, 4096, 4096, 10)
BATCH, LR = 512, 0.01


def _weights(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W, b) per layer, W as (in, out), uniform(+-1/sqrt(in)) as nn.Linear."""
    rng = np.random.default_rng(seed)
    out = []
    for i, o in zip(SIZES[:-1], SIZES[1:]):
        bound = 1 / math.sqrt(i)
        out.append((rng.uniform(-bound, bound, (i, o)).astype(np.float32),
                    rng.uniform(-bound, bound, (o,)).astype(np.float32)))
    return out


def _batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return (rng.standard_normal((BATCH, SIZES[0])).astype(np.float32),
            rng.integers(0, SIZES[-1], BATCH))


def numpy_step() -> Callable[[], object]:
    """The step by hand: forward, softmax cross-entropy, backward, SGD, in place."""
    params = _weights()
    x, y = _batch()
    rows = np.arange(BATCH)

    def step() -> float:
        acts = [x]
        for k, (w, b) in enumerate(params):
            z = acts[-1] @ w
            z += b
            if k < len(params) - 1:
                np.maximum(z, 0, out=z)
            acts.append(z)
        logits = acts[-1]
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        loss = -np.log(logits[rows, y]).mean()
        g = logits
        g[rows, y] -= 1
        g /= BATCH
        for k in range(len(params) - 1, -1, -1):
            w, b = params[k]
            gw = acts[k].T @ g
            gb = g.sum(axis=0)
            if k:
                g = g @ w.T
                g *= acts[k] > 0
            w -= LR * gw
            b -= LR * gb
        return float(loss)

    return step


def needle_step(jitted: bool) -> Callable[[], object]:
    layers = []
    for (w, b), (i, o) in zip(_weights(), zip(SIZES[:-1], SIZES[1:])):
        linear = nn.Linear(i, o)
        linear.weight = nn.Parameter(w)  # the same weights in every library
        linear.bias = nn.Parameter(b.reshape(1, -1))
        layers += [linear, nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    opt = ndl.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.SoftmaxLoss()
    xv, yv = _batch()
    x, y = ndl.Tensor(xv, requires_grad=False), ndl.Tensor(yv, requires_grad=False)

    def step(x: ndl.Tensor, y: ndl.Tensor) -> ndl.Tensor:
        opt.reset_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    fn = ndl.jit(step) if jitted else step
    return lambda: fn(x, y)


def torch_step() -> Callable[[], object]:
    import torch

    layers: list = []
    for (w, b), (i, o) in zip(_weights(), zip(SIZES[:-1], SIZES[1:])):
        linear = torch.nn.Linear(i, o)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w.T.copy()))
            linear.bias.copy_(torch.from_numpy(b))
        layers += [linear, torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xv, yv = _batch()
    x, y = torch.from_numpy(xv), torch.from_numpy(yv)

    def step() -> object:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def jax_step() -> Callable[[], object] | None:
    """The step under jax.jit with the parameters donated (updated in place), or None."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in _weights()]
    xv, yv = _batch()
    x, y = jnp.asarray(xv), jnp.asarray(yv)

    def loss_fn(params, x, y):
        h = x
        for k, (w, b) in enumerate(params):
            h = h @ w + b
            if k < len(params) - 1:
                h = jax.nn.relu(h)
        logp = jax.nn.log_softmax(h)
        return -jnp.take_along_axis(logp, y[:, None], axis=1).mean()

    @jax.jit
    def update(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return [(w - LR * gw, b - LR * gb) for (w, b), (gw, gb) in zip(params, grads)], loss

    state = {"params": params}

    def step() -> object:
        state["params"], loss = update(state["params"], x, y)
        return loss.block_until_ready()

    return step


def main(rounds: int = 3, repeat: int = 3) -> list[dict]:
    common.torch_threads()
    fns: dict[str, Callable[[], object]] = {
        "needle eager": needle_step(False), "needle jit": needle_step(True),
        "numpy by hand": numpy_step(), "pytorch eager": torch_step()}
    jax_fn = jax_step()
    if jax_fn is not None:
        fns["jax.jit"] = jax_fn
    best = common.best_times_in_rounds(fns, rounds=rounds, repeat=repeat, pause=1.0)
    floor = min(best["numpy by hand"], best.get("jax.jit", float("inf")))
    row: dict = {"benchmark": "MLP 1024-4096-4096-10 step, batch 512, SGD (s)"}
    for name in ("needle eager", "needle jit", "numpy by hand", "pytorch eager", "jax.jit"):
        row[name] = best.get(name, "n/a")
    row["eager / floor"] = best["needle eager"] / floor
    row["jit / floor"] = best["needle jit"] / floor
    return [row]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{common.machine()}\n")
    print(common.markdown_table(main(args.rounds, args.repeat)))
