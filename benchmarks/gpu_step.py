"""The MLP-ResNet training step on a GPU: needle on CuPy (eager and jitted) vs PyTorch CUDA.

Meant for a lent GPU machine (see benchmarks/gpu_check.sh); prints a note and exits where
``ndl.cuda().enabled()`` is False. Run: python benchmarks/gpu_step.py
"""

from __future__ import annotations

# isort: off
import common

# isort: on
import time

import numpy as np

import needle as ndl
import needle.nn as nn
from needle.apps.models import MLPResNet
from needle.apps.trainer import make_train_step

BATCH, STEPS = 100, 50


def _needle(jitted: bool) -> float:
    device = ndl.cuda()
    np.random.seed(0)
    model = MLPResNet(784).to(device)
    opt = ndl.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)
    step = make_train_step(model, nn.SoftmaxLoss(), opt)
    run = ndl.jit(step) if jitted else step
    rng = np.random.default_rng(0)
    x = ndl.Tensor(rng.random((BATCH, 784), dtype=np.float32), device=device,
                   requires_grad=False)
    y = ndl.Tensor(rng.integers(0, 10, BATCH), device=device)
    run(x, y)[0].numpy()
    start = time.perf_counter()
    for _ in range(STEPS):
        loss, _ = run(x, y)
    loss.numpy()  # waits for the GPU
    return (time.perf_counter() - start) / STEPS


def _torch() -> float:
    import torch

    from jit import torch_model

    model = torch_model().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)
    x = torch.rand(BATCH, 784, device="cuda")
    y = torch.randint(0, 10, (BATCH,), device="cuda")

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    step().item()
    start = time.perf_counter()
    for _ in range(STEPS):
        loss = step()
    loss.item()
    return (time.perf_counter() - start) / STEPS


def main() -> list[dict]:
    if not ndl.cuda().enabled():
        print("no GPU here: ndl.cuda().enabled() is False")
        return []
    eager, jitted, torch_t = _needle(False), _needle(True), _torch()
    return [{"benchmark": "MLP-ResNet train step on the GPU, batch 100 (ms)",
             "needle eager": eager * 1e3, "needle jit": jitted * 1e3,
             "pytorch": torch_t * 1e3, "jit / pytorch": jitted / torch_t}]


if __name__ == "__main__":
    print(common.machine())
    print(common.markdown_table(main()))
