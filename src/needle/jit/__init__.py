"""needle.jit: trace imperative code into the graph IR, optimize it, replay it (``ndl.jit``)."""

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
