"""needle.jit: trace imperative code into the graph IR, optimize it, replay it.

The module itself is callable: ``ndl.jit(fn)`` is ``needle.jit.jit(fn)``, while
``needle.jit.JitError`` and friends stay importable (like ``torch.jit``'s names, called like
``jax.jit``).
"""

import sys
import types

from .compiled import (
    CompiledFunction,
    EntryRecord,
    FallbackRecord,
    JitCall,
    JitError,
    JitReport,
    RetraceRecord,
    jit,
)

__all__ = ["CompiledFunction", "EntryRecord", "FallbackRecord", "JitCall", "JitError",
           "JitReport", "RetraceRecord", "jit"]


class _CallableModule(types.ModuleType):
    """``needle.jit(fn, ...)`` calls :func:`jit`."""

    def __call__(self, *args, **kwargs):
        return jit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
