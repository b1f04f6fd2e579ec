"""numba's own parallel loops (``prange``) on the TBB threading layer, for the large passes.

Why: needle's worker threads (backend/cpu_threads.py) cost ~100-150 us a hand-off on a loaded
2-core VM (waking the worker, then the GIL), so passes of 2^18-2^19 elements stayed on one
core and each split pass paid the hand-off. numba's ``prange`` on Intel TBB starts a region in
~1.5 us, with no Python on the workers. Measured (benchmarks/performance_notes.md, session 10):
the strided CNN step 1.33-1.37 -> 1.16-1.22 of PyTorch's time with relu, its adjoint and the
BatchNorm gradient on prange.

Only TBB: numba's GNU OpenMP layer spins its workers against OpenBLAS's (the same step got
slower, 1.41 -> 1.59) and kills a forked child that runs a parallel loop; the ``workqueue``
layer aborts the process when two threads run parallel loops at once. TBB is neither. numba
picks TBB first when it can load ``libtbb.so.12``; the pip wheel ``tbb`` (in the ``fast``
extra, as numba's documentation advises for pip installs) puts it in ``<prefix>/lib``, where the
loader does not look, so it is loaded here by path first.

Every kernel that uses this splits its work into blocks fixed by the shape alone, and runs
the same serial block loop over them: the bits do not depend on the thread count or on
whether prange ran (tests compare both). ``NEEDLE_PARALLEL_LOOPS=0`` turns prange off.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable
from typing import Any

from . import cpu_threads
from .numba_support import njit_cached, numba_module

__all__ = ["njit_parallel", "parallel_threads", "tbb_layer"]

#: numba threading-layer settings under which numba may pick TBB
_LAYERS_ALLOWING_TBB = ("default", "tbb", "safe", "threadsafe", "forksafe")


def _load_pip_tbb() -> None:
    """Load the ``tbb`` wheel's ``libtbb.so.12`` globally, so numba's TBB pool links to it."""
    try:
        from importlib.metadata import PackageNotFoundError, files
        listed = files("tbb") or []
    except PackageNotFoundError:
        return
    for entry in listed:
        if entry.name == "libtbb.so.12":
            path = str(entry.locate())
            if os.path.exists(path):
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return


@functools.lru_cache(maxsize=1)
def tbb_layer() -> bool:
    """Whether numba's parallel loops run on TBB in this process (loading the pip wheel's
    library and starting numba's pool on first call). False without numba, with
    ``NEEDLE_PARALLEL_LOOPS=0``, when the user chose another layer, or when TBB is missing or
    too old for this numba."""
    numba = numba_module()
    if numba is None or os.environ.get("NEEDLE_PARALLEL_LOOPS", "1") == "0":
        return False
    if str(numba.config.THREADING_LAYER).lower() not in _LAYERS_ALLOWING_TBB:
        return False
    try:
        from numba.np.ufunc import parallel
    except ImportError:
        return False
    if not parallel._is_initialized:
        try:
            import numba.np.ufunc.tbbpool  # noqa: F401 (is libtbb.so.12 on the loader's path?)
        except ImportError:
            try:
                _load_pip_tbb()
                import numba.np.ufunc.tbbpool  # noqa: F401
            except (ImportError, OSError):
                return False
        try:
            parallel._launch_threads()
        except (ImportError, ValueError, RuntimeError):
            return False
    try:
        return bool(numba.threading_layer() == "tbb")
    except ValueError:  # "Threading layer is not initialized."
        return False


_thread_state = threading.local()


def parallel_threads() -> int:
    """Threads a prange loop may use from this thread: needle's thread count (capped by
    numba's pool), or 0 when the loops should not run in parallel (one thread, no TBB).

    numba's thread count and chunk size are per calling thread; both are set here, once per
    thread and count (so they apply to the user's own prange loops run on that thread too):
    the count to needle's, and the chunk size to 1, so that the threads draw the blocks one at
    a time (TBB tasks, taken by whichever thread is free) instead of numba's default of one
    equal run of blocks per thread cut up front, which leaves a thread that lost its core on
    a loaded machine holding half the work (the strided CNN step measured 1.1-3x
    slower so). Which thread runs a block never changes its result.
    """
    wanted = cpu_threads.NUM_THREADS
    if wanted < 2 or not tbb_layer():
        return 0
    numba = numba_module()
    count = min(wanted, int(numba.config.NUMBA_NUM_THREADS))
    if count < 2:
        return 0
    if getattr(_thread_state, "count", None) != count:
        numba.set_num_threads(count)
        numba.set_parallel_chunksize(1)
        _thread_state.count = count
    return count


def njit_parallel(fn: Callable, **options: Any) -> Any:
    """``numba.njit(parallel=True)`` for a kernel's prange loop over fixed blocks, with the
    options of backend/numba_support.njit_cached (numba's disk cache where it can write one).
    Call it only where ``parallel_threads()`` is nonzero: on another layer it would spin."""
    return njit_cached(fn, parallel=True, **options)
