"""The MLP-ResNet training step as a caffe Net with a solver, in eager needle and in PyTorch.

MLP-ResNet: Linear(784, 100) -> ReLU -> 3 x [Residual(Linear(100, 50) -> BatchNorm1d(50) ->
ReLU -> Dropout(0.1) -> Linear(50, 100) -> BatchNorm1d(100)) -> ReLU] -> Linear(100, 10),
softmax cross-entropy, batch 100, SGD with momentum 0.9 (each framework's own momentum rule).
Rows: one training step (forward, backward, update) and one inference forward, in ms.
Run: python benchmarks/caffe_vs_eager.py
"""

from __future__ import annotations

# isort: off
import common  # noqa: F401  (pins BLAS threads before NumPy and torch load)

# isort: on
import numpy as np
import torch

import needle as ndl
import needle.caffe as cf
from needle import nn

DIM, HIDDEN, CLASSES, BLOCKS, BATCH, DROP = 784, 100, 10, 3, 100, 0.1


def needle_model() -> nn.Module:
    def block():
        inner = nn.Sequential(nn.Linear(HIDDEN, HIDDEN // 2), nn.BatchNorm1d(HIDDEN // 2),
                              nn.ReLU(), nn.Dropout(DROP), nn.Linear(HIDDEN // 2, HIDDEN),
                              nn.BatchNorm1d(HIDDEN))
        return nn.Sequential(nn.Residual(inner), nn.ReLU())

    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), *[block() for _ in range(BLOCKS)],
                         nn.Linear(HIDDEN, CLASSES))


class TorchResidual(torch.nn.Module):
    def __init__(self, fn: torch.nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def torch_model() -> torch.nn.Module:
    def block():
        inner = torch.nn.Sequential(
            torch.nn.Linear(HIDDEN, HIDDEN // 2), torch.nn.BatchNorm1d(HIDDEN // 2),
            torch.nn.ReLU(), torch.nn.Dropout(DROP), torch.nn.Linear(HIDDEN // 2, HIDDEN),
            torch.nn.BatchNorm1d(HIDDEN))
        return torch.nn.Sequential(TorchResidual(inner), torch.nn.ReLU())

    return torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.ReLU(),
                               *[block() for _ in range(BLOCKS)],
                               torch.nn.Linear(HIDDEN, CLASSES))


def main() -> list[dict]:
    common.torch_threads()
    rng = np.random.default_rng(0)
    X = rng.random((BATCH, DIM)).astype(np.float32)
    y = rng.integers(0, CLASSES, BATCH)
    np.random.seed(0)

    # caffe Net + SGDSolver
    net = cf.Net(cf.mlp_resnet_spec(DIM, HIDDEN, CLASSES, BLOCKS, DROP))
    solver = cf.SGDSolver(net, base_lr=0.01, momentum=0.9)
    batch = {"data": X, "label": y}

    def net_step():
        solver.step(1, feed=batch)

    def net_forward():
        with ndl.no_grad():  # like the other two: no graph kept for a backward
            net.forward(data=X, label=y)

    # eager needle
    model = needle_model()
    opt = ndl.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.SoftmaxLoss()
    tx, ty = ndl.Tensor(X, requires_grad=False), ndl.Tensor(y, requires_grad=False)

    def eager_step():
        opt.minimize(loss_fn(model(tx), ty))

    def eager_forward():
        with ndl.no_grad():
            loss_fn(model(tx), ty)

    # PyTorch eager
    tmodel = torch_model()
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.01, momentum=0.9)
    px, py = torch.tensor(X), torch.tensor(y)

    def torch_step():
        topt.zero_grad()
        torch.nn.functional.cross_entropy(tmodel(px), py).backward()
        topt.step()

    def torch_forward():
        with torch.no_grad():
            torch.nn.functional.cross_entropy(tmodel(px), py)

    rows = []
    for name, fns in [("MLP-ResNet train step, batch 100 (ms)",
                       (net_step, eager_step, torch_step)),
                      ("MLP-ResNet forward + loss, batch 100 (ms)",
                       (net_forward, eager_forward, torch_forward))]:
        for fn in fns:  # warm up (first calls set up caches and scratch arrays)
            fn()
        t_net, t_eager, t_torch = (common.best_time(fn, repeat=7, number=10) * 1e3
                                   for fn in fns)
        rows.append({"benchmark": name, "caffe Net": t_net, "needle eager": t_eager,
                     "pytorch": t_torch, "Net / eager": t_net / t_eager,
                     "Net / pytorch": t_net / t_torch})
    return rows


if __name__ == "__main__":
    print(common.machine())
    print(common.markdown_table(main()))
