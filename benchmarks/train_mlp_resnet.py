"""One training epoch of the hw2 MLP-ResNet on MNIST, needle eager vs PyTorch eager, in one run.

Model: Linear(784, 100) -> ReLU -> 3 x ResidualBlock(100, 50) -> Linear(100, 10), with
ResidualBlock(dim, hidden) = Sequential(Residual(Sequential(Linear(dim, hidden),
BatchNorm1d(hidden), ReLU(), Dropout(0.1), Linear(hidden, dim), BatchNorm1d(dim))), ReLU()).
Epoch: the 10,000 MNIST test images (../shared/data/mnist; random data of the same shape when
absent, and the output says so) in batches of 100, in a fixed order, softmax cross-entropy,
Adam(lr 1e-3, weight_decay 1e-3). Both frameworks see the same batches as arrays (no loader).
Run: python benchmarks/train_mlp_resnet.py [--profile]   (--profile: cProfile of a needle epoch)
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

# isort: off
import common  # first: it pins BLAS threads before NumPy and torch load

# isort: on
import numpy as np
import torch

import needle as ndl
from needle import nn

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
IMAGES, LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
BATCH, HIDDEN, BLOCKS, CLASSES = 100, 100, 3, 10


def _read_idx(path: Path, header_ints: int) -> np.ndarray:
    """The uint8 payload of a gzip IDX file (a stand-in for needle.data's reader)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    return np.frombuffer(raw, dtype=np.uint8, offset=4 * header_ints)


def load_mnist() -> tuple[np.ndarray, np.ndarray, str]:
    """(X float32 (n, 784) in [0, 1], y int64 (n,), what was loaded)."""
    if not (MNIST_DIR / IMAGES).exists() or not (MNIST_DIR / LABELS).exists():
        rng = np.random.default_rng(0)
        return (rng.random((10_000, 784), dtype=np.float32), rng.integers(0, 10, 10_000),
                f"RANDOM data (no MNIST under {MNIST_DIR})")
    try:
        from needle.data import MNISTDataset
    except ImportError:  # needle.data not there yet: read the IDX files here
        X = _read_idx(MNIST_DIR / IMAGES, 4).reshape(-1, 784).astype(np.float32) / 255.0
        y = _read_idx(MNIST_DIR / LABELS, 2).astype(np.int64)
        return X, y, "MNIST test set (local reader)"
    ds = MNISTDataset(MNIST_DIR / IMAGES, MNIST_DIR / LABELS)
    return ds.images, ds.labels, "MNIST test set (needle.data.MNISTDataset)"


# -- the model in both frameworks ----------------------------------------------------------------
def residual_block(dim: int, hidden: int, drop_prob: float = 0.1) -> nn.Module:
    return nn.Sequential(
        nn.Residual(nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                  nn.Dropout(drop_prob), nn.Linear(hidden, dim),
                                  nn.BatchNorm1d(dim))),
        nn.ReLU())


def mlp_resnet(dim: int = 784, hidden: int = HIDDEN, blocks: int = BLOCKS,
               classes: int = CLASSES) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(),
                         *[residual_block(hidden, hidden // 2) for _ in range(blocks)],
                         nn.Linear(hidden, classes))


class _TorchResidual(torch.nn.Module):
    def __init__(self, fn: torch.nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def torch_mlp_resnet(dim: int = 784, hidden: int = HIDDEN, blocks: int = BLOCKS,
                     classes: int = CLASSES) -> torch.nn.Module:
    tnn = torch.nn

    def block(d: int, h: int) -> torch.nn.Module:
        return tnn.Sequential(_TorchResidual(tnn.Sequential(
            tnn.Linear(d, h), tnn.BatchNorm1d(h), tnn.ReLU(), tnn.Dropout(0.1),
            tnn.Linear(h, d), tnn.BatchNorm1d(d))), tnn.ReLU())

    return tnn.Sequential(tnn.Linear(dim, hidden), tnn.ReLU(),
                          *[block(hidden, hidden // 2) for _ in range(blocks)],
                          tnn.Linear(hidden, classes))


# -- epochs --------------------------------------------------------------------------------------
def needle_epoch_fn(X: np.ndarray, y: np.ndarray):
    """A callable running one needle training epoch; returns its mean loss."""
    np.random.seed(0)
    model = mlp_resnet()
    opt = ndl.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)
    loss_fn = nn.SoftmaxLoss()
    batches = [(ndl.from_numpy(X[i:i + BATCH]), ndl.from_numpy(y[i:i + BATCH]))
               for i in range(0, len(X), BATCH)]

    def epoch() -> float:
        model.train()
        total = 0.0
        for xb, yb in batches:
            loss = loss_fn(model(xb), yb)
            opt.minimize(loss)
            total += float(loss._data)
        return total / len(batches)

    return epoch


def torch_epoch_fn(X: np.ndarray, y: np.ndarray):
    torch.manual_seed(0)
    model = torch_mlp_resnet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)
    batches = [(torch.from_numpy(X[i:i + BATCH]), torch.from_numpy(y[i:i + BATCH]))
               for i in range(0, len(X), BATCH)]

    def epoch() -> float:
        model.train()
        total = 0.0
        for xb, yb in batches:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            total += loss.item()
        return total / len(batches)

    return epoch


def main() -> list[dict]:
    common.torch_threads()
    X, y, source = load_mnist()
    print(f"data: {source}, {len(X)} images, batch {BATCH}")
    needle_epoch, torch_epoch = needle_epoch_fn(X, y), torch_epoch_fn(X, y)
    n_loss, t_loss = needle_epoch(), torch_epoch()  # first epochs warm up (and are reported)
    print(f"first-epoch mean loss: needle {n_loss:.3f}, pytorch {t_loss:.3f}")
    best = common.best_times_in_rounds({"needle": needle_epoch, "torch": torch_epoch})
    n_t, t_t = best["needle"], best["torch"]
    data = "10k MNIST" if source.startswith("MNIST") else "10k RANDOM images (no MNIST)"
    return [{"benchmark": f"MLP-ResNet epoch, {data}, batch 100, Adam (s/epoch)",
             "needle": n_t, "pytorch": t_t, "ratio": n_t / t_t}]


def profile(top: int = 25) -> None:
    """cProfile of one needle epoch, sorted by own time."""
    import cProfile
    import pstats

    X, y, _ = load_mnist()
    epoch = needle_epoch_fn(X, y)
    epoch()
    profiler = cProfile.Profile()
    profiler.runcall(epoch)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


if __name__ == "__main__":
    print(common.machine())
    if "--profile" in sys.argv:
        profile()
    else:
        print(common.markdown_table(main()))
