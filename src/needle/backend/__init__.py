"""Devices (array modules) and the NDArray view that user code sees."""

from .allocator import tune_malloc
from .device import (
    CPUDevice,
    CUDADevice,
    Device,
    array_module,
    cpu,
    cuda,
    default_device,
    device_of,
)
from .ndarray import NDArray, array, as_ndarray

__all__ = [
    "CPUDevice", "CUDADevice", "Device", "NDArray", "array", "array_module", "as_ndarray", "cpu",
    "cuda",
    "default_device", "device_of", "tune_malloc",
]
