"""Data-loading throughput, needle.data.DataLoader vs torch.utils.data.DataLoader, side by side.

(a) one shuffled epoch over 60,000 x 784 float32 arrays, batch 128 (MNIST-sized);
(b) the same with RandomCrop(4) + RandomFlipHorizontal on 50,000 x 32 x 32 x 3 images
    (CIFAR-sized): needle with its vectorized batch transforms, torch with a Dataset whose
    __getitem__ crops and flips one image in NumPy (the usual way), default loader settings.
Samples per second are the best of ``--repeat`` epochs. Run: python benchmarks/dataloader.py
``main()`` returns the rows (a list of dicts) for benchmarks/run_all.py.
"""

from __future__ import annotations

# isort: off
import common  # first: pins BLAS threads and tunes malloc, as for every benchmark

# isort: on
import argparse
import time

import numpy as np

from needle.data import (
    BatchRandomCrop,
    BatchRandomFlip,
    DataLoader,
    NDArrayDataset,
    RandomCrop,
    RandomFlipHorizontal,
)

BATCH = 128
PADDING = 4


def _epoch_rate(make_loader, n_samples: int, repeat: int) -> float:
    """Best samples/second over ``repeat`` full epochs after one untimed warm-up epoch (the
    loader is built once; the warm-up lets the allocator settle)."""
    loader = make_loader()
    best = float("inf")
    for _ in loader:
        pass
    for _ in range(repeat):
        start = time.perf_counter()
        seen = 0
        for batch in loader:
            seen += len(batch[0])
        best = min(best, time.perf_counter() - start)
        assert seen == n_samples, (seen, n_samples)
    return n_samples / best


def _row(name: str, needle_rate: float, torch_rate: float | None, goal: float) -> dict:
    ratio = needle_rate / torch_rate if torch_rate else float("nan")
    return {"benchmark": name, "needle samples/s": needle_rate,
            "torch samples/s": torch_rate if torch_rate else float("nan"),
            "needle / torch": ratio, "goal": f">= {goal:g}x"}


def plain_rows(n: int, repeat: int, torch) -> list[dict]:
    rng = np.random.default_rng(0)
    X = rng.random((n, 784), dtype=np.float32)
    y = rng.integers(0, 10, n)
    rows = []
    for workers in (0, 2):
        rate = _epoch_rate(lambda w=workers: DataLoader(NDArrayDataset(X, y), batch_size=BATCH,
                                                        shuffle=True, num_workers=w), n, repeat)
        rows.append((f"plain arrays {n}x784, batch {BATCH}, shuffle (needle num_workers="
                     f"{workers})", rate))
    torch_rate = None
    if torch is not None:
        from torch.utils.data import DataLoader as TorchLoader
        from torch.utils.data import TensorDataset

        ds = TensorDataset(torch.from_numpy(X), torch.from_numpy(y))
        torch_rate = _epoch_rate(lambda: TorchLoader(ds, batch_size=BATCH, shuffle=True), n,
                                 repeat)
    return [_row(name, rate, torch_rate, 10) for name, rate in rows]


def _torch_aug_dataset(torch, images: np.ndarray, labels: np.ndarray):
    """A torch Dataset that crops and flips one H x W x C image per __getitem__ (NumPy)."""

    class CropFlip(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            img = images[i]
            H, W, _ = img.shape
            sx, sy = np.random.randint(low=-PADDING, high=PADDING + 1, size=2)
            pad = np.pad(img, ((PADDING, PADDING), (PADDING, PADDING), (0, 0)))
            img = pad[PADDING + sx : PADDING + sx + H, PADDING + sy : PADDING + sy + W, :]
            if np.random.rand() < 0.5:
                img = img[:, ::-1, :]
            return torch.from_numpy(np.ascontiguousarray(img)), int(labels[i])

    return CropFlip()


def augment_rows(n: int, repeat: int, torch) -> list[dict]:
    rng = np.random.default_rng(1)
    images = rng.random((n, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, 10, n)
    torch_rate = None
    if torch is not None:
        from torch.utils.data import DataLoader as TorchLoader

        ds = _torch_aug_dataset(torch, images, labels)
        torch_rate = _epoch_rate(lambda: TorchLoader(ds, batch_size=BATCH, shuffle=True), n,
                                 repeat)
    rows = []
    for workers in (0, 2):
        def make(w=workers):
            return DataLoader(NDArrayDataset(images, labels), batch_size=BATCH, shuffle=True,
                              num_workers=w,
                              batch_transforms=[BatchRandomCrop(PADDING), BatchRandomFlip()])
        rows.append(_row(f"crop+flip {n}x32x32x3, batch transforms (needle num_workers="
                         f"{workers})", _epoch_rate(make, n, repeat), torch_rate, 2))
    # For reference: CMU-style per-sample transforms (one Python call per image).
    per_sample = _epoch_rate(
        lambda: DataLoader(NDArrayDataset(images, labels, transforms=[
            RandomCrop(PADDING), RandomFlipHorizontal()]), batch_size=BATCH, shuffle=True),
        n, repeat)
    rows.append(_row(f"crop+flip {n}x32x32x3, per-sample transforms (needle, reference)",
                     per_sample, torch_rate, 1))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="epochs per loader (best counts)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the data (smoke run)")
    args = parser.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(int(common.THREADS))
    except ImportError:
        torch = None
    scale = 10 if args.quick else 1
    np.random.seed(0)
    rows = plain_rows(60000 // scale, args.repeat, torch)
    rows += augment_rows(50000 // scale, args.repeat, torch)
    print(_markdown(rows))
    return rows


def _markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{v:,.0f}" if isinstance(v, float) and v >= 100 else
                 f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
