"""A hand-written NumPy MLP-ResNet training step: the yardstick for framework overhead.

Same model as needle's MLPResNet (Linear(784, 100) -> ReLU -> 3 residual blocks with
BatchNorm1d and Dropout -> Linear(100, 10)), softmax cross-entropy, Adam with coupled weight
decay; forward and backward written out by hand with in-place updates where it is natural.
"""

from __future__ import annotations

import numpy as np


class NumpyMLPResNet:
    """Parameters as a flat list of float32 arrays and a ``step(x, y)`` that trains once."""

    def __init__(self, dim: int = 784, hidden: int = 100, blocks: int = 3, classes: int = 10,
                 drop: float = 0.1, lr: float = 1e-3, weight_decay: float = 1e-3,
                 seed: int = 0) -> None:
        rng = np.random.default_rng(seed)

        def lin(i, o):
            bound = np.sqrt(6.0 / i)
            return [rng.uniform(-bound, bound, (i, o)).astype(np.float32),
                    np.zeros((1, o), np.float32)]

        self.drop, self.lr, self.wd, self.blocks = drop, lr, weight_decay, blocks
        self.params = lin(dim, hidden)
        for _ in range(blocks):
            self.params += lin(hidden, hidden // 2) + [np.ones(hidden // 2, np.float32),
                                                        np.zeros(hidden // 2, np.float32)]
            self.params += lin(hidden // 2, hidden) + [np.ones(hidden, np.float32),
                                                        np.zeros(hidden, np.float32)]
        self.params += lin(hidden, classes)
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.t = 0

    @staticmethod
    def _bn_forward(h, gamma, beta, eps=1e-5):
        mu = h.mean(0)
        xc = h - mu
        var = (xc * xc).mean(0)
        inv = 1.0 / np.sqrt(var + eps)
        xhat = xc * inv
        return xhat * gamma + beta, (xhat, inv)

    @staticmethod
    def _bn_backward(g, gamma, cache):
        xhat, inv = cache
        dgamma = (g * xhat).sum(0)
        dbeta = g.sum(0)
        gx = g * gamma
        dx = inv * (gx - gx.mean(0) - xhat * (gx * xhat).mean(0))
        return dx, dgamma, dbeta

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        P = self.params
        grads = [None] * len(P)
        n = len(x)
        # forward
        h0 = x @ P[0] + P[1]
        a = np.maximum(h0, 0)
        caches = []
        k = 2
        for _ in range(self.blocks):
            W1, b1, g1, be1, W2, b2, g2, be2 = P[k:k + 8]
            h1 = a @ W1 + b1
            z1, bn1 = self._bn_forward(h1, g1, be1)
            r1 = np.maximum(z1, 0)
            mask = (np.random.rand(*r1.shape) >= self.drop).astype(np.float32) / (1 - self.drop)
            d1 = r1 * mask
            h2 = d1 @ W2 + b2
            z2, bn2 = self._bn_forward(h2, g2, be2)
            out = np.maximum(z2 + a, 0)
            caches.append((a, z1, bn1, mask, d1, bn2, out))
            a = out
            k += 8
        logits = a @ P[k] + P[k + 1]
        shifted = logits - logits.max(1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(1, keepdims=True)
        loss = float(-np.log(probs[np.arange(n), y] + 1e-12).mean())
        # backward
        g = probs
        g[np.arange(n), y] -= 1
        g /= n
        grads[k], grads[k + 1] = a.T @ g, g.sum(0, keepdims=True)
        g = g @ P[k].T
        for b in reversed(range(self.blocks)):
            k -= 8
            a_in, z1, bn1, mask, d1, bn2, out = caches[b]
            W1, b1, g1, be1, W2, b2, g2, be2 = P[k:k + 8]
            g = g * (out > 0)
            g_skip = g
            dh2, grads[k + 6], grads[k + 7] = self._bn_backward(g, g2, bn2)
            grads[k + 4], grads[k + 5] = d1.T @ dh2, dh2.sum(0, keepdims=True)
            gd = (dh2 @ W2.T) * mask * (z1 > 0)
            dh1, grads[k + 2], grads[k + 3] = self._bn_backward(gd, g1, bn1)
            grads[k], grads[k + 1] = a_in.T @ dh1, dh1.sum(0, keepdims=True)
            g = dh1 @ W1.T + g_skip
        g = g * (h0 > 0)
        grads[0], grads[1] = x.T @ g, g.sum(0, keepdims=True)
        # Adam with coupled weight decay, in place
        self.t += 1
        b1c, b2c = 1 - 0.9**self.t, 1 - 0.999**self.t
        for p, gr, m, v in zip(P, grads, self.m, self.v):
            gr = gr + self.wd * p
            m *= 0.9
            m += 0.1 * gr
            v *= 0.999
            v += 0.001 * gr * gr
            p -= self.lr * (m / b1c) / (np.sqrt(v / b2c) + 1e-8)
        return loss
