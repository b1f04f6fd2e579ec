"""One MLP-ResNet training step (batch 100, Adam): needle Session vs needle eager vs PyTorch eager.

The model is needle's MLP-ResNet: Linear(784, 100) -> ReLU -> 3 x ResidualBlock(100, 50)
(BatchNorm1d, Dropout(0.1)) -> Linear(100, 10), softmax cross-entropy, Adam(lr=1e-3).
Rows: needle eager (``opt.minimize(loss)``: forward, backward, step), the Session running a
``st.minimize`` train op (compiled program, passes on), the same without the passes, the
Session's step-by-step interpreter (what ``run_metadata`` uses), and PyTorch eager.
Timings are interleaved round by round and the best round is kept (a shared machine).
Run: python benchmarks/static_vs_eager.py
"""

from __future__ import annotations

# isort: off
import common  # noqa: F401  (pins BLAS threads before NumPy and torch load)

# isort: on
import numpy as np
import torch

import needle as ndl
import needle.nn as nn
import needle.static as st

BATCH = 100
DROP = 0.1


def _needle_model() -> nn.Module:
    def block(dim: int, hidden: int) -> nn.Module:
        return nn.Sequential(
            nn.Residual(nn.Sequential(
                nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(DROP),
                nn.Linear(hidden, dim), nn.BatchNorm1d(dim))),
            nn.ReLU())

    return nn.Sequential(nn.Linear(784, 100), nn.ReLU(), *[block(100, 50) for _ in range(3)],
                         nn.Linear(100, 10))


def _torch_model() -> torch.nn.Module:
    tnn = torch.nn

    class Residual(tnn.Module):
        def __init__(self, fn: tnn.Module) -> None:
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x) + x

    def block(dim: int, hidden: int) -> tnn.Module:
        return tnn.Sequential(
            Residual(tnn.Sequential(
                tnn.Linear(dim, hidden), tnn.BatchNorm1d(hidden), tnn.ReLU(), tnn.Dropout(DROP),
                tnn.Linear(hidden, dim), tnn.BatchNorm1d(dim))),
            tnn.ReLU())

    return tnn.Sequential(tnn.Linear(784, 100), tnn.ReLU(),
                          *[block(100, 50) for _ in range(3)], tnn.Linear(100, 10))


def _steps() -> dict:
    """name -> a callable running one training step on a fixed random batch."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((BATCH, 784)).astype(np.float32)
    labels = rng.integers(0, 10, BATCH)
    loss_fn = nn.SoftmaxLoss()
    steps = {}

    eager_model = _needle_model()
    eager_opt = ndl.optim.Adam(eager_model.parameters(), lr=1e-3)
    x_t = ndl.Tensor(images, requires_grad=False)
    y_t = ndl.Tensor(labels, requires_grad=False)

    def eager_step() -> None:
        eager_opt.minimize(loss_fn(eager_model(x_t), y_t))

    steps["needle eager"] = eager_step

    def session_step(optimize: bool, traced: bool):
        model = _needle_model()
        with st.Graph():
            x = st.placeholder((BATCH, 784), name="images")
            y = st.placeholder((BATCH,), dtype="int64", name="labels")
            train = st.minimize(ndl.optim.Adam(model.parameters(), lr=1e-3),
                                loss_fn(model(x), y))
        sess = st.Session(optimize=optimize)
        feeds = {x: images, y: labels}
        if traced:
            meta = st.RunMetadata()
            return lambda: sess.run(train, feeds, run_metadata=meta)
        return lambda: sess.run(train, feeds)

    steps["needle Session"] = session_step(optimize=True, traced=False)
    steps["needle Session, optimize=False"] = session_step(optimize=False, traced=False)
    steps["needle Session, step-by-step (run_metadata)"] = session_step(True, traced=True)

    torch_model = _torch_model()
    torch_opt = torch.optim.Adam(torch_model.parameters(), lr=1e-3)
    tx, ty = torch.tensor(images), torch.tensor(labels)
    torch_loss = torch.nn.CrossEntropyLoss()

    def torch_step() -> None:
        torch_opt.zero_grad(set_to_none=True)
        torch_loss(torch_model(tx), ty).backward()
        torch_opt.step()

    steps["pytorch eager"] = torch_step
    return steps


def main(rounds: int = 15, number: int = 10) -> list[dict]:
    common.torch_threads()
    np.random.seed(0)
    torch.manual_seed(0)
    steps = _steps()
    for fn in steps.values():  # warm up: plans, caches, allocator
        for _ in range(3):
            fn()
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):  # interleaved, so load changes hit every row alike
        for name, fn in steps.items():
            best[name] = min(best[name], common.best_time(fn, repeat=1, number=number))
    eager, torch_time = best["needle eager"], best["pytorch eager"]
    return [{"benchmark": f"MLP-ResNet train step, batch {BATCH}, Adam: {name}",
             "ms": t * 1e3, "vs needle eager": t / eager, "vs pytorch": t / torch_time}
            for name, t in best.items()]


if __name__ == "__main__":
    print(common.machine())
    print(common.markdown_table(main()))
