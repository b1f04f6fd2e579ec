"""Load pickled data files (CIFAR-10 batches) without executing code: an allow-list unpickler.

A pickle runs code by naming a global (``os.system``) and calling it. ``RestrictedUnpickler``
resolves only the few names that NumPy array reconstruction and plain containers need and refuses
every other one before it is imported, so a crafted file fails with ValueError and nothing runs.
"""

from __future__ import annotations

import builtins
import codecs
import os
import pickle
from typing import Any

import numpy as np


def _numpy_private(submodule: str, name: str) -> Any:
    """``numpy._core.<submodule>.<name>`` (NumPy 2) or ``numpy.core.<...>`` (NumPy 1)."""
    core = getattr(np, "_core", None)
    if core is None or not hasattr(core, submodule):
        core = np.core
    return getattr(getattr(core, submodule), name)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) as written in the pickle -> the object it may resolve to."""
    reconstruct = _numpy_private("multiarray", "_reconstruct")
    frombuffer = _numpy_private("numeric", "_frombuffer")
    allowed: dict[tuple[str, str], Any] = {
        # ndarray.__reduce__ (protocols 2-4): _reconstruct(ndarray, shape, dtype) then setstate.
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        # ndarray.__reduce_ex__(5): _frombuffer(buffer, dtype, shape, order).
        ("numpy.core.numeric", "_frombuffer"): frombuffer,
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes as _codecs.encode(str, "latin1") under protocol 2.
        ("_codecs", "encode"): codecs.encode,
    }
    for module in ("builtins", "__builtin__"):  # __builtin__: Python 2 pickles
        for name in ("set", "frozenset", "bytearray", "list", "dict", "tuple"):
            allowed[(module, name)] = getattr(builtins, name)
    return allowed


class RefusedPickle(pickle.UnpicklingError):
    """The pickle names a global (or persistent id) outside the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose ``find_class`` resolves only NumPy arrays and plain containers."""

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()
        try:
            return RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise RefusedPickle(
                f"refused global {module}.{name}: only NumPy arrays and plain containers may be "
                "loaded") from None

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle("refused a persistent id: not allowed in data files")


def safe_load(path: str | os.PathLike, encoding: str = "bytes") -> Any:
    """Unpickle the file at ``path`` with ``RestrictedUnpickler``; ValueError naming the file for
    anything refused or malformed. ``encoding="bytes"`` reads Python 2 strings as bytes (as
    the CIFAR-10 python files expect)."""
    name = os.fspath(path)
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, encoding=encoding).load()
        except RefusedPickle as exc:
            raise ValueError(f"{name}: not a safe data pickle: {exc}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
                AttributeError, MemoryError, OverflowError) as exc:
            raise ValueError(f"{name}: malformed pickle ({type(exc).__name__}: {exc})") from None
