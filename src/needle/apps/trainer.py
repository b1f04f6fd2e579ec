"""The training loop of ``python -m needle train``: epochs, evaluation, resumable checkpoints.

A checkpoint written after every epoch holds everything the next epoch depends on (model
parameters and buffers, optimizer state and step counts, the scheduler, the data loader's
position, NumPy's RNG state, the epoch and the metrics so far), so training N epochs equals
training k, resuming and training N - k, bit for bit.
"""

from __future__ import annotations

import errno
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .. import nn, optim
from ..autograd import no_grad
from ..checkpoint import CheckpointError, load, rng_state, save, set_rng_state
from ..data import BatchRandomCrop, BatchRandomFlip, DataLoader, NDArrayDataset
from ..jit import jit
from .models import build_model
from .reporting import (
    METRIC_FIELDS,
    Progress,
    TensorBoardWriter,
    best_epoch,
    plot_curves,
    write_metrics,
)
from .sources import DataSplit, load_data

CHECKPOINT_NAME = "checkpoint.npz"
METRICS_NAME = "metrics.csv"
CURVES_NAME = "curves.png"
#: what a run writes into its output folder (an earlier run's copies are never replaced
#: silently; see ``check_output_folder``)
OUTPUT_NAMES = (CHECKPOINT_NAME, METRICS_NAME, CURVES_NAME)
MODES = ("eager", "jit")
OPTIMIZERS = ("sgd", "adam", "adamw")
#: the hyperparameters the command line can change when it resumes a run
RESUMABLE_HYPERPARAMS = ("lr", "weight_decay", "momentum")


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


class OutputError(ValueError):
    """The output folder cannot be used or written: it is a file, unwritable, full, or holds
    an earlier run that would be replaced."""


class TrainingDivergedError(ArithmeticError):
    """The loss (or the weights) became NaN or infinite; nothing was saved after that."""


def check_hyperparams(values: dict[str, float], source: str = "") -> None:
    """Raise ValueError unless lr > 0, weight_decay >= 0 and 0 <= momentum < 1, all finite.

    ``nan <= 0`` is False, so every value is first checked with ``math.isfinite``. ``source``
    prefixes the message (a checkpoint's path); without it the names are written as options.
    """
    rules = {"lr": ("must be a positive number", lambda v: v > 0),
             "weight_decay": ("must be a number >= 0", lambda v: v >= 0),
             "momentum": ("must be a number in [0, 1)", lambda v: 0 <= v < 1)}
    for name, value in values.items():
        what, ok = rules.get(name, ("must be a finite number", lambda v: True))
        label = f"{source}: the checkpoint's optimizer {name}" if source \
            else f"--{name.replace('_', '-')}"
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                or not math.isfinite(value) or not ok(value):
            hint = f"; give --{name.replace('_', '-')} to resume with another value" \
                if source and name in RESUMABLE_HYPERPARAMS else ""
            raise ValueError(f"{label} {what}, got {value!r}{hint}")


def describe_os_error(exc: OSError, what: str) -> str:
    """One line for a failed write: a full disk, a read-only or unwritable folder, or else the
    system's own words."""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"no space left on the device while writing {what} (the disk is full)"
    if exc.errno == errno.EROFS:
        return f"cannot write {what}: the file system is read-only"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot write {what}: permission denied"
    return f"cannot write {what}: {exc.strerror or exc}"


def check_output_folder(out: str, resume: str | None = None, overwrite: bool = False) -> None:
    """Refuse an output folder that would lose data or cannot be written, before any work.

    ``out`` must be a folder (or not exist yet, under a folder). If it holds a checkpoint,
    metrics or curves of an earlier run, training into it would replace them: allowed only
    with ``overwrite``, or when resuming that very checkpoint.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"--out {out}: is a file, not a folder")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"--out {out}: {parent} is a file, not a folder")
    folder = out if os.path.isdir(out) else parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out}: cannot write into {folder} (permission denied or "
                          "read-only)")
    if not os.path.isdir(out) or overwrite:
        return
    earlier = [n for n in OUTPUT_NAMES if os.path.lexists(os.path.join(out, n))]
    if not earlier:
        return
    own = os.path.join(out, CHECKPOINT_NAME)
    if resume and os.path.exists(own) and os.path.exists(resume) \
            and os.path.samefile(resume, own):
        return
    raise OutputError(f"--out {out} already holds an earlier run ({', '.join(earlier)}); "
                      f"continue it with --resume {own}, replace it with --overwrite, or choose "
                      "another --out")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) \
        and not isinstance(value, (bool, np.bool_))


def _count(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) \
        and bool(value >= 0)


def _bad_field(path: str, name: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: bad checkpoint field '{name}': {what}")


def _error_text(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(str(text).split())
    return text if len(text) <= 300 else text[:300] + "..."


@contextmanager
def _field_errors(path: str, name: str, expected: str = "") -> Iterator[None]:
    """Turn what restoring a field of an untrusted checkpoint can raise into one line."""
    try:
        yield
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, OverflowError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise _bad_field(path, name, f"{expected} ({_error_text(exc)})" if expected
                         else _error_text(exc)) from None


def check_training_checkpoint(ckpt: dict, path: str) -> dict:
    """Check the fields of a ``needle train`` checkpoint that resuming or evaluating reads,
    raising CheckpointError naming the first bad one. Returns its config."""
    config = ckpt.get("config")
    if not isinstance(config, dict) or "identity" not in config:
        raise CheckpointMismatchError(f"{path}: not a training checkpoint of `needle train` "
                                      "(no config)")
    identity = config["identity"]
    shape = identity.get("image_shape") if isinstance(identity, dict) else None
    if not (isinstance(identity, dict) and isinstance(identity.get("model"), str)
            and isinstance(shape, list) and len(shape) == 3
            and all(_count(n) and n > 0 for n in shape)
            and _count(identity.get("num_classes")) and identity["num_classes"] > 0):
        raise _bad_field(path, "config", "'identity' needs a model name, an image_shape of "
                         "three positive ints and a positive num_classes")
    if not isinstance(config.get("data", ""), str):
        raise _bad_field(path, "config", f"'data' must be a string, got {config['data']!r}")
    for name in ("epoch", "step"):
        if name in ckpt and not _count(ckpt[name]):
            raise _bad_field(path, name, f"expected a count (an int >= 0), got {ckpt[name]!r}")
    if not isinstance(ckpt.get("model"), dict):
        raise _bad_field(path, "model", "expected the model's state dict")
    return config


def _check_resume_fields(ckpt: dict, path: str) -> None:
    """The fields only resuming reads: epoch, step, history, rng, optimizer, loader."""
    for name in ("epoch", "step", "history", "rng", "optimizer", "loader"):
        if name not in ckpt:
            raise _bad_field(path, name, "missing")
    history = ckpt["history"]
    if not isinstance(history, list):
        raise _bad_field(path, "history", f"expected a list of per-epoch rows, got "
                         f"{type(history).__name__}")
    for i, row in enumerate(history):
        if not isinstance(row, dict) or not all(_number(row.get(k)) for k in METRIC_FIELDS):
            raise _bad_field(path, "history", f"row {i} needs the numbers "
                             f"{', '.join(METRIC_FIELDS)}")
    if len(history) != ckpt["epoch"]:
        raise _bad_field(path, "history", f"{len(history)} rows for epoch {ckpt['epoch']}")
    with _field_errors(path, "rng", "expected NumPy's RNG state, as np.random.get_state() "
                       "returns it"):
        np.random.RandomState().set_state(ckpt["rng"])  # a scratch generator checks the state
    optimizer = ckpt["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("hyperparams"), dict)
            and isinstance(optimizer.get("state"), dict)
            and _count(optimizer.get("step_count"))):
        raise _bad_field(path, "optimizer", "expected an optimizer state dict (hyperparams, "
                         "state, step_count)")
    if not isinstance(ckpt["loader"], dict):
        raise _bad_field(path, "loader", "expected the data loader's state dict")


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


def describe_run(cfg: TrainConfig, data: str) -> str:
    """Model, data and optimizer settings in one line (the title of curves.png)."""
    settings = [f"lr {cfg.lr:g}", f"weight decay {cfg.weight_decay:g}"]
    if cfg.optimizer == "sgd":
        settings.append(f"momentum {cfg.momentum:g}")
    return (f"{cfg.model} on {data}; {cfg.optimizer}, {', '.join(settings)}, "
            f"batch {cfg.batch_size}")


def _resume_epochs(value: Any, epoch: int) -> list[int]:
    """The epochs a checkpoint's run was resumed at (its config's ``resumed_at``), or [] when
    that record is missing or makes no sense."""
    if isinstance(value, list) and all(_count(e) and e < epoch for e in value):
        return sorted({int(e) for e in value})
    return []


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

    def __init__(self, cfg: TrainConfig, progress: Progress | None = None,
                 tensorboard: str | None = None) -> None:
        self.cfg = cfg
        #: a folder for TensorBoard event files (needs tensorboardX), or None
        self.tensorboard = tensorboard
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
        #: (path, epoch) of the last checkpoint this run wrote or resumed from
        self.saved: tuple[str, int] | None = None
        #: the epochs this run (and the runs it continues) was resumed at
        self.resumed_at: list[int] = []
        self.train_step = self._make_train_step()

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint_path(self) -> str:
        return os.path.join(self.cfg.out, CHECKPOINT_NAME)

    def save(self, path: str | None = None) -> str:
        """Write a checkpoint of the run so far (atomically; OutputError if it cannot be)."""
        path = path or self.checkpoint_path()
        config = asdict(self.cfg)
        config["identity"] = self.cfg.identity(self.split)
        if self.resumed_at:
            config["resumed_at"] = list(self.resumed_at)
        self._write(path, lambda: save(
            path, config=config, model=self.model, optimizer=self.optimizer, loader=self.loader,
            rng=rng_state(), epoch=self.epoch, step=self.step, history=self.history))
        self.saved = (path, self.epoch)
        return path

    def _write(self, path: str, write: Callable[..., Any], *args: Any) -> Any:
        """``write(*args)``, one output write, with an OSError turned into a one-line
        OutputError."""
        try:
            return write(*args)
        except OSError as exc:
            raise OutputError(f"{path}: {describe_os_error(exc, os.path.basename(path))}; the "
                              "earlier file is intact") from None

    def resume(self, path: str, overrides: dict[str, float] | None = None) -> None:
        """Continue from a checkpoint of the same model, data shape and classes.

        The optimizer's hyperparameters are the checkpoint's, except those in ``overrides``
        (the ``lr``, ``weight_decay`` or ``momentum`` given on the command line), which replace
        them; a line says so. The config saved from then on records the values in use, so
        config and optimizer always agree. Bad fields raise CheckpointError naming them.
        """
        overrides = dict(overrides or {})
        ckpt = load(path)
        check_training_checkpoint(ckpt, path)
        check_identity(ckpt, self.cfg.identity(self.split), path)
        _check_resume_fields(ckpt, path)
        state = dict(ckpt["optimizer"])
        hyper = dict(state["hyperparams"])
        saved_config = ckpt["config"]
        notes = []
        for name in RESUMABLE_HYPERPARAMS:
            if name in overrides:
                value = float(overrides[name])
                if name in hyper and hyper[name] != value:
                    had = f"{hyper[name]:g}" if _number(hyper[name]) else repr(hyper[name])
                    notes.append(f"{name.replace('_', ' ')} {value:g} (checkpoint had {had})")
                if name in hyper:
                    hyper[name] = value
            elif name in hyper:
                value = hyper[name]
            else:  # not a hyperparameter of this optimizer (Adam's momentum): keep the record
                value = saved_config.get(name, getattr(self.cfg, name))
                if not _number(value):
                    value = getattr(self.cfg, name)
            setattr(self.cfg, name, float(value))
        check_hyperparams({k: v for k, v in hyper.items()
                           if k in RESUMABLE_HYPERPARAMS and k not in overrides}, path)
        check_hyperparams({k: v for k, v in hyper.items()
                           if k not in RESUMABLE_HYPERPARAMS and _number(v)}, path)
        state["hyperparams"] = hyper
        if "momentum" in hyper:
            # a new momentum can add or drop SGD's momentum buffers: keep only what it uses
            # (an SGD: the only optimizer with momentum)
            self.optimizer.momentum = float(hyper["momentum"])  # type: ignore[attr-defined]
            names = set(self.optimizer.state_names)
            state["state"] = {k: entry for k, entry in state["state"].items()
                              if isinstance(entry, dict) and set(entry) == names}
        with _field_errors(path, "model"):
            self.model.load_state_dict(ckpt["model"])
        with _field_errors(path, "optimizer"):
            self.optimizer.load_state_dict(state)
        with _field_errors(path, "loader"):
            self.loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.history = [dict(row) for row in ckpt["history"]]
        self.resumed_at = [*_resume_epochs(saved_config.get("resumed_at"), self.epoch),
                           self.epoch]
        self.saved = (path, self.epoch)
        self.progress.say(f"resumed from {path} after epoch {self.epoch}")
        if notes:
            self.progress.say("resuming with " + ", ".join(notes))

    # -- training --------------------------------------------------------------------------------
    def _make_train_step(self):
        """One optimization step returning (loss, logits); compiled with ndl.jit in jit mode."""
        train_step = make_train_step(self.model, self.loss_fn, self.optimizer)
        if self.cfg.mode == "jit":
            return jit(train_step)
        if self.cfg.mode != "eager":
            raise ValueError(f"unknown mode {self.cfg.mode!r}; choose one of {', '.join(MODES)}")
        return train_step

    def _diverged(self, what: str) -> TrainingDivergedError:
        """The error for a loss or weights gone NaN/infinite in the epoch being trained."""
        if self.saved is None:
            kept = "nothing was saved"
        else:
            kept = f"{self.saved[0]} (epoch {self.saved[1]}) is untouched"
        return TrainingDivergedError(
            f"epoch {self.epoch + 1}: {what}; training stopped and {kept}; try a smaller --lr "
            f"(this run used {self.cfg.lr:g})")

    def train_epoch(self) -> tuple[float, float]:
        """One pass over the training data; TrainingDivergedError if the loss stops being
        finite (checked after every step)."""
        self.model.train()
        total_loss, correct, count = 0.0, 0, 0
        bar = self.progress.epoch(self.loader, len(self.loader), self.epoch + 1, self.cfg.epochs)
        try:
            for x, y in bar:
                loss, logits = self.train_step(x, y)
                value = float(loss.numpy())
                if not math.isfinite(value):
                    raise self._diverged(f"the training loss became {value} at step "
                                         f"{self.step + 1}")
                n = len(y.numpy())
                total_loss += value * n
                correct += int((logits.numpy().argmax(axis=1) == y.numpy()).sum())
                count += n
                self.step += 1
                bar.update(total_loss / count, correct / count)
        finally:
            bar.close()
        if count == 0:
            raise ValueError(f"{self.split.spec}: no training batches (the training split has "
                             f"{len(self.split.train)} images)")
        return total_loss / count, correct / count

    def _evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy after an epoch (a distributed run shares the work)."""
        return evaluate(self.model, self.split.test)

    def _check_finite(self, test_loss: float) -> None:
        """Refuse to save weights, buffers or a test loss that are NaN or infinite."""
        if not math.isfinite(test_loss):
            raise self._diverged(f"the test loss became {test_loss}")
        for name, value in self.model.state_dict().items():
            if value.dtype.kind in "fc" and not np.isfinite(value).all():
                raise self._diverged(f"the model's {name} holds NaN or infinite values")

    def _make_output_folder(self) -> None:
        out = self.cfg.out
        if os.path.exists(out) and not os.path.isdir(out):
            raise OutputError(f"--out {out}: is a file, not a folder")
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"--out {out}: {describe_os_error(exc, 'the folder')}") from None

    def fit(self) -> dict:
        """Train up to ``cfg.epochs`` epochs, checkpointing and writing metrics after each.

        Stops with TrainingDivergedError, saving nothing more, as soon as the loss or the
        weights stop being finite; NumPy's overflow warnings are silenced meanwhile, since
        that check reports them. A write that fails raises OutputError; earlier files stay.
        """
        cfg = self.cfg
        self._make_output_folder()
        board = self._open_tensorboard() if self.epoch < cfg.epochs else None
        try:
            self._fit(board)
        finally:
            if board is not None:
                board.close()
        final = self.history[-1] if self.history else {}
        best = best_epoch(self.history) or {}
        return {"test_acc": final.get("test_acc"), "test_loss": final.get("test_loss"),
                "epochs": self.epoch, "checkpoint": self.checkpoint_path(),
                "best_test_acc": best.get("test_acc"), "best_epoch": best.get("epoch")}

    def _open_tensorboard(self) -> TensorBoardWriter | None:
        """The TensorBoard writer of ``self.tensorboard`` (None without one)."""
        if not self.tensorboard:
            return None
        logdir = self.tensorboard
        if os.path.exists(logdir) and not os.path.isdir(logdir):
            raise OutputError(f"--tensorboard {logdir}: is a file, not a folder")
        try:
            # TensorBoard hides what earlier runs wrote into logdir from this epoch on
            return TensorBoardWriter(logdir, purge_step=self.epoch + 1)
        except OSError as exc:
            raise OutputError(f"--tensorboard {logdir}: "
                              f"{describe_os_error(exc, 'the event file')}") from None

    def _fit(self, board: TensorBoardWriter | None) -> None:
        cfg = self.cfg
        title = describe_run(cfg, self.split.spec)
        warned_plot = False
        while self.epoch < cfg.epochs:
            start = time.perf_counter()
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                train_loss, train_acc = self.train_epoch()
                test_loss, test_acc = self._evaluate()
                self._check_finite(test_loss)
            self.epoch += 1
            row = {"epoch": self.epoch, "train_loss": train_loss, "train_acc": train_acc,
                   "test_loss": test_loss, "test_acc": test_acc,
                   "seconds": time.perf_counter() - start}
            self.history.append(row)
            self.save()
            metrics = os.path.join(cfg.out, METRICS_NAME)
            self._write(metrics, write_metrics, metrics, self.history)
            curves = os.path.join(cfg.out, CURVES_NAME)
            if not self._write(curves, plot_curves, curves, self.history, title,
                               self.resumed_at) and not warned_plot:
                warned_plot = True
                self.progress.say("matplotlib is not installed: wrote metrics.csv but no "
                                  "curves.png (pip install 'needle[plot]')")
            self.progress.say(
                f"epoch {self.epoch}/{cfg.epochs}: train loss {train_loss:.4f} acc "
                f"{train_acc:.4f} | test loss {test_loss:.4f} acc {test_acc:.4f} | "
                f"{row['seconds']:.1f}s")
            if board is not None:
                self._write(board.logdir, board.write, row, float(self.optimizer.lr))


def check_identity(ckpt: dict, expected: dict, path: str) -> None:
    """Raise CheckpointMismatchError naming what differs between a checkpoint and a run."""
    found = ckpt.get("config", {}).get("identity") if isinstance(ckpt.get("config"), dict) else None
    if not isinstance(found, dict):
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
    config = check_training_checkpoint(ckpt, path)
    if "epoch" not in ckpt:
        raise _bad_field(path, "epoch", "missing")
    if not data and not isinstance(config.get("data"), str):
        raise _bad_field(path, "config", "no 'data' to evaluate on; give --data")
    split = load_data(data or config["data"])
    identity = config["identity"]
    if list(split.image_shape) != list(identity["image_shape"]):
        raise CheckpointMismatchError(
            f"{path}: the model takes images of shape {tuple(identity['image_shape'])}, the data "
            f"{split.spec} has {split.image_shape}")
    model = build_model(identity["model"], tuple(identity["image_shape"]),
                        identity["num_classes"])
    with _field_errors(path, "model"):
        model.load_state_dict(ckpt["model"])
    loss, acc = evaluate(model, split.test, batch_size)
    return {"data": split.spec, "model": identity["model"], "test_loss": loss, "test_acc": acc,
            "epoch": int(ckpt["epoch"]), "examples": len(split.test)}


__all__ = ["CheckpointMismatchError", "MODES", "OPTIMIZERS", "OutputError", "TrainConfig",
           "Trainer", "TrainingDivergedError", "check_hyperparams", "check_output_folder",
           "check_training_checkpoint", "describe_run", "evaluate", "evaluate_checkpoint",
           "make_optimizer", "make_train_step"]
