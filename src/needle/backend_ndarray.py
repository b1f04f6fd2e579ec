"""needle's ``backend_ndarray`` module (``import needle.backend_ndarray as nd``)."""

from .backend import NDArray, array, cpu, cuda, default_device

__all__ = ["NDArray", "array", "cpu", "cuda", "default_device"]
