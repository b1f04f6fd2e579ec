"""numba, the one optional compiler needle uses on the CPU, imported lazily and only once.

Used by the fused optimizer update (compiler/fused_update.py) and the BatchNorm kernels
(kernels/cpu_kernels.py). ``pip install 'needle[fast]'`` installs it; without it both step
aside and NumPy runs everything. ``NEEDLE_NUMBA=0`` turns it off where it is installed (for
A/B measurements, or if a numba release misbehaves).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import Any

__all__ = ["NumbaLoops", "njit_cached", "numba_module"]


@functools.lru_cache(maxsize=1)
def numba_module() -> Any:
    """The numba module, or None when it is missing or turned off."""
    if os.environ.get("NEEDLE_NUMBA", "1") == "0":
        return None
    try:
        import numba
    except ImportError:
        return None
    return numba


def njit_cached(fn: Callable, **options: Any) -> Any:
    """``numba.njit`` for the kernels' loops (kernels/numba_*.py), with numba's disk cache
    where numba finds a writable place for one (else compiled once per process).

    error_model="numpy" (IEEE division, no ZeroDivisionError branches) lets LLVM vectorize
    the loops; nogil lets needle's own threads run them. ``options`` adds njit options
    (``fastmath``; ``parallel`` only through backend/parallel_loops.njit_parallel, on TBB).

    ``fastmath`` is False unless given, set explicitly: numba compiles a function that sets
    no flags with the flags of whichever caller compiles it FIRST, and every later caller
    then gets that code (measured, session 12: a plain ``x * a + b`` helper first called from
    a loop with FMA contraction gave contracted results to a plain caller too, 360k of 1M
    values a rounding apart), so a helper's bits depended on what ran first in the process.
    """
    options.setdefault("fastmath", False)
    return _njit(fn, error_model="numpy", nogil=True, **options)


def _njit(fn: Callable, **options: Any) -> Any:
    """``numba.njit(**options)(fn)`` with numba's disk cache where it is safe to use
    (backend/numba_cache.py) and numba finds a writable place for one."""
    import numba

    from .numba_cache import install

    if install():
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function": no writable cache location
            pass
    return numba.njit(**options)(fn)


class NumbaLoops:
    """A kernels' numba module (``kernels/numba_*.py``) imported on first use (numba's import
    costs ~0.2 s), and a latch that sends every later call to NumPy once numba fails to
    compile one of its loops (a numba release that cannot, an unusual CPU).

    ``module()``: the module, or None without numba, turned off (``NEEDLE_NUMBA=0``) or after
    a failure. ``call(loop, *args)``: runs the loop, True; False (and the latch set) when
    numba could not compile it, before anything ran. ``failed`` lists what failed (a test
    may append to it to force the NumPy path).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.failed: list[str] = []
        self._module: Any = None

    def module(self) -> Any:
        if self.failed or numba_module() is None:
            return None
        if self._module is None:
            self._module = importlib.import_module(self.name)
        return self._module

    def call(self, loop: Callable, *args: Any) -> bool:
        try:
            loop(*args)
        except numba_module().core.errors.NumbaError:  # compiling fails before anything runs
            self.failed.append(getattr(loop, "__name__", repr(loop)))
            return False
        return True
