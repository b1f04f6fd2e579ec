"""Progress output, metrics.csv, curves.png and TensorBoard event files for training runs."""

from __future__ import annotations

import contextlib
import csv
import os
import sys
import time
from collections.abc import Iterable, Sequence
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


def best_epoch(rows: list[dict]) -> dict | None:
    """The row with the highest test accuracy (the earliest of equals); None without rows."""
    return max(rows, key=lambda r: r["test_acc"]) if rows else None


def curves_figure(rows: list[dict], title: str = "", resumed_at: Sequence[int] = ()) -> Any:
    """Loss (log scale) and accuracy per epoch as a matplotlib Figure, whole-number epoch
    ticks, the best epoch starred, a dashed line at each epoch a run was resumed from.

    Raises ImportError when matplotlib is not installed. No pyplot: nothing global changes.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(9, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in rows], "s-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss (log scale)", title="loss")
    ax_loss.set_yscale("log")
    # ticks at 1, 2, 5 times powers of ten, written as plain numbers (0.2, not 2x10^-1:
    # mathtext labels would double the time a figure takes)
    ax_loss.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_loss.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax_loss.yaxis.set_minor_formatter(NullFormatter())
    ax_acc.plot(epochs, [r["train_acc"] for r in rows], "o-", label="train")
    ax_acc.plot(epochs, [r["test_acc"] for r in rows], "s-", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    best = best_epoch(rows)
    if best is not None:
        ax_acc.plot([best["epoch"]], [best["test_acc"]], "*", color="gold", markersize=14,
                    markeredgecolor="black", zorder=5,
                    label=f"best test {best['test_acc']:.4f} (epoch {best['epoch']})")
    resumed = sorted(set(resumed_at))
    label = f"resumed at epoch{'s' if len(resumed) > 1 else ''} " \
        + ", ".join(str(e) for e in resumed)
    for i, epoch in enumerate(resumed):
        for ax in (ax_loss, ax_acc):
            ax.axvline(epoch, color="gray", linestyle="--", linewidth=1,
                       label=label if i == 0 else None)
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    # fixed margins: tight_layout would draw the figure once more
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.84, wspace=0.25)
    return fig


def plot_curves(path: str, rows: list[dict], title: str = "",
                resumed_at: Sequence[int] = ()) -> bool:
    """Write :func:`curves_figure` as a PNG (atomically); False when matplotlib is not
    installed."""
    try:
        fig = curves_figure(rows, title, resumed_at)
    except ImportError:
        return False
    tmp = f"{path}.tmp.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return True


TENSORBOARD_INSTALL = "pip install 'needle[tensorboard]'"
#: the scalar tags ``TensorBoardWriter`` writes per epoch, and the row field (or "lr") of each
TENSORBOARD_TAGS = {"loss/train": "train_loss", "loss/test": "test_loss",
                    "accuracy/train": "train_acc", "accuracy/test": "test_acc", "lr": "lr"}


def require_tensorboard() -> None:
    """Raise ValueError (one line, naming the extra) unless tensorboardX can be imported."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboardX package, which is not "
                         f"installed: {TENSORBOARD_INSTALL}") from None


class TensorBoardWriter:
    """Per-epoch scalars (loss and accuracy, train and test, and the learning rate) as
    TensorBoard event files in ``logdir``, with tensorboardX.

    ``purge_step``: on a resumed run, the first epoch it trains; TensorBoard then drops what
    earlier event files in ``logdir`` hold from that epoch on (a longer run resumed early).
    """

    def __init__(self, logdir: str, purge_step: int | None = None) -> None:
        from tensorboardX import SummaryWriter

        self.logdir = logdir
        # tensorboardX names its files by the second (and opens them with "wb"): a suffix in
        # nanoseconds keeps two runs in one second apart, and in order by name
        self._writer = SummaryWriter(logdir, purge_step=purge_step, flush_secs=10,
                                     filename_suffix=f".{time.time_ns()}")

    def write(self, row: dict, lr: float) -> None:
        """Add one epoch's scalars (step = the epoch) and flush them to disk."""
        values = {**row, "lr": lr}
        for tag, key in TENSORBOARD_TAGS.items():
            self._writer.add_scalar(tag, float(values[key]), global_step=int(row["epoch"]))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
