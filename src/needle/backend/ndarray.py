"""NDArray: the user-facing view of a backend array (the engine keeps plain arrays)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .device import Device, cpu


class NDArray(np.ndarray):
    """A zero-copy NumPy view with needle's extras (``numpy()``, ``device``, ``pad``).

    It behaves as a NumPy array for NumPy code, and writes through to the tensor's data
    (``x.cached_data.flat[0] += eps`` changes ``x``).
    """

    def numpy(self) -> np.ndarray:
        """A plain NumPy copy."""
        return np.array(self, copy=True).view(np.ndarray)

    @property
    def device(self) -> Device:
        return cpu()

    def pad(self, pad_width: Any) -> NDArray:
        """Zero padding as ``np.pad(self, pad_width)``."""
        return np.pad(np.asarray(self), pad_width).view(NDArray)


def as_ndarray(array: Any) -> Any:
    """The user-facing view of a backend array: an NDArray on the CPU, the CuPy array on a GPU."""
    if isinstance(array, np.ndarray):
        return array.view(NDArray)
    if isinstance(array, np.generic):
        return np.asarray(array).view(NDArray)
    return array


def array(data: Any, dtype: Any = None, device: Device | None = None) -> Any:
    """An NDArray (or CuPy array on ``cuda()``) holding a copy of ``data``."""
    device = device or cpu()
    return as_ndarray(device.array(np.array(data, dtype=dtype, copy=True)))
