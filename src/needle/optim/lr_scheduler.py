"""Learning-rate schedules: each step() sets ``optimizer.lr`` from a closed form in the epoch.

The closed forms are torch.optim.lr_scheduler's, so the learning rates agree with PyTorch
(up to float rounding: PyTorch updates most of them recursively, we evaluate them directly).
As in PyTorch, making a scheduler applies epoch 0's rate at once, and ``step()`` is called
after ``optimizer.step()``.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

from .optimizer import Optimizer

__all__ = [
    "CosineAnnealingLR", "ExponentialLR", "LRScheduler", "LinearLR", "LinearWarmup",
    "MultiStepLR", "SequentialLR", "StepLR",
]


class LRScheduler:
    """Base: ``optimizer.lr = lr_at(last_epoch)`` on every ``step()``.

    ``base_lr`` is the optimizer's ``initial_lr`` (its ``lr`` when the first scheduler was
    attached), so several schedulers on one optimizer share the same base.
    Subclasses define ``lr_at(epoch)`` and list their settings in ``settings``.
    """

    #: constructor settings saved by ``state_dict``
    settings: tuple[str, ...] = ()

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: expected a needle Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        if optimizer.initial_lr is None:
            optimizer.initial_lr = float(optimizer.lr)
        self.base_lr: float = optimizer.initial_lr
        self.last_epoch = -1
        self._last_lr = float(optimizer.lr)
        self.step()

    def lr_at(self, epoch: int) -> float:
        """The learning rate at ``epoch`` (0-based number of ``step()`` calls)."""
        raise NotImplementedError(f"{type(self).__name__} does not define lr_at()")

    def step(self) -> None:
        """Advance one epoch and set the optimizer's learning rate."""
        self.last_epoch += 1
        self._last_lr = float(self.lr_at(self.last_epoch))
        self.optimizer.lr = self._last_lr

    def get_last_lr(self) -> list[float]:
        """The learning rate set by the last ``step()``, as a one-item list (PyTorch's shape)."""
        return [self._last_lr]

    def state_dict(self) -> dict[str, Any]:
        """``{"scheduler": class name, "last_epoch", "base_lr", "last_lr", settings...}``."""
        state = {"scheduler": type(self).__name__, "last_epoch": self.last_epoch,
                 "base_lr": self.base_lr, "last_lr": self._last_lr}
        for name in self.settings:
            value = getattr(self, name)
            state[name] = list(value) if isinstance(value, tuple) else value
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: restore the epoch, base and settings, and set the optimizer's lr to match."""
        name = type(self).__name__
        if state.get("scheduler") != name:
            raise ValueError(f"{name}.load_state_dict: the state dict belongs to "
                             f"{state.get('scheduler')}")
        for setting in self.settings:
            value = state[setting]
            current = getattr(self, setting)
            if isinstance(current, tuple):
                value = tuple(int(v) for v in value)
            elif isinstance(current, int):
                value = int(value)
            else:
                value = float(value)
            setattr(self, setting, value)
        self.last_epoch = int(state["last_epoch"])
        self.base_lr = float(state["base_lr"])
        self._last_lr = float(state["last_lr"])
        self.optimizer.lr = self._last_lr

    def __repr__(self) -> str:
        settings = ", ".join(f"{s}={getattr(self, s)}" for s in self.settings)
        return f"{type(self).__name__}({settings}, last_epoch={self.last_epoch})"


class StepLR(LRScheduler):
    """``lr = base_lr * gamma ** (epoch // step_size)``."""

    settings = ("step_size", "gamma")

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1) -> None:
        if step_size < 1:
            raise ValueError(f"StepLR: step_size must be >= 1, got {step_size}")
        self.step_size = int(step_size)
        self.gamma = float(gamma)
        super().__init__(optimizer)

    def lr_at(self, epoch: int) -> float:
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class MultiStepLR(LRScheduler):
    """``lr = base_lr * gamma ** (number of milestones <= epoch)``."""

    settings = ("milestones", "gamma")

    def __init__(self, optimizer: Optimizer, milestones: Sequence[int],
                 gamma: float = 0.1) -> None:
        self.milestones = tuple(sorted(int(m) for m in milestones))
        self.gamma = float(gamma)
        super().__init__(optimizer)

    def lr_at(self, epoch: int) -> float:
        return self.base_lr * self.gamma ** bisect_right(self.milestones, epoch)


class ExponentialLR(LRScheduler):
    """``lr = base_lr * gamma ** epoch``."""

    settings = ("gamma",)

    def __init__(self, optimizer: Optimizer, gamma: float) -> None:
        self.gamma = float(gamma)
        super().__init__(optimizer)

    def lr_at(self, epoch: int) -> float:
        return self.base_lr * self.gamma**epoch


class CosineAnnealingLR(LRScheduler):
    """``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2``.

    Past ``T_max`` the cosine goes on (rising again towards ``base_lr`` at ``2 T_max``), as in
    PyTorch.
    """

    settings = ("T_max", "eta_min")

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0) -> None:
        if T_max < 1:
            raise ValueError(f"CosineAnnealingLR: T_max must be >= 1, got {T_max}")
        self.T_max = int(T_max)
        self.eta_min = float(eta_min)
        super().__init__(optimizer)

    def lr_at(self, epoch: int) -> float:
        cos = math.cos(math.pi * epoch / self.T_max)
        return self.eta_min + (self.base_lr - self.eta_min) * (1.0 + cos) / 2.0


class LinearLR(LRScheduler):
    """``lr = base_lr * (start + (end - start) * min(epoch, total_iters) / total_iters)``.

    ``LinearLR(optimizer, start_factor=1/3, end_factor=1.0, total_iters=5)`` as PyTorch's.
    """

    settings = ("start_factor", "end_factor", "total_iters")

    def __init__(self, optimizer: Optimizer, start_factor: float = 1.0 / 3,
                 end_factor: float = 1.0, total_iters: int = 5) -> None:
        name = type(self).__name__
        if not self._start_ok(start_factor):
            raise ValueError(f"{name}: start_factor must be in {self._start_range}, "
                             f"got {start_factor}")
        if not 0.0 <= end_factor <= 1.0:
            raise ValueError(f"{name}: end_factor must be in [0, 1], got {end_factor}")
        if total_iters < 1:
            raise ValueError(f"{name}: total_iters must be >= 1, got {total_iters}")
        self.start_factor = float(start_factor)
        self.end_factor = float(end_factor)
        self.total_iters = int(total_iters)
        super().__init__(optimizer)

    _start_range = "(0, 1]"

    @staticmethod
    def _start_ok(start_factor: float) -> bool:
        return 0.0 < start_factor <= 1.0

    def lr_at(self, epoch: int) -> float:
        progress = min(self.total_iters, epoch) / self.total_iters
        return self.base_lr * (self.start_factor
                               + (self.end_factor - self.start_factor) * progress)


class LinearWarmup(LinearLR):
    """Ramp from ``start_factor * base_lr`` to ``base_lr`` over ``warmup_steps`` steps, then hold.

    ``lr = base_lr * (start + (1 - start) * min(epoch, warmup_steps) / warmup_steps)``: PyTorch's
    ``LinearLR(start_factor, 1.0, warmup_steps)``, also allowing ``start_factor = 0``.
    Chain it with a decay through ``SequentialLR(..., milestones=[warmup_steps])``.
    """

    _start_range = "[0, 1]"

    def __init__(self, optimizer: Optimizer, warmup_steps: int,
                 start_factor: float = 0.0) -> None:
        super().__init__(optimizer, start_factor=start_factor, end_factor=1.0,
                         total_iters=warmup_steps)

    @staticmethod
    def _start_ok(start_factor: float) -> bool:
        return 0.0 <= start_factor <= 1.0

    @property
    def warmup_steps(self) -> int:
        return self.total_iters


class SequentialLR(LRScheduler):
    """Run ``schedulers[i]`` from ``milestones[i - 1]`` on, each restarted at its epoch 0.

    ``lr_at(epoch) = schedulers[i].lr_at(epoch - milestones[i - 1])`` with ``i`` the number of
    milestones ``<= epoch`` (PyTorch's ``SequentialLR``). The inner schedulers serve only as
    closed forms; step this one.
    """

    def __init__(self, optimizer: Optimizer, schedulers: Sequence[LRScheduler],
                 milestones: Sequence[int]) -> None:
        schedulers = list(schedulers)
        if not schedulers:
            raise ValueError("SequentialLR: expected at least one scheduler")
        for i, s in enumerate(schedulers):
            if s.optimizer is not optimizer:
                raise ValueError(f"SequentialLR: schedulers[{i}] ({type(s).__name__}) belongs to "
                                 "another optimizer")
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(f"SequentialLR: {len(schedulers)} schedulers need "
                             f"{len(schedulers) - 1} milestones, got {len(milestones)}")
        self.schedulers = schedulers
        self.milestones = tuple(int(m) for m in milestones)
        super().__init__(optimizer)

    def lr_at(self, epoch: int) -> float:
        i = bisect_right(self.milestones, epoch)
        start = self.milestones[i - 1] if i > 0 else 0
        return self.schedulers[i].lr_at(epoch - start)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["milestones"] = list(self.milestones)
        state["schedulers"] = [s.state_dict() for s in self.schedulers]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["schedulers"]
        if len(saved) != len(self.schedulers):
            raise ValueError(f"SequentialLR.load_state_dict: {len(saved)} saved schedulers, "
                             f"this one has {len(self.schedulers)}")
        self.milestones = tuple(int(m) for m in state["milestones"])
        for s, s_state in zip(self.schedulers, saved):
            s.load_state_dict(s_state)
        # the inner loads set optimizer.lr; ours comes last and wins
        super().load_state_dict(state)
