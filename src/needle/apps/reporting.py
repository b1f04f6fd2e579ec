"""Progress output, metrics.csv and curves.png for training runs."""

from __future__ import annotations

import contextlib
import csv
import os
import sys
from collections.abc import Iterable
from typing import Any

METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds")


class Progress:
    """A tqdm bar per epoch on a terminal (if tqdm is installed), plain lines otherwise."""

    def __init__(self, quiet: bool = False, stream: Any = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stdout
        self._tqdm = None
        if not quiet and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm

                self._tqdm = tqdm
            except ImportError:
                pass

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, file=self.stream, flush=True)

    def epoch(self, batches: Iterable, total: int, epoch: int, epochs: int) -> Any:
        """Wrap an epoch's batches; call ``update(loss, acc)`` on the result after each step."""
        return _EpochBar(self, batches, total, epoch, epochs)


class _EpochBar:
    def __init__(self, progress: Progress, batches: Iterable, total: int, epoch: int,
                 epochs: int) -> None:
        self.progress = progress
        self.batches = batches
        self.bar = None
        if progress._tqdm is not None:
            self.bar = progress._tqdm(total=total, desc=f"epoch {epoch}/{epochs}", leave=False,
                                      file=progress.stream, dynamic_ncols=True)

    def __iter__(self):
        return iter(self.batches)

    def update(self, loss: float, acc: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def write_metrics(path: str, rows: list[dict]) -> None:
    """Write all epochs' metrics as CSV (atomically: a temporary file, then a rename).

    On any error (a full disk, say) the temporary file is removed and ``path`` is left as it
    was; the error propagates.
    """
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row[k] for k in METRIC_FIELDS})
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def plot_curves(path: str, rows: list[dict]) -> bool:
    """Loss and accuracy per epoch as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in rows], "s-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [r["train_acc"] for r in rows], "o-", label="train")
    ax_acc.plot(epochs, [r["test_acc"] for r in rows], "s-", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    finally:
        plt.close(fig)
    return True
