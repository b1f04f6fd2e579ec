"""NDArray: the user-facing view of a backend array (the engine keeps plain arrays); checked
dtype conversions of user data (feeds, loaded state)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .device import Device, cpu, device_of


class NDArray(np.ndarray):
    """A zero-copy NumPy view with needle's extras (``numpy()``, ``device``, ``pad``).

    It behaves as a NumPy array for NumPy code, and writes through to the tensor's data
    (``x.cached_data.flat[0] += eps`` changes ``x``).

    ``NDArray(other, device=None, dtype=None)`` makes a copy of ``other`` (a NumPy or CuPy
    array, an NDArray, a list or a number) as the course's constructor does; like
    ``nd.array`` it keeps ``other``'s dtype unless ``dtype`` is given, and on ``cuda()`` it
    returns a CuPy array.

    >>> import numpy as np
    >>> NDArray(np.arange(3.0), device=cpu()) + 1
    NDArray([1., 2., 3.])
    """

    def __new__(cls, other: Any, device: Device | None = None, dtype: Any = None) -> Any:
        # NOTE: views (``a.view(NDArray)``), slices and pickles never call __new__, so this is
        # only the user-facing constructor, not NumPy's (shape, dtype, buffer) one
        return array(other, dtype=dtype, device=device)

    def numpy(self) -> np.ndarray:
        """A plain NumPy copy."""
        return np.array(self, copy=True).view(np.ndarray)

    @property  # needle's Device, where NumPy 2's array API has the string "cpu"
    def device(self) -> Device:  # type: ignore[override]
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
    """An NDArray (or CuPy array on ``cuda()``) holding a copy of ``data``; a CuPy ``data``
    stays on its device unless ``device`` says otherwise."""
    if type(data).__module__.startswith("cupy"):
        source = device_of(data)
        device = device or source
        data = source.to_numpy(data)
    device = device or cpu()
    return as_ndarray(device.array(np.array(data, dtype=dtype, copy=True)))


def _first(values: Any) -> Any:
    """The first element of a non-empty selection, as a Python scalar for messages."""
    return np.asarray(values).flat[0].item()


def lossless_astype(array: np.ndarray, dtype: Any, what: str) -> np.ndarray:
    """``array.astype(dtype)``, refusing a conversion that would change values beyond float
    rounding, with one ValueError that starts with ``what`` (the destination).

    Refused: non-finite, non-whole or out-of-range values into an integer dtype; values other
    than 0 and 1 into bool; finite values that overflow a float dtype (1e300 into float32);
    complex values with an imaginary part into a real dtype. Whole-valued floats convert to
    integers, and float64 rounds to float32 as usual. Returns ``array`` itself if the dtype
    already matches.
    """
    target = np.dtype(dtype)
    array = np.asarray(array)
    source = array.dtype
    if source == target:
        return array
    problem = None
    if source.kind == "c" and target.kind != "c" and np.any(array.imag != 0):
        problem = f"{_first(array[array.imag != 0])} has an imaginary part"
    elif target.kind in "iu" and source.kind in "fc":
        real = array.real
        info = np.iinfo(target)
        # NOTE: float(info.max) + 1 is exact (a power of two), unlike float(info.max)
        bad = ~np.isfinite(real) | (real != np.trunc(real)) | (real < info.min) | (
            real >= float(info.max) + 1)
        if bad.any():
            value = _first(real[bad])
            reason = ("is not finite" if not np.isfinite(value) else
                      "is not a whole number" if value != np.trunc(value) else
                      f"is out of range for {target}")
            problem = f"{value!r} {reason}"
    elif target.kind in "iu" and source.kind in "iu" and not np.can_cast(source, target):
        info = np.iinfo(target)
        bad = (array < info.min) | (array > info.max)
        if bad.any():
            problem = f"{_first(array[bad])!r} is out of range for {target}"
    elif target.kind == "b" and source.kind in "iuf":
        bad = (array != 0) & (array != 1)
        if bad.any():
            problem = f"{_first(array[bad])!r} is not 0 or 1"
    if problem is None:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
            out = (array.real if source.kind == "c" and target.kind != "c" else array
                   ).astype(target)
        if target.kind not in "fc" or source.kind not in "iufc" or np.isfinite(out).all():
            return out
        overflowed = ~np.isfinite(out) & np.isfinite(array)
        if not overflowed.any():
            return out
        problem = (f"{_first(array[overflowed])!r} overflows {target} "
                   f"(largest {np.finfo(target).max:.4g})")
    raise ValueError(f"{what}: cannot convert {source} to {target} without changing values: "
                     f"{problem}")
