"""numba's disk cache for needle's loops, invalidated when any of needle's numba modules changes.

Why: numba keys a cached function on its own source file only. needle's loops call loops of
other modules (the prange loops of ``kernels/numba_parallel_*.py`` run the serial block loops
of ``kernels/numba_kernels.py``; several modules inline ``kernels/numba_exp.py``), and numba
compiles the callee into the caller: after an edit to the callee alone, the caller's cached
machine code would keep running the old callee, silently. Here a cached needle function's
stamp is its file's plus a digest of every ``kernels/numba_*.py`` (and of the modules that
set their compile options), so an edit to any of them recompiles the needle loops that use
the cache (a developer's edit costs a few seconds of compiling; the user's own numba
functions keep numba's own rule).

It extends numba's cache locators (numba.core.caching.CacheImpl): needle's functions take
the first of numba's locators that can write a cache (``NUMBA_CACHE_DIR``, else beside the
source, else in the user's cache directory), with the stamp above. Where numba's caching
internals differ from those (another numba release), ``install()`` returns False and
needle's loops compile once per process instead of being cached, never stale.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

__all__ = ["install", "kernels_digest"]

#: needle's package directory: functions defined under it take needle's locators
_PACKAGE = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def kernels_digest() -> bytes:
    """SHA-256 over the names and sources of ``kernels/numba_*.py`` and of the two modules
    that set their compile options (``backend/numba_support.py``, ``parallel_loops.py``:
    a changed default, such as fastmath's, must not keep old machine code; read once a
    process)."""
    digest = hashlib.sha256()
    options = [path for path in (_PACKAGE / "backend" / name for name in (
        "numba_support.py", "parallel_loops.py")) if path.exists()]
    for path in sorted((_PACKAGE / "kernels").glob("numba_*.py")) + options:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.digest()


def _needle_locator(base: type) -> type:
    """A subclass of numba's cache locator ``base`` for needle's functions only."""

    class NeedleLocator(base):  # type: ignore[misc, valid-type]
        def get_source_stamp(self) -> Any:
            return (super().get_source_stamp(), kernels_digest())

        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> Any:
            try:
                Path(py_file).resolve().relative_to(_PACKAGE)
            except (ValueError, OSError):
                return None  # not needle's: numba's own locators
            return super().from_function(py_func, py_file)

    NeedleLocator.__name__ = NeedleLocator.__qualname__ = f"Needle{base.__name__}"
    return NeedleLocator


@functools.lru_cache(maxsize=1)
def install() -> bool:
    """Put needle's locators first in numba's list (once); False where numba's caching
    internals are not as expected (then needle's loops must not use the disk cache)."""
    try:
        from numba.core import caching

        bases = (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator,
                 caching.UserWideCacheLocator)
        classes = caching.CacheImpl._locator_classes
        if not isinstance(classes, list) or not all(b in classes for b in bases):
            return False
        for base in bases:
            base.get_source_stamp  # noqa: B018 (the hooks this relies on)
            base.from_function  # noqa: B018
    except (ImportError, AttributeError):
        return False
    ours: list[Any] = [_needle_locator(base) for base in bases]
    classes[:0] = ours
    return True
