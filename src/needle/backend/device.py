"""Devices are array modules: NumPy for ``cpu()``, CuPy for ``cuda()``."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np


class Device:
    """A place where arrays live, named by the array module that computes on it."""

    name: str = "device"

    @property
    def xp(self) -> Any:
        """The array module (``numpy`` or ``cupy``)."""
        raise NotImplementedError

    def enabled(self) -> bool:
        """Whether this device can run here."""
        raise NotImplementedError

    def array(self, data: Any, dtype: Any = None) -> Any:
        """A backend array on this device holding ``data``."""
        return self.xp.asarray(data, dtype=dtype)

    def to_numpy(self, array: Any) -> np.ndarray:
        """A NumPy array with the values of ``array`` (a copy off the CPU)."""
        return np.asarray(array)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"{self.name}()"


class CPUDevice(Device):
    name = "cpu"

    @property
    def xp(self) -> Any:
        return np

    def enabled(self) -> bool:
        return True


@functools.lru_cache(maxsize=1)
def _import_cupy() -> Any:
    """CuPy if it imports and sees a GPU, else None (never raises)."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # noqa: BLE001 - any failure means "no usable GPU"
        return None


class CUDADevice(Device):
    name = "cuda"

    @property
    def xp(self) -> Any:
        cupy = _import_cupy()
        if cupy is None:
            raise RuntimeError("cuda(): needs CuPy and a visible GPU; check cuda().enabled()")
        return cupy

    def enabled(self) -> bool:
        return _import_cupy() is not None

    def to_numpy(self, array: Any) -> np.ndarray:
        return self.xp.asnumpy(array)


_CPU = CPUDevice()
_CUDA = CUDADevice()


def cpu() -> Device:
    """The CPU device (NumPy arrays)."""
    return _CPU


def cuda() -> Device:
    """The GPU device (CuPy arrays); ``cuda().enabled()`` says whether it works here."""
    return _CUDA


def default_device() -> Device:
    """The device used when none is given: the CPU."""
    return _CPU


def device_of(array: Any) -> Device:
    """The device that holds a backend array."""
    if isinstance(array, np.ndarray | np.generic):
        return _CPU
    if type(array).__module__.startswith("cupy"):
        return _CUDA
    raise TypeError(f"not a backend array: {type(array).__name__}")


def array_module(array: Any) -> Any:
    """NumPy or CuPy, whichever module ``array`` belongs to (for calls that do not dispatch)."""
    if isinstance(array, np.ndarray):
        return np
    # a symbolic array recording an update rule (compiler/fused_update.py) names its own module
    recorder = getattr(array, "needle_array_module", None)
    if recorder is not None:
        return recorder
    return device_of(array).xp
