"""Solvers: Caffe's learning-rate policies and updates (SGD with Caffe's momentum, Adam).

One iteration (``Solver.step``): clear parameter diffs, ``iter_size`` times forward and
backward, then per parameter blob (Caffe's order)::

    diff  = diff / iter_size                           (gradient accumulation)
    diff  = diff * clip / ||all diffs||                (only when clip_gradients and above it)
    diff  = diff + weight_decay * decay_mult * data    (L2; L1 adds ... * sign(data))
    local_rate = lr(iter) * lr_mult                    (lr_mult 0: the blob is frozen)
    the solver's update with local_rate                (see sgd_caffe_update / adam_update)

Snapshots (``snapshot`` / ``restore``) are needle data-only checkpoints (``ndl.save``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ..checkpoint import load as load_checkpoint
from ..checkpoint import save as save_checkpoint
from ..optim import adam_update, coupled_weight_decay
from .blob import Blob
from .net import Net

__all__ = ["LR_POLICIES", "AdamSolver", "SGDSolver", "Solver", "learning_rate",
           "sgd_caffe_update"]

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


def learning_rate(policy: str, base_lr: float, it: int, gamma: float = 0.1,
                  power: float = 1.0, stepsize: int | None = None,
                  stepvalue: list[int] | tuple = (), max_iter: int | None = None) -> float:
    """Caffe's learning rate at iteration ``it`` (0-based)::

        fixed      base_lr
        step       base_lr * gamma ^ floor(it / stepsize)
        exp        base_lr * gamma ^ it
        inv        base_lr * (1 + gamma * it) ^ (-power)
        multistep  base_lr * gamma ^ (number of stepvalue entries <= it)
        poly       base_lr * (1 - it / max_iter) ^ power
        sigmoid    base_lr / (1 + exp(-gamma * (it - stepsize)))
    """
    if policy == "fixed":
        return base_lr
    if policy == "step":
        return base_lr * gamma ** (it // _need(stepsize, "stepsize", policy))
    if policy == "exp":
        return base_lr * gamma**it
    if policy == "inv":
        return base_lr * (1.0 + gamma * it) ** (-power)
    if policy == "multistep":
        return base_lr * gamma ** sum(1 for s in stepvalue if it >= s)
    if policy == "poly":
        return base_lr * max(0.0, 1.0 - it / _need(max_iter, "max_iter", policy)) ** power
    if policy == "sigmoid":
        return base_lr / (1.0 + math.exp(-gamma * (it - _need(stepsize, "stepsize", policy))))
    raise ValueError(f"unknown lr_policy {policy!r}; expected one of {LR_POLICIES}")


def _need(value: Any, name: str, policy: str) -> Any:
    if value is None or value == 0:
        raise ValueError(f"lr_policy {policy!r} needs {name}")
    return value


def sgd_caffe_update(param: Any, grad: Any, history: Any, local_rate: float, momentum: float,
                     scratch: Any) -> None:
    """Caffe's SGD step, in place on ``param`` and ``history`` (``grad`` is only read)::

        history = momentum * history + local_rate * grad
        param   = param - history

    Unlike ``needle.optim.SGD`` (``u = m u + (1 - m) g; p -= lr u``) the rate sits inside the
    history and the gradient is not damped, so with a constant rate Caffe's steps are
    ``1 / (1 - m)`` times larger than needle's for the same ``lr`` and ``m``.
    """
    np.multiply(history, momentum, out=history)
    np.multiply(grad, local_rate, out=scratch)
    np.add(history, scratch, out=history)
    np.subtract(param, history, out=param)


class Solver:
    """Base of the solvers: the lr policy, regularization, clipping, the iteration loop and
    snapshots. Subclasses set ``history_names`` and implement ``compute_update``.

    ``feed`` (here or in ``step``) gives each iteration's inputs: a callable
    ``feed(iteration) -> {"data": X, "label": y}`` or a fixed dict; without one the net
    reuses its current inputs.
    """

    history_names: tuple[str, ...] = ()

    def __init__(self, net: Net, base_lr: float = 0.01, lr_policy: str = "fixed",
                 gamma: float = 0.1, power: float = 1.0, stepsize: int | None = None,
                 stepvalue: list[int] | tuple = (), max_iter: int | None = None,
                 weight_decay: float = 0.0, regularization_type: str = "L2",
                 clip_gradients: float | None = None, iter_size: int = 1,
                 feed: Callable[[int], dict] | dict | None = None) -> None:
        name = type(self).__name__
        if not isinstance(net, Net):
            raise TypeError(f"{name}: expected a caffe Net, got {type(net).__name__}")
        if lr_policy not in LR_POLICIES:
            raise ValueError(f"{name}: unknown lr_policy {lr_policy!r}; expected one of "
                             f"{LR_POLICIES}")
        if regularization_type not in ("L1", "L2"):
            raise ValueError(f"{name}: regularization_type must be 'L1' or 'L2', got "
                             f"{regularization_type!r}")
        if iter_size < 1:
            raise ValueError(f"{name}: iter_size must be >= 1, got {iter_size}")
        self.net = net
        self.base_lr = float(base_lr)
        self.lr_policy = lr_policy
        self.gamma = float(gamma)
        self.power = float(power)
        self.stepsize = stepsize
        self.stepvalue = tuple(stepvalue)
        self.max_iter = max_iter
        self.weight_decay = float(weight_decay)
        self.regularization_type = regularization_type
        self.clip_gradients = clip_gradients
        self.iter_size = int(iter_size)
        self.feed = feed
        self.iter = 0
        #: per learnable blob index: {history name: array}
        self.history: dict[int, dict[str, np.ndarray]] = {}
        self._scratch: dict[tuple[int, int], np.ndarray] = {}
        learning_rate(lr_policy, self.base_lr, 0, self.gamma, self.power, stepsize,
                      self.stepvalue, max_iter)  # fail early on a missing policy setting

    # -- the learning rate -------------------------------------------------------------------
    def get_learning_rate(self) -> float:
        """The rate of the current iteration under ``lr_policy`` (see :func:`learning_rate`)."""
        return learning_rate(self.lr_policy, self.base_lr, self.iter, self.gamma, self.power,
                             self.stepsize, self.stepvalue, self.max_iter)

    # -- iterations --------------------------------------------------------------------------
    def _inputs(self, feed: Any) -> dict:
        feed = self.feed if feed is None else feed
        if feed is None:
            return {}
        return dict(feed(self.iter)) if callable(feed) else dict(feed)

    def step(self, iters: int = 1, feed: Callable[[int], dict] | dict | None = None) -> float:
        """Run ``iters`` training iterations; returns the last iteration's (mean) loss."""
        net = self.net
        loss = float("nan")
        for _ in range(int(iters)):
            net.clear_param_diffs()
            total = 0.0
            for _ in range(self.iter_size):
                out = net.forward(**self._inputs(feed))
                net.backward()
                total += out.get("loss", 0.0)
            loss = total / self.iter_size
            self.apply_update()
            self.iter += 1
        return loss

    def apply_update(self) -> None:
        """Normalize, clip and regularize the diffs, then update every learnable blob."""
        rate = self.get_learning_rate()
        blobs = self.net.learnable_params
        if self.iter_size > 1:
            for blob in blobs:
                if blob.lr_mult != 0:
                    blob.diff *= 1.0 / self.iter_size
        if self.clip_gradients is not None and self.clip_gradients > 0:
            norm = math.sqrt(sum(float(np.sum(np.square(b.diff, dtype=np.float64)))
                                 for b in blobs if b.lr_mult != 0))
            if norm > self.clip_gradients:
                for blob in blobs:
                    if blob.lr_mult != 0:
                        blob.diff *= self.clip_gradients / norm
        for index, blob in enumerate(blobs):
            if blob.lr_mult == 0:
                continue
            grad = self._regularized(index, blob)
            self.compute_update(index, blob, grad, rate * blob.lr_mult)

    def _regularized(self, index: int, blob: Blob) -> np.ndarray:
        decay = self.weight_decay * blob.decay_mult
        if decay == 0.0:
            return blob.diff
        if self.regularization_type == "L2":
            # scratch 1 holds the decayed gradient; scratch 0 is the update's own
            return coupled_weight_decay(blob.diff, blob.data, decay,
                                        self._buffer(index, blob, 1))
        return blob.diff + decay * np.sign(blob.data)

    def compute_update(self, index: int, blob: Blob, grad: np.ndarray, local_rate: float) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not define compute_update()")

    def _history(self, index: int, blob: Blob) -> dict[str, np.ndarray]:
        state = self.history.get(index)
        if state is None:
            state = self.history[index] = {n: np.zeros_like(blob.data)
                                           for n in self.history_names}
        return state

    def _buffer(self, index: int, blob: Blob, k: int) -> np.ndarray:
        """Scratch array ``k`` shaped like the blob (contents are garbage)."""
        buf = self._scratch.get((index, k))
        if buf is None or buf.shape != blob.data.shape or buf.dtype != blob.data.dtype:
            buf = self._scratch[(index, k)] = np.empty_like(blob.data)
        return buf

    # -- snapshots ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The solver's state as plain data: type, iteration, settings and history arrays."""
        settings = {k: getattr(self, k) for k in ("base_lr", "lr_policy", "gamma", "power",
                                                  "weight_decay", "regularization_type",
                                                  "iter_size")}
        history = {index: {k: np.array(v, copy=True) for k, v in entry.items()}
                   for index, entry in sorted(self.history.items())}
        return {"solver": type(self).__name__, "iter": self.iter, "settings": settings,
                "history": history}

    def snapshot(self, path: str | os.PathLike) -> None:
        """Save the net's parameters and the solver state to one checkpoint file."""
        save_checkpoint(path, net=self.net.state_dict(), solver=self.state_dict())

    def restore(self, path: str | os.PathLike) -> None:
        """Resume from a :meth:`snapshot` file: parameters, history and iteration count."""
        ckpt = load_checkpoint(path)
        if "net" not in ckpt or "solver" not in ckpt:
            raise ValueError(f"{os.fspath(path)}: not a solver snapshot (items "
                             f"{sorted(ckpt)}; expected 'net' and 'solver')")
        state = ckpt["solver"]
        if state.get("solver") != type(self).__name__:
            raise ValueError(f"{os.fspath(path)}: a {state.get('solver')} snapshot cannot "
                             f"restore a {type(self).__name__}")
        blobs = self.net.learnable_params
        history: dict[int, dict[str, np.ndarray]] = {}
        for key, entry in (state.get("history") or {}).items():
            index = int(key)
            if not 0 <= index < len(blobs) or set(entry) != set(self.history_names):
                raise ValueError(f"{os.fspath(path)}: solver history entry {key!r} does not "
                                 "fit this net")
            blob = blobs[index]
            for name, value in entry.items():
                if np.shape(value) != blob.data.shape:
                    raise ValueError(f"{os.fspath(path)}: history {key}.{name} has shape "
                                     f"{np.shape(value)}, the parameter {blob.data.shape}")
            history[index] = {k: np.array(v, dtype=blob.data.dtype, copy=True)
                              for k, v in entry.items()}
        self.net.load_state_dict(ckpt["net"])
        self.history = history
        self.iter = int(state["iter"])


class SGDSolver(Solver):
    """Caffe's SGD: ``history = momentum * history + local_rate * g``; ``data -= history``.

    ``SGDSolver(net, base_lr=0.01, momentum=0.0, weight_decay=0.0, lr_policy="fixed", ...)``;
    see :class:`Solver` for the policy settings and :func:`sgd_caffe_update` for how this
    momentum compares with ``needle.optim.SGD``'s damped one.
    """

    history_names = ("history",)

    def __init__(self, net: Net, base_lr: float = 0.01, momentum: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(net, base_lr, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SGDSolver: momentum must lie in [0, 1), got {momentum}")
        self.momentum = float(momentum)

    def compute_update(self, index: int, blob: Blob, grad: np.ndarray, local_rate: float) -> None:
        history = self._history(index, blob)["history"]
        sgd_caffe_update(blob.data, grad, history, local_rate, self.momentum,
                         self._buffer(index, blob, 0))

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["settings"]["momentum"] = self.momentum
        return state


class AdamSolver(Solver):
    """Adam with ``needle.optim.adam_update`` (t = iter + 1, bias-corrected)::

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        data -= local_rate * m_hat / (sqrt(v_hat) + delta)

    ``AdamSolver(net, base_lr=0.001, momentum=0.9, momentum2=0.999, delta=1e-8, ...)`` (Caffe's
    names for beta1, beta2, eps). NOTE: Caffe adds ``delta`` to sqrt(v) before the bias
    correction; needle (like PyTorch) to sqrt(v_hat): the two differ only in delta's scale.
    """

    history_names = ("m", "v")

    def __init__(self, net: Net, base_lr: float = 0.001, momentum: float = 0.9,
                 momentum2: float = 0.999, delta: float = 1e-8, **kwargs: Any) -> None:
        super().__init__(net, base_lr, **kwargs)
        for label, beta in (("momentum", momentum), ("momentum2", momentum2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"AdamSolver: {label} must lie in [0, 1), got {beta}")
        self.momentum = float(momentum)
        self.momentum2 = float(momentum2)
        self.delta = float(delta)

    def compute_update(self, index: int, blob: Blob, grad: np.ndarray, local_rate: float) -> None:
        state = self._history(index, blob)
        adam_update(blob.data, grad, state["m"], state["v"], self.iter + 1, local_rate,
                    self.momentum, self.momentum2, self.delta, self._buffer(index, blob, 0))

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["settings"].update(momentum=self.momentum, momentum2=self.momentum2,
                                 delta=self.delta)
        return state
