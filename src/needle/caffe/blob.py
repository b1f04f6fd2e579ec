"""Blob: a value and its gradient (``data`` and ``diff`` of one shape), Caffe's unit of storage."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import init

__all__ = ["Blob", "fill"]


class Blob:
    """``data`` and ``diff`` arrays of one shape, plus the solver multipliers of a parameter.

    ``diff`` is made as zeros on first access after ``data`` changed shape, so a blob whose
    gradient nobody computed reads as zeros. ``lr_mult`` / ``decay_mult`` scale the solver's
    learning rate and weight decay for this blob (Caffe's ``param { lr_mult decay_mult }``);
    ``lr_mult = 0`` freezes it (no diff is computed for it either).

    >>> b = Blob(np.ones((2, 3), np.float32))
    >>> b.shape, float(b.diff.sum())
    ((2, 3), 0.0)
    """

    __slots__ = ("name", "data", "_diff", "lr_mult", "decay_mult")
    #: the arrays (None until the blob is shaped; layers and solvers read them once it is)
    data: Any
    _diff: Any

    def __init__(self, data: Any = None, name: str = "", lr_mult: float = 1.0,
                 decay_mult: float = 1.0) -> None:
        self.name = name
        self.data = None if data is None else np.asarray(data)
        self._diff = None
        self.lr_mult = float(lr_mult)
        self.decay_mult = float(decay_mult)

    @property
    def diff(self) -> Any:
        """The gradient of the loss with respect to ``data`` (zeros until one is computed)."""
        data = self.data
        if data is None:
            return None
        diff = self._diff
        if diff is None or diff.shape != data.shape or diff.dtype != data.dtype:
            diff = self._diff = np.zeros_like(data)
        return diff

    @diff.setter
    def diff(self, value: Any) -> None:
        self._diff = value

    @property
    def shape(self) -> tuple:
        return () if self.data is None else tuple(self.data.shape)

    @property
    def count(self) -> int:
        """Number of elements (Caffe's ``count()``)."""
        return 0 if self.data is None else int(self.data.size)

    def zero_diff(self) -> None:
        """Set ``diff`` to zeros in place (solvers call this before each iteration)."""
        if self._diff is not None:
            self._diff[...] = 0

    def __repr__(self) -> str:
        name = f"{self.name!r}, " if self.name else ""
        dtype = self.data.dtype if self.data is not None else None
        return f"Blob({name}shape={self.shape}, dtype={dtype})"


def fill(filler: dict | None, shape: tuple, fan_in: int, fan_out: int, dtype: Any,
         default: dict) -> np.ndarray:
    """A new parameter array from a Caffe filler spec (draws from NumPy's global RNG).

    ``{"type": "constant", "value": v}``, ``{"type": "gaussian", "mean": 0, "std": 1}``,
    ``{"type": "uniform", "min": 0, "max": 1}``, ``{"type": "xavier"}`` (uniform on
    +-sqrt(3 / fan_in)), ``{"type": "msra"}`` (normal, std sqrt(2 / fan_in)),
    ``{"type": "kaiming_uniform"}`` (needle's Linear/Conv weight: uniform on
    +-sqrt(6 / fan_in)). ``default`` is used when ``filler`` is None.
    """
    spec = dict(default if filler is None else filler)
    kind = str(spec.pop("type", "constant")).lower()
    dtype = np.dtype(dtype)
    if kind == "constant":
        out = np.full(shape, spec.pop("value", 0.0), dtype=dtype)
    elif kind == "gaussian":
        out = init.randn(*shape, mean=spec.pop("mean", 0.0), std=spec.pop("std", 1.0),
                         dtype=dtype).numpy()
    elif kind == "uniform":
        out = init.rand(*shape, low=spec.pop("min", 0.0), high=spec.pop("max", 1.0),
                        dtype=dtype).numpy()
    elif kind == "xavier":
        bound = float(np.sqrt(3.0 / fan_in))
        out = init.rand(*shape, low=-bound, high=bound, dtype=dtype).numpy()
    elif kind == "msra":
        out = init.randn(*shape, std=float(np.sqrt(2.0 / fan_in)), dtype=dtype).numpy()
    elif kind == "kaiming_uniform":
        out = init.kaiming_uniform(fan_in, fan_out, shape=shape, dtype=dtype).numpy()
    else:
        raise ValueError(f"unknown filler type {kind!r}; known: constant, gaussian, uniform, "
                         "xavier, msra, kaiming_uniform")
    if spec:
        raise ValueError(f"filler {kind!r}: unknown settings {sorted(spec)}")
    return np.ascontiguousarray(out, dtype=dtype)
