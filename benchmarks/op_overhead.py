"""Per-op overhead and a large matmul, needle eager vs PyTorch eager, in one run.

(a) a chain of 100 small elementwise ops (add, mul, relu) on a (1, 64) float32 tensor,
    forward and backward, in microseconds per op: needle's default backward (its gradients
    are graphs, differentiable again), and ``create_graph=False``, which like PyTorch's
    ``backward()`` records no graph for them;
(b) a (512 x 1024) @ (1024 x 1024) matmul, forward and backward.
Run: python benchmarks/op_overhead.py
"""

from __future__ import annotations

# isort: off
import common  # noqa: F401  (pins BLAS threads before NumPy and torch load)

# isort: on
import numpy as np
import torch

import needle as ndl

CHAIN = 100


def _needle_chain(x, c):
    y = x
    for i in range(CHAIN // 3):
        y = ndl.ops.relu(y * c + c) if i % 2 else ndl.ops.relu(y + c) * c
    return y


def _torch_chain(x, c):
    y = x
    for i in range(CHAIN // 3):
        y = torch.relu(y * c + c) if i % 2 else torch.relu(y + c) * c
    return y


def chain_rows() -> list[dict]:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((1, 64)).astype(np.float32)
    const = rng.uniform(0.9, 1.1, (1, 64)).astype(np.float32)
    n_ops = (CHAIN // 3) * 3

    x = ndl.Tensor(data)
    c = ndl.Tensor(const, requires_grad=False)

    def needle_step():
        _needle_chain(x, c).backward()

    def needle_step_no_graph():  # PyTorch's backward(): the gradients record no graph
        _needle_chain(x, c).backward(create_graph=False)

    tx = torch.tensor(data, requires_grad=True)
    tc = torch.tensor(const)

    def torch_step():
        tx.grad = None
        _torch_chain(tx, tc).sum().backward()

    def needle_fwd():
        with ndl.no_grad():
            _needle_chain(x, c)

    def torch_fwd():
        with torch.no_grad():
            _torch_chain(tx, tc)

    def times_20(fn):
        return lambda: [fn() for _ in range(20)]

    # the libraries in rounds (common.best_times_in_rounds): a loaded machine's slow phases
    # then hit both, not one
    best = common.best_times_in_rounds(
        {name: times_20(fn) for name, fn in [
            ("needle", needle_step), ("needle_no_graph", needle_step_no_graph),
            ("torch", torch_step), ("needle_fwd", needle_fwd), ("torch_fwd", torch_fwd)]},
        rounds=5, repeat=3, pause=0.5)
    rows = []
    for name, n_key, t_key in [("op chain fwd+bwd (us/op)", "needle", "torch"),
                               ("op chain fwd+bwd, create_graph=False (us/op)",
                                "needle_no_graph", "torch"),
                               ("op chain fwd, no grad (us/op)", "needle_fwd", "torch_fwd")]:
        n_t, t_t = best[n_key] / 20 / n_ops * 1e6, best[t_key] / 20 / n_ops * 1e6
        rows.append({"benchmark": name, "needle": n_t, "pytorch": t_t, "ratio": n_t / t_t})
    return rows


def matmul_rows() -> list[dict]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 1024)).astype(np.float32)
    b = rng.standard_normal((1024, 1024)).astype(np.float32)
    na, nb = ndl.Tensor(a), ndl.Tensor(b)
    ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)

    def needle_step():
        (na @ nb).backward()

    def torch_step():
        ta.grad = tb.grad = None
        out = ta @ tb
        out.backward(torch.ones_like(out))

    n_t = common.best_time(needle_step, repeat=5) * 1e3
    t_t = common.best_time(torch_step, repeat=5) * 1e3
    return [{"benchmark": "matmul 512x1024 @ 1024x1024 fwd+bwd (ms)", "needle": n_t,
             "pytorch": t_t, "ratio": n_t / t_t}]


def main() -> list[dict]:
    common.torch_threads()
    return chain_rows() + matmul_rows()


if __name__ == "__main__":
    print(common.machine())
    print(common.markdown_table(main()))
