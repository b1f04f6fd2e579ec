"""The command line's `--model cnn`: it sees whole digits, its BatchNorm statistics keep up with
training, and the README's MNIST command reaches 97.5% test accuracy within 5 epochs.

The CNN this replaced averaged (global average pool) a 14x14 map of units that each saw 11x11
pixels of a 28x28 image: a bag of digit fragments without their layout. It reached 38% test
accuracy after one epoch and 87% after five (PyTorch, from the same weights with the same data
split and optimizer, trained it no better). And BatchNorm's running statistics (momentum 0.1)
trailed the weights by ~9 Adam steps: the new CNN with them scored 96.85% after five epochs
instead of the 98.4% that statistics of its final weights give.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import needle as ndl
from needle import nn, ops
from needle.apps.models import build_model
from needle.checkpoint import load
from needle.cli import main

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _pixels_seen_by_the_centre_unit(model: nn.Module, size: int) -> tuple[set[int], set[int]]:
    """The columns of the middle row and the rows of the middle column of a size x size image
    that move the centre unit of ``model.features`` (NCHW in and out): its receptive field.

    All conv weights are made non-negative and the model is in eval mode (BatchNorm with its
    initial statistics is then the identity), so a pixel's bump reaches every unit whose window
    covers it, through ReLUs and max pools alike; one batch holds the plain and bumped images.
    """
    model.eval()
    for p in model.parameters():
        if len(p.shape) == 4:
            p.data = ndl.Tensor(np.abs(p.numpy()))
    mid = size // 2
    images = np.zeros((1 + 2 * size, size, size, 1), dtype=np.float32)
    for i in range(size):
        images[1 + i, mid, i, 0] = 100.0  # along the middle row
        images[1 + size + i, i, mid, 0] = 100.0  # along the middle column
    with ndl.no_grad():
        maps = model.features(ops.permute(ndl.Tensor(images), (0, 3, 1, 2))).numpy()
    centre = maps[:, :, maps.shape[2] // 2, maps.shape[3] // 2]
    moved = np.abs(centre[1:] - centre[0]).max(axis=1) > 1e-4 * (np.abs(centre).max() + 1)
    return ({i for i in range(size) if moved[i]}, {i for i in range(size) if moved[size + i]})


def test_the_cnn_sees_whole_mnist_digits():
    """Global average pooling keeps only what each unit of the last feature map sees, so those
    units must see a whole digit: MNIST centres each digit in a 20x20 box of the 28x28 image."""
    np.random.seed(0)
    model = build_model("cnn", (28, 28, 1), 10)
    columns, rows = _pixels_seen_by_the_centre_unit(model, 28)
    box = set(range(4, 24))
    assert box <= columns and box <= rows, (
        f"the centre unit sees columns {min(columns)}-{max(columns)} and rows "
        f"{min(rows)}-{max(rows)} of the 28x28 image, not the whole 4-23 box of a digit")


def test_the_cnn_batchnorm_statistics_trail_training_by_at_most_one_step():
    """Eval mode uses each BatchNorm's running statistics, an average over past batches. Adam
    at the default lr 2e-3 moves the CNN's deepest BatchNorm input mean by ~0.02 std per step
    on MNIST, so an average that lags k steps is off by ~0.02k std. Fed batches whose mean
    rises by 1 per step, every BatchNorm of the CNN must end within one step of the latest."""
    np.random.seed(0)
    model = build_model("cnn", (28, 28, 1), 10)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    rng = np.random.default_rng(0)
    for bn in norms:
        bn.train()
        steps = 40
        for step in range(steps):
            batch = rng.standard_normal((8, bn.dim, 3, 3)).astype(np.float32)
            batch -= batch.mean(axis=(0, 2, 3), keepdims=True) - step
            with ndl.no_grad():
                bn(ndl.Tensor(batch))
        lag = (steps - 1) - bn.running_mean.numpy()
        assert np.all(lag <= 1.0 + 1e-3), (
            f"{bn}: the running mean trails the batches by {float(lag.max()):.1f} steps")


@pytest.mark.skipif(not all((MNIST / f).is_file() for f in MNIST_FILES),
                    reason=f"MNIST test set not present at {MNIST}")
def test_readme_mnist_command_reaches_97_5_percent_in_5_epochs(tmp_path):
    """`python -m needle train --model cnn --data mnist:DIR --epochs 5` on the 10,000-image MNIST
    test set, split 80/20 (8,000 to train). ~50 s on 2 cores (~10 s an epoch); seeds 0-4 end at
    98.3-98.45% (the replaced CNN: 86.55%)."""
    out = tmp_path / "cnn"
    assert main(["train", "--model", "cnn", "--data", f"mnist:{MNIST}", "--epochs", "5",
                 "--out", str(out), "--quiet"]) == 0
    history = load(out / "checkpoint.npz")["history"]
    accuracies = [round(float(row["test_acc"]), 4) for row in history]
    assert len(accuracies) == 5
    assert accuracies[-1] >= 0.975, f"test accuracy per epoch: {accuracies}"
