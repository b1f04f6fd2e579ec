"""The README's MNIST command: `--model cnn` reaches 97.5% test accuracy within 5 epochs."""

from __future__ import annotations

from pathlib import Path

import pytest

from needle.checkpoint import load
from needle.cli import main

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.mark.skipif(not (MNIST / "t10k-images-idx3-ubyte.gz").exists(),
                    reason=f"MNIST test set not present at {MNIST}")
def test_cnn_learns_mnist_to_97_5_percent_in_5_epochs(tmp_path):
    # the 10,000-image test set split 80/20 (8,000 to train), as the README's command runs
    out = tmp_path / "cnn"
    assert main(["train", "--model", "cnn", "--data", f"mnist:{MNIST}", "--epochs", "5",
                 "--out", str(out), "--quiet"]) == 0
    history = load(out / "checkpoint.npz")["history"]
    accuracies = [row["test_acc"] for row in history]
    assert len(accuracies) == 5
    assert accuracies[-1] >= 0.975, accuracies
