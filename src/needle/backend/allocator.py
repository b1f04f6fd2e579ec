"""Keep freed memory for reuse instead of returning it to the OS (glibc's malloc, Linux only).

A training step frees and reallocates the same multi-megabyte arrays (im2col patches,
activations, their gradients) every iteration. glibc returns large freed blocks to the OS
(``munmap``, heap trimming), so the next iteration page-faults every page back in, and the
kernel zeroes it. On a 2-core VM that was a fifth of a small CNN's training step (about 2,400
page faults per step; 41 -> 33 ms once the memory stays mapped).

glibc tunes itself towards this: after freeing a large mapped block it raises its mmap
threshold to that size (at most 32 MiB) and its trim threshold to twice that. ``tune_malloc``
starts from that end point (a 32 MiB mmap threshold, a 64 MiB trim threshold) instead of
reaching it block by block, and never goes beyond it: at most 64 MiB of freed memory stays
mapped at the top of the heap.

It changes the whole process, so a library must not do it on import: programs opt in with
``needle.backend.tune_malloc()`` (``python -m needle`` and the benchmarks do; a user's
training script may). ``NEEDLE_MALLOC_TUNING=0`` makes the call do nothing, and glibc's own
environment variables (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ...) win when
set.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: glibc's dynamic thresholds at their maximum on 64-bit systems
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD

_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                    "MALLOC_MMAP_MAX_")

#: what tune_malloc applied ({"mmap_threshold": ..., "trim_threshold": ...}), or why not (str)
applied: dict[str, int] | str = "not called"


def _glibc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):
        return False


def tune_malloc() -> dict[str, int] | str:
    """Set glibc's mmap and trim thresholds (see the module doc); returns what was applied, or
    a sentence saying why nothing was."""
    global applied
    if os.environ.get("NEEDLE_MALLOC_TUNING", "1") == "0":
        applied = "disabled by NEEDLE_MALLOC_TUNING=0"
    elif any(name in os.environ for name in _GLIBC_VARIABLES):
        applied = "glibc's MALLOC_*_ environment variables are set; they are left to decide"
    elif not _glibc():
        applied = "not glibc malloc"
    else:
        libc = ctypes.CDLL(None)
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
        applied = ({"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD} if ok
                   else "mallopt refused the settings")
    return applied
