"""The training loop of ``python -m needle train``: epochs, evaluation, resumable checkpoints.

A checkpoint written after every epoch holds everything the next epoch depends on (model
parameters and buffers, optimizer state and step counts, the scheduler, the data loader's
position, NumPy's RNG state, the epoch and the metrics so far), so training N epochs equals
training k, resuming and training N - k, bit for bit.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import nn, optim
from ..autograd import no_grad
from ..checkpoint import load, rng_state, save, set_rng_state
from ..data import BatchRandomCrop, BatchRandomFlip, DataLoader, NDArrayDataset
from ..jit import jit
from .models import build_model
from .reporting import Progress, plot_curves, write_metrics
from .sources import DataSplit, load_data

CHECKPOINT_NAME = "checkpoint.npz"
MODES = ("eager", "jit")
OPTIMIZERS = ("sgd", "adam", "adamw")


def make_train_step(model: nn.Module, loss_fn: nn.Module, optimizer: optim.Optimizer):
    """One optimization step ``(x, y) -> (loss, logits)``: forward, loss, ``reset_grad``,
    ``backward``, ``step`` (``optimizer.minimize``). Plain eager code, so ``ndl.jit`` compiles
    it as it is."""

    def train_step(x, y):
        logits = model(x)
        loss = optimizer.minimize(loss_fn(logits, y))
        return loss, logits

    return train_step


class CheckpointMismatchError(ValueError):
    """A checkpoint made for another model, dataset or input shape."""


@dataclass
class TrainConfig:
    """Everything that decides a training run (saved in its checkpoints)."""

    model: str = "mlp-resnet"
    data: str = "digits"
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    augment: bool = False
    seed: int = 0
    out: str = "runs/train"
    mode: str = "eager"
    quiet: bool = False
    extra: dict = field(default_factory=dict)

    def identity(self, split: DataSplit) -> dict:
        """What a checkpoint must match to be resumed or evaluated with this config."""
        return {"model": self.model, "image_shape": list(split.image_shape),
                "num_classes": split.num_classes}


def make_optimizer(cfg: TrainConfig, params: list) -> optim.Optimizer:
    if cfg.optimizer == "sgd":
        return optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")


def _batch_transforms(cfg: TrainConfig, split: DataSplit) -> list:
    if not cfg.augment:
        return []
    height = split.image_shape[0]
    # digits (8x8) and MNIST have a handedness: flipping would change the class
    flips = [BatchRandomFlip()] if split.spec.startswith("cifar10") else []
    return [BatchRandomCrop(max(1, height // 8)), *flips]


def evaluate(model: nn.Module, dataset: NDArrayDataset,
             batch_size: int = 256) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` (in eval mode) over ``dataset``."""
    model.eval()
    loss_fn = nn.SoftmaxLoss(reduction="sum")
    total_loss, correct, count = 0.0, 0, 0
    loader = DataLoader(dataset, batch_size=batch_size)
    with no_grad():
        for x, y in loader:
            logits = model(x)
            total_loss += float(loss_fn(logits, y).numpy())
            correct += int((logits.numpy().argmax(axis=1) == y.numpy()).sum())
            count += len(y.numpy())
    return total_loss / max(count, 1), correct / max(count, 1)


class Trainer:
    """One training run: builds the model, data, optimizer; trains; writes outputs."""

    def __init__(self, cfg: TrainConfig, progress: Progress | None = None) -> None:
        self.cfg = cfg
        self.progress = progress or Progress(cfg.quiet)
        self.split = load_data(cfg.data)
        if self.split.note:
            self.progress.say(self.split.note)
        np.random.seed(cfg.seed)
        self.model = build_model(cfg.model, self.split.image_shape, self.split.num_classes)
        self.optimizer = make_optimizer(cfg, self.model.parameters())
        self.loss_fn = nn.SoftmaxLoss()
        self.loader = DataLoader(self.split.train, batch_size=cfg.batch_size, shuffle=True,
                                 batch_transforms=_batch_transforms(cfg, self.split))
        self.history: list[dict] = []
        self.epoch = 0
        self.step = 0
        self.train_step = self._make_train_step()

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint_path(self) -> str:
        return os.path.join(self.cfg.out, CHECKPOINT_NAME)

    def save(self, path: str | None = None) -> str:
        path = path or self.checkpoint_path()
        config = asdict(self.cfg)
        config["identity"] = self.cfg.identity(self.split)
        save(path, config=config, model=self.model, optimizer=self.optimizer,
             loader=self.loader, rng=rng_state(), epoch=self.epoch, step=self.step,
             history=self.history)
        return path

    def resume(self, path: str) -> None:
        """Continue from a checkpoint of the same model, data shape and classes."""
        ckpt = load(path)
        check_identity(ckpt, self.cfg.identity(self.split), path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.history = [dict(row) for row in ckpt["history"]]
        self.progress.say(f"resumed from {path} after epoch {self.epoch}")

    # -- training --------------------------------------------------------------------------------
    def _make_train_step(self):
        """One optimization step returning (loss, logits); compiled with ndl.jit in jit mode."""
        train_step = make_train_step(self.model, self.loss_fn, self.optimizer)
        if self.cfg.mode == "jit":
            return jit(train_step)
        if self.cfg.mode != "eager":
            raise ValueError(f"unknown mode {self.cfg.mode!r}; choose one of {', '.join(MODES)}")
        return train_step

    def train_epoch(self) -> tuple[float, float]:
        self.model.train()
        total_loss, correct, count = 0.0, 0, 0
        bar = self.progress.epoch(self.loader, len(self.loader), self.epoch + 1, self.cfg.epochs)
        try:
            for x, y in bar:
                loss, logits = self.train_step(x, y)
                n = len(y.numpy())
                total_loss += float(loss.numpy()) * n
                correct += int((logits.numpy().argmax(axis=1) == y.numpy()).sum())
                count += n
                self.step += 1
                bar.update(total_loss / count, correct / count)
        finally:
            bar.close()
        return total_loss / count, correct / count

    def fit(self) -> dict:
        """Train up to ``cfg.epochs`` epochs, checkpointing and writing metrics after each."""
        cfg = self.cfg
        os.makedirs(cfg.out, exist_ok=True)
        warned_plot = False
        while self.epoch < cfg.epochs:
            start = time.perf_counter()
            train_loss, train_acc = self.train_epoch()
            test_loss, test_acc = evaluate(self.model, self.split.test)
            self.epoch += 1
            row = {"epoch": self.epoch, "train_loss": train_loss, "train_acc": train_acc,
                   "test_loss": test_loss, "test_acc": test_acc,
                   "seconds": time.perf_counter() - start}
            self.history.append(row)
            self.save()
            write_metrics(os.path.join(cfg.out, "metrics.csv"), self.history)
            if not plot_curves(os.path.join(cfg.out, "curves.png"), self.history) \
                    and not warned_plot:
                warned_plot = True
                self.progress.say("matplotlib is not installed: wrote metrics.csv but no "
                                  "curves.png (pip install 'needle[plot]')")
            self.progress.say(
                f"epoch {self.epoch}/{cfg.epochs}: train loss {train_loss:.4f} acc "
                f"{train_acc:.4f} | test loss {test_loss:.4f} acc {test_acc:.4f} | "
                f"{row['seconds']:.1f}s")
        final = self.history[-1] if self.history else {}
        return {"test_acc": final.get("test_acc"), "test_loss": final.get("test_loss"),
                "epochs": self.epoch, "checkpoint": self.checkpoint_path()}


def check_identity(ckpt: dict, expected: dict, path: str) -> None:
    """Raise CheckpointMismatchError naming what differs between a checkpoint and a run."""
    found = ckpt.get("config", {}).get("identity") if isinstance(ckpt.get("config"), dict) else None
    if found is None:
        raise CheckpointMismatchError(f"{path}: not a training checkpoint of `needle train` "
                                      "(no config)")
    diffs = [f"{k}: checkpoint {found.get(k)!r}, requested {v!r}"
             for k, v in expected.items() if found.get(k) != v]
    if diffs:
        raise CheckpointMismatchError(f"{path}: checkpoint is for a different model: "
                                      + "; ".join(diffs))


def evaluate_checkpoint(path: str, data: str | None = None, batch_size: int = 256) -> dict:
    """Accuracy and loss of a training checkpoint on the test split of its (or other) data."""
    ckpt = load(path)
    config = ckpt.get("config")
    if not isinstance(config, dict) or "identity" not in config:
        raise CheckpointMismatchError(f"{path}: not a training checkpoint of `needle train`")
    split = load_data(data or config["data"])
    identity = config["identity"]
    if list(split.image_shape) != list(identity["image_shape"]):
        raise CheckpointMismatchError(
            f"{path}: the model takes images of shape {tuple(identity['image_shape'])}, the data "
            f"{split.spec} has {split.image_shape}")
    model = build_model(identity["model"], tuple(identity["image_shape"]),
                        identity["num_classes"])
    model.load_state_dict(ckpt["model"])
    loss, acc = evaluate(model, split.test, batch_size)
    return {"data": split.spec, "model": identity["model"], "test_loss": loss, "test_acc": acc,
            "epoch": int(ckpt["epoch"]), "examples": len(split.test)}


__all__ = ["CheckpointMismatchError", "MODES", "OPTIMIZERS", "TrainConfig", "Trainer",
           "evaluate", "evaluate_checkpoint", "make_optimizer", "make_train_step"]
