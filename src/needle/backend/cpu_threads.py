"""needle's own CPU threads: how many, the worker pool, and BLAS kept off its threads meanwhile.

Large CPU ops split their work across ``NUM_THREADS`` threads (the calling thread is one):
the Winograd convolutions (kernels/winograd.py) and the im2col convolutions, split by images
(kernels/conv.py), through ``in_parallel``; BatchNorm's passes and max pooling, split by rows
(kernels/cpu_kernels.py), and ReLU, its adjoint and the conv bias add, split into blocks
(kernels/threaded_elementwise.py), through ``run_chunks``. numba loops and BLAS products release the
GIL, so plain Python threads run in parallel.

NOTE: OpenBLAS keeps a pool of its own, and its worker thread spins for about 0.1 s after
each product it threads. Two pools on two cores fight: a product split across needle's
threads while OpenBLAS also threads it ran 1.5x slower than either alone, and a spinning
OpenBLAS worker took the second core from the Winograd threads. So the split products run
with OpenBLAS on one thread (kernels/blas_threads.py holds it), and OpenBLAS's own count is
restored afterwards, for the user's NumPy code and needle's other products. Where BLAS's
count cannot be set, the im2col convolutions are not split.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["NUM_THREADS", "SharedIterator", "blas_control", "in_parallel", "run_chunks"]


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


class _Helpers:
    """Which helper threads of one in_parallel call started before the calling thread
    finished its own share; later ones skip the work (nothing is left to draw)."""

    def __init__(self, count: int) -> None:
        self.lock = threading.Lock()
        self.closed = False
        self.started = [False] * count

    def run(self, index: int, work: Callable[[Iterator], Any], shared: SharedIterator) -> Any:
        with self.lock:
            if self.closed:
                return None
            self.started[index] = True
        return work(shared)

    def close(self) -> list[bool]:
        with self.lock:
            self.closed = True
            return list(self.started)


def in_parallel(work: Callable[[Iterator], Any], items: Iterable, parts: int) -> list:
    """``work(shared)`` on up to ``parts`` threads (this one included), all drawing from one
    shared iterator over ``items``; the results of the threads that ran it, this thread's
    first. Exceptions propagate.

    NOTE: a helper thread that has not started by the time this thread has done its share
    (and so drawn every item left) is not waited for: on a loaded machine it may get a core
    only milliseconds later (see run_chunks); it then returns at once without running work.
    """
    shared = SharedIterator(items)
    if parts <= 1:
        return [work(shared)]
    helpers = _Helpers(parts - 1)
    executor = _Pool.get(parts - 1)
    others = [executor.submit(helpers.run, i, work, shared) for i in range(parts - 1)]
    mine = work(shared)
    started = helpers.close()
    return [mine] + [future.result() for future, ran in zip(others, started) if ran]


class _ChunkRun:
    """``fn(i)`` for i < count, drawn one at a time by whichever threads run ``work``; done
    when every chunk is, not when every thread has started (see run_chunks)."""

    def __init__(self, fn: Callable[[int], None], count: int) -> None:
        self.fn, self.count = fn, count
        self.next = self.finished = 0
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.all_done = threading.Event()

    def work(self) -> None:
        while True:
            with self.lock:
                if self.next >= self.count or self.error is not None:
                    return
                i = self.next
                self.next += 1
            try:
                self.fn(i)
            except BaseException as error:  # noqa: BLE001 (handed to the caller's thread)
                with self.lock:
                    self.error = self.error or error
            with self.lock:
                self.finished += 1
                if self.finished == self.count or (self.error is not None
                                                   and self.finished == self.next):
                    self.all_done.set()


def run_chunks(fn: Callable[[int], None], count: int, parts: int) -> None:
    """``fn(i)`` for every i < ``count`` on up to ``parts`` threads (this one included), for
    work whose results ``fn`` writes into arrays of its own; the first exception propagates.

    NOTE: unlike in_parallel it does not wait for helper threads that have not started yet:
    on a loaded machine a helper may get its core only after this thread has drawn every
    chunk, and waiting for it then cost more than the work (a 16 MB pass: 1.3 ms alone,
    6 ms median waiting for the second thread, load ~8 on 2 cores).
    """
    if count <= 0:
        return
    run = _ChunkRun(fn, count)
    helpers = min(parts, count) - 1
    if helpers > 0:
        executor = _Pool.get(helpers)
        for _ in range(helpers):
            executor.submit(run.work)
    run.work()
    run.all_done.wait()
    if run.error is not None:
        raise run.error


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
