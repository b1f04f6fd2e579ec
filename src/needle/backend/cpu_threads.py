"""needle's own CPU threads: how many, the worker pool, and BLAS kept off its threads meanwhile.

Large CPU ops split their work across ``NUM_THREADS`` threads (the calling thread is one):
the Winograd convolutions (kernels/winograd.py) and the im2col convolutions, split by images
(kernels/conv.py). numba loops and BLAS products release the GIL, so plain Python threads
run in parallel.

NOTE: OpenBLAS keeps a pool of its own, and its worker thread spins for about 0.1 s after
each product it threads. Two pools on two cores fight: a product split across needle's
threads while OpenBLAS also threads it ran 1.5x slower than either alone, and a spinning
OpenBLAS worker took the second core from the Winograd threads. So the split products run
with OpenBLAS on one thread (``single_threaded_blas``, through threadpoolctl), and OpenBLAS's
own count is restored afterwards, for the user's NumPy code and needle's other products.
Without threadpoolctl (the ``fast`` extra installs it), and off the main thread, the im2col
convolutions are not split.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["NUM_THREADS", "SharedIterator", "blas_control", "can_hold_blas", "in_parallel",
           "single_threaded_blas"]


def _default_threads() -> int:
    """NEEDLE_NUM_THREADS, else OMP_NUM_THREADS (the usual way to cap a process's threads),
    else the CPUs this process may run on."""
    for name in ("NEEDLE_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)


#: threads that share a large op's work (the calling thread is one of them)
NUM_THREADS = _default_threads()


class _Pool:
    """The worker threads, made on first use and again in a forked child (threads do not
    survive a fork)."""

    executor: ThreadPoolExecutor | None = None
    workers = 0

    @classmethod
    def get(cls, workers: int) -> ThreadPoolExecutor:
        if cls.executor is None or cls.workers < workers:
            if cls.executor is not None:  # a larger pool replaces it; let its threads end
                cls.executor.shutdown(wait=False)
            cls.executor = ThreadPoolExecutor(workers, thread_name_prefix="needle-cpu")
            cls.workers = workers
        return cls.executor

    @classmethod
    def forget(cls) -> None:
        cls.executor, cls.workers = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_Pool.forget)


class SharedIterator:
    """An iterator that several threads may draw from (a generator may not be entered by two
    threads at once)."""

    def __init__(self, items: Iterable) -> None:
        self._items = iter(items)
        self._lock = threading.Lock()

    def __iter__(self) -> SharedIterator:
        return self

    def __next__(self) -> Any:
        with self._lock:
            return next(self._items)


def in_parallel(work: Callable[[Iterator], Any], items: Iterable, parts: int) -> list:
    """``work(shared)`` on ``parts`` threads (this one included), all drawing from one shared
    iterator over ``items``; the results, this thread's first. Exceptions propagate."""
    shared = SharedIterator(items)
    others = [_Pool.get(parts - 1).submit(work, shared) for _ in range(1, parts)]
    return [work(shared)] + [future.result() for future in others]


@functools.lru_cache(maxsize=1)
def blas_control() -> Any:
    """threadpoolctl's controller of the loaded BLAS libraries, or None without
    threadpoolctl (or without a BLAS it can set)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    blas = ThreadpoolController().select(user_api="blas")
    return blas if blas.lib_controllers else None


def can_hold_blas() -> bool:
    """Whether this thread can hold BLAS on one thread for a split: threadpoolctl present
    and this the main thread.

    NOTE: measured with NumPy's OpenBLAS 0.3.31: once the main thread has set a thread count,
    a count set from another thread is ignored, and products split there would run on
    OpenBLAS's threads from two of ours at once (1.5x slower than not splitting). Holding
    only from the main thread also keeps two holds from overlapping.
    """
    return blas_control() is not None and threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """BLAS on one thread inside the block (products that needle's threads split), restored
    after. Only where can_hold_blas(); a no-op elsewhere."""
    if not can_hold_blas():
        yield
        return
    with blas_control().limit(limits=1):
        yield
