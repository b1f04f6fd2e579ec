"""numba, the one optional compiler needle uses on the CPU, imported lazily and only once.

Used by the fused optimizer update (compiler/fused_update.py) and the BatchNorm kernels
(kernels/cpu_kernels.py). ``pip install 'needle[fast]'`` installs it; without it both step
aside and NumPy runs everything. ``NEEDLE_NUMBA=0`` turns it off where it is installed (for
A/B measurements, or if a numba release misbehaves).
"""

from __future__ import annotations

import functools
import os
from typing import Any

__all__ = ["numba_module"]


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
