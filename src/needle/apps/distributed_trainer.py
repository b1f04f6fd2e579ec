"""``needle train --distributed``: the training loop data-parallel over MPI ranks.

Launched as ``mpirun -n 4 python -m needle train --distributed ...``. Every rank builds the
same model and walks the same global batch order (one loader, seeded alike); rank r trains
on its share of each global batch (``--batch-size`` is the global batch), and
``DistributedDataParallel`` averages the gradients, so the run follows one process training
with the whole batch (exactly so with ``--sync-bn``, whose BatchNorm statistics are the
global batch's). The loader position, RNG state and weights are the same on every rank and
do not depend on the number of ranks, so a checkpoint resumes with any number of them.
Within an epoch each rank draws its Dropout masks from its own stream (seeded from the shared
state and the rank); the shared state after the epoch's order is drawn is what the next
epoch and the checkpoint continue from.

Only rank 0 prints and writes (checkpoint, metrics.csv, curves.png, TensorBoard files); the
training and test metrics are summed over the ranks first. A rank that fails or hangs makes
the others stop within the collectives' deadline (``NEEDLE_DISTRIBUTED_TIMEOUT``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import distributed as dist
from .. import nn
from ..autograd import Tensor, no_grad
from ..data import DataLoader, NDArrayDataset
from ..jit import jit
from .reporting import Progress
from .trainer import MODES, TrainConfig, Trainer, make_train_step


def share_bounds(n: int, size: int) -> list[int]:
    """Row bounds of each rank's share of a batch of ``n``: sizes differ by at most one."""
    return [n * r // size for r in range(size + 1)]


class DistributedTrainer(Trainer):
    """A :class:`Trainer` whose steps run data-parallel on the ranks of ``mpirun``."""

    def __init__(self, cfg: TrainConfig, progress: Progress | None = None,
                 tensorboard: str | None = None, sync_bn: bool = False) -> None:
        self.comm = dist.init()
        self.rank, self.world_size = self.comm.rank, self.comm.size
        self.sync_bn = bool(sync_bn)
        if self.rank != 0:  # only rank 0 prints and writes
            progress, tensorboard = Progress(quiet=True), None
        super().__init__(cfg, progress=progress, tensorboard=tensorboard)
        if self.rank == 0:
            self.progress.say(f"data-parallel on {self.world_size} process"
                              f"{'es' if self.world_size != 1 else ''} (global batch "
                              f"{cfg.batch_size}{', synchronized BatchNorm' if sync_bn else ''})")

    @property
    def writes_outputs(self) -> bool:
        """Whether this rank prints results and writes files (rank 0)."""
        return self.rank == 0

    def _make_train_step(self):
        self.ddp = dist.DistributedDataParallel(self.model, sync_bn=self.sync_bn)
        self.model = self.ddp.module  # checkpoints keep the plain module's names
        step = make_train_step(self.ddp, self.loss_fn, self.optimizer)
        self._uneven_step = self._scaled_step
        if self.cfg.mode == "jit":
            return jit(step)
        if self.cfg.mode != "eager":
            raise ValueError(f"unknown mode {self.cfg.mode!r}; choose one of {', '.join(MODES)}")
        return step

    def _scaled_step(self, x: Tensor, y: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """A step for a batch whose shares differ in size: the loss is scaled by
        ``share * world / batch`` so the averaged gradient is the whole batch's mean."""
        logits = self.ddp(x)
        loss = self.loss_fn(logits, y)
        self.optimizer.minimize(loss * scale)
        return loss, logits

    # -- outputs: rank 0 only ----------------------------------------------------------------
    def _write(self, path: str, write: Any, *args: Any) -> Any:
        if self.rank != 0:
            return True
        return super()._write(path, write, *args)

    def _make_output_folder(self) -> None:
        if self.rank == 0:
            super()._make_output_folder()

    # -- one epoch ---------------------------------------------------------------------------
    def train_epoch(self) -> tuple[float, float]:
        """One pass over the global batches, this rank's share of each; the loss and
        accuracy summed over the ranks."""
        self.model.train()
        self._sync_rng()
        size, rank = self.world_size, self.rank
        total_loss, correct, count = 0.0, 0, 0
        bar = self.progress.epoch(self.loader, len(self.loader), self.epoch + 1, self.cfg.epochs)
        try:
            batches = iter(bar)  # the loader draws the epoch's order: the same on every rank
            after_order: Any = np.random.get_state()
            # each rank's own stream for the epoch's other draws (Dropout masks), so the
            # ranks do not repeat one another's masks
            np.random.seed([int(k) for k in after_order[1][:4]] + [rank])
            for x, y in batches:
                n = int(y.shape[0])
                if n < size:  # too small to give every rank a row: skipped by all ranks
                    continue
                bounds = share_bounds(n, size)
                lo, hi = bounds[rank], bounds[rank + 1]
                xs = Tensor(x.numpy()[lo:hi], requires_grad=False)
                ys = Tensor(y.numpy()[lo:hi], requires_grad=False)
                if n % size == 0:
                    loss, logits = self.train_step(xs, ys)
                else:
                    loss, logits = self._uneven_step(xs, ys, (hi - lo) * size / n)
                value = float(loss.numpy())
                if not math.isfinite(value):
                    raise self._diverged(f"the training loss became {value} at step "
                                         f"{self.step + 1} (rank {rank})")
                total_loss += value * (hi - lo)
                correct += int((logits.numpy().argmax(axis=1) == ys.numpy()).sum())
                count += hi - lo
                self.step += 1
                bar.update(total_loss / count, correct / count)
        finally:
            bar.close()
        # the next epoch (and a checkpoint) continue from the state every rank shares
        np.random.set_state(after_order)
        total_loss, correct, count = self.comm.allreduce_object_sum([total_loss, correct, count])
        if count == 0:
            raise ValueError(f"{self.split.spec}: no training batches (the training split has "
                             f"{len(self.split.train)} images)")
        return total_loss / count, correct / count

    def _sync_rng(self) -> None:
        """Give every rank rank 0's NumPy RNG state, so all draw the same epoch order (their
        Dropout masks, drawn for shares of unequal size, may have moved them apart)."""
        kind, key, pos, has_gauss, gauss = np.random.get_state()
        key = self.comm.broadcast(np.asarray(key, dtype=np.uint32), 0)
        rest = self.comm.broadcast(np.array([pos, has_gauss, gauss], dtype=np.float64), 0)
        np.random.set_state((kind, key, int(rest[0]), int(rest[1]), float(rest[2])))

    def _evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy: each rank evaluates its share of the test set."""
        return evaluate_sharded(self.model, self.split.test, self.comm)


def evaluate_sharded(model: nn.Module, dataset: NDArrayDataset, comm: Any,
                     batch_size: int = 256) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` (eval mode) over ``dataset``, rank r taking the
    r-th contiguous share of it; sums over the ranks."""
    model.eval()
    n = len(dataset)
    bounds = share_bounds(n, comm.size)
    lo, hi = bounds[comm.rank], bounds[comm.rank + 1]
    loss_fn = nn.SoftmaxLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    if hi > lo:
        with no_grad():
            for x, y in DataLoader(dataset, batch_size=batch_size, sampler=range(lo, hi)):
                logits = model(x)
                total_loss += float(loss_fn(logits, y).numpy())
                correct += int((logits.numpy().argmax(axis=1) == y.numpy()).sum())
    total_loss, correct = comm.allreduce_object_sum([total_loss, correct])
    return total_loss / max(n, 1), correct / max(n, 1)


__all__ = ["DistributedTrainer", "evaluate_sharded", "share_bounds"]
