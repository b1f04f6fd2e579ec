"""The MLP-ResNet training step in JAX, compiled whole by ``jax.jit``: the JIT yardstick.

Same model and update as needle's MLPResNet benchmark (Linear(784, 100) -> ReLU -> 3 residual
blocks [Linear(100, 50) -> BatchNorm1d -> ReLU -> Dropout(0.1) -> Linear(50, 100) ->
BatchNorm1d] -> ReLU -> Linear(100, 10), softmax cross-entropy, Adam with coupled weight
decay as torch.optim.Adam). BatchNorm uses batch statistics and keeps running averages, as in
training mode; Dropout draws a fresh mask every step from a split key. Parameters, moments and
running statistics are donated to the step, so XLA updates them in place.
Needs ``pip install "jax[cpu]"``; benchmarks/jit.py reports "n/a" without it.
"""

from __future__ import annotations

import math

import numpy as np


def make_step(dim: int = 784, hidden: int = 100, blocks: int = 3, classes: int = 10,
              drop: float = 0.1, lr: float = 1e-3, weight_decay: float = 1e-3,
              beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, seed: int = 0):
    """A ``step(x, y)`` callable that trains the model once on a batch (state kept inside)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)

    def linear(i, o):
        bound = math.sqrt(6.0 / i)
        return {"w": jnp.asarray(rng.uniform(-bound, bound, (i, o)), jnp.float32),
                "b": jnp.zeros((o,), jnp.float32)}

    def norm(c):
        return {"gamma": jnp.ones((c,), jnp.float32), "beta": jnp.zeros((c,), jnp.float32)}

    params = {"inp": linear(dim, hidden), "out": linear(hidden, classes),
              "blocks": [{"l1": linear(hidden, hidden // 2), "n1": norm(hidden // 2),
                          "l2": linear(hidden // 2, hidden), "n2": norm(hidden)}
                         for _ in range(blocks)]}
    running = [{"n1": (jnp.zeros(hidden // 2), jnp.ones(hidden // 2)),
                "n2": (jnp.zeros(hidden), jnp.ones(hidden))} for _ in range(blocks)]

    def batch_norm(h, p, stats):
        mean = h.mean(0)
        var = ((h - mean) ** 2).mean(0)
        out = (h - mean) / jnp.sqrt(var + 1e-5) * p["gamma"] + p["beta"]
        new_stats = (0.9 * stats[0] + 0.1 * mean, 0.9 * stats[1] + 0.1 * var)
        return out, new_stats

    def loss_fn(params, running, x, y, key):
        h = jax.nn.relu(x @ params["inp"]["w"] + params["inp"]["b"])
        new_running = []
        for block, stats, k in zip(params["blocks"], running, jax.random.split(key, blocks)):
            z = h @ block["l1"]["w"] + block["l1"]["b"]
            z, s1 = batch_norm(z, block["n1"], stats["n1"])
            z = jax.nn.relu(z)
            keep = jax.random.bernoulli(k, 1.0 - drop, z.shape)
            z = jnp.where(keep, z / (1.0 - drop), 0.0)
            z = z @ block["l2"]["w"] + block["l2"]["b"]
            z, s2 = batch_norm(z, block["n2"], stats["n2"])
            h = jax.nn.relu(z + h)
            new_running.append({"n1": s1, "n2": s2})
        logits = h @ params["out"]["w"] + params["out"]["b"]
        logp = jax.nn.log_softmax(logits)
        loss = -jnp.take_along_axis(logp, y[:, None], axis=1).mean()
        return loss, new_running

    def train_step(params, m, v, running, t, key, x, y):
        key, sub = jax.random.split(key)
        (loss, running), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, running, x, y, sub)
        t = t + 1
        grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, params)
        m = jax.tree.map(lambda m_, g: beta1 * m_ + (1 - beta1) * g, m, grads)
        v = jax.tree.map(lambda v_, g: beta2 * v_ + (1 - beta2) * g * g, v, grads)
        step_size = lr / (1 - beta1 ** t)
        bias2 = jnp.sqrt(1 - beta2 ** t)
        params = jax.tree.map(
            lambda p, m_, v_: p - step_size * m_ / (jnp.sqrt(v_) / bias2 + eps), params, m, v)
        return params, m, v, running, t, key, loss

    compiled = jax.jit(train_step, donate_argnums=(0, 1, 2, 3))
    state = {"params": params, "m": jax.tree.map(jnp.zeros_like, params),
             "v": jax.tree.map(jnp.zeros_like, params), "running": running,
             "t": jnp.asarray(0, jnp.float32), "key": jax.random.PRNGKey(seed)}

    def step(x, y):
        s = state
        (s["params"], s["m"], s["v"], s["running"], s["t"], s["key"], loss) = compiled(
            s["params"], s["m"], s["v"], s["running"], s["t"], s["key"], x, y)
        return loss.block_until_ready()

    return step
