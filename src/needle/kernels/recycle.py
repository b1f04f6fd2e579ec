"""Very large output arrays recycled between training steps, so they are not page-faulted in
again on every step.

glibc serves arrays above its mmap threshold (32 MiB at most, see backend/allocator.py) from
fresh mappings and unmaps them when they are freed, so every page of the next such array
faults on first touch. On this machine's VM filling a fresh (1120, 10000) float32 array (a
language model's logits, 45 MB) took 47-105 ms of CPU time against 2.7 ms for the same writes
into an array already mapped: more than the matrix product that computes it. ``empty`` keeps
the last few such arrays and hands one out again once nothing but this pool refers to it (no
Tensor, view, user or other thread can see it then, and a view keeps its base referenced).

Only ops whose output is a fresh array use it (nn.Linear's product, the loss gradient, the
products kernels/blas_policy.py splits: a 4096 x 4096 weight gradient).
At most ``MAX_ARRAYS`` arrays and ``MAX_BYTES`` bytes stay mapped;
``NEEDLE_RECYCLE_LARGE=0`` turns it off (A/B runs).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import numpy as np

__all__ = ["MAX_ARRAYS", "MAX_BYTES", "MIN_BYTES", "empty"]

#: smaller arrays come from malloc's heap, which keeps its pages mapped (tune_malloc)
MIN_BYTES = 32 << 20
#: arrays kept at most (two per language-model head: the logits and their gradient)
MAX_ARRAYS = 4
#: bytes kept at most: a one-off giant array is not held for the rest of the process
MAX_BYTES = 512 << 20

_lock = threading.Lock()
_pool: list[np.ndarray] = []


def _enabled() -> bool:
    return os.environ.get("NEEDLE_RECYCLE_LARGE", "1") != "0"


def empty(shape: tuple, dtype: Any) -> np.ndarray:
    """An uninitialized C-contiguous NumPy array: a kept one no one else refers to when the
    array is large, else a new one (``np.empty``)."""
    dtype = np.dtype(dtype)
    size = 1
    for n in shape:
        size *= int(n)
    if size * dtype.itemsize < MIN_BYTES or not _enabled():
        return np.empty(shape, dtype)
    shape = tuple(int(n) for n in shape)
    with _lock:  # (one thread takes a free array: it then holds a reference of its own)
        pool = _pool
        for i in range(len(pool)):
            # 2: the pool's reference and getrefcount's argument, nothing else
            if pool[i].shape == shape and pool[i].dtype == dtype \
                    and sys.getrefcount(pool[i]) == 2:
                array = pool.pop(i)
                pool.append(array)  # the most recently used last
                return array
        array = np.empty(shape, dtype)
        if array.nbytes > MAX_BYTES:
            return array
        pool.append(array)
        while len(pool) > MAX_ARRAYS or sum(a.nbytes for a in pool) > MAX_BYTES:
            del pool[0]  # the least recently handed out (its users, if any, keep it alive)
        return array
